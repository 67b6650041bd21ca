//! The distributed-mode commands: `coordinator`, `agent`, `run`, `status`, `cancel`,
//! `runs`, `agents`.

use bytes::Bytes;
use clap::Args;
use futures_util::StreamExt;
use pinazu_shared::events::FlowStatus;
use serde_json::Value;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pinazu_agent::nats::{serve_agent, AgentServeConfig};
use pinazu_agent::AgentConfig;
use pinazu_coordinator::nats::{serve, NatsAgentLink, NatsEventSink, Payloads};
use pinazu_coordinator::{Coordinator, CoordinatorConfig, FlowRunOutcome, SchedulerTiming};
use pinazu_shared::api::{AgentSummary, ApiReply, ApiRequest, RunInfo};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::events::EventContext;
use pinazu_shared::ids::{AgentId, FlowRunId};
use pinazu_shared::nats::Publisher;
use pinazu_shared::registry::Registry;
use pinazu_shared::subjects::{valid_token, Subjects};

use crate::cli::{
    connect, exit_code, merge_params, nats_subjects, open_journal, open_store, parse_labels,
    pick_flow, print_summary, require_nats, run_id, try_connect, usage_error, Cli, Command,
    Rejecter, RunArgs,
};
use crate::runtime::{env_flag, RuntimeConfig};

fn parse_duration(s: &str) -> Result<Duration, String> {
    if s.trim_start().starts_with('-') {
        return Err(format!(
            "{s:?} is negative: a duration is 0 or more (e.g. 500ms, 3s, 1m)"
        ));
    }
    humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 500ms, 3s, 1m)"))
}

/// A duration an agent's silence is judged by: heartbeats come every second, so less
/// than 2 s would declare live agents dead.
fn parse_dead_after(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(2) {
        return Err(format!(
            "{s:?} is too short: agents heartbeat every second; use 2s or more"
        ));
    }
    Ok(d)
}

/// A wait that must not be zero.
fn parse_nonzero_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(format!(
            "{s:?} is zero: give a positive duration (e.g. 60s)"
        ));
    }
    Ok(d)
}

/// `coordinator` settings.
#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// How long an attempt may wait for a live agent that can run its task.
    #[arg(long, env = "PINAZU_SCHEDULE_TIMEOUT", default_value = "60s", value_parser = parse_nonzero_duration, allow_hyphen_values = true)]
    pub schedule_timeout: Duration,
    /// An agent silent this long is declared dead and its attempts run elsewhere.
    #[arg(long, env = "PINAZU_DEAD_AFTER", default_value = "3s", value_parser = parse_dead_after, allow_hyphen_values = true)]
    pub dead_after: Duration,
    /// Where runs are journaled: JetStream (file storage; any coordinator on this NATS can
    /// resume them) or the local --journal-dir.
    #[arg(long, env = "PINAZU_JOURNAL", value_enum, default_value = "jetstream")]
    pub journal: JournalBackend,
    /// Copies of each JetStream stream (journal, runs history, leases), one per server
    /// of a NATS cluster: 3 on a 3-node cluster survives the loss of one node. Streams
    /// found with fewer are raised to it.
    #[arg(long, env = "PINAZU_JS_REPLICAS", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=5))]
    pub js_replicas: u8,
    /// Serve the dashboard, its JSON API and `/metrics` on this address (default
    /// 127.0.0.1:8233; when that is taken, the coordinator runs without one and says so).
    #[arg(long, env = "PINAZU_HTTP", value_name = "ADDR")]
    pub http: Option<std::net::SocketAddr>,
    /// Serve no dashboard and no `/metrics`.
    #[arg(long, env = "PINAZU_NO_HTTP", conflicts_with = "http", value_parser = clap::builder::FalseyValueParser::new())]
    pub no_http: bool,
    /// Size a named limit tasks use (`#[task(limit = "openai")]`): NAME=N (at most N
    /// attempts at once), NAME=N/s (also /min, /h; `,burst=B`), or NAME=N,M/s. Repeat
    /// for several. With the JetStream journal it is stored for every coordinator
    /// (overriding what was stored); change it at run time with `limits set`.
    #[arg(long = "limit", value_name = "NAME=SIZE", value_parser = crate::cli::parse_limit_arg)]
    pub limits: Vec<(String, pinazu_shared::options::NamedLimit)>,
}

/// `schedule` settings.
#[derive(Args, Debug, Clone)]
pub struct ScheduleArgs {
    /// What to do.
    #[command(subcommand)]
    pub op: ScheduleCmd,
}

/// `schedule` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum ScheduleCmd {
    /// Define a schedule: its flow runs at every fire (each fire's run id is derived
    /// from the schedule and the fire time, so a fire is one run whatever fails).
    Add {
        /// Its name (letters, digits, `_`, `-`).
        name: String,
        /// The flow it runs.
        #[arg(long)]
        flow: String,
        /// When: a cron expression (5 fields, or 6 with seconds first; `@hourly`, ...).
        #[arg(long, conflicts_with = "every", required_unless_present = "every")]
        cron: Option<String>,
        /// Or every so often (fires at multiples of it since the Unix epoch), e.g. 5m.
        #[arg(long, value_parser = parse_nonzero_duration)]
        every: Option<Duration>,
        /// The flow's parameters, as a JSON object.
        #[arg(long)]
        input: Option<String>,
        /// When a fire comes while the previous run still runs: skip (default),
        /// buffer-one, buffer-all, cancel-other, allow-all.
        #[arg(long, default_value = "skip", value_parser = pinazu_shared::schedule::Overlap::parse)]
        overlap: pinazu_shared::schedule::Overlap,
        /// Fires missed while no coordinator ran, at most this long ago, still start
        /// (under the overlap policy); older ones are skipped.
        #[arg(long, default_value = "365d", value_parser = parse_nonzero_duration)]
        catchup: Duration,
        /// Each fire starts up to this much later (the same delay on every
        /// coordinator).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        jitter: Duration,
        /// The cron's time zone (IANA name, e.g. Europe/Paris; default UTC).
        #[arg(long)]
        timezone: Option<String>,
        /// Replace a schedule of that name.
        #[arg(long)]
        replace: bool,
    },
    /// The schedules: when they fire next, their last fires.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pause a schedule: no fire until resumed.
    Pause {
        /// The schedule.
        name: String,
    },
    /// Resume a schedule (fires due while it was paused are not caught up).
    Resume {
        /// The schedule.
        name: String,
    },
    /// Delete a schedule (its runs go on).
    Delete {
        /// The schedule.
        name: String,
    },
    /// Start the runs of every fire time between two times, as if it had fired then
    /// (a fire backfilled twice is one run).
    Backfill {
        /// The schedule.
        name: String,
        /// From: RFC 3339 (2026-11-30T10:00:00Z), ms since the Unix epoch, or a
        /// duration ago (-1h).
        #[arg(long, allow_hyphen_values = true, value_parser = parse_time)]
        from: u64,
        /// To (inclusive), as --from; `now` too.
        #[arg(long, allow_hyphen_values = true, value_parser = parse_time)]
        to: u64,
    },
}

/// A point in time for `schedule backfill`: RFC 3339, ms since the Unix epoch, `now`,
/// or a duration ago (`-1h`).
fn parse_time(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let now = pinazu_shared::events::now_ms();
    if s == "now" {
        return Ok(now);
    }
    if let Some(ago) = s.strip_prefix('-') {
        let d = humantime::parse_duration(ago).map_err(|e| format!("{s:?}: {e}"))?;
        return Ok(now.saturating_sub(d.as_millis() as u64));
    }
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| {
            format!("{s:?} is not a time ({e}): use RFC 3339 (2026-11-30T10:00:00Z), ms since the epoch, now, or -1h")
        })
        .and_then(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .map_err(|_| format!("{s:?} is before 1970"))
        })
}

/// `limits` settings.
#[derive(Args, Debug, Clone)]
pub struct LimitsArgs {
    /// What to do.
    #[command(subcommand)]
    pub op: LimitsCmd,
}

/// `limits` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum LimitsCmd {
    /// The named limits, and the limits in use with their running and waiting attempts
    /// (as the answering coordinator counts them).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Size a named limit for every coordinator: N (at most N at once), N/s (also /min,
    /// /h; `,burst=B`), or N,M/s.
    Set {
        /// The limit's name.
        name: String,
        /// Its size.
        size: String,
    },
    /// Remove a named limit: attempts waiting for it run; tasks that use it fail until it
    /// is set again.
    Rm {
        /// The limit's name.
        name: String,
    },
}

