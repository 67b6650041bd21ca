//! The benchmark workloads of `../shared/workloads.md`, as flows that time themselves.
//! `scripts/bench.sh` runs them embedded and distributed and prints the table; each flow
//! returns its figure in its result.
//!
//! - `w1_fanout(n)`: n no-op tasks at once; tasks per second, submit to last result.
//! - `w2_chain(n)`: n strictly sequential tasks; median round trip in microseconds.
//! - `w3_sleepy(n, ms, total_slots)`: n tasks of `ms` each; efficiency = ideal / makespan.
//! - `w4_payload(n, bytes)`: n tasks returning `bytes` each; MB/s gathered.
//! - `s3_limit(n, concurrency)`: the S3 cache's limit: n bare aws-sdk-s3 PUTs, then n
//!   GETs of those objects, `concurrency` at once (the cache's own bound), against the
//!   bucket `$CACHE_BUCKET` (default `flow-cache-bucket`); PUTs and GETs per second.

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

/// The big run: n no-op calls in one flow, at most 10,000 in flight (`map`), so n can
/// be in the millions.
#[flow]
async fn w1_big(#[default(1_000_000)] n: u64) -> anyhow::Result<Value> {
    let start = Instant::now();
    let results = pinazu_flows::map(0..n, 10_000, noop).await;
    let secs = start.elapsed().as_secs_f64();
    let mut sum = 0u128;
    for r in results {
        sum += u128::from(r?);
    }
    anyhow::ensure!(
        sum == u128::from(n) * u128::from(n.saturating_sub(1)) / 2,
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

/// The floor under W2: `n` NATS request/reply round trips, one after the other, from
/// the coordinator (where flow bodies run) to an agent (its `whois` subject answers
/// with its identity); the median in microseconds.
#[flow]
async fn nats_floor(
    #[default(1000)] n: u64,
    #[default("bench-1".to_string())] agent: String,
) -> anyhow::Result<Value> {
    let url = std::env::var("NATS_URL")?;
    let client = async_nats::connect(url).await?;
    let subject = format!("pinazu.agent.{agent}.whois");
    let mut rtts = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let t = Instant::now();
        client.request(subject.clone(), Default::default()).await?;
        rtts.push(t.elapsed().as_micros() as u64);
    }
    rtts.sort_unstable();
    Ok(json!({ "workload": "W2", "tasks": n, "median_us": rtts[rtts.len() / 2] }))
}

/// The S3 limit loop: what aws-sdk-s3 alone achieves against the same server, with the
/// same concurrency as the cache (`pinazu_flows::stores::S3Store` is a bare
/// `put_object`/`get_object` client).
#[flow]
async fn s3_limit(
    #[default(10_000)] n: u64,
    #[default(64)] concurrency: u64,
) -> anyhow::Result<Value> {
    use futures_util::StreamExt;
    use pinazu_flows::stores::{S3Settings, S3Store};
    use pinazu_flows::ObjectStore;
    let bucket = std::env::var("CACHE_BUCKET").unwrap_or_else(|_| "flow-cache-bucket".into());
    let (store, _) = S3Store::connect(&bucket, "", &S3Settings::from_env()?).await?;
    let store = &store;
    let run = uuid_like();
    let key = |i: u64| format!("bench-limit/{run}/{i}");
    // a cache entry's size: a small MessagePack result
    let body =
        pinazu_flows::__private::Bytes::from_static(&[0x92, 0xcd, 0x01, 0x00, 0xa2, 0x6f, 0x6b]);
    let start = Instant::now();
    let puts: Vec<_> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (k, b) = (key(i), body.clone());
            async move { store.put(&k, b).await }
        })
        .buffer_unordered(concurrency as usize)
        .collect()
        .await;
    let put_s = start.elapsed().as_secs_f64();
    anyhow::ensure!(puts.iter().all(|r| r.is_ok()), "a PUT failed");
    let start = Instant::now();
    let gets: Vec<_> = futures_util::stream::iter(0..n)
        .map(|i| {
            let k = key(i);
            async move { store.get(&k).await }
        })
        .buffer_unordered(concurrency as usize)
        .collect()
        .await;
    let get_s = start.elapsed().as_secs_f64();
    anyhow::ensure!(
        gets.iter().all(|r| matches!(r, Ok(Some(_)))),
        "a GET failed"
    );
    Ok(
        json!({ "workload": "S3", "n": n, "concurrency": concurrency,
        "put_per_s": n as f64 / put_s, "get_per_s": n as f64 / get_s }),
    )
}

fn uuid_like() -> String {
    format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    )
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
