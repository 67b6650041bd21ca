//! The agent's side of the NATS transport: takes attempts from its spawn subject, reports
//! back in batches, heartbeats with the list of what it runs, and drains on shutdown.

use bytes::Bytes;
use futures_util::StreamExt;
use ractor::ActorRef;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AttemptId, FlowRunId};
use pinazu_shared::nats::Drops;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{
    payload_key, AttemptFinished, AttemptStarted, Heartbeat, Report, ReportAck, ReportBatch,
    RunningAttempt, SpawnTask,
};

use crate::agent::{spawn_agent, AgentConfig, AgentMsg};

/// Reports per published batch, at most.
const MAX_BATCH: usize = 512;

/// Settings of a NATS-connected agent.
#[derive(Clone)]
pub struct AgentServeConfig {
    /// Where large arguments and results go (shared with the coordinator).
    pub store: Arc<dyn ObjectStore>,
    /// Results above this many bytes go to the store and travel by reference.
    pub payload_threshold: usize,
    /// The agent.
    pub agent: AgentConfig,
    /// Subjects.
    pub subjects: Subjects,
    /// Heartbeat period.
    pub heartbeat: Duration,
    /// On shutdown, how long running attempts may take to finish.
    pub drain_timeout: Duration,
}

#[derive(Default)]
struct Tracker {
    running: HashSet<RunningAttempt>,
}

/// Report batches sent and not yet acknowledged by the coordinator. Every batch stays
/// here until acknowledged, so a coordinator that died before journaling its results
/// gets them again from its successor (on its hello, or after `RESEND_AFTER`).
struct Outbox {
    /// This process's incarnation (random).
    incarnation: u64,
    /// The last batch number used.
    seq: u64,
    /// The highest batch number acknowledged.
    acked: u64,
    kept: VecDeque<(ReportBatch, Instant)>,
}

/// Unacknowledged batches are sent again after this long.
const RESEND_AFTER: Duration = Duration::from_secs(10);

impl Outbox {
    fn ack(&mut self, seq: u64) {
        self.acked = self.acked.max(seq);
        while self.kept.front().is_some_and(|(b, _)| b.seq <= self.acked) {
            self.kept.pop_front();
        }
    }

    /// Batches to send again: all of them, or those unacknowledged for `RESEND_AFTER`;
    /// each carries the current acknowledgement, so a new coordinator knows where the
    /// agent's sequence stands.
    fn resend(&mut self, all: bool) -> Vec<Vec<u8>> {
        let now = Instant::now();
        let stale = self
            .kept
            .front()
            .is_some_and(|(_, at)| now.duration_since(*at) >= RESEND_AFTER);
        if !(all || stale) {
            return Vec::new();
        }
        let acked = self.acked;
        self.kept
            .iter_mut()
            .filter_map(|(batch, at)| {
                *at = now;
                batch.acked = acked;
                encode_envelope(batch).ok()
            })
            .collect()
    }
}

/// Reports attempts through one batching publisher task and tracks what runs.
struct NatsReportSink {
    agent_id: pinazu_shared::ids::AgentId,
    tx: Mutex<Option<mpsc::UnboundedSender<Report>>>,
    tracker: Arc<Mutex<Tracker>>,
    idle: Arc<Notify>,
}

impl ResultSink for NatsReportSink {
    fn started(&self, s: AttemptStarted) {
        if let Ok(mut t) = self.tracker.lock() {
            t.running.insert(RunningAttempt {
                flow_run_id: s.flow_run_id,
                call_id: s.call_id,
                attempt_id: s.attempt_id,
            });
        }
        self.send(Report::Started(s));
    }

    fn finished(&self, f: AttemptFinished) {
        if let Ok(mut t) = self.tracker.lock() {
            t.running.remove(&RunningAttempt {
                flow_run_id: f.flow_run_id,
                call_id: f.call_id,
                attempt_id: f.attempt_id,
            });
            if t.running.is_empty() {
                self.idle.notify_waiters();
            }
        }
        self.send(Report::Finished(f));
    }
}

impl NatsReportSink {
    fn send(&self, report: Report) {
        if let Some(tx) = self.tx.lock().ok().as_ref().and_then(|t| t.as_ref()) {
            let _ = tx.send(report);
        }
    }