/// The dashboard's address when `--http` is not given.
pub const DEFAULT_HTTP: &str = "127.0.0.1:8233";

/// Journal backends of the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum JournalBackend {
    /// NATS JetStream, file storage.
    Jetstream,
    /// Files in --journal-dir.
    Local,
}

/// `agent` settings.
#[derive(Args, Debug, Clone)]
pub struct AgentArgs {
    /// Attempts this agent runs at once (more wait in its queue). Tasks are async: a
    /// slot bounds concurrency, it is not a thread (see the README, "Choosing --slots").
    #[arg(long, env = "PINAZU_SLOTS", default_value_t = 64, value_parser = crate::cli::at_least_one, allow_negative_numbers = true)]
    pub slots: u32,
    /// Labels tasks may require, `k=v` (repeat or comma separate).
    #[arg(long, value_delimiter = ',')]
    pub labels: Vec<String>,
    /// This agent's id (letters, digits, `-`, `_`); default `<host>-<pid>-<random>`.
    #[arg(long, env = "PINAZU_AGENT_ID")]
    pub agent_id: Option<String>,
    /// On SIGTERM, how long running attempts may take to finish.
    #[arg(long, default_value = "30s", value_parser = parse_duration, allow_hyphen_values = true)]
    pub drain_timeout: Duration,
    /// Serve this agent's Prometheus metrics on this address (`/metrics`).
    #[arg(long, env = "PINAZU_AGENT_METRICS", value_name = "ADDR")]
    pub metrics: Option<std::net::SocketAddr>,
}

/// `run` settings.
#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    /// The flow (default: the program's only flow).
    pub flow_name: Option<String>,
    /// Run settings shared with embedded mode.
    #[command(flatten)]
    pub run: RunArgs,
    /// Print the run id and return without waiting.
    #[arg(long)]
    pub detach: bool,
    /// Submitting again with the same key (same flow, same parameters) returns the same
    /// run; with other parameters it is refused. Without --flow-run-id the run id is
    /// derived from the key, so the key keeps its meaning across coordinator restarts.
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

/// A command about one run.
#[derive(Args, Debug, Clone)]
pub struct RunIdArgs {
    /// The run id.
    pub flow_run_id: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `logs` settings.
#[derive(Args, Debug, Clone)]
pub struct LogsArgs {
    /// The run id.
    pub flow_run_id: String,
    /// Only this task's calls.
    #[arg(long)]
    pub task: Option<String>,
    /// Keep printing the logs of attempts as they end, until the run ends.
    #[arg(long, short = 'f')]
    pub follow: bool,
}

/// A listing command.
#[derive(Args, Debug, Clone)]
pub struct ListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `runs` options.
#[derive(Args, Debug, Clone)]
pub struct RunsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// At most this many runs (the most recent).
    #[arg(long, default_value_t = 50, value_parser = crate::cli::at_least_one)]
    pub limit: u32,
    /// Only runs with this status (RUNNING, SUCCESS, FAILED).
    #[arg(long, value_parser = parse_status)]
    pub status: Option<FlowStatus>,
    /// Only runs of this flow.
    #[arg(long)]
    pub flow: Option<String>,
    /// Only runs started or ended within this long (e.g. 1h, 30m, 2d).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
}

fn parse_status(s: &str) -> Result<FlowStatus, String> {
    match s.trim().to_ascii_uppercase().as_str() {
        "RUNNING" => Ok(FlowStatus::Running),
        "SUCCESS" => Ok(FlowStatus::Success),
        "FAILED" => Ok(FlowStatus::Failed),
        "PENDING" => Ok(FlowStatus::Pending),
        "SCHEDULED" => Ok(FlowStatus::Scheduled),
        other => Err(format!(
            "{other:?} is not a run status: RUNNING, SUCCESS or FAILED"
        )),
    }
}

/// Runs one subcommand.
pub(crate) async fn run_command(
    cli: &Cli,
    cmd: &Command,
    registry: &'static Registry,
    params: Vec<(String, Value)>,
) -> ExitCode {
    if let Command::Cache(a) = cmd {
        return cache(cli, a).await;
    }
    if let Command::Journal(a) = cmd {
        return journal(cli, a).await;
    }
    let url = match require_nats(cli) {
        Ok(u) => u,
        Err(code) => return code,
    };
    match cmd {
        Command::Coordinator(a) => coordinator(cli, a, &url, registry).await,
        Command::Agent(a) => agent(cli, a, &url, registry).await,
        Command::Run(a) => submit(cli, a, &url, registry, params).await,
        Command::Status(a) => one_run(cli, a, &url, false).await,
        Command::Cancel(a) => one_run(cli, a, &url, true).await,
        Command::Runs(a) => {
            let since_ms = a.since.map(|d| {
                std::time::SystemTime::now()
                    .checked_sub(d)
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |t| t.as_millis() as u64)
            });
            let q = pinazu_shared::api::RunsQuery {
                limit: a.limit,
                status: a.status,
                flow: a.flow.clone(),
                since_ms,
                before_ms: None,
            };
            list(cli, a.json, &url, Some(q)).await
        }
        Command::Agents(a) => list(cli, a.json, &url, None).await,
        Command::Logs(a) => logs(cli, a, &url).await,
        Command::Limits(a) => limits(cli, a, &url).await,
        Command::Schedule(a) => schedule(cli, a, &url).await,
        Command::Cache(_) | Command::Journal(_) => unreachable!("handled above"),
    }
}

/// `journal` commands.
#[derive(Args, Debug, Clone)]
pub struct JournalArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: JournalAction,
}

/// Journal actions.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum JournalAction {
    /// Print a run's journal entries.
    Show {
        /// The run id.
        flow_run_id: String,
        /// One JSON object per entry.
        #[arg(long)]
        json: bool,
    },
    /// Remove a run's journal: the id is forgotten (its next start runs everything).
    Rm {
        /// The run id.
        flow_run_id: String,
        /// Remove it even while a coordinator runs it (the run then cannot resume).
        #[arg(long)]
        force: bool,
    },
}

