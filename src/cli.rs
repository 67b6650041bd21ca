//! The command-line entry point every app gets through [`crate::main`].
//!
//! - `app [--key=value ...]`: runs the app's flow in embedded mode (no servers). Flow
//!   parameters are `--key=value` (values parse as JSON where they can, else strings) or
//!   `--input '<json object>'`. With `NATS_URL` set, status events also go to NATS.
//! - `app coordinator`, `app agent`: the long-running roles of distributed mode.
//! - `app run [FLOW] [--key=value ...]`: submits a run to the coordinator and follows it.
//! - `app status RUN`, `app cancel RUN`, `app runs`, `app agents`: operator views.
//!
//! A run's last stdout line is always one JSON object:
//! `{"flow_run_id":..,"status":..,"result":..,"error":..,"stats":{..}}`; the exit code is
//! 0 on SUCCESS, 1 on FAILED, 2 on a usage or configuration error.

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use pinazu_coordinator::{EventSink, FlowRunOutcome, StatsSnapshot};
use pinazu_shared::error::ParamError;
use pinazu_shared::events::{EventContext, FlowStatus, FlowStatusMessage};
use pinazu_shared::ids::FlowRunId;
use pinazu_shared::nats::NatsConfig;
use pinazu_shared::registry::Registry;
use pinazu_shared::subjects::{Subjects, DEFAULT_PREFIX};

use crate::logging::{self, LogFormat};
use crate::runtime::{FlowError, Runtime, RuntimeConfig};

/// Runs this program's flows: embedded (no subcommand) or distributed over NATS.
/// Flow parameters: --key=value (read as the parameter's type: JSON where that fits,
/// else the text itself) or --input '<json object>'.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// The role to play; none runs the flow in embedded mode.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Embedded-run settings.
    #[command(flatten)]
    pub run: RunArgs,
    /// In-process agents (embedded mode); default one per core.
    #[arg(long, value_parser = crate::cli::at_least_one, allow_negative_numbers = true)]
    pub agents: Option<u32>,
    /// Attempts each in-process agent runs at once (embedded mode).
    #[arg(long, default_value_t = 4, value_parser = crate::cli::at_least_one, allow_negative_numbers = true)]
    pub slots: u32,
    /// Labels of the in-process agents, `k=v` (repeat or comma separate); default: every
    /// label some task requires, so every task runs embedded.
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// Execute cached calls anyway and overwrite their cache entries.
    #[arg(long, global = true)]
    pub refresh_cache: bool,
    /// Directory of the local cache store.
    #[arg(
        long,
        global = true,
        env = "PINAZU_CACHE_DIR",
        default_value = ".pinazu/cache"
    )]
    pub cache_dir: PathBuf,
    /// The object store for the cache and large payloads: `s3://bucket/prefix` or a
    /// directory. Default: S3 bucket `CACHE_BUCKET` when `ENABLE_S3_CACHING=true`, else
    /// --cache-dir.
    #[arg(long, global = true, env = "PINAZU_STORE")]
    pub store: Option<String>,
    /// Where runs are journaled, so a killed run resumes when started again with its
    /// FLOW_RUN_ID (embedded) or when the coordinator restarts.
    #[arg(
        long,
        global = true,
        env = "PINAZU_JOURNAL_DIR",
        default_value = ".pinazu/journal"
    )]
    pub journal_dir: PathBuf,
    /// Do not journal runs (they cannot be resumed).
    #[arg(long, global = true)]
    pub no_journal: bool,
    /// NATS connection.
    #[command(flatten)]
    pub nats: NatsArgs,
    /// Arguments and results larger than this (bytes) go through the object store by
    /// reference; default half the server's max payload.
    #[arg(long, global = true, env = "PINAZU_PAYLOAD_THRESHOLD")]
    pub payload_threshold: Option<usize>,
    /// Log level (error, warn, info, debug, trace); `RUST_LOG` takes precedence.
    #[arg(long, global = true, env = "LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "LOG_FORMAT",
        value_enum,
        ignore_case = true
    )]
    pub log_format: Option<LogFormat>,
    /// List this program's flows and tasks, then exit.
    #[arg(long)]
    pub list: bool,
    /// Serve the dashboard (the run's page, its tasks and timeline) and `/metrics` on
    /// this address while the run runs, e.g. 127.0.0.1:8233 (embedded mode).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
    /// Size a named limit tasks use (`#[task(limit = "openai")]`): NAME=N (at most N
    /// attempts at once), NAME=N/s (also /min, /h; `,burst=B`), or NAME=N,M/s. Repeat
    /// for several (embedded mode).
    #[arg(long = "limit", value_name = "NAME=SIZE", value_parser = parse_limit_arg)]
    pub limits: Vec<(String, pinazu_shared::options::NamedLimit)>,
}

/// `NAME=SIZE` of `--limit`.
pub(crate) fn parse_limit_arg(
    text: &str,
) -> Result<(String, pinazu_shared::options::NamedLimit), String> {
    let (name, size) = text.split_once('=').ok_or_else(|| {
        format!("expected NAME=SIZE, e.g. openai=20 or openai=100/s, not {text:?}")
    })?;
    let name = name.trim();
    if !pinazu_coordinator::nats::limits::valid_name(name) {
        return Err(format!(
            "invalid limit name {name:?}: use letters, digits, '_' and '-'"
        ));
    }
    Ok((
        name.to_string(),
        pinazu_shared::options::NamedLimit::parse(size)?,
    ))
}

