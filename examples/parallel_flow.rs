//! Fan-out: `parallel_flow(n, work_ms = 0)` returns the sum of `square(i)` for i in 0..n,
//! one task call per i.
//!
//! ```text
//! cargo run --release --example parallel_flow -- --n=20000
//! cargo run --release --example parallel_flow -- --n=400 --work-ms=50 --agents=2 --slots=1
//! ```

use pinazu_flows::prelude::*;
use std::time::Duration;

/// Squares `i`, after sleeping `work_ms` milliseconds (to simulate work).
#[task]
async fn square(i: u64, work_ms: u64) -> anyhow::Result<u64> {
    if work_ms > 0 {
        tokio::time::sleep(Duration::from_millis(work_ms)).await;
    }
    i.checked_mul(i)
        .ok_or_else(|| anyhow::anyhow!("{i} squared does not fit in 64 bits"))
}

/// The sum of the squares of 0..n, each computed by its own task call (exact: a JSON
/// number up to 2^64, the decimal digits as a string above).
#[flow]
async fn parallel_flow(n: u64, #[default(0)] work_ms: u64) -> anyhow::Result<serde_json::Value> {
    // `map` keeps at most 10,000 calls in flight, so n can be in the millions.
    let squares = pinazu_flows::map(0..n, 10_000, |i| square(i, work_ms)).await;
    // in 128 bits: from n of about 3.8 million on, the sum no longer fits in 64
    let mut sum = 0u128;
    for s in squares {
        sum += u128::from(s?);
    }
    Ok(match u64::try_from(sum) {
        Ok(small) => serde_json::json!(small),
        Err(_) => serde_json::json!(sum.to_string()),
    })
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
