//! The benchmark workloads of `../shared/workloads.md`, as flows that time themselves.
//! `scripts/bench.sh` runs them embedded and distributed and prints the table; each flow
//! returns its figure in its result.
//!
//! - `w1_fanout(n)`: n no-op tasks at once; tasks per second, submit to last result.
//! - `w2_chain(n)`: n strictly sequential tasks; median round trip in microseconds.
//! - `w3_sleepy(n, ms, total_slots)`: n tasks of `ms` each; efficiency = ideal / makespan.
//! - `w4_payload(n, bytes)`: n tasks returning `bytes` each; MB/s gathered.

use pinazu_flows::prelude::*;
use serde_bytes::ByteBuf;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// Returns its input.
#[task]
async fn noop(i: u64) -> anyhow::Result<u64> {
    Ok(i)
}

/// Returns its input; at most 1,000 running at once (W1 with a limit).
#[task(concurrency = 1000)]
async fn noop_limited(i: u64) -> anyhow::Result<u64> {
    Ok(i)
}

/// Sleeps `ms`, precisely: tokio's timer rounds up to its next millisecond tick, so
/// `tokio::time::sleep(50 ms)` takes 51.2 ms on average here, which alone would cap W3 at
/// 0.976 whatever the engine does; a thread sleep on the blocking pool takes ~50.1 ms (as
/// `time.sleep` in the Python engines compared).
#[task]
async fn nap(i: u64, ms: u64) -> anyhow::Result<u64> {
    tokio::task::spawn_blocking(move || std::thread::sleep(Duration::from_millis(ms))).await?;
    Ok(i)
}

/// `bytes` bytes.
#[task]
async fn blob(i: u64, bytes: u64) -> anyhow::Result<ByteBuf> {
    Ok(ByteBuf::from(vec![(i % 251) as u8; bytes as usize]))
}

/// W1: fan-out of n no-op tasks.
#[flow]
async fn w1_fanout(#[default(10_000)] n: u64) -> anyhow::Result<Value> {
    let start = Instant::now();
    let results = futures_util::future::try_join_all((0..n).map(noop)).await?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        results.iter().sum::<u64>() == n * (n.saturating_sub(1)) / 2,
        "wrong sum"
    );
    Ok(json!({ "workload": "W1", "tasks": n, "seconds": secs, "tasks_per_s": n as f64 / secs }))
}

/// W1 with a concurrency limit of 1,000 on the task.
#[flow]
async fn w1_limited(#[default(10_000)] n: u64) -> anyhow::Result<Value> {
    let start = Instant::now();
    let results = futures_util::future::try_join_all((0..n).map(noop_limited)).await?;
    let secs = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        results.iter().sum::<u64>() == n * (n.saturating_sub(1)) / 2,
        "wrong sum"
    );
    Ok(json!({ "workload": "W1", "tasks": n, "seconds": secs, "tasks_per_s": n as f64 / secs }))
}

/// W2: a chain of n sequential tasks.
#[flow]
async fn w2_chain(#[default(300)] n: u64) -> anyhow::Result<Value> {
    let mut prev = 0u64;
    let mut rtts = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        prev = noop(prev + 1).await?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    anyhow::ensure!(prev == n, "wrong chain");
    rtts.sort_unstable();
    let median = rtts[rtts.len() / 2];
    let p99 = rtts[(rtts.len() * 99 / 100).min(rtts.len() - 1)];
    Ok(json!({ "workload": "W2", "tasks": n, "median_us": median, "p99_us": p99 }))
}

/// W3: n sleepy tasks on `slots` slots in all.
#[flow]
async fn w3_sleepy(
    #[default(400)] n: u64,
    #[default(50)] ms: u64,
    #[default(2)] total_slots: u64,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    futures_util::future::try_join_all((0..n).map(|i| nap(i, ms))).await?;
    let actual = start.elapsed().as_secs_f64();
    let ideal = (n * ms) as f64 / 1000.0 / total_slots as f64;
    Ok(
        json!({ "workload": "W3", "tasks": n, "seconds": actual, "ideal_seconds": ideal, "efficiency": ideal / actual }),
    )
}

/// W4: n results of `bytes` each.
#[flow]
async fn w4_payload(
    #[default(50)] n: u64,
    #[default(1_048_576)] bytes: u64,
) -> anyhow::Result<Value> {
    let start = Instant::now();
    let bufs = futures_util::future::try_join_all((0..n).map(|i| blob(i, bytes))).await?;
    let secs = start.elapsed().as_secs_f64();
    let total: usize = bufs.iter().map(|b| b.len()).sum();
    anyhow::ensure!(total as u64 == n * bytes, "short payloads");
    Ok(
        json!({ "workload": "W4", "tasks": n, "seconds": secs, "mb_per_s": total as f64 / 1e6 / secs }),
    )
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
