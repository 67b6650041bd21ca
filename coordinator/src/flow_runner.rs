//! One actor per flow run. It owns the run's call table: every task call gets a
//! deterministic call id, goes through the cache policy, is dispatched as attempts through
//! the scheduler, retried per its policy, and answered exactly once. It ends the run in
//! SUCCESS or FAILED, whatever the flow body does.

use bytes::Bytes;
use futures_util::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use std::time::SystemTime;
use tokio::sync::{oneshot, watch};

use pinazu_shared::api::RunInfo;
use pinazu_shared::cache::{md5_of_key, object_key, original_md5, CacheResult};
use pinazu_shared::error::{ErrorInfo, FailureKind, TaskError};
use pinazu_shared::events::{now_timestamp, FlowStatus, FlowStatusMessage};
use pinazu_shared::ids::{AttemptId, CallId, FlowRunId};
use pinazu_shared::options::CachePolicy;
use pinazu_shared::registry::{FlowDef, KeptResult, TaskDef};
use pinazu_shared::wire::{AttemptFinished, AttemptStarted, Report, SchedInfo, SpawnTask};
use pinazu_shared::BoxFuture;

use crate::cache::CacheMsg;
use crate::calls::{CallLog, NONE};
use crate::context::{FlowContext, Payload, FLOW_CONTEXT};
use crate::coordinator::{CoordShared, FlowRunOutcome};
use crate::journal::{JournalEntry, Replay};
use crate::metrics::TaskMetrics;
use crate::scheduler::SchedulerMsg;
use crate::stats::RunStats;
use crate::status::{RunHeader, StatusMsg, TaskTransition};

type CallReply = oneshot::Sender<Result<Payload, TaskError>>;
/// How a child flow's caller hears of its end.
pub type ChildReply = oneshot::Sender<Result<FlowRunOutcome, String>>;

/// A child run the flow body waits for.
struct ChildCall {
    flow: &'static FlowDef,
    run: FlowRunId,
    ordinal: u64,
    reply: ChildReply,
    /// Tells the task following it that the parent stopped waiting.
    stop: watch::Sender<crate::coordinator::ChildStop>,
}

/// The journal's name for a child flow's call: `flow:<name>`.
pub fn child_task_name(flow: &str) -> String {
    format!("flow:{flow}")
}

/// Messages to a flow runner.
pub enum FlowRunnerMsg {
    /// The flow body called a task.
    Call {
        /// The task.
        task: &'static TaskDef,
        /// MessagePack argument tuple.
        args: Bytes,
        /// The same arguments as JSON, when the call is cached.
        args_json: Option<Value>,
        /// The value of the task's limit key (`concurrency_key`).
        key: Option<Arc<str>>,
        /// Its priority (`with_priority`), instead of the run's.
        priority: Option<i32>,
        /// Answered once, with the result or the final error.
        reply: CallReply,
    },
    /// The cache answered a lookup.
    CacheChecked {
        /// The call.
        call_id: CallId,
        /// The record, on a hit.
        hit: Option<CacheResult>,
    },
    /// An attempt started on an agent.
    Started(AttemptStarted),
    /// An attempt ended.
    Finished(AttemptFinished),
    /// Several reports of this run's attempts, in order.
    Reports(Vec<Report>),
    /// Hand the attempts dispatched since the last flush to the scheduler.
    FlushDispatch,
    /// A retry's backoff elapsed.
    RetryDue(CallId),
    /// An attempt was lost (its agent died, or its spawn or report went missing).
    AttemptLost {
        /// The call.
        call_id: CallId,
        /// The lost attempt.
        attempt_id: AttemptId,
        /// Why.
        reason: String,
        /// It ran (its agent died with it, or a heartbeat listed it): an execution,
        /// whether or not its start was reported.
        ran: bool,
    },
    /// The flow body called another flow: a child run.
    Child {
        /// The child's flow.
        flow: &'static FlowDef,
        /// Its parameters.
        params: serde_json::Map<String, Value>,
        /// Its run's priority (`with_priority`), instead of the parent's.
        priority: Option<i32>,
        /// Answered once the child ended (or could not start).
        reply: ChildReply,
    },
    /// A child run ended (or could not start).
    ChildEnded {
        /// The parent's call that started it.
        call_id: CallId,
        /// Its outcome.
        outcome: Result<FlowRunOutcome, String>,
    },
    /// A note for the operator (or `None` to clear it).
    Note(Option<String>),
    /// Cancel the run: stop its attempts and end it FAILED.
    Cancel(String),
    /// The flow body returned (or panicked).
    FlowDone(Result<Value, ErrorInfo>),
    /// The flow's calls no longer match its journal: end the run FAILED.
    Diverged(String),
    /// An agent runs an attempt of this run that an earlier coordinator process
    /// dispatched: the call it belongs to waits for it instead of running again.
    Adopt {
        /// The call.
        call_id: CallId,
        /// The attempt.
        attempt_id: AttemptId,
        /// It waits in the agent's queue, not started yet (its start is reported
        /// when it starts).
        queued: bool,
    },
    /// Another coordinator took the run over (its journal is fenced from this one):
    /// stop at once, publishing nothing, leaving its attempts to the new owner.
    LetGo,
    /// Answered once every message sent to this runner before it is handled (the
    /// report acknowledgement waits for it before flushing the journal).
    Barrier(oneshot::Sender<()>),
    /// Where each call in the table stands (tests and diagnostics).
    Phases(ractor::RpcReplyPort<Vec<(CallId, CallPhase)>>),
    /// A page of the run's task table (the dashboard).
    Calls(
        pinazu_shared::api::CallsQuery,
        ractor::RpcReplyPort<pinazu_shared::api::CallsPage>,
    ),
}

/// What a flow runner starts with.
pub struct FlowRunnerArgs {
    pub(crate) flow_run_id: FlowRunId,
    pub(crate) flow: &'static FlowDef,
    pub(crate) body: BoxFuture<'static, Result<Value, ErrorInfo>>,
    pub(crate) shared: Arc<CoordShared>,
    pub(crate) stats: Arc<RunStats>,
    pub(crate) outcome: watch::Sender<Option<FlowRunOutcome>>,
    pub(crate) params: serde_json::Map<String, Value>,
    pub(crate) replay: Option<Replay>,
    pub(crate) seeds: Arc<Seeds>,
    /// A resumed run waits this long before its body runs again, so agents can hand
    /// back the results and running attempts of the coordinator that died.
    pub(crate) start_delay: Duration,
    /// Header and trace id of the run's status events.
    pub(crate) header: Arc<RunHeader>,
    /// The journal's claim on the run, released when the runner stops.
    pub(crate) claim: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Its priority and parent run.
    pub(crate) meta: crate::journal::RunMeta,
}

struct CallState {
    task: &'static TaskDef,
    args: Bytes,
    /// The value of the task's limit key, when it has one.
    key: Option<Arc<str>>,
    /// Its priority, when not the run's.
    priority: Option<i32>,
    /// The call's MD5 (the original library's cache key): computed here for cached
    /// calls and results passed in, else by the agent that ran it (`want_key`).
    md5: Option<String>,
    /// Object key of the call's cache entry, when cached.
    cache: Option<String>,
    attempt: u32,
    /// Position among the run's calls.
    ordinal: u64,
    /// Attempts that started executing.
    executions: u32,
    /// Failed attempts (lost ones are not failures and use no retry).
    failures: u32,
    /// Where the call stands.
    phase: CallPhase,
    reply: Option<CallReply>,
    /// Its last attempt: when it was queued and started (ms of the run's `CallLog`
    /// clock) and on which agent (the log's index): kept here while it runs, written
    /// to its row when the attempt ends or the table is read.
    queued_ms: u32,
    started_ms: u32,
    agent: u32,
    /// The call's span (feature `otel`), child of the run's; its attempts' are its
    /// children, on the agents.
    #[cfg(feature = "otel")]
    span: tracing::Span,
}

