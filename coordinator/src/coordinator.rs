//! The coordinator: starts the `Scheduler`, `CacheActor` and `StatusPublisher`, hosts one
//! `FlowRunner` per run, and routes agents' reports to them. It is the same in embedded
//! and distributed mode; only the `AgentLink` it is given and where its `ResultSink`
//! is called from differ.

use bytes::Bytes;
use dashmap::DashMap;
use ractor::{Actor, ActorRef, SpawnErr};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use tokio::sync::watch;

use pinazu_shared::api::{AgentSummary, CallsPage, CallsQuery, RunInfo};
use pinazu_shared::error::ParamError;
use pinazu_shared::events::{
    now_timestamp, EventContext, EventHeader, FlowStatus, FlowStatusMessage,
};
use pinazu_shared::ids::{AttemptId, FlowRunId};
use pinazu_shared::options::CachePolicy;
use pinazu_shared::registry::FlowDef;
use pinazu_shared::store::ObjectStore;
use pinazu_shared::transport::{AgentLink, ResultSink};
use pinazu_shared::wire::{AgentInfo, AttemptFinished, AttemptStarted, Heartbeat, Report};

use crate::cache::{CacheActor, CacheCounters, CacheMsg};
use crate::calls::CallLog;
use crate::flow_runner::{FlowRunner, FlowRunnerArgs, FlowRunnerMsg, Seeds};
use crate::journal::{Claim, Journal, JournalEntry, NoJournal, Replay};
use crate::scheduler::{Scheduler, SchedulerArgs, SchedulerMsg, SchedulerTiming};
use crate::stats::{RunStats, StatsSnapshot};
use crate::status::{EventSink, RunHeader, StatusMsg, StatusPublisher};
use crate::supervisor::{CoreMsg, CoreSupervisor};

/// Coordinator settings.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Header of every status event.
    pub header: EventHeader,
    /// Policy of tasks that set none: `run` when `ENABLE_S3_CACHING=true`, as the original.
    pub default_cache: CachePolicy,
    /// Execute cached calls anyway and overwrite their entries.
    pub refresh_cache: bool,
    /// Agent liveness and schedule timeout.
    pub timing: SchedulerTiming,
    /// Where runs' progress is journaled (default: nowhere).
    pub journal: JournalHandle,
    /// Leases and run owners when several coordinators share NATS (default: none, this
    /// coordinator is alone).
    pub ownership: OwnershipHandle,
    /// Keep each ended run's task table in the object store (`runs/<run>/calls.msgpack`)
    /// for the dashboard (default: off; the distributed coordinator turns it on).
    pub keep_call_logs: bool,
    /// Where flow bodies' own log lines go (default: only the coordinator's log).
    pub flow_logs: FlowLogHandle,
    /// Named limits' sizes at start (`--limit openai=20`).
    pub limits: Vec<(String, pinazu_shared::options::NamedLimit)>,
    /// How a run another coordinator hosts is cancelled (default: it is not).
    pub remote_cancel: RemoteCancelHandle,
}

/// Where flow bodies' own log lines go: called with the run and each line.
#[derive(Clone, Default)]
pub struct FlowLogHandle(pub Option<Arc<dyn Fn(FlowRunId, String) + Send + Sync>>);

impl std::fmt::Debug for FlowLogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "FlowLogs" } else { "None" })
    }
}

/// Asks whichever coordinator hosts a run to cancel it (distributed mode: the API's
/// `cancel`, which is passed on to the run's owner); a cancelled parent's child hosted
/// by another coordinator is reached this way.
#[derive(Clone, Default)]
pub struct RemoteCancelHandle(pub Option<Arc<dyn Fn(FlowRunId) + Send + Sync>>);

impl std::fmt::Debug for RemoteCancelHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "RemoteCancel"
        } else {
            "None"
        })
    }
}

/// The coordinators' leases, shared (see `ha.rs`).
#[derive(Clone, Default)]
pub struct OwnershipHandle(pub Option<Arc<crate::ha::Leases>>);

impl std::fmt::Debug for OwnershipHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(l) => write!(f, "Leases({})", l.me()),
            None => f.write_str("Alone"),
        }
    }
}

/// A journal, shared.
#[derive(Clone)]
pub struct JournalHandle(pub Arc<dyn Journal>);

impl Default for JournalHandle {
    fn default() -> Self {
        JournalHandle(Arc::new(NoJournal))
    }
}

impl std::fmt::Debug for JournalHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.enabled() {
            "Journal"
        } else {
            "NoJournal"
        })
    }
}

/// Extra settings of one run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// The key the run was submitted with (the same key returns the same run).
    pub idempotency_key: Option<String>,
    /// Results passed in for it (`--success-task-results`).
    pub seeds: Seeds,
    /// Wait this long before the flow body runs (a resumed run lets agents hand back
    /// what the previous coordinator process dispatched).
    pub start_delay: std::time::Duration,
    /// Header and trace id of the run's status events (default: the coordinator's
    /// header, no trace id); set by whoever launches the run.
    pub events: Option<EventContext>,
    /// Its priority and parent run.
    pub meta: crate::journal::RunMeta,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        CoordinatorConfig {
            header: EventHeader::default(),
            default_cache: CachePolicy::None,
            refresh_cache: false,
            timing: SchedulerTiming::default(),
            journal: JournalHandle::default(),
            ownership: OwnershipHandle::default(),
            keep_call_logs: false,
            flow_logs: FlowLogHandle::default(),
            limits: Vec::new(),
            remote_cancel: RemoteCancelHandle::default(),
        }
    }
}

/// What became of an unfinished run at resume.
#[derive(Debug, PartialEq, Eq)]
pub enum Resume {
    /// It runs here now.
    Resumed,
    /// Nothing to do (it ended, or another coordinator hosts it).
    Skipped,
    /// It could not resume (why).
    Failed(String),
}

/// The end of a run, as the CLI prints it and callers receive it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowRunOutcome {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The flow's name.
    pub flow: String,
    /// SUCCESS or FAILED.
    pub status: FlowStatus,
    /// The flow's return value, as JSON, on SUCCESS.
    pub result: Option<Value>,
    /// The error, on FAILED.
    pub error: Option<String>,
    /// The error chain, on FAILED.
    pub traceback: Option<String>,
    /// Counters.
    pub stats: StatsSnapshot,
}

impl FlowRunOutcome {
    /// The ended run's view (no note: the run's stats hold it).
    pub fn info(&self) -> RunInfo {
        RunInfo {
            result: self.result.clone(),
            error: self.error.clone(),
            ..self.stats.run_info(
                self.flow_run_id,
                &self.flow,
                self.status,
                self.stats.completed,
            )
        }
    }

