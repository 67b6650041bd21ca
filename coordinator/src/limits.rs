//! What the scheduler orders waiting attempts with: the `FairQueue` (levels by priority,
//! round robin between runs within a level) and the gates of concurrency and rate limits
//! (a count of running attempts, a token bucket, and the attempts waiting to pass).
//! The scheduler owns both; see "Orchestration" in docs/architecture.md.

use pinazu_shared::ids::FlowRunId;
use pinazu_shared::options::{NamedLimit, RateSpec};
use pinazu_shared::wire::SpawnTask;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// An attempt waiting for a slot.
pub struct Queued {
    /// When it was queued (or released by a gate): the schedule timeout counts from here.
    pub since: Instant,
    /// The attempt.
    pub task: SpawnTask,
    /// Gates that let it go ahead of their other waiters (it was their next): counted
    /// in each gate's `released` until it passes or waits again. It holds no permit:
    /// permits (and rate tokens) are taken only when it passes every gate at once.
    pub released: Vec<GateKey>,
}

impl Queued {
    /// A new waiting attempt.
    pub fn new(since: Instant, task: SpawnTask) -> Queued {
        Queued {
            since,
            task,
            released: Vec::new(),
        }
    }

    /// Its priority (0 unless its run has one).
    pub fn priority(&self) -> i32 {
        self.task.sched.as_ref().map_or(0, |s| s.priority)
    }

    fn run(&self) -> FlowRunId {
        self.task.flow_run_id
    }
}

struct Level {
    priority: i32,
    lanes: HashMap<FlowRunId, VecDeque<Queued>>,
    /// Runs with a non-empty lane, in turn order (a run taking its turn is out of it).
    turn: VecDeque<FlowRunId>,
    /// The run taking its turn (out of `turn` until `end_turn`).
    taking: Option<FlowRunId>,
}

/// Attempts by priority (highest first) and, within a priority, one FIFO per run served
/// round robin: one run's 1,000,000 attempts wait behind a 10-attempt run's next one,
/// not in front of all of them.
#[derive(Default)]
pub struct FairQueue {
    /// Highest priority first (usually one level).
    levels: Vec<Level>,
    len: usize,
}

