//! Task and flow definitions, registered by `#[task]` / `#[flow]` through `inventory`,
//! and the helpers the generated code calls.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::sync::OnceLock;

use crate::error::{ErrorInfo, FailureKind, ParamError};
use crate::options::TaskOptions;
use crate::BoxFuture;

/// Where a definition was written (for duplicate-name errors).
#[derive(Clone, Copy, Debug)]
pub struct Source {
    /// `module_path!()` of the definition.
    pub module: &'static str,
    /// `file!()`.
    pub file: &'static str,
    /// `line!()`.
    pub line: u32,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.file, self.line, self.module)
    }
}

/// Runs a task attempt: MessagePack argument tuple in, MessagePack result out.
pub type TaskInvoke = fn(Bytes) -> BoxFuture<'static, Result<Bytes, ErrorInfo>>;

/// Starts a flow body from named JSON parameters.
pub type FlowInvoke =
    fn(Map<String, Value>) -> Result<BoxFuture<'static, Result<Value, ErrorInfo>>, ParamError>;

/// A task, as `#[task]` defines it.
#[derive(Debug)]
pub struct TaskDef {
    /// Unique task name (the function name unless `name = "..."`).
    pub name: &'static str,
    /// Code version; part of the `inputs` cache key.
    pub version: &'static str,
    /// Retry, timeout and cache options.
    pub options: TaskOptions,
    /// Runs one attempt.
    pub invoke: TaskInvoke,
    /// Where it was defined.
    pub source: Source,
}

/// A flow, as `#[flow]` defines it.
#[derive(Debug)]
pub struct FlowDef {
    /// Unique flow name (the function name unless `name = "..."`).
    pub name: &'static str,
    /// Parameter names, in order.
    pub params: &'static [&'static str],
    /// Starts the flow body.
    pub invoke: FlowInvoke,
    /// Where it was defined.
    pub source: Source,
}

/// The `inventory` item for a task.
pub struct TaskEntry(pub &'static TaskDef);
/// The `inventory` item for a flow.
pub struct FlowEntry(pub &'static FlowDef);

inventory::collect!(TaskEntry);
inventory::collect!(FlowEntry);

/// Two definitions share a name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", .duplicates.join("; "))]
pub struct RegistryError {
    /// One line per clash, naming both definitions.
    pub duplicates: Vec<String>,
}

/// Every task and flow of this program, by name.
#[derive(Debug, Default)]
pub struct Registry {
    tasks: HashMap<&'static str, &'static TaskDef>,
    flows: HashMap<&'static str, &'static FlowDef>,
}

impl Registry {
    /// The registry of this program's `#[task]`s and `#[flow]`s, built once. Two
    /// definitions with one name is an error naming both.
    pub fn global() -> Result<&'static Registry, RegistryError> {
        static GLOBAL: OnceLock<Result<Registry, RegistryError>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                Registry::build(
                    inventory::iter::<TaskEntry>.into_iter().map(|e| e.0),
                    inventory::iter::<FlowEntry>.into_iter().map(|e| e.0),
                )
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Builds a registry from definitions; duplicates are reported all at once.
    pub fn build(
        tasks: impl IntoIterator<Item = &'static TaskDef>,
        flows: impl IntoIterator<Item = &'static FlowDef>,
    ) -> Result<Registry, RegistryError> {
        let mut reg = Registry::default();
        let mut duplicates = Vec::new();
        let mut task_list: Vec<_> = tasks.into_iter().collect();
        task_list.sort_by_key(|t| (t.source.file, t.source.line));
        for t in task_list {
            if let Some(prev) = reg.tasks.insert(t.name, t) {
                duplicates.push(format!(
                    "task `{}` is defined twice: at {} and at {}; give one of them another name with #[task(name = \"...\")]",
                    t.name, prev.source, t.source
                ));
            }
        }
        let mut flow_list: Vec<_> = flows.into_iter().collect();
        flow_list.sort_by_key(|f| (f.source.file, f.source.line));
        for f in flow_list {
            if let Some(prev) = reg.flows.insert(f.name, f) {
                duplicates.push(format!(
                    "flow `{}` is defined twice: at {} and at {}; give one of them another name with #[flow(name = \"...\")]",
                    f.name, prev.source, f.source
                ));
            }
        }
        if duplicates.is_empty() {
            Ok(reg)
        } else {
            Err(RegistryError { duplicates })
        }
    }

    /// A task by name.
    pub fn task(&self, name: &str) -> Option<&'static TaskDef> {
        self.tasks.get(name).copied()
    }

    /// A flow by name.
    pub fn flow(&self, name: &str) -> Option<&'static FlowDef> {
        self.flows.get(name).copied()
    }

    /// Task names, sorted.
    pub fn task_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.tasks.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Flow names, sorted.
    pub fn flow_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.flows.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

// ---- helpers called by the code `#[task]` and `#[flow]` generate ----

/// Decodes a task's MessagePack argument tuple.
pub fn decode_args<A: DeserializeOwned>(task: &str, args: &[u8]) -> Result<A, ErrorInfo> {
    rmp_serde::from_slice(args).map_err(|e| {
        ErrorInfo::new(
            FailureKind::BadArguments,
            format!("task `{task}`: arguments do not match its parameter types: {e}"),
        )
    })
}

/// Encodes a task body's outcome: `Ok` to MessagePack, `Err` to an [`ErrorInfo`].
pub fn encode_result<T: Serialize, E: fmt::Display + fmt::Debug>(
    task: &str,
    result: Result<T, E>,
) -> Result<Bytes, ErrorInfo> {
    match result {
        Ok(v) => rmp_serde::to_vec_named(&v).map(Bytes::from).map_err(|e| {
            ErrorInfo::new(
                FailureKind::BadResult,
                format!("task `{task}`: result could not be encoded: {e}"),
            )
        }),
        Err(e) => Err(ErrorInfo::from_user_error(FailureKind::Error, &e)),
    }
}

/// Encodes a flow body's outcome as JSON.
pub fn encode_flow_result<T: Serialize, E: fmt::Display + fmt::Debug>(
    flow: &str,
    result: Result<T, E>,
) -> Result<Value, ErrorInfo> {
    match result {
        Ok(v) => serde_json::to_value(&v).map_err(|e| {
            ErrorInfo::new(
                FailureKind::BadResult,
                format!("flow `{flow}`: result could not be encoded as JSON: {e}"),
            )
        }),
        Err(e) => Err(ErrorInfo::from_user_error(FailureKind::Error, &e)),
    }
}

/// Named flow parameters being taken apart by the generated code.
pub struct Params {
    flow: &'static str,
    known: &'static [&'static str],
    map: Map<String, Value>,
}

