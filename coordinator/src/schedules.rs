//! Schedules' timing and decisions, without I/O: when a schedule fires (cron in a time
//! zone, or a fixed interval), each fire's jitter, and what a pass over the fires due
//! does under its overlap policy (`plan`). The NATS side (`nats/schedules.rs`) stores
//! the schedules and acts on the plans. See "Schedules" in docs/architecture.md.

use chrono::TimeZone;
use croner::Cron;
use std::str::FromStr;

use pinazu_shared::ids::FlowRunId;
use pinazu_shared::schedule::{
    fire_run_id, valid_name, Fire, Overlap, ScheduleSpec, ScheduleState, RECENT_FIRES,
};

/// Fires looked at in one pass at most (a schedule down for long with a short period
/// counts the rest as missed without listing them).
const MAX_FIRES_PER_PASS: usize = 10_000;
/// Fires one backfill may start at most.
pub const MAX_BACKFILL: usize = 1_000;
/// Fires buffered at most (buffer-all; Temporal's default); beyond, fires are skipped.
pub const MAX_BUFFERED: usize = 1_000;
/// Runs decided and not yet started at most (the state is one JetStream message);
/// beyond, fires are missed and the schedule says why.
pub const MAX_PENDING: usize = 2_000;
/// The shortest catch-up window (Temporal's).
pub const MIN_CATCHUP_MS: u64 = 10_000;

/// When a schedule fires.
pub enum Timing {
    /// A cron expression in a time zone.
    Cron(Box<Cron>, chrono_tz::Tz),
    /// Multiples of a period since the Unix epoch, ms.
    Every(u64),
}

impl Timing {
    /// The schedule's timing, or why it has none (a clear error for `schedule add`).
    pub fn of(spec: &ScheduleSpec) -> Result<Timing, String> {
        let t = Timing::parse(spec)?;
        // an expression that never matches (e.g. 30 February) is refused when added
        // (one with a year field may end later: it then just stops firing)
        if let (Some(expr), None) = (&spec.cron, t.next_after(now_ms())) {
            return Err(format!("cron expression {expr:?} never fires"));
        }
        Ok(t)
    }

    /// The timing of a stored schedule (checked when it was added).
    pub fn parse(spec: &ScheduleSpec) -> Result<Timing, String> {
        let tz = match spec.timezone.as_deref() {
            None | Some("") => chrono_tz::UTC,
            Some(name) => chrono_tz::Tz::from_str(name).map_err(|_| {
                format!("unknown time zone {name:?}: use an IANA name such as Europe/Paris or UTC")
            })?,
        };
        match (&spec.cron, spec.every_ms) {
            (Some(_), Some(_)) => Err("give --cron or --every, not both".into()),
            (None, None) => Err("a schedule needs --cron EXPR or --every DURATION".into()),
            (Some(expr), None) => {
                let cron = Cron::from_str(expr).map_err(|e| {
                    format!("invalid cron expression {expr:?}: {e} (5 fields: minute hour day-of-month month day-of-week, or 6 with seconds first; or @hourly, @daily, ...)")
                })?;
                Ok(Timing::Cron(Box::new(cron), tz))
            }
            (None, Some(ms)) => {
                if ms < 1000 {
                    return Err(format!(
                        "--every {ms} ms is too short: a schedule fires at most once a second"
                    ));
                }
                if spec.timezone.is_some() {
                    return Err("--timezone applies to --cron only".into());
                }
                Ok(Timing::Every(ms))
            }
        }
    }

    /// The first fire strictly after `t_ms`.
    pub fn next_after(&self, t_ms: u64) -> Option<u64> {
        match self {
            Timing::Every(p) => Some((t_ms / p + 1) * p),
            Timing::Cron(cron, tz) => {
                let t = tz.timestamp_millis_opt(t_ms as i64).single()?;
                let next = cron.find_next_occurrence(&t, false).ok()?;
                u64::try_from(next.timestamp_millis()).ok()
            }
        }
    }
}