/// What a run takes, embedded or submitted.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// The flow to run (needed only when the program defines several).
    #[arg(long)]
    pub flow: Option<String>,
    /// Flow parameters as a JSON object; --key=value parameters override its keys.
    #[arg(long)]
    pub input: Option<String>,
    /// The flow run id (a UUID); generated when unset.
    #[arg(long, env = "FLOW_RUN_ID")]
    pub flow_run_id: Option<String>,
    /// Results of already-completed tasks, as Pinazu Core passes them: a JSON object
    /// keyed by the call's MD5 cache key or by task name, or a list of
    /// `{"cache_key"|"task_name", "result"}`; those calls are not run.
    #[arg(long)]
    pub success_task_results: Option<String>,
    /// Do not draw a progress bar (none is drawn when stderr is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// The run's priority: when slots are scarce, attempts of higher-priority runs go
    /// first (runs of equal priority take turns). Default 0; negative is lower.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub priority: i32,
}

/// NATS connection flags (global: every subcommand takes them).
#[derive(Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server(s), comma separated; unset = embedded mode.
    #[arg(long, global = true, env = "NATS_URL", hide_env_values = true)]
    pub nats_url: Option<String>,
    /// Prefix of every internal subject.
    #[arg(long, global = true, env = "PINAZU_SUBJECT_PREFIX", default_value = DEFAULT_PREFIX)]
    pub subject_prefix: String,
    /// NATS user (with --nats-password).
    #[arg(long, global = true, env = "NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(long, global = true, env = "NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<String>,
    /// NATS token.
    #[arg(long, global = true, env = "NATS_TOKEN", hide_env_values = true)]
    pub nats_token: Option<String>,
    /// NATS credentials file (JWT and nkey).
    #[arg(long, global = true, env = "NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// CA certificate to trust for TLS (PEM).
    #[arg(long, global = true, env = "NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// TLS client certificate (PEM).
    #[arg(long, global = true, env = "NATS_TLS_CERT")]
    pub nats_tls_cert: Option<PathBuf>,
    /// TLS client key (PEM).
    #[arg(long, global = true, env = "NATS_TLS_KEY")]
    pub nats_tls_key: Option<PathBuf>,
    /// How long to wait for a NATS server that does not answer yet (retrying with
    /// backoff): a duration, or `forever`. Default: forever for `coordinator` and
    /// `agent` (services: start order does not matter), 5s for the others.
    #[arg(long, global = true, env = "PINAZU_CONNECT_TIMEOUT", value_parser = parse_wait)]
    pub connect_timeout: Option<Wait>,
}

/// A bound on a wait: a duration, or for ever.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// This long at most.
    At(std::time::Duration),
    /// Until it happens.
    Forever,
}

/// A count of at least one (agents, slots), with an error in words otherwise.
pub(crate) fn at_least_one(s: &str) -> Result<u32, String> {
    match s.trim().parse::<i128>() {
        Ok(n) if n >= 1 && n <= u32::MAX as i128 => Ok(n as u32),
        Ok(n) if n < 1 => Err(format!("must be at least 1 (got {n})")),
        Ok(n) => Err(format!("{n} is too large")),
        Err(_) => Err(format!("{s:?} is not a whole number")),
    }
}

fn parse_wait(s: &str) -> Result<Wait, String> {
    match s.trim() {
        "forever" | "inf" | "never" => Ok(Wait::Forever),
        d => humantime::parse_duration(d)
            .map(Wait::At)
            .map_err(|e| format!("{e} (a duration such as 30s or 5m, or `forever`)")),
    }
}

/// The default wait for NATS at start-up: for ever for the long-running services, a few
/// seconds for everything a person (or Pinazu Core) waits on.
const CLIENT_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl NatsArgs {
    pub(crate) fn config(&self, url: &str, name: &str, service: bool) -> NatsConfig {
        let connect_timeout = match self.connect_timeout {
            Some(Wait::At(d)) => Some(d),
            Some(Wait::Forever) => None,
            None if service => None,
            None => Some(CLIENT_CONNECT_TIMEOUT),
        };
        NatsConfig {
            connect_timeout,
            urls: url.to_string(),
            user: self.nats_user.clone(),
            password: self.nats_password.clone(),
            token: self.nats_token.clone(),
            creds_file: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: false,
            name: name.to_string(),
        }
    }

    fn subjects(&self) -> Subjects {
        Subjects::new(&self.subject_prefix)
    }
}

/// The flags `cache` uses, for its help (they are global flags of the app).
#[derive(Args, Debug)]
struct StoreHelp {
    /// The object store: `s3://bucket/prefix` or a directory. Default: S3 bucket
    /// `CACHE_BUCKET` when `ENABLE_S3_CACHING=true`, else --cache-dir.
    #[arg(long, global = true, env = "PINAZU_STORE")]
    store: Option<String>,
    /// Directory of the local cache store.
    #[arg(
        long,
        global = true,
        env = "PINAZU_CACHE_DIR",
        default_value = ".pinazu/cache"
    )]
    cache_dir: PathBuf,
    /// Log level (error, warn, info, debug, trace).
    #[arg(long, global = true, env = "LOG_LEVEL")]
    log_level: Option<String>,
}