impl FairQueue {
    /// Attempts waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn level(&mut self, priority: i32) -> &mut Level {
        let at = match self.levels.iter().position(|l| l.priority <= priority) {
            Some(i) if self.levels[i].priority == priority => return &mut self.levels[i],
            Some(i) => i,
            None => self.levels.len(),
        };
        self.levels.insert(
            at,
            Level {
                priority,
                lanes: HashMap::new(),
                turn: VecDeque::new(),
                taking: None,
            },
        );
        &mut self.levels[at]
    }

    fn level_at(&mut self, priority: i32) -> Option<&mut Level> {
        self.levels.iter_mut().find(|l| l.priority == priority)
    }

    fn tidy(&mut self) {
        self.levels
            .retain(|l| !l.lanes.is_empty() || l.taking.is_some());
    }

    /// Queues at the back of its run's lane.
    pub fn push_back(&mut self, q: Queued) {
        let run = q.run();
        let level = self.level(q.priority());
        let lane = level.lanes.entry(run).or_default();
        if lane.is_empty() && level.taking != Some(run) {
            level.turn.push_back(run);
        }
        lane.push_back(q);
        self.len += 1;
    }

    /// Queues at the front of its run's lane (an attempt coming back: released by a
    /// gate, or servable again).
    pub fn push_front(&mut self, q: Queued) {
        let run = q.run();
        let level = self.level(q.priority());
        let lane = level.lanes.entry(run).or_default();
        if lane.is_empty() && level.taking != Some(run) {
            level.turn.push_back(run);
        }
        lane.push_front(q);
        self.len += 1;
    }

    /// The priorities that have attempts, highest first.
    pub fn priorities(&self) -> Vec<i32> {
        self.levels.iter().map(|l| l.priority).collect()
    }

    /// Runs waiting at this priority (the one taking its turn excluded).
    pub fn turns(&self, priority: i32) -> usize {
        self.levels
            .iter()
            .find(|l| l.priority == priority)
            .map_or(0, |l| l.turn.len())
    }

    /// The next run to take its turn at this priority (out of the turn order until
    /// `end_turn`).
    pub fn next_turn(&mut self, priority: i32) -> Option<FlowRunId> {
        let level = self.level_at(priority)?;
        let run = level.turn.pop_front()?;
        level.taking = Some(run);
        Some(run)
    }

    /// Takes the head of a run's lane (during its turn).
    pub fn pop(&mut self, priority: i32, run: FlowRunId) -> Option<Queued> {
        let level = self.level_at(priority)?;
        let lane = level.lanes.get_mut(&run)?;
        let q = lane.pop_front();
        if lane.is_empty() {
            level.lanes.remove(&run);
        }
        if q.is_some() {
            self.len -= 1;
        }
        q
    }

    /// Puts back what `pop` took (during the run's turn).
    pub fn unpop(&mut self, priority: i32, run: FlowRunId, q: Queued) {
        self.level(priority)
            .lanes
            .entry(run)
            .or_default()
            .push_front(q);
        self.len += 1;
    }

    /// Ends a run's turn: back at the end of the turn order (`first`: at its front, to
    /// go on) if it still has attempts at this priority.
    pub fn end_turn(&mut self, priority: i32, run: FlowRunId, first: bool) {
        if let Some(level) = self.level_at(priority) {
            if level.taking == Some(run) {
                level.taking = None;
            }
            if level.lanes.contains_key(&run) {
                if first {
                    level.turn.push_front(run);
                } else {
                    level.turn.push_back(run);
                }
            }
        }
        self.tidy();
    }

    /// The next attempt in fair order: highest priority, the run whose turn it is.
    pub fn pop_next(&mut self) -> Option<Queued> {
        let level = self.levels.first_mut()?;
        let run = level.turn.pop_front()?;
        let lane = level.lanes.get_mut(&run)?;
        let q = lane.pop_front();
        if lane.is_empty() {
            level.lanes.remove(&run);
        } else {
            level.turn.push_back(run);
        }
        self.len -= q.is_some() as usize;
        self.tidy();
        q
    }

    /// Removes and returns a run's attempts.
    pub fn remove_run(&mut self, run: FlowRunId) -> Vec<Queued> {
        let mut out = Vec::new();
        for level in &mut self.levels {
            if let Some(lane) = level.lanes.remove(&run) {
                level.turn.retain(|r| *r != run);
                out.extend(lane);
            }
        }
        self.len -= out.len();
        self.tidy();
        out
    }

    /// Removes and returns the attempts `take` selects, in order.
    pub fn take_where(&mut self, mut take: impl FnMut(&Queued) -> bool) -> Vec<Queued> {
        let mut out = Vec::new();
        for level in &mut self.levels {
            if !level.lanes.values().flatten().any(&mut take) {
                continue;
            }
            let runs: Vec<FlowRunId> = level.lanes.keys().copied().collect();
            for run in runs {
                let lane = level.lanes.remove(&run).unwrap_or_default();
                let mut keep = VecDeque::with_capacity(lane.len());
                for q in lane {
                    if take(&q) {
                        out.push(q);
                    } else {
                        keep.push_back(q);
                    }
                }
                if keep.is_empty() {
                    level.turn.retain(|r| *r != run);
                } else {
                    level.lanes.insert(run, keep);
                }
            }
        }
        self.len -= out.len();
        self.tidy();
        out
    }

    /// Every waiting attempt (no order promised).
    pub fn iter(&self) -> impl Iterator<Item = &Queued> {
        self.levels.iter().flat_map(|l| l.lanes.values().flatten())
    }
}

/// Which limit a gate enforces.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum GateKind {
    /// The task's own `concurrency` / `rate`.
    Task(Arc<str>),
    /// A named limit (`limit = "openai"`).
    Named(Arc<str>),
}

/// A gate: a limit, split by the value of the task's key when it has one.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GateKey {
    /// The limit.
    pub kind: GateKind,
    /// The key's value.
    pub key: Option<Arc<str>>,
}

