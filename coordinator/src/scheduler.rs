//! The scheduler: the agent registry and dispatch. It hands an agent at most its free
//! slots plus a window of attempts that wait in the agent's own queue (pipelined
//! dispatch: sized from the agent's attempt durations and the dispatch round trip, so a
//! slot never idles for a round trip), takes waiting attempts back from a busy agent for
//! an idle one (stealing), matches tasks to agents that serve them, serves runs round
//! robin so concurrent runs progress fairly, and notices lost attempts: an agent that
//! stops heartbeating is dead, and an attempt its agent no longer lists is lost. Lost
//! attempts go back to their runner, which dispatches them again.

use dashmap::DashMap;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use pinazu_shared::api::AgentSummary;
use pinazu_shared::error::{ErrorInfo, FailureKind};
use pinazu_shared::ids::{AgentId, AttemptId, CallId, FlowRunId};
use pinazu_shared::transport::AgentLink;
use pinazu_shared::wire::{AgentInfo, AttemptFinished, Heartbeat, SchedInfo, SpawnTask};

use crate::flow_runner::FlowRunnerMsg;
use crate::limits::{FairQueue, Gate, GateKey, GateKind, Queued};
use pinazu_shared::api::{GateView, LimitsView};
use pinazu_shared::options::NamedLimit;

/// When an agent's next heartbeat is due after its last (they come every second).
const HEARTBEAT_DUE: Duration = Duration::from_millis(1500);

/// Most attempts kept waiting in one agent's queue beyond its slots.
const MAX_WINDOW: u32 = 512;
/// The dispatch round trip assumed until one is measured (microseconds).
const DEFAULT_RTT_US: f64 = 1000.0;
/// An agent's queue holds about this many round trips of its work.
const WINDOW_RTTS: f64 = 4.0;
/// Waiting attempts are taken back for an idle agent when they would wait at least this
/// many round trips where they are (and 2 ms).
const STEAL_RTTS: f64 = 4.0;
/// Steals from one agent at most this often; doubled up to `STEAL_BACKOFF_MAX` while its
/// steals bring back nothing an idle agent can run.
const STEAL_COOLDOWN: Duration = Duration::from_millis(20);
const STEAL_BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Timing of liveness checks.
#[derive(Clone, Debug)]
pub struct SchedulerTiming {
    /// An agent silent this long is dead.
    pub dead_after: Duration,
    /// An attempt dispatched this long ago that its agent does not list is lost.
    pub lost_grace: Duration,
    /// How long an attempt may wait for an agent that can run its task.
    pub schedule_timeout: Duration,
    /// How often liveness and waiting attempts are checked.
    pub tick: Duration,
    /// Added to the error of an attempt no agent could run (e.g. how embedded runs
    /// choose their agents' labels).
    pub no_agent_hint: Option<Arc<str>>,
}

impl Default for SchedulerTiming {
    fn default() -> Self {
        SchedulerTiming {
            dead_after: Duration::from_secs(3),
            lost_grace: Duration::from_secs(3),
            schedule_timeout: Duration::from_secs(60),
            tick: Duration::from_millis(500),
            no_agent_hint: None,
        }
    }
}

/// Messages to the scheduler.
pub enum SchedulerMsg {
    /// An in-process agent joined (no heartbeats; never declared dead).
    Register(AgentInfo),
    /// A remote agent's heartbeat.
    Heartbeat(Heartbeat),
    /// Periodic liveness and schedule-timeout check.
    Tick,
    /// Attempts (of one run) want slots.
    Submit(Vec<SpawnTask>),
    /// Attempts ended; their slots are free (with each attempt's duration, µs, if it ran).
    SlotsFreed(Vec<(FlowRunId, AttemptId, Option<u64>)>),
    /// Attempts an agent handed back unstarted, from its queue (a steal's answer).
    Returned(AgentId, Vec<SpawnTask>),
    /// Time to look again at agents with idle slots and others with waiting attempts.
    StealDue,
    /// Drop a run's queued attempts and cancel its running ones.
    CancelRun(FlowRunId),
    /// Drop a run's queued attempts and leave its running ones be: another coordinator
    /// took the run over and re-attaches them.
    ForgetRun(FlowRunId),
    /// A view of the agents.
    Agents(RpcReplyPort<Vec<AgentSummary>>),
    /// From now on, record where each attempt goes (distributed mode).
    TrackOrigins(Arc<Origins>),
    /// Sizes a named limit (`None`: removes it).
    SetLimit(String, Option<NamedLimit>),
    /// The named limits and the gates in use.
    Limits(RpcReplyPort<LimitsView>),
    /// A rate gate's next token is due.
    GateDue,
}

/// Which agent each attempt in flight went to: a report is taken only from the agent
/// its attempt was dispatched to (distributed mode). The scheduler writes it as it
/// dispatches and forgets it as it frees or loses; the report loop reads it.
pub struct Origins {
    sent: DashMap<(FlowRunId, AttemptId), Arc<str>>,
    epoch: u32,
}

/// Where a reported attempt went.
#[derive(Debug, PartialEq)]
pub enum Origin {
    /// To the agent that reports it.
    Its,
    /// To another agent: the report is refused.
    Elsewhere(Arc<str>),
    /// This coordinator process issued it and it has ended (or was lost, or was never
    /// dispatched): a report sent again, or a forgery; either way nothing to take.
    Ended,
    /// An earlier coordinator process issued it (before a restart or a failover): where
    /// it went is not known here; its runner takes it only as the answer to a call not
    /// yet answered.
    Unknown,
}

impl Origins {
    /// For the coordinator process of this epoch.
    pub fn new(epoch: u32) -> Origins {
        Origins {
            sent: DashMap::new(),
            epoch,
        }
    }

    /// Where this attempt of this run went, as seen by `agent` reporting it.
    pub fn of(&self, run: FlowRunId, attempt: AttemptId, agent: &str) -> Origin {
        match self.sent.get(&(run, attempt)) {
            Some(a) if &**a == agent => Origin::Its,
            Some(a) => Origin::Elsewhere(a.clone()),
            None if attempt.epoch() == self.epoch => Origin::Ended,
            None => Origin::Unknown,
        }
    }
}

