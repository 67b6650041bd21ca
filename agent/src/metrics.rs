//! Prometheus metrics of an agent (`agent --metrics ADDR`): its attempts by outcome and
//! their run times, its slots, and NATS reconnects.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, RwLock};

use pinazu_shared::error::{ErrorInfo, FailureKind};

type Labels = Vec<(&'static str, String)>;

/// An agent's metrics.
pub struct AgentMetrics {
    registry: RwLock<Registry>,
    success: Counter,
    failed: Counter,
    cancelled: Counter,
    duration: Histogram,
    running: Gauge,
    slots: Family<Labels, Gauge>,
    total_slots: u32,
    nats: RwLock<Option<Arc<async_nats::Statistics>>>,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl AgentMetrics {
    /// Metrics of an agent with this many slots.
    pub fn new(slots: u32) -> Self {
        let mut registry = Registry::default();
        let attempts = Family::<Labels, Counter>::default();
        let duration = Histogram::new(exponential_buckets(0.0001, 4.0, 14));
        let running = Gauge::default();
        let slots_family = Family::<Labels, Gauge>::default();
        registry.register(
            "pinazu_agent_attempts",
            "Attempts this agent ran to an outcome, by outcome (success, failed, cancelled)",
            attempts.clone(),
        );
        registry.register(
            "pinazu_agent_attempt_duration_seconds",
            "Time attempts ran on this agent",
            duration.clone(),
        );
        registry.register(
            "pinazu_attempts_running",
            "Attempts running on this agent",
            running.clone(),
        );
        registry.register(
            "pinazu_agent_slots",
            "This agent's slots, used or free",
            slots_family.clone(),
        );
        let outcome = |o: &str| {
            attempts
                .get_or_create(&vec![("outcome", o.to_string())])
                .clone()
        };
        AgentMetrics {
            success: outcome("success"),
            failed: outcome("failed"),
            cancelled: outcome("cancelled"),
            registry: RwLock::new(registry),
            duration,
            running,
            slots: slots_family,
            total_slots: slots,
            nats: RwLock::new(None),
        }
    }

    /// An attempt ended after running `elapsed_us`: with a result, failed, or cancelled
    /// (its run ended, or the coordinator stopped it).
    pub fn attempt_ended(&self, outcome: &Result<bytes::Bytes, ErrorInfo>, elapsed_us: u64) {
        match outcome {
            Ok(_) => self.success.inc(),
            Err(e) if e.kind == FailureKind::Cancelled => self.cancelled.inc(),
            Err(_) => self.failed.inc(),
        };
        self.duration.observe(elapsed_us as f64 / 1e6);
    }

    /// Attempts running now.
    pub fn set_running(&self, n: usize) {
        self.running.set(n as i64);
        let used = (n as u32).min(self.total_slots);
        self.slots
            .get_or_create(&vec![("state", "used".into())])
            .set(used as i64);
        self.slots
            .get_or_create(&vec![("state", "free".into())])
            .set((self.total_slots - used) as i64);
    }

    /// The connection whose reconnects are counted.
    pub fn watch_nats(&self, stats: Arc<async_nats::Statistics>) {
        if let Ok(mut n) = self.nats.write() {
            *n = Some(stats);
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.read() {
            let _ = prometheus_client::encoding::text::encode_registry(&mut out, &r);
        }
        if let Some(n) = self.nats.read().ok().and_then(|n| n.clone()) {
            let reconnects = n.connects.load(Relaxed).saturating_sub(1);
            out.push_str("# HELP pinazu_nats_reconnects Times the NATS connection was made again after the first.\n# TYPE pinazu_nats_reconnects counter\n");
            out.push_str(&format!("pinazu_nats_reconnects_total {reconnects}\n"));
        }
        out.push_str("# EOF\n");
        out
    }
}
