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

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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

/// Who a run's events belong to (the header) and the trace they are part of
/// (`metadata.trace_id`); set by whoever launches the run.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventContext {
    /// The header of every event of the run.
    pub header: EventHeader,
    /// The W3C trace id (32 hex digits) of every event of the run, if any.
    pub trace_id: Option<String>,
    /// The whole W3C `traceparent` the run's spans are children of (the launcher's
    /// `TRACEPARENT`, or the `run` client's own span with the `otel` feature).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

impl EventContext {
    /// From the launcher's environment: `PINAZU_USER_ID`, `PINAZU_THREAD_ID`,
    /// `PINAZU_CONNECTION_ID` (UUIDs; unset or empty = nil / null) and the trace id of a
    /// W3C `TRACEPARENT` (an invalid one is ignored with a warning, as the W3C
    /// recommendation says).
    pub fn from_env() -> Result<Self, crate::error::ConfigError> {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let uuid =
            |name: &str| -> Result<Option<Uuid>, crate::error::ConfigError> {
                match var(name) {
                    None => Ok(None),
                    Some(v) => Uuid::parse_str(&v).map(Some).map_err(|e| {
                        crate::error::ConfigError::Invalid {
                            name: name.to_string(),
                            value: v,
                            reason: format!("expected a UUID: {e}"),
                        }
                    }),
                }
            };
        let traceparent = var("TRACEPARENT");
        let trace_id = traceparent.as_ref().and_then(|tp| {
            let id = trace_id_of(tp);
            if id.is_none() {
                tracing::warn!(traceparent = %tp, "TRACEPARENT is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>); ignored");
            }
            id
        });
        let traceparent = traceparent.filter(|_| trace_id.is_some());
        Ok(EventContext {
            header: EventHeader {
                user_id: uuid("PINAZU_USER_ID")?.unwrap_or_else(Uuid::nil),
                thread_id: uuid("PINAZU_THREAD_ID")?,
                connection_id: uuid("PINAZU_CONNECTION_ID")?,
            },
            trace_id,
            traceparent,
        })
    }
}

/// The trace id of a W3C `traceparent` (`00-<trace id>-<parent id>-<flags>`), if valid.
pub fn trace_id_of(traceparent: &str) -> Option<String> {
    let parts: Vec<&str> = traceparent.trim().split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    match parts.as_slice() {
        [version, trace, parent, flags, ..]
            if hex(version, 2)
                && *version != "ff"
                && (parts.len() == 4 || *version != "00")
                && hex(trace, 32)
                && nonzero(trace)
                && hex(parent, 16)
                && nonzero(parent)
                && hex(flags, 2) =>
        {
            Some(trace.to_string())
        }
        _ => None,
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
        Self::traced(header, None, message, timestamp)
    }

    /// Like [`Event::at`], with the trace id of the run's trace.
    pub fn traced(
        header: EventHeader,
        trace_id: Option<String>,
        message: M,
        timestamp: String,
    ) -> Self {
        Event {
            header,
            message,
            metadata: EventMetadata {
                trace_id,
                timestamp,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_ids_come_from_valid_traceparents_only() {
        let id = "4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            trace_id_of(&format!("00-{id}-00f067aa0ba902b7-01")).as_deref(),
            Some(id)
        );
        for bad in [
            "",
            "garbage",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(trace_id_of(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_are_utc_micros_with_z() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_700_000_000_123_456);
        assert_eq!(timestamp(t), "2023-11-14T22:13:20.123456Z");
    }
}