impl Params {
    /// Checks that every given parameter is one of the flow's.
    pub fn new(
        flow: &'static str,
        known: &'static [&'static str],
        map: Map<String, Value>,
    ) -> Result<Params, ParamError> {
        if let Some(unknown) = map.keys().find(|k| !known.contains(&k.as_str())) {
            return Err(ParamError::Unknown {
                flow: flow.to_string(),
                param: unknown.clone(),
                known: Self::list(known),
            });
        }
        Ok(Params { flow, known, map })
    }

    fn list(known: &[&str]) -> String {
        if known.is_empty() {
            "(none)".to_string()
        } else {
            known.join(", ")
        }
    }

    /// Takes one parameter: given -> decoded; absent -> `default`, else `null` (so an
    /// `Option` parameter is `None`), else a missing-parameter error.
    pub fn take<T: DeserializeOwned>(
        &mut self,
        name: &str,
        default: Option<fn() -> T>,
    ) -> Result<T, ParamError> {
        let invalid = |reason: String| ParamError::Invalid {
            flow: self.flow.to_string(),
            param: name.to_string(),
            reason,
        };
        match self.map.remove(name) {
            Some(v) => serde_json::from_value(v).map_err(|e| invalid(e.to_string())),
            None => match default {
                Some(d) => Ok(d()),
                None => serde_json::from_value(Value::Null).map_err(|_| ParamError::Missing {
                    flow: self.flow.to_string(),
                    param: name.to_string(),
                    known: Self::list(self.known),
                }),
            },
        }
    }
}

/// Builds the named-parameter map of a direct typed flow call.
pub fn params_to_map(names: &[&str], values: Vec<Value>) -> Map<String, Value> {
    names.iter().map(|n| n.to_string()).zip(values).collect()
}

/// Encodes one typed parameter value of a direct flow call as JSON.
pub fn param_value<T: Serialize>(flow: &str, name: &str, v: &T) -> Result<Value, ParamError> {
    serde_json::to_value(v).map_err(|e| ParamError::Invalid {
        flow: flow.to_string(),
        param: name.to_string(),
        reason: format!("could not be encoded as JSON: {e}"),
    })
}
