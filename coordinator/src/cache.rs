//! The cache actor: the single front door to the object store for cached results. Reads
//! and writes run as spawned futures (bounded in number) so the mailbox never waits on
//! I/O; a failed read or a corrupt object is a miss with a warning, a failed write is a
//! warning, and neither fails a task.

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Semaphore};

use pinazu_shared::cache::CacheResult;
use pinazu_shared::error::StoreError;
use pinazu_shared::store::ObjectStore;

/// Called with the outcome of a lookup (`None` = miss).
pub type LookupReply = Box<dyn FnOnce(Option<CacheResult>) + Send>;

/// Messages to the cache actor.
pub enum CacheMsg {
    /// Look up `key`; entries older than `expire` are misses.
    Get {
        /// Object key.
        key: String,
        /// Maximum age.
        expire: Option<Duration>,
        /// Receives the outcome.
        reply: LookupReply,
    },
    /// Store a record at `key`.
    Put {
        /// Object key.
        key: String,
        /// The record.
        record: CacheResult,
        /// The write's span (feature `otel`): it ends when the write does.
        #[cfg(feature = "otel")]
        span: tracing::Span,
    },
    /// Remove every object under `prefix`.
    Clear {
        /// Key prefix.
        prefix: String,
        /// Receives the count removed, or the error.
        reply: RpcReplyPort<Result<u64, String>>,
    },
    /// Reply once every read and write accepted before it has finished.
    Flush(RpcReplyPort<()>),
}

/// Counters of the cache, for summaries and tests.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Lookups that found a usable entry.
    pub hits: AtomicU64,
    /// Lookups that found nothing usable.
    pub misses: AtomicU64,
    /// Objects that could not be parsed.
    pub corrupt: AtomicU64,
    /// Store errors (reads and writes).
    pub errors: AtomicU64,
    /// Records written.
    pub writes: AtomicU64,
}

/// The cache actor.
pub struct CacheActor;

/// Its state.
pub struct CacheState {
    store: Arc<dyn ObjectStore>,
    permits: Arc<Semaphore>,
    counters: Arc<CacheCounters>,
    /// Operations accepted and not yet finished; counted when accepted, so a flush
    /// waits for every operation that came before it.
    pending: Arc<watch::Sender<usize>>,
}

/// Counts an accepted operation until dropped.
struct PendingGuard(Arc<watch::Sender<usize>>);

impl PendingGuard {
    fn new(pending: &Arc<watch::Sender<usize>>) -> Self {
        pending.send_modify(|n| *n += 1);
        PendingGuard(pending.clone())
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// How many store operations run at once.
const MAX_IN_FLIGHT: usize = 64;

/// Store errors are counted and logged at debug: the store's circuit breaker
/// (`BreakerStore`) warns once per outage, not once per task.
fn warn_store(op: &str, key: &str, e: &StoreError, counters: &CacheCounters) {
    counters.errors.fetch_add(1, Relaxed);
    tracing::debug!(op, key, error = %e, "cache store error; treating as a miss");
}

async fn lookup(
    store: &dyn ObjectStore,
    key: &str,
    expire: Option<Duration>,
    counters: &CacheCounters,
) -> Option<CacheResult> {
    let bytes: Bytes = match store.get(key).await {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => {
            warn_store("get", key, &e, counters);
            return None;
        }
    };
    let record: CacheResult = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            counters.corrupt.fetch_add(1, Relaxed);
            tracing::warn!(key, error = %e, "corrupt cache object; treating as a miss (it will be overwritten)");
            return None;
        }
    };
    if let Some(max) = expire {
        match record.age(SystemTime::now()) {
            Some(age) if age <= max => {}
            _ => {
                tracing::debug!(key, "cache entry expired");
                return None;
            }
        }
    }
    Some(record)
}

impl Actor for CacheActor {
    type Msg = CacheMsg;
    type State = CacheState;
    type Arguments = (Arc<dyn ObjectStore>, Arc<CacheCounters>);

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        (store, counters): Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        Ok(CacheState {
            store,
            permits: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            counters,
            pending: Arc::new(watch::channel(0).0),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let store = state.store.clone();
        let permits = state.permits.clone();
        let counters = state.counters.clone();
        let guard = PendingGuard::new(&state.pending);
        match msg {
            CacheMsg::Get { key, expire, reply } => {
                tokio::spawn(async move {
                    let _guard = guard;
                    let _permit = permits.acquire_owned().await;
                    let found = lookup(&*store, &key, expire, &counters).await;
                    let counter = if found.is_some() {
                        &counters.hits
                    } else {
                        &counters.misses
                    };
                    counter.fetch_add(1, Relaxed);
                    reply(found);
                });
            }
            CacheMsg::Put {
                key,
                record,
                #[cfg(feature = "otel")]
                span,
            } => {
                tokio::spawn(async move {
                    let _guard = guard;
                    #[cfg(feature = "otel")]
                    let _span = span;
                    let _permit = permits.acquire_owned().await;
                    let json = match serde_json::to_vec(&record) {
                        Ok(j) => j,
                        Err(e) => {
                            tracing::warn!(key, error = %e, "cache record could not be encoded; not cached");
                            return;
                        }
                    };
                    match store.put(&key, Bytes::from(json)).await {
                        Ok(()) => {
                            counters.writes.fetch_add(1, Relaxed);
                        }
                        Err(e) => warn_store("put", &key, &e, &counters),
                    }
                });
            }
            CacheMsg::Clear { prefix, reply } => {
                tokio::spawn(async move {
                    let _guard = guard;
                    let r = store
                        .delete_prefix(&prefix)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = reply.send(r);
                });
            }
            CacheMsg::Flush(reply) => {
                drop(guard);
                let mut idle = state.pending.subscribe();
                tokio::spawn(async move {
                    let _ = idle.wait_for(|n| *n == 0).await;
                    let _ = reply.send(());
                });
            }
        }
        Ok(())
    }
}