/// The journals a run may be in: the local directory, and JetStream when NATS_URL is
/// set (embedded runs journal locally, the coordinator in JetStream).
async fn journals(
    cli: &Cli,
) -> Result<Vec<(String, Arc<dyn pinazu_coordinator::journal::Journal>)>, ExitCode> {
    let mut found: Vec<(String, Arc<dyn pinazu_coordinator::journal::Journal>)> = Vec::new();
    if cli.journal_dir.is_dir() {
        let local = pinazu_coordinator::journal::LocalJournal::open(&cli.journal_dir)
            .map_err(usage_error)?;
        found.push((
            format!("dir:{}", cli.journal_dir.display()),
            Arc::new(local),
        ));
    }
    if let Some(url) = cli
        .nats
        .nats_url
        .as_deref()
        .filter(|u| !u.trim().is_empty())
    {
        let client = connect(cli, url, "pinazu-cli").await?;
        let subjects = nats_subjects(cli);
        // the coordinator's streams if there are any: an operator command creates none.
        // A user NATS does not let use JetStream (the `client` user of
        // scripts/nats-auth.conf) is told so at once, not after a timeout
        let opened = pinazu_coordinator::journal_js::JetStreamJournal::open_existing(
            client,
            subjects.prefix(),
        );
        let refused = async {
            loop {
                if let Some(r) = pinazu_shared::nats::refusals()
                    .into_iter()
                    .find(|r| r.contains("$JS.API"))
                {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        let opened = tokio::select! {
            o = opened => o.map_err(|e| e.to_string()),
            r = refused => Err(format!("NATS does not let this user use JetStream ({r}): the journal commands need the coordinator's user (scripts/nats-auth.conf)")),
        };
        match opened {
            Ok(Some(js)) => found.push((
                format!("JetStream ({} streams)", subjects.prefix()),
                Arc::new(js),
            )),
            Ok(None) => {}
            // the local journal still answers
            Err(e) if !found.is_empty() => {
                tracing::warn!("JetStream journal not looked at: {e}")
            }
            Err(e) => return Err(usage_error(e)),
        }
    }
    Ok(found)
}

async fn journal(cli: &Cli, a: &JournalArgs) -> ExitCode {
    let (raw, show_json) = match &a.action {
        JournalAction::Show { flow_run_id, json } => (flow_run_id, Some(*json)),
        JournalAction::Rm { flow_run_id, .. } => (flow_run_id, None),
    };
    let id = match FlowRunId::parse(raw, "the RUN argument") {
        Ok(id) => id,
        Err(e) => return usage_error(e),
    };
    if let (JournalAction::Rm { force: false, .. }, Some(url)) = (
        &a.action,
        cli.nats
            .nats_url
            .as_deref()
            .filter(|u| !u.trim().is_empty()),
    ) {
        // a run a coordinator is running keeps its journal (the local journal's lock
        // says the same for embedded runs)
        let client = match connect(cli, url, "pinazu-cli").await {
            Ok(c) => c,
            Err(code) => return code,
        };
        let asked = ask(
            &client,
            &nats_subjects(cli),
            "status",
            &ApiRequest::Status { flow_run_id: id },
        )
        .await;
        if let Ok(ApiReply::Run(run)) = asked {
            if !matches!(
                run.status,
                pinazu_shared::events::FlowStatus::Success
                    | pinazu_shared::events::FlowStatus::Failed
            ) {
                return usage_error(format!(
                    "flow run {id} is running on the coordinator: cancel it first (`cancel {id}`), or remove its journal anyway with --force (it then cannot resume)"
                ));
            }
        }
    }
    let journals = match journals(cli).await {
        Ok(j) => j,
        Err(code) => return code,
    };
    let mut any = false;
    for (place, j) in journals {
        match show_json {
            Some(json) => {
                let entries = match j.read(id).await {
                    Ok(e) => e,
                    Err(e) => return usage_error(format!("{place}: {e}")),
                };
                if entries.is_empty() {
                    continue;
                }
                any = true;
                if !json {
                    out!(
                        "journal of flow run {id} in {place}: {} entries",
                        entries.len()
                    );
                }
                for (i, e) in entries.iter().enumerate() {
                    let v = journal_entry_json(e);
                    if json {
                        out!("{v}");
                    } else {
                        out!("  {i:>5}  {}", describe_entry(&v));
                    }
                }
            }
            None => match j.remove(id).await {
                Ok(true) => {
                    any = true;
                    out!("removed the journal of flow run {id} from {place}");
                }
                Ok(false) => {}
                Err(e) => return usage_error(format!("{place}: {e}")),
            },
        }
    }
    if any {
        ExitCode::SUCCESS
    } else {
        usage_error(format!(
            "no journal of flow run {id} (looked in --journal-dir {}{})",
            cli.journal_dir.display(),
            if cli.nats.nats_url.is_some() {
                " and JetStream"
            } else {
                "; set NATS_URL to look in the coordinator's JetStream journal too"
            }
        ))
    }
}

/// A journal entry as JSON for people: results decoded from MessagePack.
fn journal_entry_json(e: &pinazu_coordinator::journal::JournalEntry) -> Value {
    use pinazu_coordinator::journal::JournalEntry as E;
    match e {
        E::RunStarted {
            flow,
            params,
            idempotency_key,
            ..
        } => serde_json::json!({
            "entry": "RunStarted", "flow": flow, "params": params,
            "idempotency_key": idempotency_key,
        }),
        E::CallEnded {
            ordinal,
            call_id,
            task,
            outcome,
            executions,
            outcome_ref,
        } => {
            let (result, error) = match outcome {
                Ok(bytes) if outcome_ref.is_none() => (
                    rmp_serde::from_slice::<Value>(bytes)
                        .unwrap_or_else(|e| Value::String(format!("<undecodable: {e}>"))),
                    Value::Null,
                ),
                Ok(_) => (Value::Null, Value::Null),
                Err(info) => (Value::Null, Value::String(info.to_string())),
            };
            serde_json::json!({
                "entry": "CallEnded", "ordinal": ordinal, "call_id": call_id.to_string(),
                "task": task, "ok": outcome.is_ok(), "result": result, "error": error,
                "result_ref": outcome_ref, "executions": executions,
            })
        }
        E::RunEnded {
            status, summary, ..
        } => serde_json::json!({
            "entry": "RunEnded", "status": status,
            "error": summary.as_ref().and_then(|s| s.error.clone()),
        }),
    }
}

/// One line per journal entry.
fn describe_entry(v: &Value) -> String {
    let cut = |v: &Value| {
        let mut t = v.to_string();
        if t.len() > 80 {
            let mut end = 80;
            while !t.is_char_boundary(end) {
                end -= 1;
            }
            t.truncate(end);
            t.push('…');
        }
        t
    };
    match v["entry"].as_str() {
        Some("RunStarted") => format!(
            "RunStarted  flow {}  params {}",
            v["flow"],
            cut(&v["params"])
        ),
        Some("CallEnded") if v["ok"] == true => format!(
            "CallEnded   #{} {} ({})  ok  {}",
            v["ordinal"],
            v["task"].as_str().unwrap_or(""),
            v["call_id"].as_str().unwrap_or(""),
            cut(&v["result"])
        ),
        Some("CallEnded") => format!(
            "CallEnded   #{} {} ({})  FAILED  {}",
            v["ordinal"],
            v["task"].as_str().unwrap_or(""),
            v["call_id"].as_str().unwrap_or(""),
            v["error"].as_str().unwrap_or("")
        ),
        Some("RunEnded") => format!("RunEnded    {}", v["status"].as_str().unwrap_or("")),
        _ => v.to_string(),
    }
}

/// `cache` commands.
#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    /// What to do.
    #[command(subcommand)]
    pub action: CacheAction,
}

/// Cache actions.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum CacheAction {
    /// Remove cache entries: of a task (every policy, every run), of a run, or all.
    Clear {
        /// Entries of this task (repeatable).
        #[arg(long)]
        task: Vec<String>,
        /// Entries of this flow run (`run` policy).
        #[arg(long)]
        run: Vec<String>,
        /// Every entry.
        #[arg(long)]
        all: bool,
    },
}

async fn cache(cli: &Cli, a: &CacheArgs) -> ExitCode {
    let CacheAction::Clear { task, run, all } = &a.action;
    if !*all && task.is_empty() && run.is_empty() {
        return usage_error("say what to clear: --task NAME, --run RUN_ID or --all");
    }
    let store = match open_store(cli).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let fail = |e: pinazu_shared::error::StoreError| {
        usage_error(format!("cache clear on {}: {e}", store.describe()))
    };
    let mut removed = 0u64;
    if *all {
        match store.delete_prefix("result_cache/").await {
            Ok(n) => removed += n,
            Err(e) => return fail(e),
        }
    }
    for r in run {
        let id = match FlowRunId::parse(r, "--run") {
            Ok(id) => id,
            Err(e) => return usage_error(e),
        };
        let prefix = format!("{}/", pinazu_shared::cache::run_prefix(id));
        match store.delete_prefix(&prefix).await {
            Ok(n) => removed += n,
            Err(e) => return fail(e),
        }
    }
    if !task.is_empty() {
        let keys = match store.list("result_cache/").await {
            Ok(k) => k,
            Err(e) => return fail(e),
        };
        for key in keys {
            let parts: Vec<&str> = key.split('/').collect();
            // result_cache/flow-<run>/tasks/<task>/<md5>.json
            // result_cache/inputs/<task>/v<version>/<md5>.json
            let name = match parts.as_slice() {
                ["result_cache", "inputs", t, _, _] => Some(*t),
                ["result_cache", _, "tasks", t, _] => Some(*t),
                _ => None,
            };
            if name.is_some_and(|n| task.iter().any(|t| t == n)) {
                if let Err(e) = store.delete(&key).await {
                    return fail(e);
                }
                removed += 1;
            }
        }
    }
    out!("removed {removed} cache entries from {}", store.describe());
    ExitCode::SUCCESS
}

pub(crate) async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn coordinator(
    cli: &Cli,
    a: &CoordinatorArgs,
    url: &str,
    registry: &'static Registry,
) -> ExitCode {
    stop_guard(COORDINATOR_STOP_BOUND, "coordinator");
    // a stop while waiting for NATS is a stop
    let client = tokio::select! {
        c = connect(cli, url, "pinazu-coordinator") => match c {
            Ok(c) => c,
            Err(code) => return code,
        },
        _ = shutdown_signal() => return ExitCode::SUCCESS,
    };
    let subjects = nats_subjects(cli);
    // the dashboard's address is taken first: one given that cannot be had stops the
    // coordinator before it takes any run; the default one taken by another process
    // (several coordinators on one host) only means no dashboard here
    let http = match (a.no_http, a.http) {
        (true, _) => None,
        (false, Some(addr)) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                return usage_error(format!(
                    "--http {addr}: {e} (give another address, or --no-http)"
                ))
            }
        },
        (false, None) => match tokio::net::TcpListener::bind(DEFAULT_HTTP).await {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(address = DEFAULT_HTTP, error = %e, "no dashboard on the default address (another coordinator on this host?); give --http ADDR for one, or --no-http to say none is wanted");
                None
            }
        },
    };
    let publisher = Publisher::start(client.clone());
    let default_cache = match RuntimeConfig::from_env() {
        Ok(c) => c.default_cache,
        Err(e) => return usage_error(e),
    };
    let js_journal = !cli.no_journal && a.journal != JournalBackend::Local;
    if !js_journal {
        // a coordinator without the JetStream journal runs alone: next to others it
        // would take a share of their requests and not know their runs
        let others =
            pinazu_coordinator::ha::live_coordinators(client.clone(), subjects.prefix()).await;
        if !others.is_empty() {
            return usage_error(format!(
                "coordinators with the JetStream journal already serve this NATS (prefix {:?}): {}. A coordinator with --journal local or --no-journal must be alone: use the JetStream journal to join them, or another --subject-prefix",
                subjects.prefix(),
                others.join(", ")
            ));
        }
    }
    let flow_log_publisher = publisher.clone();
    let flow_log_subjects = subjects.clone();
    let (cancel_client, cancel_subject) = (client.clone(), subjects.api("cancel"));
    let remote_cancel = pinazu_coordinator::RemoteCancelHandle(Some(Arc::new(move |run| {
        let (client, subject) = (cancel_client.clone(), cancel_subject.clone());
        tokio::spawn(async move {
            let req = ApiRequest::Cancel { flow_run_id: run };
            if let Ok(body) = pinazu_shared::codec::encode_envelope(&req) {
                let _ = tokio::time::timeout(
                    Duration::from_secs(15),
                    client.request(subject, Bytes::from(body)),
                )
                .await;
            }
        });
    })));
    let mut config = CoordinatorConfig {
        keep_call_logs: true,
        // a flow body's own log lines go to its run's log subject, which `run` prints
        flow_logs: pinazu_coordinator::FlowLogHandle(Some(Arc::new(move |run, line: String| {
            flow_log_publisher.publish(flow_log_subjects.run_log(run), Bytes::from(line));
        }))),
        default_cache,
        refresh_cache: cli.refresh_cache,
        journal: if cli.no_journal {
            pinazu_coordinator::JournalHandle::default()
        } else if a.journal == JournalBackend::Local {
            match open_journal(cli) {
                Ok(Some(j)) => pinazu_coordinator::JournalHandle(j),
                Ok(None) => pinazu_coordinator::JournalHandle::default(),
                Err(code) => return code,
            }
        } else {
            if client.server_info().cluster.is_some() && a.js_replicas == 1 {
                tracing::warn!("NATS is a cluster but --js-replicas is 1: streams this coordinator creates keep one copy (those found keep theirs), and losing the server that holds a one-copy stream stops every run until it is back; give --js-replicas 3");
            }
            match open_js_journal(cli, &client, subjects.prefix(), a.js_replicas.into()).await {
                Ok(j) => pinazu_coordinator::JournalHandle(Arc::new(j)),
                Err(e) => return usage_error(e),
            }
        },
        timing: SchedulerTiming {
            dead_after: a.dead_after,
            schedule_timeout: a.schedule_timeout,
            ..SchedulerTiming::default()
        },
        limits: a.limits.clone(),
        remote_cancel,
        ..CoordinatorConfig::default()
    };
    // with the journal in JetStream any number of coordinators can share NATS: each
    // owns the runs it started, and takes over those of one that dies
    let leases = if js_journal {
        let me = pinazu_coordinator::ha::CoordLease {
            coordinator: process_id("coordinator"),
            epoch: 0,
            host: host_name(),
            pid: std::process::id(),
            since: pinazu_shared::events::now_timestamp(),
        };
        // (tried again for a while: JetStream may be electing a leader, e.g. after a
        // cluster node was lost)
        let mut tries = 0;
        let opened = loop {
            tries += 1;
            match pinazu_coordinator::ha::Leases::open(
                client.clone(),
                subjects.prefix(),
                me.clone(),
                a.js_replicas.into(),
            )
            .await
            {
                Err(e) if tries < 15 => {
                    tracing::warn!(error = %e, "the coordinators' lease streams are not usable yet; trying again");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                r => break r,
            }
        };
        match opened {
            Ok(l) => {
                let l = Arc::new(l);
                // renewed from now on (resuming runs may take a while), on a thread and
                // a connection of its own
                let config = cli.nats.config(url, "pinazu-coordinator-lease", true);
                l.keep_renewing(move || async move { config.connect().await.ok() });
                Some(l)
            }
            Err(e) => return usage_error(e),
        }
    } else {
        None
    };
    config.ownership = pinazu_coordinator::OwnershipHandle(leases.clone());
    let store = match open_store(cli).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let payload_store = store.clone();
    let payloads = Payloads {
        store: store.clone(),
        threshold: payload_threshold(cli, &client),
    };
    let link = Arc::new(NatsAgentLink::new(
        publisher.clone(),
        client.clone(),
        subjects.clone(),
        client.server_info().max_payload,
        payloads.clone(),
    ));
    let coordinator = match Coordinator::start(
        config,
        link.clone(),
        store,
        Arc::new(NatsEventSink::new(publisher.clone())),
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return usage_error(format!("could not start the coordinator: {e}")),
    };
    link.report_failures_to(coordinator.result_sink());
    // named limits: stored in JetStream for every coordinator, loaded before any run
    // resumes (an attempt of a limit not yet known would fail)
    let limit_store = if js_journal {
        match pinazu_coordinator::nats::limits::LimitStore::open(
            client.clone(),
            subjects.prefix(),
            a.js_replicas.into(),
            coordinator.clone(),
            &a.limits,
        )
        .await
        {
            Ok(s) => Some(s),
            Err(e) => return usage_error(e),
        }
    } else {
        None
    };
    let schedule_store = if js_journal {
        match pinazu_coordinator::nats::schedules::ScheduleStore::open(
            client.clone(),
            subjects.prefix(),
            a.js_replicas.into(),
        )
        .await
        {
            Ok(s) => Some(s),
            Err(e) => return usage_error(e),
        }
    } else {
        None
    };
    if let Some(l) = &leases {
        link.guard_with(l.clone());
        tracing::info!(coordinator = l.me(), peers = ?l.live(), "coordinator lease taken");
    }
    // runs the journal holds unfinished (the coordinator was killed) resume first, so
    // that what agents hand back after the hello below finds its runner; each body waits
    // a heartbeat period and a bit, in which agents send the results the previous
    // process did not acknowledge and list the attempts they still run
    let (resumed, failed) = coordinator
        .resume_unfinished(registry, AGENT_HEARTBEAT + Duration::from_millis(500))
        .await;
    let counters = match serve(
        coordinator.clone(),
        client.clone(),
        subjects.clone(),
        registry,
        publisher.clone(),
        payloads,
        pinazu_coordinator::nats::Kept {
            limits: limit_store,
            schedules: schedule_store,
        },
    )
    .await
    {
        Ok(c) => c,
        Err(e) => return usage_error(format!("could not subscribe on NATS: {e}")),
    };
    publisher.publish(subjects.hello(), Bytes::new());
    // back from a NATS outage, however short: report batches agents sent meanwhile may
    // be lost on the way here; they send every unacknowledged one again (before their
    // attempts, missing from heartbeats, are taken for lost and run twice)
    {
        let (publisher, subjects) = (publisher.clone(), subjects.clone());
        tokio::spawn(async move {
            let mut seen = pinazu_shared::nats::outage::reconnects();
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let now = pinazu_shared::nats::outage::reconnects();
                if now != seen {
                    seen = now;
                    publisher.publish(subjects.hello(), Bytes::new());
                }
            }
        });
    }
    coordinator
        .metrics()
        .register_collector(pinazu_coordinator::metrics::NatsCollector(
            client.statistics(),
        ));
    if let Some(listener) = http {
        let backend = crate::dashboard::Backend::Nats {
            client: client.clone(),
            subjects: subjects.clone(),
            coordinator: coordinator.clone(),
        };
        match crate::dashboard::serve_on(listener, backend) {
            Ok(addr) => {
                tracing::info!(url = %format!("http://{addr}/"), "dashboard and /metrics served")
            }
            Err(e) => tracing::warn!(error = %e, "the dashboard could not be served"),
        }
    }
    for id in &resumed {
        pinazu_coordinator::nats::watch_run(
            coordinator.clone(),
            *id,
            subjects.clone(),
            publisher.clone(),
            payload_store.clone(),
        );
    }
    for (id, why) in &failed {
        tracing::error!(flow_run_id = %id, error = %why, "an unfinished run could not be resumed");
    }
    if !resumed.is_empty() {
        tracing::info!(
            runs = resumed.len(),
            "resumed unfinished runs from the journal"
        );
    }
    tracing::info!(nats = %pinazu_shared::redact::redact(url), prefix = subjects.prefix(), flows = ?registry.flow_names(), "coordinator serving");
    tokio::select! {
        _ = shutdown_signal() => {}
        why = coordinator.core_failure() => {
            // fail loudly: the service supervisor restarts the process, which resumes
            // every run from the journal (nothing journaled runs again)
            eprintln!("error: {}", pinazu_shared::redact::redact(&why));
            return ExitCode::from(70);
        }
    }
    if let Some(l) = &leases {
        // the others take this one's runs over now, not in 3 s
        let _ = tokio::time::timeout(Duration::from_secs(1), l.resign()).await;
    }
    tracing::info!(
        dropped_messages = counters.drops.count(),
        "coordinator stopping"
    );
    // events already published are delivered, if NATS takes them within seconds
    let flushed = tokio::time::timeout(Duration::from_secs(5), async {
        coordinator.flush_events().await;
        publisher.flush().await;
    })
    .await;
    if flushed.is_err() {
        tracing::warn!(
            "could not deliver the last events within 5 s (NATS unreachable); stopping anyway"
        );
    }
    ExitCode::SUCCESS
}

