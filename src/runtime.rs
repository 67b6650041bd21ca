//! The embedded runtime: a coordinator and N agents in one process, talking through
//! in-process actor messages across the same `AgentLink` / `ResultSink` seam the NATS
//! transport implements.

use dashmap::DashMap;
use ractor::ActorRef;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use pinazu_agent::{spawn_agent, AgentConfig, AgentMsg};
use pinazu_coordinator::journal::{Journal, NoJournal};
use pinazu_coordinator::{
    Coordinator, CoordinatorConfig, EventSink, FlowRunOutcome, JournalHandle, LogSink, RunHandle,
    RunOptions, SchedulerTiming, StartError,
};
use pinazu_shared::error::{ConfigError, ParamError};
use pinazu_shared::events::{EventHeader, FlowStatus};
use pinazu_shared::ids::{AgentId, AttemptId, FlowRunId};
use pinazu_shared::options::CachePolicy;
use pinazu_shared::registry::{FlowDef, Registry, RegistryError};
use pinazu_shared::store::{LocalDirStore, ObjectStore};
use pinazu_shared::transport::AgentLink;
use pinazu_shared::wire::SpawnTask;

/// Why a flow could not run, or how it failed.
#[derive(Debug, thiserror::Error)]
pub enum FlowError {
    /// Two definitions share a name.
    #[error("{0}")]
    Registry(#[from] RegistryError),
    /// No flow of that name.
    #[error("flow `{name}` is not defined in this program; flows: {known}")]
    UnknownFlow {
        /// The name asked for.
        name: String,
        /// The flows there are.
        known: String,
    },
    /// Bad parameters.
    #[error(transparent)]
    Params(#[from] ParamError),
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The run ended FAILED.
    #[error("flow `{flow}` (run {flow_run_id}) failed: {error}")]
    Failed {
        /// The flow.
        flow: String,
        /// The run.
        flow_run_id: FlowRunId,
        /// The error.
        error: String,
        /// The error chain.
        traceback: Option<String>,
    },
    /// The result did not decode into the expected type.
    #[error("flow `{flow}`: result could not be decoded: {reason}")]
    InvalidResult {
        /// The flow.
        flow: String,
        /// Why.
        reason: String,
    },
    /// The run could not start (its id names another run, it is running already, its
    /// journal cannot be read, ...).
    #[error(transparent)]
    Start(StartError),
    /// The runtime could not start or run the flow.
    #[error("runtime: {0}")]
    Runtime(String),
}

impl From<StartError> for FlowError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::Params(p) => FlowError::Params(p),
            other => FlowError::Start(other),
        }
    }
}

/// Settings of an embedded runtime.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// In-process agents (default: one per core).
    pub agents: usize,
    /// Slots per agent: attempts each runs at once (default 4, like the original pool).
    pub slots: u32,
    /// Labels of the in-process agents (`k=v`); `None` (the default): every label some
    /// task requires, so every task can run in-process.
    pub labels: Option<Vec<(String, String)>>,
    /// Root of the local cache store (default `.pinazu/cache`).
    pub cache_dir: PathBuf,
    /// Policy of tasks that set none (`run` with `ENABLE_S3_CACHING=true`).
    pub default_cache: CachePolicy,
    /// Execute cached calls anyway and overwrite their entries.
    pub refresh_cache: bool,
    /// Header of every status event.
    pub header: EventHeader,
    /// Where status events go (default: the log, at debug level).
    pub events: Arc<dyn EventSink>,
    /// The cache store (default: a `LocalDirStore` at `cache_dir`).
    pub store: Option<Arc<dyn ObjectStore>>,
    /// Where runs are journaled so they can be resumed (default: not journaled; the CLI
    /// journals to `.pinazu/journal`).
    pub journal: Option<Arc<dyn Journal>>,
    /// Named limits' sizes (`--limit openai=20`).
    pub limits: Vec<(String, pinazu_shared::options::NamedLimit)>,
}

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeConfig")
            .field("agents", &self.agents)
            .field("slots", &self.slots)
            .field("cache_dir", &self.cache_dir)
            .field("default_cache", &self.default_cache)
            .field("refresh_cache", &self.refresh_cache)
            .finish_non_exhaustive()
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            agents: std::thread::available_parallelism().map_or(2, |n| n.get()),
            slots: 4,
            labels: None,
            cache_dir: PathBuf::from(".pinazu/cache"),
            default_cache: CachePolicy::None,
            refresh_cache: false,
            header: EventHeader::default(),
            events: Arc::new(LogSink),
            store: None,
            journal: None,
            limits: Vec::new(),
        }
    }
}

/// Reads a boolean environment variable the way the original did (`true`/`1`/`yes`).
pub fn env_flag(name: &str) -> Result<bool, ConfigError> {
    match std::env::var(name) {
        Err(_) => Ok(false),
        Ok(v) => match v.trim().to_ascii_lowercase().as_str() {
            "" | "0" | "false" | "no" | "off" => Ok(false),
            "1" | "true" | "yes" | "on" => Ok(true),
            _ => Err(ConfigError::Invalid {
                name: name.into(),
                value: v,
                reason: "expected true or false".into(),
            }),
        },
    }
}

