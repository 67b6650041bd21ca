//! Errors at the public boundaries, each with a message a user can act on.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Why an attempt failed, as reported by the agent that ran it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The task returned `Err`.
    Error,
    /// The task panicked.
    Panic,
    /// The attempt ran over its timeout and was stopped.
    Timeout,
    /// The arguments could not be decoded into the task's parameter types.
    BadArguments,
    /// The result could not be encoded.
    BadResult,
    /// The agent does not know the task.
    UnknownTask,
    /// The attempt was cancelled.
    Cancelled,
    /// The actor running the attempt failed (a bug, not a task error).
    Crashed,
    /// No live agent can run the task, and the schedule timeout passed.
    NoAgent,
    /// The task uses a named limit no coordinator defines.
    Limit,
}

impl FailureKind {
    /// Whether a retry can help. Decoding errors and unknown tasks fail the same way again.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            FailureKind::Error | FailureKind::Panic | FailureKind::Timeout | FailureKind::Crashed
        )
    }
}

/// A failed attempt: the kind, the message and the full error chain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// What went wrong.
    pub kind: FailureKind,
    /// One line, suitable for `error_message`.
    pub message: String,
    /// The error chain (Debug of the error; for `anyhow` the "Caused by" list).
    /// (`Box<str>`: an error travels in every failed attempt's report; kept small.)
    pub traceback: Option<Box<str>>,
    /// The task's error value itself, when its type is serde-serialisable: the flow
    /// gets it back typed with [`TaskError::downcast`]. (Boxed: rare, and an error
    /// travels inside every attempt report, which stays small.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Box<ErrorValueData>>,
}

/// A task's error value, kept typed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorValueData {
    /// The Rust type of the value (`std::any::type_name`).
    pub type_name: String,
    /// The value, MessagePack.
    pub bytes: bytes::Bytes,
}

impl ErrorInfo {
    /// A failure with a message and no chain.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        ErrorInfo {
            kind,
            message: message.into(),
            traceback: None,
            value: None,
        }
    }

    /// From a caught panic's payload (`catch_unwind`).
    pub fn from_panic(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-string payload".into());
        ErrorInfo::new(FailureKind::Panic, message)
    }

    /// From a user error: the alternate `Display` for the message (the whole chain on one
    /// line for `anyhow`: "calling the broken service: service unavailable"), `Debug`
    /// for the chain when it adds something. Both are cut to a bound (an error travels
    /// in a report message, and huge ones would not fit): the message at 8 KiB, the
    /// chain at 32 KiB.
    pub fn from_user_error<E: fmt::Display + fmt::Debug + ?Sized>(
        kind: FailureKind,
        e: &E,
    ) -> Self {
        let message = format!("{e:#}");
        let debug = format!("{e:?}");
        ErrorInfo {
            kind,
            traceback: (debug != message).then(|| cut(debug, MAX_TRACEBACK).into_boxed_str()),
            message: cut(message, MAX_MESSAGE),
            value: None,
        }
    }

    /// Keeps the task's error value (its type name and MessagePack encoding), so the
    /// flow can get it back typed; a value larger than 32 KiB is not kept (the message
    /// and chain still are).
    pub fn with_payload(mut self, payload: Option<(&'static str, bytes::Bytes)>) -> Self {
        if let Some((ty, bytes)) = payload.filter(|(_, b)| b.len() <= MAX_PAYLOAD) {
            self.value = Some(Box::new(ErrorValueData {
                type_name: ty.to_string(),
                bytes,
            }));
        }
        self
    }

    /// About how many bytes this error takes in a message.
    pub fn size(&self) -> usize {
        self.message.len()
            + self.traceback.as_ref().map_or(0, |t| t.len())
            + self
                .value
                .as_ref()
                .map_or(0, |v| v.type_name.len() + v.bytes.len())
    }

    /// The task's error value as `E`, if the task's error type was `E` and serde could
    /// keep it.
    pub fn downcast<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        let value = self.value.as_ref()?;
        if value.type_name != std::any::type_name::<E>() {
            return None;
        }
        rmp_serde::from_slice(&value.bytes).ok()
    }
}

/// Bounds of an error's parts (see [`ErrorInfo::from_user_error`]).
const MAX_MESSAGE: usize = 8 * 1024;
const MAX_TRACEBACK: usize = 32 * 1024;
const MAX_PAYLOAD: usize = 32 * 1024;

/// `text` cut to at most `max` bytes (on a character boundary), marked when cut.
fn cut(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let dropped = text.len() - end;
    text.truncate(end);
    text.push_str(&format!(" … ({dropped} more bytes cut)"));
    text
}

impl fmt::Display for ErrorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            FailureKind::Error => f.write_str(&self.message),
            FailureKind::Panic => write!(f, "panicked: {}", self.message),
            FailureKind::Timeout => write!(f, "timed out: {}", self.message),
            FailureKind::BadArguments => write!(f, "bad arguments: {}", self.message),
            FailureKind::BadResult => write!(f, "bad result: {}", self.message),
            FailureKind::UnknownTask => write!(f, "unknown task: {}", self.message),
            FailureKind::Cancelled => write!(f, "cancelled: {}", self.message),
            FailureKind::Crashed => write!(f, "crashed: {}", self.message),
            FailureKind::NoAgent => write!(f, "no agent: {}", self.message),
            FailureKind::Limit => write!(f, "limit: {}", self.message),
        }
    }
}

