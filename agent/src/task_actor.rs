//! One actor per task attempt. The attempt's future runs inside the actor's own task (in
//! `post_start`), under its timeout and with panics caught; the outcome is left in the
//! actor's final state, which the supervisor receives with the actor's termination and
//! reports. Cancelling an attempt kills its actor: the future is dropped mid-await and
//! the supervisor reports the cancellation. Either way exactly one outcome is reported,
//! by the supervisor, and no second tokio task or message per attempt is needed.

use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::AgentId;
use pinazu_shared::registry::{Invoked, TaskDef};
use pinazu_shared::task_context::{AttemptLog, TaskContext, ATTEMPT_LOG, TASK_CONTEXT};
use pinazu_shared::wire::{AttemptFinished, SpawnTask};

/// Messages to a task actor: none; it runs its attempt and stops. The supervisor stops
/// it early with `kill`.
#[derive(Debug)]
pub enum TaskMsg {}

/// What a task actor starts with.
pub struct TaskArgs {
    /// The attempt.
    pub spawn: SpawnTask,
    /// The task.
    pub def: &'static TaskDef,
    /// The agent running it.
    pub agent_id: AgentId,
}

/// The task actor.
pub struct TaskActor;

/// A running attempt, and its outcome once it has one.
pub struct TaskState {
    spawn: SpawnTask,
    def: &'static TaskDef,
    started: Instant,
    /// The agent running it (for `task_context()`; taken when the attempt starts). The
    /// state is part of the actor's spawned future: it is kept small.
    agent_id: Option<AgentId>,
    /// The body's outcome and, when asked for, the call's MD5 cache key.
    invoked: Option<Invoked>,
    /// Its log lines.
    logs: Option<Box<str>>,
}

impl TaskState {
    /// The report of the ended attempt (`None` if it never ran to an outcome).
    pub fn into_report(self, agent_id: AgentId) -> Option<AttemptFinished> {
        let Invoked { outcome, cache_key } = self.invoked?;
        Some(AttemptFinished {
            flow_run_id: self.spawn.flow_run_id,
            call_id: self.spawn.call_id,
            attempt_id: self.spawn.attempt_id,
            agent_id,
            outcome,
            result_ref: None,
            elapsed_us: self.started.elapsed().as_micros() as u64,
            result_cache_key: cache_key,
            logs: self.logs.map(|l| Box::new(String::from(l))),
        })
    }
}

impl Actor for TaskActor {
    type Msg = TaskMsg;
    type State = TaskState;
    type Arguments = TaskArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let TaskArgs {
            spawn,
            def,
            agent_id,
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
        Ok(TaskState {
            spawn,
            def,
            started: Instant::now(),
            agent_id: Some(agent_id),
            invoked: None,
            logs: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // set in pre_start; taken once
        let Some(agent_id) = state.agent_id.take() else {
            myself.stop(None);
            return Ok(());
        };
        let ctx = TaskContext {
            flow_run_id: state.spawn.flow_run_id,
            call_id: state.spawn.call_id,
            attempt_id: state.spawn.attempt_id,
            attempt: state.spawn.attempt,
            task: state.spawn.task.clone(),
            agent_id,
        };
        let body = (state.def.invoke)(state.spawn.args.clone(), state.spawn.want_key);
        let fut = AssertUnwindSafe(TASK_CONTEXT.scope(ctx, body)).catch_unwind();
        // the attempt's span (feature `otel`), child of its call's on the coordinator
        #[cfg(feature = "otel")]
        let attempt_span = {
            let s = &state.spawn;
            let span = tracing::trace_span!(target: "pinazu::trace", "attempt", task = %s.task, attempt = s.attempt, attempt_id = %s.attempt_id, otel.status_code = tracing::field::Empty, otel.status_message = tracing::field::Empty);
            pinazu_shared::trace::child_of(&span, s.trace.as_deref().map(String::as_str));
            span
        };
        #[cfg(feature = "otel")]
        let fut = tracing::Instrument::instrument(fut, attempt_span.clone());
        // its log lines are kept in a task-local the logging layer writes to, taken
        // back once the attempt ended (however it ended)
        let fut = ATTEMPT_LOG.scope(std::cell::RefCell::new(AttemptLog::default()), fut);
        tokio::pin!(fut);
        let timed_out = |t: Duration| Invoked {
            outcome: Err(ErrorInfo::new(
                FailureKind::Timeout,
                format!("the attempt ran over its timeout of {t:?} and was stopped"),
            )),
            cache_key: None,
        };
        let invoked = match state.spawn.timeout_ms.map(Duration::from_millis) {
            Some(t) => match tokio::time::timeout(t, fut.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(timed_out(t)),
            },
            None => fut.as_mut().await,
        };
        state.logs = fut
            .as_mut()
            .take_value()
            .and_then(|log| log.into_inner().into_text());
        // a failed attempt's span says so (feature `otel`)
        #[cfg(feature = "otel")]
        if let Ok(Invoked {
            outcome: Err(e), ..
        }) = &invoked
        {
            attempt_span.record("otel.status_code", "ERROR");
            attempt_span.record("otel.status_message", e.to_string().as_str());
        }
        state.invoked = Some(invoked.unwrap_or_else(|payload| Invoked {
            outcome: Err(ErrorInfo::from_panic(&*payload)),
            cache_key: None,
        }));
        myself.stop(None);
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        _state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {}
    }
}