/// The roles and operator commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Host flow runs: the long-running coordinator of distributed mode.
    Coordinator(crate::distributed::CoordinatorArgs),
    /// Run tasks for the coordinator: a long-running agent.
    Agent(crate::distributed::AgentArgs),
    /// Submit a run to the coordinator and follow it to its end.
    Run(crate::distributed::SubmitArgs),
    /// Show one run.
    Status(crate::distributed::RunIdArgs),
    /// Cancel a run: its attempts stop and it ends FAILED.
    Cancel(crate::distributed::RunIdArgs),
    /// List runs, most recent first: the live ones and the journal's history.
    Runs(crate::distributed::RunsArgs),
    /// List the live agents.
    Agents(crate::distributed::ListArgs),
    /// Print the log lines of a run's task attempts (their `tracing` events).
    Logs(crate::distributed::LogsArgs),
    /// Manage the result cache (no coordinator needed).
    Cache(crate::distributed::CacheArgs),
    /// Show or remove a run's journal (the local one, and JetStream's with NATS_URL).
    Journal(crate::distributed::JournalArgs),
    /// Show, size or remove the named limits tasks share (`#[task(limit = "...")]`).
    Limits(crate::distributed::LimitsArgs),
    /// Run flows on a schedule (cron or interval), kept in JetStream by the coordinators.
    Schedule(crate::distributed::ScheduleArgs),
}

