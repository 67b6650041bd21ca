//! Limits, priorities, fairness and child flows, as the tests exercise them: each
//! fan-out flow makes `n` calls of one task; `parent_flow` starts child flows. Every attempt appends `run task key start_ns end_ns agent` to the file
//! `$PINAZU_RECORD` (when set), written by the agent that ran it, so a test can check
//! how many ran at once and how fast they started.
//!
//! ```text
//! cargo run --example limits_flow -- --flow=capped_fanout --n=200 --work-ms=20
//! cargo run --example limits_flow -- --flow=named_fanout --n=50 --limit api=3
//! ```

use pinazu_flows::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// Sleeps `ms`, then appends the attempt's start and end to `$PINAZU_RECORD`.
async fn work(task: &str, key: &str, ms: u64) -> anyhow::Result<()> {
    let start = now_ns();
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let end = now_ns();
    if let Ok(path) = std::env::var("PINAZU_RECORD") {
        let (run, agent) = match task_context() {
            Some(t) => (t.flow_run_id.to_string(), t.agent_id.to_string()),
            None => ("-".into(), "-".into()),
        };
        let line = format!("{run} {task} {key} {start} {end} {agent}\n");
        // one write of a short line to a file opened for appending: lines from many
        // processes do not interleave
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        f.write_all(line.as_bytes())?;
    }
    Ok(())
}

/// At most 10 running at once, over every agent and run.
#[task(concurrency = 10)]
async fn capped(i: u64, work_ms: u64) -> anyhow::Result<u64> {
    work("capped", "-", work_ms).await?;
    Ok(i)
}

/// A request of one tenant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Request {
    /// Whose.
    pub tenant: String,
    /// Which.
    pub i: u64,
}

/// At most 2 running at once per tenant.
#[task(concurrency = 2, concurrency_key = "req.tenant")]
async fn per_tenant(req: Request, work_ms: u64) -> anyhow::Result<u64> {
    work("per_tenant", &req.tenant, work_ms).await?;
    Ok(req.i)
}

/// Shares the named limit `api` (sized by the operator).
#[task(limit = "api")]
async fn calls_api(i: u64, work_ms: u64) -> anyhow::Result<u64> {
    work("calls_api", "-", work_ms).await?;
    Ok(i)
}

/// At most 100 starts per second.
#[task(rate = "100/s")]
async fn paced(i: u64) -> anyhow::Result<u64> {
    work("paced", "-", 0).await?;
    Ok(i)
}

/// At most 1 at once, and shares the named limit `pair` with `paired`.
#[task(concurrency = 1, limit = "pair")]
async fn guarded(i: u64, work_ms: u64) -> anyhow::Result<u64> {
    work("guarded", "-", work_ms).await?;
    Ok(i)
}

/// Shares the named limit `pair` with `guarded`.
#[task(limit = "pair")]
async fn paired(i: u64, work_ms: u64) -> anyhow::Result<u64> {
    work("paired", "-", work_ms).await?;
    Ok(i)
}

/// `n` calls alternating `guarded` and `paired`: two gates on one task, one shared.
#[flow]
async fn mixed_fanout(n: u64, #[default(2)] work_ms: u64) -> anyhow::Result<u64> {
    sum(pinazu_flows::map(0..n, 100_000, |i| async move {
        if i % 2 == 0 {
            guarded(i, work_ms).await
        } else {
            paired(i, work_ms).await
        }
    })
    .await)
}

/// No limit (priorities and fairness).
#[task]
async fn plain(i: u64, work_ms: u64) -> anyhow::Result<u64> {
    work("plain", &i.to_string(), work_ms).await?;
    Ok(i)
}

/// Sums what the calls return; fails if any call failed.
fn sum(results: Vec<Result<u64, TaskError>>) -> anyhow::Result<u64> {
    let mut total = 0;
    for r in results {
        total += r?;
    }
    Ok(total)
}

/// `n` calls of `capped`.
#[flow]
async fn capped_fanout(n: u64, #[default(5)] work_ms: u64) -> anyhow::Result<u64> {
    sum(pinazu_flows::map(0..n, 100_000, |i| capped(i, work_ms)).await)
}

