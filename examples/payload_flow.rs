//! Large payloads: tasks return (and take) byte buffers far above the NATS message limit;
//! in distributed mode they travel through the object store by reference, invisibly to
//! this code.
//!
//! ```text
//! cargo run --release --example payload_flow -- --count=50 --bytes=1048576
//! ```

use pinazu_flows::prelude::*;
use serde_bytes::ByteBuf;

/// `bytes` bytes whose values depend on `seed`, so the flow can check them.
#[task]
async fn blob(seed: u64, bytes: u64) -> anyhow::Result<ByteBuf> {
    Ok(ByteBuf::from(pattern(seed, bytes)))
}

/// Sum of the bytes of `data` (a large argument).
#[task]
async fn checksum(data: ByteBuf) -> anyhow::Result<u64> {
    Ok(data.iter().map(|b| *b as u64).sum())
}

fn pattern(seed: u64, bytes: u64) -> Vec<u8> {
    (0..bytes).map(|j| ((seed + j) % 251) as u8).collect()
}

/// Gathers `count` buffers of `bytes` bytes, checks each, and sends one back as an argument.
#[flow]
async fn payloads(
    #[default(50)] count: u64,
    #[default(1_048_576)] bytes: u64,
    #[default(0)] pause_ms: u64,
) -> anyhow::Result<serde_json::Value> {
    let results = pinazu_flows::map(0..count, 64, |i| blob(i, bytes)).await;
    // a pause between the stages (the fault tests kill the coordinator in it)
    tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
    let mut total = 0u64;
    let mut first = None;
    for (i, r) in results.into_iter().enumerate() {
        let buf = r?;
        anyhow::ensure!(
            buf.as_slice() == pattern(i as u64, bytes).as_slice(),
            "buffer {i} came back altered"
        );
        total += buf.len() as u64;
        first.get_or_insert(buf);
    }
    let sum = match first {
        Some(buf) => checksum(buf).await?,
        None => 0,
    };
    Ok(serde_json::json!({ "count": count, "total_bytes": total, "checksum_of_first": sum }))
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