    /// The outcome an ended run's [`RunInfo`] records.
    pub fn from_info(info: &RunInfo) -> Self {
        FlowRunOutcome {
            flow_run_id: info.flow_run_id,
            flow: info.flow.clone(),
            status: info.status,
            result: info.result.clone(),
            error: info.error.clone(),
            traceback: None,
            stats: StatsSnapshot {
                tasks: info.tasks,
                executions: info.executions,
                cache_hits: info.cache_hits,
                retries: info.retries,
                wall_ms: info.wall_ms,
                replayed: info.replayed,
                cancelled: info.cancelled,
                completed: info.completed,
            },
        }
    }
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad parameters.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// The run id (or idempotency key) already names a run of another flow, or with
    /// other parameters.
    #[error("{what} already names a run of `{journaled}`; it cannot also be `{asked}`: a run id (or idempotency key) names one run, with one flow and one set of parameters. {hint}")]
    OtherRun {
        /// "flow run <id>" or "idempotency key <key> (flow run <id>)".
        what: String,
        /// The existing run: flow and parameters.
        journaled: String,
        /// This request: flow and parameters.
        asked: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// The journal could not be read.
    #[error("{0}")]
    Journal(String),
    /// A run with this id is active here.
    #[error("flow run {0} is already running on this coordinator")]
    AlreadyRunning(FlowRunId),
    /// A run with this id is running in another process sharing the journal.
    #[error("flow run {run} is already running in {holder} (its journal is claimed); wait for it to end, or use another FLOW_RUN_ID")]
    RunningElsewhere {
        /// The run.
        run: FlowRunId,
        /// Who holds it.
        holder: String,
    },
    /// The runner actor could not start.
    #[error("could not start the flow runner: {0}")]
    Spawn(String),
    /// Another live coordinator owns the run (several coordinators share NATS).
    #[error("flow run {run} is owned by coordinator {coordinator}")]
    OwnedElsewhere {
        /// The run.
        run: FlowRunId,
        /// Its owner.
        coordinator: String,
    },
}

impl StartError {
    /// The request names a run that exists with another identity, or is running: the
    /// run id is someone else's, so no event is published under it.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StartError::OtherRun { .. }
                | StartError::AlreadyRunning(_)
                | StartError::RunningElsewhere { .. }
                | StartError::OwnedElsewhere { .. }
        )
    }
}

/// `flow` with its parameters, for identity errors (long parameter lists are cut).
fn describe_run(flow: &str, params: &Map<String, Value>) -> String {
    let mut json = serde_json::to_string(params).unwrap_or_default();
    if json.len() > 300 {
        let mut cut = 300;
        while !json.is_char_boundary(cut) {
            cut -= 1;
        }
        json.truncate(cut);
        json.push('…');
    }
    format!("{flow}` with parameters `{json}")
}

/// Checks that a run id (or key) names the run asked for: the same flow, and the same
/// parameters as that flow's types compare them.
fn same_run(
    what: impl FnOnce() -> String,
    existing: (&str, &Map<String, Value>),
    flow: &FlowDef,
    asked: &Map<String, Value>,
    hint: &'static str,
) -> Result<(), StartError> {
    if existing.0 == flow.name && (flow.same_params)(existing.1, asked) {
        return Ok(());
    }
    Err(StartError::OtherRun {
        what: what(),
        journaled: describe_run(existing.0, existing.1),
        asked: describe_run(flow.name, asked),
        hint,
    })
}

const RUN_ID_HINT: &str =
    "Start this one under another FLOW_RUN_ID (--flow-run-id), or leave it unset to get a new one.";
const KEY_HINT: &str = "Use another --idempotency-key for this one.";

/// A started run.
pub struct RunHandle {
    /// Its id.
    pub flow_run_id: FlowRunId,
    /// Live counters.
    pub stats: Arc<RunStats>,
    outcome: watch::Receiver<Option<FlowRunOutcome>>,
}

impl RunHandle {
    /// Whether the run has ended already (e.g. a successful run's id given again
    /// answers its recorded outcome at once).
    pub fn ended(&self) -> bool {
        self.outcome.borrow().is_some()
    }

    /// Waits for the run to end here: `None` when its runner stopped without an
    /// outcome (it let the run go to another coordinator).
    pub async fn wait_here(mut self) -> Option<FlowRunOutcome> {
        self.outcome
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|o| o.clone())
    }

    /// Waits for the run to end.
    pub async fn wait(mut self) -> FlowRunOutcome {
        let id = self.flow_run_id;
        let stats = self.stats.clone();
        let ended = self
            .outcome
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|o| o.clone());
        ended.unwrap_or_else(|| FlowRunOutcome {
            flow_run_id: id,
            flow: String::new(),
            status: FlowStatus::Failed,
            result: None,
            error: Some("the flow runner stopped without an outcome (internal error)".into()),
            traceback: None,
            stats: stats.snapshot(),
        })
    }
}

/// What every runner of this coordinator shares.
pub struct CoordShared {
    pub(crate) config: CoordinatorConfig,
    pub(crate) scheduler: ActorRef<SchedulerMsg>,
    pub(crate) cache: ActorRef<CacheMsg>,
    pub(crate) status: ActorRef<StatusMsg>,
    pub(crate) runs: Arc<DashMap<FlowRunId, ActorRef<FlowRunnerMsg>>>,
    pub(crate) journal: Arc<dyn Journal>,
    /// Every run started here, active or ended, for status queries.
    table: DashMap<FlowRunId, RunEntry>,
    /// The run each idempotency key named first (a key never moves to another run),
    /// and when: keys older than the journal's retention are forgotten.
    keys: DashMap<String, (FlowRunId, std::time::Instant)>,
    /// Runs being started now (see `start_run_with`).
    starting: DashMap<FlowRunId, Arc<tokio::sync::Mutex<()>>>,
    /// Ended runs still in `table`, oldest first: beyond `KEEP_ENDED` (and
    /// `KEEP_ENDED_FOR` old) they leave memory and are answered from the journal.
    ended: std::sync::Mutex<std::collections::VecDeque<(FlowRunId, tokio::time::Instant)>>,
    pub(crate) events_enabled: bool,
    /// Reports for runs that are not (or no longer) here.
    pub(crate) unknown_run_reports: AtomicU64,
    /// This process's epoch: the high half of every attempt id it issues.
    pub(crate) epoch: u32,
    attempts: AtomicU32,
    /// The object store (large results the journal points at).
    pub(crate) store: Arc<dyn ObjectStore>,
    /// Task tables of the runs that ended last (also kept in the store, when
    /// `keep_call_logs`), newest last.
    recent_logs: std::sync::Mutex<std::collections::VecDeque<(FlowRunId, Arc<CallLog>)>>,
    /// Called with each run a flow starts here as its child (distributed mode: its
    /// progress and end published, its large payloads removed when it ends).
    run_watcher: std::sync::OnceLock<RunWatcher>,
    /// Prometheus metrics.
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
}

/// Task tables of ended runs kept in memory (a page of a run that just ended, or one
/// being looked at, is not read from the store again and again): at most 8, and 64 MiB
/// in all besides the newest (a million-call table takes about 40 MB; back-to-back big
/// runs must not keep several).
const RECENT_LOGS: usize = 8;
const RECENT_LOGS_BYTES: usize = 64 * 1024 * 1024;

/// What is done with a run a flow started here as its child.
pub type RunWatcher = Arc<dyn Fn(FlowRunId) + Send + Sync>;

/// What a child's follower is told by its parent's runner.
#[derive(Clone, Debug, PartialEq)]
pub enum ChildStop {
    /// Follow it to its end.
    Go,
    /// The parent ended: cancel the child, with this reason.
    Cancel(String),
    /// The parent was let go to another coordinator: stop following, touch nothing.
    LetGo,
}

/// How long a child run resumed by its parent (its coordinator died) waits before its
/// body runs again, as a resumed run does: agents hand back what they ran for it.
const CHILD_RESUME_SETTLE: std::time::Duration = std::time::Duration::from_millis(1500);

/// Ended runs kept in memory at most (older ones are answered from the journal).
pub const KEEP_ENDED: usize = 1000;
/// However fast runs end, no more ended runs than this are kept.
const KEEP_ENDED_AT_MOST: usize = 4 * KEEP_ENDED;
/// An ended run stays in memory at least this long, within `KEEP_ENDED_AT_MOST` (a
/// `status` right after its end is answered here; later ones from the journal). Short:
/// at hundreds of runs a second a minute would hold tens of thousands
/// (scripts/runs_soak.sh).
const KEEP_ENDED_FOR: std::time::Duration = std::time::Duration::from_secs(2);

