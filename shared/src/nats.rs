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
    /// How long to wait for a server that does not answer yet (retrying with backoff
    /// and saying so); `None`: for ever (services under a supervisor).
    pub connect_timeout: Option<Duration>,
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
    /// The server URLs with their credentials redacted, for messages.
    pub fn display_urls(&self) -> String {
        crate::redact::redact(&self.urls).into_owned()
    }

    /// Connects. A server that cannot be reached yet is waited for (backoff up to 5 s,
    /// one log line when the wait starts and one every 30 s), up to `connect_timeout`;
    /// refused credentials and bad TLS settings fail at once. Once connected the
    /// client reconnects forever, and logs each disconnect, reconnect and slow-consumer
    /// event.
    pub async fn connect(&self) -> Result<async_nats::Client, NatsError> {
        let started = tokio::time::Instant::now();
        let mut wait = Duration::from_millis(250);
        let mut told: Option<tokio::time::Instant> = None;
        loop {
            match self.connect_once().await {
                Ok(client) => {
                    if told.is_some() {
                        tracing::info!(nats = %self.display_urls(), waited_s = started.elapsed().as_secs(), "NATS is reachable now");
                    }
                    return Ok(client);
                }
                Err((e, retryable)) => {
                    let waited = started.elapsed();
                    let out_of_time = self.connect_timeout.is_some_and(|t| waited + wait > t);
                    if !retryable || out_of_time {
                        return Err(e);
                    }
                    if told.is_none_or(|t| t.elapsed() >= Duration::from_secs(30)) {
                        let until = match self.connect_timeout {
                            Some(t) => format!("up to {}", humantime::format_duration(t)),
                            None => "until it answers (--connect-timeout to bound it)".into(),
                        };
                        tracing::warn!("waiting for NATS: {e}; retrying {until}");
                        told = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// One attempt; the error says whether trying again can help.
    async fn connect_once(&self) -> Result<async_nats::Client, (NatsError, bool)> {
        let settings = |e: NatsError| (e, false);
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
                    async_nats::Event::Connected => {
                        outage::ended();
                        tracing::info!("NATS connection re-established")
                    }
                    async_nats::Event::Disconnected => {
                        outage::began();
                        tracing::warn!("NATS connection lost; reconnecting")
                    }
                    async_nats::Event::SlowConsumer(sid) => tracing::error!(sid, "NATS slow consumer: messages were dropped; lost attempts are recovered by heartbeat reconciliation"),
                    async_nats::Event::Closed => tracing::debug!("NATS connection closed"),
                    async_nats::Event::ServerError(e) if e.to_string().contains("Permissions Violation") => {
                        let e = crate::redact::redact(&e.to_string()).into_owned();
                        tracing::error!(error = %e, "NATS refused a subject to this user: its permissions do not allow it (scripts/nats-auth.conf lists what each party may use)");
                        note_refusal(e);
                    }
                    async_nats::Event::ServerError(e) => tracing::warn!(error = %crate::redact::redact(&e.to_string()), "NATS server error"),
                    async_nats::Event::LameDuckMode => tracing::info!("NATS server entering lame duck mode; moving to another"),
                    other => tracing::debug!(event = %other, "NATS event"),
                }
                }
            });
        // credentials in the URLs (`nats://user:pass@host`, `nats://token@host`) are
        // honoured: taken out of the addresses and given as options; the flags win
        let mut url_user: Option<(Option<String>, String)> = None;
        let mut urls: Vec<async_nats::ServerAddr> = Vec::new();
        for u in self
            .urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
        {
            let creds = crate::redact::url_credentials(u);
            if let Some(c) = &creds {
                if url_user.as_ref().is_some_and(|prev| prev != c) {
                    return Err(settings(NatsError::Settings(
                        "the NATS_URL entries carry different credentials; give them once".into(),
                    )));
                }
                crate::redact::register(&c.1);
                url_user = Some(c.clone());
            }
            let bare = match crate::redact::split_scheme(u) {
                (scheme, rest) if creds.is_some() => {
                    let at = rest.rfind('@').map_or(0, |i| i + 1);
                    format!("{}://{}", scheme.unwrap_or("nats"), &rest[at..])
                }
                _ => u.to_string(),
            };
            urls.push(bare.parse().map_err(|e| {
                settings(NatsError::Settings(format!(
                    "NATS_URL entry {:?}: {e}",
                    crate::redact::redact(u)
                )))
            })?);
        }
        if urls.is_empty() {
            return Err(settings(NatsError::Settings("NATS_URL is empty".into())));
        }
        let (mut user, mut password, mut token) = (None, None, None);
        match url_user {
            Some((Some(u), p)) => (user, password) = (Some(u), Some(p)),
            Some((None, t)) => token = Some(t),
            None => {}
        }
        if self.user.is_some() || self.password.is_some() {
            (user, password) = (self.user.clone(), self.password.clone());
        }
        if self.token.is_some() {
            token = self.token.clone();
        }
        // replies come to an inbox named after the user (`_INBOX.<user>.…`), so NATS
        // permissions can let each user read its own replies only (scripts/nats-auth.conf)
        if let Some(u) = user.as_deref().filter(|u| crate::subjects::valid_token(u)) {
            opts = opts.custom_inbox_prefix(format!("_INBOX.{u}"));
        }
        match (user, password) {
            (Some(u), Some(p)) => opts = opts.user_and_password(u, p),
            (Some(_), None) | (None, Some(_)) => {
                return Err(settings(NatsError::Settings(
                    "user and password go together (--nats-user and --nats-password)".into(),
                )))
            }
            _ => {}
        }
        if let Some(t) = token {
            opts = opts.token(t);
        }
        // a missing TLS or credentials file is named, not a handshake mystery
        for (what, path) in [
            ("credentials file (--nats-creds)", &self.creds_file),
            ("TLS CA file (--nats-tls-ca)", &self.tls_ca),
            ("TLS client certificate (--nats-tls-cert)", &self.tls_cert),
            ("TLS client key (--nats-tls-key)", &self.tls_key),
        ] {
            if let Some(p) = path {
                if let Err(e) = std::fs::metadata(p) {
                    return Err(settings(NatsError::Settings(format!(
                        "{what} {}: {e}",
                        p.display()
                    ))));
                }
            }
        }
        if let Some(path) = &self.creds_file {
            opts = opts.credentials_file(path).await.map_err(|e| {
                settings(NatsError::Settings(format!(
                    "credentials file {}: {e}",
                    path.display()
                )))
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
                return Err(settings(NatsError::Settings(
                    "a TLS client certificate needs its key (--nats-tls-cert and --nats-tls-key)"
                        .into(),
                )))
            }
            _ => {}
        }
        if self.tls_required {
            opts = opts.require_tls(true);
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
                K::Dns => " (the host name does not resolve)",
                _ => "",
            };
            // a server not there yet, or a name not resolving yet (DNS comes up with
            // the container): waited for; refused credentials or TLS: at once
            let retryable = matches!(e.kind(), K::TimedOut | K::Io | K::Dns | K::MaxReconnects)
                && !tls;
            (
                NatsError::Connect {
                    urls: self.display_urls(),
                    reason: crate::redact::redact(&format!("{e}{hint}")).into_owned(),
                },
                retryable,
            )
        })
    }
}