/// `n` calls of `per_tenant`, spread over `tenants` tenants.
#[flow]
async fn keyed_fanout(
    n: u64,
    #[default(5)] tenants: u64,
    #[default(5)] work_ms: u64,
) -> anyhow::Result<u64> {
    let calls = (0..n).map(|i| Request {
        tenant: format!("tenant-{}", i % tenants.max(1)),
        i,
    });
    sum(pinazu_flows::map(calls, 100_000, |r| per_tenant(r, work_ms)).await)
}

/// `n` calls of `calls_api`.
#[flow]
async fn named_fanout(n: u64, #[default(5)] work_ms: u64) -> anyhow::Result<u64> {
    sum(pinazu_flows::map(0..n, 100_000, |i| calls_api(i, work_ms)).await)
}

/// `n` calls of `paced`.
#[flow]
async fn paced_fanout(n: u64) -> anyhow::Result<u64> {
    sum(pinazu_flows::map(0..n, 100_000, paced).await)
}

/// `n` calls of `plain`.
#[flow]
async fn plain_fanout(n: u64, #[default(5)] work_ms: u64) -> anyhow::Result<u64> {
    sum(pinazu_flows::map(0..n, 100_000, |i| plain(i, work_ms)).await)
}

/// `n` calls of `plain` made first, then `urgent` more at priority 10
/// (`with_priority`): when slots are scarce the urgent ones go first.
#[flow]
async fn urgent_calls(
    n: u64,
    #[default(5)] urgent: u64,
    #[default(5)] work_ms: u64,
) -> anyhow::Result<u64> {
    let normal = pinazu_flows::map(0..n, 100_000, |i| plain(i, work_ms));
    let urgent = with_priority(
        10,
        pinazu_flows::map(n..n + urgent, 100_000, |i| plain(i, work_ms)),
    );
    let (a, b) = futures_util::future::join(normal, urgent).await;
    sum(a.into_iter().chain(b).collect())
}

/// A child flow that fails while the file `$PINAZU_FAIL_MARK` exists (after `n` calls).
#[flow]
async fn flaky_child(n: u64) -> anyhow::Result<u64> {
    let total = sum(pinazu_flows::map(0..n, 100_000, |i| plain(i, 1)).await)?;
    if let Ok(mark) = std::env::var("PINAZU_FAIL_MARK") {
        anyhow::ensure!(
            !std::path::Path::new(&mark).exists(),
            "the fail mark is there"
        );
    }
    Ok(total)
}

/// Fails when its child fails (the `?`): run again under its id, it runs that child
/// again.
#[flow]
async fn strict_parent(#[default(3)] n: u64) -> anyhow::Result<u64> {
    Ok(flaky_child(n).await?)
}

/// A child flow: `n` calls of `plain`; fails at once when `fail`.
#[flow]
async fn child_flow(
    n: u64,
    #[default(5)] work_ms: u64,
    #[default(false)] fail: bool,
) -> anyhow::Result<u64> {
    anyhow::ensure!(!fail, "this child was asked to fail");
    sum(pinazu_flows::map(0..n, 100_000, |i| plain(i, work_ms)).await)
}

/// Starts `children` child flows, child `c` with `n * (c + 1)` calls (so they end one
/// after the other); child `fail_child` fails. Returns each child's sum or error.
#[flow]
async fn parent_flow(
    #[default(3)] children: u64,
    #[default(10)] n: u64,
    #[default(5)] work_ms: u64,
    #[default(u64::MAX)] fail_child: u64,
) -> anyhow::Result<serde_json::Value> {
    let runs = (0..children).map(|c| child_flow(n * (c + 1), work_ms, c == fail_child));
    let results = futures_util::future::join_all(runs).await;
    Ok(serde_json::Value::Array(
        results
            .into_iter()
            .map(|r| match r {
                Ok(v) => serde_json::json!(v),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            })
            .collect(),
    ))
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