/// The JetStream journal, waiting for JetStream as for NATS itself (a cluster may
/// still be electing its leader; start order does not matter) up to --connect-timeout.
async fn open_js_journal(
    cli: &Cli,
    client: &async_nats::Client,
    prefix: &str,
    replicas: usize,
) -> Result<pinazu_coordinator::journal_js::JetStreamJournal, String> {
    use pinazu_coordinator::journal_js::JetStreamJournal;
    let deadline = match cli.nats.connect_timeout {
        Some(crate::cli::Wait::At(d)) => Some(tokio::time::Instant::now() + d),
        _ => None,
    };
    let started = tokio::time::Instant::now();
    let mut logged: Option<tokio::time::Instant> = None;
    let mut wait = Duration::from_millis(500);
    loop {
        match JetStreamJournal::open(client.clone(), prefix, replicas).await {
            Ok(j) => {
                if logged.is_some() {
                    tracing::info!(waited_s = started.elapsed().as_secs(), "JetStream is ready");
                }
                return Ok(j);
            }
            Err(e) => {
                let now = tokio::time::Instant::now();
                if deadline.is_some_and(|d| now + wait > d) {
                    return Err(format!(
                        "{e} (waited {} s; --connect-timeout)",
                        started.elapsed().as_secs()
                    ));
                }
                if logged.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30)) {
                    tracing::warn!(error = %e, "waiting for JetStream (the journal's streams); retrying");
                    logged = Some(now);
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// After the first stop signal: a second one ends the process at once, and a watchdog
/// ends it if stopping takes longer than `bound` (nothing may keep a service from
/// stopping: a supervisor's stop must work).
pub(crate) fn arm_stop(bound: Duration, what: &'static str) {
    tokio::spawn(async move {
        shutdown_signal().await;
        eprintln!("{what}: second stop signal: exiting now");
        std::process::exit(130);
    });
    std::thread::spawn(move || {
        std::thread::sleep(bound);
        eprintln!(
            "{what}: still stopping after {} s: exiting now",
            bound.as_secs()
        );
        std::process::exit(1);
    });
}

/// How long a coordinator may take to stop after a signal.
const COORDINATOR_STOP_BOUND: Duration = Duration::from_secs(15);

/// Stop signals seen by [`stop_guard`]'s handler.
static STOP_SIGNALS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Makes the process stoppable whatever its async runtime does (tasks that block every
/// worker thread would otherwise keep tokio from seeing a signal): a signal handler
/// counts SIGTERM/SIGINT and a thread of its own ends the process on the second signal,
/// or `bound` after the first.
pub(crate) fn stop_guard(bound: Duration, what: &'static str) {
    #[cfg(unix)]
    {
        use std::sync::atomic::Ordering::SeqCst;
        use tokio::signal::unix::SignalKind;
        for kind in [SignalKind::terminate(), SignalKind::interrupt()] {
            // SAFETY: the handler only increments an atomic (async-signal-safe)
            let registered = unsafe {
                signal_hook_registry::register(kind.as_raw_value(), || {
                    STOP_SIGNALS.fetch_add(1, SeqCst);
                })
            };
            if let Err(e) = registered {
                tracing::warn!(error = %e, "could not watch stop signals outside the runtime");
                return;
            }
        }
        std::thread::Builder::new()
            .name("pinazu-stop-guard".into())
            .spawn(move || {
                let mut first: Option<std::time::Instant> = None;
                loop {
                    std::thread::sleep(Duration::from_millis(50));
                    let seen = STOP_SIGNALS.load(SeqCst);
                    if seen >= 2 {
                        eprintln!("{what}: second stop signal: exiting now");
                        std::process::exit(130);
                    }
                    if seen == 1 {
                        let at = *first.get_or_insert_with(std::time::Instant::now);
                        if at.elapsed() >= bound {
                            eprintln!(
                                "{what}: still stopping after {} s: exiting now",
                                bound.as_secs()
                            );
                            std::process::exit(1);
                        }
                    }
                }
            })
            .ok();
    }
}

/// How long `run` waits for a coordinator to serve before giving up.
const START_WAIT: Duration = Duration::from_secs(30);

/// How often agents heartbeat.
const AGENT_HEARTBEAT: Duration = Duration::from_secs(1);

/// The size above which payloads go by reference: the flag, or half the server's limit.
fn payload_threshold(cli: &Cli, client: &async_nats::Client) -> usize {
    let max = client.server_info().max_payload.max(1024);
    cli.payload_threshold.unwrap_or(max / 2).min(max - 512)
}

fn default_agent_id() -> String {
    process_id("agent")
}

/// This host's name, as a subject token.
fn host_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    host.trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// `<host>-<pid>-<random>`: distinct across hosts with one name (containers) and pid
/// reuse.
fn process_id(fallback: &str) -> String {
    let host = host_name();
    format!(
        "{}-{}-{:04x}",
        if host.is_empty() { fallback } else { &host },
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() >> 4)
            & 0xffff
    )
}

async fn agent(cli: &Cli, a: &AgentArgs, url: &str, registry: &'static Registry) -> ExitCode {
    let id = a.agent_id.clone().unwrap_or_else(default_agent_id);
    if !valid_token(&id) {
        return usage_error(format!(
            "agent id {id:?} cannot stand in a NATS subject: use letters, digits, '-' and '_'"
        ));
    }
    let labels = match parse_labels(&a.labels) {
        Ok(l) => l,
        Err(e) => return usage_error(e),
    };
    let bound = a.drain_timeout + Duration::from_secs(10);
    stop_guard(bound, "agent");
    // a stop while waiting for NATS is a stop
    let name = format!("pinazu-agent-{id}");
    let client = tokio::select! {
        c = connect(cli, url, &name) => match c {
            Ok(c) => c,
            Err(code) => return code,
        },
        _ = shutdown_signal() => return ExitCode::SUCCESS,
    };
    let store = match open_store(cli).await {
        Ok(s) => s,
        Err(code) => return code,
    };
    let metrics = match a.metrics {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                let m = Arc::new(pinazu_agent::metrics::AgentMetrics::new(a.slots));
                m.watch_nats(client.statistics());
                match crate::dashboard::serve_metrics(listener, m.clone()) {
                    Ok(bound) => {
                        tracing::info!(url = %format!("http://{bound}/metrics"), "agent metrics served")
                    }
                    Err(e) => return usage_error(format!("--metrics {addr}: {e}")),
                }
                Some(m)
            }
            Err(e) => return usage_error(format!("--metrics {addr}: {e} (give another address)")),
        },
        None => None,
    };
    let cfg = AgentServeConfig {
        metrics,
        store,
        payload_threshold: payload_threshold(cli, &client),
        agent: AgentConfig {
            id: AgentId(id),
            slots: a.slots,
            labels,
            registry,
        },
        subjects: nats_subjects(cli),
        heartbeat: AGENT_HEARTBEAT,
        drain_timeout: a.drain_timeout,
    };
    // the signal is watched from now on by a task of its own (a second signal, and the
    // bound on draining, are `stop_guard`'s, armed above)
    let (stopped_tx, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stopped_tx.send(());
    });
    let stop = async move {
        let _ = stopped.await;
    };
    match serve_agent(client, cfg, stop).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => usage_error(e),
    }
}

