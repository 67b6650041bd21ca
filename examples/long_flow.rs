//! A long flow: `stages` sequential stages, each a fan-out of `width` task calls taking
//! `work_ms` each, every stage feeding the next. With the journal on, it finishes although
//! agents die, the coordinator is killed and restarted, and NATS restarts underneath
//! (`scripts/long_flow_faults.sh` does all of that to it).
//!
//! ```text
//! cargo run --release --example long_flow -- --stages=5 --width=100 --work-ms=0
//! ```

use pinazu_flows::prelude::*;
use std::time::Duration;

const MODULUS: u64 = 1_000_003;

/// One step of one stage: a deterministic mix of the stage's seed and the index.
#[task(retries = 3, retry_delay = "200ms")]
async fn step(stage: u64, index: u64, seed: u64, work_ms: u64) -> anyhow::Result<u64> {
    if work_ms > 0 {
        tokio::time::sleep(Duration::from_millis(work_ms)).await;
    }
    Ok((seed * 31 + stage * 1_000 + index * 7 + 1) % MODULUS)
}

/// Runs the stages; the result is the last stage's checksum.
#[flow]
async fn long_flow(
    #[default(10)] stages: u64,
    #[default(200)] width: u64,
    #[default(50)] work_ms: u64,
) -> anyhow::Result<u64> {
    let mut seed = 1u64;
    for stage in 0..stages {
        let outputs = pinazu_flows::map(0..width, 10_000, |i| step(stage, i, seed, work_ms)).await;
        let mut sum = 0u64;
        for o in outputs {
            sum = (sum + o?) % MODULUS;
        }
        println!("stage {stage}: checksum {sum}");
        seed = sum;
    }
    Ok(seed)
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
