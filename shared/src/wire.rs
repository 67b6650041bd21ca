//! Messages between the coordinator and agents. In distributed mode they travel as
//! MessagePack with named fields inside a versioned envelope (`codec`).

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::error::ErrorInfo;
use crate::ids::{AgentId, AttemptId, CallId, FlowRunId};

/// Coordinator -> agent: run one attempt of a call.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SpawnTask {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The call.
    pub call_id: CallId,
    /// This attempt.
    pub attempt_id: AttemptId,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Task name.
    pub task: Arc<str>,
    /// MessagePack argument tuple (empty when `args_ref` is set).
    pub args: Bytes,
    /// Object-store key of the arguments, when they were too large for a message.
    #[serde(default)]
    pub args_ref: Option<String>,
    /// Stop the attempt after this long.
    pub timeout_ms: Option<u64>,
    /// Labels (`k=v`) an agent must have to run this task.
    #[serde(default)]
    pub requires: Vec<(String, String)>,
    /// Compute the call's MD5 cache key with the result (for its SUCCESS event): the
    /// agent has the arguments decoded already, and spares the coordinator the work.
    #[serde(default)]
    pub want_key: bool,
    /// The W3C `traceparent` of the call's span, whose child the attempt's span is
    /// (feature `otel`; a thin box: this struct travels in every dispatch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<Box<String>>,
    /// What the scheduler needs and agents do not (never on the wire): the task's
    /// limits, the value of its limit key, the run's priority.
    #[serde(skip)]
    pub sched: Option<Box<SchedInfo>>,
}

/// A queued attempt's limits and priority, for the scheduler (a thin box on `SpawnTask`:
/// `None` for the common attempt with no limit and priority 0).
#[derive(Clone, Debug, Default)]
pub struct SchedInfo {
    /// The task's limits.
    pub limits: crate::options::TaskLimits,
    /// The value of the task's limit key, when it has one.
    pub key: Option<Arc<str>>,
    /// Higher runs first when slots are scarce.
    pub priority: i32,
}

/// Agent -> coordinator: an attempt started executing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttemptStarted {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The call.
    pub call_id: CallId,
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Who runs it.
    pub agent_id: AgentId,
}

/// Agent -> coordinator: an attempt ended.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AttemptFinished {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The call.
    pub call_id: CallId,
    /// The attempt.
    pub attempt_id: AttemptId,
    /// Who ran it.
    pub agent_id: AgentId,
    /// MessagePack result (empty when `result_ref` is set), or the failure.
    pub outcome: Result<Bytes, ErrorInfo>,
    /// Object-store key of the result, when it was too large for a message.
    #[serde(default)]
    pub result_ref: Option<String>,
    /// How long the attempt ran, in microseconds.
    pub elapsed_us: u64,
    /// The call's MD5 cache key (the original library's), computed by the agent from
    /// the decoded arguments when the attempt asked for it (`SpawnTask::want_key`).
    /// (`Box<str>`: this struct travels in every attempt report; kept small.)
    #[serde(default)]
    pub result_cache_key: Option<Box<str>>,
    /// The attempt's own log lines (its `tracing` events), bounded
    /// (`task_context::LOG_LINES_MAX`, `LOG_BYTES_MAX`), with a mark when cut. (A thin
    /// box: this struct travels in every report and runner message, kept small.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logs: Option<Box<String>>,
}

/// An agent's advertisement: what it runs and how much at once.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its id.
    pub agent_id: AgentId,
    /// Attempts it runs at once.
    pub slots: u32,
    /// Task names it can run.
    pub tasks: Vec<String>,
    /// Labels (`k=v`) tasks may require.
    pub labels: Vec<(String, String)>,
    /// It keeps attempts beyond its slots waiting in a queue of its own, and hands
    /// waiting ones back when asked (`P.agent.<id>.steal`): the scheduler may send it
    /// more than its free slots. (Absent from agents older than that: false.)
    #[serde(default)]
    pub queues: bool,
}

/// Which process holds an agent id (the answer on `P.agent.<id>.whois`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentIdentity {
    /// The id.
    pub agent_id: AgentId,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: u32,
    /// When it started (RFC 3339).
    pub since: String,
    /// Random per process.
    pub incarnation: u64,
}