/// Sends one API request to a coordinator that must be there now (a few seconds at most).
pub(crate) async fn ask(
    client: &async_nats::Client,
    subjects: &Subjects,
    verb: &str,
    req: &ApiRequest,
) -> Result<ApiReply, String> {
    tokio::time::timeout(Duration::from_secs(5), request(client, subjects, verb, req))
        .await
        .map_err(|_| "the coordinator did not answer within 5 s".to_string())?
}

/// Sends one API request and decodes the reply.
async fn request(
    client: &async_nats::Client,
    subjects: &Subjects,
    verb: &str,
    req: &ApiRequest,
) -> Result<ApiReply, String> {
    request_waiting(client, subjects, verb, req, Duration::ZERO).await
}

/// Sends one API request; while no coordinator serves (e.g. one is restarting and
/// resuming its runs), tries again for up to `wait`.
/// How long one try of an API request waits for its answer.
const TRY_WAIT: Duration = Duration::from_secs(5);
/// How long a try of `cancel` waits.
const CANCEL_WAIT: Duration = Duration::from_secs(15);
/// How long an API request is tried again when coordinators do not answer (a `cancel`
/// waits up to 10 s for its run to end: one try is longer than that).
const ANSWER_WAIT: Duration = Duration::from_secs(12);

pub(crate) async fn request_waiting(
    client: &async_nats::Client,
    subjects: &Subjects,
    verb: &str,
    req: &ApiRequest,
    wait: Duration,
) -> Result<ApiReply, String> {
    let body = Bytes::from(encode_envelope(req).map_err(|e| e.to_string())?);
    let deadline = tokio::time::Instant::now() + wait;
    // a coordinator that does not answer (stopped, dying) is skipped: with several, the
    // next try goes to another (requests are idempotent: a start names its run id)
    let answer_by = tokio::time::Instant::now() + wait.max(ANSWER_WAIT);
    let mut told = false;
    let msg = loop {
        // (a cancel is answered once its run ended: up to 10 s)
        let try_wait = if verb == "cancel" {
            CANCEL_WAIT
        } else {
            TRY_WAIT
        };
        let request = async_nats::Request::new()
            .payload(body.clone())
            .timeout(Some(try_wait));
        let reply = tokio::time::timeout(
            try_wait + Duration::from_secs(1),
            client.send_request(subjects.api(verb), request),
        )
        .await;
        let reply = match reply {
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => Err(()),
            Ok(r) => Ok(r),
            Err(_) => Err(()),
        };
        let reply = match reply {
            Ok(r) => r,
            Err(()) if tokio::time::Instant::now() < answer_by => {
                tracing::debug!(verb, "a coordinator did not answer; asking again");
                continue;
            }
            Err(()) => {
                return Err(format!(
                    "request to the coordinator failed: no answer within {} s",
                    wait.max(ANSWER_WAIT).as_secs()
                ))
            }
        };
        match reply {
            Ok(msg) => break msg,
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "no coordinator is serving on {} (start one with `coordinator`, same NATS_URL and subject prefix)",
                        subjects.api(verb)
                    ));
                }
                if !told {
                    told = true;
                    tracing::warn!(subject = %subjects.api(verb), "no coordinator is serving yet; waiting for one (up to {} s)", wait.as_secs());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(format!("request to the coordinator failed: {e}")),
        }
    };
    decode_envelope(&msg.payload).map_err(|e| format!("bad reply from the coordinator: {e}"))
}

