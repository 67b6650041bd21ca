//! The agent's side of the NATS transport: takes attempts from its spawn subject, reports
//! back in batches, heartbeats with the list of what it runs, and drains on shutdown.

use bytes::Bytes;
use futures_util::StreamExt;
use ractor::ActorRef;
use std::collections::HashSet;
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
    payload_key, AttemptFinished, AttemptStarted, Heartbeat, Report, SpawnTask,
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
    running: HashSet<(FlowRunId, AttemptId)>,
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
            t.running.insert((s.flow_run_id, s.attempt_id));
        }
        self.send(Report::Started(s));
    }

    fn finished(&self, f: AttemptFinished) {
        if let Ok(mut t) = self.tracker.lock() {
            let key = (f.flow_run_id, f.attempt_id);
            t.running.remove(&key);
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

    // reports: one task, so their order is kept; batched under load
    let reporter = {
        let client = client.clone();
        let subject = subjects.reports();
        let (store, threshold) = (cfg.store.clone(), cfg.payload_threshold);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(r) => batch.push(r),
                        Err(_) => break,
                    }
                }
                for report in &mut batch {
                    if let Report::Finished(f) = report {
                        store_large_result(&*store, threshold, f).await;
                    }
                }
                publish(&client, subject.clone(), &batch).await;
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

    let beat_now = Arc::new(Notify::new());
    let b = beat_now.clone();
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
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tick.tick() => {}
            _ = beat_now.notified() => {}
        }
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
    hello_loop.abort();
    agent.stop(None);
    sink.close();
    if tokio::time::timeout(Duration::from_secs(5), reporter)
        .await
        .is_err()
    {
        tracing::warn!(agent = %agent_id, "reports still pending after 5 s; leaving anyway");
    }
    publish(&client, hb_subject, &heartbeat(&cfg, &tracker, true, true)).await;
    if let Err(e) = client.flush().await {
        tracing::warn!(error = %e, "could not flush NATS before exit");
    }
    tracing::info!(agent = %agent_id, dropped = drops.count(), "agent stopped");
    Ok(())
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
    });
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