/// Splits the raw arguments into the ones clap knows and flow parameters (`--key=value`
/// or `--key value` that no command defines). Parameters are taken only for the embedded
/// run and for `run`.
pub fn split_args(args: impl IntoIterator<Item = String>) -> (Vec<String>, Vec<(String, Value)>) {
    let cmd = Cli::command();
    let flags = |c: &clap::Command| -> Vec<(String, bool)> {
        c.get_arguments()
            .filter_map(|a| {
                a.get_long()
                    .map(|l| (l.to_string(), a.get_action().takes_values()))
            })
            .chain([("help".to_string(), false), ("version".to_string(), false)])
            .collect()
    };
    let mut known = flags(&cmd);
    let mut sub: Option<String> = None;
    let mut args = args.into_iter().peekable();
    let mut clap_args = vec![args.next().unwrap_or_else(|| "app".into())];
    let mut params = Vec::new();
    while let Some(arg) = args.next() {
        let Some(body) = arg.strip_prefix("--").filter(|b| !b.is_empty()) else {
            if sub.is_none() && !arg.starts_with('-') {
                if let Some(sc) = cmd.find_subcommand(&arg) {
                    known.extend(flags(sc));
                    sub = Some(sc.get_name().to_string());
                }
            }
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
        if !matches!(sub.as_deref(), None | Some("run")) {
            clap_args.push(arg); // clap reports the unknown flag
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

/// A `--key=value` value, kept as the text typed: [`merge_params`] reads it as the
/// parameter's type.
pub fn parse_param_value(raw: &str) -> Value {
    Value::String(raw.to_string())
}

/// `--input` (a JSON object, taken as JSON) merged with `--key=value` pairs, which win
/// and are read as a person typed them: as JSON when that gives the parameter's type
/// (`--n=20000`, `--tags='["a"]'`), else as the text itself (`--collection=42` for a
/// `String` parameter is `"42"`). A name the flow does not have is left for the flow to
/// report.
pub fn merge_params(
    flow: &pinazu_shared::registry::FlowDef,
    input: Option<&str>,
    pairs: Vec<(String, Value)>,
) -> Result<Map<String, Value>, ParamError> {
    let mut map = match input {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            // `work-ms` as `--work-ms` spells it, or `work_ms`
            Ok(Value::Object(m)) => m
                .into_iter()
                .map(|(k, v)| (k.replace('-', "_"), v))
                .collect(),
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
    for (name, value) in pairs {
        let value = match &value {
            Value::String(raw) => match (flow.parse_text)(&name, raw) {
                Some(typed) => typed?,
                None => value,
            },
            _ => value,
        };
        map.insert(name, value);
    }
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
    pub stats: &'a StatsSnapshot,
}

/// The final stdout line of a run, as text.
pub fn final_line(outcome: &FlowRunOutcome) -> String {
    let error = outcome
        .error
        .as_deref()
        .map(|e| pinazu_shared::redact::redact(e).into_owned());
    let line = FinalLine {
        flow_run_id: outcome.flow_run_id,
        status: outcome.status,
        result: &outcome.result,
        error: &error,
        stats: &outcome.stats,
    };
    serde_json::to_string(&line).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}

/// Writes one line to stdout; a closed stdout (the reader went away) ends the program.
/// Secrets (see `shared/src/redact.rs`) are replaced by `***`: operator output (status,
/// runs, journals, summaries) shows errors that may quote them. The run's final JSON
/// line goes through [`write_raw`]: its result is data and stays as the flow returned it
/// (its error is redacted by [`final_line`]).
pub(crate) fn write_out(args: std::fmt::Arguments) {
    let text = args.to_string();
    write_raw(format_args!("{}", pinazu_shared::redact::redact(&text)));
}

/// Writes one line to stdout as it is.
pub(crate) fn write_raw(args: std::fmt::Arguments) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|_| stdout.write_all(b"\n"))
        .and_then(|_| stdout.flush());
    if let Err(e) = written {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

pub(crate) fn usage_error(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {}", pinazu_shared::redact::redact(&msg.to_string()));
    ExitCode::from(2)
}

/// A run that could not start still ends with the final JSON line (status FAILED), so
/// whoever reads stdout learns why; the exit code is 2.
pub(crate) fn rejected(flow_run_id: FlowRunId, flow: &str, e: impl std::fmt::Display) -> ExitCode {
    let e = pinazu_shared::redact::redact(&e.to_string()).into_owned();
    eprintln!("error: {e}");
    failed_line(flow_run_id, flow, e)
}

/// The final line (status FAILED) of a run that could not start; exit 2.
fn failed_line(flow_run_id: FlowRunId, flow: &str, e: impl std::fmt::Display) -> ExitCode {
    let outcome = FlowRunOutcome {
        flow_run_id,
        flow: flow.to_string(),
        status: FlowStatus::Failed,
        result: None,
        error: Some(pinazu_shared::redact::redact(&e.to_string()).into_owned()),
        traceback: None,
        stats: Default::default(),
    };
    write_raw(format_args!("{}", final_line(&outcome)));
    ExitCode::from(2)
}

/// Ends a run that could not start: publishes its flow FAILED event (with NATS_URL set),
/// prints the final JSON line (status FAILED) and exits 2.
pub(crate) struct Rejecter {
    pub(crate) flow_run_id: FlowRunId,
    pub(crate) flow: String,
    pub(crate) events: EventContext,
    pub(crate) sink: Option<Arc<dyn EventSink>>,
    /// The id names a run already (the journal knows it): nothing is published under it.
    pub(crate) known: bool,
    /// `run`: the coordinator publishes the event (it knows whether the id is taken).
    pub(crate) coordinator: Option<(async_nats::Client, Subjects)>,
    /// The error was printed already (with its usage, by clap).
    pub(crate) printed: bool,
}

impl Rejecter {
    pub(crate) fn new(flow_run_id: FlowRunId, flow: Option<&str>) -> Self {
        Rejecter {
            flow_run_id,
            flow: flow.unwrap_or_default().to_string(),
            events: EventContext::default(),
            sink: None,
            known: false,
            coordinator: None,
            printed: false,
        }
    }

    /// `publish`: false when the event was published already (the coordinator does so
    /// for the failures it finds), or when the run id names another run.
    pub(crate) async fn reject(&self, e: impl std::fmt::Display, publish: bool) -> ExitCode {
        let error = e.to_string();
        if publish && !self.known {
            let mut done = false;
            if let Some((client, subjects)) = &self.coordinator {
                let req = pinazu_shared::api::ApiRequest::Reject {
                    flow_run_id: self.flow_run_id,
                    error: error.clone(),
                    events: Some(self.events.clone()),
                };
                done = crate::distributed::ask(client, subjects, "reject", &req)
                    .await
                    .is_ok();
            }
            if let (false, Some(sink)) = (done, &self.sink) {
                publish_failed(&**sink, &self.events, self.flow_run_id, &error).await;
            }
        }
        if self.printed {
            failed_line(self.flow_run_id, &self.flow, error)
        } else {
            rejected(self.flow_run_id, &self.flow, error)
        }
    }
}

/// Publishes a run's flow FAILED event and waits (a few seconds at most) until NATS has it.
pub(crate) async fn publish_failed(
    sink: &dyn EventSink,
    events: &EventContext,
    flow_run_id: FlowRunId,
    error: &str,
) {
    let message = FlowStatusMessage {
        flow_run_id,
        status: FlowStatus::Failed,
        error_message: Some(error.to_string()),
        traceback: Some(error.to_string()),
        event_timestamp: pinazu_shared::events::now_timestamp(),
    };
    if let Some(json) = pinazu_coordinator::status::flow_event_json(events, message) {
        sink.publish(pinazu_shared::events::FLOW_STATUS_SUBJECT, json);
        if tokio::time::timeout(std::time::Duration::from_secs(5), sink.flush())
            .await
            .is_err()
        {
            tracing::warn!(flow_run_id = %flow_run_id, "the run's FAILED event could not be delivered to NATS within 5 s");
        }
    }
}

/// The run id from `--flow-run-id` / `FLOW_RUN_ID`, or a new one.
pub(crate) fn run_id(raw: Option<&str>) -> Result<FlowRunId, pinazu_shared::error::ConfigError> {
    match raw.map(str::trim) {
        Some(v) if !v.is_empty() => FlowRunId::parse(v, "FLOW_RUN_ID / --flow-run-id"),
        _ => Ok(FlowRunId::new()),
    }
}

/// The flow to run: the one named, or the program's only flow.
pub(crate) fn pick_flow(registry: &Registry, named: Option<&str>) -> Result<String, String> {
    match (named, registry.flow_names().as_slice()) {
        (Some(name), _) => Ok(name.to_string()),
        (None, [only]) => Ok(only.to_string()),
        (None, []) => Err("this program defines no #[flow]".into()),
        (None, many) => Err(format!(
            "this program defines several flows ({}); name one",
            many.join(", ")
        )),
    }
}

/// The command line of this app: its own name and version, and its flows with their
/// parameters in `--help`.
pub fn app_command(registry: Option<&Registry>) -> clap::Command {
    let bin = std::env::args()
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "app".into());
    let lib = env!("CARGO_PKG_VERSION");
    let (package, version) = registry
        .and_then(Registry::app)
        .unwrap_or((env!("CARGO_PKG_NAME"), lib));
    let flows = registry.map(flows_help).unwrap_or_default();
    let run_help = flows.clone();
    let cmd = Cli::command()
        .mut_subcommand("run", |sc| sc.after_help(run_help))
        .name(bin.clone())
        .bin_name(bin.clone())
        .version(version.to_string())
        .long_version(format!("{version} ({package}; pinazu-flows {lib})"))
        .about(format!(
            "{bin}: runs this program's flows. With no subcommand it runs a flow in this process (embedded mode, no servers); `coordinator`, `agent` and `run` run it distributed over NATS."
        ))
        .after_help(format!(
            "{flows}Flow parameters: --name=VALUE (read as the parameter's type: JSON where that fits, else the text itself) or --input '<json object>'."
        ));
    cmd
}

/// The flows and their parameters, for `--help` and `--list`.
fn flows_help(registry: &Registry) -> String {
    let mut out = String::from("Flows:\n");
    for name in registry.flow_names() {
        let Some(f) = registry.flow(name) else {
            continue;
        };
        if f.doc.is_empty() {
            out.push_str(&format!("  {name}\n"));
        } else {
            out.push_str(&format!("  {name}: {}\n", f.doc));
        }
        for p in f.params {
            out.push_str(&format!("      {}\n", p.usage()));
        }
    }
    out.push('\n');
    out
}

/// `--list`: every flow with its parameters, every task with its options.
fn list(registry: &Registry) {
    out!("{}", flows_help(registry).trim_end());
    out!("Tasks:");
    for name in registry.task_names() {
        let Some(t) = registry.task(name) else {
            continue;
        };
        let mut opts = Vec::new();
        if !t.version.is_empty() {
            opts.push(format!("version {}", t.version));
        }
        if t.options.retry.retries > 0 {
            opts.push(format!("retries {}", t.options.retry.retries));
        }
        if let Some(d) = t.options.timeout {
            opts.push(format!("timeout {}", humantime::format_duration(d)));
        }
        if t.options.cache != pinazu_shared::options::CachePolicy::None {
            opts.push(format!("cache {:?}", t.options.cache).to_lowercase());
        }
        if !t.options.labels.is_empty() {
            let l: Vec<String> = t
                .options
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            opts.push(format!("labels {}", l.join(",")));
        }
        if opts.is_empty() {
            out!("  {name}");
        } else {
            out!("  {name} ({})", opts.join("; "));
        }
    }
}

/// Parses the process arguments and runs the app.
pub fn main() -> ExitCode {
    // secrets of the environment never reach a log line or a message
    pinazu_shared::redact::register_env();
    // nor a panic message (a task's panic is printed, then reported as its failure)
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let mut text = format!("thread '{}' {info}", thread.name().unwrap_or("<unnamed>"));
        let trace = std::backtrace::Backtrace::capture();
        if trace.status() == std::backtrace::BacktraceStatus::Captured {
            text.push_str(&format!("\n{trace}"));
        }
        eprintln!("{}", pinazu_shared::redact::redact(text.trim_end()));
    }));
    let (clap_args, params) = split_args(std::env::args());
    let registry = Registry::global();
    // `cache --help`: the flags the cache commands use, not every global one
    if clap_args.get(1).map(String::as_str) == Some("cache")
        && clap_args.iter().any(|a| a == "--help" || a == "-h")
    {
        let help = <crate::distributed::CacheArgs as clap::Args>::augment_args(
            <StoreHelp as clap::Args>::augment_args(clap::Command::new("cache"))
                .bin_name(format!("{} cache", clap_args[0]))
                .about("Manage the result cache (no coordinator needed)"),
        );
        match help.try_get_matches_from(clap_args.iter().skip(1)) {
            Err(e) => e.exit(),
            Ok(_) => return ExitCode::SUCCESS,
        }
    }
    let embedded = !clap_args.iter().skip(1).any(|a| {
        Cli::command()
            .get_subcommands()
            .any(|sc| sc.get_name() == a.as_str())
    });
    let matches = match app_command(registry.as_ref().ok().copied()).try_get_matches_from(clap_args)
    {
        Ok(m) => m,
        Err(e) if embedded && e.use_stderr() => return bad_command_line(e),
        Err(e) => clap_exit(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => clap_exit(e),
    };
    if let Some(urls) = &cli.nats.nats_url {
        pinazu_shared::redact::register_url(urls);
    }
    for secret in [&cli.nats.nats_password, &cli.nats.nats_token]
        .into_iter()
        .flatten()
    {
        pinazu_shared::redact::register(secret);
    }
    let is_agent = matches!(cli.command, Some(Command::Agent(_)));
    let service = match cli.command {
        None => "pinazu-embedded",
        Some(Command::Coordinator(_)) => "pinazu-coordinator",
        Some(Command::Agent(_)) => "pinazu-agent",
        Some(_) => "pinazu-client",
    };
    logging::init_with_service(cli.log_level.as_deref(), cli.log_format, is_agent, service);

    let registry = match registry {
        Ok(r) => r,
        Err(e) => return usage_error(e),
    };
    if cli.list {
        list(registry);
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return usage_error(format!("could not start the async runtime: {e}")),
    };
    let code = match &cli.command {
        None => rt.block_on(run_embedded(&cli, registry, params)),
        Some(cmd) => rt.block_on(crate::distributed::run_command(&cli, cmd, registry, params)),
    };
    // do not wait for stray tasks (e.g. a NATS reconnect loop) at exit
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    #[cfg(feature = "otel")]
    crate::otel::shutdown();
    code
}

/// Ends the process on a command-line error (or `--help`), as clap would, with any
/// secret in the message redacted.
fn clap_exit(e: clap::Error) -> ! {
    if !e.use_stderr() {
        e.exit()
    }
    let text = e.render().to_string();
    eprint!("{}", pinazu_shared::redact::redact(&text));
    std::process::exit(e.exit_code())
}

/// A command line clap refuses, for an embedded run: the error, and (the run id being
/// known from `FLOW_RUN_ID`) the final line and, with `NATS_URL` set, the run's FAILED
/// event; exit 2.
fn bad_command_line(e: clap::Error) -> ExitCode {
    eprint!("{}", pinazu_shared::redact::redact(&e.render().to_string()));
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let flow_run_id = match env("FLOW_RUN_ID").map(|v| FlowRunId::parse(&v, "FLOW_RUN_ID")) {
        Some(Ok(id)) => id,
        Some(Err(_)) => return ExitCode::from(2),
        None => FlowRunId::new(),
    };
    let message = e
        .render()
        .to_string()
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("bad command line")
        .trim_start_matches("error: ")
        .to_string();
    let mut r = Rejecter::new(flow_run_id, None);
    r.events = EventContext::from_env().unwrap_or_default();
    r.printed = true;
    // an id the journal knows names a run: nothing is published under it
    let journal_dir = env("PINAZU_JOURNAL_DIR").unwrap_or_else(|| ".pinazu/journal".into());
    r.known = std::path::Path::new(&journal_dir)
        .join(format!("{flow_run_id}.journal"))
        .exists();
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return rejected(flow_run_id, "", message);
    };
    let code = rt.block_on(async {
        if let Some(url) = env("NATS_URL") {
            let config = NatsConfig {
                connect_timeout: Some(CLIENT_CONNECT_TIMEOUT),
                urls: url,
                user: env("NATS_USER"),
                password: env("NATS_PASSWORD"),
                token: env("NATS_TOKEN"),
                creds_file: env("NATS_CREDS").map(PathBuf::from),
                tls_ca: env("NATS_TLS_CA").map(PathBuf::from),
                tls_cert: env("NATS_TLS_CERT").map(PathBuf::from),
                tls_key: env("NATS_TLS_KEY").map(PathBuf::from),
                tls_required: false,
                name: "pinazu-embedded".into(),
            };
            if let Ok(Ok(client)) =
                tokio::time::timeout(std::time::Duration::from_secs(5), config.connect()).await
            {
                r.sink = Some(Arc::new(pinazu_coordinator::nats::NatsEventSink::new(
                    pinazu_shared::nats::Publisher::start(client),
                )));
            }
        }
        r.reject(message, true).await
    });
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    code
}

pub(crate) fn require_nats(cli: &Cli) -> Result<String, ExitCode> {
    cli.nats.nats_url.clone().filter(|u| !u.trim().is_empty()).ok_or_else(|| {
        usage_error("this command needs a NATS server: set NATS_URL or pass --nats-url nats://host:4222")
    })
}

pub(crate) async fn connect(
    cli: &Cli,
    url: &str,
    name: &str,
) -> Result<async_nats::Client, ExitCode> {
    try_connect(cli, url, name).await.map_err(usage_error)
}

/// Connects to NATS, or says why not.
pub(crate) async fn try_connect(
    cli: &Cli,
    url: &str,
    name: &str,
) -> Result<async_nats::Client, String> {
    let service = matches!(
        cli.command,
        Some(Command::Coordinator(_)) | Some(Command::Agent(_))
    );
    cli.nats
        .config(url, name, service)
        .connect()
        .await
        .map_err(|e| e.to_string())
}

/// Labels given as `k=v` (repeated or comma separated).
pub(crate) fn parse_labels(raw: &[String]) -> Result<Vec<(String, String)>, String> {
    raw.iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| match l.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("label {l:?} is not k=v")),
        })
        .collect()
}