/// Checks a definition: name, flow, timing, windows.
pub fn validate(spec: &ScheduleSpec) -> Result<Timing, String> {
    if !valid_name(&spec.name) {
        return Err(format!(
            "invalid schedule name {:?}: use letters, digits, '_' and '-'",
            spec.name
        ));
    }
    if spec.catchup_ms < MIN_CATCHUP_MS {
        return Err(format!(
            "--catchup must be at least {} s: a pass a little late would miss fires",
            MIN_CATCHUP_MS / 1000
        ));
    }
    if spec.jitter_ms >= spec.catchup_ms {
        return Err("--jitter must be shorter than --catchup".into());
    }
    if let Some(every) = spec.every_ms {
        if spec.jitter_ms >= every {
            return Err("--jitter must be shorter than --every".into());
        }
    }
    Timing::of(spec)
}

/// The fire's jitter: the same on every coordinator (a hash of the schedule and the fire).
pub fn jitter_of(spec: &ScheduleSpec, at_ms: u64) -> u64 {
    if spec.jitter_ms == 0 {
        return 0;
    }
    let h = md5::compute(format!("{}\0{at_ms}", spec.name)).0;
    u64::from_le_bytes(h[..8].try_into().unwrap_or_default()) % spec.jitter_ms
}

/// The next fire after the state's last one, and when it is due (with its jitter).
pub fn next_due(spec: &ScheduleSpec, timing: &Timing, state: &ScheduleState) -> Option<(u64, u64)> {
    let at = timing.next_after(state.last_ms)?;
    Some((at, at + jitter_of(spec, at)))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    pinazu_shared::events::now_ms()
}

/// What a pass decided.
#[derive(Debug, Default)]
pub struct Plan {
    /// Runs to start (also in the state's `pending`).
    pub start: Vec<(u64, FlowRunId)>,
    /// A run to cancel first (cancel-other).
    pub cancel: Option<FlowRunId>,
    /// The state changed (else nothing to write).
    pub changed: bool,
}

fn remember(state: &mut ScheduleState, fire: Fire) {
    state.recent.push_back(fire);
    while state.recent.len() > RECENT_FIRES {
        state.recent.pop_front();
    }
}

fn start(
    spec: &ScheduleSpec,
    state: &mut ScheduleState,
    plan: &mut Plan,
    at_ms: u64,
    now: u64,
    action: &str,
) -> FlowRunId {
    let run = fire_run_id(&spec.name, at_ms);
    state.pending.push((at_ms, run));
    plan.start.push((at_ms, run));
    state.started += 1;
    remember(
        state,
        Fire {
            at_ms,
            action: action.into(),
            run: Some(run),
            acted_ms: now,
        },
    );
    run
}

/// One pass at `now`: every fire due since the state's last one, under the overlap
/// policy (`running`: the state's current run still runs), then a buffered fire if
/// nothing runs. Fires older than the catch-up window are missed.
pub fn plan(
    spec: &ScheduleSpec,
    timing: &Timing,
    state: &mut ScheduleState,
    now: u64,
    mut running: bool,
) -> Plan {
    let mut plan = Plan::default();
    if state.paused {
        return plan;
    }
    // buffered fires go first, in order, before any new one
    if !running {
        if let Some(at) = state.buffered.pop_front() {
            plan.changed = true;
            state.current = Some(start(spec, state, &mut plan, at, now, "started"));
            running = true;
        }
    }
    // cancel-other cancels the run that runs now, once (not a run this pass started)
    let running_before = running.then_some(state.current).flatten();
    let oldest = now.saturating_sub(spec.catchup_ms);
    let mut seen = 0;
    while let Some((at, due)) = next_due(spec, timing, state) {
        if due > now || seen >= MAX_FIRES_PER_PASS {
            break;
        }
        seen += 1;
        plan.changed = true;
        state.last_ms = at;
        if due < oldest || state.pending.len() >= MAX_PENDING {
            if state.pending.len() >= MAX_PENDING {
                state.error = Some(format!(
                    "{MAX_PENDING} runs decided and not started: fires are missed until they start"
                ));
            }
            state.missed += 1;
            if state.recent.back().is_none_or(|f| f.action != "missed") {
                remember(
                    state,
                    Fire {
                        at_ms: at,
                        action: "missed".into(),
                        run: None,
                        acted_ms: now,
                    },
                );
            }
            continue;
        }
        let outcome = match (spec.overlap, running) {
            (Overlap::AllowAll, _) | (_, false) => None,
            (Overlap::Skip, true) => Some("skipped"),
            (Overlap::BufferOne, true) if !state.buffered.is_empty() => Some("skipped"),
            (Overlap::BufferAll, true) if state.buffered.len() >= MAX_BUFFERED => Some("skipped"),
            (Overlap::BufferOne | Overlap::BufferAll, true) => {
                state.buffered.push_back(at);
                Some("buffered")
            }
            (Overlap::CancelOther, true) => {
                if plan.cancel.is_none() {
                    plan.cancel = running_before;
                }
                None
            }
        };
        match outcome {
            Some(action) => {
                if action == "skipped" {
                    state.skipped += 1;
                }
                remember(
                    state,
                    Fire {
                        at_ms: at,
                        action: action.into(),
                        run: None,
                        acted_ms: now,
                    },
                );
            }
            None => {
                state.current = Some(start(spec, state, &mut plan, at, now, "started"));
                running = true;
            }
        }
    }
    plan
}