    /// No more reports: the reporter ends once it has published what it holds.
    fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}

fn heartbeat(
    cfg: &AgentServeConfig,
    tracker: &Mutex<Tracker>,
    draining: bool,
    leaving: bool,
) -> Heartbeat {
    let running = match tracker.lock() {
        Ok(t) => t.running.iter().copied().collect(),
        Err(_) => Vec::new(),
    };
    Heartbeat {
        info: cfg.agent.info(),
        running,
        draining,
        leaving,
    }
}

async fn publish(client: &async_nats::Client, subject: String, body: &impl serde::Serialize) {
    match encode_envelope(body) {
        Ok(b) => {
            if let Err(e) = client.publish(subject, Bytes::from(b)).await {
                tracing::warn!(error = %e, "NATS publish failed");
            }
        }
        Err(e) => tracing::error!(error = %e, "could not encode a message"),
    }
}

/// Runs an agent on NATS until `shutdown` resolves, then drains: advertises `draining`,
/// lets running attempts finish (up to the drain timeout), sends their reports and a
/// `leaving` heartbeat, and returns.
pub async fn serve_agent(
    client: async_nats::Client,
    cfg: AgentServeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), String> {
    let subjects = cfg.subjects.clone();
    let agent_id = cfg.agent.id.clone();
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let idle = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let sink = Arc::new(NatsReportSink {
        agent_id: agent_id.clone(),
        tx: Mutex::new(Some(tx)),
        tracker: tracker.clone(),
        idle: idle.clone(),
    });

    // reports: one task, so their order is kept; batched under load, numbered, and kept
    // until the coordinator acknowledges them
    let outbox = Arc::new(Mutex::new(Outbox {
        incarnation: fastrand::u64(..),
        seq: 0,
        acked: 0,
        kept: VecDeque::new(),
    }));
    let reporter = {
        let client = client.clone();
        let subject = subjects.reports();
        let (store, threshold) = (cfg.store.clone(), cfg.payload_threshold);
        let (outbox, agent_id) = (outbox.clone(), agent_id.clone());
        tokio::spawn(async move {
            // a report that did not fit the previous batch
            let mut carried: Option<Report> = None;
            loop {
                let first = match carried.take() {
                    Some(r) => r,
                    None => match rx.recv().await {
                        Some(r) => r,
                        None => break,
                    },
                };
                // batches stay under the payload threshold (results above it go by
                // reference), so a batch always fits in a NATS message
                let mut bytes = report_size(&first, threshold);
                let mut reports = vec![first];
                while reports.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => {
                            let size = report_size(&r, threshold);
                            if bytes + size > threshold {
                                carried = Some(r);
                                break;
                            }
                            bytes += size;
                            reports.push(r);
                        }
                        Err(_) => break,
                    }
                }
                for report in &mut reports {
                    if let Report::Finished(f) = report {
                        store_large_result(&*store, threshold, f).await;
                    }
                }
                let encoded = match outbox.lock() {
                    Ok(mut o) => {
                        o.seq += 1;
                        let batch = ReportBatch {
                            agent_id: agent_id.clone(),
                            incarnation: o.incarnation,
                            seq: o.seq,
                            acked: o.acked,
                            reports,
                        };
                        let encoded = encode_envelope(&batch);
                        o.kept.push_back((batch, Instant::now()));
                        encoded
                    }
                    Err(_) => break,
                };
                match encoded {
                    Ok(b) => {
                        if let Err(e) = client.publish(subject.clone(), Bytes::from(b)).await {
                            // kept: sent again later
                            tracing::warn!(error = %e, "NATS publish failed");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "could not encode reports"),
                }
            }
        })
    };

    let agent: ActorRef<AgentMsg> = spawn_agent(cfg.agent.clone(), sink.clone())
        .await
        .map_err(|e| format!("could not start the agent actor: {e}"))?;

    let drops = Arc::new(Drops::default());
    let mut spawns = client
        .subscribe(subjects.agent_spawn(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut cancels = client
        .subscribe(subjects.agent_cancel(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut hello = client
        .subscribe(subjects.hello())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let mut acks = client
        .subscribe(subjects.agent_ack(&agent_id))
        .await
        .map_err(|e| format!("subscribe: {e}"))?;

    let (a, d, s, store) = (
        agent.clone(),
        drops.clone(),
        sink.clone(),
        cfg.store.clone(),
    );
    let spawn_loop = tokio::spawn(async move {
        while let Some(msg) = spawns.next().await {
            match decode_envelope::<Vec<SpawnTask>>(&msg.payload) {
                Ok(tasks) => {
                    let (by_ref, inline): (Vec<_>, Vec<_>) =
                        tasks.into_iter().partition(|t| t.args_ref.is_some());
                    if !inline.is_empty() {
                        let _ = a.send_message(AgentMsg::Spawn(inline));
                    }
                    for task in by_ref {
                        let (a, s, store) = (a.clone(), s.clone(), store.clone());
                        tokio::spawn(async move { fetch_args(&*store, &a, &s, task).await });
                    }
                }
                Err(e) => d.record(&msg.subject, &e),
            }
        }
    });
    let (a, d) = (agent.clone(), drops.clone());
    let cancel_loop = tokio::spawn(async move {
        while let Some(msg) = cancels.next().await {
            match decode_envelope::<Vec<(FlowRunId, AttemptId)>>(&msg.payload) {
                Ok(attempts) => {
                    let _ = a.send_message(AgentMsg::Cancel(attempts));
                }
                Err(e) => d.record(&msg.subject, &e),
            }
        }
    });

    let (o, d, acked) = (outbox.clone(), drops.clone(), Arc::new(Notify::new()));
    let all_acked = acked.clone();
    let ack_loop = tokio::spawn(async move {
        while let Some(msg) = acks.next().await {
            match decode_envelope::<ReportAck>(&msg.payload) {
                Ok(ack) => {
                    if let Ok(mut o) = o.lock() {
                        o.ack(ack.seq);
                        if o.kept.is_empty() {
                            acked.notify_waiters();
                        }
                    }
                }
                Err(e) => d.record(&msg.subject, &e),
            }
        }
    });

    // a coordinator (re)started: it gets every unacknowledged batch again, then a
    // heartbeat listing what runs here
    let hello_now = Arc::new(Notify::new());
    let b = hello_now.clone();
    let hello_loop = tokio::spawn(async move {
        while hello.next().await.is_some() {
            b.notify_one();
        }
    });

    let hb_subject = subjects.heartbeat();
    tracing::info!(agent = %agent_id, slots = cfg.agent.slots, tasks = cfg.agent.registry.task_names().len(), "agent serving");
    publish(
        &client,
        hb_subject.clone(),
        &heartbeat(&cfg, &tracker, false, false),
    )
    .await;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(cfg.heartbeat);
    let reports_subject = subjects.reports();
    loop {
        let all = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => false,
            _ = hello_now.notified() => true,
        };
        resend(&client, &reports_subject, &outbox, all).await;
        publish(
            &client,
            hb_subject.clone(),
            &heartbeat(&cfg, &tracker, false, false),
        )
        .await;
    }

    // drain: take nothing new, let what runs finish
    tracing::info!(agent = %agent_id, "draining: finishing running attempts, taking no new ones");
    publish(
        &client,
        hb_subject.clone(),
        &heartbeat(&cfg, &tracker, true, false),
    )
    .await;
    let deadline = Instant::now() + cfg.drain_timeout;
    loop {
        let busy = tracker.lock().map(|t| t.running.len()).unwrap_or(0);
        if busy == 0 {
            break;
        }
        if Instant::now() >= deadline {
            tracing::warn!(agent = %agent_id, running = busy, "drain timeout: leaving with attempts still running; the coordinator runs them elsewhere");
            break;
        }
        tokio::select! {
            _ = idle.notified() => {}
            _ = tokio::time::sleep(cfg.heartbeat) => {
                publish(&client, hb_subject.clone(), &heartbeat(&cfg, &tracker, true, false)).await;
            }
        }
    }
    spawn_loop.abort();
    cancel_loop.abort();
    agent.stop(None);
    sink.close();
    if tokio::time::timeout(Duration::from_secs(5), reporter)
        .await
        .is_err()
    {
        tracing::warn!(agent = %agent_id, "reports still pending after 5 s; leaving anyway");
    }
    // wait (briefly) for the coordinator to acknowledge the last results, so none is
    // lost if it restarts right now
    let ack_deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let pending = outbox.lock().map(|o| o.kept.len()).unwrap_or(0);
        if pending == 0 {
            break;
        }
        let wait = all_acked.notified();
        tokio::select! {
            _ = wait => {}
            _ = hello_now.notified() => resend(&client, &reports_subject, &outbox, true).await,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = tokio::time::sleep_until(ack_deadline) => {
                tracing::warn!(agent = %agent_id, batches = pending, "leaving with reports the coordinator has not acknowledged; their attempts will run again");
                break;
            }
        }
    }
    hello_loop.abort();
    ack_loop.abort();
    publish(&client, hb_subject, &heartbeat(&cfg, &tracker, true, true)).await;
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not flush NATS before exit");
    }
    tracing::info!(agent = %agent_id, dropped = drops.count(), "agent stopped");
    Ok(())
}