impl CoordShared {
    /// A run has ended: the oldest ended runs beyond [`KEEP_ENDED`] leave memory, so a
    /// coordinator that serves runs for months stays the same size.
    pub(crate) fn retire(&self, id: FlowRunId) {
        let now = tokio::time::Instant::now();
        let Ok(mut ended) = self.ended.lock() else {
            return;
        };
        ended.push_back((id, now));
        while ended.len() > KEEP_ENDED
            && (ended.len() > KEEP_ENDED_AT_MOST
                || ended
                    .front()
                    .is_some_and(|(_, at)| now.duration_since(*at) >= KEEP_ENDED_FOR))
        {
            if let Some((old, _)) = ended.pop_front() {
                // unless it started again meanwhile (a failed run's id given again)
                self.table
                    .remove_if(&old, |_, e| e.outcome.borrow().is_some());
            }
        }
    }

    /// An ended run's task table: kept among the recent ones and, when asked, in the
    /// store (in the background: the run's end waits for nothing).
    pub(crate) fn keep_log(self: &Arc<Self>, id: FlowRunId, log: CallLog) {
        let log = Arc::new(log);
        self.remember_log(id, log.clone());
        if self.config.keep_call_logs {
            let store = self.store.clone();
            tokio::spawn(async move {
                let bytes = match log.encode() {
                    Ok(b) => Bytes::from(b),
                    Err(e) => {
                        tracing::warn!(flow_run_id = %id, error = %e, "could not encode the run's task table");
                        return;
                    }
                };
                // a few tries, each bounded: a store that hangs holds the table no longer
                let key = crate::calls::store_key(id);
                let mut last = String::new();
                for wait in [0u64, 1, 5] {
                    tokio::time::sleep(std::time::Duration::from_secs(wait)).await;
                    let put = store.put(&key, bytes.clone());
                    match tokio::time::timeout(std::time::Duration::from_secs(30), put).await {
                        Ok(Ok(())) => return,
                        Ok(Err(e)) => last = e.to_string(),
                        Err(_) => last = "no answer within 30 s".into(),
                    }
                }
                tracing::warn!(flow_run_id = %id, error = %last, "could not keep the run's task table in the store; its page shows no tasks once this coordinator forgets it");
            });
        }
    }

    fn remember_log(&self, id: FlowRunId, log: Arc<CallLog>) {
        if let Ok(mut recent) = self.recent_logs.lock() {
            recent.retain(|(r, _)| *r != id);
            recent.push_back((id, log));
            // at most RECENT_LOGS tables, and RECENT_LOGS_BYTES in all (the newest
            // always stays)
            while recent.len() > RECENT_LOGS
                || (recent.len() > 1
                    && recent.iter().map(|(_, l)| l.bytes()).sum::<usize>() > RECENT_LOGS_BYTES)
            {
                recent.pop_front();
            }
        }
    }

    fn recent_log(&self, id: FlowRunId) -> Option<Arc<CallLog>> {
        let recent = self.recent_logs.lock().ok()?;
        recent
            .iter()
            .find(|(r, _)| *r == id)
            .map(|(_, l)| l.clone())
    }

    /// A run another coordinator took over leaves this one's table (its waiters here
    /// see it end without an outcome).
    pub(crate) fn moved(&self, id: FlowRunId) {
        self.table.remove(&id);
    }

    /// Remembers the run a key names (the first one), forgetting keys older than the
    /// journal's retention now and then.
    fn remember_key(&self, key: String, id: FlowRunId) {
        let now = std::time::Instant::now();
        self.keys.entry(key).or_insert((id, now));
        if self.keys.len().is_multiple_of(4096) {
            self.keys
                .retain(|_, (_, at)| now.duration_since(*at) < crate::journal::RETENTION);
        }
    }

    /// A new attempt id, unique within this coordinator process and distinct from those
    /// of earlier processes (by epoch).
    pub(crate) fn next_attempt_id(&self) -> AttemptId {
        let n = self.attempts.fetch_add(1, Relaxed).wrapping_add(1);
        AttemptId::new(self.epoch, n)
    }
}

/// A run in the coordinator's table.
struct RunEntry {
    flow: &'static str,
    /// As the flow took them: what, with `flow`, the run id names.
    params: Map<String, Value>,
    started: std::time::Instant,
    stats: Arc<RunStats>,
    outcome: watch::Receiver<Option<FlowRunOutcome>>,
    /// The run whose flow started it (a child flow).
    parent: Option<FlowRunId>,
}

impl RunEntry {
    fn info(&self, id: FlowRunId) -> RunInfo {
        let info = match &*self.outcome.borrow() {
            Some(o) => o.info(),
            None => {
                let snap = self.stats.snapshot();
                snap.run_info(id, self.flow, FlowStatus::Running, snap.completed)
            }
        };
        RunInfo {
            note: self.stats.note(),
            parent_run_id: self.parent,
            ..info
        }
    }
}

/// A handle to a running coordinator. Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<CoordShared>,
    cache_counters: Arc<CacheCounters>,
    /// Set when a core actor fails (see `supervisor.rs`).
    failed: watch::Receiver<Option<String>>,
}

impl Coordinator {
    /// Starts the coordinator's actors.
    pub async fn start(
        config: CoordinatorConfig,
        link: Arc<dyn AgentLink>,
        store: Arc<dyn ObjectStore>,
        sink: Arc<dyn EventSink>,
    ) -> Result<Coordinator, SpawnErr> {
        let events_enabled = sink.enabled();
        let journal = config.journal.0.clone();
        let runs = Arc::new(DashMap::new());
        // nonzero, so an epoch never equals that of a zeroed attempt id
        let epoch = fastrand::u32(1..);
        // the core actors, supervised: one that fails fails the coordinator, loudly
        let (failed_tx, failed) = watch::channel(None);
        let (core, _) = Actor::spawn(None, CoreSupervisor, failed_tx).await?;
        let (scheduler, _) = Actor::spawn_linked(
            None,
            Scheduler,
            SchedulerArgs {
                link,
                runs: runs.clone(),
                timing: config.timing.clone(),
                limits: config.limits.clone(),
                epoch,
                shared: config.ownership.0.is_some(),
                lease: config.ownership.0.clone(),
            },
            core.get_cell(),
        )
        .await?;
        let cache_counters = Arc::new(CacheCounters::default());
        let (cache, _) = Actor::spawn_linked(
            None,
            CacheActor,
            (store.clone(), cache_counters.clone()),
            core.get_cell(),
        )
        .await?;
        let (status, _) = Actor::spawn_linked(None, StatusPublisher, sink, core.get_cell()).await?;
        for (id, name) in [
            (scheduler.get_id(), "scheduler"),
            (cache.get_id(), "cache actor"),
            (status.get_id(), "status publisher"),
        ] {
            core.send_message(CoreMsg::Watch(id, name))
                .map_err(|e| SpawnErr::StartupFailed(e.to_string().into()))?;
        }
        let c = Coordinator {
            shared: Arc::new(CoordShared {
                config,
                scheduler,
                cache,
                status,
                runs,
                journal,
                table: DashMap::new(),
                keys: DashMap::new(),
                ended: Default::default(),
                recent_logs: Default::default(),
                run_watcher: std::sync::OnceLock::new(),
                metrics: {
                    let m = Arc::new(crate::metrics::Metrics::new());
                    m.register_collector(crate::metrics::CacheCollector(cache_counters.clone()));
                    m
                },
                starting: DashMap::new(),
                events_enabled,
                unknown_run_reports: AtomicU64::new(0),
                epoch,
                attempts: AtomicU32::new(0),
                store,
            }),
            cache_counters,
            failed,
        };
        c.follow_fences();
        Ok(c)
    }

    /// Lets go of the runs the journal says another coordinator took over.
    fn follow_fences(&self) {
        let Some(mut lost) = self.shared.journal.lost() else {
            return;
        };
        let runs = self.shared.runs.clone();
        tokio::spawn(async move {
            while let Some(run) = lost.recv().await {
                if let Some(r) = runs.get(&run) {
                    let _ = r.send_message(FlowRunnerMsg::LetGo);
                }
            }
        });
    }