struct AgentSlot {
    info: AgentInfo,
    /// Its id, shared by the origins of the attempts dispatched to it.
    name: Arc<str>,
    tasks: HashSet<String>,
    /// Attempts it holds: dispatched here and not ended, plus any it lists that are
    /// not ours (running or waiting in its queue).
    busy: u32,
    /// Its attempts' mean duration (µs, moving average); `None` before the first.
    avg_us: Option<f64>,
    /// When one of its attempts last ended (or it joined).
    last_end: Instant,
    /// A steal from it is under way, or was just made.
    stealing: bool,
    last_steal: Option<Instant>,
    /// How long after a steal the next one from it may be.
    steal_backoff: Duration,
    /// `None` for in-process agents.
    last_seen: Option<Instant>,
    alive: bool,
    draining: bool,
    /// Attempts this coordinator dispatched to it.
    sent: u64,
}

impl AgentSlot {
    fn new(info: AgentInfo, alive: bool, now: Instant) -> AgentSlot {
        AgentSlot {
            name: Arc::from(info.agent_id.0.as_str()),
            tasks: info.tasks.iter().cloned().collect(),
            busy: 0,
            avg_us: None,
            last_end: now,
            stealing: false,
            last_steal: None,
            steal_backoff: STEAL_COOLDOWN,
            last_seen: None,
            alive,
            draining: false,
            sent: 0,
            info,
        }
    }

    fn accepts(&self) -> bool {
        self.alive && !self.draining
    }

    /// How many attempts of a task whose attempts take `avg_us` (moving average; `None`
    /// before one has ended) may wait in its queue beyond its slots: enough to cover
    /// `WINDOW_RTTS` dispatch round trips (at least one, at most `MAX_WINDOW`); one for
    /// a task not measured yet (it may be long). None if it keeps no queue (an older
    /// agent).
    fn window(&self, rtt_us: f64, avg_us: Option<f64>) -> u32 {
        if !self.info.queues {
            return 0;
        }
        let slots = self.info.slots.max(1);
        match avg_us {
            None => 1,
            Some(avg) => {
                let w = (f64::from(slots) * WINDOW_RTTS * rtt_us / avg.max(1.0)).ceil();
                (w as u32).clamp(1, MAX_WINDOW)
            }
        }
    }

    /// How many more attempts of a task taking `avg_us` it takes now: up to its slots
    /// plus its window for that task.
    fn room(&self, rtt_us: f64, avg_us: Option<f64>) -> u32 {
        if !self.accepts() {
            return 0;
        }
        let cap = self.info.slots.saturating_add(self.window(rtt_us, avg_us));
        cap.saturating_sub(self.busy)
    }

    /// Slots it has idle (nothing waits in its queue then).
    fn idle(&self) -> u32 {
        if !self.accepts() {
            return 0;
        }
        self.info.slots.saturating_sub(self.busy)
    }

    /// Live, taking work, registers the task and has every label it requires.
    fn serves(&self, task: &SpawnTask) -> bool {
        self.accepts()
            && self.tasks.contains(&*task.task)
            && task
                .requires
                .iter()
                .all(|req| self.info.labels.iter().any(|l| l == req))
    }
}

/// A task name and the labels it requires: what decides which agents can run it.
type TaskNeeds = (Arc<str>, Vec<(String, String)>);

struct Dispatched {
    agent: usize,
    call_id: CallId,
    at: Instant,
    /// Consecutive heartbeats of its agent that did not list it (after the grace).
    missed: u8,
    /// A heartbeat of its agent listed it: it ran there.
    seen: bool,
    /// The gates it passed (given back when it ends).
    gates: Option<Box<[GateKey]>>,
    /// Its agent had an idle slot for it: it started on arrival (its end measures the
    /// round trip).
    direct: bool,
    /// Its limits and priority (it goes back to the queue with them if handed back).
    sched: Option<Box<SchedInfo>>,
    /// Its run was cancelled here or moved to another coordinator: if handed back
    /// unstarted, it is dropped, not queued again.
    dropped: bool,
    /// Its task (its duration feeds the task's window); `None` for one adopted from a
    /// heartbeat.
    task: Option<Arc<str>>,
}

/// Whether an attempt must go to an idle slot, not wait in an agent's queue: one under a
/// rate or named limit, or a concurrency limit below the live agents' slots
/// (`total_slots`): a permit or token it takes must not wait behind other work on one
/// agent while the limit binds. (A concurrency limit at or above every slot there is
/// cannot bind on what runs: its attempts pipeline like any.)
fn must_start(task: &SpawnTask, total_slots: impl FnOnce() -> u32) -> bool {
    task.sched.as_deref().is_some_and(|s| {
        s.limits.rate.is_some()
            || s.limits.limit.is_some()
            || s.limits.concurrency.is_some_and(|c| c < total_slots())
    })
}

/// Whether an attempt may pass its gates now.
enum Admit {
    /// Yes: the gates it passed (permits taken).
    Pass(Option<Box<[GateKey]>>),
    /// Not yet: it waits at this gate.
    Wait(GateKey),
    /// Never: the error.
    Refuse(String),
}

/// The scheduler actor.
pub struct Scheduler;

/// What the scheduler starts with.
pub struct SchedulerArgs {
    /// How attempts reach agents.
    pub link: Arc<dyn AgentLink>,
    /// Runners by run, to report lost or unschedulable attempts.
    pub runs: Arc<DashMap<FlowRunId, ActorRef<FlowRunnerMsg>>>,
    /// Liveness timing.
    pub timing: SchedulerTiming,
    /// Named limits known at start (`coordinator --limit`).
    pub limits: Vec<(String, NamedLimit)>,
    /// The coordinator process's epoch (the high half of the attempt ids it issues).
    pub epoch: u32,
    /// Other coordinators share the agents: attempts of runs not hosted here may be
    /// theirs, and are not cancelled.
    pub shared: bool,
    /// This coordinator's lease (several coordinators): agents are not judged while it
    /// is unhealthy (NATS unreachable from here).
    pub lease: Option<Arc<crate::ha::Leases>>,
}

