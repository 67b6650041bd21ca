//! The agent's side of the NATS transport: takes attempts from its spawn subject, reports
//! back in batches, heartbeats with the list of what it runs, and drains on shutdown.

use bytes::Bytes;
use futures_util::StreamExt;
use ractor::ActorRef;
use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};

use pinazu_shared::api::{ApiReply, ApiRequest};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AttemptId, FlowRunId};
use pinazu_shared::nats::Drops;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::subjects::Subjects;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{
    payload_key, AgentIdentity, AttemptFinished, AttemptStarted, Heartbeat, Report, ReportAck,
    ReportBatch, RunningAttempt, SpawnTask,
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

/// Report batches sent and not yet acknowledged. Every batch stays here until
/// acknowledged, so a coordinator that died before journaling its results gets them
/// again from its successor (on its hello, or after `RESEND_AFTER`). With several
/// coordinators each acknowledges the runs it answers for: a batch leaves once every
/// run in it is acknowledged, and is sent again with only the reports still pending.
struct Outbox {
    /// This process's incarnation (random).
    incarnation: u64,
    /// The last batch number used.
    seq: u64,
    /// Every batch up to this one is acknowledged whole.
    acked: u64,
    /// Batches not acknowledged whole, oldest first.
    kept: VecDeque<Kept>,
    /// The encoded size of `kept`.
    bytes: usize,
}

struct Kept {
    batch: ReportBatch,
    /// When last sent.
    at: Instant,
    /// Encoded size.
    size: usize,
    /// Runs whose reports in it are not acknowledged yet.
    pending: HashSet<FlowRunId>,
}

/// Unacknowledged batches are sent again after this long.
const RESEND_AFTER: Duration = Duration::from_secs(10);

impl Outbox {
    /// Takes an acknowledgement; one addressed to another process that had this id
    /// before (another incarnation; 0 is from a coordinator that does not say) is
    /// ignored, or it would drop batches that coordinator never saw.
    fn ack(&mut self, incarnation: u64, seq: u64, runs: Option<&[FlowRunId]>) {
        if incarnation != 0 && incarnation != self.incarnation {
            return;
        }
        match runs {
            None => {
                for k in self.kept.iter_mut().take_while(|k| k.batch.seq <= seq) {
                    k.pending.clear();
                }
            }
            Some(runs) => {
                for k in self.kept.iter_mut().take_while(|k| k.batch.seq <= seq) {
                    for r in runs {
                        k.pending.remove(r);
                    }
                }
            }
        }
        while self.kept.front().is_some_and(|k| k.pending.is_empty()) {
            if let Some(k) = self.kept.pop_front() {
                self.bytes -= k.size;
                self.acked = self.acked.max(k.batch.seq);
            }
        }
        self.acked = self.acked.max(match runs {
            None => seq,
            Some(_) => 0,
        });
    }

    /// Keeps a batch until acknowledged. Beyond `MAX_KEPT` batches or `MAX_KEPT_BYTES`
    /// the oldest are dropped, and counted as acknowledged: the coordinator must not
    /// wait for them (their attempts left the heartbeat's list, so the coordinator
    /// takes them for lost and runs their calls again).
    fn keep(&mut self, batch: ReportBatch, size: usize) {
        let pending = batch.reports.iter().map(report_run).collect();
        self.kept.push_back(Kept {
            batch,
            at: Instant::now(),
            size,
            pending,
        });
        self.bytes += size;
        let mut dropped = 0;
        while self.kept.len() > MAX_KEPT || (self.bytes > MAX_KEPT_BYTES && self.kept.len() > 1) {
            if let Some(k) = self.kept.pop_front() {
                self.bytes -= k.size;
                self.acked = self.acked.max(k.batch.seq);
                dropped += 1;
            }
        }
        if dropped > 0 {
            tracing::warn!(
                dropped,
                kept = self.kept.len(),
                bytes = self.bytes,
                "too many reports unacknowledged (coordinator unreachable?): dropped the oldest; the coordinator runs their calls again"
            );
        }
    }

    /// Batches to send again: all of them, or those unacknowledged for `RESEND_AFTER`,
    /// with the reports still pending; each carries the current acknowledgement, so a
    /// new coordinator knows where the agent's sequence stands.
    fn resend(&mut self, all: bool) -> Vec<Vec<u8>> {
        let now = Instant::now();
        let stale = self
            .kept
            .front()
            .is_some_and(|k| now.duration_since(k.at) >= RESEND_AFTER);
        if !(all || stale) {
            return Vec::new();
        }
        let acked = self.acked;
        self.kept
            .iter_mut()
            .filter(|k| !k.pending.is_empty())
            .filter_map(|k| {
                k.at = now;
                k.batch.acked = acked;
                if k.batch
                    .reports
                    .iter()
                    .all(|r| k.pending.contains(&report_run(r)))
                {
                    return encode_envelope(&k.batch).ok();
                }
                let partial = ReportBatch {
                    agent_id: k.batch.agent_id.clone(),
                    incarnation: k.batch.incarnation,
                    seq: k.batch.seq,
                    acked,
                    reports: k
                        .batch
                        .reports
                        .iter()
                        .filter(|r| k.pending.contains(&report_run(r)))
                        .cloned()
                        .collect(),
                };
                encode_envelope(&partial).ok()
            })
            .collect()
    }
}

fn report_run(r: &Report) -> FlowRunId {
    match r {
        Report::Started(s) => s.flow_run_id,
        Report::Finished(f) => f.flow_run_id,
    }
}

/// Reports attempts through one batching publisher task and tracks what runs.
struct NatsReportSink {
    agent_id: pinazu_shared::ids::AgentId,
    tx: Mutex<Option<mpsc::UnboundedSender<Report>>>,
    tracker: Arc<Mutex<Tracker>>,
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
        // still listed as running until its report is in the outbox (a large result may
        // take seconds to store): the coordinator must not take it for lost meanwhile
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
        Ok(b) => publish_bytes(client, subject, Bytes::from(b)).await,
        Err(e) => tracing::error!(error = %e, "could not encode a message"),
    }
}