    /// Resolves when a core actor has failed (the coordinator cannot go on), with why.
    pub async fn core_failure(&self) -> String {
        let mut rx = self.failed.clone();
        let message = match rx.wait_for(Option::is_some).await {
            Ok(m) => m.clone(),
            // the supervisor is gone: so is the coordinator
            Err(_) => Some("the coordinator's core supervisor stopped".to_string()),
        };
        message.unwrap_or_default()
    }

    /// Waits for a run's end, or for the coordinator to fail under it.
    pub async fn outcome(&self, handle: RunHandle) -> Result<FlowRunOutcome, String> {
        tokio::select! {
            o = handle.wait() => Ok(o),
            why = self.core_failure() => Err(why),
        }
    }

    /// Why the coordinator failed, if it has.
    pub fn failed(&self) -> Option<String> {
        self.failed.borrow().clone()
    }

    /// The sink agents report to. Embedded agents call it directly; the NATS transport
    /// calls it for each decoded report.
    pub fn result_sink(&self) -> Arc<dyn ResultSink> {
        Arc::new(Inbound {
            shared: self.shared.clone(),
        })
    }

    /// Adds (or refreshes) an agent in the scheduler's registry.
    pub fn register_agent(&self, info: AgentInfo) {
        let _ = self
            .shared
            .scheduler
            .send_message(SchedulerMsg::Register(info));
    }

    /// Hands a remote agent's heartbeat to the scheduler.
    pub fn heartbeat(&self, hb: Heartbeat) {
        let _ = self
            .shared
            .scheduler
            .send_message(SchedulerMsg::Heartbeat(hb));
    }

    /// From now on the scheduler records which agent each attempt goes to; reports
    /// are checked against it (distributed mode).
    pub fn track_origins(&self) -> Arc<crate::scheduler::Origins> {
        let origins = Arc::new(crate::scheduler::Origins::new(self.shared.epoch));
        let _ = self
            .shared
            .scheduler
            .send_message(SchedulerMsg::TrackOrigins(origins.clone()));
        origins
    }

    /// Where each call of an active run stands (its call table; empty once the run
    /// left this coordinator).
    pub async fn call_phases(
        &self,
        id: FlowRunId,
    ) -> Vec<(pinazu_shared::ids::CallId, crate::flow_runner::CallPhase)> {
        let Some(runner) = self.shared.runs.get(&id).map(|r| r.clone()) else {
            return Vec::new();
        };
        ractor::call!(runner, FlowRunnerMsg::Phases).unwrap_or_default()
    }

    /// A handle on the coordinator for its own actors (a runner starting a child flow):
    /// the same state, without the start-up's failure watch.
    pub(crate) fn over(shared: Arc<CoordShared>) -> Coordinator {
        Coordinator {
            shared,
            cache_counters: Arc::default(),
            failed: watch::channel(None).1,
        }
    }

    /// Sets what is done with each child run started here (once).
    pub fn watch_children_with(&self, watcher: RunWatcher) {
        let _ = self.shared.run_watcher.set(watcher);
    }

    /// Whether a run runs now: hosted here and not ended, or started and not ended per
    /// the journal (hosted by another coordinator, or being taken over).
    pub async fn run_running(&self, id: FlowRunId) -> Result<bool, String> {
        if let Some(e) = self.shared.table.get(&id) {
            return Ok(e.outcome.borrow().is_none());
        }
        match self.shared.journal.latest(id).await {
            Ok(latest) => Ok(matches!(latest, Some(JournalEntry::RunStarted { .. }))),
            Err(e) => Err(format!("cannot read run {id}'s journal: {e}")),
        }
    }

    /// Whether the journal knows the run (started, ended or not), or this process
    /// hosts it.
    pub async fn journaled(&self, id: FlowRunId) -> Result<bool, String> {
        if self.shared.table.contains_key(&id) {
            return Ok(true);
        }
        match self.shared.journal.latest(id).await {
            Ok(latest) => Ok(latest.is_some()),
            Err(e) => Err(format!("cannot read run {id}'s journal: {e}")),
        }
    }

    /// Whether the journal (or this coordinator's table) says the run has ended.
    pub async fn run_ended(&self, id: FlowRunId) -> bool {
        if let Some(e) = self.shared.table.get(&id) {
            if e.outcome.borrow().is_some() {
                return true;
            }
        }
        matches!(
            self.shared.journal.latest(id).await,
            Ok(Some(JournalEntry::RunEnded { .. }))
        )
    }

    /// A handle on a run in this coordinator's table.
    pub fn handle(&self, id: FlowRunId) -> Option<RunHandle> {
        self.shared.table.get(&id).map(|e| RunHandle {
            flow_run_id: id,
            stats: e.stats.clone(),
            outcome: e.outcome.clone(),
        })
    }