/// Its state.
pub struct SchedulerState {
    link: Arc<dyn AgentLink>,
    runs: Arc<DashMap<FlowRunId, ActorRef<FlowRunnerMsg>>>,
    timing: SchedulerTiming,
    agents: Vec<AgentSlot>,
    /// Attempts waiting for a slot: by priority, runs taking turns.
    queue: FairQueue,
    running: HashMap<(FlowRunId, AttemptId), Dispatched>,
    /// Concurrency and rate limits in use, by limit and key.
    gates: HashMap<GateKey, Gate>,
    /// Named limits' sizes.
    named: HashMap<String, NamedLimit>,
    /// When the armed `GateDue` fires (one at a time).
    gate_due: Option<Instant>,
    myself: ActorRef<SchedulerMsg>,
    /// Attempts no live agent can run (task not served, labels missing), per run, in
    /// the order they were queued: set aside so they do not hold up the run's other
    /// attempts; back in the queue when an agent that serves them joins, failed when
    /// they have waited the schedule timeout.
    parked: HashMap<FlowRunId, Vec<Queued>>,
    /// Runs whose operator note says they wait for an agent.
    noted: HashSet<FlowRunId>,
    cursor: usize,
    warned: HashSet<(FlowRunId, String)>,
    epoch: u32,
    shared: bool,
    lease: Option<Arc<crate::ha::Leases>>,
    /// Agents are judged (dead or alive) again from then on.
    judge_after: Option<Instant>,
    origins: Option<Arc<Origins>>,
    /// The dispatch round trip (µs, moving average over attempts that started on
    /// arrival: from dispatch to the scheduler hearing of their end, less their run).
    rtt_us: f64,
    /// A `StealDue` is on its way.
    steal_armed: bool,
    /// Each task's attempts' mean duration (µs, moving average): sizes the window of
    /// attempts of that task kept waiting in agents' queues.
    task_avg: HashMap<Arc<str>, f64>,
}

impl SchedulerState {
    /// An attempt ended or was lost: its gates' permits come back.
    fn untrack(&mut self, key: &(FlowRunId, AttemptId)) -> Option<Dispatched> {
        if let Some(o) = &self.origins {
            o.sent.remove(key);
        }
        let mut d = self.running.remove(key)?;
        let a = &mut self.agents[d.agent];
        a.busy = a.busy.saturating_sub(1);
        if let Some(gates) = d.gates.take() {
            for g in gates.iter() {
                self.give_back(g);
            }
        }
        Some(d)
    }

    /// Drops what a run has queued here (permits its attempts held come back).
    fn forget_queued(&mut self, run: FlowRunId) {
        let mut dropped = self.queue.remove_run(run);
        dropped.extend(self.parked.remove(&run).unwrap_or_default());
        for gate in self.gates.values_mut() {
            if !gate.waiters.is_empty() {
                dropped.extend(gate.waiters.remove_run(run));
            }
        }
        for q in dropped {
            self.drop_queued(q);
        }
        self.noted.remove(&run);
        self.warned.retain(|(r, _)| *r != run);
    }

    /// An attempt leaves the line without passing (dropped, refused, parked, or waiting
    /// at another gate): the gates that let it go ahead let their next waiter go.
    fn unrelease(&mut self, q: &mut Queued) {
        for key in std::mem::take(&mut q.released) {
            if let Some(g) = self.gates.get_mut(&key) {
                g.released = g.released.saturating_sub(1);
            }
            self.wake(&key);
        }
    }

    /// An attempt leaves without running.
    fn drop_queued(&mut self, mut q: Queued) {
        self.unrelease(&mut q);
    }

    /// A permit of this gate comes back: the next waiter may go.
    fn give_back(&mut self, key: &GateKey) {
        if let Some(gate) = self.gates.get_mut(key) {
            gate.give_back();
        }
        self.wake(key);
    }

    /// Lets the gate's next waiters (in fair order) go ahead, as many as it has room
    /// for now: each goes back to the front of its run's queue, holding no permit; it
    /// takes its permits when it passes every gate it needs. A gate holding nothing
    /// goes.
    fn wake(&mut self, key: &GateKey) {
        let now = Instant::now();
        let Some(gate) = self.gates.get_mut(key) else {
            return;
        };
        let mut room = gate.room(now);
        while room > 0 {
            let Some(mut q) = gate.waiters.pop_next() else {
                break;
            };
            gate.released += 1;
            room -= 1;
            q.released.push(key.clone());
            q.since = now;
            self.queue.push_front(q);
        }
        if let Some(due) = gate.due_in(now) {
            self.arm(now + due);
        } else if gate.idle(now) {
            self.gates.remove(key);
        }
    }

    /// Makes sure a `GateDue` comes by `at`.
    fn arm(&mut self, at: Instant) {
        if self.gate_due.is_some_and(|t| t <= at) {
            return;
        }
        self.gate_due = Some(at);
        let wait = at.saturating_duration_since(Instant::now());
        self.myself.send_after(wait, || SchedulerMsg::GateDue);
    }

    /// The gates an attempt must pass, with their sizes: its task's own (keyed by the
    /// task's key) and its named limit's (shared by every task and key that uses it).
    /// A named limit removed since the attempt was submitted no longer applies.
    #[allow(clippy::type_complexity)]
    fn gates_of(
        &self,
        q: &Queued,
    ) -> Result<
        Vec<(
            GateKey,
            Option<u32>,
            Option<pinazu_shared::options::RateSpec>,
        )>,
        String,
    > {
        let Some(info) = q.task.sched.as_deref() else {
            return Ok(Vec::new());
        };
        let limits = info.limits;
        let mut keys = Vec::with_capacity(2);
        if limits.concurrency.is_some() || limits.rate.is_some() {
            keys.push((
                GateKey {
                    kind: GateKind::Task(q.task.task.clone()),
                    key: info.key.clone(),
                },
                limits.concurrency,
                limits.rate,
            ));
        }
        if let Some(name) = limits.limit {
            let key = GateKey {
                kind: GateKind::Named(Arc::from(name)),
                key: None,
            };
            // (undefined at submit: refused there; removed since: no limit any more)
            if let Some(size) = self.named.get(name) {
                keys.push((key, size.concurrency, size.rate));
            }
        }
        Ok(keys)
    }

    /// Whether an attempt may pass its gates now; takes every permit (and rate token)
    /// at once when it may, so it never holds one gate's permit while it waits at
    /// another's.
    fn admit(&mut self, q: &mut Queued) -> Admit {
        if q.task.sched.as_ref().is_none_or(|s| !s.limits.any()) {
            return Admit::Pass(None);
        }
        let keys = match self.gates_of(q) {
            Ok(k) => k,
            Err(why) => return Admit::Refuse(why),
        };
        let now = Instant::now();
        for (key, cap, rate) in &keys {
            let gate = self
                .gates
                .entry(key.clone())
                .or_insert_with(|| Gate::new(*cap, *rate, now));
            let open = if q.released.contains(key) {
                gate.free(now)
            } else {
                // (a new attempt waits behind those waiting or let go ahead)
                gate.waiters.is_empty() && gate.room(now) > 0
            };
            if !open {
                return Admit::Wait(key.clone());
            }
        }
        for (key, ..) in &keys {
            if let Some(gate) = self.gates.get_mut(key) {
                gate.take(now);
            }
        }
        for key in std::mem::take(&mut q.released) {
            if let Some(g) = self.gates.get_mut(&key) {
                g.released = g.released.saturating_sub(1);
            }
        }
        Admit::Pass(Some(keys.into_iter().map(|(k, ..)| k).collect()))
    }