/// Sends unacknowledged report batches again (all, or those waiting too long).
async fn resend(client: &async_nats::Client, subject: &str, outbox: &Mutex<Outbox>, all: bool) {
    let batches = match outbox.lock() {
        Ok(mut o) => o.resend(all),
        Err(_) => return,
    };
    if !batches.is_empty() {
        tracing::debug!(
            batches = batches.len(),
            all,
            "sending unacknowledged reports again"
        );
    }
    for b in batches {
        if let Err(e) = client.publish(subject.to_string(), Bytes::from(b)).await {
            tracing::warn!(error = %e, "NATS publish failed");
        }
    }
}

/// Fetches arguments that travelled by reference, then hands the attempt to the agent;
/// arguments that cannot be read fail the attempt (retried per the task's policy).
async fn fetch_args(
    store: &dyn ObjectStore,
    agent: &ActorRef<AgentMsg>,
    sink: &NatsReportSink,
    mut task: SpawnTask,
) {
    let key = task.args_ref.take().unwrap_or_default();
    let error = match store.get(&key).await {
        Ok(Some(bytes)) => {
            task.args = bytes;
            let _ = agent.send_message(AgentMsg::Spawn(vec![task]));
            return;
        }
        Ok(None) => format!("the argument payload {key} is missing from the store"),
        Err(e) => format!("the argument payload {key} could not be read: {e}"),
    };
    sink.finished(AttemptFinished {
        flow_run_id: task.flow_run_id,
        call_id: task.call_id,
        attempt_id: task.attempt_id,
        agent_id: sink.agent_id.clone(),
        outcome: Err(ErrorInfo::new(FailureKind::Error, error)),
        result_ref: None,
        elapsed_us: 0,
        result_cache_key: None,
    });
}

