//! Choosing and opening the object store: a local directory (the default), or S3 / any
//! S3-compatible server, selected by `--store s3://bucket/prefix` (`PINAZU_STORE`) or, as
//! Pinazu Core does it, by `ENABLE_S3_CACHING=true` with `CACHE_BUCKET`. Every store is
//! wrapped in a circuit breaker.

use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    retry::RetryConfig, BehaviorVersion, Credentials, Region, RequestChecksumCalculation,
    ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pinazu_shared::breaker::BreakerStore;
use pinazu_shared::error::{ConfigError, StoreError};
use pinazu_shared::store::{LocalDirStore, ObjectStore};
use pinazu_shared::BoxFuture;

use crate::runtime::env_flag;

/// Which store to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// Files under a directory.
    Local(PathBuf),
    /// An S3 bucket, with an optional key prefix.
    S3 {
        /// The bucket.
        bucket: String,
        /// Prepended to every key (no leading or trailing `/`).
        prefix: String,
    },
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Local(p) => write!(f, "dir:{}", p.display()),
            StoreSpec::S3 { bucket, prefix } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            StoreSpec::S3 { bucket, prefix } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

/// The default bucket of the original library.
pub const DEFAULT_BUCKET: &str = "flow-cache-bucket";

impl StoreSpec {
    /// Parses `s3://bucket[/prefix]`, `file:///path` or a plain path.
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let url = url.trim();
        let invalid = |reason: &str| ConfigError::Invalid {
            name: "--store / PINAZU_STORE".into(),
            value: url.into(),
            reason: reason.into(),
        };
        // a scheme is `letters:` at the start; a mistyped one must not become a
        // directory named after it (`S3://b`, `s3:/b`, `ftp://h/p`)
        let scheme = url
            .split_once(':')
            .map(|(s, _)| s)
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric()));
        match scheme.map(str::to_ascii_lowercase).as_deref() {
            Some("s3") => {
                let Some(rest) = url.get(3..).and_then(|r| r.strip_prefix("//")) else {
                    return Err(invalid("expected s3://bucket/prefix (two slashes)"));
                };
                let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
                if bucket.is_empty() {
                    return Err(invalid("expected s3://bucket/prefix"));
                }
                Ok(StoreSpec::S3 {
                    bucket: bucket.to_string(),
                    prefix: prefix.trim_matches('/').to_string(),
                })
            }
            Some("file") => match url.get(5..).and_then(|r| r.strip_prefix("//")) {
                Some(path) if !path.is_empty() => Ok(StoreSpec::Local(PathBuf::from(path))),
                _ => Err(invalid("expected file:///path")),
            },
            Some(other) if other.len() > 1 => Err(invalid(&format!(
                "unknown scheme `{other}:`; expected s3://bucket/prefix, file:///path or a directory"
            ))),
            // no scheme (or a drive letter): a directory
            _ if url.is_empty() => Err(invalid("expected s3://bucket/prefix or a directory")),
            _ => Ok(StoreSpec::Local(PathBuf::from(url))),
        }
    }

    /// `--store` if given; else S3 when `ENABLE_S3_CACHING=true` (bucket `CACHE_BUCKET`,
    /// default `flow-cache-bucket`); else the local directory.
    pub fn choose(store: Option<&str>, cache_dir: &std::path::Path) -> Result<Self, ConfigError> {
        if let Some(url) = store.filter(|s| !s.trim().is_empty()) {
            return Self::parse(url);
        }
        if env_flag("ENABLE_S3_CACHING")? {
            let bucket = std::env::var("CACHE_BUCKET")
                .ok()
                .filter(|b| !b.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_BUCKET.to_string());
            return Ok(StoreSpec::S3 {
                bucket: bucket.trim().to_string(),
                prefix: String::new(),
            });
        }
        Ok(StoreSpec::Local(cache_dir.to_path_buf()))
    }

    /// Opens the store (for S3: checks the bucket is reachable with the credentials of
    /// the environment, so a misconfiguration is one clear error at start-up).
    pub async fn open(&self) -> Result<Arc<dyn ObjectStore>, ConfigError> {
        self.open_with(&S3Settings::from_env()?).await
    }

    /// Opens the store with explicit S3 settings.
    pub async fn open_with(&self, s3: &S3Settings) -> Result<Arc<dyn ObjectStore>, ConfigError> {
        Ok(match self {
            StoreSpec::Local(dir) => {
                // a directory that cannot be written is a start-up error, not a run of
                // warnings
                // a name of its own: processes sharing the directory probe it at once
                let probe = dir.join(format!(
                    ".pinazu-write-probe-{}-{}",
                    std::process::id(),
                    uuid::Uuid::new_v4().simple()
                ));
                std::fs::create_dir_all(dir)
                    .and_then(|_| std::fs::write(&probe, b"ok"))
                    .and_then(|_| std::fs::remove_file(&probe))
                    .map_err(|e| ConfigError::Store {
                        store: self.to_string(),
                        reason: format!(
                            "cannot write to {}: {e} (set --cache-dir / PINAZU_CACHE_DIR or --store to a writable directory)",
                            dir.display()
                        ),
                    })?;
                Arc::new(BreakerStore::new(LocalDirStore::new(dir.clone())))
            }
            StoreSpec::S3 { bucket, prefix } => match S3Store::connect(bucket, prefix, s3).await? {
                (store, Reachable::Yes) => Arc::new(BreakerStore::new(store)),
                // the cache is an optimisation (as in the original library): run without
                // it and probe until the server answers
                (store, Reachable::No(why)) => {
                    tracing::warn!(store = %self, "{why}; running without the cache until it answers (probing every few seconds)");
                    Arc::new(BreakerStore::tripped(store))
                }
            },
        })
    }
}

