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
    /// Limits on how many attempts run at once, and how fast they start.
    pub limits: TaskLimits,
}

/// A task's limits (`#[task(concurrency = .., rate = .., limit = .., concurrency_key = ..)]`),
/// enforced by the coordinator's scheduler over every agent and run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TaskLimits {
    /// At most this many attempts of the task running at once (per key when keyed).
    pub concurrency: Option<u32>,
    /// At most this many attempt starts per period (per key when keyed).
    pub rate: Option<RateSpec>,
    /// A named limit shared with other tasks, sized by the operator.
    pub limit: Option<&'static str>,
    /// The argument (or field path) whose value splits the limits, as written.
    pub key: Option<&'static str>,
}

impl TaskLimits {
    /// No limits.
    pub const NONE: TaskLimits = TaskLimits {
        concurrency: None,
        rate: None,
        limit: None,
        key: None,
    };

    /// Whether the task has any limit.
    pub fn any(&self) -> bool {
        self.concurrency.is_some() || self.rate.is_some() || self.limit.is_some()
    }
}

/// A rate: `count` starts per `per_ms` milliseconds, at most `burst` at once after a
/// quiet period (a token bucket of `burst` tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSpec {
    /// Starts per period (> 0).
    pub count: u32,
    /// The period in milliseconds (1,000, 60,000 or 3,600,000).
    pub per_ms: u64,
    /// Tokens the bucket holds (>= 1).
    pub burst: u32,
}

impl RateSpec {
    /// Parses `100/s`, `30/min`, `1000/h` (also `/sec`, `/m`, `/hour`), with an optional
    /// burst (default 1). Zero and unknown periods are errors that say what is expected.
    pub fn parse(text: &str, burst: Option<u32>) -> Result<RateSpec, String> {
        let bad = || {
            format!("invalid rate `{text}`: expected COUNT/PERIOD with a count above 0 and a period of s, min or h (e.g. 100/s)")
        };
        let (count, per) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let per_ms = match per.trim() {
            "s" | "sec" | "second" => 1_000,
            "m" | "min" | "minute" => 60_000,
            "h" | "hour" => 3_600_000,
            _ => return Err(bad()),
        };
        if count == 0 {
            return Err(bad());
        }
        let burst = burst.unwrap_or(1);
        if burst == 0 {
            return Err(format!(
                "invalid burst 0 for rate `{text}`: a burst is at least 1"
            ));
        }
        Ok(RateSpec {
            count,
            per_ms,
            burst,
        })
    }

    /// Tokens per second.
    pub fn per_second(&self) -> f64 {
        self.count as f64 * 1000.0 / self.per_ms as f64
    }
}

impl std::fmt::Display for RateSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let per = match self.per_ms {
            1_000 => "s".to_string(),
            60_000 => "min".to_string(),
            3_600_000 => "h".to_string(),
            ms => format!("{ms}ms"),
        };
        write!(f, "{}/{per}", self.count)?;
        if self.burst > 1 {
            write!(f, " (burst {})", self.burst)?;
        }
        Ok(())
    }
}

/// A named limit's size: a concurrency, a rate, or both (`20`, `100/s`, `20,100/s`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedLimit {
    /// At most this many attempts at once.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// At most this many starts per period.
    #[serde(default)]
    pub rate: Option<RateSpec>,
}

impl NamedLimit {
    /// Parses `20`, `100/s`, `20,100/s` (`burst=N` may follow: `100/s,burst=10`).
    pub fn parse(text: &str) -> Result<NamedLimit, String> {
        let mut limit = NamedLimit::default();
        let mut rate = None;
        let mut burst = None;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some(b) = part.strip_prefix("burst=") {
                burst = Some(b.trim().parse::<u32>().map_err(|_| {
                    format!("invalid burst `{b}` in limit `{text}`: a whole number above 0")
                })?);
            } else if part.contains('/') {
                rate = Some(part);
            } else {
                let n: u32 = part.parse().map_err(|_| {
                    format!("invalid limit `{text}`: expected a concurrency (e.g. 20), a rate (e.g. 100/s) or both (20,100/s)")
                })?;
                if n == 0 {
                    return Err(format!("invalid limit `{text}`: a concurrency of 0 would never run anything; use at least 1"));
                }
                limit.concurrency = Some(n);
            }
        }
        if let Some(r) = rate {
            limit.rate = Some(RateSpec::parse(r, burst)?);
        } else if burst.is_some() {
            return Err(format!(
                "invalid limit `{text}`: burst needs a rate (e.g. 100/s,burst=10)"
            ));
        }
        if limit.concurrency.is_none() && limit.rate.is_none() {
            return Err(format!("invalid limit `{text}`: expected a concurrency (e.g. 20), a rate (e.g. 100/s) or both (20,100/s)"));
        }
        Ok(limit)
    }
}

impl NamedLimit {
    /// Whether the size can be enforced: a concurrency of at least 1, a rate of at
    /// least 1 per period of at least 1 ms with a burst of at least 1, one of them at
    /// least (sizes that come over the API or the stream are checked again here).
    pub fn check(&self) -> Result<(), String> {
        if self.concurrency == Some(0) {
            return Err("a concurrency of 0 would never run anything; use at least 1".into());
        }
        if let Some(r) = self.rate {
            if r.count == 0 || r.per_ms == 0 || r.burst == 0 {
                return Err(format!(
                    "invalid rate {}/{} ms (burst {}): count, period and burst are at least 1",
                    r.count, r.per_ms, r.burst
                ));
            }
        }
        if self.concurrency.is_none() && self.rate.is_none() {
            return Err("a limit needs a concurrency, a rate or both".into());
        }
        Ok(())
    }
}

impl std::fmt::Display for NamedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.concurrency, self.rate) {
            (Some(c), Some(r)) => write!(f, "{c} at once, {r}"),
            (Some(c), None) => write!(f, "{c} at once"),
            (None, Some(r)) => write!(f, "{r}"),
            (None, None) => f.write_str("unlimited"),
        }
    }
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
        limits: TaskLimits::NONE,
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
    fn rates_and_named_limits_parse_or_say_why() {
        let r = RateSpec::parse("100/s", None).unwrap();
        assert_eq!((r.count, r.per_ms, r.burst), (100, 1000, 1));
        assert_eq!(RateSpec::parse("3/min", Some(2)).unwrap().per_ms, 60_000);
        assert_eq!(RateSpec::parse("7/h", None).unwrap().per_ms, 3_600_000);
        for bad in ["0/s", "10", "10/d", "x/s", "-1/s"] {
            assert!(
                RateSpec::parse(bad, None)
                    .unwrap_err()
                    .contains("invalid rate"),
                "{bad}"
            );
        }
        assert!(RateSpec::parse("1/s", Some(0)).is_err());
        let n = NamedLimit::parse("20,100/s,burst=10").unwrap();
        assert_eq!(n.concurrency, Some(20));
        assert_eq!(n.rate.unwrap().burst, 10);
        assert_eq!(NamedLimit::parse("5").unwrap().rate, None);
        for bad in ["0", "", "abc", "burst=3", "0/s"] {
            assert!(NamedLimit::parse(bad).is_err(), "{bad}");
        }
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