impl RuntimeConfig {
    /// Defaults, then the environment: `ENABLE_S3_CACHING=true` makes `run` the policy of
    /// tasks that set none (as the original did); `PINAZU_CACHE_DIR` sets the local store.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut c = RuntimeConfig::default();
        if env_flag("ENABLE_S3_CACHING")? {
            c.default_cache = CachePolicy::Run;
        }
        if let Ok(dir) = std::env::var("PINAZU_CACHE_DIR") {
            if !dir.trim().is_empty() {
                c.cache_dir = PathBuf::from(dir);
            }
        }
        Ok(c)
    }
}

/// In-process `AgentLink`: attempts go straight into the agent actors' mailboxes.
#[derive(Default)]
struct EmbeddedLink {
    agents: DashMap<AgentId, ActorRef<AgentMsg>>,
}

impl AgentLink for EmbeddedLink {
    fn spawn(&self, agent: &AgentId, tasks: Vec<SpawnTask>) {
        if let Some(a) = self.agents.get(agent) {
            let _ = a.send_message(AgentMsg::Spawn(tasks));
        }
    }

    fn cancel(&self, agent: &AgentId, attempts: Vec<(FlowRunId, AttemptId)>) {
        if let Some(a) = self.agents.get(agent) {
            let _ = a.send_message(AgentMsg::Cancel(attempts));
        }
    }

    fn steal(
        &self,
        agent: &AgentId,
        epochs: Vec<u32>,
        max: u32,
    ) -> pinazu_shared::BoxFuture<'static, Vec<SpawnTask>> {
        let a = self.agents.get(agent).map(|a| a.clone());
        Box::pin(async move {
            let Some(a) = a else {
                return Vec::new();
            };
            let ask = pinazu_agent::agent::StealAsk {
                epochs: Some(epochs),
                max: max as usize,
                max_bytes: usize::MAX,
            };
            ractor::call!(a, AgentMsg::Steal, ask).unwrap_or_default()
        })
    }
}

struct Inner {
    coordinator: Coordinator,
    registry: &'static Registry,
    agents: Vec<ActorRef<AgentMsg>>,
}

/// A running Pinazu Flows runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

tokio::task_local! {
    static CURRENT: Runtime;
}

static GLOBAL: tokio::sync::OnceCell<Runtime> = tokio::sync::OnceCell::const_new();

impl Runtime {
    /// Starts a coordinator and `config.agents` agents in this process.
    pub async fn embedded(config: RuntimeConfig) -> Result<Runtime, FlowError> {
        let registry = Registry::global()?;
        let link = Arc::new(EmbeddedLink::default());
        let labels = config
            .labels
            .clone()
            .unwrap_or_else(|| registry.required_labels());
        let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // no agent joins an embedded run later: an attempt no in-process agent can run
        // fails at once, saying how their labels are chosen
        let timing = SchedulerTiming {
            schedule_timeout: std::time::Duration::ZERO,
            no_agent_hint: Some(Arc::from(format!(
                "the in-process agents have labels [{}]: embedded runs serve every label a task requires unless --labels restricts them",
                shown.join(",")
            ))),
            ..SchedulerTiming::default()
        };
        let store = config.store.clone().unwrap_or_else(|| {
            Arc::new(pinazu_shared::breaker::BreakerStore::new(
                LocalDirStore::new(config.cache_dir.clone()),
            ))
        });
        let coordinator = Coordinator::start(
            CoordinatorConfig {
                header: config.header.clone(),
                default_cache: config.default_cache,
                refresh_cache: config.refresh_cache,
                journal: JournalHandle(
                    config
                        .journal
                        .clone()
                        .unwrap_or_else(|| Arc::new(NoJournal)),
                ),
                timing,
                ownership: Default::default(),
                // (an embedded run's page lives as long as its process)
                keep_call_logs: false,
                // (in-process: the body's lines are in this process's log already)
                flow_logs: Default::default(),
                limits: config.limits.clone(),
                // (one process: every run is here)
                remote_cancel: Default::default(),
            },
            link.clone(),
            store,
            config.events.clone(),
        )
        .await
        .map_err(|e| FlowError::Runtime(format!("could not start the coordinator: {e}")))?;
        let sink = coordinator.result_sink();
        let mut agents = Vec::new();
        for i in 0..config.agents.max(1) {
            let agent_config = AgentConfig {
                id: AgentId(format!("embedded-{i}")),
                slots: config.slots.max(1),
                labels: labels.clone(),
                registry,
            };
            let info = agent_config.info();
            let agent = spawn_agent(agent_config, sink.clone())
                .await
                .map_err(|e| FlowError::Runtime(format!("could not start agent {i}: {e}")))?;
            link.agents.insert(info.agent_id.clone(), agent.clone());
            coordinator.register_agent(info);
            agents.push(agent);
        }
        tracing::debug!(
            agents = agents.len(),
            slots = config.slots,
            "embedded runtime started"
        );
        Ok(Runtime {
            inner: Arc::new(Inner {
                coordinator,
                registry,
                agents,
            }),
        })
    }

