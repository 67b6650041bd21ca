//! Status events in the exact Pinazu Core JSON shape.

use serde::{Deserialize, Serialize};
use std::time::SystemTime;
use uuid::Uuid;

use crate::ids::FlowRunId;

/// Subject of flow status events (fixed by Pinazu Core).
pub const FLOW_STATUS_SUBJECT: &str = "v1.svc.worker.flow.status";
/// Subject of task status events (fixed by Pinazu Core).
pub const TASK_STATUS_SUBJECT: &str = "v1.svc.worker.task.status";

/// Status of a flow run or task call. Pinazu Core stores task statuses PENDING, RUNNING,
/// SUCCESS and FAILED only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum FlowStatus {
    /// Accepted, not yet started.
    Scheduled,
    /// Waiting to run.
    Pending,
    /// Running.
    Running,
    /// Finished successfully.
    Success,
    /// Finished with an error.
    Failed,
}

impl FlowStatus {
    /// The upper-case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowStatus::Scheduled => "SCHEDULED",
            FlowStatus::Pending => "PENDING",
            FlowStatus::Running => "RUNNING",
            FlowStatus::Success => "SUCCESS",
            FlowStatus::Failed => "FAILED",
        }
    }

    /// SUCCESS or FAILED.
    pub fn is_final(self) -> bool {
        matches!(self, FlowStatus::Success | FlowStatus::Failed)
    }
}

impl std::fmt::Display for FlowStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// RFC 3339 UTC with microseconds and `Z`, as Pinazu Core expects.
pub fn timestamp(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

/// The current time as an event timestamp.
pub fn now_timestamp() -> String {
    timestamp(SystemTime::now())
}

/// Event header: who the run belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventHeader {
    /// The user; the nil UUID when unknown.
    pub user_id: Uuid,
    /// The conversation thread, if any.
    pub thread_id: Option<Uuid>,
    /// The client connection, if any.
    pub connection_id: Option<Uuid>,
}

impl Default for EventHeader {
    fn default() -> Self {
        EventHeader {
            user_id: Uuid::nil(),
            thread_id: None,
            connection_id: None,
        }
    }
}

/// Event metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventMetadata {
    /// Trace id, if tracing is wired through.
    pub trace_id: Option<String>,
    /// When the event was built.
    pub timestamp: String,
}

/// A flow status message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowStatusMessage {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// Its status.
    pub status: FlowStatus,
    /// One-line error, on FAILED.
    pub error_message: Option<String>,
    /// The error chain, on FAILED.
    pub traceback: Option<String>,
    /// When the transition happened.
    pub event_timestamp: String,
}

/// A task status message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskStatusMessage {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The task.
    pub task_name: String,
    /// Its status.
    pub status: FlowStatus,
    /// The cache object key, when the result came from or went to the cache.
    pub result_cache_key: Option<String>,
    /// One-line error (FAILED; or PENDING after a failed attempt that will be retried).
    pub error_message: Option<String>,
    /// The error chain, or the attempt and call ids where useful.
    pub traceback: Option<String>,
    /// When the transition happened.
    pub event_timestamp: String,
}

/// The Pinazu Core event envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event<M> {
    /// Who.
    pub header: EventHeader,
    /// What.
    pub message: M,
    /// Trace and time.
    pub metadata: EventMetadata,
}

/// A flow status event.
pub type FlowStatusEvent = Event<FlowStatusMessage>;
/// A task status event.
pub type TaskStatusEvent = Event<TaskStatusMessage>;

impl<M> Event<M> {
    /// Wraps a message with a header and fresh metadata.
    pub fn new(header: EventHeader, message: M) -> Self {
        Self::at(header, message, now_timestamp())
    }

    /// Wraps a message with a header and metadata stamped `timestamp` (the transition's
    /// own time: formatting one timestamp per event instead of two is measurable at
    /// tens of thousands of events per second).
    pub fn at(header: EventHeader, message: M, timestamp: String) -> Self {
        Event {
            header,
            message,
            metadata: EventMetadata {
                trace_id: None,
                timestamp,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_micros_with_z() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123456Z");
    }
}