    /// Fails an attempt that can never run (e.g. its limit is not defined).
    fn refuse(&mut self, q: Queued, kind: FailureKind, message: String) {
        let task = q.task.clone();
        self.drop_queued(q);
        self.fail(&task, kind, message);
    }

    /// Tells an attempt's runner it failed here, without running.
    fn fail(&self, task: &SpawnTask, kind: FailureKind, message: String) {
        self.tell_runner(
            task.flow_run_id,
            FlowRunnerMsg::Finished(AttemptFinished {
                flow_run_id: task.flow_run_id,
                call_id: task.call_id,
                attempt_id: task.attempt_id,
                agent_id: AgentId("scheduler".into()),
                outcome: Err(ErrorInfo::new(kind, message)),
                result_ref: None,
                elapsed_us: 0,
                result_cache_key: None,
                logs: None,
            }),
        );
    }

    /// A named limit was sized (or removed): its gates take the new size, and their
    /// waiters what it frees. Removed: later attempts of tasks using it fail; those
    /// waiting are let through.
    fn set_limit(&mut self, name: String, size: Option<NamedLimit>) {
        let now = Instant::now();
        if let Some(Err(e)) = size.map(|s| s.check()) {
            tracing::warn!(limit = %name, error = %e, "ignoring an invalid limit size");
            return;
        }
        if self.named.get(&name) == size.as_ref() {
            return;
        }
        match size {
            Some(l) => {
                tracing::info!(limit = %name, size = %l, "limit set");
                self.named.insert(name.clone(), l);
            }
            None => {
                tracing::info!(limit = %name, "limit removed");
                self.named.remove(&name);
            }
        }
        let keys: Vec<GateKey> = self
            .gates
            .keys()
            .filter(|k| matches!(&k.kind, GateKind::Named(n) if **n == *name))
            .cloned()
            .collect();
        for key in keys {
            if let Some(g) = self.gates.get_mut(&key) {
                g.resize(
                    size.and_then(|s| s.concurrency),
                    size.and_then(|s| s.rate),
                    now,
                );
            }
            self.wake(&key);
        }
    }

    /// Rate gates whose next token is due: their waiters get the tokens.
    fn gates_due(&mut self) {
        self.gate_due = None;
        self.tend_gates();
    }

    /// Gates holding nothing go (keys are unbounded: a gate made for an attempt that
    /// then waited elsewhere, a bucket that has refilled); gates with waiters are woken
    /// (their due tokens; and a safety net: every path that frees room wakes its gate).
    fn tend_gates(&mut self) {
        let now = Instant::now();
        self.gates.retain(|_, g| !g.idle(now));
        let waiting: Vec<GateKey> = self
            .gates
            .iter()
            .filter(|(_, g)| !g.waiters.is_empty())
            .map(|(k, _)| k.clone())
            .collect();
        for key in waiting {
            self.wake(&key);
        }
    }

    /// The named limits and the gates in use.
    fn limits_view(&self) -> LimitsView {
        let mut named: Vec<(String, NamedLimit)> =
            self.named.iter().map(|(k, v)| (k.clone(), *v)).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut gates: Vec<GateView> = self
            .gates
            .iter()
            .map(|(k, g)| {
                let (kind, name) = match &k.kind {
                    GateKind::Task(t) => ("task", t.to_string()),
                    GateKind::Named(n) => ("limit", n.to_string()),
                };
                GateView {
                    kind: kind.to_string(),
                    name,
                    key: k.key.as_ref().map(|k| k.to_string()),
                    size: g.size(),
                    running: g.running,
                    waiting: g.waiters.len() as u64,
                }
            })
            .collect();
        gates.sort_by(|a, b| (&a.kind, &a.name, &a.key).cmp(&(&b.kind, &b.name, &b.key)));
        LimitsView { named, gates }
    }

    /// Slots of the agents taking work.
    fn total_slots(&self) -> u32 {
        self.agents
            .iter()
            .filter(|a| a.accepts())
            .fold(0u32, |n, a| n.saturating_add(a.info.slots))
    }

    fn free_slots(&self) -> u32 {
        // (a budget for one dispatch pass: the widest window any task may get)
        self.agents
            .iter()
            .filter(|a| a.accepts())
            .map(|a| {
                let cap = a
                    .info
                    .slots
                    .saturating_add(if a.info.queues { MAX_WINDOW } else { 0 });
                cap.saturating_sub(a.busy)
            })
            .fold(0u32, u32::saturating_add)
    }

    /// An agent for it: one with an idle slot first (it starts at once), else one whose
    /// queue has room (not for an attempt that must start at once); round robin.
    fn pick_agent(&self, task: &SpawnTask) -> Option<(usize, bool)> {
        let n = self.agents.len();
        let order = || (0..n).map(|i| (self.cursor + i) % n);
        if let Some(i) = order().find(|&i| self.agents[i].idle() > 0 && self.agents[i].serves(task))
        {
            return Some((i, true));
        }
        // (the slots are summed only for an attempt under a concurrency limit)
        if must_start(task, || self.total_slots()) {
            return None;
        }
        order()
            .find(|&i| {
                self.agents[i].room(self.rtt_us, self.task_avg.get(&task.task).copied()) > 0
                    && self.agents[i].serves(task)
            })
            .map(|i| (i, false))
    }

    fn servable(&self, task: &SpawnTask) -> bool {
        self.agents.iter().any(|a| a.serves(task))
    }