/// Whether the S3 endpoint answered at start-up.
#[derive(Debug)]
pub enum Reachable {
    /// It answered, and the bucket is there.
    Yes,
    /// It did not answer (why).
    No(String),
}

/// Objects in an S3 bucket (AWS or any S3-compatible server).
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    prefix: String,
    endpoint: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

/// How to reach S3.
#[derive(Clone, Debug, Default)]
pub struct S3Settings {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
    /// `AWS_DEFAULT_REGION` / `AWS_REGION` (default `us-east-1`).
    pub region: Option<String>,
    /// `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, for S3-compatible servers.
    pub endpoint: Option<String>,
    /// `AWS_S3_USE_PATH_STYLE` (default: path style when an endpoint is set).
    pub path_style: Option<bool>,
}

impl S3Settings {
    /// The standard AWS variables, plus `AWS_S3_USE_PATH_STYLE` as Pinazu Core sets it.
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(S3Settings {
            access_key: env("AWS_ACCESS_KEY_ID"),
            secret_key: env("AWS_SECRET_ACCESS_KEY"),
            session_token: env("AWS_SESSION_TOKEN"),
            region: env("AWS_DEFAULT_REGION").or_else(|| env("AWS_REGION")),
            endpoint: env("AWS_ENDPOINT_URL_S3").or_else(|| env("AWS_ENDPOINT_URL")),
            path_style: match env("AWS_S3_USE_PATH_STYLE") {
                Some(_) => Some(env_flag("AWS_S3_USE_PATH_STYLE")?),
                None => None,
            },
        })
    }
}

impl S3Store {
    /// Connects, then checks the bucket: refused credentials or a missing bucket are an
    /// error; an endpoint that does not answer is reported as [`Reachable::No`].
    pub async fn connect(
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
    ) -> Result<(S3Store, Reachable), ConfigError> {
        let describe = if prefix.is_empty() {
            format!("s3://{bucket}")
        } else {
            format!("s3://{bucket}/{prefix}")
        };
        let fail = |reason: String| ConfigError::Store {
            store: describe.clone(),
            reason,
        };
        let (Some(ak), Some(sk)) = (settings.access_key.clone(), settings.secret_key.clone())
        else {
            return Err(fail(
                "credentials missing: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
            ));
        };
        let region = settings
            .region
            .clone()
            .unwrap_or_else(|| "us-east-1".into());
        let endpoint = settings.endpoint.clone();
        let path_style = settings.path_style.unwrap_or(endpoint.is_some());
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let mut conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(region))
            .credentials_provider(Credentials::new(
                ak,
                sk,
                settings.session_token.clone(),
                None,
                "environment",
            ))
            .http_client(http)
            .force_path_style(path_style)
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(2))
                    .operation_attempt_timeout(Duration::from_secs(20))
                    .operation_timeout(Duration::from_secs(45))
                    .build(),
            )
            .retry_config(RetryConfig::standard().with_max_attempts(2))
            // the default CRC checksums break several S3-compatible servers
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(url) = &endpoint {
            conf = conf.endpoint_url(url.clone());
        }
        let client = aws_sdk_s3::Client::from_conf(conf.build());
        let where_ = endpoint.clone().unwrap_or_else(|| "AWS".into());
        // a server that accepts connections and never answers must not hold the start
        // for the full operation timeout: the check gives up after a few seconds
        let check = client
            .head_bucket()
            .bucket(bucket)
            .customize()
            .config_override(
                aws_sdk_s3::config::Builder::default()
                    .timeout_config(
                        TimeoutConfig::builder()
                            .operation_timeout(Duration::from_secs(5))
                            .operation_attempt_timeout(Duration::from_secs(5))
                            .build(),
                    )
                    .retry_config(RetryConfig::standard().with_max_attempts(1)),
            );
        let reachable = match check.send().await {
            Ok(_) => {
                tracing::info!(store = %describe, endpoint = %where_, "S3 store ready");
                Reachable::Yes
            }
            Err(e) => {
                let status = e.raw_response().map(|r| r.status().as_u16());
                let reason = match (status, &e) {
                    (Some(404), _) => format!("bucket `{bucket}` does not exist at {where_} (create it, or set CACHE_BUCKET / --store)"),
                    (Some(403), _) | (Some(401), _) => format!("access to bucket `{bucket}` at {where_} was refused: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
                    (Some(500..=599), _)
                    | (_, SdkError::DispatchFailure(_))
                    | (_, SdkError::TimeoutError(_)) => {
                        let why = format!("cannot reach the S3 endpoint {where_} (check AWS_ENDPOINT_URL and that the server is up)");
                        return Ok((S3Store::new(client, bucket, prefix, where_), Reachable::No(why)));
                    }
                    _ => format!("checking bucket `{bucket}` at {where_} failed: {}", error_text(&e)),
                };
                return Err(fail(reason));
            }
        };
        Ok((S3Store::new(client, bucket, prefix, where_), reachable))
    }

    fn new(client: aws_sdk_s3::Client, bucket: &str, prefix: &str, endpoint: String) -> Self {
        S3Store {
            client,
            bucket: bucket.to_string(),
            prefix: prefix.to_string(),
            endpoint,
        }
    }

    fn full(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        }
    }
}

