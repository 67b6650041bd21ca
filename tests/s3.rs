//! The cache and large payloads in a real S3-compatible server (s3s-fs, SigV4 checked),
//! started by the test on a free port.

mod common;

use common::*;
use pinazu_flows::prelude::*;
use pinazu_flows::stores::{S3Settings, StoreSpec};
use pinazu_flows::{CollectingSink, FlowRunId, FlowRunOutcome, FlowStatus};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

#[task(cache = "inputs", version = "2")]
async fn cached_square(i: u64, salt: String) -> anyhow::Result<u64> {
    let _ = salt;
    Ok(i * i)
}

#[task(cache = "inputs", version = "1")]
async fn slow_cached_square(i: u64, salt: String) -> anyhow::Result<u64> {
    let _ = salt;
    tokio::time::sleep(Duration::from_millis(5)).await;
    Ok(i * i)
}

#[task(cache = "run")]
async fn run_square(i: u64) -> anyhow::Result<u64> {
    Ok(i * i)
}

#[task(cache = "inputs", expire = "1s")]
async fn short_lived(i: u64) -> anyhow::Result<u64> {
    Ok(i + 100)
}

#[flow]
async fn s3_fan_out(n: u64, salt: String, #[default(false)] slow: bool) -> anyhow::Result<u64> {
    let results = pinazu_flows::map(0..n, 2_000, |i| {
        let salt = salt.clone();
        async move {
            if slow {
                slow_cached_square(i, salt).await
            } else {
                cached_square(i, salt).await
            }
        }
    })
    .await;
    let mut sum = 0;
    for r in results {
        sum += r?;
    }
    Ok(sum)
}

#[flow]
async fn s3_run_fan_out(n: u64) -> anyhow::Result<u64> {
    let results = pinazu_flows::map(0..n, 1_000, run_square).await;
    let mut sum = 0;
    for r in results {
        sum += r?;
    }
    Ok(sum)
}

#[flow]
async fn s3_short_lived(i: u64) -> anyhow::Result<u64> {
    Ok(short_lived(i).await?)
}

fn settings(s3: &S3Server) -> S3Settings {
    S3Settings {
        access_key: Some(S3_ACCESS_KEY.into()),
        secret_key: Some(S3_SECRET_KEY.into()),
        session_token: None,
        region: Some("us-east-1".into()),
        endpoint: Some(s3.endpoint()),
        path_style: Some(true),
    }
}

async fn runtime(s3: &S3Server, refresh: bool) -> Runtime {
    let spec = StoreSpec::S3 {
        bucket: S3_BUCKET.into(),
        prefix: String::new(),
    };
    let store = spec
        .open_with(&settings(s3))
        .await
        .expect("the S3 store opens");
    Runtime::embedded(RuntimeConfig {
        agents: 2,
        slots: 8,
        store: Some(store),
        refresh_cache: refresh,
        events: CollectingSink::new(),
        ..RuntimeConfig::default()
    })
    .await
    .expect("runtime starts")
}

async fn run(rt: &Runtime, flow: &str, p: Value, id: FlowRunId) -> FlowRunOutcome {
    let Value::Object(params) = p else {
        panic!("object")
    };
    tokio::time::timeout(Duration::from_secs(120), rt.run(flow, params, id))
        .await
        .expect("finishes in 120 s")
        .expect("starts")
}

