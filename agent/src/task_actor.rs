//! One actor per task attempt. It runs the task future on its own tokio task (so the
//! actor stays responsive to `Cancel`), enforces the timeout, catches panics, and reports
//! exactly one outcome.

use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::AbortHandle;

use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::AgentId;
use pinazu_shared::registry::TaskDef;
use pinazu_shared::transport::ResultSink;
use pinazu_shared::wire::{AttemptFinished, AttemptStarted, SpawnTask};

/// Messages to a task actor.
#[derive(Debug)]
pub enum TaskMsg {
    /// The task future ended.
    Done(Result<bytes::Bytes, ErrorInfo>),
    /// Stop the attempt.
    Cancel,
}

/// What a task actor starts with.
pub struct TaskArgs {
    /// The attempt.
    pub spawn: SpawnTask,
    /// The task.
    pub def: &'static TaskDef,
    /// The agent running it.
    pub agent_id: AgentId,
    /// Where the outcome goes.
    pub sink: Arc<dyn ResultSink>,
}

/// The task actor.
pub struct TaskActor;

/// A running attempt.
pub struct TaskState {
    spawn: SpawnTask,
    agent_id: AgentId,
    sink: Arc<dyn ResultSink>,
    started: Instant,
    abort: AbortHandle,
    reported: bool,
}

impl TaskState {
    fn report(&mut self, outcome: Result<bytes::Bytes, ErrorInfo>) {
        if std::mem::replace(&mut self.reported, true) {
            return;
        }
        self.sink.finished(AttemptFinished {
            flow_run_id: self.spawn.flow_run_id,
            call_id: self.spawn.call_id,
            attempt_id: self.spawn.attempt_id,
            agent_id: self.agent_id.clone(),
            outcome,
            result_ref: None,
            elapsed_us: self.started.elapsed().as_micros() as u64,
        });
    }
}

impl Actor for TaskActor {
    type Msg = TaskMsg;
    type State = TaskState;
    type Arguments = TaskArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let TaskArgs {
            spawn,
            def,
            agent_id,
            sink,
        } = args;
        // one line per attempt start (target `pinazu::attempts`), so executions can be
        // counted from outside; embedded runs silence it by default
        tracing::info!(
            target: "pinazu::attempts",
            flow_run_id = %spawn.flow_run_id,
            task = %spawn.task,
            call_id = %spawn.call_id,
            attempt_id = %spawn.attempt_id,
            attempt = spawn.attempt,
            agent = %agent_id,
            "attempt started"
        );
        sink.started(AttemptStarted {
            flow_run_id: spawn.flow_run_id,
            call_id: spawn.call_id,
            attempt_id: spawn.attempt_id,
            agent_id: agent_id.clone(),
        });
        let fut = AssertUnwindSafe((def.invoke)(spawn.args.clone())).catch_unwind();
        let timeout = spawn.timeout_ms.map(Duration::from_millis);
        let me = myself.clone();
        let handle = tokio::spawn(async move {
            let outcome = match timeout {
                Some(t) => match tokio::time::timeout(t, fut).await {
                    Ok(r) => r,
                    Err(_) => Ok(Err(ErrorInfo::new(
                        FailureKind::Timeout,
                        format!("the attempt ran over its timeout of {t:?} and was stopped"),
                    ))),
                },
                None => fut.await,
            };
            let outcome = outcome.unwrap_or_else(|payload| Err(ErrorInfo::from_panic(&*payload)));
            // the actor may already be gone (cancelled): nothing to report then
            let _ = me.send_message(TaskMsg::Done(outcome));
        });
        Ok(TaskState {
            spawn,
            agent_id,
            sink,
            started: Instant::now(),
            abort: handle.abort_handle(),
            reported: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            TaskMsg::Done(outcome) => state.report(outcome),
            TaskMsg::Cancel => {
                state.abort.abort();
                state.report(Err(ErrorInfo::new(
                    FailureKind::Cancelled,
                    "the attempt was cancelled",
                )));
            }
        }
        myself.stop(None);
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        state.abort.abort();
        Ok(())
    }
}
