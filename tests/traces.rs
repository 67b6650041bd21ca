//! OpenTelemetry traces (feature `otel`: `cargo test --features otel --test traces`,
//! which scripts/test.sh runs): `run`, a coordinator and an agent, as processes on a
//! real nats-server, export their spans over OTLP/HTTP (JSON) to a collector this test
//! runs; one trace id must link the client's run span, the coordinator's run and call
//! spans and the agent's attempt spans, and be the run's status events' trace id.

#![cfg(feature = "otel")]

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One exported span: (service, trace id, span id, parent span id, name, status code
/// (2: error)).
type Span = (String, String, String, String, String, i64);

/// An OTLP/HTTP collector on a free port: keeps every span posted to `/v1/traces`.
struct Collector {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().map_while(Result::ok) {
                let kept = kept.clone();
                std::thread::spawn(move || serve(conn, kept));
            }
        });
        Collector { port, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

/// Answers the requests of one connection (kept alive by the exporter).
fn serve(conn: std::net::TcpStream, kept: Arc<Mutex<Vec<Span>>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut writer = conn;
    loop {
        let mut length = 0usize;
        let mut first = String::new();
        if reader.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            kept.lock().unwrap().extend(spans_of(&v));
        }
        let answer = "{}";
        let _ = write!(
            writer,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
    }
}

/// The spans of an OTLP JSON export request.
fn spans_of(v: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or("")
            .to_string();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let text = |k: &str| s[k].as_str().unwrap_or("").to_ascii_lowercase();
                out.push((
                    service.clone(),
                    text("traceId"),
                    text("spanId"),
                    text("parentSpanId"),
                    text("name"),
                    s["status"]["code"].as_i64().unwrap_or(0),
                ));
            }
        }
    }
    out
}

#[test]
fn one_trace_links_the_client_the_coordinator_and_the_agent() {
    let collector = Collector::start();
    let nats = NatsServer::start();
    let store = tempfile::tempdir().unwrap();
    let env = |cmd: &mut std::process::Command| {
        cmd.env("NATS_URL", nats.url())
            .env("PINAZU_CACHE_DIR", store.path())
            .env(
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://127.0.0.1:{}", collector.port),
            )
            .env("OTEL_BSP_SCHEDULE_DELAY", "100");
    };
    let mut c = app("dashboard_flow");
    env(&mut c);
    let coordinator = Proc::spawn("coordinator", {
        c.arg("coordinator");
        c
    });
    let mut a = app("dashboard_flow");
    env(&mut a);
    let _agent = Proc::spawn("agent", {
        a.args(["agent", "--agent-id", "traced-1"]);
        a
    });
    let events = EventRecorder::start(&nats.url());
    let mut run = app("dashboard_flow");
    env(&mut run);
    let out = run
        .args([
            "run",
            "--no-progress",
            "--n=5",
            "--work-ms=1",
            "--fail-every=5",
        ])
        .output()
        .unwrap();
    let end = succeeded(&out, || coordinator.logs());
    let id = end["flow_run_id"].as_str().unwrap().to_string();

    // the run's status events carry its trace id
    let done = events.wait_flow(&id, "SUCCESS", Duration::from_secs(20));
    let trace = done["metadata"]["trace_id"]
        .as_str()
        .unwrap_or_else(|| {
            panic!(
                "no trace id in the run's events ({done}): is the example built with the \
                 feature? `cargo build --features otel --examples` first (scripts/test.sh does)"
            )
        })
        .to_ascii_lowercase();

    // and every party's spans are in that trace, each linked to its parent
    let spans = wait_until(Duration::from_secs(20), "the spans of all three", || {
        let spans: Vec<Span> = collector
            .spans()
            .into_iter()
            .filter(|s| s.1 == trace)
            .collect();
        let has = |service: &str, name: &str| spans.iter().any(|s| s.0 == service && s.4 == name);
        let attempts = spans.iter().filter(|s| s.4 == "attempt").count();
        (has("pinazu-client", "run")
            && has("pinazu-coordinator", "flow_run")
            && has("pinazu-coordinator", "journal.flush")
            && spans.iter().filter(|s| s.4 == "call").count() == 5
            && attempts == 5)
            .then_some(spans)
    });
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.2.as_str(), s)).collect();
    let parent = |s: &Span| by_id.get(s.3.as_str()).map(|p| p.4.clone());
    for s in &spans {
        let expected = match s.4.as_str() {
            "flow_run" => Some("run"),
            "call" | "journal.flush" => Some("flow_run"),
            "attempt" | "cache.get" => Some("call"),
            _ => None,
        };
        if let Some(e) = expected {
            assert_eq!(parent(s).as_deref(), Some(e), "{s:?} in {spans:#?}");
        }
    }
    assert!(spans
        .iter()
        .any(|s| s.0 == "pinazu-agent" && s.4 == "attempt"));
    // the failed call (one in five) and its attempt are marked errors, the others not
    for name in ["call", "attempt"] {
        let errors = spans.iter().filter(|s| s.4 == name && s.5 == 2).count();
        assert_eq!(errors, 1, "{name} spans with an error status: {spans:#?}");
    }
}