    /// Runs a child flow to its end: started here under `id`, or followed where it
    /// already runs (resumed here, or hosted by another coordinator: then its end is
    /// read from the journal, which every coordinator shares), or answered from its
    /// recorded end (a failed one runs again when `rerun_failed`: its parent, which
    /// failed, is run again).
    pub(crate) async fn run_child(
        &self,
        flow: &'static FlowDef,
        params: Map<String, Value>,
        id: FlowRunId,
        options: RunOptions,
        rerun_failed: bool,
        mut stop: watch::Receiver<ChildStop>,
    ) -> Result<FlowRunOutcome, String> {
        let mut wait = std::time::Duration::from_millis(100);
        let mut first = true;
        loop {
            let mut options = options.clone();
            // an ended child (whatever its status) answers from its journal: it does
            // not run again (a failed one does, once, when its failed parent is run
            // again); an unfinished one hosted nowhere resumes after the settle a
            // takeover gives agents to hand back what it ran
            match self.shared.journal.latest(id).await {
                Ok(Some(JournalEntry::RunEnded {
                    status,
                    summary: Some(summary),
                    result_ref,
                    ..
                })) if status == FlowStatus::Success || !(rerun_failed && first) => {
                    return Ok(self.recorded_outcome(&summary, result_ref).await)
                }
                Ok(Some(JournalEntry::RunStarted { .. })) if self.handle(id).is_none() => {
                    options.start_delay = CHILD_RESUME_SETTLE;
                }
                _ => {}
            }
            first = false;
            // (the start is never aborted halfway: a child journaled and hosted by
            // nobody would be resumed long after its parent ended)
            let here = match self.start_run_with(flow, params.clone(), id, options).await {
                Ok(handle) => {
                    if let (false, Some(watch)) = (handle.ended(), self.shared.run_watcher.get()) {
                        watch(id);
                    }
                    Some(handle)
                }
                Err(StartError::AlreadyRunning(_)) => self.handle(id),
                // hosted elsewhere: its end is read from the journal on the next round
                Err(StartError::OwnedElsewhere { .. } | StartError::RunningElsewhere { .. }) => {
                    None
                }
                Err(e @ StartError::Journal(_)) => {
                    tracing::warn!(flow_run_id = %id, error = %e, "could not start a child flow yet; trying again");
                    None
                }
                Err(e) => return Err(e.to_string()),
            };
            if let Some(why) = self.child_stopped(&stop, id).await {
                return Err(why);
            }
            if let Some(h) = here {
                tokio::select! {
                    // (none: let go to another coordinator, followed through the journal)
                    outcome = h.wait_here() => if let Some(outcome) = outcome {
                        return Ok(outcome);
                    },
                    _ = stop.changed() => {}
                }
            } else {
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.changed() => {}
                }
                wait = (wait * 2).min(std::time::Duration::from_secs(1));
            }
            if let Some(why) = self.child_stopped(&stop, id).await {
                return Err(why);
            }
        }
    }

    /// The parent stopped waiting for a child: cancelled (here, retried a while for
    /// one not in the table yet; one another coordinator hosts is not reached) or let
    /// go (the parent's new owner follows it). `None`: go on.
    async fn child_stopped(
        &self,
        stop: &watch::Receiver<ChildStop>,
        id: FlowRunId,
    ) -> Option<String> {
        let reason = match &*stop.borrow() {
            ChildStop::Go => return None,
            ChildStop::LetGo => return Some("the parent was let go".into()),
            ChildStop::Cancel(reason) => reason.clone(),
        };
        for i in 0..100 {
            if self.cancel(id, &reason).is_ok() || self.run_ended(id).await {
                return Some(reason);
            }
            // not here (yet): asked of whichever coordinator hosts it, now and then
            if i % 10 == 3 {
                if let Some(remote) = &self.shared.config.remote_cancel.0 {
                    remote(id);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        tracing::warn!(child = %id, "could not cancel a child run; cancel it where it runs (`cancel {id}`)");
        Some(reason)
    }

    /// Sizes a named limit (`None`: removes it) on this coordinator.
    pub fn set_limit(&self, name: String, size: Option<pinazu_shared::options::NamedLimit>) {
        let _ = self
            .shared
            .scheduler
            .send_message(SchedulerMsg::SetLimit(name, size));
    }

    /// The named limits and the gates in use on this coordinator.
    pub async fn limits(&self) -> pinazu_shared::api::LimitsView {
        ractor::call!(self.shared.scheduler, SchedulerMsg::Limits).unwrap_or_default()
    }

    /// The live agents as the scheduler sees them.
    pub async fn agents(&self) -> Vec<AgentSummary> {
        ractor::call!(self.shared.scheduler, SchedulerMsg::Agents).unwrap_or_default()
    }

    /// A page of a run's task table: from its runner when hosted here, else from the
    /// table kept when it ended (in memory, or the store). `None`: no table is known
    /// (another coordinator hosts the run, or it ended without keeping one).
    pub async fn calls(&self, id: FlowRunId, q: &CallsQuery) -> Result<Option<CallsPage>, String> {
        let runner = self.shared.runs.get(&id).map(|r| r.value().clone());
        if let Some(runner) = runner {
            // (bounded: a runner busy ending its run must not hold the API's permits)
            match ractor::call_t!(runner, FlowRunnerMsg::Calls, 2000, q.clone()) {
                Ok(page) => return Ok(Some(page)),
                Err(ractor::RactorErr::Messaging(ractor::MessagingErr::SendErr(_)))
                | Err(ractor::RactorErr::Messaging(ractor::MessagingErr::ChannelClosed)) => {}
                Err(e) => {
                    return Err(format!(
                        "flow run {id}'s task table did not answer within 2 s ({e}): its run is busy ending; try again"
                    ))
                }
            }
        }
        if let Some(log) = self.shared.recent_log(id) {
            return Ok(Some(log.page(q)));
        }
        let bytes = match self.shared.store.get(&crate::calls::store_key(id)).await {
            Ok(Some(b)) => b,
            Ok(None) => return Ok(None),
            Err(e) => {
                return Err(format!(
                    "flow run {id}'s task table could not be read from the store: {e}"
                ))
            }
        };
        match CallLog::decode(&bytes) {
            Ok(log) => {
                let log = Arc::new(log);
                self.shared.remember_log(id, log.clone());
                Ok(Some(log.page(q)))
            }
            Err(e) => Err(format!(
                "flow run {id}'s task table in the store does not decode: {e}"
            )),
        }
    }

    /// The coordinator's metrics.
    pub fn metrics(&self) -> &Arc<crate::metrics::Metrics> {
        &self.shared.metrics
    }

    /// `/metrics`: the coordinator's metrics in Prometheus' text format, as they are now.
    pub async fn render_metrics(&self) -> String {
        let agents = self.agents().await;
        self.shared
            .metrics
            .render(&agents, self.shared.journal.backlog())
    }

    /// One run's state, if this coordinator started it.
    pub fn run_info(&self, id: FlowRunId) -> Option<RunInfo> {
        let mut info = self.shared.table.get(&id).map(|e| e.info(id))?;
        if let Some(l) = &self.shared.config.ownership.0 {
            if info.status == FlowStatus::Running {
                info.owner = Some(l.me().to_string());
            }
        }
        Some(info)
    }

    /// An ended run this coordinator does not host (it ended before this process
    /// started), as its journal summarised it.
    pub async fn journaled_run(&self, id: FlowRunId) -> Option<RunInfo> {
        match self.shared.journal.ended(id).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(flow_run_id = %id, error = %e, "cannot read the run's journal");
                None
            }
        }
    }

    /// Every run this coordinator started, oldest first.
    pub fn runs(&self) -> Vec<RunInfo> {
        let mut v: Vec<(std::time::Instant, RunInfo)> = self
            .shared
            .table
            .iter()
            .map(|e| (e.started, e.info(*e.key())))
            .collect();
        v.sort_by_key(|(t, _)| *t);
        let me = self.shared.config.ownership.0.as_ref().map(|l| l.me());
        let now_ms = pinazu_shared::events::now_ms();
        v.into_iter()
            .map(|(started, mut i)| {
                // when it started, or ended once it has
                let start_ms = now_ms.saturating_sub(started.elapsed().as_millis() as u64);
                if i.status == FlowStatus::Running {
                    i.owner = me.map(String::from);
                    i.at_ms = Some(start_ms);
                } else {
                    i.at_ms = Some(start_ms + i.wall_ms);
                }
                i
            })
            .collect()
    }

    /// Waits for a run this coordinator started to end.
    pub async fn wait(&self, id: FlowRunId) -> Option<FlowRunOutcome> {
        let mut rx = self.shared.table.get(&id)?.outcome.clone();
        let ended = rx.wait_for(Option::is_some).await.ok()?;
        ended.clone()
    }

    /// Cancels an active run: its attempts stop, and it ends FAILED with `reason`.
    pub fn cancel(&self, id: FlowRunId, reason: &str) -> Result<(), String> {
        match self.shared.runs.get(&id) {
            Some(r) => {
                let _ = r.send_message(FlowRunnerMsg::Cancel(reason.to_string()));
                Ok(())
            }
            None if self.shared.table.contains_key(&id) => {
                Err(format!("flow run {id} has already ended"))
            }
            None => Err(format!("flow run {id} is not known to this coordinator")),
        }
    }

    /// Cache counters.
    pub fn cache_counters(&self) -> &CacheCounters {
        &self.cache_counters
    }

    /// Removes every cache object under `prefix`.
    pub async fn clear_cache(&self, prefix: &str) -> Result<u64, String> {
        let prefix = prefix.to_string();
        ractor::call!(self.shared.cache, |reply| CacheMsg::Clear { prefix, reply })
            .map_err(|e| e.to_string())?
    }

    /// Starts a run of `flow` with named parameters. Parameter errors are reported here,
    /// before anything runs.
    pub async fn start_run(
        &self,
        flow: &'static FlowDef,
        params: Map<String, Value>,
        flow_run_id: FlowRunId,
    ) -> Result<RunHandle, StartError> {
        self.start_run_with(flow, params, flow_run_id, RunOptions::default())
            .await
    }

    /// The run a key names, if this coordinator knows it; an error if the parameters do
    /// not decode, or if that run is of another flow or has other parameters.
    pub fn run_for_key(
        &self,
        key: &str,
        flow: &FlowDef,
        params: &Map<String, Value>,
    ) -> Result<Option<FlowRunId>, StartError> {
        let asked = (flow.invoke)(params.clone())?.params;
        let Some(id) = self.shared.keys.get(key).map(|e| e.value().0) else {
            return Ok(None);
        };
        let Some((existing_flow, existing_params)) = self
            .shared
            .table
            .get(&id)
            .map(|e| (e.flow, e.params.clone()))
        else {
            return Ok(Some(id));
        };
        same_run(
            || format!("idempotency key {key:?} (flow run {id})"),
            (existing_flow, &existing_params),
            flow,
            &asked,
            KEY_HINT,
        )?;
        Ok(Some(id))
    }

    /// Whether a run id names a run this coordinator or its journal knows (then a
    /// failure to start it again publishes nothing under it: it is that run's id).
    pub async fn names_a_run(&self, id: FlowRunId) -> bool {
        self.shared.table.contains_key(&id)
            || matches!(self.shared.journal.latest(id).await, Ok(Some(_)))
    }

    /// The events context of runs that do not bring their own.
    fn default_events(&self) -> EventContext {
        EventContext {
            header: self.shared.config.header.clone(),
            trace_id: None,
            traceparent: None,
        }
    }

    /// Publishes the flow FAILED event of a run that could not start (its id is known,
    /// so whoever waits for its events learns why).
    /// `events`: the launcher's header and trace id (default: this coordinator's).
    pub fn publish_rejection(&self, id: FlowRunId, events: Option<&EventContext>, error: &str) {
        let events = events.cloned().unwrap_or_else(|| self.default_events());
        let _ = self.shared.status.send_message(StatusMsg::Flow(
            Arc::new(RunHeader::new(events)),
            FlowStatusMessage {
                flow_run_id: id,
                status: FlowStatus::Failed,
                error_message: Some(error.to_string()),
                traceback: Some(error.to_string()),
                event_timestamp: now_timestamp(),
            },
        ));
    }

    /// Resumes every run the journal holds unfinished: each flow is started again under
    /// its id with its journaled parameters, and its journaled calls are answered from
    /// the journal. Returns the runs resumed, and the ones that could not be.
    ///
    /// Each resumed body waits `settle` before it runs, so agents can first hand back
    /// what the previous coordinator process dispatched (results it did not journal,
    /// attempts still running): those calls are then answered or re-attached, not run
    /// again. Zero in embedded mode, where no agent outlives the coordinator.
    pub async fn resume_unfinished(
        &self,
        registry: &'static pinazu_shared::registry::Registry,
        settle: std::time::Duration,
    ) -> (Vec<FlowRunId>, Vec<(FlowRunId, String)>) {
        let mut resumed = Vec::new();
        let mut failed = Vec::new();
        // the journal may still be coming up (JetStream recovering after a restart):
        // serving before every unfinished run is resumed would leave some behind
        let mut wait = std::time::Duration::from_millis(250);
        let runs = loop {
            match self.shared.journal.unfinished().await {
                Ok(r) => break r,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "cannot list unfinished runs yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(std::time::Duration::from_secs(5));
                }
            }
        };
        for run in runs {
            match self.resume_one(registry, run, settle).await {
                Resume::Resumed => resumed.push(run),
                Resume::Skipped => {}
                Resume::Failed(why) => failed.push((run, why)),
            }
        }
        (resumed, failed)
    }

    /// Resumes one unfinished run from its journal (after a restart, or taking it over
    /// from a coordinator that died).
    pub async fn resume_one(
        &self,
        registry: &'static pinazu_shared::registry::Registry,
        run: FlowRunId,
        settle: std::time::Duration,
    ) -> Resume {
        if let Some(leases) = &self.shared.config.ownership.0 {
            // another live coordinator hosts it: not even read
            if leases.live_owner_elsewhere(run).await.is_some() {
                return Resume::Skipped;
            }
        }
        let entries = match self.shared.journal.read(run).await {
            Ok(e) => e,
            Err(e) => return Resume::Failed(e.to_string()),
        };
        let Some(replay) = Replay::from_entries(&entries) else {
            // claimed, never journaled (its owner died in between): nothing to resume;
            // the record goes (the client submits the run again)
            if let Some(leases) = &self.shared.config.ownership.0 {
                if leases.claim(run).await == Ok(crate::ha::Owned::Mine) {
                    leases.release(run).await;
                }
            }
            return Resume::Skipped;
        };
        if !replay.unfinished {
            // it ended, but its owner died before releasing it: released now
            if let Some(leases) = &self.shared.config.ownership.0 {
                if leases.claim(run).await == Ok(crate::ha::Owned::Mine) {
                    leases.release(run).await;
                }
            }
            return Resume::Skipped;
        }
        let Some(def) = registry.flow(&replay.flow) else {
            return Resume::Failed(format!(
                "flow `{}` is not defined in this program",
                replay.flow
            ));
        };
        let options = RunOptions {
            idempotency_key: replay.idempotency_key.clone(),
            seeds: Seeds::default(),
            start_delay: settle,
            events: replay.events.clone(),
            meta: replay.meta,
        };
        match self
            .start_run_with(def, replay.params.clone(), run, options)
            .await
        {
            Ok(_) => {
                tracing::info!(flow_run_id = %run, flow = def.name, "resumed an unfinished run");
                Resume::Resumed
            }
            // hosted here already, or by another live coordinator
            Err(StartError::AlreadyRunning(_) | StartError::OwnedElsewhere { .. }) => {
                Resume::Skipped
            }
            Err(e @ StartError::Params(_)) => {
                // its parameters no longer fit the flow (its code changed): it can
                // never resume; end it, so it is not left open
                let why = format!("the run cannot be resumed: {e}");
                self.end_unresumable(run, def.name, &replay, &why).await;
                Resume::Failed(why)
            }
            Err(e) => Resume::Failed(e.to_string()),
        }
    }

    /// Lets go of the runs this coordinator hosts that another one owns now (after this
    /// process was stopped or cut off past its lease).
    pub async fn recheck_ownership(&self) {
        let Some(leases) = &self.shared.config.ownership.0 else {
            return;
        };
        let hosted: Vec<FlowRunId> = self.shared.runs.iter().map(|e| *e.key()).collect();
        let mut lost = Vec::new();
        for run in hosted {
            match leases.owner(run).await {
                Ok((Some(o), _)) if o.coordinator != leases.me() => {
                    tracing::warn!(flow_run_id = %run, owner = %o.coordinator, "this coordinator's lease lapsed and another took the run over");
                    let runner = self.shared.runs.get(&run).map(|r| r.value().clone());
                    if let Some(r) = runner {
                        let _ = r.send_message(FlowRunnerMsg::LetGo);
                    }
                    lost.push(run);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(flow_run_id = %run, error = %e, "cannot check who owns the run")
                }
            }
        }
        // nothing of a lost run may be dispatched once the lease is trusted again: its
        // runners have stopped (no retry of an attempt taken for lost) and the
        // scheduler has dropped what it queued for it, before this returns
        let until = std::time::Instant::now() + std::time::Duration::from_secs(2);
        while lost.iter().any(|r| self.shared.runs.contains_key(r))
            && std::time::Instant::now() < until
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        for run in &lost {
            let _ = self
                .shared
                .scheduler
                .send_message(SchedulerMsg::ForgetRun(*run));
        }
        if !lost.is_empty() {
            // (a round trip: the scheduler has handled the messages sent before it)
            let _ = ractor::call!(self.shared.scheduler, SchedulerMsg::Agents);
        }
    }

    /// The journal's history of runs (their latest states), see `Journal::history`.
    pub async fn history(&self) -> Result<Vec<(RunInfo, u64)>, String> {
        self.shared
            .journal
            .history()
            .await
            .map_err(|e| e.to_string())
    }

    /// A run its journal says started and did not end, that no coordinator hosts now
    /// (several coordinators: one is taking it over); `None` otherwise, or when alone.
    pub async fn unhosted_run(&self, id: FlowRunId) -> Option<RunInfo> {
        self.shared.config.ownership.0.as_ref()?;
        let Ok(Some(JournalEntry::RunStarted {
            flow,
            started_at_ms,
            ..
        })) = self.shared.journal.latest(id).await
        else {
            return None;
        };
        let now_ms = pinazu_shared::events::now_ms();
        let snap = StatsSnapshot::default();
        let mut info = snap.run_info(id, &flow, FlowStatus::Running, 0);
        info.wall_ms = started_at_ms.map_or(0, |t| now_ms.saturating_sub(t));
        info.note = Some("its coordinator stopped; another is taking it over".into());
        Some(info)
    }

    /// Whether this coordinator's journal is fenced from the run (another took it).
    pub fn fenced(&self, run: FlowRunId) -> bool {
        self.shared.journal.fenced(run)
    }

    /// Whether this coordinator hosts the run now.
    pub fn hosts(&self, run: FlowRunId) -> bool {
        self.shared.runs.contains_key(&run)
    }

    /// The leases, when several coordinators share NATS.
    pub fn leases(&self) -> Option<&Arc<crate::ha::Leases>> {
        self.shared.config.ownership.0.as_ref()
    }

    /// Ends FAILED an unfinished run that cannot resume: its flow FAILED event, and its
    /// end journaled.
    async fn end_unresumable(&self, run: FlowRunId, flow: &str, replay: &Replay, why: &str) {
        self.publish_rejection(run, replay.events.as_ref(), why);
        let summary = RunInfo {
            error: Some(why.to_string()),
            ..StatsSnapshot::default().run_info(run, flow, FlowStatus::Failed, 0)
        };
        self.shared.journal.append(
            run,
            JournalEntry::RunEnded {
                status: FlowStatus::Failed,
                summary: Some(summary),
                params: Some(replay.params.clone()),
                result_ref: None,
                result_lost: false,
            },
        );
        if let Err(e) = self.shared.journal.flush().await {
            tracing::error!(flow_run_id = %run, error = %e, "could not journal the end of a run that cannot resume");
        }
        self.flush_events().await;
    }

    /// Starts a run with extra options (idempotency key, results passed in, events).
    ///
    /// A run id names one run: a flow and its parameters (as the flow takes them,
    /// defaults filled in). If the id is known here or to the journal:
    /// - with another flow or other parameters, the run is refused
    ///   ([`StartError::OtherRun`], naming both);
    /// - a run that ended SUCCESS answers its recorded outcome at once (nothing runs;
    ///   its flow SUCCESS event is published again);
    /// - a run that ended FAILED runs again, reusing its successful calls; an
    ///   unfinished one (its process died) resumes with every journaled outcome;
    /// - a run active here is [`StartError::AlreadyRunning`].
    ///
    /// Any other failure to start publishes the run's flow FAILED event.
    pub async fn start_run_with(
        &self,
        flow: &'static FlowDef,
        params: Map<String, Value>,
        flow_run_id: FlowRunId,
        options: RunOptions,
    ) -> Result<RunHandle, StartError> {
        let events = options
            .events
            .clone()
            .unwrap_or_else(|| self.default_events());
        // one start of a run id at a time in this process (an API start and a takeover
        // of the same run may meet): the second sees the first's runner
        let gate = self
            .shared
            .starting
            .entry(flow_run_id)
            .or_default()
            .value()
            .clone();
        let started = {
            let _one = gate.lock().await;
            self.try_start(flow, params, flow_run_id, options, &events)
                .await
        };
        self.shared
            .starting
            .remove_if(&flow_run_id, |_, g| Arc::strong_count(g) <= 2);
        drop(gate);
        if let Err(e) = &started {
            // an id that names a run is that run's: nothing is published under it
            if !e.is_conflict() && !self.names_a_run(flow_run_id).await {
                self.publish_rejection(flow_run_id, Some(&events), &e.to_string());
            }
        }
        started
    }

    async fn try_start(
        &self,
        flow: &'static FlowDef,
        params: Map<String, Value>,
        flow_run_id: FlowRunId,
        options: RunOptions,
        events: &EventContext,
    ) -> Result<RunHandle, StartError> {
        let pinazu_shared::registry::FlowStart { params, body } = (flow.invoke)(params)?;
        let what = || format!("flow run {flow_run_id}");
        // a run this coordinator started
        let known = self
            .shared
            .table
            .get(&flow_run_id)
            .map(|e| (e.flow, e.params.clone(), e.outcome.borrow().clone()));
        if let Some((known_flow, known_params, outcome)) = &known {
            same_run(what, (known_flow, known_params), flow, &params, RUN_ID_HINT)?;
            match outcome {
                None => return Err(StartError::AlreadyRunning(flow_run_id)),
                Some(o) if o.status == FlowStatus::Success => {
                    return Ok(self.answer_recorded(flow, params, o.clone(), events, options));
                }
                Some(_) => {}
            }
        }
        // no other process runs it meanwhile (a journal shared by processes)
        let claim = match self
            .shared
            .journal
            .claim(flow_run_id)
            .map_err(|e| StartError::Journal(e.to_string()))?
        {
            Claim::Held(guard) => guard,
            Claim::Taken(holder) => {
                return Err(StartError::RunningElsewhere {
                    run: flow_run_id,
                    holder,
                })
            }
        };
        // one coordinator hosts a run: claimed before its journal is read (the first
        // append after the read then fences any previous host out, `journal_js.rs`);
        // given back unless a runner starts here
        let mut claimed = None;
        if let Some(leases) = &self.shared.config.ownership.0 {
            match leases
                .claim(flow_run_id)
                .await
                .map_err(StartError::Journal)?
            {
                crate::ha::Owned::Mine => {
                    claimed = Some(crate::ha::Claimed::new(leases.clone(), flow_run_id));
                    // what an earlier host of this run left in this process's writer
                    self.shared.journal.unfence(flow_run_id);
                }
                crate::ha::Owned::By(coordinator) => {
                    return Err(StartError::OwnedElsewhere {
                        run: flow_run_id,
                        coordinator,
                    })
                }
            }
        }
        // the journal: a successful run's latest entry says all (no need to read it all)
        if let Some(JournalEntry::RunEnded {
            status: FlowStatus::Success,
            summary: Some(summary),
            params: Some(journaled),
            result_ref,
            result_lost: false,
        }) = self
            .shared
            .journal
            .latest(flow_run_id)
            .await
            .map_err(|e| StartError::Journal(e.to_string()))?
        {
            same_run(
                what,
                (&summary.flow, &journaled),
                flow,
                &params,
                RUN_ID_HINT,
            )?;
            let outcome = self.recorded_outcome(&summary, result_ref).await;
            return Ok(self.answer_recorded(flow, params, outcome, events, options));
        }
        let entries = self
            .shared
            .journal
            .read(flow_run_id)
            .await
            .map_err(|e| StartError::Journal(e.to_string()))?;
        let mut replay = Replay::from_entries(&entries);
        if let Some(r) = &replay {
            same_run(what, (&r.flow, &r.params), flow, &params, RUN_ID_HINT)?;
            if let (Some(FlowStatus::Success), Some(summary), false) =
                (r.ended, &r.summary, r.result_lost)
            {
                let outcome = self.recorded_outcome(summary, r.result_ref.clone()).await;
                return Ok(self.answer_recorded(flow, params, outcome, events, options));
            }
        }
        if let Some(r) = replay.as_mut() {
            r.load_refs(&*self.shared.store).await;
        }
        // a resume keeps its first start's time, so its wall time goes on
        let now_ms = pinazu_shared::events::now_ms();
        let started_at_ms = replay
            .as_ref()
            .filter(|r| r.unfinished)
            .and_then(|r| r.started_at_ms)
            .unwrap_or(now_ms);
        // an unfinished run started again without a priority or parent keeps its own
        let meta = match replay.as_ref().filter(|r| r.unfinished) {
            Some(r) if options.meta.is_plain() => r.meta,
            _ => options.meta,
        };
        // durable before anyone hears of the run (its events, the API's answer): a
        // coordinator killed right after still resumes it
        if self.shared.journal.enabled() {
            self.shared.journal.append(
                flow_run_id,
                JournalEntry::RunStarted {
                    flow: flow.name.to_string(),
                    params: params.clone(),
                    idempotency_key: options.idempotency_key.clone(),
                    events: Some(events.clone()),
                    started_at_ms: Some(started_at_ms),
                    meta,
                },
            );
            self.shared
                .journal
                .flush()
                .await
                .map_err(|e| StartError::Journal(e.to_string()))?;
            if self.shared.journal.fenced(flow_run_id) {
                // another process appended between the read and this start's first
                // append (a previous owner that woke up): not started; it is taken again
                // at the next look for orphans, or by the client submitting it again
                return Err(StartError::Journal(format!(
                    "flow run {flow_run_id}: another process wrote its journal while it was being started here; not started (try again)"
                )));
            }
        }
        if let Some(key) = &options.idempotency_key {
            self.shared.remember_key(key.clone(), flow_run_id);
        }
        let stats = Arc::new(RunStats::started_at(started_at_ms));
        let (tx, rx) = watch::channel(None);
        self.shared.table.insert(
            flow_run_id,
            RunEntry {
                flow: flow.name,
                params: params.clone(),
                started: std::time::Instant::now(),
                stats: stats.clone(),
                outcome: rx.clone(),
                parent: meta.parent,
            },
        );
        let args = FlowRunnerArgs {
            flow_run_id,
            flow,
            body,
            shared: self.shared.clone(),
            stats: stats.clone(),
            outcome: tx,
            params,
            replay,
            seeds: Arc::new(options.seeds),
            start_delay: options.start_delay,
            header: Arc::new(RunHeader::new(events.clone())),
            claim,
            meta,
        };
        // the runner registers itself in `runs` before its body starts
        if let Err(e) = Actor::spawn(None, FlowRunner, args).await {
            self.shared.table.remove(&flow_run_id);
            return Err(StartError::Spawn(e.to_string()));
        }
        // the runner hosts it now: the claim stays
        if let Some(c) = claimed {
            c.keep();
        }
        Ok(RunHandle {
            flow_run_id,
            stats,
            outcome: rx,
        })
    }

    /// The outcome an ended run's journal records (its result loaded from the store
    /// when it was too large for the journal).
    async fn recorded_outcome(
        &self,
        summary: &RunInfo,
        result_ref: Option<String>,
    ) -> FlowRunOutcome {
        let mut outcome = FlowRunOutcome::from_info(summary);
        if let (None, Some(key)) = (&outcome.result, result_ref) {
            match self.shared.store.get(&key).await {
                Ok(Some(bytes)) => outcome.result = serde_json::from_slice(&bytes).ok(),
                other => {
                    tracing::warn!(flow_run_id = %summary.flow_run_id, key, error = ?other.err(), "the run's result is no longer in the store; answering without it")
                }
            }
        }
        outcome
    }

    /// A successful run's id given again: its recorded outcome, at once (its flow
    /// SUCCESS event is published again, for whoever launched it this time).
    fn answer_recorded(
        &self,
        flow: &'static FlowDef,
        params: Map<String, Value>,
        outcome: FlowRunOutcome,
        events: &EventContext,
        options: RunOptions,
    ) -> RunHandle {
        let id = outcome.flow_run_id;
        tracing::info!(flow_run_id = %id, flow = flow.name, "this run already succeeded; answering its recorded outcome");
        let _ = self.shared.status.send_message(StatusMsg::Flow(
            Arc::new(RunHeader::new(events.clone())),
            FlowStatusMessage {
                flow_run_id: id,
                status: FlowStatus::Success,
                error_message: None,
                traceback: None,
                event_timestamp: now_timestamp(),
            },
        ));
        if let Some(key) = options.idempotency_key {
            self.shared.remember_key(key, id);
        }
        let stats = Arc::new(RunStats::default());
        let (_, rx) = watch::channel(Some(outcome));
        self.shared.table.insert(
            id,
            RunEntry {
                flow: flow.name,
                params,
                started: std::time::Instant::now(),
                stats: stats.clone(),
                outcome: rx.clone(),
                parent: options.meta.parent,
            },
        );
        self.shared.retire(id);
        RunHandle {
            flow_run_id: id,
            stats,
            outcome: rx,
        }
    }

    /// Waits until every status event published so far is delivered.
    pub async fn flush_events(&self) {
        let _ = ractor::call!(self.shared.status, StatusMsg::Flush);
    }

    /// Resolves once every message sent so far to the given runs is handled and the
    /// journal entries they appended are durable. A report batch is acknowledged to its
    /// agent only after this, so a result the coordinator accepted is never lost.
    pub async fn settle_runs(&self, runs: Vec<FlowRunId>) -> Result<(), String> {
        let mut waits = Vec::with_capacity(runs.len());
        for run in runs {
            if let Some(r) = self.shared.runs.get(&run) {
                let (tx, rx) = tokio::sync::oneshot::channel();
                if r.send_message(FlowRunnerMsg::Barrier(tx)).is_ok() {
                    waits.push(rx);
                }
            }
        }
        for w in waits {
            // a runner that stopped meanwhile has ended its run, journal flushed
            let _ = w.await;
        }
        self.shared.journal.flush().await.map_err(|e| e.to_string())
    }

    /// Reports that arrived for runs not hosted here (late or misrouted).
    pub fn unknown_run_reports(&self) -> u64 {
        self.shared.unknown_run_reports.load(Relaxed)
    }
}

