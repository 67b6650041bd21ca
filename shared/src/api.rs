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
    /// Task names it serves.
    pub tasks: Vec<String>,
    /// Its labels.
    pub labels: Vec<(String, String)>,
    /// Draining (takes no new work).
    pub draining: bool,
    /// Milliseconds since its last heartbeat (0 for in-process agents).
    pub last_seen_ms: u64,
}
