//! Embedded mode end to end: real actors, real task futures, a real cache directory.
//! Each test builds its own runtime (own cache dir, own event collector), so they run in
//! parallel.

use pinazu_flows::prelude::*;
use pinazu_flows::{CollectingSink, FailureKind, FlowRunId, FlowRunOutcome, FlowStatus};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

// ---------- tasks and flows under test ----------

#[task]
async fn square(i: u64) -> anyhow::Result<u64> {
    Ok(i * i)
}

#[flow]
async fn fan_out(n: u64) -> anyhow::Result<u64> {
    let results = pinazu_flows::map(0..n, 2_000, square).await;
    let mut sum = 0;
    for r in results {
        sum += r?;
    }
    Ok(sum)
}

#[flow]
async fn one_square(x: u64) -> anyhow::Result<u64> {
    Ok(square(x).await?)
}

fn attempts_log() -> &'static Mutex<HashMap<String, Vec<Instant>>> {
    static LOG: OnceLock<Mutex<HashMap<String, Vec<Instant>>>> = OnceLock::new();
    LOG.get_or_init(Default::default)
}

fn record_attempt(tag: &str) -> usize {
    let mut log = attempts_log().lock().unwrap();
    let v = log.entry(tag.to_string()).or_default();
    v.push(Instant::now());
    v.len()
}

fn attempts_of(tag: &str) -> Vec<Instant> {
    attempts_log()
        .lock()
        .unwrap()
        .get(tag)
        .cloned()
        .unwrap_or_default()
}

#[task(retries = 2, retry_delay = "10ms")]
async fn always_fails(tag: String) -> anyhow::Result<u64> {
    let n = record_attempt(&tag);
    Err(anyhow::anyhow!("disk full on attempt {n}").context("writing the report"))
}

#[task(
    retries = 3,
    retry_delay = "100ms",
    backoff = 2.0,
    jitter = 0.0,
    max_delay = "1s"
)]
async fn backoff_probe(tag: String) -> anyhow::Result<u64> {
    record_attempt(&tag);
    anyhow::bail!("still failing")
}

#[task(retries = 3, retry_delay = "5ms")]
async fn fails_twice(tag: String) -> anyhow::Result<String> {
    let n = record_attempt(&tag);
    if n <= 2 {
        anyhow::bail!("transient failure {n}");
    }
    Ok(format!("ok on attempt {n}"))
}

static HUNG_DROPPED: AtomicBool = AtomicBool::new(false);

struct DropFlag(&'static AtomicBool);
impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

#[task(timeout = "200ms")]
async fn hangs() -> anyhow::Result<u64> {
    let _flag = DropFlag(&HUNG_DROPPED);
    tokio::time::sleep(Duration::from_secs(3600)).await;
    Ok(0)
}

#[task]
async fn panics(msg: String) -> anyhow::Result<u64> {
    panic!("{msg}");
}

/// Calls one task by kind and reports how it ended, handling the error.
#[flow]
async fn call_and_report(kind: String, tag: String) -> anyhow::Result<Value> {
    let res = match kind.as_str() {
        "always_fails" => always_fails(tag).await,
        "backoff_probe" => backoff_probe(tag).await,
        "hangs" => hangs().await,
        "panics" => panics(tag).await,
        other => anyhow::bail!("unknown kind {other}"),
    };
    Ok(match res {
        Ok(v) => json!({ "ok": v }),
        Err(TaskError::Failed {
            task,
            attempts,
            last_error,
        }) => json!({
            "task": task,
            "attempts": attempts,
            "kind": last_error.kind,
            "message": last_error.message,
            "traceback": last_error.traceback,
        }),
        Err(other) => json!({ "other": other.to_string() }),
    })
}

#[flow]
async fn transient(tag: String) -> anyhow::Result<String> {
    Ok(fails_twice(tag).await?)
}

#[flow]
async fn failing_flow(tag: String) -> anyhow::Result<u64> {
    Ok(always_fails(tag).await?)
}

#[flow]
async fn panicking_flow() -> anyhow::Result<u64> {
    panic!("the flow body blew up")
}

#[task(cache = "inputs", version = "1")]
async fn cached_square(i: u64, salt: String) -> anyhow::Result<u64> {
    let _ = salt;
    Ok(i * i)
}

#[flow]
async fn cached_fan_out(n: u64, salt: String) -> anyhow::Result<u64> {
    let results = pinazu_flows::map(0..n, 1_000, |i| cached_square(i, salt.clone())).await;
    let mut sum = 0;
    for r in results {
        sum += r?;
    }
    Ok(sum)
}

#[task(cache = "run")]
async fn run_cached_square(i: u64) -> anyhow::Result<u64> {
    Ok(i * i)
}

#[flow]
async fn run_cached_fan_out(n: u64) -> anyhow::Result<u64> {
    let results = pinazu_flows::map(0..n, 1_000, run_cached_square).await;
    let mut sum = 0;
    for r in results {
        sum += r?;
    }
    Ok(sum)
}

#[task(cache = "inputs", expire = "1s")]
async fn expiring(i: u64) -> anyhow::Result<u64> {
    Ok(i + 1)
}

#[flow]
async fn expiring_flow(i: u64) -> anyhow::Result<u64> {
    Ok(expiring(i).await?)
}

// ---------- helpers ----------

struct Env {
    rt: Runtime,
    events: Arc<CollectingSink>,
    _dir: tempfile::TempDir,
}

async fn env() -> Env {
    let dir = tempfile::tempdir().expect("temp dir");
    env_in(dir).await
}

async fn env_in(dir: tempfile::TempDir) -> Env {
    let events = CollectingSink::new();
    let rt = Runtime::embedded(RuntimeConfig {
        agents: 2,
        slots: 4,
        cache_dir: dir.path().to_path_buf(),
        events: events.clone(),
        ..RuntimeConfig::default()
    })
    .await
    .expect("embedded runtime starts");
    Env {
        rt,
        events,
        _dir: dir,
    }
}

fn params(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => panic!("params must be an object"),
    }
}

