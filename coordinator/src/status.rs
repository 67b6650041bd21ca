//! The status publisher: turns status transitions into Pinazu Core JSON events and hands
//! them to an [`EventSink`] (a log in embedded mode, NATS in distributed mode, a
//! collector in tests), in the order the runners sent them.

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use std::sync::{Arc, Mutex};

use pinazu_shared::events::{
    timestamp, Event, EventHeader, FlowStatusMessage, FLOW_STATUS_SUBJECT, TASK_STATUS_SUBJECT,
};
use pinazu_shared::BoxFuture;

/// Where status events go.
pub trait EventSink: Send + Sync + 'static {
    /// Whether anyone listens; when not, runners skip building events.
    fn enabled(&self) -> bool {
        true
    }
    /// Publishes one JSON event on `subject`.
    fn publish(&self, subject: &'static str, payload: Bytes);
    /// Resolves when everything published so far has been delivered.
    fn flush(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// Embedded mode: events are logged at debug level (target `pinazu::events`).
#[derive(Debug, Default)]
pub struct LogSink;

impl EventSink for LogSink {
    fn enabled(&self) -> bool {
        tracing::enabled!(target: "pinazu::events", tracing::Level::DEBUG)
    }

    fn publish(&self, subject: &'static str, payload: Bytes) {
        tracing::debug!(target: "pinazu::events", subject, event = %String::from_utf8_lossy(&payload));
    }
}

/// Keeps every event in memory, as published; for tests and embedding applications.
#[derive(Debug, Default)]
pub struct CollectingSink {
    events: Mutex<Vec<(String, String)>>,
}

impl CollectingSink {
    /// A new empty collector.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Every event so far: (subject, parsed JSON).
    pub fn events(&self) -> Vec<(String, Value)> {
        self.raw_events()
            .into_iter()
            .map(|(s, text)| (s, serde_json::from_str(&text).unwrap_or(Value::Null)))
            .collect()
    }

    /// Every event so far: (subject, the JSON text exactly as published).
    pub fn raw_events(&self) -> Vec<(String, String)> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }

    /// Forgets the events collected so far.
    pub fn clear(&self) {
        if let Ok(mut e) = self.events.lock() {
            e.clear();
        }
    }
}

impl EventSink for CollectingSink {
    fn publish(&self, subject: &'static str, payload: Bytes) {
        let text = String::from_utf8_lossy(&payload).into_owned();
        if let Ok(mut e) = self.events.lock() {
            e.push((subject.to_string(), text));
        }
    }
}

/// Messages to the status publisher.
pub enum StatusMsg {
    /// A flow transition.
    Flow(FlowStatusMessage),
    /// Task transitions, in order (formatted here, off the runner's path).
    Tasks(Vec<TaskTransition>),
    /// Reply once everything before it is delivered.
    Flush(RpcReplyPort<()>),
}

/// The status publisher actor.
pub struct StatusPublisher;

/// A task's status transition, as a runner records it.
#[derive(Debug)]
pub struct TaskTransition {
    /// The run.
    pub flow_run_id: pinazu_shared::ids::FlowRunId,
    /// The task.
    pub task: &'static str,
    /// Its new status.
    pub status: pinazu_shared::events::FlowStatus,
    /// The cache object key, when the result came from or went to the cache.
    pub result_cache_key: Option<String>,
    /// One-line error or note.
    pub error_message: Option<String>,
    /// The error chain.
    pub traceback: Option<String>,
    /// When.
    pub at: std::time::SystemTime,
}

/// Its state.
pub struct StatusState {
    header: EventHeader,
    /// The header as JSON, rendered once.
    header_json: String,
    sink: Arc<dyn EventSink>,
}

/// Writes a task status event in the exact shape `serde_json` gives `Event<TaskStatusMessage>`
/// (a test compares them byte for byte), with the keys as literals and the header
/// pre-rendered: the generic path escaped every key of every event, the largest item of
/// our own in the coordinator's profile.
fn write_task_event(
    out: &mut Vec<u8>,
    header_json: &str,
    t: &TaskTransition,
    at: &str,
) -> Result<(), serde_json::Error> {
    fn opt(out: &mut Vec<u8>, v: &Option<String>) -> Result<(), serde_json::Error> {
        match v {
            Some(s) => serde_json::to_writer(&mut *out, s),
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
    out.extend_from_slice(b"{\"header\":");
    out.extend_from_slice(header_json.as_bytes());
    out.extend_from_slice(b",\"message\":{\"flow_run_id\":");
    serde_json::to_writer(&mut *out, &t.flow_run_id)?;
    out.extend_from_slice(b",\"task_name\":");
    serde_json::to_writer(&mut *out, t.task)?;
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(t.status.as_str().as_bytes());
    out.extend_from_slice(b"\",\"result_cache_key\":");
    opt(out, &t.result_cache_key)?;
    out.extend_from_slice(b",\"error_message\":");
    opt(out, &t.error_message)?;
    out.extend_from_slice(b",\"traceback\":");
    opt(out, &t.traceback)?;
    // RFC 3339 timestamps need no escaping
    out.extend_from_slice(b",\"event_timestamp\":\"");
    out.extend_from_slice(at.as_bytes());
    out.extend_from_slice(b"\"},\"metadata\":{\"trace_id\":null,\"timestamp\":\"");
    out.extend_from_slice(at.as_bytes());
    out.extend_from_slice(b"\"}}");
    Ok(())
}

impl StatusState {
    fn publish<M: serde::Serialize>(&self, subject: &'static str, message: M, at: String) {
        let event = Event::at(self.header.clone(), message, at);
        // events are ~400 bytes: one allocation instead of a series of reallocations
        let mut json = Vec::with_capacity(512);
        match serde_json::to_writer(&mut json, &event) {
            Ok(()) => self.sink.publish(subject, Bytes::from(json)),
            Err(e) => tracing::error!(error = %e, "status event could not be encoded"),
        }
    }
}

impl Actor for StatusPublisher {
    type Msg = StatusMsg;
    type State = StatusState;
    type Arguments = (EventHeader, Arc<dyn EventSink>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (header, sink): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let header_json = serde_json::to_string(&header)?;
        Ok(StatusState {
            header,
            header_json,
            sink,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StatusMsg::Flow(m) => {
                let at = m.event_timestamp.clone();
                state.publish(FLOW_STATUS_SUBJECT, m, at)
            }
            StatusMsg::Tasks(transitions) => {
                for t in transitions {
                    let at = timestamp(t.at);
                    let mut json = Vec::with_capacity(512);
                    match write_task_event(&mut json, &state.header_json, &t, &at) {
                        Ok(()) => state.sink.publish(TASK_STATUS_SUBJECT, Bytes::from(json)),
                        Err(e) => tracing::error!(error = %e, "status event could not be encoded"),
                    }
                }
            }
            StatusMsg::Flush(reply) => {
                state.sink.flush().await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinazu_shared::events::{FlowStatus, TaskStatusMessage};
    use pinazu_shared::ids::FlowRunId;

    #[test]
    fn the_fast_task_event_writer_matches_serde_byte_for_byte() {
        let headers = [
            EventHeader::default(),
            EventHeader {
                user_id: uuid::Uuid::from_u128(7),
                thread_id: Some(uuid::Uuid::from_u128(8)),
                connection_id: None,
            },
        ];
        let texts = [
            None,
            Some("plain".to_string()),
            Some("quote \" backslash \\ newline \n tab \t ctrl \u{1} unicode é ✓".to_string()),
        ];
        for header in &headers {
            let header_json = serde_json::to_string(header).unwrap();
            for status in [
                FlowStatus::Pending,
                FlowStatus::Running,
                FlowStatus::Success,
                FlowStatus::Failed,
            ] {
                for text in &texts {
                    let t = TaskTransition {
                        flow_run_id: FlowRunId::new(),
                        task: "sq\"uare",
                        status,
                        result_cache_key: text.clone(),
                        error_message: text.clone(),
                        traceback: text.clone(),
                        at: std::time::SystemTime::now(),
                    };
                    let at = timestamp(t.at);
                    let mut fast = Vec::new();
                    write_task_event(&mut fast, &header_json, &t, &at).unwrap();
                    let generic = serde_json::to_vec(&Event::at(
                        header.clone(),
                        TaskStatusMessage {
                            flow_run_id: t.flow_run_id,
                            task_name: t.task.to_string(),
                            status: t.status,
                            result_cache_key: t.result_cache_key.clone(),
                            error_message: t.error_message.clone(),
                            traceback: t.traceback.clone(),
                            event_timestamp: at.clone(),
                        },
                        at.clone(),
                    ))
                    .unwrap();
                    assert_eq!(
                        String::from_utf8(fast).unwrap(),
                        String::from_utf8(generic).unwrap()
                    );
                }
            }
        }
    }
}
