//! A circuit breaker in front of any object store: after a few consecutive failures the
//! store is taken out of the path for a while, so a dead S3 does not add a timeout to
//! every task. It logs one warning when an outage starts and one line when it ends, not
//! one per operation.

use bytes::Bytes;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::StoreError;
use crate::store::ObjectStore;
use crate::BoxFuture;

/// Consecutive failures that open the circuit.
const TRIP_AFTER: u32 = 3;
/// First open period; doubled while probes keep failing, up to `MAX_OPEN`.
const FIRST_OPEN: Duration = Duration::from_secs(2);
const MAX_OPEN: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct State {
    failures: u32,
    open_until: Option<Instant>,
    open_for: Duration,
    failed_in_outage: u64,
}

/// Wraps a store with a circuit breaker.
pub struct BreakerStore<S> {
    inner: S,
    state: Mutex<State>,
}

impl<S: ObjectStore> BreakerStore<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        BreakerStore {
            inner,
            state: Mutex::new(State::default()),
        }
    }

    /// Wraps a store that is unreachable already (found so at start-up): it starts out
    /// of the path, and is probed every few seconds like a store that failed.
    pub fn tripped(inner: S) -> Self {
        BreakerStore {
            inner,
            state: Mutex::new(State {
                failures: TRIP_AFTER,
                open_until: Some(Instant::now() + FIRST_OPEN),
                open_for: FIRST_OPEN,
                failed_in_outage: 0,
            }),
        }
    }

    /// Whether the store is out of the path now.
    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .map(|s| s.open_until.is_some_and(|t| Instant::now() < t))
            .unwrap_or(false)
    }

    fn admit(&self, op: &'static str, key: &str) -> Result<(), StoreError> {
        let mut st = self
            .state
            .lock()
            .map_err(|_| unavailable(op, key, "breaker poisoned"))?;
        match st.open_until {
            Some(t) if Instant::now() < t => {
                st.failed_in_outage += 1;
                Err(unavailable(
                    op,
                    key,
                    "the store is unavailable (circuit open); skipped",
                ))
            }
            _ => Ok(()),
        }
    }

    fn record<T>(&self, describe: &str, result: &Result<T, StoreError>) {
        let Ok(mut st) = self.state.lock() else {
            return;
        };
        match result {
            Ok(_) => {
                if st.failures >= TRIP_AFTER || st.open_until.is_some() {
                    tracing::info!(
                        store = describe,
                        failed_operations = st.failed_in_outage,
                        "object store recovered"
                    );
                }
                *st = State::default();
            }
            Err(e) => {
                st.failures += 1;
                st.failed_in_outage += 1;
                if st.failures == 1 {
                    tracing::warn!(store = describe, error = %e, "object store error; cache reads are misses and writes are skipped while it lasts");
                }
                if st.failures >= TRIP_AFTER {
                    let open_for = if st.open_until.is_some() {
                        (st.open_for * 2).min(MAX_OPEN)
                    } else {
                        FIRST_OPEN
                    };
                    if st.open_until.is_none() {
                        tracing::warn!(store = describe, failures = st.failures, "object store unavailable; taking it out of the path (probing every few seconds)");
                    }
                    st.open_for = open_for;
                    st.open_until = Some(Instant::now() + open_for);
                }
            }
        }
    }
}

fn unavailable(op: &'static str, key: &str, reason: &str) -> StoreError {
    StoreError::Io {
        op,
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

impl<S: ObjectStore> ObjectStore for BreakerStore<S> {
    fn unguarded(&self) -> &dyn ObjectStore {
        self.inner.unguarded()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            self.admit("get", key)?;
            let r = self.inner.get(key).await;
            self.record(&self.inner.describe(), &r);
            r
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.admit("put", key)?;
            let r = self.inner.put(key, value).await;
            self.record(&self.inner.describe(), &r);
            r
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            self.admit("delete", prefix)?;
            let r = self.inner.delete_prefix(prefix).await;
            self.record(&self.inner.describe(), &r);
            r
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            self.admit("list", prefix)?;
            let r = self.inner.list(prefix).await;
            self.record(&self.inner.describe(), &r);
            r
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.admit("delete", key)?;
            let r = self.inner.delete(key).await;
            self.record(&self.inner.describe(), &r);
            r
        })
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// A store that fails while `down` is set and counts the calls that reach it.
    struct Flaky {
        down: std::sync::atomic::AtomicBool,
        calls: AtomicU32,
    }

    impl ObjectStore for Flaky {
        fn unguarded(&self) -> &dyn ObjectStore {
            self
        }

        fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
            Box::pin(async move {
                self.calls.fetch_add(1, Ordering::SeqCst);
                if self.down.load(Ordering::SeqCst) {
                    Err(unavailable("get", key, "connection refused"))
                } else {
                    Ok(None)
                }
            })
        }
        fn put<'a>(&'a self, _: &'a str, _: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn delete_prefix<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
            Box::pin(async { Ok(0) })
        }
        fn list<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
            Box::pin(async { Ok(vec![]) })
        }
        fn delete<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
            Box::pin(async { Ok(()) })
        }
        fn describe(&self) -> String {
            "flaky".into()
        }
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_closes_on_recovery() {
        let b = BreakerStore::new(Flaky {
            down: true.into(),
            calls: AtomicU32::new(0),
        });
        for _ in 0..TRIP_AFTER {
            assert!(b.get("k").await.is_err());
        }
        assert!(b.is_open());
        // while open, nothing reaches the dead store
        for _ in 0..100 {
            assert!(b.get("k").await.is_err());
        }
        assert_eq!(b.inner.calls.load(Ordering::SeqCst), TRIP_AFTER);
        // after the open period a probe goes through; the store is back
        b.inner.down.store(false, Ordering::SeqCst);
        b.state.lock().unwrap().open_until = Some(Instant::now());
        assert!(b.get("k").await.is_ok());
        assert!(!b.is_open());
    }
}
