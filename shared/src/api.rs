//! The coordinator's request/reply API (`<prefix>.api.<verb>`), used by the CLI's `run`,
//! `status`, `runs`, `cancel` and `agents`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::events::FlowStatus;
use crate::ids::{AgentId, FlowRunId};

/// A request.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ApiRequest {
    /// Start a run (or return the run an idempotency key already started).
    Start {
        /// The flow.
        flow: String,
        /// Named parameters.
        params: Map<String, Value>,
        /// The run id to use (Pinazu Core passes `FLOW_RUN_ID`); generated when absent.
        flow_run_id: Option<FlowRunId>,
        /// The same key returns the same run.
        idempotency_key: Option<String>,
        /// Results of completed tasks passed in (`--success-task-results`, JSON).
        #[serde(default)]
        success_task_results: Option<String>,
        /// Header and trace id of the run's status events (the launcher's).
        #[serde(default)]
        events: Option<crate::events::EventContext>,
        /// Higher runs first when slots are scarce (default 0).
        #[serde(default)]
        priority: i32,
    },
    /// One run's state.
    Status {
        /// The run.
        flow_run_id: FlowRunId,
    },
    /// Every run this coordinator knows.
    Runs,
    /// Cancel a run.
    Cancel {
        /// The run.
        flow_run_id: FlowRunId,
    },
    /// The agents.
    Agents,
    /// A page of one run's task table (served by the coordinator hosting the run, or
    /// from the table it kept in the store when the run ended).
    Calls {
        /// The run.
        flow_run_id: FlowRunId,
        /// Which rows.
        query: CallsQuery,
    },
    /// Runs from the history (the journal's runs stream) and the live coordinators,
    /// most recent first: so they survive every coordinator restarting.
    History(RunsQuery),
    /// The coordinator's store probe: an object an agent must be able to read to share
    /// the coordinator's store (large payloads travel through it).
    StoreProbe,
    /// A run the client could not submit (bad parameters, ...): publish its flow FAILED
    /// event, unless its id names a run already (then the id is that run's).
    Reject {
        /// The run.
        flow_run_id: FlowRunId,
        /// Why it could not start.
        error: String,
        /// Header and trace id of its events.
        #[serde(default)]
        events: Option<crate::events::EventContext>,
    },
    /// The named limits: list them, or size or remove one.
    Limits(LimitsOp),
    /// Schedules: add, list, pause, resume, delete, backfill.
    Schedule(crate::schedule::ScheduleOp),
}

/// What `limits` does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LimitsOp {
    /// The named limits and the gates in use.
    List,
    /// Sizes a named limit (`None`: removes it), for every coordinator.
    Set {
        /// Its name.
        name: String,
        /// Its size.
        size: Option<crate::options::NamedLimit>,
    },
}

/// The named limits and the gates in use on the answering coordinator.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LimitsView {
    /// Named limits by name.
    pub named: Vec<(String, crate::options::NamedLimit)>,
    /// Gates with attempts running or waiting (or a bucket refilling).
    pub gates: Vec<GateView>,
}

/// One gate (a limit, per key when keyed), as `limits list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GateView {
    /// `task` or `limit`.
    pub kind: String,
    /// The task's or the limit's name.
    pub name: String,
    /// The key's value, when keyed.
    pub key: Option<String>,
    /// Its size.
    pub size: crate::options::NamedLimit,
    /// Attempts running through it.
    pub running: u32,
    /// Attempts waiting to pass.
    pub waiting: u64,
}

impl ApiRequest {
    /// Its verb: the last token of the subject it is sent on (`<prefix>.api.<verb>`),
    /// so NATS permissions can grant some verbs only.
    pub fn verb(&self) -> &'static str {
        match self {
            ApiRequest::Start { .. } => "start",
            ApiRequest::Status { .. } => "status",
            ApiRequest::Runs | ApiRequest::History(_) => "runs",
            ApiRequest::Cancel { .. } => "cancel",
            ApiRequest::Agents => "agents",
            ApiRequest::Calls { .. } => "calls",
            ApiRequest::Reject { .. } => "reject",
            ApiRequest::StoreProbe => "store_probe",
            ApiRequest::Limits(_) => "limits",
            ApiRequest::Schedule(_) => "schedule",
        }
    }
}

