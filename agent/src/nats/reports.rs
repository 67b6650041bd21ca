//! The attempts' reports: gathered into batches, large results through the store,
//! secrets taken out of errors; and large arguments fetched before an attempt runs.

use bytes::Bytes;
use ractor::ActorRef;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::store::ObjectStore;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{
    payload_key, AttemptFinished, AttemptStarted, Report, RunningAttempt, SpawnTask,
};

use crate::agent::AgentMsg;

use super::*;

/// Reports attempts through one batching publisher task and tracks what runs.
pub(super) struct NatsReportSink {
    pub(super) agent_id: pinazu_shared::ids::AgentId,
    pub(super) tx: Mutex<Option<mpsc::UnboundedSender<Report>>>,
    pub(super) tracker: Arc<Mutex<Tracker>>,
    pub(super) metrics: Option<Arc<crate::metrics::AgentMetrics>>,
    /// Whether this process was just frozen.
    pub(super) freeze: Arc<super::identity::FreezeWatch>,
    pub(super) idle: Arc<tokio::sync::Notify>,
}

impl ResultSink for NatsReportSink {
    fn batches(&self) -> bool {
        true
    }

    fn may_start_waiting(&self) -> bool {
        !self.freeze.holding()
    }

    fn unstarted(&self, tasks: &[SpawnTask]) {
        super::forget_given(&self.tracker, &self.idle, tasks);
    }

    fn forget_all(&self) {
        if let Ok(mut t) = self.tracker.lock() {
            t.clear();
        }
    }

    fn started(&self, s: AttemptStarted) {
        if let Ok(mut t) = self.tracker.lock() {
            t.start(RunningAttempt::new(s.flow_run_id, s.call_id, s.attempt_id));
        }
        self.send(Report::Started(s));
    }

    fn finished(&self, f: AttemptFinished) {
        if let Some(m) = &self.metrics {
            m.attempt_ended(&f.outcome, f.elapsed_us);
        }
        // still listed as running until its report is in the outbox (a large result may
        // take seconds to store): the coordinator must not take it for lost meanwhile
        self.send(Report::Finished(f));
    }
}

impl NatsReportSink {
    pub(super) fn send(&self, report: Report) {
        if let Some(tx) = self.tx.lock().ok().as_ref().and_then(|t| t.as_ref()) {
            let _ = tx.send(report);
        }
    }

    /// No more reports: the reporter ends once it has published what it holds.
    pub(super) fn close(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
    }
}

/// Removes an error's secrets before it leaves the process (a task may put a URL with
/// credentials in its error).
pub(super) fn redact_error(e: &mut ErrorInfo) {
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

/// Fetches arguments that travelled by reference, then hands the attempt to the agent;
/// arguments that cannot be read fail the attempt (retried per the task's policy).
pub(super) async fn fetch_args(
    store: &dyn ObjectStore,
    agent: &ActorRef<AgentMsg>,
    sink: &NatsReportSink,
    mut task: SpawnTask,
) {
    let key = task.args_ref.take().unwrap_or_default();
    // listed from now: reading may take seconds (retries), and the coordinator must
    // not take the attempt for lost meanwhile
    if let Ok(mut t) = sink.tracker.lock() {
        t.wait(RunningAttempt::new(
            task.flow_run_id,
            task.call_id,
            task.attempt_id,
        ));
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
        logs: None,
    });
}

/// About how many bytes a report takes in a batch (a result above `threshold` travels by
/// reference, so it takes little).
pub(super) fn report_size(r: &Report, threshold: usize) -> usize {
    match r {
        Report::Started(_) => 128,
        Report::Finished(f) => {
            160 + f.logs.as_ref().map_or(0, |l| l.len())
                + match &f.outcome {
                    Ok(b) if b.len() > threshold => 128,
                    Ok(b) => b.len(),
                    Err(e) => e.size(),
                }
        }
    }
}

/// Moves a result above the threshold into the store; a result that cannot be stored
/// becomes a failed attempt (retried per the task's policy), never a hang.
pub(super) async fn store_large_result(
    store: &dyn ObjectStore,
    threshold: usize,
    f: &mut AttemptFinished,
) {
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