/// Where a call stands. Each step is one runner message: the flow body's `Call`
/// (`New`, then `WaitingForCache` or `Dispatched`), `CacheChecked` (a miss:
/// `Dispatched`), `Started` (`started`), `Finished` (a retryable failure: `RetryDue`;
/// an outcome: done), `RetryDue` (`Dispatched` again), `AttemptLost` (`Dispatched` again).
/// A call that is done (answered from its result, the cache, the journal, a result
/// passed in, or failed for good) leaves the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallPhase {
    /// Made by the flow body; nothing asked yet.
    New,
    /// Its cache entry is being read.
    WaitingForCache,
    /// An attempt is out (or, re-attached, running since before a restart): only its
    /// result is taken. `started` once its start was reported (counted an execution).
    Dispatched {
        /// The attempt.
        attempt: AttemptId,
        /// Its agent reported it running.
        started: bool,
    },
    /// Its last attempt failed and the retry's delay runs.
    RetryDue,
}

impl CallPhase {
    /// The attempt whose result the call takes, if one is out.
    fn current(self) -> Option<AttemptId> {
        match self {
            CallPhase::Dispatched { attempt, .. } => Some(attempt),
            _ => None,
        }
    }

    fn started(self) -> bool {
        matches!(self, CallPhase::Dispatched { started: true, .. })
    }
}

/// The flow runner actor.
pub struct FlowRunner;

/// Its state.
pub struct RunnerState {
    myself: ActorRef<FlowRunnerMsg>,
    flow_run_id: FlowRunId,
    flow: &'static FlowDef,
    shared: Arc<CoordShared>,
    stats: Arc<RunStats>,
    outcome: watch::Sender<Option<FlowRunOutcome>>,
    body: Option<tokio::task::AbortHandle>,
    calls: CallMap<CallState>,
    occurrences: HashMap<u64, u32, BuildHasherDefault<IdHasher>>,
    task_events: RefCell<Vec<TaskTransition>>,
    next_ordinal: u64,
    /// Results of attempts an earlier coordinator process dispatched, for calls the
    /// flow body has not made again yet.
    early: CallMap<AttemptFinished>,
    /// Attempts an earlier coordinator process dispatched that agents still run, for
    /// calls the flow body has not made again yet.
    adoptable: CallMap<(AttemptId, bool)>,
    /// Attempts dispatched and not yet handed to the scheduler: a burst of calls goes as
    /// one `Submit` (flushed by a `FlushDispatch` this runner sends itself, which it
    /// handles after the messages already in its mailbox, or at `DISPATCH_BATCH`).
    outbox: Vec<SpawnTask>,
    /// A `FlushDispatch` is in the mailbox.
    flush_queued: bool,
    /// Handling a body's call: the outbox is flushed at its end (at once when no other
    /// call waits in the mailbox).
    in_call: bool,
    /// The body's calls sent and not yet handled (shared with its `FlowContext`).
    in_mailbox: Arc<std::sync::atomic::AtomicUsize>,
    names: HashMap<&'static str, Arc<str>>,
    replay: Option<Replay>,
    seeds: Arc<Seeds>,
    /// Keys of `seeds` that answered a call (the others are reported at the end).
    seeds_used: std::collections::HashSet<String>,
    header: Arc<RunHeader>,
    /// The parameters the run runs with (journaled with its end).
    params: serde_json::Map<String, Value>,
    /// The journal's claim on the run (released when the run ends).
    claim: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Its priority and parent run.
    meta: crate::journal::RunMeta,
    /// Child runs the body waits for, by the call that started them.
    children: CallMap<ChildCall>,
    /// The task table the dashboard shows, one row per call.
    log: CallLog,
    /// The run's span (feature `otel`), child of the launcher's `traceparent`.
    #[cfg(feature = "otel")]
    span: tracing::Span,
    /// Each task's metrics handles (a flow calls a few tasks: a short list, looked up
    /// by the name's address, costs less than hashing the name per call).
    metrics: Vec<(&'static str, TaskMetrics)>,
    events: bool,
    finished: bool,
}

impl RunnerState {
    /// Queues a task transition; the queue goes to the status publisher as one message
    /// at the end of the runner's current message (`send_events`), which formats it off
    /// the runner's path.
    /// Queues a task transition: PENDING and RUNNING carry no error; SUCCESS carries the
    /// call's MD5 cache key; FAILED (and PENDING after a failed attempt that will be
    /// retried) carries the error.
    fn task_event(
        &self,
        task: &'static str,
        status: FlowStatus,
        cache_key: Option<String>,
        error_message: Option<String>,
        traceback: Option<String>,
    ) {
        if !self.events {
            return;
        }
        self.task_events.borrow_mut().push(TaskTransition {
            flow_run_id: self.flow_run_id,
            task,
            status,
            result_cache_key: cache_key,
            error_message,
            traceback,
            at: SystemTime::now(),
        });
    }

    /// A task's SUCCESS event, with the call's MD5 cache key.
    fn success_event(&self, call: &CallState) {
        self.task_event(
            call.task.name,
            FlowStatus::Success,
            call.md5.clone(),
            None,
            None,
        );
    }

    /// The queued task transitions go to the status publisher as one message, at the
    /// end of the runner's current message: it formats them off the runner's path.
    fn send_events(&self) {
        let events = std::mem::take(&mut *self.task_events.borrow_mut());
        if !events.is_empty() {
            let _ = self
                .shared
                .status
                .send_message(StatusMsg::Tasks(self.header.clone(), events));
        }
    }

    fn flow_event(&self, status: FlowStatus, error: Option<&ErrorInfo>) {
        // after the task transitions before it
        self.send_events();
        let _ = self.shared.status.send_message(StatusMsg::Flow(
            self.header.clone(),
            FlowStatusMessage {
                flow_run_id: self.flow_run_id,
                status,
                error_message: error.map(|e| e.to_string()),
                traceback: error.map(|e| {
                    e.traceback
                        .as_deref()
                        .map_or_else(|| e.to_string(), String::from)
                }),
                event_timestamp: now_timestamp(),
            },
        ));
    }

    fn effective_policy(&self, task: &TaskDef) -> CachePolicy {
        match task.options.cache {
            CachePolicy::None => self.shared.config.default_cache,
            p => p,
        }
    }

