//! A run's task table (`CallLog`): one compact row per call, owned and written by the
//! run's `FlowRunner` on the transitions it makes anyway (no lock, no message), read by
//! the dashboard a page at a time. When the run ends the table is kept in the object
//! store (`runs/<run>/calls.msgpack`), so an ended run's page works from any
//! coordinator and after restarts.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::time::Instant;

use pinazu_shared::api::{
    CallStatus, CallView, CallsPage, CallsQuery, TimelineLane, CALLS_PAGE_MAX,
};
use pinazu_shared::error::ErrorInfo;
use pinazu_shared::ids::FlowRunId;

/// No time recorded (a row's `started_ms`/`ended_ms`).
pub(crate) const NONE: u32 = u32::MAX;
/// An error message or chain is kept this long at most.
const ERROR_MAX: usize = 4096;
/// The attempts' logs one run keeps in all; beyond, only failed attempts' logs are kept,
/// up to `FAILED_LOGS_MAX`.
const LOGS_MAX: usize = 64 * 1024 * 1024;
const FAILED_LOGS_MAX: usize = 2 * LOGS_MAX;
/// One call's logs (its attempts' one after the other) are kept this long at most: the
/// latest attempts' lines stay.
const CALL_LOGS_MAX: usize = 256 * 1024;
/// A page stops growing past this many bytes (the rest is the next page): an answer
/// stays well under NATS's max payload.
const PAGE_BYTES: usize = 512 * 1024;
/// A result of at most this many bytes (MessagePack) is kept for the call's detail,
/// up to `RESULTS_MAX` bytes of them a run.
const RESULT_MAX: usize = 96;
const RESULTS_MAX: usize = 16 * 1024 * 1024;
/// An error in a page's rows is cut to this (the whole of it, and its chain, come with
/// `with_logs`).
const ROW_ERROR_MAX: usize = 300;

/// Row flags.
const CACHE_HIT: u8 = 1;
const REPLAYED: u8 = 2;

/// One call: 32 bytes. Kept in the store as an array of its fields in this order (a
/// million-call table encodes to about 25 MB, not the 100 MB of maps with field
/// names); read back from an array or, from tables written before, a map.
#[derive(Clone, Copy, Debug, Deserialize)]
struct Row {
    task: u16,
    status: u8,
    flags: u8,
    attempts: u16,
    agent: u32,
    queued_ms: u32,
    started_ms: u32,
    ended_ms: u32,
    error: u32,
    #[serde(default = "none")]
    logs: u32,
    /// Where its result's MessagePack is in `results` (a length byte, then the bytes).
    #[serde(default = "none")]
    result: u32,
}

fn none() -> u32 {
    NONE
}

impl Serialize for Row {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeTuple;
        let mut t = s.serialize_tuple(11)?;
        t.serialize_element(&self.task)?;
        t.serialize_element(&self.status)?;
        t.serialize_element(&self.flags)?;
        t.serialize_element(&self.attempts)?;
        t.serialize_element(&self.agent)?;
        t.serialize_element(&self.queued_ms)?;
        t.serialize_element(&self.started_ms)?;
        t.serialize_element(&self.ended_ms)?;
        t.serialize_element(&self.error)?;
        t.serialize_element(&self.logs)?;
        t.serialize_element(&self.result)?;
        t.end()
    }
}

fn status_code(s: CallStatus) -> u8 {
    CallStatus::ALL.iter().position(|c| *c == s).unwrap_or(0) as u8
}

fn status_of(code: u8) -> CallStatus {
    CallStatus::ALL
        .get(code as usize)
        .copied()
        .unwrap_or(CallStatus::Pending)
}

/// The task table of one run.
#[derive(Serialize, Deserialize)]
pub struct CallLog {
    rows: Vec<Row>,
    tasks: Vec<String>,
    agents: Vec<String>,
    /// Error message and chain, by a row's `error` index.
    errors: Vec<(String, Option<String>)>,
    /// Attempts' log lines, by a row's `logs` index (a call's attempts one after the
    /// other).
    #[serde(default)]
    logs: Vec<String>,
    #[serde(default)]
    log_bytes: usize,
    /// Attempts' logs not kept (the run's logs passed `LOGS_MAX`).
    #[serde(default)]
    logs_dropped: u64,
    /// Small results, one after the other (see `Row::result`).
    #[serde(default)]
    results: Vec<u8>,
    /// The last cancellation reason and its error index (one for all the calls a run's
    /// end cancels).
    #[serde(default)]
    cancel_reason: Option<(String, u32)>,
    params: Map<String, Value>,
    version: u64,
    span_ms: u64,
    #[serde(skip)]
    index: Index,
}

