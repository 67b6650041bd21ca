//! The status publisher: turns status transitions into Pinazu Core JSON events and hands
//! them to an [`EventSink`] (a log in embedded mode, NATS in distributed mode, a
//! collector in tests), in the order the runners sent them.

use bytes::Bytes;
use pinazu_shared::redact::redact;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use std::sync::{Arc, Mutex};

use pinazu_shared::events::{
    timestamp, Event, EventContext, FlowStatusMessage, FLOW_STATUS_SUBJECT, TASK_STATUS_SUBJECT,
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

/// JSON logs (`LOG_FORMAT=json`): status events are written as JSON objects in the log
/// line, not as a string holding JSON (so `jq .event.message.flow_run_id` works).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tells the log sink the logs are JSON lines (the CLI's logging set-up does).
pub fn set_json_logs(json: bool) {
    JSON_LOGS.store(json, std::sync::atomic::Ordering::Relaxed);
}

impl EventSink for LogSink {
    fn enabled(&self) -> bool {
        tracing::enabled!(target: "pinazu::events", tracing::Level::DEBUG)
    }

    fn publish(&self, subject: &'static str, payload: Bytes) {
        if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            // the same fields as the other JSON log lines, the event as an object
            eprintln!(
                "{{\"timestamp\":\"{}\",\"level\":\"DEBUG\",\"target\":\"pinazu::events\",\"subject\":\"{subject}\",\"event\":{}}}",
                pinazu_shared::events::now_timestamp(),
                String::from_utf8_lossy(&payload)
            );
        } else {
            tracing::debug!(target: "pinazu::events", subject, event = %String::from_utf8_lossy(&payload));
        }
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
    /// A flow transition of the run stamped by the header.
    Flow(Arc<RunHeader>, FlowStatusMessage),
    /// Task transitions of one run, in order (formatted here, off the runner's path).
    Tasks(Arc<RunHeader>, Vec<TaskTransition>),
    /// Reply once everything before it is delivered.
    Flush(RpcReplyPort<()>),
}

/// The status publisher actor.
pub struct StatusPublisher;

/// What stamps every event of one run: its header and trace id, the header rendered
/// once as JSON.
#[derive(Debug)]
pub struct RunHeader {
    /// Header and trace id.
    pub context: EventContext,
    header_json: String,
    trace_json: String,
}

impl RunHeader {
    /// Renders the header once.
    pub fn new(context: EventContext) -> Self {
        let header_json = serde_json::to_string(&context.header).unwrap_or_else(|_| {
            "{\"user_id\":\"00000000-0000-0000-0000-000000000000\",\"thread_id\":null,\"connection_id\":null}".into()
        });
        let trace_json = serde_json::to_string(&context.trace_id).unwrap_or_else(|_| "null".into());
        RunHeader {
            context,
            header_json,
            trace_json,
        }
    }
}

/// A task's status transition, as a runner records it.
#[derive(Debug)]
pub struct TaskTransition {
    /// The run.
    pub flow_run_id: pinazu_shared::ids::FlowRunId,
    /// The task.
    pub task: &'static str,
    /// Its new status.
    pub status: pinazu_shared::events::FlowStatus,
    /// The call's MD5 cache key (on SUCCESS).
    pub result_cache_key: Option<String>,
    /// One-line error (FAILED; PENDING after a failed attempt that will be retried).
    pub error_message: Option<String>,
    /// The error chain.
    pub traceback: Option<String>,
    /// When.
    pub at: std::time::SystemTime,
}

/// Its state.
pub struct StatusState {
    sink: Arc<dyn EventSink>,
}

/// Writes a task status event in the exact shape `serde_json` gives `Event<TaskStatusMessage>`
/// (a test compares them byte for byte), with the keys as literals and the header
/// pre-rendered: the generic path escaped every key of every event, the largest item of
/// our own in the coordinator's profile.
fn write_task_event(
    out: &mut Vec<u8>,
    header: &RunHeader,
    t: &TaskTransition,
    at: &str,
) -> Result<(), serde_json::Error> {
    fn opt(out: &mut Vec<u8>, v: Option<&str>) -> Result<(), serde_json::Error> {
        match v {
            Some(s) => serde_json::to_writer(&mut *out, s),
            None => {
                out.extend_from_slice(b"null");
                Ok(())
            }
        }
    }
    out.extend_from_slice(b"{\"header\":");
    out.extend_from_slice(header.header_json.as_bytes());
    out.extend_from_slice(b",\"message\":{\"flow_run_id\":");
    serde_json::to_writer(&mut *out, &t.flow_run_id)?;
    out.extend_from_slice(b",\"task_name\":");
    serde_json::to_writer(&mut *out, t.task)?;
    out.extend_from_slice(b",\"status\":\"");
    out.extend_from_slice(t.status.as_str().as_bytes());
    out.extend_from_slice(b"\",\"result_cache_key\":");
    opt(out, t.result_cache_key.as_deref())?;
    // errors can quote what they failed on (a URL with its password...): redacted
    out.extend_from_slice(b",\"error_message\":");
    opt(out, t.error_message.as_deref().map(redact).as_deref())?;
    out.extend_from_slice(b",\"traceback\":");
    opt(out, t.traceback.as_deref().map(redact).as_deref())?;
    // RFC 3339 timestamps need no escaping
    out.extend_from_slice(b",\"event_timestamp\":\"");
    out.extend_from_slice(at.as_bytes());
    out.extend_from_slice(b"\"},\"metadata\":{\"trace_id\":");
    out.extend_from_slice(header.trace_json.as_bytes());
    out.extend_from_slice(b",\"timestamp\":\"");
    out.extend_from_slice(at.as_bytes());
    out.extend_from_slice(b"\"}}");
    Ok(())
}

/// A flow status event as Pinazu Core reads it (JSON), stamped with the run's header.
pub fn flow_event_json(context: &EventContext, mut m: FlowStatusMessage) -> Option<Bytes> {
    for text in [&mut m.error_message, &mut m.traceback]
        .into_iter()
        .flatten()
    {
        if let std::borrow::Cow::Owned(clean) = redact(text) {
            *text = clean;
        }
    }
    let at = m.event_timestamp.clone();
    let event = Event::traced(context.header.clone(), context.trace_id.clone(), m, at);
    let mut json = Vec::with_capacity(512);
    match serde_json::to_writer(&mut json, &event) {
        Ok(()) => Some(Bytes::from(json)),
        Err(e) => {
            tracing::error!(error = %e, "status event could not be encoded");
            None
        }
    }
}

impl Actor for StatusPublisher {
    type Msg = StatusMsg;
    type State = StatusState;
    type Arguments = Arc<dyn EventSink>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        sink: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(StatusState { sink })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StatusMsg::Flow(header, m) => {
                if let Some(json) = flow_event_json(&header.context, m) {
                    state.sink.publish(FLOW_STATUS_SUBJECT, json);
                }
            }
            StatusMsg::Tasks(header, transitions) => {
                for t in transitions {
                    let at = timestamp(t.at);
                    // events are ~400 bytes: one allocation instead of a series of
                    // reallocations
                    let mut json = Vec::with_capacity(512);
                    match write_task_event(&mut json, &header, &t, &at) {
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
    use pinazu_shared::events::{EventHeader, FlowStatus, TaskStatusMessage};
    use pinazu_shared::ids::FlowRunId;

    #[test]
    fn the_fast_task_event_writer_matches_serde_byte_for_byte() {
        let contexts = [
            EventContext::default(),
            EventContext {
                header: EventHeader {
                    user_id: uuid::Uuid::from_u128(7),
                    thread_id: Some(uuid::Uuid::from_u128(8)),
                    connection_id: None,
                },
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
                traceparent: None,
            },
        ];
        let texts = [
            None,
            Some("plain".to_string()),
            Some("quote \" backslash \\ newline \n tab \t ctrl \u{1} unicode é ✓".to_string()),
        ];
        for context in &contexts {
            let header = RunHeader::new(context.clone());
            for status in [
                FlowStatus::Pending,
                FlowStatus::Running,
                FlowStatus::Success,
                FlowStatus::Failed,
            ] {
                for (i, text) in texts.iter().enumerate() {
                    let key = (i > 0).then(|| "0123456789abcdef0123456789abcdef".to_string());
                    let expected_key = key.clone();
                    let t = TaskTransition {
                        flow_run_id: FlowRunId::new(),
                        task: "sq\"uare",
                        status,
                        result_cache_key: key,
                        error_message: text.clone(),
                        traceback: text.clone(),
                        at: std::time::SystemTime::now(),
                    };
                    let at = timestamp(t.at);
                    let mut fast = Vec::new();
                    write_task_event(&mut fast, &header, &t, &at).unwrap();
                    let generic = serde_json::to_vec(&Event::traced(
                        context.header.clone(),
                        context.trace_id.clone(),
                        TaskStatusMessage {
                            flow_run_id: t.flow_run_id,
                            task_name: t.task.to_string(),
                            status: t.status,
                            result_cache_key: expected_key,
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