    fn new_call(
        &mut self,
        myself: &ActorRef<FlowRunnerMsg>,
        task: &'static TaskDef,
        args: Bytes,
        args_json: Option<Value>,
        (limit_key, priority): (Option<Arc<str>>, Option<i32>),
        reply: CallReply,
    ) {
        if self.finished {
            let _ = reply.send(Err(TaskError::RunClosed {
                task: task.name.to_string(),
                reason: "the flow has already finished".into(),
            }));
            return;
        }
        RunStats::bump(&self.stats.tasks);
        let key = CallId::content_key(task.name, &args);
        let seq = self.occurrences.entry(key).or_insert(0);
        let call_id = CallId { key, seq: *seq };
        *seq += 1;
        let ordinal = self.next_ordinal;
        self.next_ordinal += 1;
        self.log.made(ordinal, task.name);
        self.drop_undecodable_journal_entry(task, call_id);
        if let Some(replay) = &self.replay {
            if let Some(ended) = replay.calls.get(&call_id) {
                // journaled: answer now, run nothing (a result passed in for it counts
                // as used)
                if let (false, Some(json)) = (self.seeds.is_empty(), &args_json) {
                    if let Some((key, _)) =
                        self.seeds.lookup(task.name, &original_md5(task.name, json))
                    {
                        self.seeds_used.insert(key);
                    }
                }
                RunStats::bump(&self.stats.replayed);
                RunStats::bump(&self.stats.completed);
                self.log.replayed(ordinal, ended.outcome.as_ref().err());
                task_metrics(&mut self.metrics, &self.shared, task.name)
                    .replayed
                    .inc();
                let answer = match &ended.outcome {
                    Ok(bytes) => Ok(Payload::Msgpack(bytes.clone())),
                    Err(info) => Err(TaskError::Failed {
                        task: task.name.to_string(),
                        attempts: 0,
                        last_error: info.clone(),
                    }),
                };
                let _ = reply.send(answer);
                return;
            }
            if replay.unfinished {
                if let Some(other) = replay
                    .by_ordinal
                    .get(&ordinal)
                    .and_then(|c| replay.calls.get(c))
                {
                    let msg = format!(
                        "the flow no longer matches its journal: call #{ordinal} was `{}` when the run started and is now `{}` (with other arguments or in another order); the flow's code changed while the run was unfinished, so it cannot be resumed: start it under a new FLOW_RUN_ID",
                        other.task, task.name
                    );
                    let _ = reply.send(Err(TaskError::RunClosed {
                        task: task.name.to_string(),
                        reason: msg.clone(),
                    }));
                    let _ = myself.send_message(FlowRunnerMsg::Diverged(msg));
                    return;
                }
            }
        }
        let early = self.early.remove(&call_id);
        let adopted = self.adoptable.remove(&call_id);
        let policy = self.effective_policy(task);
        // arguments come as JSON for a cache key or a result passed in
        let md5 = args_json.as_ref().map(|json| original_md5(task.name, json));
        let seeded = md5.as_deref().and_then(|m| self.seeds.lookup(task.name, m));
        let cache = md5
            .as_deref()
            .and_then(|m| object_key(policy, self.flow_run_id, task.name, task.version, m));
        self.task_event(task.name, FlowStatus::Pending, None, None, None);
        let lookup = match &cache {
            Some(key) if !task.options.refresh && !self.shared.config.refresh_cache => {
                Some(key.clone())
            }
            _ => None,
        };
        self.calls.insert(
            call_id,
            CallState {
                task,
                args,
                key: limit_key,
                priority,
                md5,
                cache,
                attempt: 0,
                ordinal,
                executions: 0,
                failures: 0,
                phase: CallPhase::New,
                reply: Some(reply),
                queued_ms: 0,
                started_ms: NONE,
                agent: NONE,
                #[cfg(feature = "otel")]
                span: tracing::trace_span!(target: "pinazu::trace", parent: &self.span, "call", task = task.name, call = ordinal, otel.status_code = tracing::field::Empty, otel.status_message = tracing::field::Empty),
            },
        );
        let seeded = match seeded {
            Some((key, value)) => match (task.check)(KeptResult::Json(&value)) {
                Ok(()) => Some((key, value)),
                Err(why) => {
                    tracing::warn!(flow_run_id = %self.flow_run_id, task = task.name, key, "--success-task-results: the result for this call does not decode into the task's return type ({why}); the call runs instead");
                    self.seeds_used.insert(key);
                    None
                }
            },
            None => None,
        };
        if let Some((key, value)) = seeded {
            // a result Pinazu Core passed in (--success-task-results)
            RunStats::bump(&self.stats.replayed);
            self.log.replayed(ordinal, None);
            task_metrics(&mut self.metrics, &self.shared, task.name)
                .replayed
                .inc();
            self.seeds_used.insert(key);
            if let Some(call) = self.calls.get(&call_id) {
                self.success_event(call);
            }
            self.journal_end(call_id, Ok(json_to_msgpack(&value)), None);
            self.resolve(call_id, Ok(Payload::Json(value)));
            return;
        }
        if let Some(f) = early {
            // the attempt ran while the coordinator was down: its result counts
            let call = self.calls.get_mut(&call_id).expect("call present");
            call.attempt = 1;
            call.executions = 1;
            call.phase = CallPhase::Dispatched {
                attempt: f.attempt_id,
                started: true,
            };
            RunStats::bump(&self.stats.executions);
            self.finished(myself, f);
            return;
        }
        if let Some((attempt_id, queued)) = adopted {
            // still on an agent since before the coordinator restarted: running, or
            // waiting in its queue (counted and shown running when it starts)
            let call = self.calls.get_mut(&call_id).expect("call present");
            call.attempt = 1;
            call.phase = CallPhase::Dispatched {
                attempt: attempt_id,
                started: !queued,
            };
            if queued {
                return;
            }
            call.executions = 1;
            RunStats::bump(&self.stats.executions);
            call.started_ms = self.log.now();
            self.log.running(ordinal, call.started_ms, NONE, 1);
            tracing::debug!(flow_run_id = %self.flow_run_id, %call_id, %attempt_id, "re-attached to an attempt started before the coordinator restarted");
            self.task_event(task.name, FlowStatus::Running, None, None, None);
            return;
        }
        match lookup {
            Some(key) => {
                if let Some(call) = self.calls.get_mut(&call_id) {
                    call.phase = CallPhase::WaitingForCache;
                }
                let me = myself.clone();
                #[cfg(feature = "otel")]
                let read = self.calls.get(&call_id).map(|c| {
                    tracing::trace_span!(target: "pinazu::trace", parent: &c.span, "cache.get", key = %key)
                });
                let asked = self.shared.cache.send_message(CacheMsg::Get {
                    key,
                    expire: task.options.expire,
                    reply: Box::new(move |hit| {
                        // (the read's span ends with its answer)
                        #[cfg(feature = "otel")]
                        drop(read);
                        // (the runner may have ended meanwhile: nobody to tell)
                        let _ = me.send_message(FlowRunnerMsg::CacheChecked { call_id, hit });
                    }),
                });
                if asked.is_err() {
                    // the cache actor is gone (the coordinator is failing): a miss, so
                    // the call is not left waiting for an answer that never comes
                    self.dispatch(call_id);
                }
            }
            None => self.dispatch(call_id),
        }
    }

    fn dispatch(&mut self, call_id: CallId) {
        let Some(task_name) = self.calls.get(&call_id).map(|c| c.task.name) else {
            return;
        };
        let task_name = self.task_name(task_name);
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        call.attempt += 1;
        let attempt_id = self.shared.next_attempt_id();
        call.phase = CallPhase::Dispatched {
            attempt: attempt_id,
            started: false,
        };
        self.log.dispatched(call.ordinal, call.attempt);
        call.queued_ms = self.log.now();
        call.started_ms = NONE;
        let spawn = SpawnTask {
            flow_run_id: self.flow_run_id,
            call_id,
            attempt_id,
            attempt: call.attempt,
            task: task_name,
            args: call.args.clone(),
            args_ref: None,
            timeout_ms: call.task.options.timeout.map(|t| t.as_millis() as u64),
            requires: call
                .task
                .options
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            // the agent computes the MD5 of the SUCCESS event (it has the arguments
            // decoded already), unless it is known here
            want_key: self.events && call.md5.is_none(),
            #[cfg(feature = "otel")]
            trace: pinazu_shared::trace::traceparent(&call.span).map(Box::new),
            #[cfg(not(feature = "otel"))]
            trace: None,
            sched: {
                let priority = call.priority.unwrap_or(self.meta.priority);
                (call.task.options.limits.any() || priority != 0).then(|| {
                    Box::new(SchedInfo {
                        limits: call.task.options.limits,
                        key: call.key.clone(),
                        priority,
                    })
                })
            },
        };
        self.outbox.push(spawn);
        if self.outbox.len() >= DISPATCH_BATCH {
            self.flush_dispatch();
        } else if !self.in_call {
            self.queue_flush();
        }
    }

    /// The outbox goes to the scheduler after the messages already in the mailbox.
    fn queue_flush(&mut self) {
        if !self.flush_queued && !self.outbox.is_empty() {
            self.flush_queued = true;
            let _ = self.myself.send_message(FlowRunnerMsg::FlushDispatch);
        }
    }

    /// A body's call was handled: on an idle runner (no other call waiting in the
    /// mailbox, and none of its calls out but those in the outbox: a chain's next
    /// step) the outbox goes now; else after the messages in the mailbox, so a
    /// fan-out's calls go in batches.
    fn call_handled(&mut self) {
        self.in_call = false;
        let left = self
            .in_mailbox
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            .saturating_sub(1);
        if left == 0 && self.calls.len() <= self.outbox.len() {
            self.flush_dispatch();
        } else {
            self.queue_flush();
        }
    }

    fn flush_dispatch(&mut self) {
        if self.finished {
            self.outbox.clear();
        } else if !self.outbox.is_empty() {
            let batch = std::mem::take(&mut self.outbox);
            let _ = self
                .shared
                .scheduler
                .send_message(SchedulerMsg::Submit(batch));
        }
    }

    fn started(&mut self, s: AttemptStarted) {
        // (a start reported again, by a batch sent again after a failover, or of an
        // attempt adopted as running, is counted once)
        let current = self
            .calls
            .get_mut(&s.call_id)
            .filter(|c| c.phase.current() == Some(s.attempt_id) && !c.phase.started());
        if let Some(call) = current {
            call.executions += 1;
            call.phase = CallPhase::Dispatched {
                attempt: s.attempt_id,
                started: true,
            };
            let (task, attempt) = (call.task.name, call.attempt);
            call.started_ms = self.log.now();
            call.agent = self.log.agent_index(&s.agent_id.0);
            let waited = call.started_ms.saturating_sub(call.queued_ms) as f64 / 1000.0;
            task_metrics(&mut self.metrics, &self.shared, task)
                .queue_wait
                .observe(waited);
            RunStats::bump(&self.stats.executions);
            if attempt > 1 {
                tracing::debug!(flow_run_id = %self.flow_run_id, task, attempt, agent = %s.agent_id, "attempt started again");
            }
            self.task_event(task, FlowStatus::Running, None, None, None);
        }
    }

