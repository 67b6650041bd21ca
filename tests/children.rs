//! Child flows for real: a nats-server, a coordinator and agents; `parent_flow` of
//! `examples/limits_flow.rs` starts `child_flow` runs. Each child is a run of its own
//! (id, events, journal, `parent_run_id`); a resumed parent does not run a finished child
//! again; cancelling the parent cancels its children.

mod common;

use common::limits::*;
use common::*;
use serde_json::{json, Value};
use std::time::Duration;

fn sum_to(n: u64) -> u64 {
    (0..n).sum()
}

/// The runs whose `parent_run_id` is `parent`, as `runs` lists them.
fn children_of(c: &Cluster, parent: &str) -> Vec<Value> {
    let out = c.output(&["runs", "--json", "--limit", "100"]);
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    runs.as_array()
        .map(|a| {
            a.iter()
                .filter(|r| r["parent_run_id"] == parent)
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_child_flow_is_a_run_of_its_own() {
    let c = Cluster::start(2, 4, &[]);
    let events = EventRecorder::start(&c.nats.url());
    let out = c.run(
        "parent_flow",
        &["--children=3", "--n=5", "--work-ms=1", "--fail-child=1"],
    );
    let parent = out["flow_run_id"].as_str().unwrap().to_string();
    let result = &out["result"];
    assert_eq!(result[0], sum_to(5));
    assert_eq!(result[2], sum_to(15));
    let err = result[1]["error"].as_str().unwrap();
    assert!(
        err.contains("child_flow") && err.contains("this child was asked to fail"),
        "the child's failure reached the parent as an error it handled: {err}"
    );
    // three runs with the parent's id as parent_run_id, in `runs` and `status`
    let kids = children_of(&c, &parent);
    assert_eq!(kids.len(), 3, "{kids:?}");
    let mut statuses: Vec<String> = Vec::new();
    for k in &kids {
        let id = k["flow_run_id"].as_str().unwrap();
        assert_eq!(k["flow"], "child_flow");
        let st = c.status(id);
        assert_eq!(st["parent_run_id"], parent.as_str(), "{st}");
        statuses.push(st["status"].as_str().unwrap().to_string());
        // its own status events
        let flow_events =
            events.wait_flow(id, st["status"].as_str().unwrap(), Duration::from_secs(10));
        assert_eq!(flow_events["message"]["flow_run_id"], id);
        assert_eq!(events.flow_statuses(id)[0], "RUNNING");
    }
    statuses.sort();
    assert_eq!(statuses, ["FAILED", "SUCCESS", "SUCCESS"]);
    // the parent's own counters: three calls, none an agent's attempt
    let st = c.status(&parent);
    assert_eq!(st["tasks"], 3);
    assert_eq!(st.get("parent_run_id"), None);
    // the parent's id given again answers its recorded result: nothing runs again
    let again = c.run(
        "parent_flow",
        &[
            "--children=3",
            "--n=5",
            "--work-ms=1",
            "--fail-child=1",
            "--flow-run-id",
            &parent,
        ],
    );
    assert_eq!(&again["result"], result);
    assert_eq!(children_of(&c, &parent).len(), 3);
}

/// SIGKILL the coordinator after the first child ended and before the others did: the
/// new coordinator resumes the parent and the unfinished children; the finished child
/// is answered, not run again.
#[test]
fn a_resumed_parent_does_not_run_a_finished_child_again() {
    let mut c = Cluster::start(2, 2, &[]);
    let parent = c.detach("parent_flow", &["--children=3", "--n=40", "--work-ms=25"]);
    let first = wait_until(Duration::from_secs(60), "the first child to end", || {
        let kids = children_of(&c, &parent);
        kids.iter()
            .find(|k| k["status"] == "SUCCESS")
            .map(|k| k["flow_run_id"].as_str().unwrap().to_string())
    });
    let unfinished: Vec<String> = children_of(&c, &parent)
        .iter()
        .filter(|k| k["status"] == "RUNNING")
        .map(|k| k["flow_run_id"].as_str().unwrap().to_string())
        .collect();
    assert!(!unfinished.is_empty(), "killed while children still ran");
    c.coordinator.kill9();
    c.coordinator = Proc::spawn("coordinator-2", {
        let mut cmd = c.cmd();
        cmd.arg("coordinator");
        cmd
    });
    let done = wait_until(Duration::from_secs(90), "the parent to end", || {
        let st = c.status(&parent);
        (st["status"] == "SUCCESS" || st["status"] == "FAILED").then_some(st)
    });
    assert_eq!(done["status"], "SUCCESS", "{done}\n{}", c.logs());
    assert_eq!(
        done["result"],
        json!([sum_to(40), sum_to(80), sum_to(120)]),
        "{done}"
    );
    let logs = c.coordinator.logs();
    assert!(
        !logs.contains(&format!("flow run started flow_run_id={first}")),
        "the finished child ran again:\n{logs}"
    );
    for id in &unfinished {
        let st = c.status(id);
        assert_eq!(st["status"], "SUCCESS", "{st}");
        assert_eq!(st["parent_run_id"], parent.as_str());
        assert!(
            logs.contains(&format!("resumed an unfinished run flow_run_id={id}"))
                || logs.contains(&format!("flow run started flow_run_id={id}")),
            "child {id} went on under its id:\n{logs}"
        );
    }
    assert_eq!(children_of(&c, &parent).len(), 3, "no child started twice");
}

/// Embedded, with the local journal: a parent that failed because its child failed,
/// run again under its id, runs that child again (which now succeeds); the run after
/// that answers from the journal and runs nothing.
#[test]
fn a_failed_parent_run_again_runs_its_failed_child_again() {
    let dir = tempfile::tempdir().unwrap();
    let (record, mark) = (dir.path().join("record.txt"), dir.path().join("fail"));
    std::fs::write(&mark, "").unwrap();
    let id = "0c9f0a2e-5d2c-4a8e-9a57-3f1d1e0a7b11";
    let run = || {
        let child = common::app("limits_flow")
            .args(["--flow", "strict_parent", "--n=3", "--no-progress"])
            .env("FLOW_RUN_ID", id)
            .env("PINAZU_JOURNAL_DIR", dir.path().join("journal"))
            .env("PINAZU_RECORD", &record)
            .env("PINAZU_FAIL_MARK", &mark)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = finish_within(child, Duration::from_secs(60), String::new);
        last_json_line(&out)
    };
    let first = run();
    assert_eq!(first["status"], "FAILED", "{first}");
    assert!(
        first["error"]
            .as_str()
            .unwrap()
            .contains("the fail mark is there"),
        "{first}"
    );
    assert_eq!(records(&record).len(), 3);
    std::fs::remove_file(&mark).unwrap();
    let second = run();
    assert_eq!(second["status"], "SUCCESS", "{second}");
    assert_eq!(second["result"], 3);
    // the child ran again (its calls answered from its own journal: none executed)
    let third = run();
    assert_eq!(third["status"], "SUCCESS");
    assert_eq!(third["result"], 3);
    let recs = records(&record);
    assert_eq!(recs.len(), 3, "the child's calls ran once: {recs:?}");
}

#[test]
fn cancelling_the_parent_cancels_its_children() {
    let c = Cluster::start(1, 2, &[]);
    let parent = c.detach("parent_flow", &["--children=2", "--n=2000", "--work-ms=10"]);
    let kids: Vec<String> = wait_until(Duration::from_secs(30), "two running children", || {
        let kids = children_of(&c, &parent);
        (kids.len() == 2 && kids.iter().all(|k| k["status"] == "RUNNING")).then(|| {
            kids.iter()
                .map(|k| k["flow_run_id"].as_str().unwrap().to_string())
                .collect()
        })
    });
    let out = c.output(&["cancel", &parent]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in &kids {
        let st = wait_until(Duration::from_secs(30), "the child to end", || {
            let st = c.status(id);
            (st["status"] == "FAILED").then_some(st)
        });
        let err = st["error"].as_str().unwrap_or_default();
        assert!(err.contains(&parent) && err.contains("parent run"), "{err}");
    }
}

/// With two coordinators, the parent's coordinator is SIGKILLed: the parent and its
/// children are taken over (maybe by different coordinators). Cancelling the parent
/// then cancels every child, wherever it runs.
#[test]
fn cancelling_a_taken_over_parent_cancels_children_on_any_coordinator() {
    let mut c = Cluster::start(2, 4, &[]);
    let mut b = Proc::spawn("coordinator-b", {
        let mut cmd = c.cmd();
        cmd.arg("coordinator");
        cmd
    });
    let parent = c.detach("parent_flow", &["--children=4", "--n=3000", "--work-ms=10"]);
    let kids: Vec<String> = wait_until(Duration::from_secs(30), "four running children", || {
        let kids = children_of(&c, &parent);
        (kids.len() == 4 && kids.iter().all(|k| k["status"] == "RUNNING")).then(|| {
            kids.iter()
                .map(|k| k["flow_run_id"].as_str().unwrap().to_string())
                .collect()
        })
    });
    // the parent's coordinator dies (its owner id holds its pid)
    let owner = c.status(&parent)["owner"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let a_pid = format!("-{}-", c.coordinator.pid());
    let survivor_is_b = owner.contains(&a_pid);
    if survivor_is_b {
        c.coordinator.kill9();
    } else {
        b.kill9();
    }
    wait_until(
        Duration::from_secs(60),
        "the parent and children to be taken over",
        || {
            let all: Vec<String> = std::iter::once(parent.clone())
                .chain(kids.iter().cloned())
                .collect();
            all.iter()
                .all(|id| {
                    let st = c.status(id);
                    st["status"] == "RUNNING" && st["owner"].as_str().is_some_and(|o| o != owner)
                })
                .then_some(())
        },
    );
    let out = c.output(&["cancel", &parent]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for id in &kids {
        let st = wait_until(Duration::from_secs(40), "the child to end", || {
            let st = c.status(id);
            (st["status"] == "FAILED").then_some(st)
        });
        assert!(
            st["error"]
                .as_str()
                .unwrap_or_default()
                .contains("parent run"),
            "{st}"
        );
    }
    drop(b);
}