    /// Hands queued attempts to agents with free slots: the highest priority first,
    /// one attempt per run per turn within a priority. An attempt no live agent can run
    /// is parked, one held by a limit waits at its gate, so the run's other attempts
    /// go on.
    fn dispatch(&mut self) {
        let mut free = self.free_slots();
        let mut batches: HashMap<usize, Vec<SpawnTask>> = HashMap::new();
        let now = Instant::now();
        for priority in self.queue.priorities() {
            let mut misses = 0;
            while free > 0 && misses < self.queue.turns(priority) {
                let Some(run) = self.queue.next_turn(priority) else {
                    break;
                };
                let Some(mut head) = self.queue.pop(priority, run) else {
                    self.queue.end_turn(priority, run, false);
                    continue;
                };
                let Some((i, direct)) = self.pick_agent(&head.task) else {
                    if self.servable(&head.task) {
                        // no free slot for it now: the next run's turn
                        self.queue.unpop(priority, run, head);
                        self.queue.end_turn(priority, run, false);
                        misses += 1;
                    } else {
                        // (parked: it holds no gate's turn meanwhile)
                        self.unrelease(&mut head);
                        self.parked.entry(run).or_default().push(head);
                        self.queue.end_turn(priority, run, true);
                    }
                    continue;
                };
                let gates = match self.admit(&mut head) {
                    Admit::Pass(gates) => gates,
                    Admit::Wait(key) => {
                        let ahead = std::mem::take(&mut head.released);
                        let gate = self.gates.get_mut(&key).expect("gate made by admit");
                        // one let go by another gate waits first here: under steady
                        // traffic through this gate alone it would never get through
                        if ahead.is_empty() {
                            gate.waiters.push_back(head);
                        } else {
                            gate.waiters.push_front(head);
                        }
                        // (lets it, or the waiter before it, go when there is room,
                        // else arms the timer for the next token)
                        self.wake(&key);
                        // the gates that let it go ahead let their next go
                        for k in ahead {
                            if let Some(g) = self.gates.get_mut(&k) {
                                g.released = g.released.saturating_sub(1);
                            }
                            self.wake(&k);
                        }
                        self.queue.end_turn(priority, run, true);
                        continue;
                    }
                    Admit::Refuse(why) => {
                        self.refuse(head, FailureKind::Limit, why);
                        self.queue.end_turn(priority, run, true);
                        continue;
                    }
                };
                // the gates it passed let their next waiters go (room left, or the
                // timer armed for the next token)
                if let Some(keys) = &gates {
                    for k in keys.iter() {
                        if self.gates.get(k).is_some_and(|g| !g.waiters.is_empty()) {
                            self.wake(k);
                        }
                    }
                }
                let Queued { mut task, .. } = head;
                self.agents[i].busy += 1;
                self.agents[i].sent += 1;
                free -= 1;
                self.cursor = (i + 1) % self.agents.len();
                let key = (task.flow_run_id, task.attempt_id);
                if let Some(o) = &self.origins {
                    o.sent.insert(key, self.agents[i].name.clone());
                }
                self.running.insert(
                    key,
                    Dispatched {
                        agent: i,
                        call_id: task.call_id,
                        at: now,
                        missed: 0,
                        seen: false,
                        gates,
                        direct,
                        sched: task.sched.take(),
                        dropped: false,
                        task: Some(task.task.clone()),
                    },
                );
                batches.entry(i).or_default().push(task);
                misses = 0;
                self.queue.end_turn(priority, run, false);
            }
            if free == 0 {
                break;
            }
        }
        for (i, batch) in batches {
            self.link.spawn(&self.agents[i].info.agent_id, batch);
        }
        self.steal_for_idle(now);
    }

    /// An agent has idle slots that nothing queued here could fill, and another holds
    /// waiting attempts that would wait long where they are (behind long tasks): ask it
    /// to hand them back (they go to the front of their runs' queues, then to the idle
    /// agent). Checked again shortly while waiting attempts are not yet worth moving.
    fn steal_for_idle(&mut self, now: Instant) {
        let mut idle: u32 = self.agents.iter().map(AgentSlot::idle).sum();
        if idle == 0 {
            return;
        }
        let threshold_us = (STEAL_RTTS * self.rtt_us).max(2000.0);
        let mut recheck: Option<f64> = None;
        for i in 0..self.agents.len() {
            let a = &self.agents[i];
            let waiting = a.busy.saturating_sub(a.info.slots);
            if idle == 0 {
                break;
            }
            if !a.alive || !a.info.queues || waiting == 0 || a.stealing {
                continue;
            }
            if let Some(t) = a.last_steal {
                let since = now.duration_since(t);
                if since < a.steal_backoff {
                    let in_us = (a.steal_backoff - since).as_micros() as f64;
                    recheck = Some(recheck.map_or(in_us, |r: f64| r.min(in_us)));
                    continue;
                }
            }
            // how long its last waiting attempt would wait there: its attempts' mean
            // duration, or the time since one last ended if longer (long tasks that
            // have not ended yet)
            let per = a
                .avg_us
                .unwrap_or(0.0)
                .max(now.duration_since(a.last_end).as_micros() as f64);
            let wait_us = f64::from(waiting) * per / f64::from(a.info.slots.max(1));
            if wait_us < threshold_us {
                // not yet: look again when it would be
                let per_needed = threshold_us * f64::from(a.info.slots.max(1)) / f64::from(waiting);
                let in_us = (per_needed - per).max(1000.0);
                recheck = Some(recheck.map_or(in_us, |r: f64| r.min(in_us)));
                continue;
            }
            let max = waiting.min(idle);
            idle -= max;
            let a = &mut self.agents[i];
            a.stealing = true;
            a.last_steal = Some(now);
            let agent = a.info.agent_id.clone();
            // this process's attempts, and those of earlier processes it re-attached
            let mut epochs = vec![self.epoch];
            for (k, d) in &self.running {
                let e = k.1.epoch();
                if d.agent == i && !epochs.contains(&e) && epochs.len() < 16 {
                    epochs.push(e);
                }
            }
            let (link, me) = (self.link.clone(), self.myself.clone());
            tracing::debug!(%agent, max, "taking waiting attempts back for an idle agent");
            tokio::spawn(async move {
                let tasks = link.steal(&agent, epochs, max).await;
                let _ = me.send_message(SchedulerMsg::Returned(agent, tasks));
            });
        }
        if let Some(us) = recheck {
            if !self.steal_armed {
                self.steal_armed = true;
                let me = self.myself.clone();
                let d = Duration::from_micros(us.clamp(1000.0, 2_000_000.0) as u64);
                tokio::spawn(async move {
                    tokio::time::sleep(d).await;
                    let _ = me.send_message(SchedulerMsg::StealDue);
                });
            }
        }
    }

    /// A run cancelled here or moved: its attempts handed back later are dropped.
    fn mark_dropped(&mut self, run: FlowRunId) {
        for (k, d) in self.running.iter_mut() {
            if k.0 == run {
                d.dropped = true;
            }
        }
    }