    fn resolve(&mut self, call_id: CallId, result: Result<Payload, TaskError>) {
        if let Some(mut call) = self.calls.remove(&call_id) {
            RunStats::bump(&self.stats.completed);
            if result.is_err() {
                RunStats::bump(&self.stats.failed);
            }
            if let Some(reply) = call.reply.take() {
                // the flow may have dropped the call's future; nothing to answer then
                let _ = reply.send(result);
            }
        }
    }

    fn cache_hit(&mut self, call_id: CallId, record: CacheResult) {
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        if let Err(why) = (call.task.check)(KeptResult::Json(&record.result)) {
            // a hand edit, or a return type changed without a version bump: a miss;
            // the task runs and its result overwrites the entry
            tracing::warn!(flow_run_id = %self.flow_run_id, task = call.task.name, key = call.cache.as_deref().unwrap_or(""), "a cache entry does not decode into the task's return type ({why}); treated as a miss: the task runs and overwrites it");
            self.dispatch(call_id);
            return;
        }
        RunStats::bump(&self.stats.cache_hits);
        self.log.cache_hit(call.ordinal);
        task_metrics(&mut self.metrics, &self.shared, call.task.name)
            .cache_hit
            .inc();
        self.success_event(call);
        self.journal_end(call_id, Ok(json_to_msgpack(&record.result)), None);
        self.resolve(call_id, Ok(Payload::Json(record.result)));
    }

    fn finished(&mut self, myself: &ActorRef<FlowRunnerMsg>, f: AttemptFinished) {
        let current = self.calls.get(&f.call_id).and_then(|c| c.phase.current());
        if current != Some(f.attempt_id) && f.attempt_id.epoch() != self.shared.epoch {
            // an attempt an earlier coordinator process dispatched
            self.foreign_result(myself, f);
            return;
        }
        if current != Some(f.attempt_id) {
            RunStats::bump(&self.stats.stale_results);
            tracing::debug!(flow_run_id = %self.flow_run_id, call_id = %f.call_id, attempt_id = %f.attempt_id, "ignoring a result from a superseded attempt");
            return;
        }
        let Some(call) = self.calls.get_mut(&f.call_id) else {
            return;
        };
        let task = call.task;
        let ordinal = call.ordinal;
        // (a failure the coordinator or the agent made up for an attempt that never ran,
        // e.g. no agent serves its task, has no agent and no duration)
        let ran = call.phase.started() || f.elapsed_us > 0;
        if ran {
            let agent = self.log.agent_index(&f.agent_id.0);
            self.log.ran(ordinal, agent, call.started_ms, f.elapsed_us);
        }
        if let Some(text) = &f.logs {
            self.log.attempt_logs(
                ordinal,
                call.attempt,
                &f.agent_id.0,
                text,
                f.outcome.is_err(),
            );
        }
        let metrics = task_metrics(&mut self.metrics, &self.shared, task.name);
        if ran {
            metrics.duration.observe(f.elapsed_us as f64 / 1e6);
        }
        match &f.outcome {
            Ok(_) => metrics.success.inc(),
            Err(_) => 0,
        };
        match f.outcome {
            Ok(bytes) => {
                if let (Some(key), Some(md5)) = (&call.cache, &call.md5) {
                    match rmp_serde::from_slice::<Value>(&bytes) {
                        Ok(result) => {
                            let put = self.shared.cache.send_message(CacheMsg::Put {
                                key: key.clone(),
                                record: CacheResult {
                                    flow_run_id: self.flow_run_id,
                                    task_name: task.name.to_string(),
                                    result,
                                    cache_key: md5.clone(),
                                    timestamp: now_timestamp(),
                                },
                                #[cfg(feature = "otel")]
                                span: tracing::trace_span!(target: "pinazu::trace", parent: &call.span, "cache.put", key = %key),
                            });
                            if put.is_err() {
                                tracing::warn!(
                                    task = task.name,
                                    "the cache actor is gone: result not cached"
                                );
                            }
                        }
                        Err(e) => {
                            tracing::warn!(task = task.name, error = %e, "result is not representable as JSON; not cached")
                        }
                    }
                }
                if let Some(call) = self.calls.get_mut(&f.call_id) {
                    if call.md5.is_none() {
                        call.md5 = f.result_cache_key.as_deref().map(String::from);
                    }
                }
                if let Some(call) = self.calls.get(&f.call_id) {
                    self.success_event(call);
                }
                self.log.succeeded(ordinal, &bytes);
                self.journal_end(f.call_id, Ok(bytes.clone()), f.result_ref);
                self.resolve(f.call_id, Ok(Payload::Msgpack(bytes)));
            }
            Err(info) => {
                let policy = task.options.retry;
                let attempt = call.attempt;
                call.failures += 1;
                if info.kind.retryable() && call.failures <= policy.retries && !self.finished {
                    call.phase = CallPhase::RetryDue;
                    RunStats::bump(&self.stats.retries);
                    self.log.retrying(ordinal, &info);
                    let delay = policy.delay_with_jitter(attempt, fastrand::f64());
                    tracing::info!(flow_run_id = %self.flow_run_id, task = task.name, call_id = %f.call_id, attempt, error = %info, delay_ms = delay.as_millis() as u64, "attempt failed; retrying");
                    let note = format!(
                        "attempt {attempt} failed: {info}; retry {} of {} in {delay:?}",
                        call.failures, policy.retries
                    );
                    let traceback = info.traceback.as_deref().map(String::from);
                    self.task_event(task.name, FlowStatus::Pending, None, Some(note), traceback);
                    schedule_retry(myself.clone(), f.call_id, delay);
                } else {
                    tracing::warn!(flow_run_id = %self.flow_run_id, task = task.name, call_id = %f.call_id, attempts = attempt, error = %info, "task failed");
                    self.task_event(
                        task.name,
                        FlowStatus::Failed,
                        None,
                        Some(info.to_string()),
                        info.traceback.as_deref().map(String::from),
                    );
                    self.log.failed(ordinal, &info);
                    #[cfg(feature = "otel")]
                    if let Some(call) = self.calls.get(&f.call_id) {
                        call.span.record("otel.status_code", "ERROR");
                        call.span
                            .record("otel.status_message", info.to_string().as_str());
                    }
                    task_metrics(&mut self.metrics, &self.shared, task.name)
                        .failed
                        .inc();
                    self.journal_end(f.call_id, Err(info.clone()), None);
                    self.resolve(
                        f.call_id,
                        Err(TaskError::Failed {
                            task: task.name.to_string(),
                            attempts: attempt,
                            last_error: info,
                        }),
                    );
                }
            }
        }
    }
}

impl RunnerState {
    /// Where a call stands (`None`: not in the table: done, or never made).
    fn phase(&self, call_id: CallId) -> Option<CallPhase> {
        self.calls.get(&call_id).map(|c| c.phase)
    }

    /// A result of an attempt dispatched by an earlier coordinator process (it ran, or
    /// its report waited at the agent, while the coordinator was down). A success
    /// answers its call, now or when the flow body makes the call again; a failure is
    /// not counted (the call runs under this process's retry policy).
    fn foreign_result(&mut self, myself: &ActorRef<FlowRunnerMsg>, f: AttemptFinished) {
        if self.adoptable.get(&f.call_id).map(|a| a.0) == Some(f.attempt_id) {
            self.adoptable.remove(&f.call_id);
        }
        if f.outcome.is_err() || self.finished {
            RunStats::bump(&self.stats.stale_results);
            return;
        }
        let journaled = self.journaled(f.call_id);
        let not_made_yet = f.call_id.seq >= self.occurrences_of(f.call_id);
        match self.calls.get_mut(&f.call_id) {
            Some(call) => {
                // the call was dispatched again meanwhile: the earlier result wins, and
                // the new attempt's result will be ignored as superseded
                tracing::info!(flow_run_id = %self.flow_run_id, call_id = %f.call_id, attempt_id = %f.attempt_id, "a result from before the coordinator restarted answers the call");
                call.phase = CallPhase::Dispatched {
                    attempt: f.attempt_id,
                    started: true,
                };
                // (not the start of the attempt it replaces)
                call.started_ms = NONE;
                call.agent = NONE;
                call.executions += 1;
                RunStats::bump(&self.stats.executions);
                self.finished(myself, f);
            }
            None if !journaled && not_made_yet => {
                if self.early.len() < MAX_EARLY {
                    self.early.insert(f.call_id, f);
                }
            }
            None => RunStats::bump(&self.stats.stale_results),
        }
    }