fn sum_squares(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_run_of_a_2000_task_inputs_cached_fan_out_executes_nothing() {
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let rt = runtime(&s3, false).await;
    let first = run(
        &rt,
        "s3_fan_out",
        json!({"n": 2000, "salt": "a"}),
        FlowRunId::new(),
    )
    .await;
    assert_eq!(first.result, Some(json!(sum_squares(2000))));
    assert_eq!(first.stats.executions, 2000);
    // a fresh runtime (a new process, in effect) on the same bucket
    let rt2 = runtime(&s3, false).await;
    let second = run(
        &rt2,
        "s3_fan_out",
        json!({"n": 2000, "salt": "a"}),
        FlowRunId::new(),
    )
    .await;
    assert_eq!(second.status, FlowStatus::Success);
    assert_eq!(second.result, Some(json!(sum_squares(2000))));
    assert_eq!(second.stats.executions, 0, "{second:?}");
    assert_eq!(second.stats.cache_hits, 2000);
    // the objects are where the inputs policy puts them
    let dir = s3.object_path("result_cache/inputs/cached_square/v2");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_policy_objects_sit_at_the_original_key_and_parse_as_cache_results() {
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let rt = runtime(&s3, false).await;
    let id = FlowRunId::new();
    let out = run(&rt, "s3_run_fan_out", json!({"n": 20}), id).await;
    assert_eq!(out.result, Some(json!(sum_squares(20))));
    let md5 = format!(
        "{:x}",
        md5::compute(br#"{"args":[7],"kwargs":{},"task_name":"run_square"}"#)
    );
    let key = format!("result_cache/flow-{id}/tasks/run_square/{md5}.json");
    let text =
        std::fs::read_to_string(s3.object_path(&key)).unwrap_or_else(|e| panic!("{key}: {e}"));
    let rec: Value = serde_json::from_str(&text).unwrap();
    let mut fields: Vec<&str> = rec
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort();
    assert_eq!(
        fields,
        [
            "cache_key",
            "flow_run_id",
            "result",
            "task_name",
            "timestamp"
        ]
    );
    assert_eq!(rec["flow_run_id"], id.to_string());
    assert_eq!(rec["task_name"], "run_square");
    assert_eq!(rec["result"], 49);
    assert_eq!(rec["cache_key"], md5);
    let ts = rec["timestamp"].as_str().unwrap();
    assert!(ts.len() == 27 && ts.ends_with('Z'), "{ts}");
    // the same run id again in another process without a journal (the original
    // library's way): its `run` cache entries answer every call
    let rt = runtime(&s3, false).await;
    let again = run(&rt, "s3_run_fan_out", json!({"n": 20}), id).await;
    assert_eq!(again.stats.cache_hits, 20);
    assert_eq!(again.stats.executions, 0);
    // in the same one, the id names a run that succeeded: its recorded outcome
    let recorded = run(&rt, "s3_run_fan_out", json!({"n": 20}), id).await;
    assert_eq!(recorded.result, again.result);
    assert_eq!(recorded.stats, again.stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_misses_and_refresh_re_executes() {
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let rt = runtime(&s3, false).await;
    let first = run(&rt, "s3_short_lived", json!({"i": 1}), FlowRunId::new()).await;
    assert_eq!(first.stats.executions, 1);
    let hit = run(&rt, "s3_short_lived", json!({"i": 1}), FlowRunId::new()).await;
    assert_eq!(hit.stats.cache_hits, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = run(&rt, "s3_short_lived", json!({"i": 1}), FlowRunId::new()).await;
    assert_eq!(expired.stats.executions, 1);
    assert_eq!(expired.result, Some(json!(101)));

    let cached = run(
        &rt,
        "s3_fan_out",
        json!({"n": 10, "salt": "refresh"}),
        FlowRunId::new(),
    )
    .await;
    assert_eq!(cached.stats.executions, 10);
    let refreshing = runtime(&s3, true).await;
    let refreshed = run(
        &refreshing,
        "s3_fan_out",
        json!({"n": 10, "salt": "refresh"}),
        FlowRunId::new(),
    )
    .await;
    assert_eq!(
        refreshed.stats.executions, 10,
        "refresh executes cached calls"
    );
    assert_eq!(refreshed.stats.cache_hits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_object_is_a_miss() {
    let s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let rt = runtime(&s3, false).await;
    let id = FlowRunId::new();
    let md5 = format!(
        "{:x}",
        md5::compute(br#"{"args":[3],"kwargs":{},"task_name":"run_square"}"#)
    );
    let key = format!("result_cache/flow-{id}/tasks/run_square/{md5}.json");
    // written through the S3 API, like any other client would
    let store = StoreSpec::S3 {
        bucket: S3_BUCKET.into(),
        prefix: String::new(),
    }
    .open_with(&settings(&s3))
    .await
    .unwrap();
    store
        .put(&key, bytes::Bytes::from_static(b"\x00not json at all"))
        .await
        .unwrap();
    let out = run(&rt, "s3_run_fan_out", json!({"n": 5}), id).await;
    assert_eq!(out.result, Some(json!(sum_squares(5))));
    assert_eq!(out.stats.executions, 5);
    let rec: Value = serde_json::from_slice(&store.get(&key).await.unwrap().unwrap()).unwrap();
    assert_eq!(rec["result"], 9, "rewritten with the real result");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_completes_when_the_s3_server_dies_mid_run() {
    let mut s3 = tokio::task::spawn_blocking(S3Server::start).await.unwrap();
    let rt = runtime(&s3, false).await;
    let started = Instant::now();
    let handle = rt
        .start(
            "s3_fan_out",
            match json!({"n": 1500, "salt": "outage", "slow": true}) {
                Value::Object(m) => m,
                _ => unreachable!(),
            },
            FlowRunId::new(),
        )
        .await
        .unwrap();
    let stats = handle.stats.clone();
    while stats.completed() < 150 {
        assert!(started.elapsed() < Duration::from_secs(60), "no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s3.kill();
    let out = tokio::time::timeout(Duration::from_secs(120), handle.wait())
        .await
        .expect("the run finishes");
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    assert_eq!(out.result, Some(json!(sum_squares(1500))));
    let errors = rt
        .coordinator()
        .cache_counters()
        .errors
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(errors > 0, "the outage was seen");
    // the breaker kept the dead store out of the path: far from one timeout per task
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

fn cli_env(s3: &S3Server, cmd: &mut std::process::Command) {
    for (k, v) in s3.env() {
        cmd.env(k, v);
    }
}

#[test]
fn wrong_credentials_are_one_clear_error_at_start_up() {
    let s3 = S3Server::start();
    let mut cmd = app("parallel_flow");
    cli_env(&s3, &mut cmd);
    cmd.env("ENABLE_S3_CACHING", "true")
        .env("AWS_SECRET_ACCESS_KEY", "not-the-secret");
    let out = cmd.args(["--n=3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("flow-cache-bucket") && err.contains("AWS_SECRET_ACCESS_KEY"),
        "{err}"
    );

    let mut cmd = app("parallel_flow");
    cli_env(&s3, &mut cmd);
    cmd.env("ENABLE_S3_CACHING", "true")
        .env("CACHE_BUCKET", "no-such-bucket");
    let out = cmd.args(["--n=3"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no-such-bucket") && err.contains("does not exist"),
        "{err}"
    );
}

#[test]
fn cache_clear_removes_by_task_by_run_and_all() {
    let s3 = S3Server::start();
    let id = "0f0e0d0c-0b0a-4909-8807-060504030201";
    let with_env = |args: &[&str]| {
        let mut cmd = app("example_flow");
        cli_env(&s3, &mut cmd);
        cmd.env("ENABLE_S3_CACHING", "true")
            .env("FLOW_RUN_ID", id)
            .args(args);
        cmd.output().unwrap()
    };
    let out = with_env(&["--a=5", "--b=3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |prefix: &str| -> usize {
        let dir = s3.object_path(prefix);
        walk(&dir)
    };
    assert_eq!(
        count(&format!("result_cache/flow-{id}/tasks")),
        3,
        "add, multiply, subtract"
    );
    assert_eq!(count("result_cache/inputs/describe"), 1);
    // by task: only that task's entries go
    let out = with_env(&["cache", "clear", "--task", "multiply"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed 1 cache entries"));
    assert_eq!(count(&format!("result_cache/flow-{id}/tasks")), 2);
    // re-running executes exactly the cleared call
    let rerun = last_json_line(&with_env(&["--a=5", "--b=3"]));
    assert_eq!(rerun["stats"]["executions"], 1, "{rerun}");
    // by run
    let out = with_env(&["cache", "clear", "--run", id]);
    assert!(out.status.success());
    assert_eq!(count(&format!("result_cache/flow-{id}")), 0);
    assert_eq!(count("result_cache/inputs"), 1);
    // everything
    let out = with_env(&["cache", "clear", "--all"]);
    assert!(out.status.success());
    assert_eq!(count("result_cache"), 0);
}

fn walk(dir: &std::path::Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            if e.path().is_dir() {
                walk(&e.path())
            } else {
                1
            }
        })
        .sum()
}

#[test]
fn a_20_mib_result_goes_through_a_distributed_run_via_s3() {
    let s3 = S3Server::start();
    let nats = NatsServer::start();
    let base = |args: &[&str]| {
        let mut cmd = app("payload_flow");
        cli_env(&s3, &mut cmd);
        cmd.env("NATS_URL", nats.url())
            .env("PINAZU_STORE", format!("s3://{S3_BUCKET}/shared"))
            .args(args);
        cmd
    };
    let coordinator = Proc::spawn("coordinator", base(&["coordinator"]));
    let agent = Proc::spawn("agent", base(&["agent", "--agent-id", "s3-agent"]));
    wait_until(Duration::from_secs(20), "the agent", || {
        let out = base(&["agents", "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 1).then_some(())
    });
    let bytes: u64 = 20 * 1024 * 1024;
    let out = base(&["run", "--count=1", &format!("--bytes={bytes}")])
        .output()
        .unwrap();
    let line = last_json_line(&out);
    assert_eq!(
        line["status"],
        "SUCCESS",
        "{line}\n{}\n{}",
        coordinator.logs(),
        agent.logs()
    );
    assert_eq!(line["result"]["total_bytes"], bytes);
    let expected: u64 = (0..bytes).map(|j| j % 251).sum();
    assert_eq!(line["result"]["checksum_of_first"], expected);
    // the payloads were in the bucket, and are gone once the run ended
    wait_until(
        Duration::from_secs(10),
        "payloads removed from the bucket",
        || (walk(&s3.object_path("shared/payloads")) == 0).then_some(()),
    );
}

#[test]
fn an_s3_endpoint_unreachable_at_start_runs_uncached_and_is_used_once_it_answers() {
    let mut s3 = S3Server::start();
    s3.kill();
    let id = "5e5e5e5e-1111-4222-8333-444455556666";
    let mut cmd = app("parallel_flow");
    cli_env(&s3, &mut cmd);
    cmd.env("ENABLE_S3_CACHING", "true")
        .env("FLOW_RUN_ID", id)
        .args(["--n=400", "--work-ms=50", "--agents=1", "--slots=4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        use std::io::BufRead;
        let log = log.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                log.lock().unwrap().push_str(&(line + "\n"));
            }
        })
    };
    // the server comes up once the run has started without it (about 5 s of work)
    wait_until(
        Duration::from_secs(20),
        "the warning that S3 is unreachable",
        || {
            log.lock()
                .unwrap()
                .contains("running without the cache")
                .then_some(())
        },
    );
    s3.restart();
    let out = child.wait_with_output().unwrap();
    reader.join().unwrap();
    let err = log.lock().unwrap().clone();
    assert!(out.status.success(), "{err}");
    let line = last_json_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    assert_eq!(line["result"], 21_253_400);
    assert!(
        err.contains("cannot reach the S3 endpoint") && err.contains("running without the cache"),
        "{err}"
    );
    assert!(
        err.contains("object store recovered"),
        "the breaker probed: {err}"
    );
    // calls that ended after it answered are cached, at the original layout
    let written = walk(&s3.object_path(&format!("result_cache/flow-{id}/tasks/square")));
    assert!(written > 0 && written < 400, "{written} objects");
}

#[test]
fn a_brief_s3_outage_while_results_are_written_does_not_fail_the_attempt() {
    let mut s3 = S3Server::start();
    let nats = NatsServer::start();
    let base = |s3: &S3Server, args: &[&str]| {
        let mut cmd = app("payload_flow");
        cli_env(s3, &mut cmd);
        cmd.env("NATS_URL", nats.url())
            .env("PINAZU_STORE", format!("s3://{S3_BUCKET}/shared"))
            .args(args);
        cmd
    };
    let coordinator = Proc::spawn("coordinator", base(&s3, &["coordinator"]));
    let agent = Proc::spawn("agent", base(&s3, &["agent", "--agent-id", "s3-agent"]));
    wait_until(Duration::from_secs(20), "the agent", || {
        let out = base(&s3, &["agents", "--json"]).output().ok()?;
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        (v.as_array()?.len() == 1).then_some(())
    });
    // results of 3 MB go through the store, which is down when they are written
    s3.kill();
    let mut run = base(&s3, &["run", "--count=2", "--bytes=3000000"]);
    let run = std::thread::spawn(move || run.output().unwrap());
    wait_until(
        Duration::from_secs(20),
        "the agent to retry the write",
        || {
            agent
                .logs()
                .contains("retrying for a few seconds")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(1500));
    s3.restart();
    let out = run.join().unwrap();
    let line = last_json_line(&out);
    assert_eq!(
        line["status"],
        "SUCCESS",
        "{line}\n{}\n{}",
        coordinator.logs(),
        agent.logs()
    );
    // the outage cost no attempt: nothing was retried, each call ran once
    assert_eq!(line["stats"]["retries"], 0, "{line}");
    assert_eq!(line["stats"]["executions"], 3, "{line}");
    assert!(
        agent.logs().contains("payload stored after retrying"),
        "{}",
        agent.logs()
    );
}
