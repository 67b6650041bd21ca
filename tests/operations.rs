//! What an operator does and breaks, done for real: a second agent under a live id,
//! SIGTERM while NATS is down, a hand-edited cache object, credentials in the NATS URL,
//! services started before nats-server, agents on another store, an agent SIGKILLed
//! under long attempts, S3 down while results are written.

mod common;

use common::*;
use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const APP: &str = "parallel_flow";

/// A command of `app` against `url`, with a cache (store) and journal of `dir`.
fn cmd_in(app_name: &str, url: &str, dir: &std::path::Path) -> Command {
    let mut cmd = app(app_name);
    cmd.env("NATS_URL", url)
        .env("PINAZU_CACHE_DIR", dir.join("cache"))
        .env("PINAZU_JOURNAL_DIR", dir.join("journal"));
    cmd
}

fn agent_cmd(url: &str, dir: &std::path::Path, id: &str, extra: &[&str]) -> Command {
    let mut cmd = cmd_in(APP, url, dir);
    cmd.args(["agent", "--agent-id", id]).args(extra);
    cmd
}

fn coordinator_cmd(url: &str, dir: &std::path::Path, extra: &[&str]) -> Command {
    let mut cmd = cmd_in(APP, url, dir);
    cmd.args(["coordinator", "--dead-after", "2s"]).args(extra);
    cmd
}