    /// A journaled result that no longer decodes into the task's return type (a task
    /// whose return type changed, a journal written from a bad cache entry) is dropped
    /// from the replay with a warning: the call runs again instead of failing the run.
    fn drop_undecodable_journal_entry(&mut self, task: &'static TaskDef, call_id: CallId) {
        let Some(replay) = self.replay.as_mut() else {
            return;
        };
        let Some(Ok(bytes)) = replay.calls.get(&call_id).map(|e| &e.outcome) else {
            return;
        };
        if let Err(why) = (task.check)(KeptResult::Msgpack(bytes)) {
            tracing::warn!(flow_run_id = %self.flow_run_id, task = task.name, %call_id, "a journaled result does not decode into the task's return type ({why}); dropped: the call runs again");
            if let Some(e) = replay.calls.remove(&call_id) {
                replay.by_ordinal.remove(&e.ordinal);
            }
        }
    }

    /// Whether the replayed journal answers this call.
    fn journaled(&self, call_id: CallId) -> bool {
        self.replay
            .as_ref()
            .is_some_and(|r| r.calls.contains_key(&call_id))
    }

    /// How many calls with this call's content the flow body has made so far.
    fn occurrences_of(&self, call_id: CallId) -> u32 {
        self.occurrences.get(&call_id.key).copied().unwrap_or(0)
    }

    fn adopt(&mut self, call_id: CallId, attempt_id: AttemptId, queued: bool) {
        if self.finished || attempt_id.epoch() == self.shared.epoch {
            return;
        }
        let made = call_id.seq < self.occurrences_of(call_id);
        let journaled = self.journaled(call_id);
        if !made && !journaled && self.adoptable.len() < MAX_EARLY {
            tracing::debug!(flow_run_id = %self.flow_run_id, %call_id, %attempt_id, "an attempt from before the coordinator restarted is still running; the call will wait for it");
            self.adoptable.insert(call_id, (attempt_id, queued));
        }
    }

    fn lost(&mut self, call_id: CallId, attempt_id: AttemptId, reason: String, ran: bool) {
        if self.adoptable.get(&call_id).map(|a| a.0) == Some(attempt_id) {
            self.adoptable.remove(&call_id);
        }
        let Some(call) = self.calls.get_mut(&call_id) else {
            return;
        };
        if call.phase.current() != Some(attempt_id) || self.finished {
            return;
        }
        if ran && !call.phase.started() {
            // it ran on the agent, whose report of its start never arrived
            call.executions += 1;
            RunStats::bump(&self.stats.executions);
        }
        RunStats::bump(&self.stats.lost);
        let (task, attempt) = (call.task.name, call.attempt);
        tracing::info!(flow_run_id = %self.flow_run_id, %call_id, %attempt_id, attempt, %reason, "attempt lost; dispatching it again");
        self.task_event(task, FlowStatus::Pending, None, None, None);
        self.dispatch(call_id);
    }

    /// Ends the run: stops what it still runs, publishes the final status, delivers
    /// events and cache writes, then answers whoever waits for the outcome.
    ///
    /// `unfinished` says why calls that have not ended are cancelled: each of them ends
    /// with a task FAILED event (`error_message` "cancelled", the reason in
    /// `traceback`), so every task that got PENDING ends SUCCESS or FAILED.
    /// The run is another coordinator's now: the body stops, queued attempts are
    /// dropped (running ones are the new owner's), nothing is announced; whoever waits
    /// here learns the run moved.
    fn let_go(&mut self, myself: &ActorRef<FlowRunnerMsg>) {
        self.finished = true;
        // (the children go on: the new owner's resumed body follows them again)
        for (_, c) in self.children.drain() {
            let _ = c.stop.send(crate::coordinator::ChildStop::LetGo);
        }
        if let Some(body) = self.body.take() {
            body.abort();
        }
        let _ = self
            .shared
            .scheduler
            .send_message(SchedulerMsg::ForgetRun(self.flow_run_id));
        self.calls.clear();
        self.claim = None;
        self.shared.runs.remove(&self.flow_run_id);
        self.shared.moved(self.flow_run_id);
        if let Some(leases) = &self.shared.config.ownership.0 {
            leases.forget(self.flow_run_id);
        }
        tracing::warn!(flow_run_id = %self.flow_run_id, "flow run taken over by another coordinator: this one lets it go");
        myself.stop(None);
    }

    async fn finish(
        &mut self,
        myself: &ActorRef<FlowRunnerMsg>,
        result: Result<Value, ErrorInfo>,
        unfinished: &str,
    ) {
        self.finished = true;
        self.end_children(unfinished);
        if !self.calls.is_empty() {
            // calls the flow stopped waiting for (or a cancel): stop their attempts too
            let _ = self
                .shared
                .scheduler
                .send_message(SchedulerMsg::CancelRun(self.flow_run_id));
            let ids: Vec<CallId> = self.calls.keys().copied().collect();
            for id in ids {
                if let Some(mut call) = self.calls.remove(&id) {
                    RunStats::bump(&self.stats.cancelled);
                    // (a running one keeps its start and agent in its row)
                    write_start(&mut self.log, &call);
                    self.log.cancelled(call.ordinal, unfinished);
                    task_metrics(&mut self.metrics, &self.shared, call.task.name)
                        .cancelled
                        .inc();
                    self.task_event(
                        call.task.name,
                        FlowStatus::Failed,
                        None,
                        Some("cancelled".into()),
                        Some(unfinished.to_string()),
                    );
                    if let Some(reply) = call.reply.take() {
                        let _ = reply.send(Err(TaskError::RunClosed {
                            task: call.task.name.to_string(),
                            reason: unfinished.to_string(),
                        }));
                    }
                }
            }
        }
        // the note the run ends with (e.g. unused results passed in), not what it
        // waited for
        self.stats.set_note(self.warn_unused_seeds());
        let (status, error) = match &result {
            Ok(_) => (FlowStatus::Success, None),
            Err(e) => (FlowStatus::Failed, Some(e.clone())),
        };
        match &error {
            None => {
                tracing::info!(flow_run_id = %self.flow_run_id, flow = self.flow.name, "flow run succeeded")
            }
            Some(e) => {
                tracing::error!(flow_run_id = %self.flow_run_id, flow = self.flow.name, error = %e, "flow run failed")
            }
        }
        // one snapshot for the journaled summary and the outcome: the run's id given
        // again answers exactly what this run answered
        let snap = self.stats.snapshot();
        let (summary, large) = self.summary(&snap, status, &result, error.as_ref());
        // a result too large for the journal entry is kept in the object store, so the
        // run's id can still answer it
        let (result_ref, result_lost) = match large {
            Some(json) => {
                let key = pinazu_shared::wire::result_key(self.flow_run_id);
                match self.shared.store.put(&key, Bytes::from(json)).await {
                    Ok(()) => (Some(key), false),
                    Err(e) => {
                        tracing::warn!(flow_run_id = %self.flow_run_id, error = %e, "the run's large result could not be kept in the store; its id given again runs the flow again (its calls answer from the journal)");
                        (None, true)
                    }
                }
            }
            None => (None, false),
        };
        if self.shared.journal.enabled() {
            self.shared.journal.append(
                self.flow_run_id,
                JournalEntry::RunEnded {
                    status,
                    summary: Some(summary),
                    params: Some(self.params.clone()),
                    result_ref,
                    result_lost,
                },
            );
        }
        // the end is durable before it is announced: a coordinator killed in between
        // resumes the run instead of having announced an end it forgets
        #[cfg(feature = "otel")]
        let flush_span = if self.shared.journal.enabled() {
            tracing::trace_span!(target: "pinazu::trace", parent: &self.span, "journal.flush")
        } else {
            tracing::Span::none()
        };
        let mut waited = 0u32;
        while let Err(e) = self.shared.journal.flush().await {
            if self.shared.config.ownership.0.is_none() {
                tracing::error!(flow_run_id = %self.flow_run_id, error = %e, "the run's journal could not be made durable");
                break;
            }
            // with other coordinators an end that is not durable is not announced: the
            // run would be resumed elsewhere and end twice
            if self.shared.journal.fenced(self.flow_run_id) {
                break;
            }
            if waited.is_multiple_of(20) {
                tracing::error!(flow_run_id = %self.flow_run_id, error = %e, "the run's end cannot be journaled yet; retrying before announcing it");
            }
            waited += 1;
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        #[cfg(feature = "otel")]
        drop(flush_span);
        if self.shared.journal.fenced(self.flow_run_id) {
            // another coordinator owns the run now: its end is not this one's to announce
            self.let_go(myself);
            return;
        }
        if let Some(leases) = &self.shared.config.ownership.0 {
            // ended and journaled: nobody is to take it over
            leases.release(self.flow_run_id).await;
        }
        self.flow_event(status, error.as_ref());
        #[cfg(feature = "otel")]
        if let Some(e) = &error {
            self.span.record("otel.status_code", "ERROR");
            self.span
                .record("otel.status_message", e.to_string().as_str());
        }
        self.shared
            .metrics
            .run_ended(self.flow.name, status.as_str());
        self.log.close();
        let log = std::mem::replace(&mut self.log, CallLog::new(serde_json::Map::new()));
        self.shared.keep_log(self.flow_run_id, log);
        // deliver the run's events and cache writes before anyone sees the outcome
        let _ = ractor::call!(self.shared.status, StatusMsg::Flush);
        let _ = ractor::call!(self.shared.cache, CacheMsg::Flush);
        let outcome = FlowRunOutcome {
            flow_run_id: self.flow_run_id,
            flow: self.flow.name.to_string(),
            status,
            result: result.as_ref().ok().cloned(),
            error: error.as_ref().map(|e| e.to_string()),
            traceback: error.and_then(|e| e.traceback.map(String::from)),
            stats: snap,
        };
        // the run has ended and its journal is durable: its id is free again (before
        // anyone hears of the outcome, so a start that follows finds it free)
        self.claim = None;
        self.outcome.send_replace(Some(outcome));
        self.shared.runs.remove(&self.flow_run_id);
        self.shared.retire(self.flow_run_id);
        myself.stop(None);
    }
}

/// A result larger than this (as JSON, with the run's parameters, which the same entry
/// carries) is kept in the object store, not in the journaled run summary: a JetStream
/// message stays well under the server's max payload.
const SUMMARY_RESULT_MAX: usize = 256 * 1024;

impl RunnerState {
    /// What `status` shows of the ended run once no coordinator hosts it, and the
    /// result's JSON when it is too large to be part of it.
    fn summary(
        &self,
        snap: &crate::stats::StatsSnapshot,
        status: FlowStatus,
        result: &Result<Value, ErrorInfo>,
        error: Option<&ErrorInfo>,
    ) -> (RunInfo, Option<Vec<u8>>) {
        let params_len = serde_json::to_vec(&self.params).map_or(0, |p| p.len());
        let (result, large) = match result {
            Ok(v) => match serde_json::to_vec(v) {
                Ok(json) if json.len() + params_len > SUMMARY_RESULT_MAX => (None, Some(json)),
                _ => (Some(v.clone()), None),
            },
            Err(_) => (None, None),
        };
        let info = RunInfo {
            result,
            error: error.map(|e| e.to_string()),
            note: self.stats.note(),
            parent_run_id: self.meta.parent,
            ..snap.run_info(self.flow_run_id, self.flow.name, status, snap.completed)
        };
        (info, large)
    }