/// Lookups from names to indices (rebuilt, not stored).
struct Index {
    started: Instant,
    /// Milliseconds since `started`, read once per runner message (`tick`): the
    /// transitions one message makes share it (a clock read per transition was a few
    /// per cent of embedded fan-out).
    now: u32,
    tasks: HashMap<&'static str, u16>,
    agents: HashMap<String, u32>,
    /// The agent looked up last (reports come in batches from one agent).
    last_agent: u32,
}

impl Default for Index {
    fn default() -> Self {
        Index {
            started: Instant::now(),
            now: 0,
            tasks: HashMap::new(),
            agents: HashMap::new(),
            last_agent: NONE,
        }
    }
}

fn clip(s: &str) -> String {
    clip_to(s, ERROR_MAX)
}

fn clip_to(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… (cut at {max} bytes)", &s[..end])
}

impl CallLog {
    /// An empty table for a run with these parameters, its clock starting now.
    pub fn new(params: Map<String, Value>) -> Self {
        CallLog {
            rows: Vec::new(),
            tasks: Vec::new(),
            agents: Vec::new(),
            errors: Vec::new(),
            logs: Vec::new(),
            log_bytes: 0,
            logs_dropped: 0,
            cancel_reason: None,
            results: Vec::new(),
            params,
            version: 0,
            span_ms: 0,
            index: Index::default(),
        }
    }

    /// Reads the clock for the transitions of the runner's next message.
    pub fn tick(&mut self) {
        self.index.now = self
            .index
            .started
            .elapsed()
            .as_millis()
            .min(NONE as u128 - 1) as u32;
    }

    fn now_ms(&self) -> u32 {
        self.index.now
    }

    /// Milliseconds since the run started, as of the runner's current message.
    pub fn now(&self) -> u32 {
        self.index.now
    }

    fn row(&mut self, ordinal: u64) -> Option<&mut Row> {
        self.version += 1;
        self.rows.get_mut(ordinal as usize)
    }

    /// The flow body made a call (its ordinal is the table's length).
    pub fn made(&mut self, ordinal: u64, task: &'static str) {
        let tasks = &mut self.tasks;
        let t = *self.index.tasks.entry(task).or_insert_with(|| {
            tasks.push(task.to_string());
            (tasks.len() - 1).min(u16::MAX as usize) as u16
        });
        let queued_ms = self.now_ms();
        if ordinal as usize != self.rows.len() {
            return;
        }
        self.version += 1;
        self.rows.push(Row {
            task: t,
            status: status_code(CallStatus::Pending),
            flags: 0,
            attempts: 0,
            agent: NONE,
            queued_ms,
            started_ms: NONE,
            ended_ms: NONE,
            error: NONE,
            logs: NONE,
            result: NONE,
        });
    }

    /// An attempt of the call was dispatched (queued for a slot): `queued_ms` is when
    /// its last attempt was.
    pub fn dispatched(&mut self, ordinal: u64, attempt: u32) {
        let now = self.now_ms();
        if let Some(r) = self.row(ordinal) {
            r.status = status_code(CallStatus::Pending);
            r.attempts = attempt.min(u16::MAX as u32) as u16;
            r.queued_ms = now;
            r.started_ms = NONE;
        }
    }

    /// The agent's index in this table (added when new).
    pub fn agent_index(&mut self, agent: &str) -> u32 {
        let last = self.index.last_agent;
        if self.agents.get(last as usize).is_some_and(|a| a == agent) {
            return last;
        }
        if let Some(i) = self.index.agents.get(agent) {
            self.index.last_agent = *i;
            return *i;
        }
        self.agents.push(agent.to_string());
        let i = (self.agents.len() - 1) as u32;
        self.index.agents.insert(agent.to_string(), i);
        i
    }

