//! The examples as a user runs them: real processes, stdout's last line parsed as JSON,
//! exit codes checked. `cargo test` builds the examples before running this.

mod common;

use common::example;
use serde_json::Value;
use std::process::{Command, Output};

fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let cache = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(example(name));
    cmd.args(args)
        .env_remove("FLOW_RUN_ID")
        .env_remove("RUST_LOG")
        .env_remove("ENABLE_S3_CACHING")
        .env_remove("PINAZU_STORE")
        .env_remove("CACHE_BUCKET")
        .env("PINAZU_CACHE_DIR", cache.path())
        .env("PINAZU_JOURNAL_DIR", cache.path().join("journal"))
        .env("LOG_LEVEL", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("example runs")
}

fn last_line(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "last stdout line is not JSON ({e}): {line:?}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn parallel_flow_prints_the_exact_sum_as_its_last_line() {
    let out = run(
        "parallel_flow",
        &["--n=2000", "--agents=2", "--slots=4"],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let line = last_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    assert_eq!(line["result"], 2_664_667_000u64);
    assert_eq!(line["error"], Value::Null);
    assert_eq!(line["stats"]["tasks"], 2000);
    assert_eq!(line["stats"]["executions"], 2000);
    assert_eq!(line["stats"]["cache_hits"], 0);
    assert_eq!(line["stats"]["retries"], 0);
    assert!(line["stats"]["wall_ms"].is_u64());
    let keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for k in ["flow_run_id", "status", "result", "error", "stats"] {
        assert!(keys.contains(&k), "{keys:?}");
    }
}

#[test]
fn flow_run_id_comes_from_the_environment() {
    let id = "0b8f4a5e-7c1d-4b6e-9a51-3f1e2d4c5b6a";
    let out = run("parallel_flow", &["--n=3"], &[("FLOW_RUN_ID", id)]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(last_line(&out)["flow_run_id"], id);
}

#[test]
fn an_invalid_flow_run_id_is_a_clear_error_and_a_non_zero_exit() {
    let out = run(
        "parallel_flow",
        &["--n=3"],
        &[("FLOW_RUN_ID", "not-a-uuid")],
    );
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("FLOW_RUN_ID") && stderr.contains("not-a-uuid"),
        "{stderr}"
    );
    assert!(stderr.contains("UUID"), "{stderr}");
}

#[test]
fn parameters_come_from_input_json_and_bad_ones_are_rejected() {
    let out = run(
        "parallel_flow",
        &["--input", r#"{"n": 10, "work_ms": 1}"#],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(last_line(&out)["result"], 285);

    let out = run("parallel_flow", &["--n=ten"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let line = last_line(&out);
    assert_eq!(line["status"], "FAILED");
    assert!(
        line["error"].as_str().unwrap().contains("parameter `n`"),
        "{line}"
    );
}

#[test]
fn retry_flow_retries_then_handles_the_final_failure() {
    let out = run("retry_flow", &[], &[]);
    assert!(out.status.success(), "{out:?}");
    let line = last_line(&out);
    assert_eq!(line["status"], "SUCCESS");
    assert_eq!(line["result"]["fetched"], "fetched on attempt 3");
    assert_eq!(line["result"]["service"], "fallback");
    assert_eq!(line["stats"]["retries"], 4);
    assert_eq!(line["stats"]["executions"], 6);
}

#[test]
fn a_failed_run_exits_non_zero_with_the_error_in_its_last_line() {
    // flaky_fetch has 4 retries: 10 failures exhaust them
    let out = run("retry_flow", &["--failures=10"], &[]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let line = last_line(&out);
    assert_eq!(line["status"], "FAILED");
    let err = line["error"].as_str().unwrap();
    assert!(
        err.contains("flaky_fetch") && err.contains("5 attempt"),
        "{err}"
    );
}

#[test]
fn example_flow_prints_each_step() {
    let out = run("example_flow", &["--a=5", "--b=3"], &[]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("step 1: add(5, 3) = 8"), "{stdout}");
    assert!(stdout.contains("step 3: subtract(16, 1) = 15"), "{stdout}");
    assert_eq!(last_line(&out)["result"], "15 is odd and non-negative");
}

#[test]
fn json_logs_with_log_format_json() {
    let out = run("parallel_flow", &["--n=3"], &[("LOG_FORMAT", "json")]);
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "some log lines");
    for l in lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["level"].is_string() && v["timestamp"].is_string(), "{v}");
    }
}

#[test]
fn enable_s3_caching_makes_reruns_of_one_run_id_skip_work() {
    let cache = tempfile::tempdir().unwrap();
    let dir = cache.path().to_str().unwrap();
    let id = "7f2c9a10-1111-4e2b-8c3d-0123456789ab";
    let env = [
        // ENABLE_S3_CACHING sets the policy; PINAZU_STORE keeps the objects in a directory
        ("ENABLE_S3_CACHING", "true"),
        ("FLOW_RUN_ID", id),
        ("PINAZU_STORE", dir),
    ];
    let first = last_line(&run("parallel_flow", &["--n=50"], &env));
    assert_eq!(first["stats"]["executions"], 50);
    let second = last_line(&run("parallel_flow", &["--n=50"], &env));
    assert_eq!(second["stats"]["executions"], 0, "{second}");
    assert_eq!(second["stats"]["cache_hits"], 50);
    assert_eq!(second["result"], first["result"]);
}

#[test]
fn success_task_results_are_used_instead_of_running_those_tasks() {
    // by task name, and by the original MD5 cache key of one call
    let md5 = format!(
        "{:x}",
        md5::compute(br#"{"args":[8,2],"kwargs":{},"task_name":"multiply"}"#)
    );
    let seeds = format!(r#"{{"add": 8, "{md5}": 16}}"#);
    let out = run(
        "example_flow",
        &["--a=5", "--b=3", "--success-task-results", &seeds],
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    let line = last_line(&out);
    assert_eq!(line["result"], "15 is odd and non-negative");
    assert_eq!(line["stats"]["executions"], 2, "{line}");
    assert_eq!(line["stats"]["replayed"], 2, "{line}");
    let out = run("example_flow", &["--success-task-results", "[1,"], &[]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn an_embedded_run_killed_and_started_again_resumes_from_its_journal() {
    let dir = tempfile::tempdir().unwrap();
    let journal = dir.path().join("journal");
    let id = "e0e0e0e0-1111-4222-8333-444455556666";
    let cmd = || {
        let mut c = Command::new(example("parallel_flow"));
        c.args(["--n=1500", "--work-ms=10", "--agents=2", "--slots=4"])
            .env("FLOW_RUN_ID", id)
            .env("PINAZU_JOURNAL_DIR", &journal)
            .env("PINAZU_CACHE_DIR", dir.path().join("cache"))
            .env_remove("ENABLE_S3_CACHING")
            .env_remove("PINAZU_STORE")
            .env_remove("NATS_URL");
        c
    };
    let mut first = cmd()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let file = journal.join(format!("{id}.journal"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0) < 30_000 {
        assert!(
            std::time::Instant::now() < deadline,
            "the run journals nothing"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let out = cmd().output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let line = last_line(&out);
    assert_eq!(line["result"], 1_123_875_250u64);
    let replayed = line["stats"]["replayed"].as_u64().unwrap();
    assert!(replayed > 0 && replayed < 1500, "{line}");
}
