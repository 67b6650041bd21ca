//! Prometheus metrics of a coordinator (`/metrics`): counters and histograms the flow
//! runners feed on the transitions they make anyway (through per-task handles, so a
//! call costs a few atomic adds), and values read at scrape time (agents' slots, the
//! cache's counters, the journal's backlog, NATS reconnects).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use pinazu_shared::api::AgentSummary;

use crate::cache::CacheCounters;

/// Label sets: a few `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

fn seconds_buckets() -> Histogram {
    // 100 µs .. ~1.6 h
    Histogram::new(exponential_buckets(0.0001, 4.0, 14))
}

/// The coordinator's metrics.
pub struct Metrics {
    registry: RwLock<Registry>,
    runs: Family<Labels, Counter>,
    tasks: Family<Labels, Counter>,
    queue_wait: Family<Labels, Histogram, fn() -> Histogram>,
    duration: Family<Labels, Histogram, fn() -> Histogram>,
    attempts_running: Gauge,
    agent_slots: Family<Labels, Gauge>,
    agents: Gauge,
    journal_backlog: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// One task's metrics, looked up once per task and run.
#[derive(Clone)]
pub struct TaskMetrics {
    /// Calls that ended with a result an attempt returned.
    pub success: Counter,
    /// Calls that failed for good.
    pub failed: Counter,
    /// Calls answered from the cache.
    pub cache_hit: Counter,
    /// Calls answered from the journal or a result passed in.
    pub replayed: Counter,
    /// Calls cancelled by the run's end.
    pub cancelled: Counter,
    /// Attempts' waits from dispatch to start.
    pub queue_wait: Histogram,
    /// Attempts' run times.
    pub duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Empty metrics, registered.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let runs = Family::<Labels, Counter>::default();
        let tasks = Family::<Labels, Counter>::default();
        let queue_wait =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(seconds_buckets);
        let duration =
            Family::<Labels, Histogram, fn() -> Histogram>::new_with_constructor(seconds_buckets);
        let attempts_running = Gauge::default();
        let agent_slots = Family::<Labels, Gauge>::default();
        let agents = Gauge::default();
        let journal_backlog = Gauge::default();
        registry.register(
            "pinazu_runs",
            "Flow runs that ended, by flow and status",
            runs.clone(),
        );
        registry.register(
            "pinazu_tasks",
            "Task calls that ended, by task and outcome (success, failed, cache_hit, replayed, cancelled)",
            tasks.clone(),
        );
        registry.register(
            "pinazu_task_queue_wait_seconds",
            "Time from an attempt's dispatch to its start on an agent",
            queue_wait.clone(),
        );
        registry.register(
            "pinazu_task_duration_seconds",
            "Time an attempt ran on its agent",
            duration.clone(),
        );
        registry.register(
            "pinazu_attempts_running",
            "Attempts running on the live agents",
            attempts_running.clone(),
        );
        registry.register(
            "pinazu_agent_slots",
            "Slots of the live agents, used or free",
            agent_slots.clone(),
        );
        registry.register("pinazu_agents", "Live agents", agents.clone());
        registry.register(
            "pinazu_journal_backlog",
            "Journal entries not yet durable",
            journal_backlog.clone(),
        );
        Metrics {
            registry: RwLock::new(registry),
            runs,
            tasks,
            queue_wait,
            duration,
            attempts_running,
            agent_slots,
            agents,
            journal_backlog,
        }
    }

    /// A run ended.
    pub fn run_ended(&self, flow: &str, status: &str) {
        self.runs
            .get_or_create(&vec![
                ("flow", flow.to_string()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// One task's handles.
    pub fn task(&self, task: &str) -> TaskMetrics {
        let outcome = |o: &str| {
            self.tasks
                .get_or_create(&vec![
                    ("task", task.to_string()),
                    ("outcome", o.to_string()),
                ])
                .clone()
        };
        let by_task = vec![("task", task.to_string())];
        TaskMetrics {
            success: outcome("success"),
            failed: outcome("failed"),
            cache_hit: outcome("cache_hit"),
            replayed: outcome("replayed"),
            cancelled: outcome("cancelled"),
            queue_wait: self.queue_wait.get_or_create(&by_task).clone(),
            duration: self.duration.get_or_create(&by_task).clone(),
        }
    }

    /// Adds values read at scrape time by this collector.
    pub fn register_collector(&self, c: impl Collector) {
        if let Ok(mut r) = self.registry.write() {
            r.register_collector(Box::new(c));
        }
    }

    /// The metrics in Prometheus' text format, with the agents' slots and the
    /// journal's backlog as they are now.
    pub fn render(&self, agents: &[AgentSummary], journal_backlog: u64) -> String {
        let (slots, running) = agents.iter().fold((0u64, 0u64), |(s, r), a| {
            (s + a.slots as u64, r + a.running.min(a.slots) as u64)
        });
        self.attempts_running
            .set(agents.iter().map(|a| a.running as i64).sum());
        self.agent_slots
            .get_or_create(&vec![("state", "used".into())])
            .set(running as i64);
        self.agent_slots
            .get_or_create(&vec![("state", "free".into())])
            .set(slots.saturating_sub(running) as i64);
        self.agents.set(agents.len() as i64);
        self.journal_backlog.set(journal_backlog as i64);
        let mut out = String::new();
        if let Ok(r) = self.registry.read() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

/// The cache's counters as `pinazu_cache_requests_total{result}`.
#[derive(Debug)]
pub struct CacheCollector(pub Arc<CacheCounters>);

impl Collector for CacheCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = &self.0;
        let counter = ConstCounter::new(0u64);
        let mut family = encoder.encode_descriptor(
            "pinazu_cache_requests",
            "Result cache reads by result (hit, miss, corrupt), writes and store errors",
            None,
            counter.metric_type(),
        )?;
        for (result, n) in [
            ("hit", &c.hits),
            ("miss", &c.misses),
            ("corrupt", &c.corrupt),
            ("write", &c.writes),
            ("error", &c.errors),
        ] {
            let labels = [("result", result)];
            let m = family.encode_family(&labels)?;
            ConstCounter::new(n.load(Relaxed)).encode(m)?;
        }
        Ok(())
    }
}

/// A NATS connection's reconnects as `pinazu_nats_reconnects_total`.
#[derive(Debug)]
pub struct NatsCollector(pub Arc<async_nats::Statistics>);

impl Collector for NatsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = ConstCounter::new(self.0.connects.load(Relaxed).saturating_sub(1));
        let m = encoder.encode_descriptor(
            "pinazu_nats_reconnects",
            "Times the NATS connection was made again after the first",
            None,
            c.metric_type(),
        )?;
        c.encode(m)
    }
}
