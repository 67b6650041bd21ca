//! The status publisher: turns status transitions into Pinazu Core JSON events and hands
//! them to an [`EventSink`] (a log in embedded mode, NATS in distributed mode, a
//! collector in tests), in the order the runners sent them.

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde_json::Value;
use std::sync::{Arc, Mutex};

use pinazu_shared::events::{
    timestamp, Event, EventHeader, FlowStatusMessage, TaskStatusMessage, FLOW_STATUS_SUBJECT,
    TASK_STATUS_SUBJECT,
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
    sink: Arc<dyn EventSink>,
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
        Ok(StatusState { header, sink })
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
                    let m = TaskStatusMessage {
                        flow_run_id: t.flow_run_id,
                        task_name: t.task.to_string(),
                        status: t.status,
                        result_cache_key: t.result_cache_key,
                        error_message: t.error_message,
                        traceback: t.traceback,
                        event_timestamp: at.clone(),
                    };
                    state.publish(TASK_STATUS_SUBJECT, m, at)
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