async fn submit(
    cli: &Cli,
    a: &SubmitArgs,
    url: &str,
    registry: &'static Registry,
    params: Vec<(String, Value)>,
) -> ExitCode {
    let flow_run_id = match (a.run.flow_run_id.as_deref(), a.idempotency_key.as_deref()) {
        (None, Some(key)) => FlowRunId::of_key(key),
        (raw, _) => match run_id(raw) {
            Ok(id) => id,
            Err(e) => return usage_error(e),
        },
    };
    let named = a.flow_name.as_deref().or(a.run.flow.as_deref());
    let mut r = Rejecter::new(flow_run_id, named);
    let client = match try_connect(cli, url, "pinazu-run").await {
        Ok(c) => c,
        Err(e) => return r.reject(e, false).await,
    };
    r.sink = Some(Arc::new(NatsEventSink::new(Publisher::start(
        client.clone(),
    ))));
    let subjects = nats_subjects(cli);
    // the coordinator publishes a refused run's event: it knows whether the id is taken
    r.coordinator = Some((client.clone(), subjects.clone()));
    match EventContext::from_env() {
        Ok(events) => r.events = events,
        Err(e) => return r.reject(e, true).await,
    }
    let flow = match pick_flow(registry, named) {
        Ok(f) => f,
        Err(e) => return r.reject(format!("{e}: `run FLOW`"), true).await,
    };
    r.flow = flow.clone();
    let Some(def) = registry.flow(&flow) else {
        let e = format!(
            "flow `{flow}` is not defined in this program; flows: {}",
            registry.flow_names().join(", ")
        );
        return r.reject(e, true).await;
    };
    let params = match merge_params(def, a.run.input.as_deref(), params) {
        Ok(p) => p,
        Err(e) => return r.reject(e, true).await,
    };
    if let Err(e) = env_flag("ENABLE_S3_CACHING") {
        return r.reject(e, true).await;
    }
    // subscribe before starting, so the end cannot slip by (nor the flow body's first
    // log lines)
    let (mut done, mut progress, mut flow_log) = match (
        client.subscribe(subjects.run_done(flow_run_id)).await,
        client.subscribe(subjects.run_progress(flow_run_id)).await,
        client.subscribe(subjects.run_log(flow_run_id)).await,
    ) {
        (Ok(d), Ok(p), Ok(l)) => (d, p, l),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
            return r.reject(format!("could not subscribe: {e}"), true).await
        }
    };
    // the run's root span (feature `otel`): its trace is the run's (its status events'
    // `metadata.trace_id`), continued by the coordinator and the agents
    #[cfg(feature = "otel")]
    let _run_span = {
        let span = tracing::trace_span!(target: "pinazu::trace", "run", flow = %flow, flow_run_id = %flow_run_id);
        pinazu_shared::trace::child_of(&span, r.events.traceparent.as_deref());
        if let Some(tp) = pinazu_shared::trace::traceparent(&span) {
            r.events.trace_id = pinazu_shared::events::trace_id_of(&tp);
            r.events.traceparent = Some(tp);
        }
        span
    };
    let req = ApiRequest::Start {
        flow: flow.clone(),
        params,
        flow_run_id: Some(flow_run_id),
        idempotency_key: Some(
            a.idempotency_key
                .clone()
                .unwrap_or_else(|| flow_run_id.to_string()),
        ),
        success_task_results: a.run.success_task_results.clone(),
        events: Some(r.events.clone()),
        priority: a.run.priority,
    };
    // a coordinator that is restarting serves again once it has resumed its runs
    let started = match request_waiting(&client, &subjects, "start", &req, START_WAIT).await {
        Ok(ApiReply::Started { run, existing }) => {
            if existing {
                tracing::info!(flow_run_id = %run.flow_run_id, "this run already exists; following it");
            }
            run
        }
        // the coordinator published the run's FAILED event (or the id names another run)
        Ok(ApiReply::Error(e)) => return r.reject(e, false).await,
        Ok(other) => return r.reject(format!("unexpected reply: {other:?}"), true).await,
        Err(e) => return r.reject(e, true).await,
    };
    let id = started.flow_run_id;
    if a.detach {
        out!("{id}");
        return ExitCode::SUCCESS;
    }
    let tty = std::io::stderr().is_terminal() && !a.run.no_progress;
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} tasks {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut last_line = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_secs(2));
    let show = |info: &RunInfo, last_line: &mut Instant| {
        if let Some(b) = &bar {
            b.set_length(info.tasks);
            b.set_position(info.completed);
            b.set_message(info.note.clone().unwrap_or_default());
        } else if last_line.elapsed() >= Duration::from_secs(2) {
            *last_line = Instant::now();
            eprintln!(
                "run {}: {} {}/{} tasks done, {} executions, {} retries{}",
                info.flow_run_id,
                info.status,
                info.completed,
                info.tasks,
                info.executions,
                info.retries,
                info.note
                    .as_deref()
                    .map(|n| format!(" ({n})"))
                    .unwrap_or_default()
            );
        }
    };
    let finished = loop {
        if started.status.is_final() {
            // a run that succeeded before: its recorded outcome
            break started.clone();
        }
        tokio::select! {
            Some(msg) = done.next() => {
                if let Ok(info) = decode_envelope::<RunInfo>(&msg.payload) {
                    break info;
                }
            }
            Some(msg) = flow_log.next() => {
                // the flow body's own log lines, as the coordinator's log has them
                let line = String::from_utf8_lossy(&msg.payload);
                match &bar {
                    Some(b) => b.println(line.as_ref()),
                    None => eprintln!("{line}"),
                }
            }
            Some(msg) = progress.next() => {
                if let Ok(info) = decode_envelope::<RunInfo>(&msg.payload) {
                    show(&info, &mut last_line);
                }
            }
            _ = poll.tick() => {
                // the `done` message can be lost (a NATS restart); ask
                match request(&client, &subjects, "status", &ApiRequest::Status { flow_run_id: id }).await {
                    Ok(ApiReply::Run(info)) if info.status.is_final() => break info,
                    Ok(ApiReply::Run(info)) => show(&info, &mut last_line),
                    Ok(ApiReply::Unknown(_)) => {
                        // a coordinator that died before the run was journaled forgot it:
                        // submit it again (the same run id names the same run)
                        tracing::warn!(flow_run_id = %id, "the coordinator does not know this run (it restarted before journaling it); submitting it again");
                        if let Err(e) = request(&client, &subjects, "start", &req).await {
                            tracing::warn!(error = %e, "could not submit the run again; still waiting");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "cannot reach the coordinator; still waiting"),
                }
            }
        }
    };
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if let Some(note) = &finished.note {
        eprintln!("warning: {note}");
    }
    let outcome = FlowRunOutcome::from_info(&finished);
    print_summary(&outcome);
    exit_code(outcome.status)
}