    /// The task's name as shared by every attempt (one allocation per task, not per
    /// attempt).
    fn task_name(&mut self, name: &'static str) -> Arc<str> {
        self.names
            .entry(name)
            .or_insert_with(|| Arc::from(name))
            .clone()
    }

    /// The body called another flow: a call like a task's (numbered by its flow and
    /// parameters, journaled), answered from the journal when it ended before, else a
    /// child run under a run id derived from this run's and the call's (so a resumed
    /// parent finds the same child: resumed if unfinished, answered if it succeeded).
    fn new_child(
        &mut self,
        myself: &ActorRef<FlowRunnerMsg>,
        flow: &'static FlowDef,
        params: serde_json::Map<String, Value>,
        priority: Option<i32>,
        reply: ChildReply,
    ) {
        if self.finished {
            let _ = reply.send(Err("the parent flow has already finished".into()));
            return;
        }
        RunStats::bump(&self.stats.tasks);
        let task = child_task_name(flow.name);
        let bytes = serde_json::to_vec(&params).unwrap_or_default();
        let key = CallId::content_key(&task, &bytes);
        let seq = self.occurrences.entry(key).or_insert(0);
        let call_id = CallId { key, seq: *seq };
        *seq += 1;
        let ordinal = self.next_ordinal;
        self.next_ordinal += 1;
        self.log.made(ordinal, flow.name);
        let child = FlowRunId::child_of(self.flow_run_id, call_id);
        // a resumed run whose call at this position was another one: its code changed
        if let Some(replay) = self.replay.as_ref().filter(|r| r.unfinished) {
            let other = replay
                .by_ordinal
                .get(&ordinal)
                .filter(|c| **c != call_id)
                .and_then(|c| replay.calls.get(c));
            if let Some(other) = other {
                let msg = format!(
                    "the flow no longer matches its journal: call #{ordinal} was `{}` when the run started and is now `{task}` (with other arguments or in another order); the flow's code changed while the run was unfinished, so it cannot be resumed: start it under a new FLOW_RUN_ID",
                    other.task
                );
                let _ = reply.send(Err(msg.clone()));
                let _ = myself.send_message(FlowRunnerMsg::Diverged(msg));
                return;
            }
        }
        if let Some(ended) = self.replay.as_ref().and_then(|r| r.calls.get(&call_id)) {
            RunStats::bump(&self.stats.replayed);
            RunStats::bump(&self.stats.completed);
            self.log.replayed(ordinal, ended.outcome.as_ref().err());
            let outcome = match &ended.outcome {
                Ok(bytes) => FlowRunOutcome {
                    flow_run_id: child,
                    flow: flow.name.to_string(),
                    status: FlowStatus::Success,
                    result: rmp_serde::from_slice(bytes).ok(),
                    error: None,
                    traceback: None,
                    stats: Default::default(),
                },
                Err(e) => FlowRunOutcome {
                    flow_run_id: child,
                    flow: flow.name.to_string(),
                    status: FlowStatus::Failed,
                    result: None,
                    error: Some(e.message.clone()),
                    traceback: e.traceback.as_deref().map(str::to_string),
                    stats: Default::default(),
                },
            };
            let _ = reply.send(Ok(outcome));
            return;
        }
        self.log.dispatched(ordinal, 1);
        let options = crate::coordinator::RunOptions {
            events: Some(self.header.context.clone()),
            meta: crate::journal::RunMeta {
                priority: priority.unwrap_or(self.meta.priority),
                parent: Some(self.flow_run_id),
            },
            ..Default::default()
        };
        let coordinator = crate::coordinator::Coordinator::over(self.shared.clone());
        let me = myself.clone();
        // a failed parent run again runs its failed children again (a resumed one
        // does not)
        let rerun_failed = self.replay.as_ref().is_some_and(|r| !r.unfinished);
        tracing::info!(flow_run_id = %self.flow_run_id, child = %child, flow = flow.name, "child flow started");
        let (stop, stopped) = watch::channel(crate::coordinator::ChildStop::Go);
        tokio::spawn(async move {
            let outcome = coordinator
                .run_child(flow, params, child, options, rerun_failed, stopped)
                .await;
            let _ = me.send_message(FlowRunnerMsg::ChildEnded { call_id, outcome });
        });
        self.children.insert(
            call_id,
            ChildCall {
                flow,
                run: child,
                ordinal,
                reply,
                stop,
            },
        );
    }

