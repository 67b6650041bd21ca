//! The task supervisor: spawns one linked `TaskActor` per attempt and turns a failed
//! `TaskActor` into a reported failure, so no call is left waiting.

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use std::collections::HashMap;
use std::sync::Arc;

use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AgentId, AttemptId, CallId, FlowRunId};
use pinazu_shared::registry::Registry;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{AttemptFinished, SpawnTask};

use crate::task_actor::{TaskActor, TaskArgs, TaskMsg};

/// Messages to the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start these attempts.
    Spawn(Vec<SpawnTask>),
    /// Stop these attempts.
    Cancel(Vec<(FlowRunId, AttemptId)>),
}

/// What the supervisor starts with.
pub struct SupervisorArgs {
    /// The agent it belongs to.
    pub agent_id: AgentId,
    /// Tasks it can run.
    pub registry: &'static Registry,
    /// Where outcomes go.
    pub sink: Arc<dyn ResultSink>,
}

struct Running {
    flow_run_id: FlowRunId,
    call_id: CallId,
    attempt_id: AttemptId,
    actor: ActorRef<TaskMsg>,
}

/// The supervisor's state: running attempts by actor id.
pub struct SupervisorState {
    args: SupervisorArgs,
    running: HashMap<ActorId, Running>,
    by_attempt: HashMap<(FlowRunId, AttemptId), ActorId>,
}

/// The task supervisor actor.
pub struct TaskSupervisor;

impl SupervisorState {
    fn report_failure(&self, run: FlowRunId, call: CallId, attempt: AttemptId, info: ErrorInfo) {
        self.args.sink.finished(AttemptFinished {
            flow_run_id: run,
            call_id: call,
            attempt_id: attempt,
            agent_id: self.args.agent_id.clone(),
            outcome: Err(info),
            result_ref: None,
            elapsed_us: 0,
        });
    }

    fn forget(&mut self, id: ActorId) -> Option<Running> {
        let r = self.running.remove(&id)?;
        self.by_attempt.remove(&(r.flow_run_id, r.attempt_id));
        Some(r)
    }
}

impl Actor for TaskSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(SupervisorState {
            args,
            running: HashMap::new(),
            by_attempt: HashMap::new(),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(tasks) => {
                for spawn in tasks {
                    let Some(def) = state.args.registry.task(&spawn.task) else {
                        let known = state.args.registry.task_names().join(", ");
                        state.report_failure(
                            spawn.flow_run_id,
                            spawn.call_id,
                            spawn.attempt_id,
                            ErrorInfo::new(
                                FailureKind::UnknownTask,
                                format!(
                                    "task `{}` is not registered on agent {}; its tasks: {known}",
                                    spawn.task, state.args.agent_id
                                ),
                            ),
                        );
                        continue;
                    };
                    let (run, call, attempt) = (spawn.flow_run_id, spawn.call_id, spawn.attempt_id);
                    let args = TaskArgs {
                        spawn,
                        def,
                        agent_id: state.args.agent_id.clone(),
                        sink: state.args.sink.clone(),
                    };
                    match Actor::spawn_linked(None, TaskActor, args, myself.get_cell()).await {
                        Ok((actor, _)) => {
                            let id = actor.get_id();
                            state.by_attempt.insert((run, attempt), id);
                            state.running.insert(
                                id,
                                Running {
                                    flow_run_id: run,
                                    call_id: call,
                                    attempt_id: attempt,
                                    actor,
                                },
                            );
                        }
                        Err(e) => state.report_failure(
                            run,
                            call,
                            attempt,
                            ErrorInfo::new(
                                FailureKind::Crashed,
                                format!("could not start the attempt: {e}"),
                            ),
                        ),
                    }
                }
            }
            SupervisorMsg::Cancel(attempts) => {
                for key in attempts {
                    if let Some(r) = state
                        .by_attempt
                        .get(&key)
                        .and_then(|id| state.running.get(id))
                    {
                        let _ = r.actor.send_message(TaskMsg::Cancel);
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                state.forget(cell.get_id());
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                if let Some(r) = state.forget(cell.get_id()) {
                    tracing::error!(flow_run_id = %r.flow_run_id, call_id = %r.call_id, attempt_id = %r.attempt_id, error = %err, "task actor failed");
                    state.report_failure(
                        r.flow_run_id,
                        r.call_id,
                        r.attempt_id,
                        ErrorInfo::new(
                            FailureKind::Crashed,
                            format!("the task actor failed: {err}"),
                        ),
                    );
                }
            }
            _ => {}
        }
        Ok(())
    }
}
