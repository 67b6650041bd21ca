//! Per-run counters, shared with whoever watches the run (progress bars, summaries).

use serde::{Deserialize, Serialize};

use pinazu_shared::api::RunInfo;
use pinazu_shared::events::FlowStatus;
use pinazu_shared::ids::FlowRunId;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// Live counters of one run.
#[derive(Debug)]
pub struct RunStats {
    started: Instant,
    /// Task calls made by the flow.
    pub tasks: AtomicU64,
    /// Attempts that started executing on an agent.
    pub executions: AtomicU64,
    /// Calls answered from the cache.
    pub cache_hits: AtomicU64,
    /// Retries scheduled after failed attempts.
    pub retries: AtomicU64,
    /// Calls resolved (success or final failure).
    pub completed: AtomicU64,
    /// Calls that failed for good.
    pub failed: AtomicU64,
    /// Results from superseded attempts, ignored.
    pub stale_results: AtomicU64,
    /// Attempts lost with their agent (or in transit) and dispatched again.
    pub lost: AtomicU64,
    /// Calls answered from the run's journal or from results passed in.
    pub replayed: AtomicU64,
    /// Calls that had not ended when the run ended (cancelled, or the flow returned
    /// without them): not counted as completed.
    pub cancelled: AtomicU64,
    /// A note for the operator, e.g. "waiting for an agent that can run `x`".
    pub note: Mutex<Option<String>>,
}

impl Default for RunStats {
    fn default() -> Self {
        RunStats {
            started: Instant::now(),
            tasks: AtomicU64::new(0),
            executions: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stale_results: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            note: Mutex::new(None),
        }
    }
}

/// A copy of the counters at one moment, as printed in the final JSON line.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Task calls made by the flow.
    pub tasks: u64,
    /// Attempts that started executing.
    pub executions: u64,
    /// Calls answered from the cache.
    pub cache_hits: u64,
    /// Retries.
    pub retries: u64,
    /// Wall time since the run started, in milliseconds.
    pub wall_ms: u64,
    /// Calls answered from the run's journal (a resume) or from results passed in.
    #[serde(default)]
    pub replayed: u64,
    /// Calls cancelled when the run ended (not counted as completed).
    #[serde(default)]
    pub cancelled: u64,
    /// Calls resolved (success or final failure).
    #[serde(default)]
    pub completed: u64,
}

impl RunStats {
    /// Counters of a run that started at `at_ms` (ms since the Unix epoch): its wall
    /// time counts from then (a resumed run's from its first start).
    pub fn started_at(at_ms: u64) -> Self {
        let now = std::time::SystemTime::now();
        let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(at_ms);
        let ago = now.duration_since(at).unwrap_or_default();
        RunStats {
            started: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
            ..RunStats::default()
        }
    }

    /// Adds one to a counter.
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    /// The counters now.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            tasks: self.tasks.load(Relaxed),
            executions: self.executions.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            retries: self.retries.load(Relaxed),
            wall_ms: self.started.elapsed().as_millis() as u64,
            replayed: self.replayed.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            completed: self.completed.load(Relaxed),
        }
    }

    /// Calls resolved so far.
    pub fn completed(&self) -> u64 {
        self.completed.load(Relaxed)
    }

    /// Sets (or clears) the operator note.
    pub fn set_note(&self, note: Option<String>) {
        if let Ok(mut n) = self.note.lock() {
            *n = note;
        }
    }

    /// The operator note.
    pub fn note(&self) -> Option<String> {
        self.note.lock().ok().and_then(|n| n.clone())
    }
}

impl StatsSnapshot {
    /// A run's view with these counters (no result, error or note yet).
    pub(crate) fn run_info(
        &self,
        flow_run_id: FlowRunId,
        flow: &str,
        status: FlowStatus,
        completed: u64,
    ) -> RunInfo {
        RunInfo {
            flow_run_id,
            flow: flow.to_string(),
            status,
            tasks: self.tasks,
            completed,
            executions: self.executions,
            cache_hits: self.cache_hits,
            retries: self.retries,
            replayed: self.replayed,
            cancelled: self.cancelled,
            wall_ms: self.wall_ms,
            result: None,
            error: None,
            note: None,
            owner: None,
            at_ms: None,
            parent_run_id: None,
        }
    }
}