/// The object store the flags and environment select, opened (one clear error if not).
pub(crate) async fn open_store(
    cli: &Cli,
) -> Result<Arc<dyn pinazu_shared::store::ObjectStore>, ExitCode> {
    try_open_store(cli).await.map_err(usage_error)
}

/// The object store the flags and environment select, or why it cannot be used.
pub(crate) async fn try_open_store(
    cli: &Cli,
) -> Result<Arc<dyn pinazu_shared::store::ObjectStore>, pinazu_shared::error::ConfigError> {
    let spec = crate::stores::StoreSpec::choose(cli.store.as_deref(), &cli.cache_dir)?;
    spec.open().await
}

/// The journal the flags select (none with --no-journal).
pub(crate) fn open_journal(
    cli: &Cli,
) -> Result<Option<Arc<dyn pinazu_coordinator::journal::Journal>>, ExitCode> {
    try_open_journal(cli).map_err(usage_error)
}

/// The journal the flags select, or why it cannot be used.
pub(crate) fn try_open_journal(
    cli: &Cli,
) -> Result<Option<Arc<dyn pinazu_coordinator::journal::Journal>>, String> {
    if cli.no_journal {
        return Ok(None);
    }
    pinazu_coordinator::journal::LocalJournal::open(&cli.journal_dir)
        .map(|j| Some(Arc::new(j) as Arc<dyn pinazu_coordinator::journal::Journal>))
        .map_err(|e| format!("{e} (set --journal-dir / PINAZU_JOURNAL_DIR, or --no-journal)"))
}