    /// The call's attempt runs: since `started_ms`, on the agent of index `agent`
    /// (`NONE`: adopted, agent unknown). The runner keeps a running call's start in
    /// its call table and writes it here when the table is read or the attempt ends:
    /// one touch of the row per attempt, not one per report (rows of a large run are
    /// not in the CPU's caches). Changes nothing when the row says so already.
    pub fn running(&mut self, ordinal: u64, started_ms: u32, agent: u32, attempt: u32) {
        let attempts = attempt.min(u16::MAX as u32) as u16;
        let running = status_code(CallStatus::Running);
        let Some(r) = self.rows.get_mut(ordinal as usize) else {
            return;
        };
        if r.status == running && r.started_ms == started_ms && r.attempts == attempts {
            return;
        }
        r.status = running;
        r.started_ms = started_ms;
        r.attempts = attempts;
        if agent != NONE {
            r.agent = agent;
        }
        self.version += 1;
    }

    /// The call's last attempt ran on the agent of index `agent` for `elapsed_us`,
    /// from `started_ms` as its start report said (`NONE`: never reported).
    pub fn ran(&mut self, ordinal: u64, agent: u32, started_ms: u32, elapsed_us: u64) {
        let now = self.now_ms();
        // (its start is reported in the same batch as its end, often: the agent's
        // measure of how long it ran places the start better)
        let began = now.saturating_sub((elapsed_us / 1000).min(u32::MAX as u64) as u32);
        if let Some(r) = self.row(ordinal) {
            r.agent = agent;
            let reported = if started_ms == NONE {
                began
            } else {
                started_ms
            };
            r.started_ms = reported.min(began).max(r.queued_ms);
        }
    }

    /// An attempt of the call ended with these log lines.
    pub fn attempt_logs(
        &mut self,
        ordinal: u64,
        attempt: u32,
        agent: &str,
        text: &str,
        failed: bool,
    ) {
        let bound = if failed { FAILED_LOGS_MAX } else { LOGS_MAX };
        if self.log_bytes + text.len() > bound {
            self.logs_dropped += 1;
            return;
        }
        self.log_bytes += text.len();
        let Some(r) = self.rows.get(ordinal as usize).copied() else {
            return;
        };
        self.version += 1;
        let header = format!("── attempt {attempt} on {agent} ──\n");
        match self.logs.get_mut(r.logs as usize) {
            Some(kept) if r.logs != NONE => {
                if kept.len() + header.len() + text.len() > CALL_LOGS_MAX {
                    // the latest attempts' lines stay
                    self.log_bytes -= kept.len().min(self.log_bytes);
                    kept.clear();
                    kept.push_str("[earlier attempts' log lines dropped]\n");
                }
                kept.push_str(&header);
                kept.push_str(text);
            }
            _ => {
                self.logs.push(format!("{header}{text}"));
                let i = (self.logs.len() - 1) as u32;
                if let Some(r) = self.rows.get_mut(ordinal as usize) {
                    r.logs = i;
                }
            }
        }
    }

    /// Keeps an error for the row (in the row's own slot when it has one: a retried
    /// call keeps its last error only).
    fn error_index(&mut self, ordinal: u64, e: &ErrorInfo) -> u32 {
        let kept = (clip(&e.to_string()), e.traceback.as_deref().map(clip));
        let shared = self.cancel_reason.as_ref().map(|(_, i)| *i);
        match self.rows.get(ordinal as usize).map(|r| r.error) {
            Some(i) if i != NONE && Some(i) != shared => match self.errors.get_mut(i as usize) {
                Some(slot) => {
                    *slot = kept;
                    i
                }
                None => self.push_error(kept),
            },
            _ => self.push_error(kept),
        }
    }

    fn push_error(&mut self, kept: (String, Option<String>)) -> u32 {
        self.errors.push(kept);
        (self.errors.len() - 1) as u32
    }

    /// Bytes this table holds, about.
    pub fn bytes(&self) -> usize {
        self.rows.len() * std::mem::size_of::<Row>()
            + self.results.len()
            + self.log_bytes
            + self
                .errors
                .iter()
                .map(|(e, t)| e.len() + t.as_ref().map_or(0, |t| t.len()) + 48)
                .sum::<usize>()
    }

    /// An attempt failed and will be retried.
    pub fn retrying(&mut self, ordinal: u64, e: &ErrorInfo) {
        let error = self.error_index(ordinal, e);
        if let Some(r) = self.row(ordinal) {
            r.status = status_code(CallStatus::Retrying);
            r.error = error;
        }
    }

