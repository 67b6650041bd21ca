//! Concurrency and rate limits, priorities and fairness, for real: a nats-server, a
//! coordinator and agent processes. Every attempt of `examples/limits_flow.rs` appends
//! its start and end (taken on the agent that ran it) to a file; the checks read it.

mod common;

use common::limits::*;
use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// 50 agents (200 slots), 5,000 calls of a task limited to 10 at once: never more than
/// 10 ran at once on all agents together, and 10 did. Then a keyed limit (2 per
/// tenant), a named limit set at start, changed at run time and kept across a
/// coordinator restart, and one removed (a clear failure, not a stuck run).
#[test]
fn concurrency_limits_hold_over_fifty_agents() {
    let mut c = Cluster::start(50, 4, &["--limit", "api=7"]);
    let rec = c.record();

    let out = c.run("capped_fanout", &["--n=5000", "--work-ms=2"]);
    assert_eq!(out["result"], (0..5000u64).sum::<u64>());
    let recs = records(&rec);
    assert_eq!(recs.len(), 5000, "one record per attempt");
    let agents: std::collections::HashSet<&str> = recs.iter().map(|r| r.agent.as_str()).collect();
    assert!(
        agents.len() > 10,
        "the calls spread over the agents: {agents:?}"
    );
    assert_eq!(max_running(&recs), 10, "at most (and at best) 10 at once");

    // keyed: 2 per tenant, 5 tenants
    std::fs::remove_file(&rec).unwrap();
    c.run("keyed_fanout", &["--n=1000", "--tenants=5", "--work-ms=3"]);
    let recs = records(&rec);
    assert_eq!(recs.len(), 1000);
    let mut by_key: HashMap<&str, Vec<Rec>> = HashMap::new();
    for r in &recs {
        by_key.entry(r.key.as_str()).or_default().push(r.clone());
    }
    assert_eq!(by_key.len(), 5);
    for (key, v) in &by_key {
        assert_eq!(max_running(v), 2, "tenant {key}: 2 at once at most");
    }
    assert!(max_running(&recs) <= 10);

    // named: sized at start, changed at run time, kept across a restart
    assert_eq!(named_size(&c.limits(), "api")["concurrency"], 7);
    std::fs::remove_file(&rec).unwrap();
    c.run("named_fanout", &["--n=400", "--work-ms=3"]);
    assert_eq!(max_running(&records(&rec)), 7);
    let set = c.output(&["limits", "set", "api", "3"]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    c.coordinator.kill9();
    c.coordinator = Proc::spawn("coordinator-2", {
        let mut cmd = c.cmd();
        cmd.arg("coordinator");
        cmd
    });
    wait_until(
        Duration::from_secs(30),
        "the new coordinator to answer",
        || {
            let out = c.output(&["limits", "list", "--json"]);
            let v: Value = serde_json::from_slice(&out.stdout).ok()?;
            Some(v)
        },
    );
    assert_eq!(
        named_size(&c.limits(), "api")["concurrency"],
        3,
        "the size set at run time is stored: {}",
        c.logs()
    );
    c.wait_agents(50);
    std::fs::remove_file(&rec).unwrap();
    c.run("named_fanout", &["--n=200", "--work-ms=3"]);
    assert_eq!(max_running(&records(&rec)), 3);

    // removed: the run fails with the reason, at once
    let rm = c.output(&["limits", "rm", "api"]);
    assert!(
        rm.status.success(),
        "{}",
        String::from_utf8_lossy(&rm.stderr)
    );
    assert_eq!(named_size(&c.limits(), "api"), Value::Null);
    let t = Instant::now();
    let out = c.output(&["run", "named_fanout", "--n=3", "--no-progress"]);
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("FAILED"), "{err}");
    assert!(
        err.contains("limit `api`, which is not defined") && err.contains("limits set api"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(20), "failed at once");

    // bad sizes and names are refused with the reason
    for (args, why) in [
        (vec!["limits", "set", "api", "0"], "never run anything"),
        (vec!["limits", "set", "api", "0/s"], "invalid rate"),
        (vec!["limits", "set", "api", "ten"], "invalid limit"),
        (vec!["limits", "set", "a.b", "3"], "invalid limit name"),
        (
            vec!["run", "plain_fanout", "--n=1", "--priority=high"],
            "invalid value",
        ),
    ] {
        let out = c.output(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let bad = common::app(APP)
        .args(["coordinator", "--limit", "api=5/d"])
        .env("NATS_URL", c.nats.url())
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid rate"));
}

/// Two gates on one task (its own concurrency of 1 and the named limit `pair`, which
/// another task shares): attempts never hold one gate while waiting at the other, so
/// the fan-out ends (it deadlocked when they did), within both limits. Embedded mode:
/// the same scheduler, no servers.
#[test]
fn two_gates_on_one_task_never_deadlock() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.txt");
    for (limit, max) in [("pair=1", 1), ("pair=3", 3)] {
        let _ = std::fs::remove_file(&record);
        let child = common::app(APP)
            .args([
                "--flow",
                "mixed_fanout",
                "--n=300",
                "--agents=4",
                "--slots=8",
            ])
            .args(["--limit", limit, "--no-progress", "--no-journal"])
            .env("PINAZU_RECORD", &record)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = finish_within(child, Duration::from_secs(60), String::new);
        let v = succeeded(&out, String::new);
        assert_eq!(v["result"], (0..300u64).sum::<u64>());
        let recs = records(&record);
        assert_eq!(recs.len(), 300);
        assert_eq!(max_running(&recs), max, "limit {limit}");
        let guarded: Vec<Rec> = recs
            .iter()
            .filter(|r| r.task == "guarded")
            .cloned()
            .collect();
        assert_eq!(max_running(&guarded), 1);
    }
}

/// `with_priority` on calls: one slot, 200 calls made first, then 5 at priority 10;
/// the 5 start before all but a few of the 200 (those already given the slot).
#[test]
fn calls_made_with_a_higher_priority_go_first() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.txt");
    let child = common::app(APP)
        .args([
            "--flow",
            "urgent_calls",
            "--n=200",
            "--urgent=5",
            "--work-ms=2",
        ])
        .args(["--agents=1", "--slots=1", "--no-progress", "--no-journal"])
        .env("PINAZU_RECORD", &record)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let out = finish_within(child, Duration::from_secs(60), String::new);
    succeeded(&out, String::new);
    let mut recs = records(&record);
    assert_eq!(recs.len(), 205);
    // the calls in start order (`plain` records its argument as the key): where did
    // the urgent ones (200..205) start?
    recs.sort_by_key(|r| r.start);
    let positions: Vec<usize> = recs
        .iter()
        .enumerate()
        .filter(|(_, r)| r.key.parse::<u64>().unwrap() >= 200)
        .map(|(i, _)| i)
        .collect();
    eprintln!("urgent calls started at positions {positions:?} of 205");
    assert_eq!(positions.len(), 5);
    assert!(positions.iter().all(|p| *p < 20), "{positions:?}");
}

/// When slots are scarce: a 10-call run next to a big run of equal priority gets a turn
/// per call (it does not wait behind the big run's queue), and a higher-priority run
/// takes every slot that frees until it is done.
#[test]
fn priorities_go_first_and_equal_runs_take_turns() {
    let c = Cluster::start(2, 2, &[]);
    let big = c.detach("plain_fanout", &["--n=3000", "--work-ms=5"]);
    c.wait_completed(&big, 200);
    let small = c.run("plain_fanout", &["--n=10", "--work-ms=5"]);
    eprintln!(
        "a 10-call run next to a 3,000-call run: {} ms",
        small["stats"]["wall_ms"]
    );
    assert_eq!(
        c.status(&big)["status"],
        "RUNNING",
        "the big run was still going"
    );
    let small_id = small["flow_run_id"].as_str().unwrap();
    let recs = records(&c.record());
    let mine: Vec<&Rec> = recs.iter().filter(|r| r.run == small_id).collect();
    assert_eq!(mine.len(), 10);
    let first = mine.iter().map(|r| r.start).min().unwrap();
    let last = mine.iter().map(|r| r.start).max().unwrap();
    let others = recs
        .iter()
        .filter(|r| r.run == big && r.start > first && r.start < last)
        .count();
    eprintln!("big run's starts while the small one ran: {others}");
    assert!(
        others <= 30,
        "turns: {others} of the big run's calls started meanwhile"
    );

    // a higher priority: the low run gets nothing once the high one is queued (but
    // what was in flight)
    let low = c.detach("plain_fanout", &["--n=3000", "--work-ms=6"]);
    c.wait_completed(&low, 100);
    let high = c.run("plain_fanout", &["--n=200", "--work-ms=5", "--priority=5"]);
    let high_id = high["flow_run_id"].as_str().unwrap();
    let recs = records(&c.record());
    let mine: Vec<&Rec> = recs.iter().filter(|r| r.run == high_id).collect();
    assert_eq!(mine.len(), 200);
    let first = mine.iter().map(|r| r.start).min().unwrap();
    let last = mine.iter().map(|r| r.start).max().unwrap();
    let others = recs
        .iter()
        .filter(|r| r.run == low && r.start > first && r.start < last)
        .count();
    eprintln!("low run's starts while the high one ran: {others}");
    assert!(others <= 8, "{others} low-priority calls started meanwhile");
    for id in [&big, &low] {
        let _ = c.output(&["cancel", id]);
    }
}