impl AgentIdentity {
    /// Of two processes claiming one id, the one that started first keeps it.
    pub fn older_than(&self, other: &AgentIdentity) -> bool {
        (&self.since, self.incarnation) < (&other.since, other.incarnation)
    }
}

impl std::fmt::Display for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {} (running since {})",
            self.pid, self.host, self.since
        )
    }
}

/// Agent -> coordinator, every second: who it is and what it is running.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The advertisement.
    pub info: AgentInfo,
    /// Attempts running now, and those waiting in its queue (`queued`); bounded by its
    /// slots plus the few the scheduler keeps waiting there, so a heartbeat stays small.
    /// A restarted coordinator re-attaches the ones its resumed runs still need.
    pub running: Vec<RunningAttempt>,
    /// Draining: finish what runs, take nothing new.
    pub draining: bool,
    /// The agent is exiting now; forget it at once.
    pub leaving: bool,
}

/// An attempt an agent is running, as its heartbeat lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RunningAttempt {
    /// The run.
    pub flow_run_id: FlowRunId,
    /// The call.
    pub call_id: CallId,
    /// The attempt.
    pub attempt_id: AttemptId,
    /// It waits in the agent's queue: not started yet.
    #[serde(default)]
    pub queued: bool,
}

impl RunningAttempt {
    /// An attempt that runs (not `queued`).
    pub fn new(flow_run_id: FlowRunId, call_id: CallId, attempt_id: AttemptId) -> Self {
        RunningAttempt {
            flow_run_id,
            call_id,
            attempt_id,
            queued: false,
        }
    }
}

/// Coordinator -> agent (`P.agent.<id>.steal`, request/reply): hand back attempts that
/// wait in your queue, unstarted; the reply is the `Vec<SpawnTask>` handed back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StealRequest {
    /// Only attempts of the coordinator process with this epoch (the asker's)...
    pub epoch: u32,
    /// At most this many.
    pub max: u32,
    /// ...or with one of these (earlier processes whose attempts the asker re-attached
    /// after a restart).
    #[serde(default)]
    pub also: Vec<u32>,
}

/// Agent -> coordinator: a batch of reports. Batches holding results are numbered and
/// kept by the agent until the coordinator acknowledges them (`ReportAck`), so a result
/// is not lost if the coordinator dies before it has journaled it: the agent sends what
/// is unacknowledged again when a coordinator (re)starts or after a while without ack.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportBatch {
    /// The agent.
    pub agent_id: AgentId,
    /// Random per agent process: an agent restarted under the same id starts its
    /// numbering again, and the coordinator must know.
    pub incarnation: u64,
    /// This batch's number; consecutive per agent process, from 1.
    pub seq: u64,
    /// The highest batch number the agent has seen acknowledged when it sent this one:
    /// every batch above it and below `seq` was sent before this one.
    pub acked: u64,
    /// The reports.
    pub reports: Vec<Report>,
}

/// Coordinator -> agent: every report batch up to `seq` is handled durably (its results
/// are in the journal, or in the runner when there is no journal).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReportAck {
    /// The highest batch number acknowledged; all below it are, too.
    pub seq: u64,
    /// The agent process whose batches these are (an acknowledgement meant for the
    /// process that had the id before must not clear a new one's batches). Absent from
    /// older coordinators: 0, taken as "any".
    #[serde(default)]
    pub incarnation: u64,
    /// With several coordinators, each acknowledges the reports of the runs it is
    /// responsible for (those it hosts, and those nobody hosts): the agent keeps a
    /// batch until every run in it is acknowledged. `None`: every run (one coordinator).
    #[serde(default)]
    pub runs: Option<Vec<FlowRunId>>,
}

/// One attempt report, batched on the reports subject.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Report {
    /// An attempt started.
    Started(AttemptStarted),
    /// An attempt ended.
    Finished(AttemptFinished),
}

/// Object-store key of a large argument or result payload of one attempt.
pub fn payload_key(run: FlowRunId, call: CallId, attempt: AttemptId, what: &str) -> String {
    format!("{}/{call}-{attempt}.{what}", payload_prefix(run))
}

/// Prefix of every large payload of a run (removed when the run ends).
pub fn payload_prefix(run: FlowRunId) -> String {
    format!("payloads/{run}")
}

/// Object-store key of a run's result too large to keep in its journal.
pub fn result_key(run: FlowRunId) -> String {
    format!("results/{run}.json")
}
