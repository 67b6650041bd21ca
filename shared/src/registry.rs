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
    /// The package that defines it (`CARGO_PKG_NAME`): the app's name.
    pub package: &'static str,
    /// That package's version (`CARGO_PKG_VERSION`): the app's version.
    pub version: &'static str,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{} ({})", self.file, self.line, self.module)
    }
}

/// Runs a task attempt: MessagePack argument tuple in (and whether to compute the call's
/// MD5 cache key), MessagePack result out.
pub type TaskInvoke = fn(Bytes, bool) -> BoxFuture<'static, Invoked>;

/// What an attempt's body gave.
#[derive(Debug)]
pub struct Invoked {
    /// MessagePack result, or the error.
    pub outcome: Result<Bytes, ErrorInfo>,
    /// The call's MD5 cache key, when asked for (and the arguments are JSON-able).
    pub cache_key: Option<Box<str>>,
}

/// Starts a flow body from named JSON parameters.
pub type FlowInvoke = fn(Map<String, Value>) -> Result<FlowStart, ParamError>;

/// Reads one parameter typed on a command line (`--name=text`) as the parameter's type,
/// giving its JSON; `None` when the flow has no parameter of that name.
pub type FlowParseText = fn(&str, &str) -> Option<Result<Value, ParamError>>;

/// Whether two sets of parameters are the same run's: decoded into the parameters'
/// types and compared with `PartialEq` where the type has it (a `HashSet` in any
/// order), else as JSON.
pub type FlowSameParams = fn(&Map<String, Value>, &Map<String, Value>) -> bool;

/// A flow body ready to run, and the parameters it runs with.
pub struct FlowStart {
    /// Every parameter as the flow took it (typed, then encoded as JSON again; defaults
    /// filled in): two starts with the same `params` are the same run.
    pub params: Map<String, Value>,
    /// The body.
    pub body: BoxFuture<'static, Result<Value, ErrorInfo>>,
}

impl std::fmt::Debug for FlowStart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowStart")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// One parameter of a flow, for `--help` and `--list`.
#[derive(Clone, Copy, Debug)]
pub struct ParamDef {
    /// Its name (`--name=VALUE`).
    pub name: &'static str,
    /// Its Rust type, as written.
    pub ty: &'static str,
    /// Its default, as written (`#[default(..)]`), if any.
    pub default: Option<&'static str>,
}

impl ParamDef {
    /// `--name=TYPE` (with ` [default: ..]` or ` [optional]`), for usage texts.
    pub fn usage(&self) -> String {
        let extra = match self.default {
            Some(d) => format!(" [default: {d}]"),
            None if self.ty.starts_with("Option") => " [optional]".to_string(),
            None => String::new(),
        };
        // `--slow-ms` and `--slow_ms` both work; the dashed one is how flags look
        format!(
            "--{}=<{}>{extra}",
            self.name.replace('_', "-"),
            self.ty.replace(' ', "")
        )
    }
}

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
    /// Whether a result kept elsewhere (cache entry, journal, results passed in) still
    /// decodes into the task's return type: one that does not is a miss, not a failure.
    pub check: TaskCheck,
    /// Where it was defined.
    pub source: Source,
}

