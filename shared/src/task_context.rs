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

/// The most lines of one attempt's log kept (the last ones).
pub const LOG_LINES_MAX: usize = 200;
/// The most bytes of one attempt's log kept (the last ones).
pub const LOG_BYTES_MAX: usize = 64 * 1024;

/// The log lines one attempt emitted (its `tracing` events), the last
/// [`LOG_LINES_MAX`] lines or [`LOG_BYTES_MAX`] bytes of them.
#[derive(Debug, Default)]
pub struct AttemptLog {
    lines: std::collections::VecDeque<String>,
    bytes: usize,
    dropped: u64,
}

impl AttemptLog {
    /// Keeps a line, dropping the oldest beyond the bounds.
    pub fn push(&mut self, mut line: String) {
        if line.len() >= LOG_BYTES_MAX {
            let mut end = LOG_BYTES_MAX - 64;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        self.bytes += line.len() + 1;
        self.lines.push_back(line);
        while self.lines.len() > LOG_LINES_MAX || self.bytes > LOG_BYTES_MAX {
            match self.lines.pop_front() {
                Some(old) => {
                    self.bytes -= old.len() + 1;
                    self.dropped += 1;
                }
                None => break,
            }
        }
    }

    /// The lines, one per line, after a "truncated" mark when earlier ones were
    /// dropped; `None` when there were none.
    pub fn into_text(self) -> Option<Box<str>> {
        if self.lines.is_empty() && self.dropped == 0 {
            return None;
        }
        let mut out = String::with_capacity(self.bytes + 64);
        if self.dropped > 0 {
            out.push_str(&format!(
                "[truncated: {} earlier line(s) dropped; the last {} kept]\n",
                self.dropped,
                self.lines.len()
            ));
        }
        for l in self.lines {
            out.push_str(&l);
            out.push('\n');
        }
        Some(out.into_boxed_str())
    }
}

tokio::task_local! {
    /// Set by the agent around each attempt's future: the attempt's own log lines (a
    /// `tracing` layer writes here, see `pinazu_flows::logging`).
    pub static ATTEMPT_LOG: std::cell::RefCell<AttemptLog>;
}

/// Where a flow body's own log lines go (distributed mode: the run's log subject,
/// which `run` prints).
#[derive(Clone)]
pub struct FlowLog(pub Arc<dyn Fn(String) + Send + Sync>);

tokio::task_local! {
    /// Set by the coordinator around a flow body, when its lines are published.
    pub static FLOW_LOG: FlowLog;
}

/// Keeps a log line for the attempt the calling code runs in, or sends it where the
/// flow body's lines go; nothing outside both. `line` is made only when it goes
/// somewhere.
pub fn capture_log(line: impl FnOnce() -> String) {
    let mut line = Some(line);
    let in_attempt = ATTEMPT_LOG
        .try_with(|log| {
            if let (Ok(mut log), Some(make)) = (log.try_borrow_mut(), line.take()) {
                log.push(make());
            }
        })
        .is_ok();
    if !in_attempt {
        let _ = FLOW_LOG.try_with(|sink| {
            if let Some(make) = line.take() {
                (sink.0)(make());
            }
        });
    }
}