pub(crate) fn nats_subjects(cli: &Cli) -> Subjects {
    cli.nats.subjects()
}

async fn run_embedded(
    cli: &Cli,
    registry: &'static Registry,
    params: Vec<(String, Value)>,
) -> ExitCode {
    let flow_run_id = match run_id(cli.run.flow_run_id.as_deref()) {
        Ok(id) => id,
        Err(e) => return usage_error(e),
    };
    // from here the run id is known: every failure ends with the run's FAILED event (on
    // NATS when NATS_URL is set) and the final line
    let mut r = Rejecter::new(flow_run_id, cli.run.flow.as_deref());
    // like the original library: with NATS_URL set, status events go to NATS
    if let Some(url) = cli
        .nats
        .nats_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        match try_connect(cli, url, "pinazu-embedded").await {
            Ok(client) => {
                let publisher = pinazu_shared::nats::Publisher::start(client);
                r.sink = Some(Arc::new(pinazu_coordinator::nats::NatsEventSink::new(
                    publisher,
                )));
            }
            Err(e) => return r.reject(e, false).await,
        }
    }
    match EventContext::from_env() {
        Ok(events) => r.events = events,
        Err(e) => return r.reject(e, true).await,
    }
    // the journal first: an id it knows names a run, and nothing is published under it
    let journal = match try_open_journal(cli) {
        Ok(j) => j,
        Err(e) => return r.reject(e, true).await,
    };
    if let Some(j) = &journal {
        r.known = matches!(j.latest(flow_run_id).await, Ok(Some(_)));
    }
    let flow = match pick_flow(registry, cli.run.flow.as_deref()) {
        Ok(f) => f,
        Err(e) => return r.reject(format!("{e} with --flow NAME"), true).await,
    };
    r.flow = flow.clone();
    let Some(def) = registry.flow(&flow) else {
        let e = format!(
            "flow `{flow}` is not defined in this program; flows: {}",
            registry.flow_names().join(", ")
        );
        return r.reject(e, true).await;
    };
    let params = match merge_params(def, cli.run.input.as_deref(), params) {
        Ok(p) => p,
        Err(e) => return r.reject(e, true).await,
    };
    let seeds = match cli
        .run
        .success_task_results
        .as_deref()
        .map(pinazu_coordinator::Seeds::parse)
    {
        None => pinazu_coordinator::Seeds::default(),
        Some(Ok(s)) => s,
        Some(Err(e)) => return r.reject(e, true).await,
    };
    let mut config = match RuntimeConfig::from_env() {
        Ok(c) => c,
        Err(e) => return r.reject(e, true).await,
    };
    if let Some(a) = cli.agents {
        config.agents = a as usize;
    }
    config.slots = cli.slots;
    if !cli.labels.is_empty() {
        match parse_labels(&cli.labels) {
            Ok(l) => config.labels = Some(l),
            Err(e) => return r.reject(format!("--labels: {e}"), true).await,
        }
    }
    config.cache_dir = cli.cache_dir.clone();
    config.refresh_cache = cli.refresh_cache;
    config.limits = cli.limits.clone();
    match try_open_store(cli).await {
        Ok(store) => config.store = Some(store),
        Err(e) => return r.reject(e, true).await,
    }
    config.journal = journal;
    if let Some(sink) = &r.sink {
        config.events = sink.clone();
    }
    let runtime = match Runtime::embedded(config).await {
        Ok(rt) => rt,
        Err(e) => return r.reject(e, true).await,
    };
    // the dashboard's address is taken before the run starts: one that cannot be had
    // is a run that cannot start
    let http = match cli.http {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                runtime.shutdown().await;
                return r.reject(format!("--http {addr}: {e}"), true).await;
            }
        },
        None => None,
    };
    let options = pinazu_coordinator::RunOptions {
        seeds,
        events: Some(r.events.clone()),
        meta: pinazu_coordinator::journal::RunMeta {
            priority: cli.run.priority,
            parent: None,
        },
        ..Default::default()
    };
    let handle = match runtime
        .start_with(&flow, params, flow_run_id, options)
        .await
    {
        Ok(h) => h,
        // the coordinator published these (or the id names another run)
        Err(e @ (FlowError::Params(_) | FlowError::Start(_))) => {
            runtime.shutdown().await;
            return r.reject(e, false).await;
        }
        Err(e) => {
            runtime.shutdown().await;
            return r.reject(e, true).await;
        }
    };
    if let Some(listener) = http {
        let backend = crate::dashboard::Backend::Local(runtime.coordinator().clone());
        match crate::dashboard::serve_on(listener, backend) {
            Ok(bound) => eprintln!("dashboard: http://{bound}/#/run/{flow_run_id}"),
            Err(e) => tracing::warn!(error = %e, "the dashboard could not be served"),
        }
    }
    let bar = crate::progress::show(handle.stats.clone(), !cli.run.no_progress);
    // SIGTERM / SIGINT (e.g. the launcher stops the run): cancel it, so its open calls
    // end FAILED "cancelled" and the run FAILED, events delivered; a second signal
    // exits at once
    let coordinator = runtime.coordinator().clone();
    let stopper = tokio::spawn(async move {
        crate::distributed::shutdown_signal().await;
        tracing::warn!(flow_run_id = %flow_run_id, "stop signal: cancelling the run (a second signal exits at once)");
        let _ = coordinator.cancel(
            flow_run_id,
            "the process was asked to stop (SIGTERM/SIGINT)",
        );
        // a second signal, or a cancel that cannot finish (its events wait for a NATS
        // that is down), ends the process anyway
        crate::distributed::arm_stop(std::time::Duration::from_secs(30), "run");
    });
    let core = runtime.coordinator().clone();
    let outcome = tokio::select! {
        o = handle.wait() => o,
        why = core.core_failure() => {
            // the run cannot go on in this process; its journal resumes it
            stopper.abort();
            drop(bar);
            eprintln!("error: {}", pinazu_shared::redact::redact(&why));
            return ExitCode::from(70);
        }
    };
    stopper.abort();
    drop(bar);
    runtime.shutdown().await;
    print_summary(&outcome);
    exit_code(outcome.status)
}

