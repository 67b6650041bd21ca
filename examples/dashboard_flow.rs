//! A run to look at in the dashboard: `dashboard_flow(n, work_ms = 5, fail_every = 0)`
//! calls `step(i)` for i in 0..n; with `fail_every = k`, every k-th call logs a few
//! lines and fails for good (no retries). The flow counts the failures instead of
//! failing, so the run goes on to its end (or until it is cancelled).
//!
//! ```text
//! cargo run --release --example dashboard_flow -- --http 127.0.0.1:8233 --n=20000 --fail-every=1000
//! ```

use pinazu_flows::prelude::*;
use std::time::Duration;

/// Sleeps `work_ms`, then returns `i * 2`, or fails when `fail` is set.
#[task(retries = 0)]
async fn step(i: u64, work_ms: u64, fail: bool) -> anyhow::Result<u64> {
    tracing::info!(i, "step starting");
    if work_ms > 0 {
        tokio::time::sleep(Duration::from_millis(work_ms)).await;
    }
    if fail {
        tracing::warn!(i, "the upstream answered 503; giving up");
        println!("step {i}: giving up after the upstream answered 503");
        return Err(anyhow::anyhow!("upstream answered 503 Service Unavailable")
            .context(format!("step {i} could not fetch its input")));
    }
    Ok(i * 2)
}

/// Runs the steps; returns how many succeeded and how many failed.
#[flow]
async fn dashboard_flow(
    n: u64,
    #[default(5)] work_ms: u64,
    #[default(0)] fail_every: u64,
) -> anyhow::Result<serde_json::Value> {
    let fail = |i: u64| fail_every > 0 && i % fail_every == fail_every - 1;
    tracing::info!(n, "dashboard_flow: starting the steps");
    let results = pinazu_flows::map(0..n, 10_000, |i| step(i, work_ms, fail(i))).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    tracing::info!(failed, "dashboard_flow: every step ended");
    Ok(serde_json::json!({ "succeeded": results.len() - failed, "failed": failed }))
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