    /// The call ended: `error` when it failed; `flags` how it was answered.
    fn ended(&mut self, ordinal: u64, status: CallStatus, flags: u8, error: Option<&ErrorInfo>) {
        let error = error.map_or(NONE, |e| self.error_index(ordinal, e));
        let now = self.now_ms();
        if let Some(r) = self.row(ordinal) {
            r.status = status_code(status);
            r.flags |= flags;
            r.ended_ms = now;
            if error != NONE {
                r.error = error;
            }
        }
    }

    /// The call ended with a result its attempt returned.
    pub fn succeeded(&mut self, ordinal: u64, result: &[u8]) {
        // a small result is kept for the call's detail (copied, not decoded, here)
        let at = self.results.len();
        let kept =
            !result.is_empty() && result.len() <= RESULT_MAX && at + result.len() < RESULTS_MAX;
        if kept {
            self.results.push(result.len() as u8);
            self.results.extend_from_slice(result);
        }
        self.ended(ordinal, CallStatus::Success, 0, None);
        if kept {
            if let Some(r) = self.rows.get_mut(ordinal as usize) {
                r.result = at as u32;
            }
        }
    }

    /// A call's kept result, as JSON cut to 300 bytes.
    fn result_preview(&self, r: &Row) -> Option<String> {
        if r.result == NONE {
            return None;
        }
        let at = r.result as usize;
        let len = *self.results.get(at)? as usize;
        let bytes = self.results.get(at + 1..at + 1 + len)?;
        let value: Value = rmp_serde::from_slice(bytes).ok()?;
        Some(clip_to(&value.to_string(), ROW_ERROR_MAX))
    }

    /// The call was answered from the cache.
    pub fn cache_hit(&mut self, ordinal: u64) {
        self.ended(ordinal, CallStatus::Success, CACHE_HIT, None);
    }

    /// The call was answered from the journal or from a result passed in.
    pub fn replayed(&mut self, ordinal: u64, failed: Option<&ErrorInfo>) {
        let status = match failed {
            Some(_) => CallStatus::Failed,
            None => CallStatus::Success,
        };
        self.ended(ordinal, status, REPLAYED, failed);
    }

    /// The call failed for good.
    pub fn failed(&mut self, ordinal: u64, e: &ErrorInfo) {
        self.ended(ordinal, CallStatus::Failed, 0, Some(e));
    }

    /// The run ended before the call did.
    pub fn cancelled(&mut self, ordinal: u64, why: &str) {
        // (one error for every call the run's end cancels)
        let error = match &self.cancel_reason {
            Some((reason, i)) if reason == why => *i,
            _ => {
                let i = self.push_error((format!("cancelled: {}", clip(why)), None));
                self.cancel_reason = Some((why.to_string(), i));
                i
            }
        };
        let now = self.now_ms();
        if let Some(r) = self.row(ordinal) {
            r.status = status_code(CallStatus::Cancelled);
            r.ended_ms = now;
            r.error = error;
        }
    }

    /// The run ended: the table's time span stops growing.
    pub fn close(&mut self) {
        self.span_ms = self.index.started.elapsed().as_millis() as u64;
        self.version += 1;
    }

    fn span(&self) -> u64 {
        if self.span_ms > 0 {
            self.span_ms
        } else {
            self.index.started.elapsed().as_millis() as u64
        }
    }

    fn view(&self, ordinal: usize, r: &Row, with_logs: bool) -> CallView {
        let time = |t: u32| (t != NONE).then_some(t as u64);
        let (error, traceback) = match self.errors.get(r.error as usize) {
            Some((e, t)) if r.error != NONE && with_logs => (Some(e.clone()), t.clone()),
            Some((e, _)) if r.error != NONE => (Some(clip_to(e, ROW_ERROR_MAX)), None),
            _ => (None, None),
        };
        CallView {
            call: ordinal as u64,
            task: self.tasks.get(r.task as usize).cloned().unwrap_or_default(),
            status: status_of(r.status),
            attempts: r.attempts as u32,
            agent: self.agents.get(r.agent as usize).cloned(),
            queued_ms: r.queued_ms as u64,
            started_ms: time(r.started_ms),
            ended_ms: time(r.ended_ms),
            cache_hit: r.flags & CACHE_HIT != 0,
            replayed: r.flags & REPLAYED != 0,
            error,
            traceback,
            has_logs: r.logs != NONE,
            logs: if with_logs && r.logs != NONE {
                self.logs.get(r.logs as usize).cloned()
            } else {
                None
            },
            result: if with_logs {
                self.result_preview(r)
            } else {
                None
            },
        }
    }

