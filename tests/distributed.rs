//! Distributed mode for real: a nats-server, a coordinator process and agent processes,
//! all started by the test on free ports; faults caused for real (SIGKILL, SIGSTOP,
//! server restart, garbage on subjects).

mod common;

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const APP: &str = "parallel_flow";

fn sum_squares(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

struct Cluster {
    nats: NatsServer,
    coordinator: Proc,
    agents: Vec<Proc>,
    app: &'static str,
    _cache: tempfile::TempDir,
}

impl Cluster {
    fn start(app: &'static str, agents: usize, slots: u32) -> Self {
        Self::start_on(NatsServer::start(), app, agents, slots, &[])
    }

    fn start_on(
        nats: NatsServer,
        app: &'static str,
        agents: usize,
        slots: u32,
        coord_args: &[&str],
    ) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let mut c = Cluster {
            coordinator: Proc::spawn("coordinator", {
                let mut cmd = base(app, &nats.url(), cache.path());
                cmd.arg("coordinator")
                    .args(["--dead-after", "2s"])
                    .args(coord_args);
                cmd
            }),
            nats,
            agents: Vec::new(),
            app,
            _cache: cache,
        };
        for i in 0..agents {
            c.add_agent(&format!("agent-{i}"), slots);
        }
        c.wait_agents(agents);
        c
    }

    fn add_agent(&mut self, id: &str, slots: u32) {
        self.add_agent_with(id, slots, &[]);
    }

    fn add_agent_with(&mut self, id: &str, slots: u32, extra: &[&str]) {
        let mut cmd = self.cmd();
        cmd.args([
            "agent",
            "--agent-id",
            id,
            "--slots",
            &slots.to_string(),
            "--drain-timeout",
            "10s",
        ])
        .args(extra);
        self.agents.push(Proc::spawn(id, cmd));
    }

    /// SIGKILLs the coordinator and starts a new one (same journal, same store).
    fn restart_coordinator(&mut self) {
        self.coordinator.kill9();
        let mut cmd = self.cmd();
        cmd.arg("coordinator").args(["--dead-after", "2s"]);
        self.coordinator = Proc::spawn("coordinator-2", cmd);
    }

    /// Attempt-start lines in every agent's log (one per execution).
    fn attempt_lines(&self) -> usize {
        self.agents
            .iter()
            .map(|a| {
                a.logs()
                    .lines()
                    .filter(|l| l.contains("attempt started"))
                    .count()
            })
            .sum()
    }

    fn cmd(&self) -> Command {
        base(self.app, &self.nats.url(), self._cache.path())
    }

    fn output(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("command runs")
    }

    fn json(&self, args: &[&str]) -> Value {
        let out = self.output(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn agents(&self) -> Vec<Value> {
        self.json(&["agents", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Attempts running on all live agents, as `agents --json` reports them.
    fn running_attempts(&self) -> u64 {
        self.agents()
            .iter()
            .map(|a| a["running"].as_u64().unwrap_or(0))
            .sum()
    }

    fn wait_agents(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = self.output(&["agents", "--json"]);
            let v: Option<Value> = serde_json::from_slice(&out.stdout).ok();
            if v.as_ref().and_then(Value::as_array).map(Vec::len) == Some(n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "timed out after 30 s waiting for {n} live agents; last answer: {}{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `run ...` in the background with its stdout piped.
    fn spawn_run(&self, args: &[&str]) -> std::process::Child {
        let mut cmd = self.cmd();
        cmd.arg("run")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd.spawn().expect("run starts")
    }

    fn status(&self, id: &str) -> Value {
        self.json(&["status", id, "--json"])
    }

    fn logs(&self) -> String {
        let mut s = format!("--- coordinator ---\n{}", self.coordinator.logs());
        for a in &self.agents {
            s.push_str(&format!("\n--- {} ---\n{}", a.name, a.logs()));
        }
        s
    }
}

fn base(app: &str, url: &str, cache: &std::path::Path) -> Command {
    let mut cmd = common::app(app);
    cmd.env("NATS_URL", url)
        .env("PINAZU_CACHE_DIR", cache)
        .env("PINAZU_JOURNAL_DIR", cache.join("journal"));
    cmd
}

fn finish(child: std::process::Child, timeout: Duration, cluster: &Cluster) -> Output {
    finish_within(child, timeout, || cluster.logs())
}

/// Waits until the run `id` has completed at least `n` calls.
fn wait_progress(c: &Cluster, id: &str, n: u64) {
    wait_until(
        Duration::from_secs(30),
        &format!("run {id} to complete {n} calls"),
        || {
            let out = c.output(&["status", id, "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            (v["completed"].as_u64()? >= n).then_some(())
        },
    );
}

#[test]
fn fan_out_of_5000_tasks_over_3_agent_processes_returns_the_exact_sum() {
    let c = Cluster::start(APP, 3, 4);
    let agents = c.agents();
    assert_eq!(agents.len(), 3);
    assert!(agents
        .iter()
        .all(|a| a["tasks"] == serde_json::json!(["square"])));
    let out = c.output(&["run", "--n=5000"]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    assert_eq!(line["result"], sum_squares(5000));
    assert_eq!(line["stats"]["tasks"], 5000);
    assert_eq!(line["stats"]["executions"], 5000);
    // every agent took part
    let runs = c.json(&["runs", "--json"]);
    assert_eq!(runs.as_array().unwrap().len(), 1);
}

#[test]
fn an_agent_killed_mid_run_has_its_attempts_run_elsewhere() {
    let mut c = Cluster::start(APP, 3, 4);
    let id = "3d1f6f4e-0c1b-4c55-9a2e-6a9a8e1b7c01";
    let run = c.spawn_run(&["--n=1500", "--work-ms=20", "--flow-run-id", id]);
    wait_progress(&c, id, 200);
    let killed_at = Instant::now();
    c.agents[0].kill9();
    // within seconds the coordinator sees it gone
    wait_until(
        Duration::from_secs(6),
        "the killed agent to be declared dead",
        || (c.agents().len() == 2).then_some(()),
    );
    assert!(killed_at.elapsed() < Duration::from_secs(6));
    let out = finish(run, Duration::from_secs(60), &c);
    assert!(out.status.success(), "{}", c.logs());
    let line = last_json_line(&out);
    assert_eq!(line["result"], sum_squares(1500));
    let executions = line["stats"]["executions"].as_u64().unwrap();
    assert!(executions >= 1500, "{line}");
    assert!(
        c.coordinator.logs().contains("agent is gone"),
        "{}",
        c.logs()
    );
}

#[test]
fn a_frozen_agent_is_declared_dead_and_its_late_results_are_ignored() {
    let c = Cluster::start(APP, 2, 4);
    let id = "5b2c1a7e-7777-4a0b-8c1d-111122223333";
    let run = c.spawn_run(&["--n=600", "--work-ms=30", "--flow-run-id", id]);
    wait_progress(&c, id, 50);
    let pid = c.agents[0].pid().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    wait_until(
        Duration::from_secs(6),
        "the frozen agent to be declared dead",
        || (c.agents().len() == 1).then_some(()),
    );
    // wake it: its attempts were re-dispatched, so whatever it reports now is stale
    assert!(Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap()
        .success());
    let out = finish(run, Duration::from_secs(60), &c);
    assert!(out.status.success(), "{}", c.logs());
    let line = last_json_line(&out);
    assert_eq!(line["result"], sum_squares(600));
    // it comes back and is used again
    c.wait_agents(2);
}

#[test]
fn the_run_completes_across_a_nats_server_restart() {
    let mut c = Cluster::start(APP, 2, 4);
    let id = "9e0f5d1c-2b3a-4c5d-8e9f-0a1b2c3d4e5f";
    let run = c.spawn_run(&["--n=1200", "--work-ms=10", "--flow-run-id", id]);
    wait_progress(&c, id, 100);
    c.nats.restart();
    let out = finish(run, Duration::from_secs(90), &c);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    assert_eq!(line["result"], sum_squares(1200));
}

#[test]
fn a_nats_outage_longer_than_the_agents_dead_after_runs_nothing_twice() {
    let mut c = Cluster::start(APP, 2, 4);
    let id = "9e0f5d1c-2b3a-4c5d-8e9f-0a1b2c3d4e60";
    let n = 600u64;
    let run = c.spawn_run(&[&format!("--n={n}"), "--work-ms=50", "--flow-run-id", id]);
    wait_progress(&c, id, 100);
    // down for longer than --dead-after (2 s): the coordinator, cut off too, does not
    // take the silent agents for dead
    c.nats.kill();
    std::thread::sleep(Duration::from_secs(4));
    c.nats.restart();
    let out = finish(run, Duration::from_secs(120), &c);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    assert_eq!(last_json_line(&out)["result"], sum_squares(n));
    let lines = c.attempt_lines() as u64;
    assert!(
        lines <= n + 2,
        "{lines} attempt starts for {n} calls\n{}",
        c.logs()
    );
}

#[test]
fn cancel_stops_the_running_attempts_and_fails_the_run() {
    let c = Cluster::start(APP, 2, 4);
    let events = EventRecorder::start(&c.nats.url());
    let out = c.output(&["run", "--detach", "--n=200", "--work-ms=60000"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    wait_until(
        Duration::from_secs(10),
        "attempts running on the agents",
        || {
            let busy = c.running_attempts();
            (busy == 8).then_some(())
        },
    );
    let cancelled = c.json(&["cancel", &id, "--json"]);
    assert_eq!(cancelled["status"], "FAILED", "{cancelled}");
    assert!(
        cancelled["error"].as_str().unwrap().contains("cancelled"),
        "{cancelled}"
    );
    // cancelled calls are not done
    assert_eq!(cancelled["completed"], 0, "{cancelled}");
    assert_eq!(cancelled["cancelled"], 200, "{cancelled}");
    // every task that got PENDING ended: FAILED "cancelled", as Pinazu Core sees it
    wait_until(Duration::from_secs(10), "200 FAILED task events", || {
        let tasks = events.task_events(&id);
        let count = |s: &str| tasks.iter().filter(|e| e["message"]["status"] == s).count();
        (count("PENDING") == 200 && count("FAILED") == 200).then_some(())
    });
    assert!(events
        .task_events(&id)
        .iter()
        .filter(|e| e["message"]["status"] == "FAILED")
        .all(|e| e["message"]["error_message"] == "cancelled"));
    wait_until(
        Duration::from_secs(10),
        "the agents to stop the cancelled attempts",
        || {
            let busy = c.running_attempts();
            (busy == 0).then_some(())
        },
    );
    assert_eq!(c.status(&id)["status"], "FAILED");
}

#[test]
fn submitting_twice_with_one_idempotency_key_returns_the_same_run() {
    let c = Cluster::start(APP, 1, 4);
    let submit = || {
        let out = c.output(&[
            "run",
            "--detach",
            "--n=20",
            "--idempotency-key",
            "nightly-2026-11-26",
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let first = submit();
    let second = submit();
    assert_eq!(first, second);
    assert_eq!(c.json(&["runs", "--json"]).as_array().unwrap().len(), 1);
}

#[test]
fn a_task_no_agent_can_run_fails_after_the_schedule_timeout_naming_the_task() {
    let c = Cluster::start_on(
        NatsServer::start(),
        APP,
        0,
        1,
        &["--schedule-timeout", "2s"],
    );
    let started = Instant::now();
    let out = c.output(&["run", "--n=3"]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = last_json_line(&out);
    let err = line["error"].as_str().unwrap();
    assert!(
        err.contains("`square`") && err.contains("not registered on any live agent"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
}

/// Against a server started with `server_args`: a client without credentials gets a
/// clear error containing every one of `refusal`; with `env` set, a coordinator, an
/// agent and a run work.
fn auth_refuses_without_and_works_with(
    server_args: &[&str],
    refusal: &[&str],
    env: &[(&str, &str)],
) {
    let nats = NatsServer::start_with(server_args);
    let out = base(APP, &nats.url(), std::path::Path::new("/tmp"))
        .args(["agents"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(refusal.iter().all(|r| err.contains(r)), "{err}");

    let cache = tempfile::tempdir().unwrap();
    let with_auth = |args: &[&str]| {
        let mut cmd = base(APP, &nats.url(), cache.path());
        cmd.envs(env.iter().copied()).args(args);
        cmd
    };
    let _coord = Proc::spawn("coordinator", with_auth(&["coordinator"]));
    let _agent = Proc::spawn("agent", with_auth(&["agent", "--agent-id", "auth-1"]));
    wait_until(Duration::from_secs(20), "the agent behind auth", || {
        let out = with_auth(&["agents", "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 1).then_some(())
    });
    let out = with_auth(&["run", "--n=10"]).output().unwrap();
    assert_eq!(last_json_line(&out)["result"], 285);
}

#[test]
fn an_authenticated_server_refuses_an_unauthenticated_client_clearly() {
    auth_refuses_without_and_works_with(
        &["--user", "alice", "--pass", "s3cret"],
        &["authorization violation", "--nats-user"],
        &[("NATS_USER", "alice"), ("NATS_PASSWORD", "s3cret")],
    );
}

#[test]
fn a_token_protected_server_works_with_the_token_and_refuses_without() {
    auth_refuses_without_and_works_with(
        &["--auth", "t0ken-for-tests"],
        &["authorization violation", "--nats-token"],
        &[("NATS_TOKEN", "t0ken-for-tests")],
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, made with the
/// `openssl` command (fails loudly if it is missing).
fn make_certs(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the `openssl` command is needed to make test certificates (apt-get install openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=pinazu-test-ca",
    ]);
    for (name, usage) in [("server", "serverAuth"), ("client", "clientAuth")] {
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"),
        )
        .unwrap();
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ]);
    }
}

#[test]
fn a_tls_server_that_verifies_clients_works_with_certificates_and_refuses_without() {
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).to_string_lossy().into_owned();
    let (ca, cert, key) = (p("ca.pem"), p("client.pem"), p("client.key"));
    let (server_cert, server_key) = (p("server.pem"), p("server.key"));
    // without the CA and a client certificate: a clear error naming the TLS flags
    auth_refuses_without_and_works_with(
        &[
            "--tls",
            "--tlscert",
            &server_cert,
            "--tlskey",
            &server_key,
            "--tlscacert",
            &ca,
            "--tlsverify",
        ],
        &["--nats-tls"],
        &[
            ("NATS_TLS_CA", &ca),
            ("NATS_TLS_CERT", &cert),
            ("NATS_TLS_KEY", &key),
        ],
    );
}

#[test]
fn an_agent_drains_on_sigterm_and_the_run_still_completes() {
    let mut c = Cluster::start(APP, 2, 4);
    let id = "aa2c1a7e-7777-4a0b-8c1d-999922223333";
    let run = c.spawn_run(&["--n=400", "--work-ms=50", "--flow-run-id", id]);
    wait_progress(&c, id, 40);
    let code = c.agents[0].terminate(Duration::from_secs(15));
    assert_eq!(code, Some(0), "the agent exits cleanly after draining");
    assert!(c.agents[0].logs().contains("draining"));
    let out = finish(run, Duration::from_secs(60), &c);
    let line = last_json_line(&out);
    assert_eq!(line["result"], sum_squares(400), "{}", c.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_subscriber_sees_pinazu_core_events_in_order_per_task() {
    let c = tokio::task::spawn_blocking(|| Cluster::start("example_flow", 1, 2))
        .await
        .unwrap();
    let client = async_nats::connect(c.nats.url()).await.unwrap();
    let mut flows = client.subscribe("v1.svc.worker.flow.status").await.unwrap();
    let mut tasks = client.subscribe("v1.svc.worker.task.status").await.unwrap();
    client.flush().await.unwrap();
    let mut cmd = c.cmd();
    cmd.args(["run", "--a=5", "--b=3"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    let run_id = line["flow_run_id"].as_str().unwrap().to_string();

    let mut flow_statuses = Vec::new();
    while flow_statuses.len() < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), flows.next())
            .await
            .unwrap()
            .unwrap();
        let e: Value = serde_json::from_slice(&msg.payload).expect("flow event is JSON");
        assert_shape(&e, &run_id, false);
        flow_statuses.push(e["message"]["status"].as_str().unwrap().to_string());
    }
    assert_eq!(flow_statuses, ["RUNNING", "SUCCESS"]);

    let mut per_task: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    let mut seen = 0;
    while seen < 12 {
        let msg = tokio::time::timeout(Duration::from_secs(10), tasks.next())
            .await
            .unwrap()
            .unwrap();
        let e: Value = serde_json::from_slice(&msg.payload).expect("task event is JSON");
        assert_shape(&e, &run_id, true);
        per_task
            .entry(e["message"]["task_name"].as_str().unwrap().to_string())
            .or_default()
            .push(e["message"]["status"].as_str().unwrap().to_string());
        seen += 1;
    }
    for t in ["add", "multiply", "subtract", "describe"] {
        assert_eq!(
            per_task[t],
            ["PENDING", "RUNNING", "SUCCESS"],
            "task {t}: {per_task:?}"
        );
    }
}

fn assert_shape(e: &Value, run_id: &str, task: bool) {
    let keys = |v: &Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(e), ["header", "message", "metadata"]);
    assert_eq!(
        keys(&e["header"]),
        ["connection_id", "thread_id", "user_id"]
    );
    assert_eq!(
        e["header"]["user_id"],
        "00000000-0000-0000-0000-000000000000"
    );
    assert_eq!(keys(&e["metadata"]), ["timestamp", "trace_id"]);
    let mut expected = vec![
        "error_message",
        "event_timestamp",
        "flow_run_id",
        "status",
        "traceback",
    ];
    if task {
        expected.extend(["result_cache_key", "task_name"]);
    }
    expected.sort();
    assert_eq!(keys(&e["message"]), expected);
    assert_eq!(e["message"]["flow_run_id"], run_id);
    let ts = e["message"]["event_timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.len() == 27, "{ts}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_every_subject_is_dropped_and_nothing_breaks() {
    let mut c = tokio::task::spawn_blocking(|| Cluster::start(APP, 1, 4))
        .await
        .unwrap();
    let client = async_nats::connect(c.nats.url()).await.unwrap();
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        b"hello".to_vec(),
        vec![0xc1; 64],
        vec![0x91, 0xff, 0x00, 0x13],
        // a well-formed envelope of another protocol version
        rmp_serde::to_vec_named(&serde_json::json!({"v": 99, "body": []})).unwrap(),
        (0..=255u8).collect(),
    ];
    let subjects = [
        "pinazu.agent.agent-0.hb",
        "pinazu.coord.reports.agent-0",
        "pinazu.coord.hello",
        "pinazu.agent.agent-0.spawn",
        "pinazu.agent.agent-0.cancel",
        "pinazu.agent.agent-0.ack",
        "pinazu.run.00000000-0000-0000-0000-000000000000.done",
    ];
    for s in subjects {
        for j in &junk {
            client.publish(s, j.clone().into()).await.unwrap();
        }
    }
    for verb in ["start", "status", "runs", "cancel", "agents"] {
        for j in &junk {
            let reply = tokio::time::timeout(
                Duration::from_secs(5),
                client.request(format!("pinazu.api.{verb}"), j.clone().into()),
            )
            .await
            .expect("the API answers garbage")
            .expect("a reply");
            let decoded: pinazu_shared::api::ApiReply =
                pinazu_shared::codec::decode_envelope(&reply.payload).unwrap();
            match decoded {
                pinazu_shared::api::ApiReply::Error(e) => assert!(e.contains("malformed"), "{e}"),
                other => panic!("garbage got {other:?}"),
            }
        }
    }
    client.flush().await.unwrap();
    // everyone is alive and a run still works
    assert!(c.coordinator.is_running(), "{}", c.logs());
    assert!(c.agents[0].is_running(), "{}", c.logs());
    let mut cmd = c.cmd();
    cmd.args(["run", "--n=50"]);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert_eq!(
        last_json_line(&out)["result"],
        sum_squares(50),
        "{}",
        c.logs()
    );
    assert!(
        c.coordinator.logs().contains("dropped a message"),
        "{}",
        c.logs()
    );
}

#[test]
fn results_and_arguments_above_the_nats_limit_travel_by_reference() {
    let c = Cluster::start("payload_flow", 2, 2);
    let bytes: u64 = 3_000_000; // three times the server's 1 MiB limit
    let out = c.output(&["run", "--count=4", &format!("--bytes={bytes}")]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    assert_eq!(line["result"]["total_bytes"], 4 * bytes);
    let expected: u64 = (0..bytes).map(|j| j % 251).sum();
    assert_eq!(line["result"]["checksum_of_first"], expected);
    // the run's payload objects are removed once it has ended
    let payloads = c._cache.path().join("payloads");
    wait_until(
        Duration::from_secs(10),
        "payload objects to be removed",
        || {
            let left = std::fs::read_dir(&payloads).map(|d| d.count()).unwrap_or(0);
            (left == 0).then_some(())
        },
    );
}

#[test]
fn large_results_are_journaled_by_reference_and_survive_a_coordinator_restart() {
    let mut c = Cluster::start("payload_flow", 2, 2);
    let id = "a7a7a7a7-1111-4222-8333-444455556666";
    let bytes: u64 = 3_000_000; // above the NATS limit: stored, journaled by reference
    let run = c.spawn_run(&[
        "--count=4",
        &format!("--bytes={bytes}"),
        "--pause-ms=3000",
        "--flow-run-id",
        id,
    ]);
    wait_progress(&c, id, 4);
    c.restart_coordinator();
    let out = finish(run, Duration::from_secs(60), &c);
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS", "{line}\n{}", c.logs());
    assert_eq!(line["result"]["total_bytes"], 4 * bytes);
    // the four blobs came back from the store through the journal: run once each, and
    // the checksum once after the restart
    assert_eq!(c.attempt_lines(), 5, "{line}\n{}", c.logs());
    assert_eq!(line["stats"]["replayed"], 4, "{line}");
}

#[test]
fn a_coordinator_killed_mid_run_and_restarted_resumes_without_rerunning_completed_calls() {
    let mut c = Cluster::start(APP, 3, 4);
    let id = "c0c0c0c0-1111-4222-8333-444455556666";
    let n = 1500u64;
    let run = c.spawn_run(&[&format!("--n={n}"), "--work-ms=20", "--flow-run-id", id]);
    wait_progress(&c, id, 400);
    c.restart_coordinator();
    // the `run` client keeps waiting across the restart and prints the final line
    let out = finish(run, Duration::from_secs(120), &c);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let line = last_json_line(&out);
    assert_eq!(line["result"], sum_squares(n));
    let replayed = line["stats"]["replayed"].as_u64().unwrap();
    assert!(
        replayed >= 400,
        "completed calls come from the journal: {line}"
    );
    // every execution is one agent log line. Completed calls were not run again, and
    // neither were the attempts in flight at the kill (12 slots): agents keep results
    // until a coordinator acknowledges them and hand them, and the attempts they still
    // run, to the new one. (Here it is exactly n; the margin of 4 covers an agent
    // answering the new coordinator later than its settle window on a loaded machine.)
    let lines = c.attempt_lines() as u64;
    assert!(
        lines >= n && lines <= n + 4,
        "{lines} attempt starts for {n} calls\n{line}"
    );
    assert!(
        c.coordinator.logs().contains("resumed an unfinished run"),
        "{}",
        c.logs()
    );
}

#[test]
fn status_of_a_run_that_ended_before_a_coordinator_restart_comes_from_the_journal() {
    let mut c = Cluster::start(APP, 1, 4);
    let id = "b8b8b8b8-1111-4222-8333-444455556666";
    let out = c.output(&["run", "--n=50", "--flow-run-id", id]);
    assert_eq!(last_json_line(&out)["result"], sum_squares(50));
    c.restart_coordinator();
    let status = wait_until(Duration::from_secs(20), "the new coordinator", || {
        let out = c.output(&["status", id, "--json"]);
        out.status.success().then_some(out)
    });
    let info: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(info["status"], "SUCCESS", "{info}\n{}", c.logs());
    assert_eq!(info["result"], sum_squares(50));
    assert_eq!(info["tasks"], 50);
}

#[test]
fn attempts_still_running_when_the_coordinator_restarts_are_re_attached_not_run_again() {
    let mut c = Cluster::start(APP, 2, 4);
    let id = "e1e1e1e1-1111-4222-8333-444455556666";
    // 8 tasks of 4 s on 8 slots: all run at once, and still run across the restart
    let run = c.spawn_run(&["--n=8", "--work-ms=4000", "--flow-run-id", id]);
    wait_until(Duration::from_secs(30), "8 attempts to start", || {
        (c.attempt_lines() >= 8).then_some(())
    });
    c.restart_coordinator();
    let out = finish(run, Duration::from_secs(60), &c);
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS", "{line}\n{}", c.logs());
    assert_eq!(line["result"], sum_squares(8));
    // the new coordinator waited for the attempts the agents still ran
    assert_eq!(c.attempt_lines(), 8, "{line}\n{}", c.logs());
    assert_eq!(line["stats"]["executions"], 8, "{line}");
}

#[test]
fn the_coordinator_and_an_agent_killed_together_still_finish_the_run() {
    let mut c = Cluster::start(APP, 3, 4);
    let id = "d0d0d0d0-1111-4222-8333-444455556666";
    let run = c.spawn_run(&["--n=900", "--work-ms=20", "--flow-run-id", id]);
    wait_progress(&c, id, 200);
    c.agents[0].kill9();
    c.restart_coordinator();
    let out = finish(run, Duration::from_secs(120), &c);
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS", "{line}\n{}", c.logs());
    assert_eq!(line["result"], sum_squares(900));
}

#[test]
fn the_journal_in_jetstream_survives_a_nats_restart_and_then_a_coordinator_kill() {
    let mut c = Cluster::start(APP, 2, 4);
    let id = "f0f0f0f0-1111-4222-8333-444455556666";
    let run = c.spawn_run(&["--n=1000", "--work-ms=20", "--flow-run-id", id]);
    wait_progress(&c, id, 200);
    // the server restarts with its JetStream store on disk...
    c.nats.restart();
    wait_progress(&c, id, 350);
    // ...and the coordinator dies: the new one reads the journal back from JetStream
    c.restart_coordinator();
    let out = finish(run, Duration::from_secs(120), &c);
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS", "{line}\n{}", c.logs());
    assert_eq!(line["result"], sum_squares(1000));
    // what was journaled before the server restarted is still there...
    assert!(
        line["stats"]["replayed"].as_u64().unwrap() >= 200,
        "{line}\n{}",
        c.logs()
    );
    // ...and what was not journaled yet at the kill is handed back by the agents (they
    // keep results until the coordinator acknowledges them): nothing completed ran twice,
    // at most the attempts in flight at each fault (8 slots) did
    let lines = c.attempt_lines() as u64;
    assert!(
        (1000..=1000 + 16).contains(&lines),
        "{lines} attempt starts for 1000 calls\n{line}\n{}",
        c.logs()
    );
}

/// The ingest example on a cluster whose one agent has a GPU label.
fn ingest_cluster() -> Cluster {
    let mut c = Cluster::start("ingest_flow", 0, 4);
    c.add_agent_with("gpu-1", 4, &["--labels", "gpu=true,zone=eu"]);
    c.wait_agents(1);
    c
}

#[test]
fn a_run_id_names_one_run_before_and_after_a_coordinator_restart() {
    let mut c = ingest_cluster();
    let events = EventRecorder::start(&c.nats.url());
    let id = "a1a1a1a1-1111-4222-8333-444455556666";
    let ingest = [
        "run",
        "ingest",
        "--collection=docs",
        "--docs=5",
        "--flow-run-id",
        id,
    ];
    let user = "11111111-2222-4333-8444-555555555555";
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let out = c
        .cmd()
        .args(ingest)
        .env("PINAZU_USER_ID", user)
        .env("TRACEPARENT", format!("00-{trace}-00f067aa0ba902b7-01"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.logs()
    );
    let first = last_json_line(&out);
    let result = &first["result"];
    // the task's typed error, the task's place: across processes too
    assert_eq!(result["skipped"], serde_json::json!(["docs/4"]), "{result}");
    assert_eq!(result["ran_on"]["agent_id"], "gpu-1", "{result}");
    assert_eq!(result["ran_on"]["flow_run_id"], id, "{result}");
    assert_eq!(result["ran_on"]["current_flow_run_id"], id, "{result}");
    // the launcher's header and trace id on every event the coordinator published
    events.wait_flow(id, "SUCCESS", Duration::from_secs(10));
    for e in events.of_run(id) {
        assert_eq!(e["header"]["user_id"], user, "{e}");
        assert_eq!(e["metadata"]["trace_id"], trace, "{e}");
    }
    // the `agents` table shows the labels
    let table = String::from_utf8_lossy(&c.output(&["agents"]).stdout).to_string();
    assert!(
        table.contains("LABELS") && table.contains("gpu=true,zone=eu"),
        "{table}"
    );

    let refused = |c: &Cluster, args: &[&str], expected: &[&str]| {
        let out = c.output(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let line = last_json_line(&out);
        let err = line["error"].as_str().unwrap_or_default();
        for e in expected {
            assert!(err.contains(e), "{args:?}: {e} not in {err}");
        }
    };
    let backfill = [
        "run",
        "backfill",
        "--collections=[\"docs\"]",
        "--flow-run-id",
        id,
    ];
    for round in ["before", "after"] {
        let attempts = c.attempt_lines();
        // the same run again: its recorded outcome, nothing runs
        let out = c.output(&ingest);
        assert!(
            out.status.success(),
            "{round}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.logs()
        );
        let again = last_json_line(&out);
        assert_eq!(again["status"], "SUCCESS", "{round}: {again}");
        assert_eq!(again["result"], first["result"], "{round}");
        assert_eq!(c.attempt_lines(), attempts, "{round}: nothing ran again");
        let status = c.status(id);
        assert_eq!(status["completed"], status["tasks"], "{round}: {status}");
        // another flow, or other parameters, under that id: refused, naming both
        refused(&c, &backfill, &["`ingest`", "`backfill`", id]);
        refused(
            &c,
            &[
                "run",
                "ingest",
                "--collection=docs",
                "--docs=6",
                "--flow-run-id",
                id,
            ],
            &["\"docs\":5", "\"docs\":6"],
        );
        // an idempotency key is the same: the same run, or refused with other parameters
        let keyed = |docs: &str| {
            let docs = format!("--docs={docs}");
            c.output(&[
                "run",
                "ingest",
                "--collection=k",
                &docs,
                "--idempotency-key",
                "nightly-2026-11-29",
            ])
        };
        let out = keyed("2");
        assert!(
            out.status.success(),
            "{round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let keyed_run = last_json_line(&out)["flow_run_id"].clone();
        let attempts = c.attempt_lines();
        let out = keyed("2");
        assert_eq!(last_json_line(&out)["flow_run_id"], keyed_run, "{round}");
        assert_eq!(
            c.attempt_lines(),
            attempts,
            "{round}: the keyed run did not run again"
        );
        let out = keyed("3");
        assert_eq!(
            out.status.code(),
            Some(2),
            "{round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let err = last_json_line(&out)["error"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(err.contains("nightly-2026-11-29"), "{round}: {err}");
        // the key with an explicit run id that is not the key's run: refused
        let other_id = "a2a2a2a2-1111-4222-8333-444455556666";
        let out = c.output(&[
            "run",
            "ingest",
            "--collection=k",
            "--docs=2",
            "--idempotency-key",
            "nightly-2026-11-29",
            "--flow-run-id",
            other_id,
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            events.of_run(other_id).is_empty(),
            "{round}: nothing under {other_id}"
        );
        if round == "before" {
            c.restart_coordinator();
        }
    }
}