    /// The runtime typed flow calls use: the one set by [`Runtime::scope`], else a
    /// process-wide embedded runtime configured from the environment.
    pub async fn current() -> Result<Runtime, FlowError> {
        if let Ok(rt) = CURRENT.try_with(Clone::clone) {
            return Ok(rt);
        }
        GLOBAL
            .get_or_try_init(|| async { Runtime::embedded(RuntimeConfig::from_env()?).await })
            .await
            .cloned()
    }

    /// Runs `fut` with this runtime as the current one (for typed flow calls inside it).
    pub async fn scope<F: Future>(&self, fut: F) -> F::Output {
        CURRENT.scope(self.clone(), fut).await
    }

    /// The coordinator.
    pub fn coordinator(&self) -> &Coordinator {
        &self.inner.coordinator
    }

    /// Every task and flow of this program.
    pub fn registry(&self) -> &'static Registry {
        self.inner.registry
    }

    /// Looks a flow up by name.
    pub fn flow(&self, name: &str) -> Result<&'static FlowDef, FlowError> {
        self.inner
            .registry
            .flow(name)
            .ok_or_else(|| FlowError::UnknownFlow {
                name: name.to_string(),
                known: known(self.inner.registry.flow_names()),
            })
    }

    /// Starts a run of the flow `name` with named parameters.
    pub async fn start(
        &self,
        name: &str,
        params: Map<String, Value>,
        flow_run_id: FlowRunId,
    ) -> Result<RunHandle, FlowError> {
        self.start_with(name, params, flow_run_id, RunOptions::default())
            .await
    }

    /// Starts a run with options (idempotency key, results passed in). A run id the
    /// journal knows is replayed: unfinished runs resume, ended ones reuse their results.
    pub async fn start_with(
        &self,
        name: &str,
        params: Map<String, Value>,
        flow_run_id: FlowRunId,
        options: RunOptions,
    ) -> Result<RunHandle, FlowError> {
        let def = self.flow(name)?;
        Ok(self
            .inner
            .coordinator
            .start_run_with(def, params, flow_run_id, options)
            .await?)
    }

    /// Runs the flow `name` to its end.
    pub async fn run(
        &self,
        name: &str,
        params: Map<String, Value>,
        flow_run_id: FlowRunId,
    ) -> Result<FlowRunOutcome, FlowError> {
        let handle = self.start(name, params, flow_run_id).await?;
        self.inner
            .coordinator
            .outcome(handle)
            .await
            .map_err(FlowError::Runtime)
    }

    /// Stops the agents after delivering pending events.
    pub async fn shutdown(&self) {
        self.inner.coordinator.flush_events().await;
        for a in &self.inner.agents {
            a.stop(None);
        }
    }
}

fn known(names: Vec<&str>) -> String {
    if names.is_empty() {
        "(none)".into()
    } else {
        names.join(", ")
    }
}

/// What a typed flow call (the function `#[flow]` generates) does: runs the flow on the
/// current runtime and decodes its result.
pub async fn run_flow<T: DeserializeOwned>(
    def: &'static FlowDef,
    params: Map<String, Value>,
) -> Result<T, FlowError> {
    // in a flow: a child run of the flow that calls it
    if pinazu_coordinator::context::in_flow() {
        return match pinazu_coordinator::context::call_flow(def, params).await {
            Some(Ok(outcome)) => typed_outcome(def, outcome),
            Some(Err(why)) => Err(FlowError::Runtime(format!(
                "child flow `{}`: {why}",
                def.name
            ))),
            None => Err(FlowError::Runtime("not in a flow".into())),
        };
    }
    let rt = Runtime::current().await?;
    let outcome = rt
        .inner
        .coordinator
        .start_run(def, params, FlowRunId::new())
        .await?;
    let outcome = rt
        .inner
        .coordinator
        .outcome(outcome)
        .await
        .map_err(FlowError::Runtime)?;
    typed_outcome(def, outcome)
}

/// A run's outcome as the flow function's typed result.
fn typed_outcome<T: DeserializeOwned>(
    def: &'static FlowDef,
    outcome: pinazu_coordinator::FlowRunOutcome,
) -> Result<T, FlowError> {
    match outcome.status {
        FlowStatus::Success => T::deserialize(outcome.result.unwrap_or(Value::Null)).map_err(|e| {
            FlowError::InvalidResult {
                flow: def.name.to_string(),
                reason: e.to_string(),
            }
        }),
        _ => Err(FlowError::Failed {
            flow: def.name.to_string(),
            flow_run_id: outcome.flow_run_id,
            error: outcome.error.unwrap_or_default(),
            traceback: outcome.traceback,
        }),
    }
}