    /// A steal's answer: attempts still ours on that agent go to the front of their
    /// runs' queues (with their priority and limits); any other (lost meanwhile, and
    /// already dispatched again) is dropped: it never started.
    fn returned(&mut self, agent: AgentId, tasks: Vec<SpawnTask>) {
        let Some(i) = self.agents.iter().position(|a| a.info.agent_id == agent) else {
            return;
        };
        self.agents[i].stealing = false;
        let now = Instant::now();
        let n = tasks.len();
        let mut runnable = 0;
        for mut task in tasks {
            let key = (task.flow_run_id, task.attempt_id);
            if self.running.get(&key).is_none_or(|d| d.agent != i) {
                continue;
            }
            let Some(d) = self.untrack(&key) else {
                continue;
            };
            // (of a run cancelled, ended or moved meanwhile: it never started; dropped)
            if d.dropped || !self.runs.contains_key(&key.0) {
                continue;
            }
            if self
                .agents
                .iter()
                .enumerate()
                .any(|(j, a)| j != i && a.idle() > 0 && a.serves(&task))
            {
                runnable += 1;
            }
            task.sched = d.sched;
            self.queue.push_front(Queued::new(now, task));
        }
        // nothing handed back, or nothing an idle agent can run: ask this agent again
        // only after a while (its waiting attempts may be another coordinator's, of an
        // earlier process, or of tasks only it serves)
        let a = &mut self.agents[i];
        a.steal_backoff = if runnable == 0 {
            (a.steal_backoff * 2).clamp(STEAL_COOLDOWN, STEAL_BACKOFF_MAX)
        } else {
            STEAL_COOLDOWN
        };
        if n > 0 {
            tracing::debug!(%agent, attempts = n, runnable, "waiting attempts handed back");
        }
    }

    fn tell_runner(&self, run: FlowRunId, msg: FlowRunnerMsg) {
        if let Some(r) = self.runs.get(&run) {
            let _ = r.send_message(msg);
        }
    }

    /// It counts as an execution only if its agent listed it running (an attempt whose
    /// spawn never arrived did not run, even if the agent died since).
    fn lose(&mut self, key: (FlowRunId, AttemptId), reason: String) {
        if let Some(d) = self.untrack(&key) {
            tracing::warn!(flow_run_id = %key.0, call_id = %d.call_id, attempt_id = %key.1, %reason, "attempt lost; dispatching it again");
            self.tell_runner(
                key.0,
                FlowRunnerMsg::AttemptLost {
                    call_id: d.call_id,
                    attempt_id: key.1,
                    reason,
                    ran: d.seen,
                },
            );
        }
    }

    fn declare_dead(&mut self, i: usize, why: &str) {
        let agent = &mut self.agents[i];
        if !agent.alive {
            return;
        }
        agent.alive = false;
        let id = agent.info.agent_id.clone();
        let lost: Vec<_> = self
            .running
            .iter()
            .filter(|(_, d)| d.agent == i)
            .map(|(k, _)| *k)
            .collect();
        if lost.is_empty() && why == "left" {
            tracing::info!(agent = %id, "agent left");
        } else {
            tracing::warn!(agent = %id, why, attempts = lost.len(), "agent is gone; its attempts run elsewhere");
        }
        for key in lost {
            self.lose(key, format!("agent {id} {why}"));
        }
    }

    fn heartbeat(&mut self, hb: Heartbeat) {
        let now = Instant::now();
        let id = hb.info.agent_id.clone();
        let i = match self.agents.iter().position(|a| a.info.agent_id == id) {
            Some(i) => i,
            None => {
                self.agents
                    .push(AgentSlot::new(hb.info.clone(), false, now));
                self.agents.len() - 1
            }
        };
        if hb.leaving {
            self.declare_dead(i, "left");
            return;
        }
        // attempts an earlier coordinator process dispatched, of runs active here (a
        // resumed run): tracked like our own, and offered to their runners
        for r in &hb.running {
            let key = (r.flow_run_id, r.attempt_id);
            if r.attempt_id.epoch() == self.epoch || self.running.contains_key(&key) {
                continue;
            }
            if let Some(runner) = self.runs.get(&r.flow_run_id) {
                // (no origin recorded: that the agent listing it was given it cannot be
                // checked here, and another agent listing it first must not make the
                // real one's report refused; its report goes to the runner as `Unknown`)
                self.running.insert(
                    key,
                    Dispatched {
                        agent: i,
                        call_id: r.call_id,
                        at: now,
                        missed: 0,
                        seen: !r.queued,
                        gates: None,
                        direct: false,
                        sched: None,
                        dropped: false,
                        task: None,
                    },
                );
                self.agents[i].busy += 1;
                let _ = runner.send_message(FlowRunnerMsg::Adopt {
                    call_id: r.call_id,
                    attempt_id: r.attempt_id,
                    queued: r.queued,
                });
            }
        }
        // listed, and whether it waits in the agent's queue (not started)
        let listed: HashMap<(FlowRunId, AttemptId), bool> = hb
            .running
            .iter()
            .map(|r| ((r.flow_run_id, r.attempt_id), r.queued))
            .collect();
        let ours: Vec<(FlowRunId, AttemptId)> = self
            .running
            .iter()
            .filter(|(_, d)| d.agent == i)
            .map(|(k, _)| *k)
            .collect();
        let a = &mut self.agents[i];
        if !a.alive {
            tracing::info!(agent = %id, slots = hb.info.slots, tasks = hb.info.tasks.len(), "agent joined");
            a.last_end = now;
        }
        a.alive = true;
        a.last_seen = Some(now);
        a.draining = hb.draining;
        a.tasks = hb.info.tasks.iter().cloned().collect();
        a.info = hb.info;
        // what it holds: ours plus any it lists that we do not know
        let unknown = listed
            .keys()
            .filter(|k| !self.running.contains_key(k))
            .count() as u32;
        self.agents[i].busy = ours.len() as u32 + unknown;
        // an attempt dispatched long enough ago that two heartbeats in a row do not list
        // is lost (its spawn or its report went missing); one miss is not enough, since
        // the attempt may have just finished with its report still on the way. Not
        // while NATS was just out of reach here: the reports sent meanwhile come again
        let grace = self.timing.lost_grace;
        let judging = self.judge_after.is_none_or(|t| now >= t)
            && self.lease.as_ref().is_none_or(|l| l.healthy());
        let mut missing = Vec::new();
        for k in ours {
            let Some(d) = self.running.get_mut(&k) else {
                continue;
            };
            if let Some(&queued) = listed.get(&k) {
                d.missed = 0;
                d.seen |= !queued;
            } else if judging && now.duration_since(d.at) > grace {
                d.missed += 1;
                if d.missed >= 2 {
                    missing.push(k);
                }
            }
        }
        for key in missing {
            self.lose(key, format!("agent {id} no longer lists it"));
        }
        // attempts it runs that we do not (or no longer) want: stop them. Not with other
        // coordinators: an attempt of a run not hosted here may be another one's (even
        // one this process dispatched, of a run it let go and another adopted); a run
        // ended or cancelled here cancelled its own attempts already
        let orphans: Vec<_> = if self.shared {
            Vec::new()
        } else {
            listed
                .into_keys()
                .filter(|k| !self.running.contains_key(k) && !self.runs.contains_key(&k.0))
                .collect()
        };
        if !orphans.is_empty() {
            self.link.cancel(&id, orphans);
        }
    }

