//! Where a task attempt runs: set by the agent around every attempt, read by task code
//! with `pinazu_flows::task_context()`.

use std::sync::Arc;

use crate::ids::{AgentId, AttemptId, CallId, FlowRunId};

/// The attempt a task body is running as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskContext {
    /// The flow run the call belongs to.
    pub flow_run_id: FlowRunId,
    /// The call (deterministic within the run).
    pub call_id: CallId,
    /// This attempt.
    pub attempt_id: AttemptId,
    /// The attempt's number, from 1.
    pub attempt: u32,
    /// The task's name.
    pub task: Arc<str>,
    /// The agent running it.
    pub agent_id: AgentId,
}

tokio::task_local! {
    /// Set by the agent around each attempt's future.
    pub static TASK_CONTEXT: TaskContext;
}

/// The attempt the calling task body runs as; `None` outside a task (or in a future the
/// task spawned onto another tokio task).
pub fn task_context() -> Option<TaskContext> {
    TASK_CONTEXT.try_with(Clone::clone).ok()
}