/// A reply.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum ApiReply {
    /// A run was started, or an existing one returned.
    Started {
        /// The run.
        run: RunInfo,
        /// Whether the run already existed (same idempotency key or run id).
        existing: bool,
    },
    /// One run.
    Run(RunInfo),
    /// Runs.
    Runs(Vec<RunInfo>),
    /// Agents.
    Agents(Vec<AgentSummary>),
    /// A page of a run's task table.
    Calls(Box<CallsPage>),
    /// The named limits and the gates in use.
    Limits(LimitsView),
    /// Schedules.
    Schedules(Vec<crate::schedule::ScheduleView>),
    /// The request could not be served; the message says why.
    Error(String),
    /// No such run is known (not here, not in the journal).
    Unknown(String),
    /// The store probe: the object's key (none if the coordinator could not write it),
    /// what it holds, and which store the coordinator uses.
    StoreProbe {
        /// Object key.
        key: Option<String>,
        /// Its content.
        token: String,
        /// The coordinator's store, as it describes it.
        store: String,
    },
    /// Done.
    Done,
}

/// What an operator sees of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The flow.
    pub flow: String,
    /// RUNNING, SUCCESS or FAILED.
    pub status: FlowStatus,
    /// Calls made so far.
    pub tasks: u64,
    /// Calls resolved so far.
    pub completed: u64,
    /// Attempts that started.
    pub executions: u64,
    /// Calls answered from the cache.
    pub cache_hits: u64,
    /// Retries.
    pub retries: u64,
    /// Calls answered from the journal or from results passed in.
    #[serde(default)]
    pub replayed: u64,
    /// Calls cancelled when the run ended (not among the completed ones).
    #[serde(default)]
    pub cancelled: u64,
    /// Milliseconds since the run started (until it ended).
    pub wall_ms: u64,
    /// The result (JSON), once SUCCESS.
    pub result: Option<Value>,
    /// The error, once FAILED.
    pub error: Option<String>,
    /// A note for the operator (e.g. waiting for an agent that can run a task).
    pub note: Option<String>,
    /// The coordinator that hosts the run (several coordinators); absent when alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// When the run started, or ended once it has (ms since the Unix epoch): the order
    /// of `runs` (set in its answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_ms: Option<u64>,
    /// The run whose flow started this one (a child flow's run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_run_id: Option<FlowRunId>,
}

/// Which runs `runs` lists.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunsQuery {
    /// At most this many (the most recent).
    pub limit: u32,
    /// Only runs with this status.
    pub status: Option<crate::events::FlowStatus>,
    /// Only runs of this flow.
    pub flow: Option<String>,
    /// Only runs started or ended at or after this time (ms since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Only runs started or ended before this time (ms since the Unix epoch): the
    /// next page of a list is the runs before the last one shown (its `at_ms`).
    #[serde(default)]
    pub before_ms: Option<u64>,
}

impl RunsQuery {
    /// Whether a run, with its time (`at_ms`: started, or ended once it has), is one
    /// the query lists (the limit aside).
    pub fn admits(&self, r: &RunInfo, at_ms: u64) -> bool {
        self.status.is_none_or(|s| r.status == s)
            && self.flow.as_deref().is_none_or(|f| r.flow == f)
            && self.since_ms.is_none_or(|t| at_ms >= t)
            && self.before_ms.is_none_or(|t| at_ms < t)
    }
}

/// What an operator sees of an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSummary {
    /// Its id.
    pub agent_id: AgentId,
    /// All slots.
    pub slots: u32,
    /// Attempts running on it.
    pub running: u32,
    /// Attempts waiting in its queue for a slot (pipelined dispatch).
    #[serde(default)]
    pub queued: u32,
    /// Task names it serves.
    pub tasks: Vec<String>,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Draining (takes no new work).
    pub draining: bool,
    /// Milliseconds since its last heartbeat (0 for in-process agents).
    pub last_seen_ms: u64,
    /// Attempts the answering coordinator dispatched to it (since either started).
    #[serde(default)]
    pub attempts: u64,
}

/// Which of a run's calls the task table shows (`ApiRequest::Calls`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallsQuery {
    /// Rows to skip (of the calls that match, in call order).
    pub offset: u64,
    /// At most this many rows (capped at [`CALLS_PAGE_MAX`]).
    pub limit: u32,
    /// Only calls with this status.
    #[serde(default)]
    pub status: Option<CallStatus>,
    /// Only calls of this task.
    #[serde(default)]
    pub task: Option<String>,
    /// Lanes of the timeline to return this wide (pixels; 0: no timeline).
    #[serde(default)]
    pub timeline_width: u32,
    /// Only calls whose attempts left log lines.
    #[serde(default)]
    pub logged: bool,
    /// The rows carry their attempts' log lines.
    #[serde(default)]
    pub with_logs: bool,
}

