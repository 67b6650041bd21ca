//! Retries: a task that fails transiently succeeds on a later attempt; a task that always
//! fails reaches the flow as an `Err` after its retries, and the flow handles it.
//!
//! ```text
//! cargo run --example retry_flow
//! ```

use pinazu_flows::prelude::*;
use std::sync::atomic::{AtomicU32, Ordering};

static FLAKY_ATTEMPTS: AtomicU32 = AtomicU32::new(0);

/// Fails its first `failures` attempts (in this process), then succeeds.
#[task(retries = 4, retry_delay = "50ms", backoff = 2.0, jitter = 0.2)]
async fn flaky_fetch(failures: u32) -> anyhow::Result<String> {
    let attempt = FLAKY_ATTEMPTS.fetch_add(1, Ordering::SeqCst) + 1;
    if attempt <= failures {
        anyhow::bail!("connection reset (attempt {attempt})");
    }
    Ok(format!("fetched on attempt {attempt}"))
}

/// Always fails.
#[task(retries = 2, retry_delay = "20ms")]
async fn broken_service() -> anyhow::Result<String> {
    Err(anyhow::anyhow!("service unavailable").context("calling the broken service"))
}

/// Shows a transient failure retried to success and a permanent failure handled.
#[flow]
async fn retry_flow(#[default(2)] failures: u32) -> anyhow::Result<serde_json::Value> {
    let fetched = flaky_fetch(failures).await?;
    println!("flaky_fetch: {fetched}");
    let fallback = match broken_service().await {
        Ok(v) => v,
        Err(e) => {
            println!("broken_service failed for good, using a fallback: {e}");
            "fallback".to_string()
        }
    };
    Ok(serde_json::json!({ "fetched": fetched, "service": fallback }))
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