    fn tick(&mut self) {
        self.tend_gates();
        let now = Instant::now();
        // while this coordinator cannot reach NATS (its lease is not healthy), silent
        // agents say nothing about the agents: none is declared dead until it had a
        // full `dead_after` to be heard again
        if self.lease.as_ref().is_some_and(|l| !l.healthy()) {
            self.judge_after = Some(now + self.timing.dead_after);
        }
        // nor while this process's NATS connection is down or came back less than
        // `dead_after` ago (agents' heartbeats were cut off with it; their first ones
        // after it may come a second later)
        if let Some(back) = pinazu_shared::nats::outage::since_back() {
            if back < self.timing.dead_after {
                let until = now + (self.timing.dead_after - back);
                self.judge_after = Some(self.judge_after.map_or(until, |t| t.max(until)));
            }
        }
        if self.judge_after.is_some_and(|t| now < t) {
            self.expire_unservable(now);
            return;
        }
        for i in 0..self.agents.len() {
            let silent = match (self.agents[i].alive, self.agents[i].last_seen) {
                (true, Some(seen)) => now.duration_since(seen),
                _ => continue,
            };
            // silent, and NATS answered this coordinator after the agent's next
            // heartbeat was due: the agent, not NATS, went quiet (a lease renewed a
            // while before an outage still looks healthy for 2.5 s; agents that fell
            // silent with NATS are not judged on that)
            let nats_answered_since = self
                .lease
                .as_ref()
                .is_none_or(|l| l.since_renewal() + HEARTBEAT_DUE < silent);
            if silent > self.timing.dead_after && nats_answered_since {
                self.declare_dead(
                    i,
                    &format!("stopped heartbeating ({} ms)", silent.as_millis()),
                );
            }
        }
        self.expire_unservable(now);
    }

    /// Parks every queued attempt no live agent can run (dispatch parks those it meets
    /// at the head of a queue; this finds the rest, e.g. when there are no free slots).
    fn park_unservable(&mut self) {
        let mut servable: HashMap<TaskNeeds, bool> = HashMap::new();
        let agents = &self.agents;
        let mut ok = |task: &SpawnTask| {
            let key = (task.task.clone(), task.requires.clone());
            *servable
                .entry(key)
                .or_insert_with(|| agents.iter().any(|a| a.serves(task)))
        };
        if self.queue.iter().all(|q| ok(&q.task)) {
            return;
        }
        for mut q in self.queue.take_where(|q| !ok(&q.task)) {
            self.unrelease(&mut q);
            self.parked.entry(q.task.flow_run_id).or_default().push(q);
        }
    }

    /// Parked attempts: back to the front of their run's queue when an agent now
    /// serves them; failed once they have waited the schedule timeout (each from when
    /// it was queued); meanwhile the run's note says how long the oldest has waited.
    fn expire_unservable(&mut self, now: Instant) {
        self.park_unservable();
        let timeout = self.timing.schedule_timeout;
        let mut expired: Vec<SpawnTask> = Vec::new();
        let mut notes: Vec<(FlowRunId, String)> = Vec::new();
        let runs: Vec<FlowRunId> = self.parked.keys().copied().collect();
        let mut servable: HashMap<TaskNeeds, bool> = HashMap::new();
        for run in runs {
            let parked = self.parked.remove(&run).unwrap_or_default();
            let mut back = Vec::new();
            let mut keep = Vec::new();
            for q in parked {
                let key = (q.task.task.clone(), q.task.requires.clone());
                let ok = match servable.get(&key) {
                    Some(ok) => *ok,
                    None => {
                        let ok = self.servable(&q.task);
                        servable.insert(key, ok);
                        ok
                    }
                };
                if ok {
                    back.push(q);
                } else if now.duration_since(q.since) >= timeout {
                    expired.push(q.task.clone());
                    self.drop_queued(q);
                } else {
                    keep.push(q);
                }
            }
            for q in back.into_iter().rev() {
                self.queue.push_front(q);
            }
            if let Some(oldest) = keep.iter().min_by_key(|q| q.since) {
                let task = oldest.task.task.to_string();
                let note = format!(
                    "waiting for a live agent that can run task `{task}`{} (waited {} s, gives up after {} s)",
                    labels_of(&oldest.task),
                    now.duration_since(oldest.since).as_secs(),
                    timeout.as_secs()
                );
                if self.warned.insert((run, task.clone())) {
                    tracing::warn!(flow_run_id = %run, task, "{note}");
                }
                notes.push((run, note));
                self.parked.insert(run, keep);
            }
        }
        // notes of runs that no longer wait are cleared
        let waiting: HashSet<FlowRunId> = notes.iter().map(|(r, _)| *r).collect();
        let cleared: Vec<FlowRunId> = self.noted.difference(&waiting).copied().collect();
        for run in cleared {
            self.noted.remove(&run);
            self.warned.retain(|(r, _)| *r != run);
            self.tell_runner(run, FlowRunnerMsg::Note(None));
        }
        for (run, note) in notes {
            self.noted.insert(run);
            self.tell_runner(run, FlowRunnerMsg::Note(Some(note)));
        }
        for task in expired {
            let known: Vec<String> = self
                .agents
                .iter()
                .filter(|a| a.accepts())
                .map(|a| a.info.agent_id.to_string())
                .collect();
            let waited = if timeout.is_zero() {
                String::new()
            } else {
                format!("; waited {} s", timeout.as_secs())
            };
            let hint = self
                .timing
                .no_agent_hint
                .as_ref()
                .map(|h| format!("; {h}"))
                .unwrap_or_default();
            let live = if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            };
            let registered = self
                .agents
                .iter()
                .any(|a| a.accepts() && a.tasks.contains(&*task.task));
            let message = if registered && !task.requires.is_empty() {
                format!(
                    "task `{}` needs an agent{}, and no live agent has them (live agents: {live}){waited}{hint}",
                    task.task,
                    labels_of(&task),
                )
            } else {
                format!(
                    "task `{}` is not registered on any live agent{} (live agents: {live}){waited}{hint}",
                    task.task,
                    labels_of(&task),
                )
            };
            self.fail(&task, FailureKind::NoAgent, message);
        }
    }
}

