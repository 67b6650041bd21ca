//! Many short runs through a coordinator, and what they cost its memory: starts `COUNT`
//! runs of the bench app's `w1_fanout` (one task each) through the API, at most
//! `CONCURRENCY` at once, waits for every one to end, and prints the coordinator's
//! resident memory (VmRSS of `COORDINATOR_PID`) every 1,000 runs.
//!
//! Used by `scripts/runs_soak.sh` (which starts NATS, a coordinator and an agent):
//! `runs_soak NATS_URL COORDINATOR_PID [COUNT] [CONCURRENCY]`.

use futures_util::StreamExt;
use pinazu_shared::api::{ApiReply, ApiRequest};
use pinazu_shared::codec::{decode_envelope, encode_envelope};
use pinazu_shared::ids::FlowRunId;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

async fn one_run(client: &async_nats::Client) -> Result<(), String> {
    let id = FlowRunId::new();
    let mut done = client
        .subscribe(format!("pinazu.run.{id}.done"))
        .await
        .map_err(|e| e.to_string())?;
    let mut params = serde_json::Map::new();
    params.insert("n".into(), 1.into());
    let req = ApiRequest::Start {
        flow: "w1_fanout".into(),
        params,
        flow_run_id: Some(id),
        idempotency_key: None,
        success_task_results: None,
        events: None,
        priority: 0,
    };
    let body = encode_envelope(&req).map_err(|e| e.to_string())?;
    let reply = tokio::time::timeout(
        Duration::from_secs(30),
        client.request("pinazu.api.start", body.into()),
    )
    .await
    .map_err(|_| "no answer to start".to_string())?
    .map_err(|e| e.to_string())?;
    match decode_envelope::<ApiReply>(&reply.payload).map_err(|e| e.to_string())? {
        ApiReply::Started { run, .. } if run.status.is_final() => return Ok(()),
        ApiReply::Started { .. } => {}
        other => return Err(format!("start: {other:?}")),
    }
    tokio::time::timeout(Duration::from_secs(60), done.next())
        .await
        .map_err(|_| format!("run {id} did not end within 60 s"))?;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: runs_soak NATS_URL COORDINATOR_PID [COUNT] [CONCURRENCY]";
    let url = args.get(1).ok_or(usage)?;
    let pid: u32 = args.get(2).and_then(|p| p.parse().ok()).ok_or(usage)?;
    let count: usize = args.get(3).and_then(|c| c.parse().ok()).unwrap_or(20_000);
    let concurrency: usize = args.get(4).and_then(|c| c.parse().ok()).unwrap_or(32);
    let client = async_nats::connect(url.as_str())
        .await
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let before = rss_kib(pid);
    println!("{{\"runs\":0,\"rss_kib\":{before}}}");
    let mut ended = 0usize;
    let mut in_flight = futures_util::stream::FuturesUnordered::new();
    let mut submitted = 0usize;
    while ended < count {
        while submitted < count && in_flight.len() < concurrency {
            in_flight.push(one_run(&client));
            submitted += 1;
        }
        match in_flight.next().await {
            Some(Ok(())) => ended += 1,
            Some(Err(e)) => return Err(e),
            None => break,
        }
        if ended.is_multiple_of(1000) {
            println!(
                "{{\"runs\":{ended},\"rss_kib\":{},\"seconds\":{:.1}}}",
                rss_kib(pid),
                started.elapsed().as_secs_f64()
            );
        }
    }
    Ok(())
}