/// About how many bytes a report takes in a batch (a result above `threshold` travels by
/// reference, so it takes little).
fn report_size(r: &Report, threshold: usize) -> usize {
    match r {
        Report::Started(_) => 128,
        Report::Finished(f) => {
            160 + match &f.outcome {
                Ok(b) if b.len() > threshold => 128,
                Ok(b) => b.len(),
                Err(e) => e.size(),
            }
        }
    }
}

/// Moves a result above the threshold into the store; a result that cannot be stored
/// becomes a failed attempt (retried per the task's policy), never a hang.
async fn store_large_result(store: &dyn ObjectStore, threshold: usize, f: &mut AttemptFinished) {
    let size = match &f.outcome {
        Ok(bytes) if bytes.len() > threshold => bytes.len(),
        _ => return,
    };
    let key = payload_key(f.flow_run_id, f.call_id, f.attempt_id, "result");
    let bytes = std::mem::replace(&mut f.outcome, Ok(Bytes::new())).unwrap_or_default();
    match store.put(&key, bytes).await {
        Ok(()) => f.result_ref = Some(key),
        Err(e) => {
            f.outcome = Err(ErrorInfo::new(
                FailureKind::Error,
                format!("the result of {size} bytes is too large for a NATS message and could not be stored: {e}"),
            ))
        }
    }
}