/// The error of a call whose named limit no coordinator defines.
fn undefined_limit(task: &str, name: &str) -> String {
    format!(
        "task `{task}` uses limit `{name}`, which is not defined: size it with `--limit {name}=N` (or N/s for a rate) on the coordinator or the embedded run, or `limits set {name} N` while a coordinator runs"
    )
}

/// " with labels k=v,..." for an attempt that requires labels.
fn labels_of(task: &SpawnTask) -> String {
    if task.requires.is_empty() {
        return String::new();
    }
    let l: Vec<String> = task
        .requires
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!(" with labels {}", l.join(","))
}

impl Actor for Scheduler {
    type Msg = SchedulerMsg;
    type State = SchedulerState;
    type Arguments = SchedulerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_interval(args.timing.tick, || SchedulerMsg::Tick);
        Ok(SchedulerState {
            link: args.link,
            runs: args.runs,
            timing: args.timing,
            agents: Vec::new(),
            queue: FairQueue::default(),
            running: HashMap::new(),
            gates: HashMap::new(),
            named: args.limits.into_iter().collect(),
            gate_due: None,
            myself: myself.clone(),
            parked: HashMap::new(),
            noted: HashSet::new(),
            cursor: 0,
            warned: HashSet::new(),
            epoch: args.epoch,
            shared: args.shared,
            lease: args.lease,
            judge_after: None,
            origins: None,
            rtt_us: DEFAULT_RTT_US,
            steal_armed: false,
            task_avg: HashMap::new(),
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
                        a.tasks = tasks;
                        a.info = info;
                        a.alive = true;
                    }
                    None => {
                        tracing::debug!(agent = %info.agent_id, slots = info.slots, "agent registered");
                        state
                            .agents
                            .push(AgentSlot::new(info, true, Instant::now()));
                    }
                }
                state.dispatch();
            }
            SchedulerMsg::Heartbeat(hb) => {
                state.heartbeat(hb);
                state.dispatch();
            }
            SchedulerMsg::Tick => {
                state.tick();
                state.dispatch();
            }
            SchedulerMsg::Submit(tasks) => {
                let now = Instant::now();
                for task in tasks {
                    // a named limit nobody defined fails the call now, not when a slot
                    // frees up
                    let undefined = task
                        .sched
                        .as_deref()
                        .and_then(|s| s.limits.limit)
                        .filter(|name| !state.named.contains_key(*name));
                    match undefined {
                        Some(name) => {
                            let why = undefined_limit(&task.task, name);
                            state.refuse(Queued::new(now, task), FailureKind::Limit, why);
                        }
                        None => state.queue.push_back(Queued::new(now, task)),
                    }
                }
                state.dispatch();
            }
            SchedulerMsg::SlotsFreed(attempts) => {
                // idempotent: only an attempt we dispatched frees a slot, once
                let mut freed = false;
                let now = Instant::now();
                for (run, attempt, ran_us) in attempts {
                    if let Some(d) = state.untrack(&(run, attempt)) {
                        // (an attempt cancelled before it ran, or that could not run,
                        // says nothing about its agent's pace)
                        if let Some(e) = ran_us.map(|us| us as f64) {
                            if d.direct {
                                // dispatch to hearing of its end, less its own run
                                let rtt =
                                    (now.duration_since(d.at).as_micros() as f64 - e).max(50.0);
                                state.rtt_us = 0.8 * state.rtt_us + 0.2 * rtt;
                            }
                            let a = &mut state.agents[d.agent];
                            a.avg_us = Some(a.avg_us.map_or(e, |m| 0.9 * m + 0.1 * e));
                            // the window is sized per task: its own attempts' pace
                            if let Some(t) = d.task {
                                let m = state.task_avg.entry(t).or_insert(e);
                                *m = 0.9 * *m + 0.1 * e;
                            }
                        }
                        state.agents[d.agent].last_end = now;
                        freed = true;
                    }
                }
                if freed {
                    state.dispatch();
                }
            }
            SchedulerMsg::Returned(agent, tasks) => {
                state.returned(agent, tasks);
                state.dispatch();
            }
            SchedulerMsg::StealDue => {
                state.steal_armed = false;
                state.steal_for_idle(Instant::now());
            }
            SchedulerMsg::ForgetRun(run) => {
                state.forget_queued(run);
                state.mark_dropped(run);
                state.dispatch();
            }
            SchedulerMsg::TrackOrigins(o) => state.origins = Some(o),
            SchedulerMsg::SetLimit(name, size) => {
                state.set_limit(name, size);
                state.dispatch();
            }
            SchedulerMsg::Limits(reply) => {
                let _ = reply.send(state.limits_view());
            }
            SchedulerMsg::GateDue => {
                state.gates_due();
                state.dispatch();
            }
            SchedulerMsg::CancelRun(run) => {
                state.forget_queued(run);
                state.mark_dropped(run);
                state.dispatch();
                let mut per_agent: HashMap<usize, Vec<(FlowRunId, AttemptId)>> = HashMap::new();
                for (&(r, attempt), d) in &state.running {
                    if r == run {
                        per_agent.entry(d.agent).or_default().push((r, attempt));
                    }
                }
                for (i, attempts) in per_agent {
                    state.link.cancel(&state.agents[i].info.agent_id, attempts);
                }
            }
            SchedulerMsg::Agents(reply) => {
                let now = Instant::now();
                let view = state
                    .agents
                    .iter()
                    .filter(|a| a.alive)
                    .map(|a| AgentSummary {
                        agent_id: a.info.agent_id.clone(),
                        slots: a.info.slots,
                        running: a.busy.min(a.info.slots),
                        queued: a.busy.saturating_sub(a.info.slots),
                        tasks: {
                            let mut t: Vec<String> = a.tasks.iter().cloned().collect();
                            t.sort();
                            t
                        },
                        labels: a.info.labels.clone(),
                        draining: a.draining,
                        attempts: a.sent,
                        last_seen_ms: a
                            .last_seen
                            .map_or(0, |s| now.duration_since(s).as_millis() as u64),
                    })
                    .collect();
                let _ = reply.send(view);
            }
        }
        Ok(())
    }
}
