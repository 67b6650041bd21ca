//! Per-task options: retry policy, timeout and cache policy.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How a task's result is cached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CachePolicy {
    /// No caching (the default).
    None,
    /// The original per-run layout: a result is reused within the same flow run id only.
    Run,
    /// Reused across runs, keyed by task name, task version and the canonical inputs.
    Inputs,
}

impl CachePolicy {
    /// Parses `none`, `run` or `inputs`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" | "off" => Some(CachePolicy::None),
            "run" => Some(CachePolicy::Run),
            "inputs" => Some(CachePolicy::Inputs),
            _ => None,
        }
    }

    /// The lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            CachePolicy::None => "none",
            CachePolicy::Run => "run",
            CachePolicy::Inputs => "inputs",
        }
    }
}

/// Retry policy of a task: `retries` more attempts after the first, waiting
/// `delay * backoff^(n-1)` (capped at `max_delay`) before retry `n`, +/- `jitter` of that.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Retries after the first attempt (0 = run once).
    pub retries: u32,
    /// Delay before the first retry.
    pub delay: Duration,
    /// Factor applied to the delay for each further retry (1.0 = constant).
    pub backoff: f64,
    /// Upper bound of any delay.
    pub max_delay: Duration,
    /// Random spread as a fraction of the delay (0.1 = +/-10%).
    pub jitter: f64,
}

impl RetryPolicy {
    /// The default: no retries; when retries are set, 100 ms doubling up to 60 s, +/-10%.
    pub const DEFAULT: RetryPolicy = RetryPolicy {
        retries: 0,
        delay: Duration::from_millis(100),
        backoff: 2.0,
        max_delay: Duration::from_secs(60),
        jitter: 0.1,
    };

    /// The delay before retry number `retry` (1 = first retry), without jitter.
    pub fn base_delay(&self, retry: u32) -> Duration {
        let factor = self.backoff.max(0.0).powi(retry.saturating_sub(1) as i32);
        let secs = (self.delay.as_secs_f64() * factor).min(self.max_delay.as_secs_f64());
        if secs.is_finite() && secs >= 0.0 {
            Duration::from_secs_f64(secs)
        } else {
            self.max_delay
        }
    }

    /// The delay before retry `retry`, with jitter drawn from `unit` (a number in [0, 1)).
    pub fn delay_with_jitter(&self, retry: u32, unit: f64) -> Duration {
        let base = self.base_delay(retry).as_secs_f64();
        let spread = base * self.jitter.clamp(0.0, 1.0) * (unit * 2.0 - 1.0);
        Duration::from_secs_f64((base + spread).max(0.0))
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Everything `#[task(...)]` can set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskOptions {
    /// Retry policy.
    pub retry: RetryPolicy,
    /// An attempt running longer is stopped and counts as a failure.
    pub timeout: Option<Duration>,
    /// Cache policy.
    pub cache: CachePolicy,
    /// Cached entries older than this are misses.
    pub expire: Option<Duration>,
    /// Always execute and overwrite the cached entry.
    pub refresh: bool,
    /// Labels an agent must have to run the task.
    pub labels: &'static [(&'static str, &'static str)],
}

impl TaskOptions {
    /// The defaults: no retries, no timeout, no cache.
    pub const DEFAULT: TaskOptions = TaskOptions {
        retry: RetryPolicy::DEFAULT,
        timeout: None,
        cache: CachePolicy::None,
        expire: None,
        refresh: false,
        labels: &[],
    };
}

impl Default for TaskOptions {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            retries: 5,
            delay: Duration::from_millis(100),
            backoff: 2.0,
            max_delay: Duration::from_millis(300),
            jitter: 0.0,
        };
        assert_eq!(p.base_delay(1), Duration::from_millis(100));
        assert_eq!(p.base_delay(2), Duration::from_millis(200));
        assert_eq!(p.base_delay(3), Duration::from_millis(300));
        assert_eq!(p.base_delay(9), Duration::from_millis(300));
    }

    #[test]
    fn jitter_stays_within_its_fraction() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..RetryPolicy::DEFAULT
        };
        for unit in [0.0, 0.25, 0.5, 0.999] {
            let d = p.delay_with_jitter(1, unit).as_secs_f64();
            assert!((0.05..=0.15).contains(&d), "{d}");
        }
    }
}
