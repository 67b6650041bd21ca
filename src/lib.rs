//! # Pinazu Flows
//!
//! Flows are async Rust functions; the tasks they call run on agents; a coordinator hosts
//! one `FlowRunner` actor per flow run; results can be cached in an object store.
//!
//! ```no_run
//! use pinazu_flows::prelude::*;
//!
//! #[task(retries = 2)]
//! async fn square(x: u64) -> anyhow::Result<u64> {
//!     Ok(x * x)
//! }
//!
//! #[flow]
//! async fn sum_of_squares(n: u64) -> anyhow::Result<u64> {
//!     let calls = (0..n).map(square);
//!     let squares = futures_util::future::try_join_all(calls).await?;
//!     Ok(squares.into_iter().sum())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // `--n=10` runs the flow in embedded mode and prints the final JSON line.
//!     pinazu_flows::main()
//! }
//! ```

extern crate self as pinazu_flows;

/// The allocator of every app built on this crate (feature `mimalloc`, on by default).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `println!` for the CLI's output: a reader that went away (`app runs | head`) ends
/// the program quietly instead of a panic.
macro_rules! out {
    ($($t:tt)*) => {
        $crate::cli::write_out(format_args!($($t)*))
    };
}

pub mod cli;
pub mod dashboard;
mod distributed;
pub mod logging;
#[cfg(feature = "otel")]
pub mod otel;
mod progress;
pub mod runtime;
pub mod stores;

pub use pinazu_coordinator::{
    current_flow_run_id, map, spawn_in_flow, with_priority, CollectingSink, EventSink,
    FlowRunOutcome, LogSink, StatsSnapshot,
};
pub use pinazu_macros::{flow, task};
pub use pinazu_shared::error::{ConfigError, ErrorInfo, FailureKind, ParamError, TaskError};
pub use pinazu_shared::events::FlowStatus;
pub use pinazu_shared::ids::FlowRunId;
pub use pinazu_shared::options::CachePolicy;
pub use pinazu_shared::store::{LocalDirStore, ObjectStore};
pub use pinazu_shared::task_context::{task_context, TaskContext};
pub use runtime::{FlowError, Runtime, RuntimeConfig};

/// The library's command-line entry point: every app's `main` can be just this.
/// With no subcommand it runs the app's flow in embedded mode (see `--help`).
pub fn main() -> std::process::ExitCode {
    cli::main()
}

/// What flow code needs.
pub mod prelude {
    pub use crate::{
        current_flow_run_id, flow, map, spawn_in_flow, task, task_context, with_priority,
        FlowError, Runtime, RuntimeConfig, TaskError,
    };
}

/// Used by the code `#[task]` and `#[flow]` generate; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use bytes::Bytes;
    pub use inventory;
    pub use pinazu_coordinator::{call_task, call_task_keyed, limit_key};
    pub use pinazu_shared::error::{ErrorInfo, FailureKind, ParamError};
    pub use pinazu_shared::options::{CachePolicy, RateSpec, RetryPolicy, TaskLimits, TaskOptions};
    pub use pinazu_shared::registry::{
        args_md5, check_result, decode_args, encode_flow_result, encode_ok, encode_result,
        param_from_text, param_value, ErrorValue, FlowDef, FlowEntry, FlowStart, Invoked,
        KeepNothing, KeepSerializable, ParamDef, Params, Same, SameByEq, SameByJson, Source,
        TaskDef, TaskEntry,
    };
    pub use pinazu_shared::BoxFuture;
    pub use serde_json::{Map, Value};

    pub use crate::runtime::run_flow;
}