async fn run(env: &Env, flow: &str, p: Value) -> FlowRunOutcome {
    run_as(env, flow, p, FlowRunId::new()).await
}

async fn run_as(env: &Env, flow: &str, p: Value, id: FlowRunId) -> FlowRunOutcome {
    tokio::time::timeout(Duration::from_secs(60), env.rt.run(flow, params(p), id))
        .await
        .expect("run finishes within 60 s")
        .expect("run starts")
}

fn sum_squares(n: u64) -> u64 {
    (0..n).map(|i| i * i).sum()
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_succeeds_with_the_exact_result() {
    let env = env().await;
    let out = run(&env, "fan_out", json!({"n": 100})).await;
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    assert_eq!(out.result, Some(json!(sum_squares(100))));
    assert_eq!(out.stats.tasks, 100);
    assert_eq!(out.stats.executions, 100);
    assert_eq!(out.error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_task_fan_out_returns_the_exact_sum() {
    let env = env().await;
    let out = run(&env, "fan_out", json!({"n": 10_000})).await;
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    assert_eq!(out.result, Some(json!(333_283_335_000u64)));
    assert_eq!(out.result, Some(json!(sum_squares(10_000))));
    assert_eq!(out.stats.tasks, 10_000);
    assert_eq!(out.stats.executions, 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_flow_call_runs_on_the_scoped_runtime() {
    let env = env().await;
    let sum = env.rt.scope(fan_out(10)).await.expect("flow succeeds");
    assert_eq!(sum, 285);
    let err = env
        .rt
        .scope(failing_flow("typed-fail".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, FlowError::Failed { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_error_reaches_the_flow_with_task_attempts_and_last_error() {
    let env = env().await;
    let tag = "error-reaches-flow";
    let out = run(
        &env,
        "call_and_report",
        json!({"kind": "always_fails", "tag": tag}),
    )
    .await;
    // the flow handled the failure, so the run itself succeeds
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    let r = out.result.unwrap();
    assert_eq!(r["task"], "always_fails");
    assert_eq!(r["attempts"], 3);
    assert_eq!(r["kind"], "error");
    // the whole chain on one line
    assert_eq!(r["message"], "writing the report: disk full on attempt 3");
    let tb = r["traceback"].as_str().expect("traceback holds the chain");
    assert!(tb.contains("disk full on attempt 3"), "{tb}");
    assert_eq!(attempts_of(tag).len(), 3);
    assert_eq!(out.stats.retries, 2);
    assert_eq!(out.stats.executions, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhandled_task_failure_fails_the_run_with_error_and_traceback() {
    let env = env().await;
    let out = run(&env, "failing_flow", json!({"tag": "unhandled"})).await;
    assert_eq!(out.status, FlowStatus::Failed);
    let err = out.error.unwrap();
    assert!(
        err.contains("always_fails") && err.contains("3 attempt"),
        "{err}"
    );
    let flow_events: Vec<Value> = env
        .events
        .events()
        .into_iter()
        .filter(|(s, _)| s == "v1.svc.worker.flow.status")
        .map(|(_, e)| e)
        .collect();
    let last = flow_events.last().unwrap();
    assert_eq!(last["message"]["status"], "FAILED");
    assert!(last["message"]["error_message"]
        .as_str()
        .unwrap()
        .contains("always_fails"));
    assert!(last["message"]["traceback"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_retried_to_success() {
    let env = env().await;
    let out = run(&env, "transient", json!({"tag": "transient-1"})).await;
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    assert_eq!(out.result, Some(json!("ok on attempt 3")));
    assert_eq!(out.stats.retries, 2);
    assert_eq!(out.stats.executions, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_count_and_exponential_backoff_are_honoured() {
    let env = env().await;
    let tag = "backoff";
    let out = run(
        &env,
        "call_and_report",
        json!({"kind": "backoff_probe", "tag": tag}),
    )
    .await;
    let r = out.result.unwrap();
    assert_eq!(r["attempts"], 4, "{r}");
    let at = attempts_of(tag);
    assert_eq!(at.len(), 4);
    let gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    // 100 ms, 200 ms, 400 ms, no jitter; allow scheduling slack above, none below
    for (gap, expected) in gaps.iter().zip([100u64, 200, 400]) {
        let expected = Duration::from_millis(expected);
        assert!(
            *gap >= expected,
            "gap {gap:?} shorter than backoff {expected:?}"
        );
        assert!(
            *gap < expected + Duration::from_millis(150),
            "gap {gap:?} far above {expected:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_stops_a_hung_task_and_counts_as_a_failure() {
    let env = env().await;
    let started = Instant::now();
    let out = run(&env, "call_and_report", json!({"kind": "hangs", "tag": ""})).await;
    let r = out.result.unwrap();
    assert_eq!(r["kind"], "timeout", "{r}");
    assert_eq!(r["attempts"], 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    // the task's future was dropped, not left running
    let deadline = Instant::now() + Duration::from_secs(5);
    while !HUNG_DROPPED.load(Ordering::SeqCst) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        HUNG_DROPPED.load(Ordering::SeqCst),
        "the hung future was not dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_task_is_captured_as_a_failure() {
    let env = env().await;
    let out = run(
        &env,
        "call_and_report",
        json!({"kind": "panics", "tag": "kaboom 42"}),
    )
    .await;
    assert_eq!(out.status, FlowStatus::Success);
    let r = out.result.unwrap();
    assert_eq!(r["kind"], "panic", "{r}");
    assert_eq!(r["message"], "kaboom 42");
    // the agent survives: the same runtime still runs tasks
    let out = run(&env, "fan_out", json!({"n": 20})).await;
    assert_eq!(out.result, Some(json!(sum_squares(20))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_flow_body_ends_failed() {
    let env = env().await;
    let out = run(&env, "panicking_flow", json!({})).await;
    assert_eq!(out.status, FlowStatus::Failed);
    assert!(out.error.unwrap().contains("the flow body blew up"));
}

#[tokio::test]
async fn a_task_called_outside_a_flow_is_a_clear_error() {
    let err = square(3).await.unwrap_err();
    assert!(matches!(err, TaskError::OutsideFlow { .. }));
    let msg = err.to_string();
    assert!(msg.contains("`square`"), "{msg}");
    assert!(msg.contains("can only be called within a flow"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_parameters_are_rejected_before_the_run_starts() {
    let env = env().await;
    let err = env
        .rt
        .run("fan_out", params(json!({"n": "many"})), FlowRunId::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("parameter `n`"), "{err}");
    let err = env
        .rt
        .run("fan_out", params(json!({})), FlowRunId::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("missing parameter `n`"), "{err}");
    let err = env
        .rt
        .run("no_such_flow", params(json!({})), FlowRunId::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no_such_flow") && err.to_string().contains("fan_out"),
        "{err}"
    );
    // nothing ran: the two runs whose id was known ended with a flow FAILED event each
    env.rt.coordinator().flush_events().await;
    let events = env.events.events();
    let statuses: Vec<(&str, &str)> = events
        .iter()
        .map(|(s, e)| (s.as_str(), e["message"]["status"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        statuses,
        [
            ("v1.svc.worker.flow.status", "FAILED"),
            ("v1.svc.worker.flow.status", "FAILED")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inputs_cache_hits_on_rerun_across_runtimes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let salt = "rerun";
    {
        let env = env_in(tempfile::TempDir::new_in(&path).unwrap()).await;
        drop(env);
    }
    let env = env_in(dir).await;
    let first = run(&env, "cached_fan_out", json!({"n": 300, "salt": salt})).await;
    assert_eq!(first.result, Some(json!(sum_squares(300))));
    assert_eq!(first.stats.executions, 300);
    assert_eq!(first.stats.cache_hits, 0);
    let second = run(&env, "cached_fan_out", json!({"n": 300, "salt": salt})).await;
    assert_eq!(second.result, Some(json!(sum_squares(300))));
    assert_eq!(second.stats.executions, 0, "every call is a hit");
    assert_eq!(second.stats.cache_hits, 300);

    // a new runtime on the same directory (a new process, in effect) hits too
    let again = Runtime::embedded(RuntimeConfig {
        agents: 1,
        cache_dir: path.clone(),
        events: CollectingSink::new(),
        ..RuntimeConfig::default()
    })
    .await
    .unwrap();
    let third = again
        .run(
            "cached_fan_out",
            params(json!({"n": 300, "salt": salt})),
            FlowRunId::new(),
        )
        .await
        .unwrap();
    assert_eq!(third.stats.executions, 0);
    assert_eq!(third.result, Some(json!(sum_squares(300))));
    // task SUCCESS events of hits carry the call's MD5, the name of its cache object
    let hit_event = env
        .events
        .events()
        .into_iter()
        .rev()
        .find(|(s, e)| s == "v1.svc.worker.task.status" && e["message"]["status"] == "SUCCESS")
        .unwrap()
        .1;
    let key = hit_event["message"]["result_cache_key"].as_str().unwrap();
    assert_eq!(key.len(), 32, "{key}");
    assert!(path
        .join(format!("result_cache/inputs/cached_square/v1/{key}.json"))
        .is_file());
}

fn cache_object(dir: &Path, run: FlowRunId, task: &str, args: Value) -> std::path::PathBuf {
    let md5 = pinazu_shared::cache::original_md5(task, &args);
    dir.join(format!("result_cache/flow-{run}/tasks/{task}/{md5}.json"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_cache_uses_the_original_layout_and_is_isolated_per_run() {
    let env = env().await;
    let dir = env._dir.path().to_path_buf();
    let run_a = FlowRunId::new();
    let first = run_as(&env, "run_cached_fan_out", json!({"n": 50}), run_a).await;
    assert_eq!(first.result, Some(json!(sum_squares(50))));
    assert_eq!(first.stats.executions, 50);

    // the object for square(7) sits at the original key and parses as CacheResult
    let path = cache_object(&dir, run_a, "run_cached_square", json!([7]));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rec: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(rec["flow_run_id"], json!(run_a.to_string()));
    assert_eq!(rec["task_name"], "run_cached_square");
    assert_eq!(rec["result"], 49);
    assert_eq!(
        rec["cache_key"],
        json!(format!(
            "{:x}",
            md5::compute(br#"{"args":[7],"kwargs":{},"task_name":"run_cached_square"}"#)
        ))
    );
    assert!(rec["timestamp"].as_str().unwrap().ends_with('Z'));

    // same run id again, in a process without a journal (the original library's way):
    // everything is a hit
    let fresh = Runtime::embedded(RuntimeConfig {
        agents: 1,
        cache_dir: dir.clone(),
        events: CollectingSink::new(),
        ..RuntimeConfig::default()
    })
    .await
    .unwrap();
    let again = fresh
        .run("run_cached_fan_out", params(json!({"n": 50})), run_a)
        .await
        .unwrap();
    assert_eq!(again.stats.executions, 0);
    assert_eq!(again.stats.cache_hits, 50);
    assert_eq!(again.result, Some(json!(sum_squares(50))));

    // another run id: nothing is shared
    let other = run(&env, "run_cached_fan_out", json!({"n": 50})).await;
    assert_eq!(other.stats.executions, 50);
    assert_eq!(other.stats.cache_hits, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cache_object_is_a_miss_and_is_rewritten() {
    let env = env().await;
    let dir = env._dir.path().to_path_buf();
    let run_id = FlowRunId::new();
    let path = cache_object(&dir, run_id, "run_cached_square", json!([3]));
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"{ this is not json").unwrap();
    let out = run_as(&env, "run_cached_fan_out", json!({"n": 5}), run_id).await;
    assert_eq!(out.status, FlowStatus::Success);
    assert_eq!(out.result, Some(json!(sum_squares(5))));
    assert_eq!(out.stats.executions, 5);
    assert_eq!(
        env.rt
            .coordinator()
            .cache_counters()
            .corrupt
            .load(Ordering::Relaxed),
        1
    );
    let rec: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(rec["result"], 9, "the corrupt object was replaced");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_entries_are_misses() {
    let env = env().await;
    let first = run(&env, "expiring_flow", json!({"i": 1})).await;
    assert_eq!(first.stats.executions, 1);
    let hit = run(&env, "expiring_flow", json!({"i": 1})).await;
    assert_eq!(hit.stats.cache_hits, 1);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let expired = run(&env, "expiring_flow", json!({"i": 1})).await;
    assert_eq!(expired.stats.cache_hits, 0);
    assert_eq!(expired.stats.executions, 1);
    assert_eq!(expired.result, Some(json!(2)));
}

/// Replaces the run id and every RFC 3339 micros timestamp with placeholders.
fn normalize(text: &str, run: FlowRunId) -> String {
    let text = text.replace(&run.to_string(), "<RUN>");
    let bytes = text.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < bytes.len() {
        // "2026-11-26T15:27:32.123456Z" is 27 characters between quotes
        if bytes[i] == b'"' && i + 28 < bytes.len() && bytes[i + 28] == b'"' {
            let cand = &text[i + 1..i + 28];
            let shape_ok = cand.char_indices().all(|(j, c)| match j {
                4 | 7 => c == '-',
                10 => c == 'T',
                13 | 16 => c == ':',
                19 => c == '.',
                26 => c == 'Z',
                _ => c.is_ascii_digit(),
            });
            if shape_ok {
                out.push_str("\"<TS>\"");
                i += 29;
                continue;
            }
        }
        out.push(bytes[i] as char);
        i += 1;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_the_lifecycle_in_the_exact_pinazu_core_shape() {
    let env = env().await;
    let run_id = FlowRunId::new();
    let out = run_as(&env, "one_square", json!({"x": 6}), run_id).await;
    assert_eq!(out.result, Some(json!(36)));
    let raw = env.events.raw_events();
    let got: Vec<(String, String)> = raw
        .iter()
        .map(|(s, t)| (s.clone(), normalize(t, run_id)))
        .collect();
    let header = r#"{"user_id":"00000000-0000-0000-0000-000000000000","thread_id":null,"connection_id":null}"#;
    let flow = |status: &str| {
        format!(
            r#"{{"header":{header},"message":{{"flow_run_id":"<RUN>","status":"{status}","error_message":null,"traceback":null,"event_timestamp":"<TS>"}},"metadata":{{"trace_id":null,"timestamp":"<TS>"}}}}"#
        )
    };
    // SUCCESS carries the call's MD5: the original library's key of `square(6)`
    let md5 = format!(
        "\"{:x}\"",
        md5::compute(br#"{"args":[6],"kwargs":{},"task_name":"square"}"#)
    );
    let task = |status: &str| {
        let key = if status == "SUCCESS" {
            md5.as_str()
        } else {
            "null"
        };
        format!(
            r#"{{"header":{header},"message":{{"flow_run_id":"<RUN>","task_name":"square","status":"{status}","result_cache_key":{key},"error_message":null,"traceback":null,"event_timestamp":"<TS>"}},"metadata":{{"trace_id":null,"timestamp":"<TS>"}}}}"#
        )
    };
    let f = "v1.svc.worker.flow.status".to_string();
    let t = "v1.svc.worker.task.status".to_string();
    let expected = vec![
        (f.clone(), flow("RUNNING")),
        (t.clone(), task("PENDING")),
        (t.clone(), task("RUNNING")),
        (t.clone(), task("SUCCESS")),
        (f.clone(), flow("SUCCESS")),
    ];
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_then_failed_task_events_carry_the_errors() {
    let env = env().await;
    let _ = run(
        &env,
        "call_and_report",
        json!({"kind": "always_fails", "tag": "events-fail"}),
    )
    .await;
    let statuses: Vec<(String, Value)> = env
        .events
        .events()
        .into_iter()
        .filter(|(s, _)| s == "v1.svc.worker.task.status")
        .map(|(_, e)| {
            (
                e["message"]["status"].as_str().unwrap().to_string(),
                e["message"].clone(),
            )
        })
        .collect();
    let names: Vec<&str> = statuses.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        names,
        ["PENDING", "RUNNING", "PENDING", "RUNNING", "PENDING", "RUNNING", "FAILED"]
    );
    let retry_note = statuses[2].1["error_message"].as_str().unwrap();
    assert!(
        retry_note.contains("attempt 1 failed") && retry_note.contains("retry 1 of 2"),
        "{retry_note}"
    );
    let failed = &statuses[6].1;
    assert_eq!(
        failed["error_message"],
        "writing the report: disk full on attempt 3"
    );
    assert!(failed["traceback"]
        .as_str()
        .unwrap()
        .contains("disk full on attempt 3"));
}

#[test]
fn failure_kinds_serialise_in_snake_case() {
    assert_eq!(
        serde_json::to_value(FailureKind::BadArguments).unwrap(),
        json!("bad_arguments")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_diverges_from_its_journal_fails_clearly() {
    use pinazu_coordinator::journal::{Journal, JournalEntry, LocalJournal};
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(LocalJournal::open(dir.path().join("journal")).unwrap());
    let run_id = FlowRunId::new();
    // what an earlier version of the program journaled: its first call was another task
    journal.append(
        run_id,
        JournalEntry::RunStarted {
            flow: "one_square".into(),
            params: params(json!({"x": 6})),
            idempotency_key: None,
            events: None,
            started_at_ms: None,
            meta: Default::default(),
        },
    );
    journal.append(
        run_id,
        JournalEntry::CallEnded {
            ordinal: 0,
            call_id: pinazu_shared::ids::CallId { key: 42, seq: 0 },
            task: "always_fails".into(),
            outcome: Ok(bytes::Bytes::from(rmp_serde::to_vec(&7u64).unwrap())),
            executions: 1,
            outcome_ref: None,
        },
    );
    journal.flush().await.unwrap();
    let rt = Runtime::embedded(RuntimeConfig {
        agents: 1,
        cache_dir: dir.path().to_path_buf(),
        events: CollectingSink::new(),
        journal: Some(journal),
        ..RuntimeConfig::default()
    })
    .await
    .unwrap();
    let out = rt
        .run("one_square", params(json!({"x": 6})), run_id)
        .await
        .unwrap();
    assert_eq!(out.status, FlowStatus::Failed);
    let err = out.error.unwrap();
    assert!(
        err.contains("no longer matches its journal")
            && err.contains("`always_fails`")
            && err.contains("`square`"),
        "{err}"
    );
    assert_eq!(
        out.stats.executions, 1,
        "the journaled execution only: nothing new ran"
    );
}

// ---------- every task that got PENDING ends (cancel, flow returned early) ----------

#[task]
async fn sleepy(i: u64, ms: u64) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(i)
}

#[flow]
async fn sleepy_fan_out(n: u64, ms: u64) -> anyhow::Result<u64> {
    let calls = (0..n).map(|i| sleepy(i, if i < 8 { 1 } else { ms }));
    let all = futures_util::future::try_join_all(calls).await?;
    Ok(all.into_iter().sum())
}

/// Returns as soon as the first of its calls answers: the others are left running.
#[flow]
async fn first_of_many(n: u64) -> anyhow::Result<u64> {
    let calls = (0..n).map(|i| Box::pin(sleepy(i, if i == 0 { 1 } else { 60_000 })));
    let (first, _, _rest) = futures_util::future::select_all(calls).await;
    Ok(first?)
}

/// Per task name: (PENDING events, SUCCESS events, FAILED events and their messages).
fn terminal_counts(events: &CollectingSink, run: FlowRunId) -> (usize, usize, Vec<String>) {
    let mut pending = 0;
    let mut success = 0;
    let mut failed = Vec::new();
    for (subject, e) in events.events() {
        if subject != "v1.svc.worker.task.status" || e["message"]["flow_run_id"] != run.to_string()
        {
            continue;
        }
        match e["message"]["status"].as_str() {
            Some("PENDING") => pending += 1,
            Some("SUCCESS") => success += 1,
            Some("FAILED") => failed.push(
                e["message"]["error_message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => {}
        }
    }
    (pending, success, failed)
}

fn env_with_events(events: Arc<CollectingSink>, dir: &tempfile::TempDir) -> RuntimeConfig {
    RuntimeConfig {
        agents: 2,
        slots: 4,
        cache_dir: dir.path().to_path_buf(),
        events,
        ..RuntimeConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_run_ends_every_task_that_got_pending() {
    let dir = tempfile::tempdir().unwrap();
    let events = CollectingSink::new();
    let rt = Runtime::embedded(env_with_events(events.clone(), &dir))
        .await
        .unwrap();
    let id = FlowRunId::new();
    let handle = rt
        .start(
            "sleepy_fan_out",
            params(json!({"n": 600, "ms": 60_000})),
            id,
        )
        .await
        .unwrap();
    // the 8 quick calls end, 8 long ones run, the rest wait for a slot
    let deadline = Instant::now() + Duration::from_secs(20);
    while handle.stats.completed() < 8 || handle.stats.snapshot().executions < 16 {
        assert!(Instant::now() < deadline, "{:?}", handle.stats.snapshot());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.coordinator().cancel(id, "stopped by the test").unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(20), handle.wait())
        .await
        .unwrap();
    assert_eq!(outcome.status, FlowStatus::Failed);
    assert_eq!(outcome.stats.cancelled, 592, "{:?}", outcome.stats);
    let info = rt.coordinator().run_info(id).unwrap();
    assert_eq!(info.completed, 8, "cancelled calls are not done: {info:?}");
    rt.shutdown().await;
    let (pending, success, failed) = terminal_counts(&events, id);
    assert_eq!(pending, 600);
    assert_eq!(success, 8);
    assert_eq!(failed.len(), 592);
    assert!(failed.iter().all(|m| m == "cancelled"), "{failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_a_flow_stopped_waiting_for_end_failed_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let events = CollectingSink::new();
    let rt = Runtime::embedded(env_with_events(events.clone(), &dir))
        .await
        .unwrap();
    let id = FlowRunId::new();
    let outcome = tokio::time::timeout(
        Duration::from_secs(20),
        rt.run("first_of_many", params(json!({"n": 20})), id),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(outcome.status, FlowStatus::Success, "{outcome:?}");
    assert_eq!(outcome.stats.cancelled, 19);
    rt.shutdown().await;
    let (pending, success, failed) = terminal_counts(&events, id);
    assert_eq!((pending, success, failed.len()), (20, 1, 19), "{failed:?}");
    assert!(failed.iter().all(|m| m == "cancelled"), "{failed:?}");
}

// ---------- a task's own error type, and where a task runs ----------

#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
struct QuotaExceeded {
    tenant: String,
    limit: u32,
}

impl std::fmt::Display for QuotaExceeded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tenant {} is over its quota of {}",
            self.tenant, self.limit
        )
    }
}

#[task(retries = 1, retry_delay = "1ms")]
async fn charge(tenant: String) -> Result<u32, QuotaExceeded> {
    Err(QuotaExceeded { tenant, limit: 7 })
}

#[task]
async fn untyped_failure() -> anyhow::Result<u32> {
    anyhow::bail!("plain anyhow")
}

#[task]
async fn context_probe(x: u32) -> anyhow::Result<Value> {
    let ctx = pinazu_flows::task_context().expect("a task context inside a task");
    Ok(json!({
        "x": x,
        "run": ctx.flow_run_id.to_string(),
        "current": pinazu_flows::current_flow_run_id().map(|i| i.to_string()),
        "task": ctx.task.to_string(),
        "attempt": ctx.attempt,
        "agent": ctx.agent_id.to_string(),
        "call": ctx.call_id.to_string(),
    }))
}

#[flow]
async fn typed_errors_and_context() -> anyhow::Result<Value> {
    let quota = charge("acme".into()).await.unwrap_err();
    let plain = untyped_failure().await.unwrap_err();
    Ok(json!({
        "quota": quota.downcast::<QuotaExceeded>().map(|q| json!({"tenant": q.tenant, "limit": q.limit})),
        "quota_message": quota.to_string(),
        "plain_as_quota": plain.downcast::<QuotaExceeded>().is_some(),
        "other_type": quota.downcast::<String>().is_some(),
        "context": context_probe(3).await?,
        "outside_a_task": pinazu_flows::task_context().is_some(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serde_task_error_reaches_the_flow_typed_and_a_task_knows_where_it_runs() {
    let env = env().await;
    let id = FlowRunId::new();
    let out = run_as(&env, "typed_errors_and_context", json!({}), id).await;
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    let r = out.result.unwrap();
    assert_eq!(r["quota"], json!({"tenant": "acme", "limit": 7}));
    assert!(
        r["quota_message"]
            .as_str()
            .unwrap()
            .contains("tenant acme is over its quota of 7"),
        "{r}"
    );
    assert_eq!(r["plain_as_quota"], false);
    assert_eq!(r["other_type"], false);
    assert_eq!(r["outside_a_task"], false);
    let c = &r["context"];
    assert_eq!(c["run"], id.to_string());
    assert_eq!(c["current"], id.to_string());
    assert_eq!(c["task"], "context_probe");
    assert_eq!(c["attempt"], 1);
    assert!(c["agent"].as_str().unwrap().starts_with("embedded-"), "{c}");
    assert!(c["call"].as_str().unwrap().ends_with("-0"), "{c}");
}

// ---------- a run id names one run: parameters compared as the flow's types ----------

#[task]
async fn count_tags(tags: Vec<String>) -> anyhow::Result<usize> {
    Ok(tags.len())
}

#[flow]
async fn tagged(
    tags: std::collections::HashSet<String>,
    #[default(1)] weight: u32,
) -> anyhow::Result<usize> {
    let mut sorted: Vec<String> = tags.into_iter().collect();
    sorted.sort();
    Ok(count_tags(sorted).await? * weight as usize)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_parameters_in_another_order_or_spelling_are_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(
        pinazu_coordinator::journal::LocalJournal::open(dir.path().join("journal")).unwrap(),
    );
    let runtime = || async {
        Runtime::embedded(RuntimeConfig {
            agents: 1,
            cache_dir: dir.path().to_path_buf(),
            events: CollectingSink::new(),
            journal: Some(journal.clone()),
            ..RuntimeConfig::default()
        })
        .await
        .unwrap()
    };
    let tags: Vec<String> = (0..12).map(|i| format!("tag-{i}")).collect();
    let mut reversed = tags.clone();
    reversed.reverse();
    let id = FlowRunId::new();
    let rt = runtime().await;
    let first = rt
        .run("tagged", params(json!({"tags": tags})), id)
        .await
        .unwrap();
    assert_eq!(first.status, FlowStatus::Success, "{first:?}");
    // a HashSet serialises in any order, and the default spelled out is the same value:
    // both are the same run, answered from its record (another process, same journal)
    let rt = runtime().await;
    let again = rt
        .run("tagged", params(json!({"tags": reversed, "weight": 1})), id)
        .await
        .unwrap();
    assert_eq!(again, first);
    let other = rt
        .run("tagged", params(json!({"tags": ["x"]})), id)
        .await
        .unwrap_err()
        .to_string();
    assert!(other.contains("cannot also be"), "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journaled_result_that_no_longer_decodes_is_dropped_and_the_call_runs_again() {
    use pinazu_coordinator::journal::{Journal, JournalEntry, LocalJournal};
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(LocalJournal::open(dir.path().join("journal")).unwrap());
    let run_id = FlowRunId::new();
    // a failed run whose journal holds a string for `square(6)` (a u64): what a bad
    // cache entry or a changed return type leaves
    journal.append(
        run_id,
        JournalEntry::RunStarted {
            flow: "one_square".into(),
            params: params(json!({"x": 6})),
            idempotency_key: None,
            events: None,
            started_at_ms: None,
            meta: Default::default(),
        },
    );
    let call_id = pinazu_shared::ids::CallId {
        key: pinazu_shared::ids::CallId::content_key(
            "square",
            &rmp_serde::to_vec_named(&(6u64,)).unwrap(),
        ),
        seq: 0,
    };
    journal.append(
        run_id,
        JournalEntry::CallEnded {
            ordinal: 0,
            call_id,
            task: "square".into(),
            outcome: Ok(bytes::Bytes::from(rmp_serde::to_vec("oops").unwrap())),
            executions: 1,
            outcome_ref: None,
        },
    );
    journal.append(
        run_id,
        JournalEntry::RunEnded {
            status: FlowStatus::Failed,
            summary: None,
            params: None,
            result_ref: None,
            result_lost: false,
        },
    );
    journal.flush().await.unwrap();
    let rt = Runtime::embedded(RuntimeConfig {
        agents: 1,
        cache_dir: dir.path().to_path_buf(),
        events: CollectingSink::new(),
        journal: Some(journal),
        ..RuntimeConfig::default()
    })
    .await
    .unwrap();
    let out = rt
        .run("one_square", params(json!({"x": 6})), run_id)
        .await
        .unwrap();
    assert_eq!(out.status, FlowStatus::Success, "{out:?}");
    assert_eq!(out.result, Some(json!(36)));
    assert_eq!(out.stats.replayed, 0, "the bad entry answered nothing");
    assert_eq!(out.stats.executions, 1, "the call ran again");
}
