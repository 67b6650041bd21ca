//! Orchestration: a parent flow that starts one child flow per tenant, a task limited to
//! 2 running at once per tenant (over every agent and run), and a flow meant to run on a
//! schedule.
//!
//! ```text
//! cargo run --example orchestration -- --tenants=3 --orders=10
//! cargo run --example orchestration -- --tenants=3 --fail=tenant-1   # a child fails
//! # distributed, every night at 02:00 Paris time (see the README's "Schedules"):
//! app schedule add nightly --flow nightly_billing --cron "0 2 * * *" \
//!     --timezone Europe/Paris --input '{"tenants": 20}'
//! ```

use pinazu_flows::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::time::Duration;

/// One order of one tenant.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Order {
    /// Whose.
    pub tenant: String,
    /// How much.
    pub amount: u64,
}

/// Charges an order: at most 2 at once per tenant, however many runs and agents.
#[task(concurrency = 2, concurrency_key = "order.tenant", retries = 2)]
async fn charge(order: Order) -> anyhow::Result<u64> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    Ok(order.amount)
}

/// Charges one tenant's orders: a child run of `nightly_billing`, with its own run id,
/// events and journal (`status` shows its `parent_run_id`).
#[flow]
async fn bill_tenant(
    tenant: String,
    orders: u64,
    #[default(String::new())] fail: String,
) -> anyhow::Result<u64> {
    anyhow::ensure!(
        tenant != fail,
        "tenant {tenant}'s billing account is closed"
    );
    let calls = (1..=orders).map(|amount| {
        charge(Order {
            tenant: tenant.clone(),
            amount,
        })
    });
    let mut total = 0;
    for r in futures_util::future::join_all(calls).await {
        total += r?;
    }
    Ok(total)
}

/// Bills every tenant, one child flow each; a tenant that fails is reported in the
/// result, and the others are billed all the same.
#[flow]
async fn nightly_billing(
    #[default(3)] tenants: u64,
    #[default(10)] orders: u64,
    #[default(String::new())] fail: String,
) -> anyhow::Result<Value> {
    let names: Vec<String> = (0..tenants).map(|t| format!("tenant-{t}")).collect();
    let children = names
        .iter()
        .map(|t| bill_tenant(t.clone(), orders, fail.clone()));
    let results = futures_util::future::join_all(children).await;
    let mut billed = serde_json::Map::new();
    let mut failed = serde_json::Map::new();
    for (tenant, r) in names.into_iter().zip(results) {
        match r {
            Ok(total) => {
                billed.insert(tenant, json!(total));
            }
            Err(e) => {
                failed.insert(tenant, json!(e.to_string()));
            }
        }
    }
    Ok(json!({ "billed": billed, "failed": failed }))
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