    /// One page of the table, filtered, with the counts and the timeline.
    pub fn page(&self, q: &CallsQuery) -> CallsPage {
        let task = q
            .task
            .as_deref()
            .map(|t| self.tasks.iter().position(|n| n == t).map(|i| i as u16));
        let status = q.status.map(status_code);
        let limit = q.limit.clamp(1, CALLS_PAGE_MAX) as usize;
        let mut by_status = [0u64; CallStatus::ALL.len()];
        let mut by_task = vec![0u64; self.tasks.len()];
        let mut matching = 0u64;
        let mut rows = Vec::new();
        let mut bytes = 0usize;
        for (i, r) in self.rows.iter().enumerate() {
            if let Some(n) = by_status.get_mut(r.status as usize) {
                *n += 1;
            }
            if let Some(n) = by_task.get_mut(r.task as usize) {
                *n += 1;
            }
            let wanted = status.is_none_or(|s| r.status == s)
                && task.is_none_or(|t| t == Some(r.task))
                && (!q.logged || r.logs != NONE);
            if wanted {
                if matching >= q.offset && rows.len() < limit && bytes < PAGE_BYTES {
                    let view = self.view(i, r, q.with_logs);
                    bytes += 160
                        + view.error.as_ref().map_or(0, |e| e.len())
                        + view.traceback.as_ref().map_or(0, |t| t.len())
                        + view.logs.as_ref().map_or(0, |l| l.len());
                    rows.push(view);
                }
                matching += 1;
            }
        }
        CallsPage {
            total: self.rows.len() as u64,
            matching,
            rows,
            by_status: CallStatus::ALL
                .into_iter()
                .zip(by_status)
                .filter(|(_, n)| *n > 0)
                .collect(),
            by_task: self.tasks.iter().cloned().zip(by_task).collect(),
            params: self.params.clone(),
            version: self.version,
            span_ms: self.span(),
            logs_dropped: self.logs_dropped,
            timeline: self.timeline(q.timeline_width.min(4096) as usize),
        }
    }

    /// Per agent, how many attempts ran in each of `width` columns of the run's span.
    fn timeline(&self, width: usize) -> Vec<TimelineLane> {
        if width == 0 {
            return Vec::new();
        }
        let span = self.span().max(1) as f64;
        let now = self.span().min(NONE as u64 - 1) as u32;
        let col = |ms: u32| ((ms as f64 / span * width as f64) as usize).min(width - 1);
        let mut lanes: Vec<TimelineLane> = self
            .agents
            .iter()
            .map(|a| TimelineLane {
                agent: a.clone(),
                running: vec![0; width],
                failed: vec![0; width],
                attempts: 0,
            })
            .collect();
        for r in &self.rows {
            let (Some(lane), true) = (lanes.get_mut(r.agent as usize), r.started_ms != NONE) else {
                continue;
            };
            let end = if r.ended_ms == NONE { now } else { r.ended_ms };
            let bad = matches!(
                status_of(r.status),
                CallStatus::Failed | CallStatus::Retrying
            ) || r.attempts > 1;
            // +1 where the attempt starts, -1 after it ends, summed below: rows + width
            // steps however long the attempts
            lane.attempts += 1;
            let (from, to) = (col(r.started_ms), col(end.max(r.started_ms)) + 1);
            let marks: &mut [&mut Vec<u32>] = if bad {
                &mut [&mut lane.running, &mut lane.failed]
            } else {
                &mut [&mut lane.running]
            };
            for v in marks.iter_mut() {
                v[from] = v[from].wrapping_add(1);
                if let Some(c) = v.get_mut(to) {
                    *c = c.wrapping_sub(1);
                }
            }
        }
        for lane in &mut lanes {
            for v in [&mut lane.running, &mut lane.failed] {
                let mut sum = 0u32;
                for c in v.iter_mut() {
                    sum = sum.wrapping_add(*c);
                    *c = sum;
                }
            }
        }
        lanes
    }