fn error_text<E: ProvideErrorMetadata + std::error::Error, R>(e: &SdkError<E, R>) -> String {
    match e {
        SdkError::ServiceError(s) => {
            let err = s.err();
            format!(
                "{}: {}",
                err.code().unwrap_or("error"),
                err.message().unwrap_or("no message")
            )
        }
        SdkError::TimeoutError(_) => "timed out".into(),
        SdkError::DispatchFailure(d) => format!("unreachable ({d:?})"),
        other => other.to_string(),
    }
}

fn io(op: &'static str, key: &str, reason: String) -> StoreError {
    StoreError::Io {
        op,
        key: key.to_string(),
        reason,
    }
}

impl ObjectStore for S3Store {
    fn unguarded(&self) -> &dyn ObjectStore {
        self
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StoreError>> {
        Box::pin(async move {
            let resp = self
                .client
                .get_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await;
            match resp {
                Ok(out) => out
                    .body
                    .collect()
                    .await
                    .map(|b| Some(b.into_bytes()))
                    .map_err(|e| io("get", key, e.to_string())),
                Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => Ok(None),
                Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
                Err(e) => Err(io("get", key, error_text(&e))),
            }
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .body(ByteStream::from(value))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| io("put", key, error_text(&e)))
        })
    }

    fn delete_prefix<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
            let keys = self.list(prefix).await?;
            let mut n = 0;
            for k in keys {
                self.delete(&k).await?;
                n += 1;
            }
            Ok(n)
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<String>, StoreError>> {
        Box::pin(async move {
            let mut keys = Vec::new();
            let mut token = None;
            let strip = if self.prefix.is_empty() {
                0
            } else {
                self.prefix.len() + 1
            };
            loop {
                let out = self
                    .client
                    .list_objects_v2()
                    .bucket(&self.bucket)
                    .prefix(self.full(prefix))
                    .set_continuation_token(token.take())
                    .send()
                    .await
                    .map_err(|e| io("list", prefix, error_text(&e)))?;
                for obj in out.contents() {
                    if let Some(k) = obj.key() {
                        keys.push(k.get(strip..).unwrap_or(k).to_string());
                    }
                }
                match out.next_continuation_token() {
                    Some(t) if out.is_truncated().unwrap_or(false) => token = Some(t.to_string()),
                    _ => break,
                }
            }
            Ok(keys)
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(async move {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(self.full(key))
                .send()
                .await
                .map(|_| ())
                .map_err(|e| io("delete", key, error_text(&e)))
        })
    }

    fn describe(&self) -> String {
        let at = &self.endpoint;
        if self.prefix.is_empty() {
            format!("s3://{} at {at}", self.bucket)
        } else {
            format!("s3://{}/{} at {at}", self.bucket, self.prefix)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_urls_parse() {
        assert_eq!(
            StoreSpec::parse("s3://b/p/q/").unwrap(),
            StoreSpec::S3 {
                bucket: "b".into(),
                prefix: "p/q".into()
            }
        );
        assert_eq!(
            StoreSpec::parse("s3://b").unwrap(),
            StoreSpec::S3 {
                bucket: "b".into(),
                prefix: "".into()
            }
        );
        assert_eq!(
            StoreSpec::parse("file:///tmp/x").unwrap(),
            StoreSpec::Local("/tmp/x".into())
        );
        assert!(StoreSpec::parse("s3://").is_err());
        assert_eq!(
            StoreSpec::parse("S3://b/p").unwrap(),
            StoreSpec::S3 {
                bucket: "b".into(),
                prefix: "p".into()
            }
        );
        for bad in ["s3:/b", "s3:b", "ftp://h/p", "file:/x", "gs://b"] {
            let e = StoreSpec::parse(bad).unwrap_err().to_string();
            assert!(e.contains("--store"), "{bad}: {e}");
        }
        assert_eq!(
            StoreSpec::parse("relative/dir").unwrap(),
            StoreSpec::Local("relative/dir".into())
        );
    }
}
