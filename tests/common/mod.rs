//! Test harness: real servers and real processes, on free ports, killed on drop.

#![allow(dead_code)]

pub mod limits;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where nats-server is: `NATS_SERVER_BIN`, Debian's `/usr/sbin/nats-server`, or PATH.
pub fn nats_server_bin() -> PathBuf {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/sbin/nats-server",
        "/usr/local/bin/nats-server",
        "/usr/bin/nats-server",
    ] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    if let Some(p) = which("nats-server") {
        return p;
    }
    panic!(
        "nats-server is not installed (looked in /usr/sbin, /usr/local/bin, /usr/bin and PATH; \
         or set NATS_SERVER_BIN). Install it with `apt-get install -y nats-server`, or run \
         scripts/test.sh, which does."
    );
}

/// A program on PATH.
fn which(program: &str) -> Option<PathBuf> {
    let out = Command::new("which").arg(program).output().ok()?;
    let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (!s.is_empty()).then(|| PathBuf::from(s))
}

/// Starts a server quietly and waits until it listens on `port` (or fails loudly).
pub fn spawn_server(mut cmd: Command, what: &str, port: u16) -> Child {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {what}: {e}"));
    assert!(
        wait_port(port, Duration::from_secs(10)),
        "{what} did not listen on port {port} within 10 s"
    );
    child
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn wait_port(port: u16, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A nats-server with JetStream in a temp dir, on a free port.
pub struct NatsServer {
    pub port: u16,
    child: Option<Child>,
    store: tempfile::TempDir,
    extra: Vec<String>,
    env: Vec<(String, String)>,
}

/// The users of `scripts/nats-auth.conf`, each with its password in tests.
pub const AUTH_USERS: [(&str, &str); 6] = [
    ("coordinator", "PINAZU_COORDINATOR_PASSWORD"),
    ("client", "PINAZU_CLIENT_PASSWORD"),
    ("observer", "PINAZU_OBSERVER_PASSWORD"),
    ("agent-1", "PINAZU_AGENT_1_PASSWORD"),
    ("agent-2", "PINAZU_AGENT_2_PASSWORD"),
    ("agent-3", "PINAZU_AGENT_3_PASSWORD"),
];

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// With extra arguments, e.g. `["--user", "u", "--pass", "p"]`.
    /// On this port (e.g. one that services were told to use before it was up).
    pub fn start_on(port: u16) -> Self {
        let mut s = NatsServer {
            port,
            child: None,
            store: tempfile::tempdir().expect("temp dir"),
            extra: Vec::new(),
            env: Vec::new(),
        };
        s.spawn();
        s
    }

    /// With the shipped `scripts/nats-auth.conf` (users with least privilege); each
    /// user's password is `pw-<user>`.
    pub fn start_with_auth() -> Self {
        let conf = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/nats-auth.conf");
        let mut s = NatsServer {
            port: free_port(),
            child: None,
            store: tempfile::tempdir().expect("temp dir"),
            extra: vec!["-c".into(), conf.display().to_string()],
            env: AUTH_USERS
                .iter()
                .map(|(user, var)| (var.to_string(), format!("pw-{user}")))
                .collect(),
        };
        s.spawn();
        s
    }

    /// The URL with one user of `scripts/nats-auth.conf` (see `start_with_auth`).
    pub fn url_as(&self, user: &str) -> String {
        format!("nats://{user}:pw-{user}@127.0.0.1:{}", self.port)
    }

    pub fn start_with(extra: &[&str]) -> Self {
        let mut s = NatsServer {
            port: free_port(),
            child: None,
            store: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(nats_server_bin());
        cmd.args([
            "-a",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
            "-js",
            "-sd",
        ])
        .arg(self.store.path())
        .args(&self.extra)
        .envs(self.env.iter().map(|(k, v)| (k, v)));
        self.child = Some(spawn_server(cmd, "nats-server", self.port));
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The JetStream streams this server stores (the directories of its store).
    pub fn stream_names(&self) -> Vec<String> {
        let dir = self
            .store
            .path()
            .join("jetstream")
            .join("$G")
            .join("streams");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.kill();
        std::thread::sleep(Duration::from_millis(300));
        self.spawn();
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The path of an example binary (`cargo test` builds them).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target profile directory");
    let path = dir.join("examples").join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the examples first (`cargo test` does; or `cargo build --examples`)",
        path.display()
    );
    path
}

/// A command for an example binary, with a clean environment for our variables.
pub fn app(name: &str) -> Command {
    let mut cmd = Command::new(example(name));
    for var in [
        "FLOW_RUN_ID",
        "NATS_URL",
        "RUST_LOG",
        "ENABLE_S3_CACHING",
        "CACHE_BUCKET",
        "PINAZU_STORE",
        "PINAZU_SUBJECT_PREFIX",
        "LOG_FORMAT",
        "PINAZU_HTTP",
    ] {
        cmd.env_remove(var);
    }
    // a journal of its own, so runs of one id in different tests never replay each other
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let journal = std::env::temp_dir().join(format!(
        "pinazu-test-journal-{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    // (a coordinator's dashboard is asked for by the tests that use it, on a free port)
    cmd.env("LOG_LEVEL", "info")
        .env("PINAZU_NO_HTTP", "1")
        .env("NO_COLOR", "1")
        .env("PINAZU_JOURNAL_DIR", journal);
    cmd
}

/// A long-running child process with its stderr captured to a file; killed on drop.
pub struct Proc {
    pub name: String,
    child: Option<Child>,
    /// The exit code, once it exited (-1: killed by a signal).
    exited: Option<i32>,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("stderr.log");
        let file = std::fs::File::create(&log).expect("log file");
        let child = cmd
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        Proc {
            name: name.to_string(),
            child: Some(child),
            exited: None,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no chance to say goodbye.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let c = self.child.as_mut()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(Ok(Some(status))) => {
                self.exited = Some(status.code().unwrap_or(-1));
                self.child = None;
                false
            }
            _ => false,
        }
    }

    /// The exit code of a process that exited (see `is_running`); -1 if unknown.
    pub fn exit_code(&self) -> i32 {
        self.exited.unwrap_or(-1)
    }

    /// Sends a signal (`TERM`, `INT`, `STOP`, `CONT`, ...).
    pub fn signal(&self, sig: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args([format!("-{sig}"), c.id().to_string()])
                .status();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The last stdout line of a finished command, parsed as JSON.
pub fn last_json_line(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "last stdout line is not JSON ({e}): {line:?}\nstdout:\n{stdout}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// The final JSON line of a command that must have succeeded (else the test fails with
/// its stderr and `logs`, e.g. the services' logs).
pub fn succeeded(out: &Output, logs: impl Fn() -> String) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );
    last_json_line(out)
}

/// Reads a child's stdout lines on a thread (for commands that run while the test acts).
pub fn stdout_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().expect("piped stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Where s3s-fs is: `S3S_FS_BIN`, `~/.cargo/bin/s3s-fs`, or PATH.
pub fn s3s_fs_bin() -> PathBuf {
    if let Ok(p) = std::env::var("S3S_FS_BIN") {
        return PathBuf::from(p);
    }
    if let Ok(home) = std::env::var("HOME") {
        let p = Path::new(&home).join(".cargo/bin/s3s-fs");
        if p.is_file() {
            return p;
        }
    }
    if let Some(p) = which("s3s-fs") {
        return p;
    }
    panic!(
        "s3s-fs is not installed (looked at $S3S_FS_BIN, ~/.cargo/bin and PATH). Install it with \
         `cargo install s3s-fs --version 0.14.1 --features binary --locked`, or run \
         scripts/test.sh, which does."
    );
}

pub const S3_ACCESS_KEY: &str = "AKIAPINAZUTEST";
pub const S3_SECRET_KEY: &str = "pinazu-test-secret-key";
pub const S3_BUCKET: &str = "flow-cache-bucket";

/// An s3s-fs server (real S3 protocol, SigV4 checked) over a temp dir, on a free port,
/// with the bucket `flow-cache-bucket`.
pub struct S3Server {
    pub port: u16,
    pub root: tempfile::TempDir,
    child: Option<Child>,
}

impl S3Server {
    pub fn start() -> Self {
        let root = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(root.path().join(S3_BUCKET)).expect("bucket dir");
        let mut s = S3Server {
            port: free_port(),
            root,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(s3s_fs_bin());
        cmd.args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.root.path());
        self.child = Some(spawn_server(cmd, "s3s-fs", self.port));
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The file s3s-fs keeps an object in.
    pub fn object_path(&self, key: &str) -> PathBuf {
        self.root.path().join(S3_BUCKET).join(key)
    }

    /// The environment a process needs to use this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY.to_string()),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY.to_string()),
            ("AWS_DEFAULT_REGION", "us-east-1".to_string()),
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_S3_USE_PATH_STYLE", "true".to_string()),
        ]
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Connects to `nats://[user:password@]host:port`, the user's replies on
/// `_INBOX.<user>` (as Pinazu's own clients name them: scripts/nats-auth.conf).
pub async fn nats_connect(url: &str) -> Result<async_nats::Client, async_nats::ConnectError> {
    let rest = url.strip_prefix("nats://").unwrap_or(url);
    match rest.rsplit_once('@') {
        Some((creds, host)) => {
            let (user, password) = creds.split_once(':').unwrap_or((creds, ""));
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into())
                .custom_inbox_prefix(format!("_INBOX.{user}"))
                .connect(format!("nats://{host}"))
                .await
        }
        None => async_nats::connect(url).await,
    }
}

/// An independent NATS client recording every Pinazu Core status event
/// (`v1.svc.worker.>`), as Pinazu Core would see them, on a thread of its own.
pub struct EventRecorder {
    events: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    _runtime: tokio::runtime::Runtime,
}

impl EventRecorder {
    /// Subscribed (and flushed) before it returns, so nothing published after is missed.
    pub fn start(url: &str) -> Self {
        use futures_util::StreamExt;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = events.clone();
        let url = url.to_string();
        runtime.block_on(async move {
            let client = nats_connect(&url).await.expect("the recorder connects");
            let mut sub = client
                .subscribe("v1.svc.worker.>")
                .await
                .expect("the recorder subscribes");
            client.flush().await.expect("flush");
            tokio::spawn(async move {
                let _client = client;
                while let Some(msg) = sub.next().await {
                    let mut v: serde_json::Value = serde_json::from_slice(&msg.payload)
                        .unwrap_or_else(|e| {
                            panic!(
                                "a status event is not JSON ({e}): {}",
                                String::from_utf8_lossy(&msg.payload)
                            )
                        });
                    v["subject"] = serde_json::Value::String(msg.subject.to_string());
                    sink.lock().unwrap().push(v);
                }
            });
        });
        EventRecorder {
            events,
            _runtime: runtime,
        }
    }

    /// Every event of one run so far (each with its `subject` added).
    pub fn of_run(&self, run: &str) -> Vec<serde_json::Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["message"]["flow_run_id"] == run)
            .cloned()
            .collect()
    }

    /// The run's flow events' statuses, in order.
    pub fn flow_statuses(&self, run: &str) -> Vec<String> {
        self.of_run(run)
            .iter()
            .filter(|e| e["subject"] == "v1.svc.worker.flow.status")
            .map(|e| e["message"]["status"].as_str().unwrap_or("").to_string())
            .collect()
    }

    /// The run's task events.
    pub fn task_events(&self, run: &str) -> Vec<serde_json::Value> {
        self.of_run(run)
            .into_iter()
            .filter(|e| e["subject"] == "v1.svc.worker.task.status")
            .collect()
    }

    /// Waits until the run has a flow event with `status`; returns that event.
    pub fn wait_flow(&self, run: &str, status: &str, timeout: Duration) -> serde_json::Value {
        wait_until(
            timeout,
            &format!("a flow {status} event of run {run}"),
            || {
                self.of_run(run).into_iter().find(|e| {
                    e["subject"] == "v1.svc.worker.flow.status" && e["message"]["status"] == status
                })
            },
        )
    }
}

/// Waits for a child (a `run` client) to exit and returns its output; past `timeout` it
/// is killed and the test fails with its output and `logs()` (the cluster's logs).
pub fn finish_within(
    child: std::process::Child,
    timeout: Duration,
    logs: impl Fn() -> String,
) -> Output {
    let deadline = Instant::now() + timeout;
    let mut child = child;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return child.wait_with_output().expect("output");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("output");
            panic!(
                "run did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