/// How long an ended attempt ran, if it ran (a cancelled or unrunnable one reports no
/// time): the scheduler sizes agents' windows from it.
fn ran_for(f: &AttemptFinished) -> Option<u64> {
    (f.outcome.is_ok() || f.elapsed_us > 0).then_some(f.elapsed_us)
}

/// Routes agents' reports: slot accounting to the scheduler, outcomes to the run's runner.
struct Inbound {
    shared: Arc<CoordShared>,
}

impl Inbound {
    fn route(&self, run: FlowRunId, msg: FlowRunnerMsg) {
        match self.shared.runs.get(&run) {
            Some(runner) => {
                let _ = runner.send_message(msg);
            }
            None => {
                self.shared.unknown_run_reports.fetch_add(1, Relaxed);
                tracing::debug!(flow_run_id = %run, "report for a run that is not active here; dropped");
            }
        }
    }
}

impl ResultSink for Inbound {
    fn started(&self, started: AttemptStarted) {
        self.route(started.flow_run_id, FlowRunnerMsg::Started(started));
    }

    fn finished(&self, finished: AttemptFinished) {
        let _ = self
            .shared
            .scheduler
            .send_message(SchedulerMsg::SlotsFreed(vec![(
                finished.flow_run_id,
                finished.attempt_id,
                ran_for(&finished),
            )]));
        self.route(finished.flow_run_id, FlowRunnerMsg::Finished(finished));
    }

    /// One `SlotsFreed` for the batch, and one `Reports` per run.
    fn report(&self, reports: Vec<Report>) {
        let mut freed = Vec::new();
        let mut per_run: Vec<(FlowRunId, Vec<Report>)> = Vec::new();
        for r in reports {
            let run = match &r {
                Report::Started(s) => s.flow_run_id,
                Report::Finished(f) => {
                    freed.push((f.flow_run_id, f.attempt_id, ran_for(f)));
                    f.flow_run_id
                }
            };
            match per_run.iter_mut().find(|(id, _)| *id == run) {
                Some((_, v)) => v.push(r),
                None => per_run.push((run, vec![r])),
            }
        }
        if !freed.is_empty() {
            let _ = self
                .shared
                .scheduler
                .send_message(SchedulerMsg::SlotsFreed(freed));
        }
        for (run, batch) in per_run {
            self.route(run, FlowRunnerMsg::Reports(batch));
        }
    }
}
