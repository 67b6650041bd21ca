//! The task supervisor: spawns one linked `TaskActor` per attempt and reports each
//! attempt's outcome when its actor terminates: the outcome the actor left in its final
//! state, a cancellation if it was killed, a crash if it failed. So every attempt is
//! reported exactly once and no call is left waiting.
//!
//! At most `slots` attempts run at once; attempts beyond them wait here, in the order
//! they came, and start as running ones end (pipelined dispatch: the scheduler keeps a
//! few more attempts here than slots, so a slot never idles for a dispatch round trip).
//! A waiting attempt can be handed back unstarted (`Steal`), for an idle agent.

use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use tokio::sync::mpsc;

use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AgentId, AttemptId, CallId, FlowRunId};
use pinazu_shared::registry::Registry;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{AttemptFinished, AttemptStarted, Report, SpawnTask};

use crate::task_actor::{TaskActor, TaskArgs, TaskMsg, TaskState};

/// Messages to the supervisor.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start these attempts.
    Spawn(Vec<SpawnTask>),
    /// Stop these attempts.
    Cancel(Vec<(FlowRunId, AttemptId)>),
    /// Hand back attempts that wait here, unstarted: the newest first, only those of the
    /// coordinator process with this epoch, at most `max` of them and about `max_bytes`
    /// of arguments.
    Steal(StealAsk, RpcReplyPort<Vec<SpawnTask>>),
}

/// Which waiting attempts a coordinator asks back.
#[derive(Clone, Debug)]
pub struct StealAsk {
    /// Only attempts issued by coordinator processes of these epochs (the asker's own,
    /// and earlier processes' whose attempts it re-attached); `None`: any (the agent
    /// drops its queue after it was frozen, or when it drains).
    pub epochs: Option<Vec<u32>>,
    /// At most this many.
    pub max: usize,
    /// At most about this many bytes of arguments in all.
    pub max_bytes: usize,
}

impl StealAsk {
    /// Every waiting attempt, whoever dispatched it.
    pub const ALL: StealAsk = StealAsk {
        epochs: None,
        max: usize::MAX,
        max_bytes: usize::MAX,
    };
}

/// What the supervisor starts with.
pub struct SupervisorArgs {
    /// The agent it belongs to.
    pub agent_id: AgentId,
    /// Tasks it can run.
    pub registry: &'static Registry,
    /// Where outcomes go.
    pub sink: Arc<dyn ResultSink>,
    /// Attempts run at once; the rest wait.
    pub slots: u32,
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
    /// Attempts received while every slot was taken, oldest first.
    waiting: VecDeque<SpawnTask>,
    /// To the reporter task, which hands the sink whatever gathered while it was busy
    /// (one batch per wake-up, so a burst of attempts ending is one `report` call);
    /// `None` once stopping.
    reports: Option<mpsc::UnboundedSender<Report>>,
}

/// Most reports in one batch.
const REPORT_BATCH: usize = 512;

/// Hands reports to the sink in batches, in order, until the supervisor stops.
async fn reporter(sink: Arc<dyn ResultSink>, mut rx: mpsc::UnboundedReceiver<Report>) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(rx.len().min(REPORT_BATCH) + 1);
        batch.push(first);
        while batch.len() < REPORT_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        sink.report(batch);
    }
}

/// The task supervisor actor.
pub struct TaskSupervisor;

impl SupervisorState {
    fn report(&mut self, report: Report) {
        if self.args.sink.batches() {
            return self.args.sink.report(vec![report]);
        }
        match &self.reports {
            Some(tx) => {
                let _ = tx.send(report);
            }
            // stopping: straight to the sink
            None => self.args.sink.report(vec![report]),
        }
    }

