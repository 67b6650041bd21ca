//! The seam between the coordinator and its agents. Embedded mode implements these with
//! in-process actor messages; distributed mode with NATS subjects. Nothing else crosses
//! the boundary.

use crate::ids::{AgentId, AttemptId, FlowRunId};
use crate::wire::{AttemptFinished, AttemptStarted, Report, SpawnTask};
use crate::BoxFuture;

/// How the coordinator reaches an agent.
pub trait AgentLink: Send + Sync + 'static {
    /// Hands a batch of attempts to `agent`. The scheduler never sends more than the
    /// agent's free slots plus the few it keeps waiting in the agent's queue.
    fn spawn(&self, agent: &AgentId, tasks: Vec<SpawnTask>);
    /// Asks `agent` to stop these attempts.
    fn cancel(&self, agent: &AgentId, attempts: Vec<(FlowRunId, AttemptId)>);
    /// Asks `agent` to hand back up to `max` attempts of the coordinator processes
    /// `epochs` (the asker's, then earlier ones whose attempts it re-attached)
    /// that wait in its queue, unstarted; resolves to those it handed back (none if it
    /// did not answer in time: attempts it gave up all the same are then missing from
    /// its heartbeats, so the scheduler takes them for lost and they run again).
    fn steal(
        &self,
        agent: &AgentId,
        epochs: Vec<u32>,
        max: u32,
    ) -> BoxFuture<'static, Vec<SpawnTask>> {
        let _ = (agent, epochs, max);
        Box::pin(async { Vec::new() })
    }
}

/// How an agent reports back to the coordinator.
pub trait ResultSink: Send + Sync + 'static {
    /// An attempt started executing.
    fn started(&self, started: AttemptStarted);
    /// An attempt ended (success, failure, timeout, panic or cancellation).
    fn finished(&self, finished: AttemptFinished);
    /// It gathers reports into batches itself (a distributed agent's reporter): the
    /// supervisor hands it each report at once instead of through a batching task of
    /// its own (one hop fewer on a lone attempt's way back).
    fn batches(&self) -> bool {
        false
    }
    /// Whether attempts waiting in the agent's queue may start now. `false` when the
    /// agent process was just frozen (stopped, paused) long enough that the coordinator
    /// may have sent them elsewhere: the supervisor then drops its queue
    /// (`unstarted`) instead of starting them.
    fn may_start_waiting(&self) -> bool {
        true
    }
    /// Attempts the supervisor dropped from its queue, never started: they leave the
    /// agent's list of what it holds (so the coordinator takes them for lost).
    fn unstarted(&self, tasks: &[SpawnTask]) {
        let _ = tasks;
    }
    /// The agent's task supervisor failed and was started again: the attempts it held
    /// are gone without a report (the coordinator takes them for lost once the agent no
    /// longer lists them).
    fn forget_all(&self) {}
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
