//! Schedules for real: nats-server, coordinators and an agent; fires checked from the
//! outside (the runs' status events, as Pinazu Core sees them; each attempt's record
//! written by the agent that ran it), with coordinators SIGKILLed meanwhile.

mod common;

use common::limits::*;
use common::*;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn ok(c: &Cluster, args: &[&str]) -> String {
    let out = c.output(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn schedule(c: &Cluster, name: &str) -> Value {
    let v: Value = serde_json::from_str(&ok(c, &["schedule", "list", "--json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .find(|s| s["spec"]["name"] == name)
        .cloned()
        .unwrap_or(Value::Null)
}

/// `schedule` once a coordinator answers (`None` meanwhile).
fn try_schedule(c: &Cluster, name: &str) -> Option<Value> {
    let out = c.output(&["schedule", "list", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|s| s["spec"]["name"] == name)
        .cloned()
}

/// Fire time -> run, of the fires that started a run.
fn started_fires(s: &Value) -> BTreeMap<u64, String> {
    s["state"]["recent"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["run"].is_string())
        .map(|f| {
            (
                f["at_ms"].as_u64().unwrap(),
                f["run"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn coordinator(c: &Cluster, name: &str) -> Proc {
    Proc::spawn(name, {
        let mut cmd = c.cmd();
        cmd.arg("coordinator");
        cmd
    })
}

/// Every second, with two coordinators: one is SIGKILLed, then both, then one comes
/// back. No fire is lost (the fire times are contiguous, each with its run), none is
/// doubled (each run's one call ran once, on the agents' records), and while a
/// coordinator lived the runs started at most 1 s after their fire time (p99, from
/// their RUNNING events).
#[test]
fn fires_are_on_time_and_neither_lost_nor_doubled_across_failovers() {
    let mut c = Cluster::start(1, 8, &[]);
    let mut b = coordinator(&c, "coordinator-b");
    let events = EventRecorder::start(&c.nats.url());
    ok(
        &c,
        &[
            "schedule",
            "add",
            "tick",
            "--flow",
            "plain_fanout",
            "--every",
            "1s",
            "--overlap",
            "allow-all",
            "--input",
            r#"{"n": 1, "work_ms": 1}"#,
        ],
    );
    std::thread::sleep(Duration::from_secs(5));
    c.coordinator.kill9();
    std::thread::sleep(Duration::from_secs(4));
    c.coordinator = coordinator(&c, "coordinator-a2");
    std::thread::sleep(Duration::from_secs(3));
    let outage_from = now_ms();
    c.coordinator.kill9();
    b.kill9();
    std::thread::sleep(Duration::from_secs(3));
    c.coordinator = coordinator(&c, "coordinator-a3");
    wait_until(
        Duration::from_secs(30),
        "the fires missed to be caught up",
        || {
            let s = try_schedule(&c, "tick")?;
            let fires = started_fires(&s);
            (fires.keys().next_back()? > &(outage_from + 4_000)).then_some(())
        },
    );
    ok(&c, &["schedule", "pause", "tick"]);
    let s = schedule(&c, "tick");
    let fires = started_fires(&s);
    assert!(fires.len() >= 15, "{s}");
    let times: Vec<u64> = fires.keys().copied().collect();
    for w in times.windows(2) {
        assert_eq!(
            w[1] - w[0],
            1000,
            "a fire was lost between {} and {}: {s}",
            w[0],
            w[1]
        );
    }
    // each fire's run ran its one call once (wait for the last ones to end)
    let runs: Vec<String> = fires.values().cloned().collect();
    wait_until(Duration::from_secs(60), "every fired run to end", || {
        runs.iter()
            .all(|r| c.status(r)["status"] == "SUCCESS")
            .then_some(())
    });
    let mut per_run: HashMap<String, usize> = HashMap::new();
    for r in records(&c.record()) {
        *per_run.entry(r.run).or_default() += 1;
    }
    for r in &runs {
        assert_eq!(
            per_run.get(r),
            Some(&1),
            "run {r} ran its call {:?} times",
            per_run.get(r)
        );
    }
    // on time while a coordinator lived: the RUNNING event within 1 s of the fire time
    let mut late: Vec<u64> = Vec::new();
    for (at, run) in &fires {
        if *at >= outage_from.saturating_sub(1000) {
            continue; // fired late on purpose: no coordinator was up
        }
        let ev = events.wait_flow(run, "RUNNING", Duration::from_secs(10));
        let t = humantime::parse_rfc3339(ev["message"]["event_timestamp"].as_str().unwrap())
            .unwrap()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        late.push(t.saturating_sub(*at));
    }
    late.sort();
    let p99 = late[(late.len() * 99 / 100).min(late.len() - 1)];
    eprintln!(
        "{} fires on time: median {} ms late, p99 {p99} ms, max {} ms",
        late.len(),
        late[late.len() / 2],
        late[late.len() - 1]
    );
    assert!(late.len() >= 10);
    assert!(p99 <= 1000, "p99 {p99} ms late: {late:?}");
}

/// Overlap skip (a 2.5 s flow every second: runs never overlap, fires are skipped),
/// pause and resume (nothing while paused, nothing caught up), a backfill (made twice:
/// one run per fire time), and bad definitions refused with the reason.
#[test]
fn overlap_pause_backfill_and_bad_definitions() {
    let c = Cluster::start(1, 8, &[]);
    ok(
        &c,
        &[
            "schedule",
            "add",
            "slow",
            "--flow",
            "plain_fanout",
            "--every",
            "1s",
            "--input",
            r#"{"n": 1, "work_ms": 2500}"#,
        ],
    );
    std::thread::sleep(Duration::from_secs(7));
    ok(&c, &["schedule", "pause", "slow"]);
    let s = schedule(&c, "slow");
    assert!(s["state"]["skipped"].as_u64().unwrap() >= 3, "{s}");
    let fires = started_fires(&s);
    assert!(fires.len() >= 2, "{s}");
    wait_until(Duration::from_secs(30), "the slow runs to end", || {
        fires
            .values()
            .all(|r| c.status(r)["status"] == "SUCCESS")
            .then_some(())
    });
    let mut spans: Vec<(u128, u128)> = records(&c.record())
        .into_iter()
        .filter(|r| fires.values().any(|f| *f == r.run))
        .map(|r| (r.start, r.end))
        .collect();
    spans.sort();
    for w in spans.windows(2) {
        assert!(w[1].0 >= w[0].1, "skip: two runs overlapped: {spans:?}");
    }

    // paused: nothing starts; resumed: fires again, nothing caught up
    let started = s["state"]["started"].as_u64().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(schedule(&c, "slow")["state"]["started"], started);
    let resumed_at = now_ms();
    ok(&c, &["schedule", "resume", "slow"]);
    wait_until(Duration::from_secs(10), "a fire after the resume", || {
        let s = schedule(&c, "slow");
        (s["state"]["started"].as_u64()? > started).then_some(())
    });
    let s = schedule(&c, "slow");
    let after: Vec<u64> = started_fires(&s)
        .into_keys()
        .filter(|t| *t > fires.keys().next_back().copied().unwrap())
        .collect();
    assert!(
        after.iter().all(|t| *t + 1000 >= resumed_at),
        "caught up while paused: {after:?} (resumed at {resumed_at})"
    );
    ok(&c, &["schedule", "delete", "slow"]);
    assert_eq!(schedule(&c, "slow"), Value::Null);

    // backfill: every 03:00 UTC of the last three days, twice
    ok(
        &c,
        &[
            "schedule",
            "add",
            "nightly",
            "--flow",
            "plain_fanout",
            "--cron",
            "0 3 * * *",
            "--input",
            r#"{"n": 1, "work_ms": 1}"#,
        ],
    );
    let to = now_ms();
    let from = to - 3 * 86_400_000 + 1;
    let out = ok(
        &c,
        &[
            "schedule",
            "backfill",
            "nightly",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ],
    );
    assert!(out.contains("3 backfilled runs"), "{out}");
    ok(
        &c,
        &[
            "schedule",
            "backfill",
            "nightly",
            "--from",
            &from.to_string(),
            "--to",
            &to.to_string(),
        ],
    );
    let s = wait_until(Duration::from_secs(20), "the backfill to start", || {
        let s = schedule(&c, "nightly");
        s["state"]["pending"].as_array()?.is_empty().then_some(s)
    });
    let fires = started_fires(&s);
    assert_eq!(fires.len(), 3, "one run per fire time: {s}");
    for (at, run) in &fires {
        assert_eq!(at % 86_400_000, 3 * 3_600_000, "03:00 UTC");
        let st = wait_until(Duration::from_secs(20), "the backfilled run to end", || {
            let st = c.status(run);
            (st["status"] == "SUCCESS").then_some(st)
        });
        assert_eq!(st["tasks"], 1);
    }

    // bad definitions: refused with the reason, nothing stored
    for (args, why) in [
        (vec!["--cron", "61 * * * *"], "invalid cron expression"),
        (
            vec!["--cron", "0 2 * * *", "--timezone", "Mars/Olympus"],
            "unknown time zone",
        ),
        (vec!["--every", "500ms"], "too short"),
        (
            vec!["--every", "5s", "--input", r#"{"n": "many"}"#],
            "--input",
        ),
        (
            vec!["--every", "5s", "--overlap", "sometimes"],
            "unknown overlap policy",
        ),
        (
            vec!["--every", "5s", "--cron", "* * * * *"],
            "cannot be used with",
        ),
    ] {
        let out = c.output(
            &[
                &["schedule", "add", "bad", "--flow", "plain_fanout"],
                &args[..],
            ]
            .concat(),
        );
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    for (args, why) in [
        (
            vec!["schedule", "add", "x", "--flow", "nope", "--every", "5s"],
            "flow `nope` is not defined",
        ),
        (
            vec![
                "schedule",
                "add",
                "nightly",
                "--flow",
                "plain_fanout",
                "--every",
                "5s",
                "--input",
                r#"{"n": 1}"#,
            ],
            "exists",
        ),
        (vec!["schedule", "pause", "nope"], "no schedule named"),
        (
            vec![
                "schedule",
                "backfill",
                "nightly",
                "--from",
                "yesterday",
                "--to",
                "now",
            ],
            "not a time",
        ),
    ] {
        let out = c.output(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(schedule(&c, "bad"), Value::Null);
}
