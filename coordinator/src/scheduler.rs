//! The scheduler: the agent registry and dispatch. It never hands an agent more attempts
//! than its free slots, matches tasks to agents that serve them, and serves runs round
//! robin so concurrent runs progress fairly.

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use pinazu_shared::ids::{AgentId, AttemptId, FlowRunId};
use pinazu_shared::transport::AgentLink;
use pinazu_shared::wire::{AgentInfo, SpawnTask};

/// Messages to the scheduler.
pub enum SchedulerMsg {
    /// An agent joined (or re-advertised).
    Register(AgentInfo),
    /// An attempt wants a slot.
    Submit(SpawnTask),
    /// An attempt ended on `agent`; its slot is free.
    SlotFreed {
        /// The agent.
        agent: AgentId,
        /// The run.
        run: FlowRunId,
        /// The attempt.
        attempt: AttemptId,
    },
    /// Drop a run's queued attempts and cancel its running ones.
    CancelRun(FlowRunId),
    /// A view of the agents.
    Agents(RpcReplyPort<Vec<AgentView>>),
}

/// What an operator sees of an agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Its id.
    pub agent_id: AgentId,
    /// All slots.
    pub slots: u32,
    /// Free slots.
    pub free: u32,
    /// Task names it serves.
    pub tasks: usize,
}

struct AgentSlot {
    info: AgentInfo,
    tasks: HashSet<String>,
    free: u32,
}

/// The scheduler actor.
pub struct Scheduler;

/// Its state.
pub struct SchedulerState {
    link: Arc<dyn AgentLink>,
    agents: Vec<AgentSlot>,
    queues: HashMap<FlowRunId, VecDeque<SpawnTask>>,
    round_robin: VecDeque<FlowRunId>,
    running: HashMap<(FlowRunId, AttemptId), usize>,
    cursor: usize,
}

impl SchedulerState {
    fn free_slots(&self) -> u32 {
        self.agents.iter().map(|a| a.free).sum()
    }

    fn pick_agent(&mut self, task: &str) -> Option<usize> {
        let n = self.agents.len();
        (0..n)
            .map(|i| (self.cursor + i) % n)
            .find(|&i| self.agents[i].free > 0 && self.agents[i].tasks.contains(task))
    }

    /// Hands queued attempts to agents with free slots, one per run per round.
    fn dispatch(&mut self) {
        let mut free = self.free_slots();
        let mut batches: HashMap<usize, Vec<SpawnTask>> = HashMap::new();
        let mut misses = 0;
        while free > 0 && misses < self.round_robin.len() {
            let Some(run) = self.round_robin.pop_front() else {
                break;
            };
            let Some(queue) = self.queues.get_mut(&run) else {
                continue;
            };
            let head_task = queue.front().map(|t| t.task.clone());
            let picked = head_task.and_then(|t| self.pick_agent(&t));
            let queue = self.queues.get_mut(&run).expect("queue present");
            match picked {
                Some(i) => {
                    let task = queue.pop_front().expect("queue head present");
                    self.agents[i].free -= 1;
                    free -= 1;
                    self.cursor = (i + 1) % self.agents.len();
                    self.running.insert((task.flow_run_id, task.attempt_id), i);
                    batches.entry(i).or_default().push(task);
                    misses = 0;
                }
                None => misses += 1,
            }
            if queue.is_empty() {
                self.queues.remove(&run);
            } else {
                self.round_robin.push_back(run);
            }
        }
        for (i, batch) in batches {
            self.link.spawn(&self.agents[i].info.agent_id, batch);
        }
    }
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = Arc<dyn AgentLink>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        link: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SchedulerState {
            link,
            agents: Vec::new(),
            queues: HashMap::new(),
            round_robin: VecDeque::new(),
            running: HashMap::new(),
            cursor: 0,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedulerMsg::Register(info) => {
                let tasks = info.tasks.iter().cloned().collect();
                match state
                    .agents
                    .iter_mut()
                    .find(|a| a.info.agent_id == info.agent_id)
                {
                    Some(a) => {
                        let busy = a.info.slots.saturating_sub(a.free);
                        a.free = info.slots.saturating_sub(busy);
                        a.tasks = tasks;
                        a.info = info;
                    }
                    None => {
                        tracing::debug!(agent = %info.agent_id, slots = info.slots, "agent registered");
                        state.agents.push(AgentSlot {
                            free: info.slots,
                            tasks,
                            info,
                        });
                    }
                }
                state.dispatch();
            }
            SchedulerMsg::Submit(task) => {
                let run = task.flow_run_id;
                let queue = state.queues.entry(run).or_default();
                if queue.is_empty() {
                    state.round_robin.push_back(run);
                }
                queue.push_back(task);
                state.dispatch();
            }
            SchedulerMsg::SlotFreed {
                agent: _,
                run,
                attempt,
            } => {
                // idempotent: only an attempt we dispatched frees a slot, once
                if let Some(i) = state.running.remove(&(run, attempt)) {
                    let a = &mut state.agents[i];
                    a.free = (a.free + 1).min(a.info.slots);
                    state.dispatch();
                }
            }
            SchedulerMsg::CancelRun(run) => {
                state.queues.remove(&run);
                state.round_robin.retain(|r| *r != run);
                let mut per_agent: HashMap<usize, Vec<(FlowRunId, AttemptId)>> = HashMap::new();
                for (&(r, attempt), &i) in &state.running {
                    if r == run {
                        per_agent.entry(i).or_default().push((r, attempt));
                    }
                }
                for (i, attempts) in per_agent {
                    state.link.cancel(&state.agents[i].info.agent_id, attempts);
                }
            }
            SchedulerMsg::Agents(reply) => {
                let view = state
                    .agents
                    .iter()
                    .map(|a| AgentView {
                        agent_id: a.info.agent_id.clone(),
                        slots: a.info.slots,
                        free: a.free,
                        tasks: a.tasks.len(),
                    })
                    .collect();
                let _ = reply.send(view);
            }
        }
        Ok(())
    }
}