    /// A child run ended: journaled as the call's outcome (its JSON result, or its
    /// error), then answered.
    fn child_ended(&mut self, call_id: CallId, outcome: Result<FlowRunOutcome, String>) {
        let Some(c) = self.children.remove(&call_id) else {
            return;
        };
        RunStats::bump(&self.stats.completed);
        let journaled: Result<Bytes, ErrorInfo> = match &outcome {
            Ok(o) if o.status == FlowStatus::Success => {
                let result = o.result.clone().unwrap_or(Value::Null);
                let bytes = json_to_msgpack(&result);
                self.log.succeeded(c.ordinal, &bytes);
                Ok(bytes)
            }
            Ok(o) => {
                // (the child's own error, as its caller sees it live: a resumed
                // parent answered from the journal sees the same text)
                let mut e = ErrorInfo::new(
                    FailureKind::Error,
                    o.error.clone().unwrap_or_else(|| "no error given".into()),
                );
                e.traceback = o.traceback.as_deref().map(Box::from);
                self.log.failed(c.ordinal, &e);
                Err(e)
            }
            Err(why) => {
                let e = ErrorInfo::new(
                    FailureKind::Error,
                    format!(
                        "child flow `{}` (run {}) could not run: {why}",
                        c.flow.name, c.run
                    ),
                );
                self.log.failed(c.ordinal, &e);
                Err(e)
            }
        };
        if self.shared.journal.enabled() {
            self.shared.journal.append(
                self.flow_run_id,
                JournalEntry::CallEnded {
                    ordinal: c.ordinal,
                    call_id,
                    task: child_task_name(c.flow.name),
                    outcome: journaled,
                    executions: 0,
                    outcome_ref: None,
                },
            );
        }
        let _ = c.reply.send(outcome);
    }

    /// The run ends with children still running (a cancel, or a body that stopped
    /// waiting): they are cancelled too, and their callers answered.
    fn end_children(&mut self, why: &str) {
        for (_, c) in self.children.drain() {
            RunStats::bump(&self.stats.cancelled);
            self.log.cancelled(c.ordinal, why);
            // its follower cancels it (once its start, if under way, is done)
            let reason = format!("its parent run {} ended: {why}", self.flow_run_id);
            let _ = c.stop.send(crate::coordinator::ChildStop::Cancel(reason));
            let _ = c.reply.send(Err(format!("the parent run ended: {why}")));
        }
    }

    /// Journals a call's final outcome (a replayed call is not journaled again).
    /// A result the agent stored (`outcome_ref`) is journaled by reference, not copied.
    fn journal_end(
        &self,
        call_id: CallId,
        outcome: Result<Bytes, ErrorInfo>,
        outcome_ref: Option<String>,
    ) {
        if !self.shared.journal.enabled() {
            return;
        }
        let Some(call) = self.calls.get(&call_id) else {
            return;
        };
        let outcome = match (&outcome_ref, outcome) {
            (Some(_), Ok(_)) => Ok(Bytes::new()),
            (_, o) => o,
        };
        self.shared.journal.append(
            self.flow_run_id,
            JournalEntry::CallEnded {
                ordinal: call.ordinal,
                call_id,
                task: call.task.name.to_string(),
                outcome,
                executions: call.executions,
                outcome_ref,
            },
        );
    }
}

/// Call ids are already hashes (xxh3 of task and arguments): a map keyed by them needs
/// only a cheap mix, not SipHash (which showed in the runner's profile).
#[derive(Default)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

type CallMap<V> = HashMap<CallId, V, BuildHasherDefault<IdHasher>>;

/// Bound on results and attempts held for calls the flow body has not made again yet
/// (in practice at most the agents' slots).
const MAX_EARLY: usize = 1 << 20;

/// How often a child run looks whether its parent has ended.
const PARENT_CHECK: Duration = Duration::from_secs(2);

/// Most attempts handed to the scheduler in one message.
const DISPATCH_BATCH: usize = 256;

fn json_to_msgpack(value: &Value) -> Bytes {
    Bytes::from(rmp_serde::to_vec_named(value).unwrap_or_default())
}

/// Results passed in for a run (Pinazu Core's `--success-task-results`): by the call's
/// MD5 cache key (the original library's key) or by task name.
#[derive(Clone, Debug, Default)]
pub struct Seeds {
    by_md5: HashMap<String, Value>,
    by_task: HashMap<String, Value>,
}

impl Seeds {
    /// Parses `{"<md5 or task name>": result, ...}` or a list of `CacheResult`-like
    /// objects (`{"cache_key"|"task_name", "result"}`).
    pub fn parse(text: &str) -> Result<Seeds, String> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| format!("--success-task-results is not JSON: {e}"))?;
        let mut seeds = Seeds::default();
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match md5_of_key(&k) {
                        Some(md5) => {
                            seeds.by_md5.insert(md5, v);
                        }
                        None => {
                            seeds.by_task.insert(k, v);
                        }
                    }
                }
            }
            Value::Array(items) => {
                for item in items {
                    let result = item.get("result").cloned().unwrap_or(Value::Null);
                    let key = item
                        .get("cache_key")
                        .or_else(|| item.get("result_cache_key"))
                        .and_then(Value::as_str);
                    if let Some(k) = key {
                        let md5 = md5_of_key(k).ok_or_else(|| {
                            format!("--success-task-results: {k:?} is not an MD5 cache key (32 hex digits) or a cache object path ending in /<md5>.json")
                        })?;
                        seeds.by_md5.insert(md5, result);
                    } else if let Some(t) = item.get("task_name").and_then(Value::as_str) {
                        seeds.by_task.insert(t.to_string(), result);
                    } else {
                        return Err(
                            "--success-task-results: each item needs cache_key or task_name".into(),
                        );
                    }
                }
            }
            _ => return Err("--success-task-results must be a JSON object or array".into()),
        }
        Ok(seeds)
    }

    /// Whether there is nothing to seed.
    pub fn is_empty(&self) -> bool {
        self.by_md5.is_empty() && self.by_task.is_empty()
    }

    /// The result for a call, and the key that gave it.
    fn lookup(&self, task: &str, md5: &str) -> Option<(String, Value)> {
        match self.by_md5.get_key_value(md5) {
            Some((k, v)) => Some((k.clone(), v.clone())),
            None => self
                .by_task
                .get_key_value(task)
                .map(|(k, v)| (k.clone(), v.clone())),
        }
    }

    /// Every key, as given (MD5s lower-cased).
    fn keys(&self) -> impl Iterator<Item = &String> {
        self.by_md5.keys().chain(self.by_task.keys())
    }
}

impl RunnerState {
    /// Keys of `--success-task-results` that matched no call of the run: a warning
    /// naming them (a typo or a key from another run would otherwise pass unnoticed).
    /// Returns the warning, which also becomes the run's note (what `run` shows).
    fn warn_unused_seeds(&self) -> Option<String> {
        let mut unused: Vec<&String> = self
            .seeds
            .keys()
            .filter(|k| !self.seeds_used.contains(*k))
            .collect();
        if unused.is_empty() {
            return None;
        }
        unused.sort();
        let shown: Vec<&str> = unused.iter().take(20).map(|k| k.as_str()).collect();
        let more = unused.len().saturating_sub(shown.len());
        let warning = format!(
            "--success-task-results: {} key(s) matched no call of this run and were not used: {}{}",
            unused.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
        tracing::warn!(flow_run_id = %self.flow_run_id, unmatched = unused.len(), "{warning}");
        Some(warning)
    }
}

/// A task's metrics handles (looked up in the registry once per task and run).
fn task_metrics<'a>(
    list: &'a mut Vec<(&'static str, TaskMetrics)>,
    shared: &CoordShared,
    task: &'static str,
) -> &'a TaskMetrics {
    let found = list
        .iter()
        .position(|(name, _)| std::ptr::eq(*name, task) || *name == task);
    let i = match found {
        Some(i) => i,
        None => {
            list.push((task, shared.metrics.task(task)));
            list.len() - 1
        }
    };
    &list[i].1
}

/// A running call's start, kept in its `CallState`, written to its row.
fn write_start(log: &mut CallLog, call: &CallState) {
    if call.phase.started() && call.started_ms != NONE {
        log.running(call.ordinal, call.started_ms, call.agent, call.attempt);
    }
}

fn schedule_retry(me: ActorRef<FlowRunnerMsg>, call_id: CallId, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = me.send_message(FlowRunnerMsg::RetryDue(call_id));
    });
}