pub(crate) fn exit_code(status: FlowStatus) -> ExitCode {
    if status == FlowStatus::Success {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

pub(crate) fn print_summary(outcome: &FlowRunOutcome) {
    let s = &outcome.stats;
    let secs = (s.wall_ms as f64 / 1000.0).max(1e-3);
    out!(
        "flow {} run {}: {}",
        outcome.flow,
        outcome.flow_run_id,
        outcome.status
    );
    out!(
        "  tasks {}  executions {}  cache hits {}  retries {}  wall {:.3} s  {:.0} tasks/s",
        s.tasks,
        s.executions,
        s.cache_hits,
        s.retries,
        secs,
        s.tasks as f64 / secs
    );
    if let Some(e) = &outcome.error {
        out!("  error: {e}");
    }
    write_raw(format_args!("{}", final_line(outcome)));
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
                ("n".to_string(), json!("20000")),
                ("work_ms".to_string(), json!("5")),
                ("name".to_string(), json!("bob")),
                ("flag".to_string(), json!("true")),
            ]
        );
    }

    #[test]
    fn subcommands_get_their_flags_and_run_gets_parameters() {
        let (c, p) = split(&[
            "app",
            "run",
            "parallel_flow",
            "--n=5",
            "--detach",
            "--nats-url",
            "nats://x:1",
        ]);
        assert_eq!(
            c,
            vec![
                "app",
                "run",
                "parallel_flow",
                "--detach",
                "--nats-url",
                "nats://x:1"
            ]
        );
        assert_eq!(p, vec![("n".to_string(), json!("5"))]);
        let (c, p) = split(&["app", "agent", "--slots", "8", "--bogus=1"]);
        assert_eq!(c, vec!["app", "agent", "--slots", "8", "--bogus=1"]);
        assert!(p.is_empty());
    }

    #[test]
    fn input_is_merged_and_pairs_win() {
        use pinazu_shared::registry::{FlowDef, FlowStart, ParamDef, Source};
        fn invoke(_: Map<String, Value>) -> Result<FlowStart, ParamError> {
            unreachable!()
        }
        fn text(name: &str, raw: &str) -> Option<Result<Value, ParamError>> {
            match name {
                "n" => Some(pinazu_shared::registry::param_from_text::<u64>(
                    "f", "n", raw,
                )),
                "s" => Some(pinazu_shared::registry::param_from_text::<String>(
                    "f", "s", raw,
                )),
                _ => None,
            }
        }
        fn same(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
            a == b
        }
        static DEF: FlowDef = FlowDef {
            name: "f",
            params: &[] as &[ParamDef],
            doc: "",
            invoke,
            parse_text: text,
            same_params: same,
            source: Source {
                module: "",
                file: "",
                line: 0,
                package: "",
                version: "",
            },
        };
        let m = merge_params(
            &DEF,
            Some(r#"{"n": 1, "m": 2, "s": "\"x\""}"#),
            vec![("n".into(), json!("5"))],
        )
        .unwrap();
        // JSON from --input stays as it is; text is read as the parameter's type
        assert_eq!(Value::Object(m), json!({"n": 5, "m": 2, "s": "\"x\""}));
        let m = merge_params(&DEF, None, vec![("s".into(), json!("42"))]).unwrap();
        assert_eq!(Value::Object(m), json!({"s": "42"}));
        assert!(merge_params(&DEF, None, vec![("n".into(), json!("x"))]).is_err());
        assert!(merge_params(&DEF, Some("[1]"), vec![]).is_err());
        assert!(merge_params(&DEF, Some("{"), vec![]).is_err());
    }
}