impl std::fmt::Display for GateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            GateKind::Task(t) => write!(f, "task `{t}`")?,
            GateKind::Named(n) => write!(f, "limit `{n}`")?,
        }
        if let Some(k) = &self.key {
            write!(f, " [{k}]")?;
        }
        Ok(())
    }
}

/// A token bucket, kept as its theoretical arrival time (GCRA): the next start is due at
/// `tat - (burst - 1) * interval`. A start made up to one interval late (the timer's
/// granularity, a busy mailbox) does not push the schedule back, so a busy gate keeps its
/// exact rate over time (any window of T seconds sees at most rate * T + burst + 1
/// starts); one idle (or stalled) for longer starts a new schedule.
struct Bucket {
    rate: RateSpec,
    interval: Duration,
    tat: Instant,
}

impl Bucket {
    fn new(rate: RateSpec, now: Instant) -> Bucket {
        // (sizes are checked where they come in; a zero here must not panic the
        // scheduler: one start per hour at most)
        let per_second = rate.per_second();
        let interval = if per_second > 0.0 && per_second.is_finite() {
            Duration::from_secs_f64(1.0 / per_second)
        } else {
            Duration::from_secs(3600)
        };
        Bucket {
            rate: RateSpec {
                burst: rate.burst.max(1),
                ..rate
            },
            interval,
            tat: now,
        }
    }

    /// How far ahead of the schedule a start may be: the burst.
    fn tolerance(&self) -> Duration {
        self.interval * self.rate.burst.saturating_sub(1)
    }

    fn has(&self, now: Instant) -> bool {
        now + self.tolerance() >= self.tat
    }

    /// Starts allowed now (the burst, less what the schedule is ahead).
    fn available(&self, now: Instant) -> u32 {
        let horizon = now + self.tolerance();
        if horizon < self.tat {
            return 0;
        }
        let ahead = horizon.duration_since(self.tat).as_secs_f64();
        ((ahead / self.interval.as_secs_f64()).floor() as u64 + 1).min(self.rate.burst as u64)
            as u32
    }

    fn take(&mut self, now: Instant) {
        let late = now.saturating_duration_since(self.tat);
        self.tat = if late <= self.interval {
            self.tat + self.interval
        } else {
            now + self.interval
        };
    }

    /// How long until the next start is due.
    fn next_in(&self, now: Instant) -> Duration {
        (self.tat.saturating_duration_since(now + self.tolerance())).max(Duration::from_millis(1))
    }

    fn full(&self, now: Instant) -> bool {
        now >= self.tat
    }
}

/// One gate's state.
pub struct Gate {
    /// Attempts that passed and have not ended.
    pub running: u32,
    /// Waiters let go ahead (`Queued::released`) that have not passed or waited again.
    pub released: u32,
    cap: Option<u32>,
    bucket: Option<Bucket>,
    /// Attempts waiting to pass.
    pub waiters: FairQueue,
}

impl Gate {
    /// A gate of this size.
    pub fn new(cap: Option<u32>, rate: Option<RateSpec>, now: Instant) -> Gate {
        Gate {
            running: 0,
            released: 0,
            cap,
            bucket: rate.map(|r| Bucket::new(r, now)),
            waiters: FairQueue::default(),
        }
    }

    /// Resizes (a named limit changed); a bucket whose rate changed starts full.
    pub fn resize(&mut self, cap: Option<u32>, rate: Option<RateSpec>, now: Instant) {
        self.cap = cap;
        match (&mut self.bucket, rate) {
            (Some(b), Some(r)) if b.rate == r => {}
            (b, r) => *b = r.map(|r| Bucket::new(r, now)),
        }
    }

    /// How many more waiters to let go ahead now: permits free and tokens due, less
    /// those let go already.
    pub fn room(&self, now: Instant) -> u32 {
        let slots = self
            .cap
            .map_or(u32::MAX, |c| c.saturating_sub(self.running));
        let tokens = self.bucket.as_ref().map_or(u32::MAX, |b| b.available(now));
        slots.min(tokens).saturating_sub(self.released)
    }

    /// A permit is free now (a slot under the cap and a token).
    pub fn free(&mut self, now: Instant) -> bool {
        self.cap.is_none_or(|c| self.running < c) && self.bucket.as_ref().is_none_or(|b| b.has(now))
    }

