//! Identifiers of runs, calls, attempts and agents.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use uuid::Uuid;

use crate::error::ConfigError;

/// The id of one flow run: a UUID, from `FLOW_RUN_ID` or freshly generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct FlowRunId(pub Uuid);

impl FlowRunId {
    /// A new random run id.
    pub fn new() -> Self {
        FlowRunId(Uuid::new_v4())
    }

    /// The run id an idempotency key names when no run id is given: a UUID (version 3,
    /// MD5-based) of the key, the same for every coordinator and client, so the key keeps
    /// its meaning across restarts.
    pub fn of_key(key: &str) -> Self {
        let mut bytes = md5::compute(format!("pinazu-flows idempotency key\0{key}")).0;
        bytes[6] = (bytes[6] & 0x0f) | 0x30; // version 3
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
        FlowRunId(Uuid::from_bytes(bytes))
    }

    /// The run id of the child flow a run starts with this call: a UUID (version 3) of
    /// the parent's id and the call's, the same whenever the parent (resumed, or run
    /// again) makes that call.
    pub fn child_of(parent: FlowRunId, call: CallId) -> Self {
        let mut bytes = md5::compute(format!("pinazu-flows child flow\0{parent}\0{call}")).0;
        bytes[6] = (bytes[6] & 0x0f) | 0x30; // version 3
        bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
        FlowRunId(Uuid::from_bytes(bytes))
    }

    /// Parses a run id, with an error that names where the value came from.
    pub fn parse(value: &str, source: &str) -> Result<Self, ConfigError> {
        Uuid::from_str(value.trim())
            .map(FlowRunId)
            .map_err(|e| ConfigError::InvalidFlowRunId {
                source_name: source.to_string(),
                value: value.to_string(),
                reason: e.to_string(),
            })
    }

    /// `FLOW_RUN_ID` from the environment when set (an invalid value is an error), else new.
    pub fn from_env() -> Result<Self, ConfigError> {
        match std::env::var("FLOW_RUN_ID") {
            Ok(v) if !v.trim().is_empty() => Self::parse(&v, "FLOW_RUN_ID"),
            _ => Ok(Self::new()),
        }
    }
}

impl Default for FlowRunId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for FlowRunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The deterministic id of one task call within a run.
///
/// `key` hashes the task name and the encoded arguments; `seq` numbers the calls that share
/// that key, in the order they were made. The id therefore does not depend on how
/// concurrent branches of a flow interleave, which is what lets a replay find each call's
/// journaled outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CallId {
    /// xxh3 of the task name and the MessagePack-encoded arguments.
    pub key: u64,
    /// Occurrence number of this (task, arguments) pair within the run, from 0.
    pub seq: u32,
}

impl CallId {
    /// The content key of a call of `task` with `args` (MessagePack bytes).
    pub fn content_key(task: &str, args: &[u8]) -> u64 {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        h.update(task.as_bytes());
        h.update(&[0]);
        h.update(args);
        h.digest()
    }
}

impl fmt::Display for CallId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}-{}", self.key, self.seq)
    }
}

/// The id of one attempt of a call. A result carrying an attempt id that is not the
/// call's current attempt comes from a superseded attempt and is ignored. The high 32
/// bits are the epoch of the coordinator process that issued it (random per process),
/// the low 32 bits a counter: a restarted coordinator tells its own attempts from those
/// its predecessor dispatched, which it may re-attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AttemptId(pub u64);

impl AttemptId {
    /// The epoch of the coordinator process that issued it.
    pub fn epoch(self) -> u32 {
        (self.0 >> 32) as u32
    }

    /// Attempt number `n` of the coordinator process with epoch `epoch`.
    pub fn new(epoch: u32, n: u32) -> AttemptId {
        AttemptId((u64::from(epoch) << 32) | u64::from(n))
    }
}

impl fmt::Display for AttemptId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// The id of an agent (a process, or an in-process agent in embedded mode).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AgentId(pub String);

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_key_is_stable_and_content_based() {
        let a = CallId::content_key("square", &[0x91, 0x03]);
        assert_eq!(a, CallId::content_key("square", &[0x91, 0x03]));
        assert_ne!(a, CallId::content_key("square", &[0x91, 0x04]));
        assert_ne!(a, CallId::content_key("cube", &[0x91, 0x03]));
    }

    #[test]
    fn invalid_flow_run_id_names_source_and_value() {
        let err = FlowRunId::parse("not-a-uuid", "FLOW_RUN_ID").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("FLOW_RUN_ID"), "{msg}");
        assert!(msg.contains("not-a-uuid"), "{msg}");
    }
}
