//! The contract Pinazu Core relies on, tried the way it launches flows: the app as a
//! process with `FLOW_RUN_ID`, `NATS_URL` and `--key=value` parameters (no subcommand),
//! and an independent NATS client recording `v1.svc.worker.>`.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The ingest example launched as Pinazu Core does, with its own journal and cache.
struct Launcher {
    nats: NatsServer,
    events: EventRecorder,
    dir: tempfile::TempDir,
}

impl Launcher {
    fn start() -> Self {
        let nats = NatsServer::start();
        let events = EventRecorder::start(&nats.url());
        Launcher {
            nats,
            events,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cmd(&self, app_name: &str, id: &str) -> Command {
        let mut cmd = app(app_name);
        cmd.env("NATS_URL", self.nats.url())
            .env("FLOW_RUN_ID", id)
            .env("PINAZU_CACHE_DIR", self.dir.path().join("cache"))
            .env("PINAZU_JOURNAL_DIR", self.dir.path().join("journal"));
        cmd
    }

    fn launch(&self, app_name: &str, id: &str, args: &[&str]) -> Output {
        self.cmd(app_name, id)
            .args(args)
            .output()
            .expect("the app runs")
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn new_id() -> String {
    pinazu_flows::FlowRunId::new().to_string()
}

#[test]
fn every_start_up_failure_publishes_the_flow_failed_event_and_prints_the_final_line() {
    let l = Launcher::start();
    let not_a_dir = l.dir.path().join("a-file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let journal_in_a_file = not_a_dir.join("journal");
    // (app, arguments, environment, what the error says)
    type Case<'a> = (&'a str, Vec<&'a str>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        ("parallel_flow", vec![], vec![], "missing parameter `n`"),
        (
            "parallel_flow",
            vec!["--n=3", "--colour=blue"],
            vec![],
            "unknown parameter `colour`",
        ),
        ("parallel_flow", vec!["--n=three"], vec![], "parameter `n`"),
        (
            "parallel_flow",
            vec!["--n=3", "--success-task-results", "{not json"],
            vec![],
            "--success-task-results",
        ),
        (
            "ingest_flow",
            vec!["--collection=a"],
            vec![],
            "several flows",
        ),
        (
            "parallel_flow",
            vec!["--n=3"],
            vec![("PINAZU_JOURNAL_DIR", journal_in_a_file.to_str().unwrap())],
            "journal",
        ),
        (
            "parallel_flow",
            vec!["--n=3"],
            vec![("ENABLE_S3_CACHING", "maybe")],
            "ENABLE_S3_CACHING",
        ),
        (
            "parallel_flow",
            vec!["--n=3"],
            vec![("PINAZU_USER_ID", "not-a-uuid")],
            "PINAZU_USER_ID",
        ),
    ];
    for (app_name, args, env, expected) in cases {
        let id = new_id();
        let mut cmd = l.cmd(app_name, &id);
        cmd.args(&args);
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let what = format!("{app_name} {args:?} {env:?}");
        assert_eq!(out.status.code(), Some(2), "{what}: {}", stderr(&out));
        let line = last_json_line(&out);
        assert_eq!(line["status"], "FAILED", "{what}: {line}");
        assert_eq!(line["flow_run_id"], id.as_str(), "{what}: {line}");
        let error = line["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{what}: {error}");
        let event = l.events.wait_flow(&id, "FAILED", Duration::from_secs(10));
        let message = event["message"]["error_message"]
            .as_str()
            .unwrap_or_default();
        assert!(message.contains(expected), "{what}: {event}");
        assert_eq!(l.events.flow_statuses(&id), ["FAILED"], "{what}");
    }
}

#[test]
fn a_run_id_names_one_run_a_successful_one_answers_and_another_use_is_refused() {
    let l = Launcher::start();
    let id = new_id();
    let ingest = ["--flow", "ingest", "--collection=docs", "--docs=6"];
    let first = l.launch("ingest_flow", &id, &ingest);
    assert!(first.status.success(), "{}", stderr(&first));
    let first_line = last_json_line(&first);
    l.events.wait_flow(&id, "SUCCESS", Duration::from_secs(10));
    let tasks_after_first = l.events.task_events(&id).len();
    assert!(tasks_after_first > 0);

    // the same flow and parameters (defaults spelled out or not): the recorded outcome,
    // nothing runs again
    let again = l.launch(
        "ingest_flow",
        &id,
        &[
            "--flow",
            "ingest",
            "--collection=docs",
            "--docs=6",
            "--slow-ms=0",
        ],
    );
    assert!(again.status.success(), "{}", stderr(&again));
    let again_line = last_json_line(&again);
    assert_eq!(again_line["status"], "SUCCESS");
    assert_eq!(again_line["result"], first_line["result"]);
    wait_until(Duration::from_secs(10), "the second SUCCESS event", || {
        (l.events.flow_statuses(&id) == ["RUNNING", "SUCCESS", "SUCCESS"]).then_some(())
    });
    assert_eq!(
        l.events.task_events(&id).len(),
        tasks_after_first,
        "no task ran again"
    );

    // another flow under that id: refused, naming both
    let other = l.launch(
        "ingest_flow",
        &id,
        &["--flow", "backfill", "--collections=[\"docs\"]"],
    );
    assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
    let err = last_json_line(&other)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("`ingest`") && err.contains("`backfill`") && err.contains(&id),
        "{err}"
    );
    // other parameters: refused too
    let other = l.launch(
        "ingest_flow",
        &id,
        &["--flow", "ingest", "--collection=docs", "--docs=7"],
    );
    assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
    let err = last_json_line(&other)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("\"docs\":6") && err.contains("\"docs\":7"),
        "{err}"
    );
    // nor does a request with bad parameters under the id of a run that exists
    let bad = l.launch(
        "ingest_flow",
        &id,
        &["--flow", "ingest", "--collection=docs", "--docs=many"],
    );
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
    // none of these published anything under the run's id
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        l.events.flow_statuses(&id),
        ["RUNNING", "SUCCESS", "SUCCESS"]
    );
}

#[test]
fn a_failed_run_started_again_under_its_id_reuses_its_successes() {
    let l = Launcher::start();
    let id = new_id();
    let args = [
        "--flow",
        "ingest",
        "--collection=f",
        "--docs=5",
        "--fail=true",
    ];
    let failed = l.launch("ingest_flow", &id, &args);
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let first = last_json_line(&failed);
    let again = l.launch("ingest_flow", &id, &args);
    assert_eq!(again.status.code(), Some(1), "{}", stderr(&again));
    let line = last_json_line(&again);
    // the first run's successes (5 fetch, 4 parse, 4 embed) answer from the journal;
    // its failures (the empty document's parse, the summary) run again
    assert_eq!(first["stats"]["executions"], 15, "{first}");
    assert_eq!(line["stats"]["replayed"], 13, "{line}");
    assert_eq!(line["stats"]["executions"], 2, "{line}");
    // with other parameters it is another run: refused
    let other = l.launch(
        "ingest_flow",
        &id,
        &["--flow", "ingest", "--collection=f", "--docs=5"],
    );
    assert_eq!(other.status.code(), Some(2), "{}", stderr(&other));
}

#[test]
fn labelled_tasks_run_embedded_unless_labels_restrict_the_agents() {
    let l = Launcher::start();
    let out = l.launch(
        "ingest_flow",
        &new_id(),
        &["--flow", "ingest", "--collection=c", "--docs=5"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_json_line(&out)["result"]["embedded"], 4);

    let started = Instant::now();
    let out = l.launch(
        "ingest_flow",
        &new_id(),
        &[
            "--flow",
            "ingest",
            "--collection=c",
            "--docs=5",
            "--labels",
            "gpu=false",
        ],
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = last_json_line(&out)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("`embed`") && err.contains("gpu=true") && err.contains("--labels"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "it failed at once, not after a schedule timeout"
    );
}

#[test]
fn parameters_are_read_as_a_person_types_them() {
    let l = Launcher::start();
    for (typed, expected) in [("42", "42"), ("true", "true"), ("007", "007")] {
        let out = l.launch(
            "ingest_flow",
            &new_id(),
            &[
                "--flow",
                "ingest",
                &format!("--collection={typed}"),
                "--docs=1",
            ],
        );
        assert!(out.status.success(), "{typed}: {}", stderr(&out));
        assert_eq!(
            last_json_line(&out)["result"]["collection"],
            expected,
            "{typed}"
        );
    }
    // JSON given as JSON (--input) is taken as it is, not read again as text
    let out = l.launch(
        "ingest_flow",
        &new_id(),
        &[
            "--flow",
            "ingest",
            "--input",
            r#"{"collection": "\"q\"", "docs": 1}"#,
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(last_json_line(&out)["result"]["collection"], "\"q\"");
    // JSON for the others
    let out = l.launch(
        "ingest_flow",
        &new_id(),
        &[
            "--flow",
            "backfill",
            "--collections=[\"a\",\"b\"]",
            "--docs=2",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        last_json_line(&out)["result"].as_array().map(Vec::len),
        Some(2)
    );
    let out = l.launch(
        "ingest_flow",
        &new_id(),
        &["--flow", "ingest", "--collection=a", "--docs=many"],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = last_json_line(&out)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        err.contains("parameter `docs`") && err.contains("many"),
        "{err}"
    );
}

#[test]
fn events_carry_the_launchers_header_trace_id_and_the_calls_md5() {
    let l = Launcher::start();
    let id = new_id();
    let user = "11111111-2222-4333-8444-555555555555";
    let thread = "66666666-7777-4888-8999-aaaaaaaaaaaa";
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let out = l
        .cmd("example_flow", &id)
        .env("PINAZU_USER_ID", user)
        .env("PINAZU_THREAD_ID", thread)
        .env("TRACEPARENT", format!("00-{trace}-00f067aa0ba902b7-01"))
        .args(["--a=5", "--b=3"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    l.events.wait_flow(&id, "SUCCESS", Duration::from_secs(10));
    let events = l.events.of_run(&id);
    assert!(events.len() >= 14, "{events:?}");
    for e in &events {
        assert_eq!(e["header"]["user_id"], user, "{e}");
        assert_eq!(e["header"]["thread_id"], thread, "{e}");
        assert_eq!(e["header"]["connection_id"], Value::Null, "{e}");
        assert_eq!(e["metadata"]["trace_id"], trace, "{e}");
        let status = e["message"]["status"].as_str().unwrap();
        if status != "FAILED" && !(status == "PENDING" && e["message"]["error_message"].is_string())
        {
            assert_eq!(e["message"]["error_message"], Value::Null, "{e}");
        }
    }
    // every task SUCCESS carries the original MD5 of its call, cached or not
    let md5 = |task: &str, args: &str| {
        format!(
            "{:x}",
            md5::compute(format!(
                r#"{{"args":{args},"kwargs":{{}},"task_name":"{task}"}}"#
            ))
        )
    };
    let keys: Vec<(String, String)> = l
        .events
        .task_events(&id)
        .iter()
        .filter(|e| e["message"]["status"] == "SUCCESS")
        .map(|e| {
            (
                e["message"]["task_name"].as_str().unwrap().to_string(),
                e["message"]["result_cache_key"]
                    .as_str()
                    .unwrap_or("null")
                    .to_string(),
            )
        })
        .collect();
    assert_eq!(
        keys,
        [
            ("add".to_string(), md5("add", "[5,3]")),
            ("multiply".to_string(), md5("multiply", "[8,2]")),
            ("subtract".to_string(), md5("subtract", "[16,1]")),
            ("describe".to_string(), md5("describe", "[15]")),
        ]
    );

    // what the events carried goes back in: bare MD5s, or the object path of a cached
    // call; a key that matches nothing is named in a warning
    let seeds = serde_json::json!({
        keys[0].1.clone(): 8,
        format!("result_cache/flow-{id}/tasks/multiply/{}.json", keys[1].1): 16,
        "00000000000000000000000000000000": 1,
    });
    let out = l
        .cmd("example_flow", &new_id())
        .args([
            "--a=5",
            "--b=3",
            "--success-task-results",
            &seeds.to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let line = last_json_line(&out);
    assert_eq!(line["stats"]["replayed"], 2, "{line}");
    // subtract ran; describe ran or came from its `inputs` cache entry
    let ran = line["stats"]["executions"].as_u64().unwrap()
        + line["stats"]["cache_hits"].as_u64().unwrap();
    assert_eq!(ran, 2, "{line}");
    let err = stderr(&out);
    assert!(
        err.contains("matched no call") && err.contains("00000000000000000000000000000000"),
        "{err}"
    );
}

#[test]
fn a_task_knows_where_it_runs_and_its_typed_error_reaches_the_flow() {
    let l = Launcher::start();
    let id = new_id();
    let out = l.launch(
        "ingest_flow",
        &id,
        &[
            "--flow",
            "ingest",
            "--collection=c",
            "--docs=10",
            "--agents=1",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let result = &last_json_line(&out)["result"];
    // documents 4 and 9 are empty: their ParseError came back typed
    assert_eq!(
        result["skipped"],
        serde_json::json!(["c/4", "c/9"]),
        "{result}"
    );
    assert_eq!(result["embedded"], 8);
    let ran_on = &result["ran_on"];
    assert_eq!(ran_on["flow_run_id"], id.as_str(), "{ran_on}");
    assert_eq!(ran_on["current_flow_run_id"], id.as_str(), "{ran_on}");
    assert_eq!(ran_on["task"], "where_am_i");
    assert_eq!(ran_on["attempt"], 1);
    assert_eq!(ran_on["agent_id"], "embedded-0");
}

#[test]
fn the_app_is_its_own_program() {
    let out = app("ingest_flow").arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("ingest_flow"), "{help}");
    for expected in [
        "ingest: Ingests",
        "--collection=<String>",
        "--docs=<u32> [default: 10]",
        "backfill",
        "--collections=<Vec<String>>",
    ] {
        assert!(help.contains(expected), "{expected}: {help}");
    }
    let out = app("ingest_flow").arg("-V").output().unwrap();
    let version = String::from_utf8_lossy(&out.stdout);
    assert!(
        version.starts_with(&format!("ingest_flow {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    let out = app("ingest_flow").arg("--list").output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for expected in [
        "--slow-ms=<u64> [default: 0]",
        "embed (labels gpu=true)",
        "summarize (version 1; cache inputs)",
    ] {
        assert!(list.contains(expected), "{expected}: {list}");
    }
}

#[test]
fn a_second_process_with_a_running_run_id_is_refused_not_run_twice() {
    let l = Launcher::start();
    let id = new_id();
    let mut first = l
        .cmd("parallel_flow", &id)
        .args(["--n=40", "--work-ms=300", "--agents=1", "--slots=4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    l.events.wait_flow(&id, "RUNNING", Duration::from_secs(20));
    let second = l.launch("parallel_flow", &id, &["--n=40", "--work-ms=300"]);
    assert_eq!(second.status.code(), Some(2), "{}", stderr(&second));
    let err = last_json_line(&second)["error"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(err.contains("already running in process"), "{err}");
    assert!(first.wait().unwrap().success());
    // one run: one RUNNING, one SUCCESS, 40 task executions
    l.events.wait_flow(&id, "SUCCESS", Duration::from_secs(10));
    assert_eq!(l.events.flow_statuses(&id), ["RUNNING", "SUCCESS"]);
    let running = l
        .events
        .task_events(&id)
        .iter()
        .filter(|e| e["message"]["status"] == "RUNNING")
        .count();
    assert_eq!(running, 40);
}

#[test]
fn a_command_line_clap_refuses_still_ends_the_run_and_a_mistyped_store_is_refused() {
    let l = Launcher::start();
    for args in [
        vec!["--n=3", "--slots", "0"],
        vec!["--n=3", "--agents", "0"],
        vec!["--n=3", "stray-positional"],
    ] {
        let id = new_id();
        let out = l.launch("parallel_flow", &id, &args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let line = last_json_line(&out);
        assert_eq!(line["status"], "FAILED", "{args:?}: {line}");
        assert_eq!(line["flow_run_id"], id.as_str());
        l.events.wait_flow(&id, "FAILED", Duration::from_secs(10));
    }
    for store in ["S3:/flow-cache-bucket", "ftp://host/path"] {
        let id = new_id();
        let out = l.launch("parallel_flow", &id, &["--n=3", "--store", store]);
        assert_eq!(out.status.code(), Some(2), "{store}: {}", stderr(&out));
        let err = last_json_line(&out)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(err.contains("--store"), "{store}: {err}");
        assert!(!std::path::Path::new("S3:").exists() && !std::path::Path::new("ftp:").exists());
    }
}

#[test]
fn sigterm_ends_an_embedded_run_cancelled_with_every_task_ended() {
    let l = Launcher::start();
    let id = new_id();
    let child = l
        .cmd("parallel_flow", &id)
        .args(["--n=100", "--work-ms=1000", "--agents=1", "--slots=4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(Duration::from_secs(20), "attempts running", || {
        let tasks = l.events.task_events(&id);
        (tasks
            .iter()
            .filter(|e| e["message"]["status"] == "RUNNING")
            .count()
            >= 4)
            .then_some(())
    });
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let line = last_json_line(&out);
    assert_eq!(line["status"], "FAILED");
    assert!(
        line["error"]
            .as_str()
            .unwrap_or_default()
            .contains("cancelled"),
        "{line}"
    );
    l.events.wait_flow(&id, "FAILED", Duration::from_secs(10));
    let tasks = l.events.task_events(&id);
    let count = |s: &str| tasks.iter().filter(|e| e["message"]["status"] == s).count();
    assert_eq!(count("PENDING"), 100);
    assert_eq!(count("SUCCESS") + count("FAILED"), 100, "{tasks:?}");
}