impl Actor for FlowRunner {
    type Msg = FlowRunnerMsg;
    type State = RunnerState;
    type Arguments = FlowRunnerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let FlowRunnerArgs {
            flow_run_id,
            flow,
            body,
            shared,
            stats,
            outcome,
            params,
            replay,
            seeds,
            start_delay,
            header,
            claim,
            meta,
        } = args;
        if let Some(r) = &replay {
            if r.unfinished {
                // a resume continues the same run: its executions so far count
                stats
                    .executions
                    .fetch_add(r.executions, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::info!(flow_run_id = %flow_run_id, journaled_calls = r.calls.len(), resume = r.unfinished, "replaying the run's journal");
        }
        // `RunStarted` is journaled (and flushed) by `Coordinator::start_run_with`
        let in_mailbox = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let ctx = FlowContext {
            in_mailbox: in_mailbox.clone(),
            runner: myself.clone(),
            flow_run_id,
            default_cache: shared.config.default_cache,
            // arguments as JSON for results passed in (keyed by the call's MD5); the MD5
            // of every task SUCCESS event comes from the agent that ran the call
            always_json: !seeds.is_empty(),
        };
        // the run's span, child of the launcher's (its `run` client's with `otel`)
        #[cfg(feature = "otel")]
        let run_span = {
            let span = tracing::trace_span!(target: "pinazu::trace", "flow_run", flow = flow.name, flow_run_id = %flow_run_id, otel.status_code = tracing::field::Empty, otel.status_message = tracing::field::Empty);
            pinazu_shared::trace::child_of(&span, header.context.traceparent.as_deref());
            span
        };
        let mut state = RunnerState {
            flow_run_id,
            flow,
            events: shared.events_enabled,
            shared,
            stats,
            outcome,
            body: None,
            calls: CallMap::default(),
            occurrences: HashMap::default(),
            task_events: RefCell::new(Vec::new()),
            next_ordinal: 0,
            early: CallMap::default(),
            adoptable: CallMap::default(),
            outbox: Vec::new(),
            flush_queued: false,
            in_call: false,
            in_mailbox: in_mailbox.clone(),
            myself: myself.clone(),
            names: HashMap::new(),
            replay,
            seeds,
            seeds_used: Default::default(),
            header,
            log: CallLog::new(params.clone()),
            #[cfg(feature = "otel")]
            span: run_span,
            metrics: Vec::new(),
            params,
            claim,
            meta,
            children: Default::default(),
            finished: false,
        };
        // route reports to this runner before the body can make its first call
        state.shared.runs.insert(flow_run_id, myself.clone());
        tracing::info!(flow_run_id = %flow_run_id, flow = flow.name, "flow run started");
        state.flow_event(FlowStatus::Running, None);
        let me = myself.clone();
        // the body's own log lines go where the coordinator publishes them
        let flow_log = state.shared.config.flow_logs.0.clone().map(|f| {
            pinazu_shared::task_context::FlowLog(Arc::new(move |line: String| f(flow_run_id, line)))
        });
        let body: BoxFuture<'static, Result<Value, ErrorInfo>> = match flow_log {
            Some(log) => Box::pin(pinazu_shared::task_context::FLOW_LOG.scope(log, body)),
            None => body,
        };
        let handle = tokio::spawn(async move {
            if !start_delay.is_zero() {
                tokio::time::sleep(start_delay).await;
            }
            // unconstrained: a flow body joins thousands of call futures; under tokio's
            // cooperative budget, a burst of answers past 128 made every further one
            // report Pending and wake again, re-polled over and over (a profile showed
            // `FuturesUnordered` wake-ups dominating once results arrived in batches)
            let result = FLOW_CONTEXT
                .scope(
                    ctx,
                    tokio::task::unconstrained(AssertUnwindSafe(body).catch_unwind()),
                )
                .await
                .unwrap_or_else(|p| Err(ErrorInfo::from_panic(&*p)));
            let _ = me.send_message(FlowRunnerMsg::FlowDone(result));
        });
        state.body = Some(handle.abort_handle());
        // a child run ends when its parent has (cancelled, or taken over and cancelled
        // before its resumed body followed this child again; or hosted where the
        // parent's coordinator cannot reach): it looks at the parent's journal
        if let Some(parent) = state.meta.parent {
            let (journal, me) = (state.shared.journal.clone(), myself.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(PARENT_CHECK).await;
                    if matches!(
                        me.get_status(),
                        ractor::ActorStatus::Stopped | ractor::ActorStatus::Stopping
                    ) {
                        return;
                    }
                    if let Ok(Some(JournalEntry::RunEnded { status, .. })) =
                        journal.latest(parent).await
                    {
                        let why = format!("its parent run {parent} ended {status}");
                        let _ = me.send_message(FlowRunnerMsg::Cancel(why));
                        return;
                    }
                }
            });
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        if !matches!(
            msg,
            FlowRunnerMsg::FlushDispatch | FlowRunnerMsg::Calls(..) | FlowRunnerMsg::Barrier(_)
        ) {
            state.log.tick();
        }
        match msg {
            FlowRunnerMsg::Call {
                task,
                args,
                args_json,
                key,
                priority,
                reply,
            } => {
                state.in_call = true;
                state.new_call(&myself, task, args, args_json, (key, priority), reply);
                state.call_handled();
            }
            // (each step only from the phase it leaves: a duplicate or late message
            // finds the call elsewhere and changes nothing)
            FlowRunnerMsg::CacheChecked { call_id, hit } => {
                if state.phase(call_id) == Some(CallPhase::WaitingForCache) {
                    match hit {
                        Some(record) => state.cache_hit(call_id, record),
                        None => state.dispatch(call_id),
                    }
                }
            }
            FlowRunnerMsg::Started(s) => state.started(s),
            FlowRunnerMsg::Finished(f) => state.finished(&myself, f),
            FlowRunnerMsg::Reports(reports) => {
                for r in reports {
                    match r {
                        Report::Started(s) => state.started(s),
                        Report::Finished(f) => state.finished(&myself, f),
                    }
                }
            }
            FlowRunnerMsg::FlushDispatch => {
                state.flush_queued = false;
                state.flush_dispatch();
            }
            FlowRunnerMsg::RetryDue(call_id) => {
                if state.phase(call_id) == Some(CallPhase::RetryDue) {
                    state.dispatch(call_id);
                }
            }
            FlowRunnerMsg::Calls(query, reply) => {
                // the running calls' starts, kept in the call table, go to their rows
                for call in state.calls.values() {
                    write_start(&mut state.log, call);
                }
                let _ = reply.send(state.log.page(&query));
            }
            FlowRunnerMsg::Phases(reply) => {
                let mut phases: Vec<(CallId, CallPhase)> =
                    state.calls.iter().map(|(id, c)| (*id, c.phase)).collect();
                phases.sort_by_key(|(id, _)| (id.key, id.seq));
                let _ = reply.send(phases);
            }
            FlowRunnerMsg::AttemptLost {
                call_id,
                attempt_id,
                reason,
                ran,
            } => state.lost(call_id, attempt_id, reason, ran),
            FlowRunnerMsg::Note(note) => state.stats.set_note(note),
            FlowRunnerMsg::Child {
                flow,
                params,
                priority,
                reply,
            } => state.new_child(&myself, flow, params, priority, reply),
            FlowRunnerMsg::ChildEnded { call_id, outcome } => state.child_ended(call_id, outcome),
            FlowRunnerMsg::Cancel(reason) => {
                if !state.finished {
                    if let Some(body) = state.body.take() {
                        body.abort();
                    }
                    tracing::warn!(flow_run_id = %state.flow_run_id, %reason, "flow run cancelled");
                    let info = ErrorInfo::new(FailureKind::Cancelled, reason.clone());
                    state.finish(&myself, Err(info), &reason).await;
                }
            }
            FlowRunnerMsg::FlowDone(result) => {
                if !state.finished {
                    state
                        .finish(&myself, result, "the flow returned before this call ended")
                        .await;
                }
            }
            FlowRunnerMsg::Adopt {
                call_id,
                attempt_id,
                queued,
            } => state.adopt(call_id, attempt_id, queued),
            FlowRunnerMsg::Barrier(reply) => {
                let _ = reply.send(());
            }
            FlowRunnerMsg::LetGo => {
                if !state.finished {
                    state.let_go(&myself);
                }
                return Ok(());
            }
            FlowRunnerMsg::Diverged(msg) => {
                if !state.finished {
                    if let Some(body) = state.body.take() {
                        body.abort();
                    }
                    tracing::error!(flow_run_id = %state.flow_run_id, "{msg}");
                    let why = "the run failed: its flow no longer matches its journal";
                    state
                        .finish(&myself, Err(ErrorInfo::new(FailureKind::Error, msg)), why)
                        .await;
                }
            }
        }
        state.send_events();
        Ok(())
    }
}
