//! The root actor of an agent: owns its identity and slots, and keeps a `TaskSupervisor`
//! alive (respawning it if it ever fails).

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SpawnErr, SupervisionEvent};
use std::sync::Arc;

use pinazu_shared::ids::{AgentId, AttemptId, FlowRunId};
use pinazu_shared::registry::Registry;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{AgentInfo, SpawnTask};

pub use crate::supervisor::StealAsk;
use crate::supervisor::{SupervisorArgs, SupervisorMsg, TaskSupervisor};

/// What an agent is.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Its id.
    pub id: AgentId,
    /// Attempts it runs at once (more may wait in its queue: the scheduler keeps a few
    /// there so a slot never idles for a dispatch round trip).
    pub slots: u32,
    /// Labels tasks may require.
    pub labels: Vec<(String, String)>,
    /// The tasks it can run.
    pub registry: &'static Registry,
}

impl AgentConfig {
    /// The advertisement the coordinator's scheduler registers.
    pub fn info(&self) -> AgentInfo {
        AgentInfo {
            agent_id: self.id.clone(),
            slots: self.slots,
            tasks: self
                .registry
                .task_names()
                .into_iter()
                .map(String::from)
                .collect(),
            labels: self.labels.clone(),
            queues: true,
        }
    }
}

/// Messages to an agent.
#[derive(Debug)]
pub enum AgentMsg {
    /// Run these attempts.
    Spawn(Vec<SpawnTask>),
    /// Stop these attempts.
    Cancel(Vec<(FlowRunId, AttemptId)>),
    /// Hand back attempts waiting in the queue, unstarted (for an idle agent).
    Steal(StealAsk, RpcReplyPort<Vec<SpawnTask>>),
}

/// The agent root actor.
pub struct Agent;

/// The agent's state.
pub struct AgentState {
    config: AgentConfig,
    sink: Arc<dyn ResultSink>,
    supervisor: ActorRef<SupervisorMsg>,
    supervisor_restarts: u32,
}

async fn start_supervisor(
    myself: &ActorRef<AgentMsg>,
    config: &AgentConfig,
    sink: &Arc<dyn ResultSink>,
) -> Result<ActorRef<SupervisorMsg>, SpawnErr> {
    let args = SupervisorArgs {
        agent_id: config.id.clone(),
        registry: config.registry,
        sink: sink.clone(),
        slots: config.slots.max(1),
    };
    let (sup, _) = Actor::spawn_linked(None, TaskSupervisor, args, myself.get_cell()).await?;
    Ok(sup)
}

impl Actor for Agent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = (AgentConfig, Arc<dyn ResultSink>);

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        (config, sink): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let supervisor = start_supervisor(&myself, &config, &sink).await?;
        tracing::debug!(agent = %config.id, slots = config.slots, "agent started");
        Ok(AgentState {
            config,
            sink,
            supervisor,
            supervisor_restarts: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let forward = match msg {
            AgentMsg::Spawn(tasks) => SupervisorMsg::Spawn(tasks),
            AgentMsg::Cancel(attempts) => SupervisorMsg::Cancel(attempts),
            AgentMsg::Steal(ask, reply) => SupervisorMsg::Steal(ask, reply),
        };
        if let Err(e) = state.supervisor.send_message(forward) {
            tracing::error!(agent = %state.config.id, error = %e, "task supervisor unreachable");
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // The supervisor only stops with the agent; if it fails, start a new one so the
        // agent keeps serving. Its attempts (running and waiting) were reported by nobody:
        // the agent stops listing them, so the coordinator takes them for lost and runs
        // them again (distributed mode).
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            if cell.get_id() == state.supervisor.get_id() {
                state.supervisor_restarts += 1;
                state.sink.forget_all();
                tracing::error!(agent = %state.config.id, error = %err, restarts = state.supervisor_restarts, "task supervisor failed; restarting it");
                state.supervisor = start_supervisor(&myself, &state.config, &state.sink).await?;
            }
        }
        Ok(())
    }
}

/// Starts an agent actor.
pub async fn spawn_agent(
    config: AgentConfig,
    sink: Arc<dyn ResultSink>,
) -> Result<ActorRef<AgentMsg>, SpawnErr> {
    let (agent, _) = Actor::spawn(None, Agent, (config, sink)).await?;
    Ok(agent)
}