/// A task result kept outside the attempt that made it, to check.
#[derive(Clone, Copy, Debug)]
pub enum KeptResult<'a> {
    /// MessagePack (the journal).
    Msgpack(&'a [u8]),
    /// JSON (a cache entry, a result passed in).
    Json(&'a Value),
}

/// Checks a kept result against a task's return type.
pub type TaskCheck = fn(KeptResult<'_>) -> Result<(), String>;

/// What `#[task]` generates as [`TaskDef::check`]: decodes into `T`, keeps nothing.
pub fn check_result<T: DeserializeOwned>(kept: KeptResult<'_>) -> Result<(), String> {
    match kept {
        KeptResult::Msgpack(b) => rmp_serde::from_slice::<T>(b)
            .map(|_| ())
            .map_err(|e| e.to_string()),
        KeptResult::Json(v) => T::deserialize(v).map(|_| ()).map_err(|e| e.to_string()),
    }
}

/// A flow, as `#[flow]` defines it.
#[derive(Debug)]
pub struct FlowDef {
    /// Unique flow name (the function name unless `name = "..."`).
    pub name: &'static str,
    /// Parameters, in order.
    pub params: &'static [ParamDef],
    /// The first line of its doc comment.
    pub doc: &'static str,
    /// Starts the flow body.
    pub invoke: FlowInvoke,
    /// Reads a parameter given as command-line text.
    pub parse_text: FlowParseText,
    /// Compares two sets of parameters.
    pub same_params: FlowSameParams,
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

    /// Every label (`k=v`) some task requires, sorted: what in-process agents advertise
    /// unless told otherwise, so every task can run embedded.
    pub fn required_labels(&self) -> Vec<(String, String)> {
        let mut labels: Vec<(String, String)> = self
            .tasks
            .values()
            .flat_map(|t| t.options.labels.iter())
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        labels.sort();
        labels.dedup();
        labels
    }

    /// The app these definitions belong to: the package (name and version) that defines
    /// its flows (the first by flow name), if any.
    pub fn app(&self) -> Option<(&'static str, &'static str)> {
        let first = self.flow_names().into_iter().next()?;
        let f = self.flows.get(first)?;
        Some((f.source.package, f.source.version))
    }

    /// Flow names, sorted.
    pub fn flow_names(&self) -> Vec<&'static str> {
        let mut v: Vec<_> = self.flows.keys().copied().collect();
        v.sort_unstable();
        v
    }
}

// ---- helpers called by the code `#[task]` and `#[flow]` generate ----

/// The original library's MD5 cache key of a call, from its typed arguments (`None`
/// when they have no JSON form, e.g. a map with non-string keys).
pub fn args_md5<A: Serialize>(task: &str, args: &A) -> Option<Box<str>> {
    serde_json::to_value(args)
        .ok()
        .map(|v| crate::cache::original_md5(task, &v).into_boxed_str())
}

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
        Ok(v) => encode_ok(task, &v),
        Err(e) => Err(ErrorInfo::from_user_error(FailureKind::Error, &e)),
    }
}

/// Encodes a task's successful result as MessagePack.
pub fn encode_ok<T: Serialize>(task: &str, value: &T) -> Result<Bytes, ErrorInfo> {
    rmp_serde::to_vec_named(value)
        .map(Bytes::from)
        .map_err(|e| {
            ErrorInfo::new(
                FailureKind::BadResult,
                format!("task `{task}`: result could not be encoded: {e}"),
            )
        })
}

/// A task's error value, on its way to an [`ErrorInfo`]: `(&&ErrorValue(&e)).payload()`
/// keeps the value when its type is serde-serialisable ([`KeepSerializable`]) and
/// nothing otherwise ([`KeepNothing`]); method resolution picks the first that applies
/// (the generated code names the concrete error type, so this needs no specialisation).
pub struct ErrorValue<'a, E>(pub &'a E);

/// Keeps a serialisable error value: its type name and MessagePack encoding.
pub trait KeepSerializable {
    /// The type name and the encoded value.
    fn payload(&self) -> Option<(&'static str, Bytes)>;
}

impl<E: Serialize> KeepSerializable for &ErrorValue<'_, E> {
    fn payload(&self) -> Option<(&'static str, Bytes)> {
        let bytes = rmp_serde::to_vec_named(self.0).ok()?;
        Some((std::any::type_name::<E>(), Bytes::from(bytes)))
    }
}