fn agents(url: &str, dir: &std::path::Path) -> Vec<Value> {
    let out = cmd_in(APP, url, dir)
        .args(["agents", "--json"])
        .output()
        .unwrap();
    serde_json::from_slice::<Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

fn wait_agents(url: &str, dir: &std::path::Path, n: usize, procs: &[&Proc]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while agents(url, dir).len() != n {
        if Instant::now() > deadline {
            let logs: Vec<String> = procs
                .iter()
                .map(|p| format!("--- {} ---\n{}", p.name, p.logs()))
                .collect();
            panic!("timed out waiting for {n} agents\n{}", logs.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn attempt_lines(p: &Proc) -> usize {
    p.logs()
        .lines()
        .filter(|l| l.contains("attempt started"))
        .count()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits for a process to exit; its exit code, or None after `timeout`.
fn exit_within(p: &mut Proc, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if !p.is_running() {
            return Some(p.exit_code());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[test]
fn a_second_agent_under_a_live_id_is_refused_naming_the_other_and_nothing_runs_twice() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let _coordinator = Proc::spawn("coordinator", coordinator_cmd(&url, dir.path(), &[]));
    let first = Proc::spawn("d2", agent_cmd(&url, dir.path(), "d2", &[]));
    wait_agents(&url, dir.path(), 1, &[&first]);
    let mut second = Proc::spawn("d2-again", agent_cmd(&url, dir.path(), "d2", &[]));
    assert_eq!(
        exit_within(&mut second, Duration::from_secs(15)),
        Some(2),
        "a second agent under a live id must be refused\n{}",
        second.logs()
    );
    let err = second.logs();
    assert!(
        err.contains("agent id d2 is already in use by pid")
            && err.contains(&first.pid().to_string()),
        "{err}"
    );
    let mut twins: Vec<Proc> = (0..2)
        .map(|i| {
            Proc::spawn(
                &format!("twin-{i}"),
                agent_cmd(&url, dir.path(), "twin", &[]),
            )
        })
        .collect();
    // two started at the same moment: never both keep the id (each that sees the
    // other gives way; both may, and then the id is free for the next one)
    let running = |twins: &mut Vec<Proc>| {
        twins
            .iter_mut()
            .filter_map(|t| t.is_running().then_some(()))
            .count()
    };
    wait_until(Duration::from_secs(20), "the twins to settle", || {
        (running(&mut twins) <= 1).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        running(&mut twins) <= 1,
        "--- twin-0 ---\n{}\n--- twin-1 ---\n{}",
        twins[0].logs(),
        twins[1].logs()
    );
    for t in twins.iter_mut() {
        if t.is_running() {
            continue;
        }
        assert_eq!(t.exit_code(), 2);
        assert!(t.logs().contains("agent id twin is already in use by pid"));
    }
    // a run: every call executed once
    let out = cmd_in(APP, &url, dir.path())
        .args(["run", "--n=300"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let lines = attempt_lines(&first) + twins.iter().map(attempt_lines).sum::<usize>();
    assert_eq!(lines, 300);
}

#[test]
fn an_agent_and_a_coordinator_stop_on_sigterm_with_nats_down_and_a_second_signal_is_at_once() {
    let mut nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let mut coordinator = Proc::spawn("coordinator", coordinator_cmd(&url, dir.path(), &[]));
    let mut agent = Proc::spawn(
        "a1",
        agent_cmd(&url, dir.path(), "a1", &["--drain-timeout", "3s"]),
    );
    let mut patient = Proc::spawn(
        "a2",
        agent_cmd(&url, dir.path(), "a2", &["--drain-timeout", "60s"]),
    );
    wait_agents(&url, dir.path(), 2, &[&agent, &patient]);
    let _run = cmd_in(APP, &url, dir.path())
        .args(["run", "--detach", "--n=100", "--work-ms=60000"])
        .output()
        .unwrap();
    wait_until(Duration::from_secs(20), "attempts running", || {
        (attempt_lines(&agent) > 0 && attempt_lines(&patient) > 0).then_some(())
    });
    nats.kill();
    // the drain timeout bounds everything, NATS or not
    let started = Instant::now();
    agent.signal("TERM");
    let code = exit_within(&mut agent, Duration::from_secs(15));
    assert!(
        code.is_some(),
        "still running 15 s after SIGTERM\n{}",
        agent.logs()
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(agent.logs().contains("drain timeout"), "{}", agent.logs());
    // a second signal exits at once, whatever the drain timeout
    patient.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(patient.is_running(), "it drains (60 s)");
    patient.signal("TERM");
    assert_eq!(exit_within(&mut patient, Duration::from_secs(3)), Some(130));
    // the coordinator too
    let started = Instant::now();
    coordinator.signal("TERM");
    assert!(
        exit_within(&mut coordinator, Duration::from_secs(15)).is_some(),
        "{}",
        coordinator.logs()
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_cache_entry_that_no_longer_decodes_is_a_miss_rewritten_and_a_journal_is_shown_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    let run = |id: &str, args: &[&str]| {
        let mut cmd = app("example_flow");
        cmd.env("PINAZU_STORE", &store)
            .env("PINAZU_JOURNAL_DIR", dir.path().join("journal"))
            .env("FLOW_RUN_ID", id)
            .args(args);
        cmd.output().unwrap()
    };
    let first = run(
        &pinazu_flows::FlowRunId::new().to_string(),
        &["--a=5", "--b=3"],
    );
    assert!(first.status.success(), "{}", stderr(&first));
    // `describe` is cached by its inputs; its return type is String: a hand edit (or a
    // changed return type) leaves a number there
    let md5 = format!(
        "{:x}",
        md5::compute(br#"{"args":[15],"kwargs":{},"task_name":"describe"}"#)
    );
    let object = store.join(format!("result_cache/inputs/describe/v1/{md5}.json"));
    let mut rec: Value = serde_json::from_slice(&std::fs::read(&object).unwrap()).unwrap();
    rec["result"] = serde_json::json!(42);
    std::fs::write(&object, serde_json::to_vec(&rec).unwrap()).unwrap();
    let id = pinazu_flows::FlowRunId::new().to_string();
    let second = run(&id, &["--a=5", "--b=3"]);
    assert!(second.status.success(), "{}", stderr(&second));
    let line = last_json_line(&second);
    assert_eq!(line["result"], "15 is odd and non-negative");
    assert_eq!(line["stats"]["cache_hits"], 0, "a miss, not a hit: {line}");
    assert!(
        stderr(&second).contains("does not decode"),
        "{}",
        stderr(&second)
    );
    let rewritten: Value = serde_json::from_slice(&std::fs::read(&object).unwrap()).unwrap();
    assert_eq!(rewritten["result"], "15 is odd and non-negative");
    // the journal of that run (a success keeps its end), shown then removed
    let show = run(&id, &["journal", "show", &id]);
    assert!(show.status.success(), "{}", stderr(&show));
    let text = String::from_utf8_lossy(&show.stdout).to_string();
    assert!(
        text.contains("RunEnded") && text.contains("SUCCESS"),
        "{text}"
    );
    // with NATS_URL too, on a server no coordinator used: the local journal answers and
    // the operator command creates no stream there
    let nats = NatsServer::start();
    let mut cmd = app("example_flow");
    cmd.env("PINAZU_JOURNAL_DIR", dir.path().join("journal"))
        .env("NATS_URL", nats.url())
        .args(["journal", "show", &id]);
    let shown = cmd.output().unwrap();
    assert!(shown.status.success(), "{}", stderr(&shown));
    assert!(String::from_utf8_lossy(&shown.stdout).contains("RunEnded"));
    assert_eq!(nats.stream_names(), Vec::<String>::new());
    let rm = run(&id, &["journal", "rm", &id]);
    assert!(rm.status.success(), "{}", stderr(&rm));
    assert_eq!(run(&id, &["journal", "show", &id]).status.code(), Some(2));
    // forgotten: the id runs again (its cached calls are hits now)
    let again = run(&id, &["--a=5", "--b=3"]);
    assert_eq!(last_json_line(&again)["stats"]["cache_hits"], 1);
}

fn secret_server(args: &[&str]) -> NatsServer {
    NatsServer::start_with(args)
}

#[test]
fn credentials_in_the_nats_url_are_honoured_and_never_printed() {
    for (server, good, bad, secret) in [
        (
            vec!["--user", "ops", "--pass", "pa55-w0rd-42"],
            "ops:pa55-w0rd-42",
            "ops:wrong-pass-7",
            "pa55-w0rd-42",
        ),
        (
            vec!["--auth", "t0ken-s3cret-99"],
            "t0ken-s3cret-99",
            "bad-t0ken-88",
            "t0ken-s3cret-99",
        ),
    ] {
        let nats = secret_server(&server);
        let dir = tempfile::tempdir().unwrap();
        let url = format!("nats://{good}@127.0.0.1:{}", nats.port);
        let coordinator = Proc::spawn("coordinator", coordinator_cmd(&url, dir.path(), &[]));
        let agent = Proc::spawn("a1", agent_cmd(&url, dir.path(), "a1", &[]));
        wait_agents(&url, dir.path(), 1, &[&coordinator, &agent]);
        let out = cmd_in(APP, &url, dir.path())
            .args(["run", "--n=20"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        // refused: the message shows the URL without its secret
        let bad_url = format!("nats://{bad}@127.0.0.1:{}", nats.port);
        let out = cmd_in(APP, &bad_url, dir.path())
            .args(["agents"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = stderr(&out);
        assert!(err.contains("***@127.0.0.1"), "{err}");
        let bad_secret = bad.rsplit(':').next().unwrap();
        for text in [&err, &coordinator.logs(), &agent.logs()] {
            assert!(
                !text.contains(secret) && !text.contains(bad_secret),
                "{text}"
            );
        }
    }
}

#[test]
fn services_started_before_nats_wait_for_it_and_clients_give_up_quickly() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Proc::spawn("coordinator", coordinator_cmd(&url, dir.path(), &[]));
    let agent = Proc::spawn("a1", agent_cmd(&url, dir.path(), "a1", &[]));
    // a client does not wait for ever
    let started = Instant::now();
    let out = cmd_in(APP, &url, dir.path())
        .args(["agents", "--connect-timeout", "1s"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(started.elapsed() < Duration::from_secs(5));
    wait_until(
        Duration::from_secs(10),
        "the services to say they wait",
        || {
            (coordinator.logs().contains("waiting for NATS")
                && agent.logs().contains("waiting for NATS"))
            .then_some(())
        },
    );
    let mut coordinator = coordinator;
    let mut agent = agent;
    assert!(coordinator.is_running() && agent.is_running());
    // the server comes up on that port: they connect, and a run works
    let _nats = NatsServer::start_on(port);
    wait_agents(&url, dir.path(), 1, &[&coordinator, &agent]);
    let out = cmd_in(APP, &url, dir.path())
        .args(["run", "--n=50"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn an_agent_on_another_store_is_refused_saying_what_to_set() {
    let nats = NatsServer::start();
    let url = nats.url();
    let (ours, theirs) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    // the agent first: it learns when the coordinator comes
    let mut early = Proc::spawn("early", agent_cmd(&url, theirs.path(), "early", &[]));
    std::thread::sleep(Duration::from_millis(500));
    let coordinator = Proc::spawn("coordinator", coordinator_cmd(&url, ours.path(), &[]));
    assert_eq!(
        exit_within(&mut early, Duration::from_secs(20)),
        Some(2),
        "{}\n{}",
        early.logs(),
        coordinator.logs()
    );
    assert!(
        early.logs().contains("is not the coordinator's"),
        "{}",
        early.logs()
    );
    // and one started after the coordinator is refused at once
    wait_until(Duration::from_secs(20), "the coordinator to serve", || {
        coordinator
            .logs()
            .contains("coordinator serving")
            .then_some(())
    });
    let late = agent_cmd(&url, theirs.path(), "late", &[])
        .output()
        .unwrap();
    assert_eq!(late.status.code(), Some(2));
    let err = stderr(&late);
    assert!(
        err.contains("is not the coordinator's") && err.contains("PINAZU_STORE"),
        "{err}"
    );
    // on the coordinator's store it is welcome
    let good = Proc::spawn("good", agent_cmd(&url, ours.path(), "good", &[]));
    wait_agents(&url, ours.path(), 1, &[&good]);
}

/// Runs `run ARGS` in the background; its output once it ended (within 90 s).
fn run_to_end(cmd: &mut Command, logs: &dyn Fn() -> String) -> (Output, Duration) {
    let started = Instant::now();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "the run did not end\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let elapsed = started.elapsed();
    (child.wait_with_output().unwrap(), elapsed)
}

#[test]
fn executions_count_every_attempt_that_ran_and_wall_time_survives_a_restart() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let url = nats.url();
    let mut coordinator = Proc::spawn("coordinator", coordinator_cmd(&url, dir.path(), &[]));
    let mut doomed = Proc::spawn(
        "doomed",
        agent_cmd(&url, dir.path(), "doomed", &["--slots", "4"]),
    );
    wait_agents(&url, dir.path(), 1, &[&doomed]);
    let mut run = cmd_in(APP, &url, dir.path());
    run.args(["run", "--n=8", "--work-ms=3000"]);
    let run = std::thread::spawn(move || run_to_end(&mut run, &|| String::new()).0);
    // four attempts running on the agent, which dies with them
    wait_until(
        Duration::from_secs(20),
        "4 attempts on the doomed agent",
        || (attempt_lines(&doomed) == 4).then_some(()),
    );
    doomed.kill9();
    let survivor = Proc::spawn(
        "survivor",
        agent_cmd(&url, dir.path(), "survivor", &["--slots", "8"]),
    );
    let out = run.join().unwrap();
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS", "{line}\n{}", stderr(&out));
    let ran = attempt_lines(&doomed) + attempt_lines(&survivor);
    assert_eq!(ran, 12, "4 lost with the agent, 8 on the survivor");
    assert_eq!(line["stats"]["executions"], ran as u64, "{line}");

    // a coordinator restart in the middle of a run: its wall time goes on from the start
    let id = "0a0a0a0a-1111-4222-8333-444455556666";
    let mut run = cmd_in(APP, &url, dir.path());
    run.args(["run", "--n=4", "--work-ms=3000", "--flow-run-id", id]);
    let run = std::thread::spawn(move || run_to_end(&mut run, &|| String::new()));
    wait_until(Duration::from_secs(20), "the run's attempts", || {
        (attempt_lines(&survivor) >= 12).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    coordinator.kill9();
    let _coordinator2 = Proc::spawn("coordinator-2", coordinator_cmd(&url, dir.path(), &[]));
    let (out, elapsed) = run.join().unwrap();
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS", "{line}\n{}", stderr(&out));
    let wall = line["stats"]["wall_ms"].as_u64().unwrap();
    assert!(
        wall >= 3000 && wall as f64 >= elapsed.as_millis() as f64 * 0.7,
        "wall {wall} ms of a run that took {elapsed:?}"
    );
}

#[test]
fn bad_numbers_are_refused_in_words() {
    for args in [["--n=3", "--slots", "-1"], ["--n=3", "--agents", "0"]] {
        let out = app(APP).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr(&out).contains("must be at least 1"),
            "{}",
            stderr(&out)
        );
    }
    let out = app(APP)
        .args(["agent", "--slots", "0", "--nats-url", "nats://127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("must be at least 1"),
        "{}",
        stderr(&out)
    );
    // durations too
    for (args, says) in [
        (["coordinator", "--dead-after", "0"], "too short"),
        (["coordinator", "--schedule-timeout", "0s"], "is zero"),
        (["agent", "--drain-timeout", "-1s"], "is negative"),
    ] {
        let out = app(APP)
            .args(args)
            .args(["--nats-url", "nats://127.0.0.1:1"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}

#[test]
fn json_logs_carry_status_events_as_objects_and_cache_help_is_short() {
    let dir = tempfile::tempdir().unwrap();
    let out = app("retry_flow")
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "debug")
        .env("PINAZU_CACHE_DIR", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let events: Vec<Value> = stderr(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "pinazu::events")
        .collect();
    assert!(!events.is_empty());
    assert!(events
        .iter()
        .all(|e| e["event"]["message"]["flow_run_id"].is_string()));
    // a failure's whole chain on one line
    let failed: Vec<&Value> = events
        .iter()
        .filter(|e| e["event"]["message"]["status"] == "FAILED")
        .collect();
    assert!(
        failed.iter().any(|e| e["event"]["message"]["error_message"]
            == "calling the broken service: service unavailable"),
        "{failed:?}"
    );
    let help = app(APP)
        .args(["cache", "clear", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(
        text.contains("--task") && text.contains("--store"),
        "{text}"
    );
    assert!(
        !text.contains("--nats-url") && !text.contains("--journal-dir"),
        "{text}"
    );
}

#[test]
fn a_missing_tls_file_is_named() {
    let out = app(APP)
        .args([
            "agents",
            "--nats-url",
            "nats://127.0.0.1:1",
            "--nats-tls-ca",
            "/no/such/ca.pem",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/no/such/ca.pem"), "{}", stderr(&out));
}