fn print_run_table(runs: &[RunInfo]) {
    out!(
        "{:<36}  {:<20}  {:<8}  {:>13}  {:>10}  {:>7}  {:>9}",
        "RUN",
        "FLOW",
        "STATUS",
        "DONE/TASKS",
        "EXECUTIONS",
        "RETRIES",
        "WALL"
    );
    for r in runs {
        out!(
            "{:<36}  {:<20}  {:<8}  {:>13}  {:>10}  {:>7}  {:>8.1}s",
            r.flow_run_id,
            r.flow,
            r.status,
            format!("{}/{}", r.completed, r.tasks),
            r.executions,
            r.retries,
            r.wall_ms as f64 / 1000.0
        );
        if let Some(p) = &r.parent_run_id {
            out!("    child of run {p}");
        }
        if r.cancelled > 0 {
            out!("    cancelled: {} calls had not ended", r.cancelled);
        }
        if let Some(e) = &r.error {
            out!("    error: {e}");
        }
        if let Some(n) = &r.note {
            out!("    note: {n}");
        }
    }
}

fn print_agent_table(agents: &[AgentSummary]) {
    out!(
        "{:<28}  {:>5}  {:>7}  {:>6}  {:>8}  {:>9}  {:<20}  TASKS",
        "AGENT",
        "SLOTS",
        "RUNNING",
        "QUEUED",
        "DRAINING",
        "SEEN(ms)",
        "LABELS"
    );
    for a in agents {
        let labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out!(
            "{:<28}  {:>5}  {:>7}  {:>6}  {:>8}  {:>9}  {:<20}  {}",
            a.agent_id.to_string(),
            a.slots,
            a.running,
            a.queued,
            if a.draining { "yes" } else { "no" },
            a.last_seen_ms,
            if labels.is_empty() {
                "-".to_string()
            } else {
                labels.join(",")
            },
            a.tasks.join(",")
        );
    }
}

/// How long `logs` asks again while no coordinator answers.
const FOLLOW_WAIT: Duration = Duration::from_secs(30);

/// The run a command names (its RUN argument), and a connection to ask about it.
async fn about_run(
    cli: &Cli,
    raw: &str,
    url: &str,
) -> Result<(FlowRunId, async_nats::Client, Subjects), ExitCode> {
    let id = FlowRunId::parse(raw, "the RUN argument").map_err(usage_error)?;
    let client = connect(cli, url, "pinazu-cli").await?;
    Ok((id, client, nats_subjects(cli)))
}

