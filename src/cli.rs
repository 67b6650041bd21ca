//! The command-line entry point every app gets through [`crate::main`].
//!
//! `app [OPTIONS] [--key=value ...]` runs the app's flow in embedded mode: flow
//! parameters are `--key=value` (values parse as JSON where they can, else are strings) or
//! `--input '<json object>'`. The last line on stdout is always one JSON object:
//! `{"flow_run_id":..,"status":..,"result":..,"error":..,"stats":{..}}`; the exit code is
//! 0 on SUCCESS, 1 on FAILED, 2 on a usage or configuration error.

use clap::{CommandFactory, FromArgMatches, Parser};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;

use pinazu_coordinator::FlowRunOutcome;
use pinazu_shared::error::ParamError;
use pinazu_shared::events::FlowStatus;
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::registry::Registry;

use crate::logging::{self, LogFormat};
use crate::runtime::{FlowError, Runtime, RuntimeConfig};

/// Runs a flow of this program. Flow parameters: --key=value (JSON values where they
/// parse, else strings) or --input '<json object>'.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// The flow to run (needed only when the program defines several).
    #[arg(long)]
    pub flow: Option<String>,
    /// Flow parameters as a JSON object; --key=value parameters override its keys.
    #[arg(long)]
    pub input: Option<String>,
    /// The flow run id (a UUID); generated when unset.
    #[arg(long, env = "FLOW_RUN_ID")]
    pub flow_run_id: Option<String>,
    /// In-process agents (embedded mode); default one per core.
    #[arg(long)]
    pub agents: Option<usize>,
    /// Attempts each agent runs at once.
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
    /// Directory of the local cache store.
    #[arg(long, env = "PINAZU_CACHE_DIR", default_value = ".pinazu/cache")]
    pub cache_dir: PathBuf,
    /// Execute cached calls anyway and overwrite their cache entries.
    #[arg(long)]
    pub refresh_cache: bool,
    /// Results of already-completed tasks, as Pinazu Core passes them (a JSON object).
    /// Accepted for compatibility; resuming from them arrives with the journal.
    #[arg(long)]
    pub success_task_results: Option<String>,
    /// Log level (error, warn, info, debug, trace); `RUST_LOG` takes precedence.
    #[arg(long, env = "LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, ignore_case = true)]
    pub log_format: Option<LogFormat>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// List this program's flows and tasks, then exit.
    #[arg(long)]
    pub list: bool,
}

/// Splits the raw arguments into the ones clap knows and flow parameters.
pub fn split_args(args: impl IntoIterator<Item = String>) -> (Vec<String>, Vec<(String, Value)>) {
    let cmd = Cli::command();
    let mut known: Vec<(String, bool)> = cmd
        .get_arguments()
        .filter_map(|a| {
            let takes = a.get_action().takes_values();
            a.get_long().map(|l| (l.to_string(), takes))
        })
        .collect();
    known.push(("help".into(), false));
    known.push(("version".into(), false));
    let mut args = args.into_iter().peekable();
    let mut clap_args = vec![args.next().unwrap_or_else(|| "app".into())];
    let mut params = Vec::new();
    while let Some(arg) = args.next() {
        let Some(body) = arg.strip_prefix("--").filter(|b| !b.is_empty()) else {
            clap_args.push(arg);
            continue;
        };
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (body.to_string(), None),
        };
        if let Some((_, takes)) = known.iter().find(|(k, _)| *k == name) {
            clap_args.push(arg.clone());
            if *takes && value.is_none() {
                if let Some(v) = args.next() {
                    clap_args.push(v);
                }
            }
            continue;
        }
        let value = match value {
            Some(v) => v,
            None => match args.peek() {
                Some(next) if !next.starts_with("--") => args.next().unwrap_or_default(),
                _ => "true".into(),
            },
        };
        params.push((name.replace('-', "_"), parse_param_value(&value)));
    }
    (clap_args, params)
}

/// A `--key=value` value: JSON where it parses (`20000`, `true`, `[1,2]`), else a string.
pub fn parse_param_value(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
}

/// `--input` (a JSON object) merged with `--key=value` pairs, which win.
pub fn merge_params(
    input: Option<&str>,
    pairs: Vec<(String, Value)>,
) -> Result<Map<String, Value>, ParamError> {
    let mut map = match input {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(other) => {
                return Err(ParamError::BadInput {
                    reason: format!("got {other}"),
                })
            }
            Err(e) => {
                return Err(ParamError::BadInput {
                    reason: e.to_string(),
                })
            }
        },
    };
    map.extend(pairs);
    Ok(map)
}

/// The final stdout line of every run, fields in this order.
#[derive(serde::Serialize)]
pub struct FinalLine<'a> {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// SUCCESS or FAILED.
    pub status: FlowStatus,
    /// The flow's result (JSON), or null.
    pub result: &'a Option<Value>,
    /// The error, or null.
    pub error: &'a Option<String>,
    /// Counters.
    pub stats: &'a pinazu_coordinator::StatsSnapshot,
}

/// The final stdout line of a run, as text.
pub fn final_line(outcome: &FlowRunOutcome) -> String {
    let line = FinalLine {
        flow_run_id: outcome.flow_run_id,
        status: outcome.status,
        result: &outcome.result,
        error: &outcome.error,
        stats: &outcome.stats,
    };
    serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {msg}");
    ExitCode::from(2)
}