/// What a task call returns to the flow code when it does not succeed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum TaskError {
    /// The task was called outside a flow.
    #[error("task `{task}` can only be called within a flow (call it from a #[flow] function)")]
    OutsideFlow {
        /// The task's name.
        task: String,
    },
    /// Every attempt failed.
    #[error("task `{task}` failed after {attempts} attempt(s): {last_error}")]
    Failed {
        /// The task's name.
        task: String,
        /// How many attempts ran.
        attempts: u32,
        /// The last attempt's error.
        last_error: ErrorInfo,
    },
    /// The arguments could not be encoded.
    #[error("task `{task}`: arguments could not be encoded: {reason}")]
    InvalidArguments {
        /// The task's name.
        task: String,
        /// The encoder's message.
        reason: String,
    },
    /// The result could not be decoded into the type the caller expects.
    #[error("task `{task}`: result could not be decoded: {reason}")]
    InvalidResult {
        /// The task's name.
        task: String,
        /// The decoder's message.
        reason: String,
    },
    /// The run ended or its runner stopped before the call was answered.
    #[error("task `{task}`: the flow run is no longer accepting calls: {reason}")]
    RunClosed {
        /// The task's name.
        task: String,
        /// Why.
        reason: String,
    },
}

impl TaskError {
    /// The task's own error value, typed, when the task's error type is `E` and
    /// serde-serialisable (`#[derive(Serialize, Deserialize)]`); `None` otherwise (then
    /// the message and chain are in [`TaskError::Failed`]'s `last_error`).
    ///
    /// ```
    /// # use pinazu_shared::error::TaskError;
    /// #[derive(Debug, serde::Deserialize)]
    /// struct ParseError { line: u32 }
    /// fn line_of(e: &TaskError) -> Option<u32> {
    ///     e.downcast::<ParseError>().map(|p| p.line)
    /// }
    /// ```
    pub fn downcast<E: serde::de::DeserializeOwned>(&self) -> Option<E> {
        match self {
            TaskError::Failed { last_error, .. } => last_error.downcast(),
            _ => None,
        }
    }

    /// The task's name.
    pub fn task(&self) -> &str {
        match self {
            TaskError::OutsideFlow { task }
            | TaskError::Failed { task, .. }
            | TaskError::InvalidArguments { task, .. }
            | TaskError::InvalidResult { task, .. }
            | TaskError::RunClosed { task, .. } => task,
        }
    }
}

/// Errors of flow parameters, before a run starts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParamError {
    /// A required parameter was not given.
    #[error("flow `{flow}`: missing parameter `{param}` (pass --{param}=VALUE or --input '{{\"{param}\": ...}}'); parameters: {known}")]
    Missing {
        /// The flow.
        flow: String,
        /// The parameter.
        param: String,
        /// All parameters of the flow.
        known: String,
    },
    /// A parameter the flow does not have.
    #[error("flow `{flow}`: unknown parameter `{param}`; parameters: {known}")]
    Unknown {
        /// The flow.
        flow: String,
        /// The parameter.
        param: String,
        /// All parameters of the flow.
        known: String,
    },
    /// A parameter of the wrong type.
    #[error("flow `{flow}`: parameter `{param}`: {reason}")]
    Invalid {
        /// The flow.
        flow: String,
        /// The parameter.
        param: String,
        /// The decoder's message.
        reason: String,
    },
    /// `--input` was not a JSON object.
    #[error("--input must be a JSON object such as '{{\"n\": 10}}': {reason}")]
    BadInput {
        /// Why.
        reason: String,
    },
}

/// Configuration errors, reported at start-up.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `FLOW_RUN_ID` (or `--flow-run-id`) is not a UUID.
    #[error("invalid flow run id {value:?} from {source_name}: {reason} (expected a UUID such as 0b8f4a5e-7c1d-4b6e-9a51-3f1e2d4c5b6a, or leave it unset to generate one)")]
    InvalidFlowRunId {
        /// Where the value came from.
        source_name: String,
        /// The value.
        value: String,
        /// The parser's message.
        reason: String,
    },
    /// The object store cannot be used.
    #[error("object store {store}: {reason}")]
    Store {
        /// Which store (`s3://bucket/prefix`, `dir:/path`).
        store: String,
        /// What is wrong, and what to check.
        reason: String,
    },
    /// Any other invalid setting.
    #[error("invalid setting {name}={value:?}: {reason}")]
    Invalid {
        /// The setting.
        name: String,
        /// The value.
        value: String,
        /// What is expected.
        reason: String,
    },
}

/// Errors of the wire codec.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes are not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message is of a protocol version this build does not speak.
    #[error("unsupported protocol version {got} (this build speaks {expected})")]
    Version {
        /// The version in the envelope.
        got: u16,
        /// Ours.
        expected: u16,
    },
    /// A value could not be encoded.
    #[error("could not encode: {0}")]
    Encode(String),
}

/// Errors of an object store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The key is not acceptable to the store.
    #[error("invalid object key {0:?}")]
    InvalidKey(String),
    /// An I/O or service error.
    #[error("object store {op} {key:?}: {reason}")]
    Io {
        /// The operation.
        op: &'static str,
        /// The key.
        key: String,
        /// The underlying error.
        reason: String,
    },
}
