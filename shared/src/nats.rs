//! NATS connection settings and an ordered background publisher, used by the coordinator,
//! the agents and the CLI client alike.

use bytes::Bytes;
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How to reach NATS. `urls` may list several servers, comma separated.
#[derive(Clone, Debug, Default)]
pub struct NatsConfig {
    /// `nats://host:port[,nats://host2:port]`.
    pub urls: String,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password (with `user`).
    pub password: Option<String>,
    /// Token authentication.
    pub token: Option<String>,
    /// A `.creds` file (JWT + nkey).
    pub creds_file: Option<PathBuf>,
    /// CA certificate(s) to trust (PEM); implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), with `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM), with `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Always use TLS.
    pub tls_required: bool,
    /// Connection name shown by the server.
    pub name: String,
}

/// Why a connection could not be made, with what to check.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Bad settings.
    #[error("NATS settings: {0}")]
    Settings(String),
    /// The server refused or could not be reached.
    #[error("could not connect to NATS at {urls}: {reason}")]
    Connect {
        /// Where.
        urls: String,
        /// Why, with a hint.
        reason: String,
    },
}

impl NatsConfig {
    /// Connects, failing fast with a clear error (the server is down, or refuses our
    /// credentials). Once connected the client reconnects forever, and logs each
    /// disconnect, reconnect and slow-consumer event.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsError> {
        let connected_once = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut opts = async_nats::ConnectOptions::new()
            .name(if self.name.is_empty() { "pinazu" } else { &self.name })
            .connection_timeout(Duration::from_secs(5))
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2_000))
            })
            .event_callback(move |event| {
                let first = !connected_once.swap(true, std::sync::atomic::Ordering::Relaxed);
                async move {
                match event {
                    async_nats::Event::Connected if first => tracing::debug!("NATS connected"),
                    async_nats::Event::Connected => tracing::info!("NATS connection re-established"),
                    async_nats::Event::Disconnected => tracing::warn!("NATS connection lost; reconnecting"),
                    async_nats::Event::SlowConsumer(sid) => tracing::error!(sid, "NATS slow consumer: messages were dropped; lost attempts are recovered by heartbeat reconciliation"),
                    async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                    other => tracing::info!(event = %other, "NATS event"),
                }
                }
            });
        match (&self.user, &self.password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u.clone(), p.clone()),
            (Some(_), None) | (None, Some(_)) => {
                return Err(NatsError::Settings(
                    "user and password go together (--nats-user and --nats-password)".into(),
                ))
            }
            _ => {}
        }
        if let Some(t) = &self.token {
            opts = opts.token(t.clone());
        }
        if let Some(path) = &self.creds_file {
            opts = opts.credentials_file(path).await.map_err(|e| {
                NatsError::Settings(format!("credentials file {}: {e}", path.display()))
            })?;
        }
        if let Some(ca) = &self.tls_ca {
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => {
                opts = opts
                    .add_client_certificate(c.clone(), k.clone())
                    .require_tls(true)
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(NatsError::Settings(
                    "a TLS client certificate needs its key (--nats-tls-cert and --nats-tls-key)"
                        .into(),
                ))
            }
            _ => {}
        }
        if self.tls_required {
            opts = opts.require_tls(true);
        }
        let urls: Vec<async_nats::ServerAddr> = self
            .urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| {
                u.parse()
                    .map_err(|e| NatsError::Settings(format!("NATS_URL entry {u:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            return Err(NatsError::Settings("NATS_URL is empty".into()));
        }
        opts.connect(urls).await.map_err(|e| {
            use async_nats::ConnectErrorKind as K;
            const TLS_HINT: &str =
                " (check the TLS settings: --nats-tls-ca, --nats-tls-cert, --nats-tls-key)";
            // a failed TLS handshake surfaces as an I/O error
            let text = e.to_string();
            let tls = text.contains("certificate") || text.contains("TLS") || text.contains("tls");
            let hint = match e.kind() {
                K::AuthorizationViolation | K::Authentication => {
                    " (the server refused the credentials: check --nats-user/--nats-password, --nats-token or --nats-creds)"
                }
                K::Tls => TLS_HINT,
                K::TimedOut | K::Io if tls => TLS_HINT,
                K::TimedOut | K::Io => " (is nats-server running there?)",
                _ => "",
            };
            NatsError::Connect {
                urls: self.urls.clone(),
                reason: format!("{e}{hint}"),
            }
        })
    }
}

enum Cmd {
    Publish(String, Bytes),
    Flush(oneshot::Sender<()>),
}

/// Publishes from synchronous code, in order, through one background task.
#[derive(Clone, Debug)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Publish(s, b) => write!(f, "Publish({s}, {} bytes)", b.len()),
            Cmd::Flush(_) => f.write_str("Flush"),
        }
    }
}

impl Publisher {
    /// Starts the background task on the current tokio runtime.
    pub fn start(client: async_nats::Client) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(cmd) = rx.recv().await {
                match cmd {
                    Cmd::Publish(subject, payload) => {
                        if let Err(e) = client.publish(subject.clone(), payload).await {
                            tracing::warn!(subject, error = %e, "NATS publish failed");
                        }
                    }
                    Cmd::Flush(done) => {
                        if let Err(e) = client.flush().await {
                            tracing::warn!(error = %e, "NATS flush failed");
                        }
                        let _ = done.send(());
                    }
                }
            }
        });
        Publisher { tx }
    }

    /// Queues a message.
    pub fn publish(&self, subject: String, payload: Bytes) {
        let _ = self.tx.send(Cmd::Publish(subject, payload));
    }

    /// Resolves once everything queued before it has been written to the server.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Cmd::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Counts messages dropped because they could not be decoded or served, and logs them
/// without flooding the log (the first ten, then every thousandth).
#[derive(Debug, Default)]
pub struct Drops {
    count: std::sync::atomic::AtomicU64,
}

impl Drops {
    /// Records one dropped message.
    pub fn record(&self, subject: &str, reason: &dyn std::fmt::Display) {
        let n = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        if n <= 10 || n.is_multiple_of(1000) {
            tracing::warn!(subject, dropped_total = n, %reason, "dropped a message that could not be used");
        }
    }

    /// Messages dropped so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}
