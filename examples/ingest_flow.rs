//! A document-ingestion pipeline, the shape of a real application: struct arguments, a
//! task with its own error type that the flow handles typed, a task that needs a GPU
//! agent (labels), a task cached across runs, a task that reads where it runs, and two
//! flows in one program (so `--flow` chooses).
//!
//! ```text
//! cargo run --release --example ingest_flow -- --flow ingest --collection=42 --docs=20
//! cargo run --release --example ingest_flow -- --flow backfill --collections='["a","b"]'
//! ```
//!
//! Every fifth document is empty and fails to parse with a typed `ParseError`, which the
//! flow gets back with `err.downcast::<ParseError>()` and counts as skipped.

use pinazu_flows::prelude::*;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A fetched document.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Document {
    /// `<collection>/<n>`.
    pub id: String,
    /// Its text (empty for every fifth document).
    pub text: String,
}

/// Why a document could not be parsed: the task's own error type, serialisable, so the
/// flow gets it back typed.
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("cannot parse document {doc}: {reason}")]
pub struct ParseError {
    /// The document.
    pub doc: String,
    /// Why.
    pub reason: String,
}

/// What a run of `ingest` reports.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// The collection.
    pub collection: String,
    /// Documents embedded.
    pub embedded: u32,
    /// Documents skipped, by id (they did not parse).
    pub skipped: Vec<String>,
    /// Words embedded in all.
    pub words: u64,
    /// The cached summary.
    pub summary: String,
    /// Where the last step ran: run id, task, attempt, agent.
    pub ran_on: serde_json::Value,
}

/// Fetches document `n` of a collection (`slow_ms` simulates the network).
#[task(retries = 2, retry_delay = "50ms")]
async fn fetch(collection: String, n: u32, slow_ms: u64) -> anyhow::Result<Document> {
    if slow_ms > 0 {
        tokio::time::sleep(Duration::from_millis(slow_ms)).await;
    }
    let text = if n % 5 == 4 {
        String::new()
    } else {
        format!("document {n} of {collection} has a few words")
    };
    Ok(Document {
        id: format!("{collection}/{n}"),
        text,
    })
}

/// Splits a document into words; an empty one is a `ParseError`.
#[task]
async fn parse(doc: Document) -> Result<Vec<String>, ParseError> {
    if doc.text.is_empty() {
        return Err(ParseError {
            doc: doc.id,
            reason: "the document is empty".into(),
        });
    }
    Ok(doc.text.split_whitespace().map(str::to_string).collect())
}

/// "Embeds" the words: needs an agent labelled `gpu=true` (embedded runs have every
/// label unless `--labels` restricts them).
#[task(labels = "gpu=true")]
async fn embed(words: Vec<String>) -> anyhow::Result<u64> {
    Ok(words.len() as u64)
}

/// Summarises a collection; cached across runs by its inputs. `fail` makes it fail
/// (to try what a failed run does when started again).
#[task(cache = "inputs", version = "1")]
async fn summarize(
    collection: String,
    embedded: u32,
    words: u64,
    fail: bool,
) -> anyhow::Result<String> {
    if fail {
        anyhow::bail!("the summary service is down");
    }
    Ok(format!(
        "collection {collection}: {embedded} documents, {words} words"
    ))
}

/// Where this task runs, as `pinazu_flows::task_context()` says.
#[task]
async fn where_am_i() -> anyhow::Result<serde_json::Value> {
    let ctx = pinazu_flows::task_context()
        .ok_or_else(|| anyhow::anyhow!("no task context inside a task"))?;
    Ok(serde_json::json!({
        "flow_run_id": ctx.flow_run_id.to_string(),
        "current_flow_run_id": pinazu_flows::current_flow_run_id().map(|id| id.to_string()),
        "task": ctx.task.to_string(),
        "call_id": ctx.call_id.to_string(),
        "attempt": ctx.attempt,
        "agent_id": ctx.agent_id.to_string(),
    }))
}

/// Ingests `docs` documents of a collection: fetch, parse (skipping those that do not
/// parse), embed on a GPU agent, summarise (`fail`: the summary fails).
#[flow]
async fn ingest(
    collection: String,
    #[default(10)] docs: u32,
    #[default(0)] slow_ms: u64,
    #[default(false)] fail: bool,
) -> anyhow::Result<Report> {
    let pipeline = (0..docs).map(|n| {
        let collection = collection.clone();
        async move {
            let doc = fetch(collection, n, slow_ms).await?;
            match parse(doc).await {
                Ok(words) => Ok::<_, TaskError>(Ok(embed(words).await?)),
                // the task's own error, typed
                Err(e) => match e.downcast::<ParseError>() {
                    Some(p) => Ok(Err(p.doc)),
                    None => Err(e),
                },
            }
        }
    });
    let mut report = Report {
        collection: collection.clone(),
        embedded: 0,
        skipped: Vec::new(),
        words: 0,
        summary: String::new(),
        ran_on: serde_json::Value::Null,
    };
    for outcome in futures_util::future::join_all(pipeline).await {
        match outcome? {
            Ok(words) => {
                report.embedded += 1;
                report.words += words;
            }
            Err(doc) => report.skipped.push(doc),
        }
    }
    report.summary = summarize(collection, report.embedded, report.words, fail).await?;
    report.ran_on = where_am_i().await?;
    Ok(report)
}

/// Re-ingests several collections, one after the other; returns the words of each.
#[flow]
async fn backfill(collections: Vec<String>, #[default(5)] docs: u32) -> anyhow::Result<Vec<u64>> {
    let mut words = Vec::new();
    for collection in collections {
        let mut total = 0;
        for n in 0..docs {
            let doc = fetch(collection.clone(), n, 0).await?;
            if let Ok(w) = parse(doc).await {
                total += embed(w).await?;
            }
        }
        words.push(total);
    }
    Ok(words)
}

fn main() -> std::process::ExitCode {
    pinazu_flows::main()
}