    fn report_failure(
        &mut self,
        run: FlowRunId,
        call: CallId,
        attempt: AttemptId,
        info: ErrorInfo,
    ) {
        self.report(Report::Finished(AttemptFinished {
            flow_run_id: run,
            call_id: call,
            attempt_id: attempt,
            agent_id: self.args.agent_id.clone(),
            outcome: Err(info),
            result_ref: None,
            elapsed_us: 0,
            result_cache_key: None,
            logs: None,
        }));
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
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(reporter(args.sink.clone(), rx));
        Ok(SupervisorState {
            args,
            running: HashMap::new(),
            by_attempt: HashMap::new(),
            waiting: VecDeque::new(),
            reports: Some(tx),
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
                    if state.running.len() < state.args.slots as usize {
                        start(&myself, state, spawn).await;
                    } else {
                        state.waiting.push_back(spawn);
                    }
                }
            }
            SupervisorMsg::Steal(ask, reply) => {
                let mut given = Vec::new();
                let mut bytes = 0;
                let mut i = state.waiting.len();
                while i > 0 && given.len() < ask.max {
                    i -= 1;
                    let t = &state.waiting[i];
                    if ask
                        .epochs
                        .as_ref()
                        .is_some_and(|e| !e.contains(&t.attempt_id.epoch()))
                        || bytes + t.args.len() > ask.max_bytes
                    {
                        continue;
                    }
                    bytes += t.args.len();
                    if let Some(t) = state.waiting.remove(i) {
                        given.push(t);
                    }
                }
                if let Err(ractor::MessagingErr::SendErr(lost)) = reply.send(given) {
                    // the asker is gone: they wait here again (at the end, where
                    // they were taken from)
                    state.waiting.extend(lost.into_iter().rev());
                }
            }
            SupervisorMsg::Cancel(attempts) => {
                for key in attempts {
                    // one that waits ends here, never started
                    if let Some(i) = state
                        .waiting
                        .iter()
                        .position(|t| (t.flow_run_id, t.attempt_id) == key)
                    {
                        if let Some(t) = state.waiting.remove(i) {
                            state.report_failure(
                                t.flow_run_id,
                                t.call_id,
                                t.attempt_id,
                                ErrorInfo::new(FailureKind::Cancelled, "the attempt was cancelled"),
                            );
                        }
                        continue;
                    }
                    if let Some(r) = state
                        .by_attempt
                        .get(&key)
                        .and_then(|id| state.running.get(id))
                    {
                        // drops the attempt's future; reported when the actor terminates
                        r.actor.kill();
                    }
                }
            }
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // the reporter sends what it holds, then ends
        state.reports.take();
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<Self::Msg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let ended = matches!(
            evt,
            SupervisionEvent::ActorTerminated(..) | SupervisionEvent::ActorFailed(..)
        );
        match evt {
            SupervisionEvent::ActorTerminated(cell, final_state, _) => {
                let Some(r) = state.forget(cell.get_id()) else {
                    return Ok(());
                };
                let report = final_state
                    .and_then(|mut s| s.take::<TaskState>().ok())
                    .and_then(|s| s.into_report(state.args.agent_id.clone()));
                match report {
                    Some(f) => state.report(Report::Finished(f)),
                    None => state.report_failure(
                        r.flow_run_id,
                        r.call_id,
                        r.attempt_id,
                        ErrorInfo::new(FailureKind::Cancelled, "the attempt was cancelled"),
                    ),
                }
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
        // a slot freed: the next waiting attempts start (unless this process was just
        // frozen: they may have run elsewhere meanwhile, so they are dropped)
        if ended && !state.waiting.is_empty() && !state.args.sink.may_start_waiting() {
            let dropped: Vec<SpawnTask> = state.waiting.drain(..).collect();
            tracing::warn!(attempts = dropped.len(), "this process was frozen: the attempts waiting in its queue are dropped (the coordinator sends them again)");
            state.args.sink.unstarted(&dropped);
        }
        while ended && state.running.len() < state.args.slots as usize {
            match state.waiting.pop_front() {
                Some(next) => start(&myself, state, next).await,
                None => break,
            }
        }
        Ok(())
    }
}

/// Starts an attempt in its own linked `TaskActor` and reports it started (or failed, if
/// its task is not registered here or its actor cannot start).
async fn start(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState, spawn: SpawnTask) {
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
        return;
    };
    let (run, call, attempt) = (spawn.flow_run_id, spawn.call_id, spawn.attempt_id);
    let args = TaskArgs {
        spawn,
        def,
        agent_id: state.args.agent_id.clone(),
    };
    match Actor::spawn_linked(None, TaskActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            state.report(Report::Started(AttemptStarted {
                flow_run_id: run,
                call_id: call,
                attempt_id: attempt,
                agent_id: state.args.agent_id.clone(),
            }));
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
