//! The object store behind the cache (and, later, large payloads): a small trait, and the
//! local-directory store that is the default.

use bytes::Bytes;
use std::path::{Path, PathBuf};

use crate::error::StoreError;
use crate::BoxFuture;

/// A flat key -> bytes store. Keys are `/`-separated paths.
pub trait ObjectStore: Send + Sync + 'static {
    /// The object, or `None` when absent.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>>;
    /// Stores the object, replacing any previous one atomically.
    fn put<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Removes every object under `prefix`; returns how many.
    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>>;
    /// Every key under `prefix`.
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>>;
    /// Removes one object (absent is fine).
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>>;
    /// A short description for logs (`dir:/path`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
    /// The store itself, past any circuit breaker: payloads that must be written or
    /// read (an attempt's large arguments and results) retry on their own and must not
    /// be skipped because the cache gave up on the store for a while.
    fn unguarded(&self) -> &dyn ObjectStore;
}

/// Delays between the attempts of [`put_retrying`]: about 8 s in all, longer than the
/// circuit breaker's first open period, so a brief outage does not fail an attempt.
pub const PUT_RETRY_DELAYS: &[std::time::Duration] = &[
    std::time::Duration::from_millis(250),
    std::time::Duration::from_millis(500),
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(2),
    std::time::Duration::from_secs(4),
];

/// Shorter delays (under 3 s in all), for a write the scheduler waits on without
/// seeing it: the coordinator's store of an attempt's large arguments must end before
/// the attempt counts as lost, or the attempt would be sent twice.
pub const PUT_RETRY_DELAYS_SHORT: &[std::time::Duration] = &[
    std::time::Duration::from_millis(250),
    std::time::Duration::from_millis(500),
    std::time::Duration::from_millis(1000),
    std::time::Duration::from_millis(1000),
];

/// `put`, tried again after each of `delays` while the store fails: a payload that
/// must be written (an attempt's large argument or result) survives a transient outage.
pub async fn put_retrying(
    store: &dyn ObjectStore,
    key: &str,
    value: Bytes,
    delays: &[std::time::Duration],
) -> Result<(), StoreError> {
    let mut last = None;
    for (i, delay) in std::iter::once(None)
        .chain(delays.iter().map(Some))
        .enumerate()
    {
        if let Some(d) = delay {
            tokio::time::sleep(*d).await;
        }
        match store.unguarded().put(key, value.clone()).await {
            Ok(()) => {
                if i > 0 {
                    tracing::info!(key, attempts = i + 1, "payload stored after retrying");
                }
                return Ok(());
            }
            Err(e) => {
                if i == 0 {
                    tracing::warn!(key, error = %e, "payload could not be stored; retrying for a few seconds");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| StoreError::InvalidKey(key.to_string())))
}

/// `get`, tried again after each of `delays` while the store fails (not when the object
/// is missing: that is an answer): a payload written once is read despite a transient
/// outage.
pub async fn get_retrying(
    store: &dyn ObjectStore,
    key: &str,
    delays: &[std::time::Duration],
) -> Result<Option<Bytes>, StoreError> {
    let mut last = None;
    for (i, delay) in std::iter::once(None)
        .chain(delays.iter().map(Some))
        .enumerate()
    {
        if let Some(d) = delay {
            tokio::time::sleep(*d).await;
        }
        match store.unguarded().get(key).await {
            Ok(found) => {
                if i > 0 {
                    tracing::info!(key, attempts = i + 1, "payload read after retrying");
                }
                return Ok(found);
            }
            Err(e) => {
                if i == 0 {
                    tracing::warn!(key, error = %e, "payload could not be read; retrying for a few seconds");
                }
                last = Some(e);
            }
        }
    }
    Err(last.unwrap_or_else(|| StoreError::InvalidKey(key.to_string())))
}

/// Objects as files under a root directory.
#[derive(Clone, Debug)]
pub struct LocalDirStore {
    root: PathBuf,
}

impl LocalDirStore {
    /// A store rooted at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        LocalDirStore { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let ok = !key.is_empty()
            && !key.starts_with('/')
            && key
                .split('/')
                .all(|seg| !seg.is_empty() && seg != "." && seg != ".." && !seg.contains('\\'));
        if !ok {
            return Err(StoreError::InvalidKey(key.to_string()));
        }
        Ok(self.root.join(key))
    }
}

fn io_err(op: &'static str, key: &str, e: std::io::Error) -> StoreError {
    StoreError::Io {
        op,
        key: key.to_string(),
        reason: e.to_string(),
    }
}

impl ObjectStore for LocalDirStore {
    fn unguarded(&self) -> &dyn ObjectStore {
        self
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            match tokio::fs::read(&path).await {
                Ok(b) => Ok(Some(Bytes::from(b))),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_err("get", key, e)),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            let path = self.path(key)?;
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir)
                    .await
                    .map_err(|e| io_err("put", key, e))?;
            }
            // write then rename, so a reader never sees half an object; one blocking job
            // that owns the bytes (`tokio::fs::write` would copy them first)
            let tmp = path.with_extension(format!("tmp.{}", fastrand_suffix()));
            tokio::task::spawn_blocking(move || {
                std::fs::write(&tmp, &value)?;
                std::fs::rename(&tmp, &path)
            })
            .await
            .map_err(|e| io_err("put", key, std::io::Error::other(e)))?
            .map_err(|e| io_err("put", key, e))
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let prefix = prefix.trim_end_matches('/');
            let path = if prefix.is_empty() {
                self.root.clone()
            } else {
                self.path(prefix)?
            };
            let count = count_files(&path).await;
            match tokio::fs::remove_dir_all(&path).await {
                Ok(()) => Ok(count),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
                Err(e) => Err(io_err("delete", prefix, e)),
            }
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut keys = Vec::new();
            let mut stack = vec![self.root.clone()];
            while let Some(d) = stack.pop() {
                let mut rd = match tokio::fs::read_dir(&d).await {
                    Ok(rd) => rd,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_err("list", prefix, e)),
                };
                while let Ok(Some(entry)) = rd.next_entry().await {
                    let path = entry.path();
                    match entry.file_type().await {
                        Ok(t) if t.is_dir() => stack.push(path),
                        Ok(_) => {
                            let Ok(rel) = path.strip_prefix(&self.root) else {
                                continue;
                            };
                            let key = rel.to_string_lossy().replace('\\', "/");
                            if key.starts_with(prefix) && !key.contains(".tmp.") {
                                keys.push(key);
                            }
                        }
                        Err(_) => {}
                    }
                }
            }
            keys.sort();
            Ok(keys)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            match tokio::fs::remove_file(self.path(key)?).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_err("delete", key, e)),
            }
        })
    }

    fn describe(&self) -> String {
        // absolute: two processes started in different directories compare it
        let root = std::path::absolute(&self.root).unwrap_or_else(|_| self.root.clone());
        format!("dir:{}", root.display())
    }
}

fn fastrand_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

async fn count_files(dir: &Path) -> u64 {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(mut rd) = tokio::fs::read_dir(&d).await else {
            continue;
        };
        while let Ok(Some(entry)) = rd.next_entry().await {
            match entry.file_type().await {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(_) => count += 1,
                Err(_) => {}
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_keys_that_escape_the_root() {
        let s = LocalDirStore::new("/tmp/x");
        for bad in ["", "/abs", "a/../b", "a//b", "..", "a/./b"] {
            assert!(s.path(bad).is_err(), "{bad}");
        }
        assert!(s.path("result_cache/flow-1/tasks/t/abc.json").is_ok());
    }
}