/// The most rows one page of the task table returns.
pub const CALLS_PAGE_MAX: u32 = 1000;

/// Where a call stands, as the task table shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CallStatus {
    /// Made, waiting for the cache or for a slot.
    Pending,
    /// An attempt runs.
    Running,
    /// An attempt failed; the next one waits for its delay.
    Retrying,
    /// Ended with a result.
    Success,
    /// Ended with an error.
    Failed,
    /// Still unfinished when the run ended.
    Cancelled,
}

impl CallStatus {
    /// Every status, in the order the page lists them.
    pub const ALL: [CallStatus; 6] = [
        CallStatus::Pending,
        CallStatus::Running,
        CallStatus::Retrying,
        CallStatus::Success,
        CallStatus::Failed,
        CallStatus::Cancelled,
    ];

    /// Parses `PENDING`, `running`, ... (as the page and the CLI write them).
    pub fn parse(s: &str) -> Option<CallStatus> {
        CallStatus::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Pending => "PENDING",
            CallStatus::Running => "RUNNING",
            CallStatus::Retrying => "RETRYING",
            CallStatus::Success => "SUCCESS",
            CallStatus::Failed => "FAILED",
            CallStatus::Cancelled => "CANCELLED",
        }
    }
}

/// One row of the task table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CallView {
    /// Position among the run's calls (0-based).
    pub call: u64,
    /// The task.
    pub task: String,
    /// Where it stands.
    pub status: CallStatus,
    /// Attempts dispatched (0 when answered without running).
    pub attempts: u32,
    /// The agent of its last attempt.
    pub agent: Option<String>,
    /// Milliseconds from the run's start: when it was made, when its last attempt
    /// started, when it ended.
    pub queued_ms: u64,
    /// See `queued_ms`.
    pub started_ms: Option<u64>,
    /// See `queued_ms`.
    pub ended_ms: Option<u64>,
    /// Answered from the cache.
    pub cache_hit: bool,
    /// Answered from the run's journal (a resume) or from a result passed in.
    pub replayed: bool,
    /// The error of its last failed attempt (also while retrying).
    pub error: Option<String>,
    /// The error chain of that failure.
    pub traceback: Option<String>,
    /// Its attempts left log lines.
    #[serde(default)]
    pub has_logs: bool,
    /// Those lines (when the query asked `with_logs`), each attempt's after a header.
    #[serde(default)]
    pub logs: Option<String>,
    /// Its result as JSON, cut to 300 bytes (with `with_logs`; kept for results of up
    /// to 96 bytes of MessagePack, a run's first 16 MiB of them).
    #[serde(default)]
    pub result: Option<String>,
}

/// One page of a run's task table, with what the page header and the timeline need.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CallsPage {
    /// Calls made so far.
    pub total: u64,
    /// Calls that match the query's filters.
    pub matching: u64,
    /// The rows asked for.
    pub rows: Vec<CallView>,
    /// Calls per status.
    pub by_status: Vec<(CallStatus, u64)>,
    /// Calls per task name.
    pub by_task: Vec<(String, u64)>,
    /// The run's parameters.
    pub params: Map<String, Value>,
    /// Changes with every row that changes: a page polled again with the same value
    /// has nothing new.
    pub version: u64,
    /// Milliseconds the run has been running (or ran).
    pub span_ms: u64,
    /// Attempts whose logs were not kept (the run's logs passed their bound).
    #[serde(default)]
    pub logs_dropped: u64,
    /// Attempts over time per agent, `timeline_width` columns wide.
    pub timeline: Vec<TimelineLane>,
}

/// One agent's lane of the timeline: per column (`span_ms / width` each), how many of
/// the calls whose last attempt ran there were running, and how many of those failed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineLane {
    /// The agent.
    pub agent: String,
    /// Attempts running, per column.
    pub running: Vec<u32>,
    /// Of those, attempts of calls that failed or were retried, per column.
    pub failed: Vec<u32>,
    /// Attempts drawn in this lane.
    pub attempts: u64,
}