/// How long a publish may wait for room in the client's buffer (full while NATS is
/// unreachable): the agent's loop never blocks on NATS, so it heartbeats, checks its
/// id and stops on a signal whatever the connection does.
const PUBLISH_WAIT: Duration = Duration::from_secs(2);

async fn publish_bytes(client: &async_nats::Client, subject: String, body: Bytes) {
    match tokio::time::timeout(PUBLISH_WAIT, client.publish(subject, body)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "NATS publish failed"),
        Err(_) => tracing::debug!("NATS publish timed out (connection down)"),
    }
}

/// Unacknowledged batches kept at most, and their bytes; beyond, the oldest are dropped
/// (their calls are run again by the coordinator, which takes those attempts for lost).
const MAX_KEPT: usize = 4096;
const MAX_KEPT_BYTES: usize = 64 << 20;

/// Removes an error's secrets before it leaves the process (a task may put a URL with
/// credentials in its error).
fn redact_error(e: &mut ErrorInfo) {
    use pinazu_shared::redact::redact;
    if let std::borrow::Cow::Owned(m) = redact(&e.message) {
        e.message = m;
    }
    if let Some(t) = &e.traceback {
        if let std::borrow::Cow::Owned(t) = redact(t) {
            e.traceback = Some(t.into_boxed_str());
        }
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
    let incarnation = fastrand::u64(..);
    // one process per id: a second one would run every attempt sent to the id twice
    let (whois, me) = claim_id(&client, &subjects, &agent_id, incarnation).await?;
    tokio::pin!(shutdown);
    // the coordinator's store must be this agent's too (large payloads go through it):
    // no work is taken before a coordinator has answered that question
    let mut waiting_since: Option<Instant> = None;
    loop {
        if !matches!(
            probe_once(&client, &subjects, &*cfg.store).await,
            Probe::NoCoordinator
        ) {
            break;
        }
        if waiting_since.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
            tracing::info!(agent = %agent_id, "waiting for a coordinator (this agent takes work once one has confirmed it shares its store)");
            waiting_since = Some(Instant::now());
        }
        tokio::select! {
            _ = &mut shutdown => {
                whois.abort();
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    check_store(&client, &subjects, &*cfg.store).await?;
    let tracker = Arc::new(Mutex::new(Tracker::default()));
    let idle = Arc::new(Notify::new());
    // asks the serve loop to check the id now (after a freeze)
    let recheck_id = Arc::new(Notify::new());
    let (tx, mut rx) = mpsc::unbounded_channel::<Report>();
    let sink = Arc::new(NatsReportSink {
        agent_id: agent_id.clone(),
        tx: Mutex::new(Some(tx)),
        tracker: tracker.clone(),
    });

    // reports: one task, so their order is kept; batched under load, numbered, and kept
    // until the coordinator acknowledges them
    let outbox = Arc::new(Mutex::new(Outbox {
        incarnation,
        seq: 0,
        acked: 0,
        kept: VecDeque::new(),
        bytes: 0,
    }));
    let mut reporter = {
        let client = client.clone();
        let subject = subjects.reports_of(&agent_id);
        let (store, threshold) = (cfg.store.clone(), cfg.payload_threshold);
        let (outbox, agent_id) = (outbox.clone(), agent_id.clone());
        let (tracker, idle) = (tracker.clone(), idle.clone());
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
                // large results of a batch are stored side by side
                futures_util::future::join_all(reports.iter_mut().filter_map(|r| match r {
                    Report::Finished(f) => {
                        if let Err(e) = &mut f.outcome {
                            redact_error(e);
                        }
                        Some(store_large_result(&*store, threshold, f))
                    }
                    Report::Started(_) => None,
                }))
                .await;
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
                        if let Ok(mut t) = tracker.lock() {
                            for r in &batch.reports {
                                if let Report::Finished(f) = r {
                                    t.running.remove(&RunningAttempt {
                                        flow_run_id: f.flow_run_id,
                                        call_id: f.call_id,
                                        attempt_id: f.attempt_id,
                                    });
                                }
                            }
                            if t.running.is_empty() {
                                idle.notify_waiters();
                            }
                        }
                        let size = encoded.as_ref().map_or(0, Vec::len);
                        o.keep(batch, size);
                        encoded
                    }
                    Err(_) => break,
                };
                match encoded {
                    // kept in the outbox: sent again later if this is lost
                    Ok(b) => publish_bytes(&client, subject.clone(), Bytes::from(b)).await,
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

    // a process that was frozen (SIGSTOP, a paused VM) finds spawns NATS queued for it
    // meanwhile: the coordinator took it for dead and sent those attempts elsewhere, and
    // another process may hold its id now. They are dropped (until a heartbeat had time
    // to reach the coordinator), and the id is checked again at once.
    let freeze = Arc::new(FreezeWatch::new());
    let ticker = {
        let (freeze, recheck) = (freeze.clone(), recheck_id.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if freeze.beat() {
                    recheck.notify_one();
                }
            }
        })
    };
    let (a, d, s, store) = (
        agent.clone(),
        drops.clone(),
        sink.clone(),
        cfg.store.clone(),
    );
    let (frozen, recheck) = (freeze.clone(), recheck_id.clone());
    let spawn_loop = tokio::spawn(async move {
        while let Some(msg) = spawns.next().await {
            if frozen.dropping() {
                recheck.notify_one();
                d.record(&msg.subject, &"sent while this process was frozen; dropped (the coordinator sends it elsewhere)");
                continue;
            }
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
                        o.ack(ack.incarnation, ack.seq, ack.runs.as_deref());
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

    let hb_subject = subjects.heartbeat_of(&agent_id);
    tracing::info!(agent = %agent_id, slots = cfg.agent.slots, tasks = cfg.agent.registry.task_names().len(), "agent serving");
    publish(
        &client,
        hb_subject.clone(),
        &heartbeat(&cfg, &tracker, false, false),
    )
    .await;
    // why this process cannot serve: (message, whether it must leave at once)
    let (misfit_tx, mut misfit_rx) = mpsc::unbounded_channel::<(String, bool)>();
    // one background check of each kind at a time, and none while NATS is unreachable
    let (id_checking, store_checking) = (
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let mut tick = tokio::time::interval(cfg.heartbeat);
    // the id is checked again now and then: after a partition or a NATS restart two
    // processes may hold it (each started while the other was unreachable); the newer
    // one stops
    let mut id_check =
        tokio::time::interval_at(tokio::time::Instant::now() + ID_CHECK_EVERY, ID_CHECK_EVERY);
    id_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let reports_subject = subjects.reports_of(&agent_id);
    let mut failure: Option<String> = None;
    let mut was_connected = true;
    loop {
        let all = tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => false,
            after_freeze = async {
                tokio::select! {
                    _ = id_check.tick() => false,
                    _ = recheck_id.notified() => true,
                }
            } => {
                if connected(&client) && !id_checking.swap(true, Relaxed) {
                    let (c, subject, me, tx) = (client.clone(), subjects.agent_whois(&agent_id), me.clone(), misfit_tx.clone());
                    let busy = id_checking.clone();
                    tokio::spawn(async move {
                        let asked = tokio::time::timeout(Duration::from_secs(5), holders(&c, &subject, me.incarnation, true)).await;
                        if let Ok(Ok(others)) = asked {
                            // after a freeze this process is the stale one: the id was
                            // given to another while it slept, whichever started first
                            if let Some(other) = others.into_iter().find(|o| after_freeze || o.older_than(&me)) {
                                let why = if after_freeze {
                                    "which took it while this process was frozen"
                                } else {
                                    "which started first (both took it while NATS kept them apart)"
                                };
                                let _ = tx.send((format!(
                                    "agent id {} is also held by {other}, {why}: this process leaves now, so that no attempt runs twice. Give each agent its own --agent-id",
                                    me.agent_id
                                ), true));
                            }
                        }
                        busy.store(false, Relaxed);
                    });
                }
                continue;
            }
            _ = hello_now.notified() => {
                // a coordinator (re)started: is its store ours?
                if connected(&client) && !store_checking.swap(true, Relaxed) {
                    let (c, s, store, tx) = (client.clone(), subjects.clone(), cfg.store.clone(), misfit_tx.clone());
                    let busy = store_checking.clone();
                    tokio::spawn(async move {
                        if let Err(e) = check_store(&c, &s, &*store).await {
                            let _ = tx.send((e, false));
                        }
                        busy.store(false, Relaxed);
                    });
                }
                true
            }
            Some((e, at_once)) = misfit_rx.recv() => {
                tracing::error!(agent = %agent_id, "{e}");
                if at_once {
                    // another process holds the id: every attempt here runs there too.
                    // Leave without a word under the id (a `leaving` heartbeat would
                    // make the coordinator drop the other process's attempts)
                    spawn_loop.abort();
                    cancel_loop.abort();
                    hello_loop.abort();
                    ack_loop.abort();
                    whois.abort();
                    reporter.abort();
                    ticker.abort();
                    agent.stop(None);
                    return Err(e);
                }
                // drained like a stop: what runs here finishes and is reported
                failure = Some(e);
                break;
            }
        };
        // the heartbeat first: after a coordinator restart it must arrive within the
        // resumed runs' hold window, whatever the resend costs
        publish(
            &client,
            hb_subject.clone(),
            &heartbeat(&cfg, &tracker, false, false),
        )
        .await;
        // back from a NATS outage: what was sent meanwhile may be lost; sent again now,
        // before the coordinator misses those attempts in the heartbeats and runs them
        // again
        let now_connected = connected(&client);
        let all = all || (now_connected && !was_connected);
        was_connected = now_connected;
        resend(&client, &reports_subject, &outbox, all).await;
    }

    // drain: take nothing new, let what runs finish, hand over the reports; the drain
    // timeout bounds all of it (NATS may be down: every wait on it is inside)
    tracing::info!(agent = %agent_id, timeout_s = cfg.drain_timeout.as_secs(), "draining: finishing running attempts, taking no new ones");
    let drain = async {
        publish(
            &client,
            hb_subject.clone(),
            &heartbeat(&cfg, &tracker, true, false),
        )
        .await;
        loop {
            let busy = tracker.lock().map(|t| t.running.len()).unwrap_or(0);
            if busy == 0 {
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
        let _ = (&mut reporter).await;
        // the coordinator acknowledges the last results, so none is lost if it
        // restarts right now
        loop {
            let pending = outbox.lock().map(|o| o.kept.len()).unwrap_or(0);
            if pending == 0 {
                break;
            }
            let wait = all_acked.notified();
            tokio::select! {
                _ = wait => {}
                _ = hello_now.notified() => resend(&client, &reports_subject, &outbox, true).await,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {
                    resend(&client, &reports_subject, &outbox, false).await
                }
            }
        }
    };
    let drained = tokio::time::timeout(cfg.drain_timeout, drain).await.is_ok();
    if !drained {
        let running = tracker.lock().map(|t| t.running.len()).unwrap_or(0);
        let pending = outbox.lock().map(|o| o.kept.len()).unwrap_or(0);
        tracing::warn!(
            agent = %agent_id,
            running,
            unacknowledged_batches = pending,
            "drain timeout: leaving now; attempts still running and results the coordinator has not acknowledged are lost to this agent (the coordinator runs those calls again)"
        );
        spawn_loop.abort();
        cancel_loop.abort();
        agent.stop(None);
        sink.close();
        reporter.abort();
    }
    hello_loop.abort();
    ack_loop.abort();
    whois.abort();
    ticker.abort();
    // a last word, if NATS takes it within a second
    let leaving = async {
        publish(&client, hb_subject, &heartbeat(&cfg, &tracker, true, true)).await;
        client.flush().await
    };
    if !matches!(
        tokio::time::timeout(Duration::from_secs(1), leaving).await,
        Ok(Ok(()))
    ) {
        tracing::warn!(agent = %agent_id, "could not say goodbye to the coordinator (NATS unreachable); it notices in a few seconds");
    }
    tracing::info!(agent = %agent_id, dropped = drops.count(), drained, "agent stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Notices that this process did not run for a while (stopped, or a paused machine).
struct FreezeWatch {
    base: Instant,
    /// When the ticker last ran (ms since `base`).
    beat_ms: std::sync::atomic::AtomicU64,
    /// Spawns are dropped until then (ms since `base`).
    drop_until_ms: std::sync::atomic::AtomicU64,
}

/// A gap this long between ticks (every 250 ms) is a freeze.
const FROZEN_AFTER: Duration = Duration::from_secs(2);
/// Spawns are dropped this long after a freeze: a heartbeat reaches the coordinator
/// meanwhile, and what it sends after is meant for this process as it is now.
const DROP_AFTER_FREEZE: Duration = Duration::from_secs(1);

impl FreezeWatch {
    fn new() -> Self {
        FreezeWatch {
            base: Instant::now(),
            beat_ms: std::sync::atomic::AtomicU64::new(0),
            drop_until_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.base.elapsed().as_millis() as u64
    }

    /// Whether the gap since the last beat says this process was frozen; then spawns
    /// are dropped for a while.
    fn frozen_now(&self, now: u64, last: u64) -> bool {
        if now.saturating_sub(last) > FROZEN_AFTER.as_millis() as u64 {
            self.drop_until_ms
                .fetch_max(now + DROP_AFTER_FREEZE.as_millis() as u64, Relaxed);
            tracing::warn!(
                frozen_ms = now.saturating_sub(last),
                "this process did not run for a while (stopped or paused): dropping the attempts sent meanwhile (the coordinator sends them elsewhere) and checking the agent id again"
            );
            return true;
        }
        false
    }

    /// The ticker's beat; true when it found a freeze.
    fn beat(&self) -> bool {
        let now = self.now_ms();
        let last = self.beat_ms.swap(now, Relaxed);
        self.frozen_now(now, last)
    }

    /// Whether a spawn arriving now is to be dropped.
    fn dropping(&self) -> bool {
        let now = self.now_ms();
        // the spawn loop may wake before the ticker: it looks at the gap itself
        let last = self.beat_ms.load(Relaxed);
        if self.frozen_now(now, last) {
            self.beat_ms.store(now, Relaxed);
            return true;
        }
        now < self.drop_until_ms.load(Relaxed)
    }
}

/// How often an agent checks no other process holds its id.
const ID_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Checks this agent reads the coordinator's store: it asks for the coordinator's probe
/// object and reads it. No coordinator yet, or a store that does not answer now: no
/// verdict (the check runs again when a coordinator says hello). A store without the
/// object is another store: an error saying what to set. A probe not written yet, or
/// not found, is asked for again for a few seconds before the verdict.
pub async fn check_store(
    client: &async_nats::Client,
    subjects: &Subjects,
    store: &dyn ObjectStore,
) -> Result<(), String> {
    let mut tries = 0;
    loop {
        tries += 1;
        match probe_once(client, subjects, store).await {
            Probe::Shared | Probe::Unknown | Probe::NoCoordinator => return Ok(()),
            Probe::NotYet if tries >= PROBE_TRIES => return Ok(()),
            Probe::Missing(theirs) if tries >= PROBE_TRIES => {
                return Err(format!(
                    "this agent's object store ({}) is not the coordinator's ({theirs}): arguments and results too large for a NATS message go through the store, and would be lost. Set --store / PINAZU_STORE (s3://bucket/prefix across machines) or PINAZU_CACHE_DIR (one machine) to the coordinator's store",
                    store.describe()
                ))
            }
            Probe::NotYet | Probe::Missing(_) => tokio::time::sleep(Duration::from_secs(1)).await,
        }
    }
}

/// How many times the store probe is asked for before a verdict (a second apart).
const PROBE_TRIES: u32 = 5;

enum Probe {
    /// No coordinator answered.
    NoCoordinator,
    /// The probe was read: the store is shared.
    Shared,
    /// No verdict possible (no coordinator, store unreadable now).
    Unknown,
    /// The coordinator has not written its probe yet.
    NotYet,
    /// The probe is not in this agent's store (the coordinator's store, described).
    Missing(String),
}

async fn probe_once(
    client: &async_nats::Client,
    subjects: &Subjects,
    store: &dyn ObjectStore,
) -> Probe {
    let req = match encode_envelope(&ApiRequest::StoreProbe) {
        Ok(b) => Bytes::from(b),
        Err(_) => return Probe::Unknown,
    };
    let reply = tokio::time::timeout(
        Duration::from_secs(3),
        client.request(subjects.api("store_probe"), req),
    )
    .await;
    let Ok(Ok(msg)) = reply else {
        return Probe::NoCoordinator;
    };
    let Ok(ApiReply::StoreProbe {
        key,
        token,
        store: theirs,
    }) = decode_envelope::<ApiReply>(&msg.payload)
    else {
        return Probe::Unknown;
    };
    let Some(key) = key else {
        return Probe::NotYet;
    };
    match store.get(&key).await {
        Ok(Some(found)) if found.as_ref() == token.as_bytes() => Probe::Shared,
        Ok(_) => Probe::Missing(theirs),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the coordinator's store probe now; not checked");
            Probe::Unknown
        }
    }
}

/// Takes the agent id for this process: refused (an error naming the other process) if a
/// live agent holds it. Asks who holds it, then answers that question itself, then asks
/// again: of two processes started at the same moment, the later one gives way.
async fn claim_id(
    client: &async_nats::Client,
    subjects: &Subjects,
    agent_id: &pinazu_shared::ids::AgentId,
    incarnation: u64,
) -> Result<(tokio::task::JoinHandle<()>, AgentIdentity), String> {
    let subject = subjects.agent_whois(agent_id);
    let me = AgentIdentity {
        agent_id: agent_id.clone(),
        host: std::fs::read_to_string("/etc/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".into()),
        pid: std::process::id(),
        since: pinazu_shared::events::now_timestamp(),
        incarnation,
    };
    let refuse = |other: &AgentIdentity| {
        format!(
            "agent id {agent_id} is already in use by {other}: two agents with one id would both run every attempt sent to it. Give this agent another --agent-id (or leave it unset for <host>-<pid>-<random>), or stop the other one first"
        )
    };
    if let Some(other) = holders(client, &subject, incarnation, false).await?.first() {
        return Err(refuse(other));
    }
    let mut requests = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    let answer = encode_envelope(&me).map_err(|e| e.to_string())?;
    let (c, answer) = (client.clone(), Bytes::from(answer));
    let responder = tokio::spawn(async move {
        while let Some(msg) = requests.next().await {
            if let Some(reply) = msg.reply {
                let _ = c.publish(reply, answer.clone()).await;
            }
        }
    });
    // another process that took the id at the same moment: whichever saw the other
    // gives way (both may: then both stop, and neither runs anything twice)
    if let Some(other) = holders(client, &subject, incarnation, true)
        .await?
        .into_iter()
        .next()
    {
        responder.abort();
        return Err(refuse(&other));
    }
    Ok((responder, me))
}

fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// The other processes answering for an agent id: the first answer only (`all` false:
/// none is the common case, known at once), or every answer within 300 ms.
async fn holders(
    client: &async_nats::Client,
    subject: &str,
    incarnation: u64,
    all: bool,
) -> Result<Vec<AgentIdentity>, String> {
    let decode = |payload: &[u8]| {
        decode_envelope::<AgentIdentity>(payload)
            .ok()
            .filter(|i| i.incarnation != incarnation)
    };
    if !all {
        let reply = tokio::time::timeout(
            Duration::from_secs(2),
            client.request(subject.to_string(), Bytes::new()),
        )
        .await;
        return Ok(match reply {
            Ok(Ok(msg)) => decode(&msg.payload).into_iter().collect(),
            _ => Vec::new(),
        });
    }
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| format!("subscribe: {e}"))?;
    client
        .publish_with_reply(subject.to_string(), inbox, Bytes::new())
        .await
        .map_err(|e| format!("publish: {e}"))?;
    let mut found = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, answers.next()).await {
        found.extend(decode(&msg.payload));
    }
    Ok(found)
}

/// Sends unacknowledged report batches again (all, or those waiting too long).
async fn resend(client: &async_nats::Client, subject: &str, outbox: &Mutex<Outbox>, all: bool) {
    if !connected(client) {
        // sent once the connection is back (the next tick finds them stale)
        return;
    }
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
        publish_bytes(client, subject.to_string(), Bytes::from(b)).await;
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
    // listed as running from now: reading may take seconds (retries), and the
    // coordinator must not take the attempt for lost meanwhile
    if let Ok(mut t) = sink.tracker.lock() {
        t.running.insert(RunningAttempt {
            flow_run_id: task.flow_run_id,
            call_id: task.call_id,
            attempt_id: task.attempt_id,
        });
    }
    let read =
        pinazu_shared::store::get_retrying(store, &key, pinazu_shared::store::PUT_RETRY_DELAYS)
            .await;
    let error = match read {
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
    match pinazu_shared::store::put_retrying(
        store,
        &key,
        bytes,
        pinazu_shared::store::PUT_RETRY_DELAYS,
    )
    .await
    {
        Ok(()) => f.result_ref = Some(key),
        Err(e) => {
            f.outcome = Err(ErrorInfo::new(
                FailureKind::Error,
                format!("the result of {size} bytes is too large for a NATS message and could not be stored: {e}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(run: FlowRunId) -> Report {
        Report::Started(AttemptStarted {
            flow_run_id: run,
            call_id: pinazu_shared::ids::CallId { key: 1, seq: 0 },
            attempt_id: pinazu_shared::ids::AttemptId::new(1, 1),
            agent_id: pinazu_shared::ids::AgentId("a".into()),
        })
    }

    fn outbox_of(incarnation: u64, batches: &[(u64, Vec<FlowRunId>)]) -> Outbox {
        let mut o = Outbox {
            incarnation,
            seq: 0,
            acked: 0,
            kept: VecDeque::new(),
            bytes: 0,
        };
        for (seq, runs) in batches {
            o.seq = *seq;
            o.keep(
                ReportBatch {
                    agent_id: pinazu_shared::ids::AgentId("a".into()),
                    incarnation,
                    seq: *seq,
                    acked: 0,
                    reports: runs.iter().map(|r| started(*r)).collect(),
                },
                10,
            );
        }
        o
    }

    fn outbox_with(incarnation: u64, seqs: &[u64]) -> Outbox {
        let run = FlowRunId::new();
        let batches: Vec<(u64, Vec<FlowRunId>)> = seqs.iter().map(|s| (*s, vec![run])).collect();
        outbox_of(incarnation, &batches)
    }

    #[test]
    fn with_several_coordinators_a_batch_leaves_once_each_of_its_runs_is_acknowledged() {
        let (a, b) = (FlowRunId::new(), FlowRunId::new());
        let mut o = outbox_of(7, &[(1, vec![a, b]), (2, vec![b])]);
        // the coordinator of run a acknowledges up to 2: batch 1 still holds b's report
        o.ack(7, 2, Some(&[a]));
        assert_eq!(o.kept.len(), 2);
        assert_eq!(o.acked, 0);
        // what is sent again is b's report only
        let again = o.resend(true);
        let first: ReportBatch = decode_envelope(&again[0]).unwrap();
        assert_eq!(first.reports.len(), 1);
        assert_eq!(report_run(&first.reports[0]), b);
        // b's coordinator acknowledges 1 (2 is still on its way): 1 leaves
        o.ack(7, 1, Some(&[b]));
        assert_eq!(o.kept.len(), 1);
        assert_eq!(o.acked, 1);
        o.ack(7, 2, Some(&[b]));
        assert!(o.kept.is_empty());
        assert_eq!((o.acked, o.bytes), (2, 0));
    }

    #[test]
    fn an_acknowledgement_for_another_incarnation_keeps_the_batches() {
        let mut o = outbox_with(7, &[1, 2, 3]);
        o.ack(8, 3, None);
        assert_eq!(
            o.kept.len(),
            3,
            "an ack for the id's previous process drops nothing"
        );
        o.ack(7, 2, None);
        assert_eq!(o.kept.len(), 1);
        o.ack(0, 3, None);
        assert!(o.kept.is_empty(), "an ack without incarnation is taken");
        assert_eq!(o.bytes, 0);
    }

    #[test]
    fn an_overflowing_outbox_drops_the_oldest_and_counts_them_acknowledged() {
        let seqs: Vec<u64> = (1..=MAX_KEPT as u64 + 2).collect();
        let o = outbox_with(7, &seqs);
        assert_eq!(o.kept.len(), MAX_KEPT);
        assert_eq!(o.acked, 2, "the coordinator is not left waiting for a gap");
        assert_eq!(o.kept.front().map(|k| k.batch.seq), Some(3));
        assert_eq!(o.bytes, MAX_KEPT * 10);
    }
}