/// A run that could not start still ends with the final JSON line (status FAILED), so
/// whoever reads stdout learns why; the exit code is 2.
fn rejected(flow_run_id: FlowRunId, flow: &str, e: FlowError) -> ExitCode {
    eprintln!("error: {e}");
    let outcome = FlowRunOutcome {
        flow_run_id,
        flow: flow.to_string(),
        status: FlowStatus::Failed,
        result: None,
        error: Some(e.to_string()),
        traceback: None,
        stats: Default::default(),
    };
    println!("{}", final_line(&outcome));
    ExitCode::from(2)
}

/// Parses the process arguments and runs the app.
pub fn main() -> ExitCode {
    let (clap_args, params) = split_args(std::env::args());
    let matches = match Cli::command().try_get_matches_from(clap_args) {
        Ok(m) => m,
        Err(e) => e.exit(),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    logging::init(cli.log_level.as_deref(), cli.log_format);

    let registry = match Registry::global() {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    if cli.list {
        println!("flows: {}", registry.flow_names().join(", "));
        println!("tasks: {}", registry.task_names().join(", "));
        return ExitCode::SUCCESS;
    }
    let flow_run_id = match cli.flow_run_id.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => match FlowRunId::parse(v, "FLOW_RUN_ID / --flow-run-id") {
            Ok(id) => id,
            Err(e) => return usage_error(e),
        },
        _ => FlowRunId::new(),
    };
    let flow = match (&cli.flow, registry.flow_names().as_slice()) {
        (Some(name), _) => name.clone(),
        (None, [only]) => only.to_string(),
        (None, []) => return usage_error("this program defines no #[flow]"),
        (None, many) => {
            return usage_error(format!(
                "this program defines several flows ({}); choose one with --flow NAME",
                many.join(", ")
            ))
        }
    };
    let params = match merge_params(cli.input.as_deref(), params) {
        Ok(p) => p,
        Err(e) => return rejected(flow_run_id, &flow, e.into()),
    };
    if cli.success_task_results.is_some() {
        tracing::warn!(
            "--success-task-results is accepted but not used yet: completed tasks will run again"
        );
    }
    let mut config = match RuntimeConfig::from_env() {
        Ok(c) => c,
        Err(e) => return usage_error(e),
    };
    if config.default_cache == pinazu_shared::options::CachePolicy::Run {
        tracing::info!(dir = %cli.cache_dir.display(), "ENABLE_S3_CACHING=true: tasks with no cache policy use the per-run cache; the store is the local directory (the S3 store is not built yet)");
    }
    if let Some(a) = cli.agents {
        config.agents = a.max(1);
    }
    config.slots = cli.slots.max(1);
    config.cache_dir = cli.cache_dir.clone();
    config.refresh_cache = cli.refresh_cache;

    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return usage_error(format!("could not start the async runtime: {e}")),
    };
    rt.block_on(run_embedded(
        config,
        flow,
        params,
        flow_run_id,
        !cli.no_progress,
    ))
}

async fn run_embedded(
    config: RuntimeConfig,
    flow: String,
    params: Map<String, Value>,
    flow_run_id: FlowRunId,
    progress: bool,
) -> ExitCode {
    let runtime = match Runtime::embedded(config).await {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    let handle = match runtime.start(&flow, params, flow_run_id).await {
        Ok(h) => h,
        Err(e) => return rejected(flow_run_id, &flow, e),
    };
    let bar = crate::progress::show(handle.stats.clone(), progress);
    let outcome = handle.wait().await;
    drop(bar);
    runtime.shutdown().await;
    print_summary(&outcome);
    if outcome.status == FlowStatus::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_summary(outcome: &FlowRunOutcome) {
    let s = &outcome.stats;
    let secs = (s.wall_ms as f64 / 1000.0).max(1e-3);
    println!(
        "flow {} run {}: {}",
        outcome.flow, outcome.flow_run_id, outcome.status
    );
    println!(
        "  tasks {}  executions {}  cache hits {}  retries {}  wall {:.3} s  {:.0} tasks/s",
        s.tasks,
        s.executions,
        s.cache_hits,
        s.retries,
        secs,
        s.tasks as f64 / secs
    );
    if let Some(e) = &outcome.error {
        println!("  error: {e}");
    }
    println!("{}", final_line(outcome));
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn split(args: &[&str]) -> (Vec<String>, Vec<(String, Value)>) {
        split_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn known_flags_go_to_clap_and_the_rest_are_parameters() {
        let (c, p) = split(&[
            "app",
            "--n=20000",
            "--agents",
            "2",
            "--work-ms",
            "5",
            "--name=bob",
            "--flag",
        ]);
        assert_eq!(c, vec!["app", "--agents", "2"]);
        assert_eq!(
            p,
            vec![
                ("n".to_string(), json!(20000)),
                ("work_ms".to_string(), json!(5)),
                ("name".to_string(), json!("bob")),
                ("flag".to_string(), json!(true)),
            ]
        );
    }

    #[test]
    fn input_is_merged_and_pairs_win() {
        let m = merge_params(Some(r#"{"n": 1, "m": 2}"#), vec![("n".into(), json!(5))]).unwrap();
        assert_eq!(Value::Object(m), json!({"n": 5, "m": 2}));
        assert!(merge_params(Some("[1]"), vec![]).is_err());
        assert!(merge_params(Some("{"), vec![]).is_err());
    }
}