enum Cmd {
    Publish(String, Bytes),
    Flush(oneshot::Sender<()>),
}

/// The last permission violations NATS reported to this process (newest last).
static REFUSALS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

fn note_refusal(e: String) {
    if let Ok(mut r) = REFUSALS.lock() {
        if r.len() >= 16 {
            r.remove(0);
        }
        r.push(e);
    }
}

/// The permission violations NATS reported to this process so far (at most the last
/// 16), e.g. `Permissions Violation for Subscription to "pinazu.agent.x.ack"`: flush the
/// connection first to have those of everything sent before.
pub fn refusals() -> Vec<String> {
    REFUSALS.lock().map(|r| r.clone()).unwrap_or_default()
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
            let mut flushes = Vec::new();
            while let Some(first) = rx.recv().await {
                // everything queued meanwhile is published, then one flush answers every
                // flush asked for: a flush per request (each run's end asks one) would
                // make the queue wait a round trip each and grow under load
                let (mut next, mut taken) = (Some(first), 0);
                while let Some(cmd) = next.take() {
                    taken += 1;
                    match cmd {
                        Cmd::Publish(subject, payload) => {
                            if let Err(e) = client.publish(subject.clone(), payload).await {
                                tracing::warn!(subject, error = %e, "NATS publish failed");
                            }
                        }
                        Cmd::Flush(done) => flushes.push(done),
                    }
                    // (bounded, so a busy queue cannot hold a flush off for long)
                    if taken < 4096 {
                        next = rx.try_recv().ok();
                    }
                }
                if !flushes.is_empty() {
                    if let Err(e) = client.flush().await {
                        tracing::warn!(error = %e, "NATS flush failed");
                    }
                    for done in flushes.drain(..) {
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

/// This process's NATS connection outages, as its client saw them: a coordinator judges
/// no agent dead while its own connection is down or just came back (the agents'
/// heartbeats were cut off with it).
pub mod outage {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    static BASE: OnceLock<Instant> = OnceLock::new();
    static DOWN: AtomicBool = AtomicBool::new(false);
    /// When the connection last came back (ms since `BASE`, plus one; 0: never).
    static BACK_MS: AtomicU64 = AtomicU64::new(0);
    /// How many times it came back.
    static BACKS: AtomicU64 = AtomicU64::new(0);

    fn now_ms() -> u64 {
        BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    pub(crate) fn began() {
        let _ = now_ms();
        DOWN.store(true, Relaxed);
    }

    pub(crate) fn ended() {
        BACK_MS.store(now_ms() + 1, Relaxed);
        BACKS.fetch_add(1, Relaxed);
        DOWN.store(false, Relaxed);
    }

    /// How many times the connection came back from an outage (however short: one
    /// between two looks at `is connected` is counted too).
    pub fn reconnects() -> u64 {
        BACKS.load(Relaxed)
    }

    /// `None` when connected and never back from an outage; else how long ago the
    /// connection came back (zero while it is down).
    pub fn since_back() -> Option<Duration> {
        if DOWN.load(Relaxed) {
            return Some(Duration::ZERO);
        }
        match BACK_MS.load(Relaxed) {
            0 => None,
            back => Some(Duration::from_millis(now_ms().saturating_sub(back - 1))),
        }
    }
}