/// A backfill: a run for every fire time in `[from, to]` (the fire's own run id: one
/// backfilled twice is one run). Refused beyond `MAX_BACKFILL` fires.
pub fn plan_backfill(
    spec: &ScheduleSpec,
    timing: &Timing,
    state: &mut ScheduleState,
    from: u64,
    to: u64,
    now: u64,
) -> Result<Plan, String> {
    // (fires to come are the schedule's, not a backfill's)
    let to = to.min(now);
    if from > to {
        return Err("--from is after --to (or in the future)".into());
    }
    let mut times = Vec::new();
    let mut t = timing.next_after(from.saturating_sub(1));
    while let Some(at) = t.filter(|at| *at <= to) {
        if times.len() >= MAX_BACKFILL {
            return Err(format!(
                "the range holds more than {MAX_BACKFILL} fires: backfill a shorter one"
            ));
        }
        if state.pending.len() + times.len() >= MAX_PENDING {
            return Err(format!(
                "{} runs are still starting: backfill again once they have",
                state.pending.len()
            ));
        }
        times.push(at);
        t = timing.next_after(at);
    }
    let mut plan = Plan {
        changed: true,
        ..Plan::default()
    };
    for at in times {
        start(spec, state, &mut plan, at, now, "backfill");
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(overlap: Overlap) -> ScheduleSpec {
        ScheduleSpec {
            name: "s".into(),
            flow: "f".into(),
            params: Default::default(),
            cron: None,
            every_ms: Some(1000),
            timezone: None,
            overlap,
            catchup_ms: 60_000,
            jitter_ms: 0,
        }
    }

    #[test]
    fn bad_definitions_say_why() {
        let mut s = spec(Overlap::Skip);
        s.cron = Some("61 * * * *".into());
        assert!(validate(&s).err().unwrap().contains("both"));
        s.every_ms = None;
        assert!(validate(&s)
            .err()
            .unwrap()
            .contains("invalid cron expression"));
        s.cron = Some("0 0 30 2 *".into());
        assert!(validate(&s).err().unwrap().contains("never fires"));
        s.cron = Some("*/2 * * * * *".into());
        s.timezone = Some("Mars/Olympus".into());
        assert!(validate(&s).err().unwrap().contains("unknown time zone"));
        s.timezone = Some("Europe/Paris".into());
        assert!(validate(&s).is_ok());
        let mut c = spec(Overlap::Skip);
        c.catchup_ms = 1;
        assert!(validate(&c).err().unwrap().contains("--catchup"));
        c.catchup_ms = 60_000;
        c.jitter_ms = 5_000;
        assert!(validate(&c).err().unwrap().contains("shorter than --every"));
        let mut e = spec(Overlap::Skip);
        e.every_ms = Some(10);
        assert!(validate(&e).err().unwrap().contains("too short"));
        e.name = "a.b".into();
        assert!(validate(&e)
            .err()
            .unwrap()
            .contains("invalid schedule name"));
    }

    #[test]
    fn a_cron_fires_in_its_time_zone() {
        let mut s = spec(Overlap::Skip);
        s.every_ms = None;
        s.cron = Some("0 2 * * *".into());
        s.timezone = Some("Europe/Paris".into());
        let t = validate(&s).unwrap();
        // 2026-01-15 12:00 UTC -> next 02:00 Paris (UTC+1) = 01:00 UTC on the 16th
        let noon = 1_768_478_400_000;
        assert_eq!(t.next_after(noon), Some(1_768_525_200_000));
    }

    #[test]
    fn overlap_policies_decide_like_temporal() {
        let now = 100_000;
        for (overlap, started, skipped, buffered) in [
            (Overlap::AllowAll, 3, 0, 0),
            (Overlap::Skip, 0, 3, 0),
            (Overlap::BufferOne, 0, 2, 1),
            (Overlap::BufferAll, 0, 0, 3),
            (Overlap::CancelOther, 3, 0, 0),
        ] {
            let s = spec(overlap);
            let t = validate(&s).unwrap();
            let mut st = ScheduleState {
                last_ms: 97_000,
                current: Some(FlowRunId::new()),
                ..Default::default()
            };
            let p = plan(&s, &t, &mut st, now, true);
            assert_eq!(p.start.len(), started, "{overlap:?}");
            assert_eq!(st.skipped, skipped, "{overlap:?}");
            assert_eq!(st.buffered.len(), buffered, "{overlap:?}");
            assert_eq!(st.last_ms, 100_000);
            assert_eq!(p.cancel.is_some(), overlap == Overlap::CancelOther);
            // nothing runs any more: a buffered fire starts
            let p = plan(&s, &t, &mut st, now + 1, false);
            assert_eq!(p.start.len(), usize::from(buffered > 0), "{overlap:?}");
        }
    }

    #[test]
    fn fires_missed_beyond_the_catch_up_window_are_not_started() {
        let mut s = spec(Overlap::AllowAll);
        s.catchup_ms = 10_000;
        let t = validate(&s).unwrap();
        let mut st = ScheduleState {
            last_ms: 0,
            ..Default::default()
        };
        let p = plan(&s, &t, &mut st, 30_000, false);
        assert_eq!(st.missed, 19);
        assert_eq!(
            p.start.iter().map(|f| f.0).collect::<Vec<_>>(),
            (20..=30).map(|s| s * 1000).collect::<Vec<_>>()
        );
        // the same fire is the same run
        assert_eq!(p.start[0].1, fire_run_id("s", 20_000));
        let b = plan_backfill(&s, &t, &mut st, 1_000, 3_500, 30_000).unwrap();
        assert_eq!(b.start.len(), 3);
        assert!(plan_backfill(&s, &t, &mut st, 0, 1_000_000_000, 2_000_000_000).is_err());
        // a backfill stops at now
        let mut fresh = ScheduleState::default();
        let b = plan_backfill(&s, &t, &mut fresh, 1_000, 1_000_000, 5_500).unwrap();
        assert_eq!(b.start.len(), 5);
    }

    #[test]
    fn buffered_fires_run_in_order_and_cancel_other_cancels_once() {
        let s = spec(Overlap::BufferAll);
        let t = validate(&s).unwrap();
        let mut st = ScheduleState {
            last_ms: 10_000,
            current: Some(FlowRunId::new()),
            ..Default::default()
        };
        plan(&s, &t, &mut st, 12_000, true);
        assert_eq!(st.buffered, [11_000, 12_000]);
        // the run ended, a new fire is due: the oldest buffered starts, the rest wait
        let p = plan(&s, &t, &mut st, 13_000, false);
        assert_eq!(p.start.iter().map(|f| f.0).collect::<Vec<_>>(), [11_000]);
        assert_eq!(st.buffered, [12_000, 13_000]);
        let c = spec(Overlap::CancelOther);
        let old = FlowRunId::new();
        let mut st = ScheduleState {
            last_ms: 10_000,
            current: Some(old),
            ..Default::default()
        };
        let p = plan(&c, &t, &mut st, 13_000, true);
        assert_eq!(
            p.cancel,
            Some(old),
            "the run that ran, not one this pass started"
        );
        assert_eq!(p.start.len(), 3);
    }

    #[test]
    fn jitter_is_the_same_everywhere_and_bounded() {
        let mut s = spec(Overlap::Skip);
        s.jitter_ms = 10_000;
        for at in (0..100).map(|i| i * 1000) {
            let j = jitter_of(&s, at);
            assert!(j < 10_000);
            assert_eq!(j, jitter_of(&s, at));
        }
    }
}