/// Keeps nothing of an error value whose type is not serialisable.
pub trait KeepNothing {
    /// Always `None`.
    fn payload(&self) -> Option<(&'static str, Bytes)>;
}

impl<E> KeepNothing for ErrorValue<'_, E> {
    fn payload(&self) -> Option<(&'static str, Bytes)> {
        None
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
    known: &'static [ParamDef],
    map: Map<String, Value>,
    /// Every parameter taken, as the flow took it.
    taken: Map<String, Value>,
}

impl Params {
    /// Checks that every given parameter is one of the flow's.
    pub fn new(
        flow: &'static str,
        known: &'static [ParamDef],
        map: Map<String, Value>,
    ) -> Result<Params, ParamError> {
        if let Some(unknown) = map.keys().find(|k| !known.iter().any(|p| p.name == *k)) {
            return Err(ParamError::Unknown {
                flow: flow.to_string(),
                param: unknown.clone(),
                known: Self::list(known),
            });
        }
        Ok(Params {
            flow,
            known,
            map,
            taken: Map::new(),
        })
    }

    fn list(known: &[ParamDef]) -> String {
        if known.is_empty() {
            "(none)".to_string()
        } else {
            let names: Vec<String> = known.iter().map(ParamDef::usage).collect();
            names.join(", ")
        }
    }

    /// Takes one parameter: given -> decoded; absent -> `default`, else `null` (so an
    /// `Option` parameter is `None`), else a missing-parameter error.
    pub fn take<T: DeserializeOwned + Serialize>(
        &mut self,
        name: &str,
        default: Option<fn() -> T>,
    ) -> Result<T, ParamError> {
        let invalid = |reason: String| ParamError::Invalid {
            flow: self.flow.to_string(),
            param: name.to_string(),
            reason,
        };
        let value: T = match self.map.remove(name) {
            Some(v) => serde_json::from_value(v).map_err(|e| invalid(e.to_string()))?,
            None => match default {
                Some(d) => d(),
                None => serde_json::from_value(Value::Null).map_err(|_| ParamError::Missing {
                    flow: self.flow.to_string(),
                    param: name.to_string(),
                    known: Self::list(self.known),
                })?,
            },
        };
        self.taken
            .insert(name.to_string(), param_value(self.flow, name, &value)?);
        Ok(value)
    }

    /// The parameters as the flow took them (see [`FlowStart::params`]).
    pub fn taken(self) -> Map<String, Value> {
        self.taken
    }
}

/// Reads a parameter typed on a command line as a person means it: as JSON when that
/// gives the parameter's type (`--n=20000`, `--tags='["a"]'`), else as the text itself
/// (`--collection=42` for a `String` parameter is `"42"`); returns its JSON.
pub fn param_from_text<T: DeserializeOwned + Serialize>(
    flow: &str,
    name: &str,
    raw: &str,
) -> Result<Value, ParamError> {
    let value: T = match serde_json::from_str::<T>(raw) {
        Ok(v) => v,
        Err(json_err) => {
            T::deserialize(Value::String(raw.to_string())).map_err(|e| ParamError::Invalid {
                flow: flow.to_string(),
                param: name.to_string(),
                reason: if raw.trim_start().starts_with(['[', '{']) {
                    json_err.to_string()
                } else {
                    e.to_string()
                },
            })?
        }
    };
    param_value(flow, name, &value)
}

/// Two values of one parameter, compared: `(&&Same(&a, &b)).same()` uses `PartialEq`
/// when the type has it ([`SameByEq`]), else compares their JSON ([`SameByJson`]).
pub struct Same<'a, T>(pub &'a T, pub &'a T);

/// Compares with `PartialEq`.
pub trait SameByEq {
    /// Whether the two are equal.
    fn same(&self) -> bool;
}

impl<T: PartialEq> SameByEq for &Same<'_, T> {
    fn same(&self) -> bool {
        self.0 == self.1
    }
}

/// Compares as JSON (types without `PartialEq`).
pub trait SameByJson {
    /// Whether the two encode to the same JSON.
    fn same(&self) -> bool;
}

impl<T: Serialize> SameByJson for Same<'_, T> {
    fn same(&self) -> bool {
        serde_json::to_value(self.0).ok() == serde_json::to_value(self.1).ok()
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