/// `logs`: the log lines of the run's calls, in call order; with `--follow`, those of
/// attempts that end later too, until the run has ended.
async fn logs(cli: &Cli, a: &LogsArgs, url: &str) -> ExitCode {
    let (id, client, subjects) = match about_run(cli, &a.flow_run_id, url).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    // bytes of each call's logs printed so far (a retried call's logs grow)
    let mut printed: std::collections::HashMap<u64, usize> = Default::default();
    let mut version = None;
    loop {
        // (asked again for a while when no coordinator answers: one may be taking the
        // run over)
        let status = ApiRequest::Status { flow_run_id: id };
        let ended = match request_waiting(&client, &subjects, "status", &status, FOLLOW_WAIT).await
        {
            Ok(ApiReply::Run(info)) => info.status != pinazu_shared::events::FlowStatus::Running,
            Ok(ApiReply::Error(e)) | Ok(ApiReply::Unknown(e)) => return usage_error(e),
            Ok(other) => return usage_error(format!("unexpected reply: {other:?}")),
            Err(e) => return usage_error(e),
        };
        let mut offset = 0;
        loop {
            let query = pinazu_shared::api::CallsQuery {
                offset,
                limit: 200,
                task: a.task.clone(),
                logged: true,
                with_logs: true,
                ..Default::default()
            };
            let calls = ApiRequest::Calls {
                flow_run_id: id,
                query,
            };
            let page = match request_waiting(&client, &subjects, "calls", &calls, FOLLOW_WAIT).await
            {
                Ok(ApiReply::Calls(p)) => p,
                Ok(ApiReply::Error(e)) | Ok(ApiReply::Unknown(e)) => return usage_error(e),
                Ok(other) => return usage_error(format!("unexpected reply: {other:?}")),
                Err(e) => return usage_error(e),
            };
            if offset == 0 {
                if let Some(t) = &a.task {
                    if !page.by_task.iter().any(|(name, _)| name == t) && (ended || !a.follow) {
                        let known: Vec<&str> =
                            page.by_task.iter().map(|(n, _)| n.as_str()).collect();
                        return usage_error(format!(
                            "run {id} made no call of task `{t}`; its tasks: {}",
                            known.join(", ")
                        ));
                    }
                }
                if version == Some(page.version) {
                    break;
                }
                version = Some(page.version);
            }
            let n = page.rows.len() as u64;
            for row in page.rows {
                let Some(text) = row.logs else { continue };
                let done = printed.entry(row.call).or_insert(0);
                if text.len() < *done {
                    // a table rebuilt by a coordinator that took the run over
                    *done = 0;
                }
                if let Some(new) = text.get(*done..).filter(|t| !t.is_empty()) {
                    if *done == 0 {
                        out!(
                            "── call #{} {} ({}) ──",
                            row.call,
                            row.task,
                            row.status.as_str()
                        );
                    }
                    crate::cli::write_raw(format_args!("{}", new.trim_end_matches('\n')));
                    *done = text.len();
                }
            }
            offset += n;
            if n == 0 || offset >= page.matching {
                if offset == 0 && !a.follow && printed.is_empty() {
                    out!("(no log lines: the run's attempts logged nothing at info or above, or the run kept none)");
                }
                break;
            }
        }
        if !a.follow || ended {
            return ExitCode::SUCCESS;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn one_run(cli: &Cli, a: &RunIdArgs, url: &str, cancel: bool) -> ExitCode {
    let (id, client, subjects) = match about_run(cli, &a.flow_run_id, url).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    let (verb, req) = if cancel {
        ("cancel", ApiRequest::Cancel { flow_run_id: id })
    } else {
        ("status", ApiRequest::Status { flow_run_id: id })
    };
    match request(&client, &subjects, verb, &req).await {
        Ok(ApiReply::Run(info)) => {
            if a.json {
                out!("{}", serde_json::to_string(&info).unwrap_or_default());
            } else {
                print_run_table(std::slice::from_ref(&info));
            }
            ExitCode::SUCCESS
        }
        Ok(ApiReply::Error(e)) | Ok(ApiReply::Unknown(e)) => usage_error(e),
        Ok(other) => usage_error(format!("unexpected reply: {other:?}")),
        Err(e) => usage_error(e),
    }
}

/// `schedule add|list|pause|resume|delete|backfill`.
async fn schedule(cli: &Cli, a: &ScheduleArgs, url: &str) -> ExitCode {
    use pinazu_shared::schedule::{ScheduleOp, ScheduleSpec};
    let op = match &a.op {
        ScheduleCmd::Add {
            name,
            flow,
            cron,
            every,
            input,
            overlap,
            catchup,
            jitter,
            timezone,
            replace,
        } => {
            let params = match input.as_deref().map(serde_json::from_str::<Value>) {
                None => serde_json::Map::new(),
                Some(Ok(Value::Object(m))) => m,
                Some(Ok(_)) => return usage_error("--input must be a JSON object"),
                Some(Err(e)) => return usage_error(format!("--input is not JSON: {e}")),
            };
            ScheduleOp::Add {
                spec: ScheduleSpec {
                    name: name.clone(),
                    flow: flow.clone(),
                    params,
                    cron: cron.clone(),
                    every_ms: every.map(|d| d.as_millis() as u64),
                    timezone: timezone.clone(),
                    overlap: *overlap,
                    catchup_ms: catchup.as_millis() as u64,
                    jitter_ms: jitter.as_millis() as u64,
                },
                replace: *replace,
            }
        }
        ScheduleCmd::List { .. } => ScheduleOp::List,
        ScheduleCmd::Pause { name } => ScheduleOp::Pause { name: name.clone() },
        ScheduleCmd::Resume { name } => ScheduleOp::Resume { name: name.clone() },
        ScheduleCmd::Delete { name } => ScheduleOp::Delete { name: name.clone() },
        ScheduleCmd::Backfill { name, from, to } => ScheduleOp::Backfill {
            name: name.clone(),
            from_ms: *from,
            to_ms: *to,
        },
    };
    let client = match connect(cli, url, "pinazu-cli").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let subjects = nats_subjects(cli);
    let views = match request(&client, &subjects, "schedule", &ApiRequest::Schedule(op)).await {
        Ok(ApiReply::Schedules(v)) => v,
        Ok(ApiReply::Error(e)) => return usage_error(e),
        Ok(other) => return usage_error(format!("unexpected reply: {other:?}")),
        Err(e) => return usage_error(e),
    };
    let when = |ms: Option<u64>| match ms {
        Some(ms) => {
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
                .to_string()
        }
        None => "-".into(),
    };
    match &a.op {
        ScheduleCmd::List { json: true } => {
            out!("{}", serde_json::to_string(&views).unwrap_or_default());
        }
        ScheduleCmd::List { json: false } => {
            if views.is_empty() {
                out!("no schedules");
            } else {
                out!(
                    "{:<20} {:<20} {:<22} {:<12} {:<21} {:>8} {:>8}  STATE",
                    "NAME",
                    "FLOW",
                    "WHEN",
                    "OVERLAP",
                    "NEXT",
                    "STARTED",
                    "SKIPPED"
                );
            }
            for v in &views {
                let (spec, st) = (&v.record.spec, &v.record.state);
                let at = match (&spec.cron, spec.every_ms) {
                    (Some(c), _) => match &spec.timezone {
                        Some(tz) => format!("{c} {tz}"),
                        None => c.clone(),
                    },
                    (None, Some(ms)) => format!(
                        "every {}",
                        humantime::format_duration(Duration::from_millis(ms))
                    ),
                    _ => "-".into(),
                };
                let state = match (&st.error, st.paused) {
                    (_, true) => "paused".to_string(),
                    (Some(e), _) => format!("error: {e}"),
                    (None, false) => "active".to_string(),
                };
                out!(
                    "{:<20} {:<20} {:<22} {:<12} {:<21} {:>8} {:>8}  {state}",
                    spec.name,
                    spec.flow,
                    at,
                    spec.overlap.as_str(),
                    when(v.next_ms),
                    st.started,
                    st.skipped
                );
            }
        }
        ScheduleCmd::Add { name, .. } => {
            out!(
                "schedule {name} added; next fire {}",
                when(views.first().and_then(|v| v.next_ms))
            );
        }
        ScheduleCmd::Pause { name } => out!("schedule {name} paused"),
        ScheduleCmd::Resume { name } => out!(
            "schedule {name} resumed; next fire {}",
            when(views.first().and_then(|v| v.next_ms))
        ),
        ScheduleCmd::Delete { name } => out!("schedule {name} deleted"),
        ScheduleCmd::Backfill { name, .. } => {
            let n = views
                .first()
                .map(|v| v.record.state.pending.len())
                .unwrap_or(0);
            out!("schedule {name}: {n} backfilled runs starting");
        }
    }
    ExitCode::SUCCESS
}

/// `limits list|set|rm`.
async fn limits(cli: &Cli, a: &LimitsArgs, url: &str) -> ExitCode {
    use pinazu_shared::api::LimitsOp;
    let op = match &a.op {
        LimitsCmd::List { .. } => LimitsOp::List,
        LimitsCmd::Set { name, size } => {
            match crate::cli::parse_limit_arg(&format!("{name}={size}")) {
                Ok((name, size)) => LimitsOp::Set {
                    name,
                    size: Some(size),
                },
                Err(e) => return usage_error(e),
            }
        }
        LimitsCmd::Rm { name } => LimitsOp::Set {
            name: name.clone(),
            size: None,
        },
    };
    let client = match connect(cli, url, "pinazu-cli").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let subjects = nats_subjects(cli);
    match request(&client, &subjects, "limits", &ApiRequest::Limits(op)).await {
        Ok(ApiReply::Done) => {
            match &a.op {
                LimitsCmd::Set { name, size } => out!("limit {name} set to {size}"),
                LimitsCmd::Rm { name } => out!("limit {name} removed"),
                LimitsCmd::List { .. } => {}
            }
            ExitCode::SUCCESS
        }
        Ok(ApiReply::Limits(v)) => {
            if matches!(a.op, LimitsCmd::List { json: true }) {
                out!("{}", serde_json::to_string(&v).unwrap_or_default());
            } else {
                if v.named.is_empty() {
                    out!("no named limits");
                }
                for (name, size) in &v.named {
                    out!("limit {name}: {size}");
                }
                if !v.gates.is_empty() {
                    out!("");
                    out!(
                        "{:<6} {:<24} {:<16} {:<20} {:>8} {:>8}",
                        "KIND",
                        "NAME",
                        "KEY",
                        "SIZE",
                        "RUNNING",
                        "WAITING"
                    );
                    for g in &v.gates {
                        out!(
                            "{:<6} {:<24} {:<16} {:<20} {:>8} {:>8}",
                            g.kind,
                            g.name,
                            g.key.as_deref().unwrap_or("-"),
                            g.size.to_string(),
                            g.running,
                            g.waiting
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Ok(ApiReply::Error(e)) => usage_error(e),
        Ok(other) => usage_error(format!("unexpected reply: {other:?}")),
        Err(e) => usage_error(e),
    }
}

async fn list(
    cli: &Cli,
    json: bool,
    url: &str,
    runs: Option<pinazu_shared::api::RunsQuery>,
) -> ExitCode {
    let client = match connect(cli, url, "pinazu-cli").await {
        Ok(c) => c,
        Err(code) => return code,
    };
    let subjects = nats_subjects(cli);
    let (verb, req) = match runs {
        Some(q) => ("runs", ApiRequest::History(q)),
        None => ("agents", ApiRequest::Agents),
    };
    match request(&client, &subjects, verb, &req).await {
        Ok(ApiReply::Runs(v)) => {
            if json {
                out!("{}", serde_json::to_string(&v).unwrap_or_default());
            } else {
                print_run_table(&v);
            }
            ExitCode::SUCCESS
        }
        Ok(ApiReply::Agents(v)) => {
            if json {
                out!("{}", serde_json::to_string(&v).unwrap_or_default());
            } else {
                print_agent_table(&v);
            }
            ExitCode::SUCCESS
        }
        Ok(ApiReply::Error(e)) => usage_error(e),
        Ok(other) => usage_error(format!("unexpected reply: {other:?}")),
        Err(e) => usage_error(e),
    }
}