    /// The table as kept in the store.
    pub fn encode(&self) -> Result<Vec<u8>, String> {
        // (the table's own fields by name: fields added later read back from older
        // tables by default; rows as arrays, see `Row`)
        let mut buf = Vec::with_capacity(self.rows.len() * 24 + self.bytes() / 4 + 1024);
        rmp_serde::encode::write_named(&mut buf, self).map_err(|e| e.to_string())?;
        Ok(buf)
    }

    /// A table read back from the store.
    pub fn decode(bytes: &[u8]) -> Result<CallLog, String> {
        rmp_serde::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// Where an ended run's table is kept in the object store.
pub fn store_key(run: FlowRunId) -> String {
    format!("runs/{run}/calls.msgpack")
}

#[cfg(test)]
mod tests {
    use super::*;
    use pinazu_shared::error::FailureKind;

    #[test]
    fn rows_follow_their_calls_and_pages_filter() {
        let mut log = CallLog::new(Map::new());
        for i in 0..10u64 {
            log.made(i, if i % 2 == 0 { "even" } else { "odd" });
            log.dispatched(i, 1);
            let a = log.agent_index("agent-a");
            log.running(i, 5, a, 1);
        }
        log.succeeded(0, &rmp_serde::to_vec(&42).unwrap());
        log.cache_hit(2);
        let boom = ErrorInfo::new(FailureKind::Error, "boom");
        log.retrying(3, &boom);
        log.failed(5, &boom);
        let all = log.page(&CallsQuery {
            limit: 100,
            timeline_width: 10,
            ..Default::default()
        });
        assert_eq!((all.total, all.matching, all.rows.len()), (10, 10, 10));
        assert!(all.rows[2].cache_hit);
        let detail = log.page(&CallsQuery {
            limit: 1,
            with_logs: true,
            ..Default::default()
        });
        assert_eq!(detail.rows[0].result.as_deref(), Some("42"));
        assert_eq!(all.rows[3].status, CallStatus::Retrying);
        assert_eq!(all.rows[5].error.as_deref(), Some("boom"));
        assert_eq!(all.timeline.len(), 1);
        assert_eq!(all.timeline[0].attempts, 10);
        let odd_running = log.page(&CallsQuery {
            limit: 2,
            offset: 1,
            task: Some("odd".into()),
            status: Some(CallStatus::Running),
            ..Default::default()
        });
        // odd calls 1, 3 (retrying), 5 (failed), 7, 9: running ones are 1, 7, 9
        assert_eq!(odd_running.matching, 3);
        let calls: Vec<u64> = odd_running.rows.iter().map(|r| r.call).collect();
        assert_eq!(calls, vec![7, 9]);
        let back = CallLog::decode(&log.encode().unwrap()).unwrap();
        assert_eq!(
            back.page(&CallsQuery {
                limit: 100,
                ..Default::default()
            })
            .rows,
            all.rows
        );
    }

    /// A row written before rows were arrays (a map by field name) still reads back.
    #[test]
    fn rows_written_as_maps_read_back() {
        #[derive(Serialize)]
        struct Old {
            task: u16,
            status: u8,
            flags: u8,
            attempts: u16,
            agent: u32,
            queued_ms: u32,
            started_ms: u32,
            ended_ms: u32,
            error: u32,
        }
        let old = Old {
            task: 1,
            status: 2,
            flags: 0,
            attempts: 3,
            agent: 4,
            queued_ms: 5,
            started_ms: 6,
            ended_ms: 7,
            error: NONE,
        };
        let row: Row = rmp_serde::from_slice(&rmp_serde::to_vec_named(&old).unwrap()).unwrap();
        assert_eq!((row.task, row.attempts, row.ended_ms), (1, 3, 7));
        assert_eq!((row.logs, row.result), (NONE, NONE));
        let new: Row = rmp_serde::from_slice(&rmp_serde::to_vec_named(&row).unwrap()).unwrap();
        assert_eq!((new.agent, new.started_ms, new.error), (4, 6, NONE));
        // an array: a few bytes per field, no names
        assert!(rmp_serde::to_vec_named(&row).unwrap().len() < 30);
    }
}
