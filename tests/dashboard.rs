//! The dashboard, per-task logs and metrics, used as a person and a scraper would: a
//! real nats-server, a coordinator with `--http`, agents as processes, headless Chromium
//! driven over the DevTools protocol.

mod common;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

const APP: &str = "dashboard_flow";

/// One GET or POST over HTTP/1.1; returns the status and the body.
fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the dashboard");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    // (to its end, or to its Content-Length: Chromium keeps the connection open)
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        let n = s.read(&mut buf).expect("read the answer");
        raw.extend_from_slice(&buf[..n]);
        if n == 0 || complete(&raw) {
            break;
        }
    }
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        unchunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

/// Whether an answer with a Content-Length has all its body.
fn complete(raw: &[u8]) -> bool {
    let text = String::from_utf8_lossy(raw);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .is_some_and(|len| body.len() >= len)
}

fn unchunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = &rest[n + 2..];
    }
    out
}

fn get_json(port: u16, path: &str) -> Value {
    let (status, body) = http(port, "GET", path);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

struct Stack {
    nats: NatsServer,
    store: tempfile::TempDir,
    coordinator: Proc,
    http: u16,
    _agents: Vec<Proc>,
    /// Each agent's `--metrics` port.
    agent_metrics: Vec<u16>,
}

fn app_cmd(nats: &NatsServer, store: &Path) -> Command {
    let mut cmd = app(APP);
    cmd.env("NATS_URL", nats.url())
        .env("PINAZU_CACHE_DIR", store)
        .env_remove("PINAZU_NO_HTTP");
    cmd
}

fn start_coordinator(nats: &NatsServer, store: &Path) -> (Proc, u16) {
    let port = free_port();
    let mut cmd = app_cmd(nats, store);
    cmd.args(["coordinator", "--http", &format!("127.0.0.1:{port}")]);
    let mut proc = Proc::spawn("coordinator", cmd);
    wait_until(Duration::from_secs(20), "the dashboard listening", || {
        assert!(proc.is_running(), "coordinator exited: {}", proc.logs());
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    (proc, port)
}

fn stack(agents: usize, slots: u32) -> Stack {
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let (coordinator, http) = start_coordinator(&nats, store.path());
    let metrics: Vec<u16> = (0..agents).map(|_| free_port()).collect();
    let agents: Vec<Proc> = (0..agents)
        .map(|i| {
            let mut cmd = app_cmd(&nats, store.path());
            cmd.args([
                "agent",
                "--slots",
                &slots.to_string(),
                "--agent-id",
                &format!("agent-{i}"),
                "--metrics",
                &format!("127.0.0.1:{}", metrics[i]),
            ]);
            Proc::spawn(&format!("agent-{i}"), cmd)
        })
        .collect();
    wait_until(Duration::from_secs(20), "the agents registered", || {
        let a = get_json(http, "/api/agents");
        (a.as_array().map_or(0, |a| a.len()) == agents.len()).then_some(())
    });
    Stack {
        nats,
        store,
        coordinator,
        http,
        _agents: agents,
        agent_metrics: metrics,
    }
}

impl Stack {
    fn cli(&self) -> Command {
        app_cmd(&self.nats, self.store.path())
    }

    fn submit(&self, args: &[&str]) -> String {
        let out = self
            .cli()
            .args(["run", "--detach"])
            .args(args)
            .output()
            .expect("run --detach");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn run_to_end(&self, args: &[&str]) -> Value {
        self.run_to_end_with_stderr(args).0
    }

    fn run_to_end_with_stderr(&self, args: &[&str]) -> (Value, String) {
        let out = self
            .cli()
            .args(["run", "--no-progress"])
            .args(args)
            .output()
            .unwrap();
        let end = succeeded(&out, || self.coordinator.logs());
        (end, String::from_utf8_lossy(&out.stderr).to_string())
    }
}

/// The value of one sample line of a Prometheus text page.
fn sample(page: &str, name_and_labels: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name_and_labels} in:\n{page}"))
}

#[test]
fn api_logs_metrics_and_an_ended_runs_table_from_another_coordinator() {
    let mut s = stack(1, 64);
    let (end, stderr) = s.run_to_end_with_stderr(&["--n=2000", "--work-ms=1", "--fail-every=500"]);
    // the flow body's own log lines reach the client
    assert!(
        stderr.contains("dashboard_flow: every step ended failed=4"),
        "{stderr}"
    );
    assert_eq!(
        end["result"],
        json!({"succeeded": 1996, "failed": 4}),
        "{end}"
    );
    let id = end["flow_run_id"].as_str().unwrap().to_string();

    // the runs list: filtered, with the time it is ordered by
    let runs = get_json(s.http, "/api/runs?status=SUCCESS&flow=dashboard_flow");
    let row = runs
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["flow_run_id"] == id.as_str())
        .unwrap_or_else(|| panic!("run {id} not listed: {runs}"));
    assert!(row["at_ms"].as_u64().unwrap() > 0, "{row}");
    assert_eq!(
        get_json(s.http, "/api/runs?status=FAILED&flow=dashboard_flow"),
        json!([])
    );

    // the task table: filters, errors, their chains and the attempts' logs
    let failed = get_json(
        s.http,
        &format!("/api/runs/{id}/calls?status=FAILED&limit=10"),
    );
    assert_eq!(failed["total"], 2000);
    assert_eq!(failed["matching"], 4);
    let calls: Vec<u64> = failed["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["call"].as_u64().unwrap())
        .collect();
    assert_eq!(calls, vec![499, 999, 1499, 1999]);
    let first = &failed["rows"][0];
    assert!(first["error"].as_str().unwrap().contains("503"), "{first}");
    // (a page's rows carry the error's first 300 bytes; the one-row detail the whole
    // error, its chain and the logs)
    assert!(first["traceback"].is_null(), "{first}");
    assert_eq!(first["agent"], "agent-0");
    assert!(first["has_logs"].as_bool().unwrap());
    let one = get_json(
        s.http,
        &format!("/api/runs/{id}/calls?offset=499&limit=1&with_logs=true"),
    );
    assert!(
        one["rows"][0]["traceback"]
            .as_str()
            .unwrap()
            .contains("step 499 could not fetch its input"),
        "{one}"
    );
    let logs = one["rows"][0]["logs"].as_str().unwrap();
    assert!(logs.contains("step starting i=499"), "{logs}");
    assert!(
        logs.contains("WARN dashboard_flow: the upstream answered 503; giving up i=499"),
        "{logs}"
    );
    assert!(logs.contains("── attempt 1 on agent-0 ──"), "{logs}");

    // a succeeded call's result, in its detail
    let ok = get_json(
        s.http,
        &format!("/api/runs/{id}/calls?offset=7&limit=1&with_logs=true"),
    );
    assert_eq!(ok["rows"][0]["result"], "14", "{ok}");
    // the agents: attempts dispatched to each
    let agents = get_json(s.http, "/api/agents");
    assert_eq!(agents[0]["attempts"], 2000, "{agents}");

    // `logs RUN --task`
    let out = s
        .cli()
        .args(["logs", &id, "--task", "step"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("── call #1999 step (FAILED) ──"),
        "{}",
        &text[..text.len().min(2000)]
    );
    assert_eq!(text.matches("giving up").count(), 4);
    let out = s
        .cli()
        .args(["logs", &id, "--task", "nope"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("its tasks: step"));

    // /metrics against the run's own counters
    let status: Value = {
        let out = s.cli().args(["status", &id, "--json"]).output().unwrap();
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let (status_code, page) = http(s.http, "GET", "/metrics");
    assert_eq!(status_code, 200);
    assert_eq!(
        sample(
            &page,
            r#"pinazu_tasks_total{task="step",outcome="success"}"#
        ),
        1996.0
    );
    assert_eq!(
        sample(&page, r#"pinazu_tasks_total{task="step",outcome="failed"}"#),
        4.0
    );
    assert_eq!(
        sample(
            &page,
            r#"pinazu_runs_total{flow="dashboard_flow",status="SUCCESS"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&page, r#"pinazu_task_duration_seconds_count{task="step"}"#),
        status["executions"].as_f64().unwrap()
    );
    assert_eq!(
        sample(
            &page,
            r#"pinazu_task_queue_wait_seconds_count{task="step"}"#
        ),
        2000.0
    );
    assert_eq!(sample(&page, "pinazu_agents"), 1.0);
    assert_eq!(sample(&page, r#"pinazu_agent_slots{state="free"}"#), 64.0);
    assert_eq!(sample(&page, "pinazu_journal_backlog"), 0.0);
    assert_eq!(sample(&page, "pinazu_nats_reconnects_total"), 0.0);
    // the agent's own
    let (code, page) = http(s.agent_metrics[0], "GET", "/metrics");
    assert_eq!(code, 200);
    assert_eq!(
        sample(&page, r#"pinazu_agent_attempts_total{outcome="success"}"#),
        1996.0
    );
    assert_eq!(
        sample(&page, r#"pinazu_agent_attempts_total{outcome="failed"}"#),
        4.0
    );
    assert_eq!(
        sample(&page, "pinazu_agent_attempt_duration_seconds_count"),
        status["executions"].as_f64().unwrap()
    );
    assert_eq!(sample(&page, "pinazu_nats_reconnects_total"), 0.0);
    wait_until(
        Duration::from_secs(5),
        "the agent's slots free again",
        || {
            let (_, page) = http(s.agent_metrics[0], "GET", "/metrics");
            (sample(&page, r#"pinazu_agent_slots{state="free"}"#) == 64.0).then_some(())
        },
    );

    // bad input: clear errors
    let (code, body) = http(s.http, "GET", "/api/runs/not-a-run/calls");
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("run id"), "{body}");
    let (code, body) = http(s.http, "GET", &format!("/api/runs/{id}/calls?status=BOGUS"));
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("PENDING, RUNNING"), "{body}");
    let (code, _) = http(
        s.http,
        "GET",
        "/api/runs/5c3e6a52-4bd4-4c57-8a39-2a7f3f0b8c11",
    );
    assert_eq!(code, 404);
    let (code, body) = http(s.http, "GET", &format!("/api/runs/{id}/calls?limit=-1"));
    assert_eq!(code, 400, "{body}");
    assert!(body.starts_with("{\"error\""), "{body}");
    // a cancel without the page's header (what another site's form would send)
    let (code, body) = http(s.http, "POST", &format!("/api/runs/{id}/cancel"));
    assert_eq!(code, 403, "{body}");

    // the ended run's table, from another coordinator after this one stopped (the store)
    assert_eq!(s.coordinator.terminate(Duration::from_secs(20)), Some(0));
    let (other, port) = start_coordinator(&s.nats, s.store.path());
    let again = get_json(
        port,
        &format!("/api/runs/{id}/calls?status=FAILED&limit=10"),
    );
    assert_eq!(
        (again["total"].as_u64(), again["matching"].as_u64()),
        (Some(2000), Some(4)),
        "{again}\n{}",
        other.logs()
    );
}

// ---- a browser, over the DevTools protocol ---------------------------------------------

fn chromium_bin() -> PathBuf {
    if let Ok(p) = std::env::var("CHROMIUM_BIN") {
        return PathBuf::from(p);
    }
    for p in [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    panic!("Chromium is not installed (looked in /usr/bin; or set CHROMIUM_BIN): `apt-get install -y chromium`, or run scripts/test.sh, which does");
}

struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    port: u16,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn launch_browser() -> Browser {
    let profile = tempfile::tempdir().unwrap();
    let mut child = Command::new(chromium_bin())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.strip_prefix("DevTools listening on ") {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("chromium did not say where DevTools listen within 30 s");
    let port = url
        .trim_start_matches("ws://")
        .split(['/', ':'])
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("a DevTools port");
    Browser {
        child,
        _profile: profile,
        port,
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A page, driven over the DevTools protocol.
struct Page {
    ws: Ws,
    next: u64,
    shots: PathBuf,
}

impl Page {
    async fn open(browser: &Browser, shots: PathBuf) -> Page {
        let list = {
            let (code, body) = http(browser.port, "GET", "/json/list");
            assert_eq!(code, 200, "{body}");
            serde_json::from_str::<Value>(&body).unwrap()
        };
        let ws_url = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str())
            .expect("a page target")
            .to_string();
        // (its host may read `localhost`, which may not be the address it listens on)
        let path = ws_url.splitn(4, '/').nth(3).unwrap_or_default().to_string();
        let ws_url = format!("ws://127.0.0.1:{}/{path}", browser.port);
        let (ws, _) = tokio_tungstenite::connect_async(ws_url)
            .await
            .expect("DevTools connect");
        let mut page = Page { ws, next: 0, shots };
        page.call("Page.enable", json!({})).await;
        page.call("Runtime.enable", json!({})).await;
        page
    }

    /// Sends a command and waits for its answer. A dialog the page opens meanwhile
    /// (the cancel button's confirmation) is accepted, as a person clicking OK would.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next += 1;
        let id = self.next;
        let msg = json!({"id": id, "method": method, "params": params});
        self.ws
            .send(Message::Text(msg.to_string().into()))
            .await
            .unwrap();
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), self.ws.next())
                .await
                .unwrap_or_else(|_| panic!("no answer to {method} within 30 s"))
                .expect("DevTools connection open")
                .expect("DevTools message");
            let Message::Text(text) = m else { continue };
            let v: Value = serde_json::from_str(&text).unwrap();
            if v["method"] == "Page.javascriptDialogOpening" {
                self.next += 1;
                let accept = json!({"id": self.next, "method": "Page.handleJavaScriptDialog", "params": {"accept": true}});
                self.ws
                    .send(Message::Text(accept.to_string().into()))
                    .await
                    .unwrap();
                continue;
            }
            if v["id"] == id {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    async fn eval(&mut self, expression: &str) -> Value {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Waits (polling the page) until `expression` is truthy; returns its value.
    async fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await;
            if !(v.is_null() || v == json!(false) || v == json!(0) || v == json!("")) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The centre of the element `selector` on screen.
    async fn centre(&mut self, selector: &str) -> (f64, f64) {
        let r = self
            .eval(&format!(
                "(() => {{ const e = document.querySelector({selector:?}); if (!e) return null; e.scrollIntoView({{block: 'nearest'}}); const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
            ))
            .await;
        let r = r
            .as_array()
            .unwrap_or_else(|| panic!("no element {selector}"));
        (r[0].as_f64().unwrap(), r[1].as_f64().unwrap())
    }

    /// A mouse click on the element, as a person makes it.
    async fn click(&mut self, selector: &str) {
        let (x, y) = self.centre(selector).await;
        for kind in ["mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            )
            .await;
        }
    }

    /// The mouse wheel turned over the element.
    async fn wheel(&mut self, selector: &str, delta_y: f64) {
        let (x, y) = self.centre(selector).await;
        self.call(
            "Input.dispatchMouseEvent",
            json!({"type": "mouseWheel", "x": x, "y": y, "deltaX": 0, "deltaY": delta_y}),
        )
        .await;
    }

    async fn screenshot(&mut self, name: &str) {
        use base64::Engine;
        let r = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(&self.shots).unwrap();
        let path = self.shots.join(name);
        std::fs::write(&path, png).unwrap();
        eprintln!("screenshot: {}", path.display());
    }
}

fn number(v: &Value) -> u64 {
    v.as_str()
        .map(|s| s.replace(',', ""))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "current_thread")]
async fn a_person_follows_a_live_run_in_the_browser_finds_a_failure_and_cancels() {
    let s = stack(2, 32);
    let browser = launch_browser();
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    let mut page = Page::open(&browser, shots.clone()).await;
    let base = format!("http://127.0.0.1:{}/", s.http);

    // 10,000 calls of 40 ms on 64 slots: about 6 s, one in 2,500 failing
    let id = s.submit(&["--n=10000", "--work-ms=40", "--fail-every=2500"]);
    page.call("Page.navigate", json!({"url": base})).await;
    let row = format!("tr[data-run=\"{id}\"]");
    page.wait_for(
        "the run listed",
        &format!("!!document.querySelector('{row}')"),
        Duration::from_secs(20),
    )
    .await;
    page.click(&row).await;
    page.wait_for(
        "the run's page",
        "location.hash.startsWith('#/run/')",
        Duration::from_secs(10),
    )
    .await;

    // counters move while it runs
    let completed = "document.querySelector('#c-completed') && document.querySelector('#c-completed').textContent";
    let first = number(
        &page
            .wait_for("a first count", completed, Duration::from_secs(20))
            .await,
    );
    let later = loop {
        let n = number(&page.eval(completed).await);
        if n > first {
            break n;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(later > first);
    assert_eq!(
        page.eval("document.querySelector('#run-status').textContent")
            .await,
        "RUNNING"
    );
    page.screenshot("1-live-run.png").await;

    // the table scrolls to its last row (with the mouse wheel)
    let last = ".trow[data-call=\"9999\"]";
    let deadline = Instant::now() + Duration::from_secs(30);
    while page
        .eval(&format!("!!document.querySelector('{last}')"))
        .await
        != json!(true)
    {
        assert!(Instant::now() < deadline, "the last row never showed");
        page.wheel("#table-wrap", 20_000.0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // a failed task: its error and its logs
    page.wait_for(
        "a FAILED call in the status filter",
        "[...document.querySelectorAll('#t-status option')].some(o => o.value === 'FAILED')",
        Duration::from_secs(30),
    )
    .await;
    page.eval("(() => { const s = document.querySelector('#t-status'); s.value = 'FAILED'; s.dispatchEvent(new Event('change')); })()")
        .await;
    let failed_row = ".trow[data-call=\"2499\"]";
    page.wait_for(
        "the failed call listed",
        &format!("!!document.querySelector('{failed_row}')"),
        Duration::from_secs(10),
    )
    .await;
    page.click(failed_row).await;
    let error = page
        .wait_for("its error", "document.querySelector('#detail-error') && document.querySelector('#detail-error').textContent", Duration::from_secs(10))
        .await;
    assert!(
        error.as_str().unwrap().contains("503 Service Unavailable"),
        "{error}"
    );
    let logs = page
        .wait_for(
            "its logs",
            "(document.querySelector('#detail-logs') || {}).textContent !== 'loading…' && (document.querySelector('#detail-logs') || {}).textContent",
            Duration::from_secs(10),
        )
        .await;
    assert!(
        logs.as_str()
            .unwrap()
            .contains("the upstream answered 503; giving up i=2499"),
        "{logs}"
    );
    page.eval("document.querySelector('#detail').scrollIntoView()")
        .await;
    page.screenshot("2-failed-task.png").await;

    // cancel
    page.click("#cancel-btn").await;
    page.wait_for(
        "the run cancelled",
        "document.querySelector('#run-status').textContent === 'FAILED'",
        Duration::from_secs(30),
    )
    .await;
    page.screenshot("3-cancelled.png").await;
    let info = get_json(s.http, &format!("/api/runs/{id}"));
    assert_eq!(info["status"], "FAILED");
    assert!(
        info["error"]
            .as_str()
            .unwrap()
            .contains("cancelled by an operator"),
        "{info}"
    );
    assert!(info["completed"].as_u64().unwrap() < 10_000, "{info}");

    // the page of a 100,000-call run: interactive, and its last row, within a second
    let big = s.run_to_end(&["--n=100000", "--work-ms=0"]);
    let big_id = big["flow_run_id"].as_str().unwrap();
    page.call(
        "Page.navigate",
        json!({"url": format!("{base}?fresh#/run/{big_id}")}),
    )
    .await;
    let first_row_ms = page
        .wait_for(
            "the first row of the 100,000-call table",
            "document.querySelector('.trow[data-call=\"0\"]') && performance.now()",
            Duration::from_secs(20),
        )
        .await
        .as_f64()
        .unwrap();
    let t0 = page.eval("performance.now()").await.as_f64().unwrap();
    page.eval("(() => { const w = document.querySelector('#table-wrap'); w.scrollTop = w.scrollHeight; })()")
        .await;
    let t1 = page
        .wait_for(
            "the last row of the 100,000-call table",
            "document.querySelector('.trow[data-call=\"99999\"]') && performance.now()",
            Duration::from_secs(20),
        )
        .await
        .as_f64()
        .unwrap();
    page.screenshot("4-hundred-thousand-calls.png").await;
    eprintln!(
        "100,000-call run page: first row {first_row_ms:.0} ms after navigation; last row {:.0} ms after a jump to the end",
        t1 - t0
    );
    assert!(
        first_row_ms < 1000.0,
        "the page took {first_row_ms:.0} ms to show its first row"
    );
    assert!(
        t1 - t0 < 1000.0,
        "the jump to the last row took {:.0} ms",
        t1 - t0
    );
    eprintln!("screenshots in {}", shots.display());
}
