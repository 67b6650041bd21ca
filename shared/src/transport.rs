//! The seam between the coordinator and its agents. Embedded mode implements these with
//! in-process actor messages; distributed mode with NATS subjects. Nothing else crosses
//! the boundary.

use crate::ids::{AgentId, AttemptId, FlowRunId};
use crate::wire::{AttemptFinished, AttemptStarted, Report, SpawnTask};

/// How the coordinator reaches an agent.
pub trait AgentLink: Send + Sync + 'static {
    /// Hands a batch of attempts to `agent`. The scheduler never sends more than the
    /// agent's free slots.
    fn spawn(&self, agent: &AgentId, tasks: Vec<SpawnTask>);
    /// Asks `agent` to stop these attempts.
    fn cancel(&self, agent: &AgentId, attempts: Vec<(FlowRunId, AttemptId)>);
}

/// How an agent reports back to the coordinator.
pub trait ResultSink: Send + Sync + 'static {
    /// An attempt started executing.
    fn started(&self, started: AttemptStarted);
    /// An attempt ended (success, failure, timeout, panic or cancellation).
    fn finished(&self, finished: AttemptFinished);
    /// Several reports at once, in order (the coordinator routes them as one message per
    /// run: fewer mailbox operations than one per report).
    fn report(&self, reports: Vec<Report>) {
        for r in reports {
            match r {
                Report::Started(s) => self.started(s),
                Report::Finished(f) => self.finished(f),
            }
        }
    }
}