    /// Takes a permit (after `free`).
    pub fn take(&mut self, now: Instant) {
        self.running += 1;
        if let Some(b) = &mut self.bucket {
            b.take(now);
        }
    }

    /// Gives back a permit (its attempt ended, or was dropped before it ran).
    pub fn give_back(&mut self) {
        self.running = self.running.saturating_sub(1);
    }

    /// When a rate gate with waiters gets its next token (none: not waiting on a rate).
    pub fn due_in(&mut self, now: Instant) -> Option<Duration> {
        if self.waiters.is_empty()
            || self.released > 0
            || self.cap.is_some_and(|c| self.running >= c)
        {
            return None;
        }
        let b = self.bucket.as_ref()?;
        if b.has(now) {
            return None;
        }
        Some(b.next_in(now))
    }

    /// Holds nothing: no attempt running or waiting, the bucket full. Such a gate can
    /// go (it would be made again the same).
    pub fn idle(&mut self, now: Instant) -> bool {
        self.running == 0
            && self.released == 0
            && self.waiters.is_empty()
            && self.bucket.as_ref().is_none_or(|b| b.full(now))
    }

    /// Its size, for views.
    pub fn size(&self) -> NamedLimit {
        NamedLimit {
            concurrency: self.cap,
            rate: self.bucket.as_ref().map(|b| b.rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use pinazu_shared::ids::{AttemptId, CallId};
    use pinazu_shared::wire::SchedInfo;

    fn attempt(run: FlowRunId, n: u64, priority: i32) -> Queued {
        Queued::new(
            Instant::now(),
            SpawnTask {
                flow_run_id: run,
                call_id: CallId { key: n, seq: 0 },
                attempt_id: AttemptId(n),
                attempt: 1,
                task: Arc::from("t"),
                args: Bytes::new(),
                args_ref: None,
                timeout_ms: None,
                requires: Vec::new(),
                want_key: false,
                trace: None,
                sched: (priority != 0).then(|| {
                    Box::new(SchedInfo {
                        priority,
                        ..Default::default()
                    })
                }),
            },
        )
    }

    #[test]
    fn runs_take_turns_and_priorities_go_first() {
        let (big, small, urgent) = (FlowRunId::new(), FlowRunId::new(), FlowRunId::new());
        let mut q = FairQueue::default();
        for n in 0..100 {
            q.push_back(attempt(big, n, 0));
        }
        for n in 100..103 {
            q.push_back(attempt(small, n, 0));
        }
        q.push_back(attempt(urgent, 200, 5));
        assert_eq!(q.len(), 104);
        let order: Vec<u64> = (0..8)
            .map(|_| q.pop_next().unwrap().task.attempt_id.0)
            .collect();
        assert_eq!(order, vec![200, 0, 100, 1, 101, 2, 102, 3]);
        assert_eq!(q.remove_run(big).len(), 96);
        assert!(q.is_empty());
        assert!(q.pop_next().is_none());
    }

    #[test]
    fn a_bucket_gives_its_rate_and_no_more() {
        let now = Instant::now();
        let mut g = Gate::new(None, Some(RateSpec::parse("10/s", None).unwrap()), now);
        assert!(g.free(now));
        g.take(now);
        assert!(!g.free(now));
        assert!(!g.free(now + Duration::from_millis(99)));
        assert!(g.free(now + Duration::from_millis(100)));
        // a start 3 ms late keeps the schedule: the next is due 97 ms after it
        let late = now + Duration::from_millis(103);
        g.take(late);
        assert!(!g.free(now + Duration::from_millis(199)));
        assert!(g.free(now + Duration::from_millis(200)));
        // a burst of 3: three at once, then one per interval
        let mut b = Gate::new(None, Some(RateSpec::parse("10/s", Some(3)).unwrap()), now);
        for _ in 0..3 {
            assert!(b.free(now));
            b.take(now);
        }
        assert!(!b.free(now));
        assert!(b.free(now + Duration::from_millis(100)));
        let mut c = Gate::new(Some(2), None, now);
        c.take(now);
        c.take(now);
        assert!(!c.free(now));
        c.give_back();
        assert!(c.free(now));
    }
}
