//! The cache record (`CacheResult`) and cache keys, compatible with the original library.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::FlowRunId;
use crate::options::CachePolicy;

/// A cached task result, stored as JSON exactly as the original library stored it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CacheResult {
    /// The run that produced the result.
    pub flow_run_id: FlowRunId,
    /// The task.
    pub task_name: String,
    /// The result, as JSON.
    pub result: Value,
    /// The MD5 hex key of the call (see [`original_md5`]).
    pub cache_key: String,
    /// When it was stored: RFC 3339 UTC with microseconds.
    pub timestamp: String,
}

impl CacheResult {
    /// How old the entry is, if its timestamp parses.
    pub fn age(&self, now: std::time::SystemTime) -> Option<std::time::Duration> {
        let at = humantime::parse_rfc3339_weak(self.timestamp.trim_end_matches('Z')).ok()?;
        Some(now.duration_since(at).unwrap_or_default())
    }
}

/// The original library's key: MD5 hex of the compact, sorted-keys JSON
/// `{"args":[...],"kwargs":{},"task_name":"..."}` (serde_json's map is ordered by key, so
/// nested objects are sorted too, like the original's `sort_keys`).
pub fn original_md5(task_name: &str, args: &Value) -> String {
    let hex = original_md5_hex(task_name, args);
    // hex digits are ASCII
    String::from_utf8_lossy(&hex).into_owned()
}

/// [`original_md5`] as 32 ASCII hex digits, without going through `fmt` (this runs for
/// every task SUCCESS event, and formatting a digest byte by byte showed in profiles).
pub fn original_md5_hex(task_name: &str, args: &Value) -> [u8; 32] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = original_md5_digest(task_name, args);
    let mut out = [0u8; 32];
    for (i, b) in digest.0.iter().enumerate() {
        out[2 * i] = HEX[(b >> 4) as usize];
        out[2 * i + 1] = HEX[(b & 0x0f) as usize];
    }
    out
}

fn original_md5_digest(task_name: &str, args: &Value) -> md5::Digest {
    // the document's keys are in sorted order already: written straight into the hash,
    // without building it
    let mut ctx = md5::Context::new();
    ctx.consume(b"{\"args\":");
    if args.is_null() {
        // a task without parameters: its argument tuple `()` is JSON null, the
        // original's empty `args` list is `[]`
        ctx.consume(b"[]");
    } else {
        let _ = serde_json::to_writer(&mut ctx, args);
    }
    ctx.consume(b",\"kwargs\":{},\"task_name\":");
    let _ = serde_json::to_writer(&mut ctx, task_name);
    ctx.consume(b"}");
    ctx.compute()
}

/// The MD5 of a `result_cache_key` as Pinazu Core may hand it back: the bare MD5 hex, or
/// an object key ending in `/<md5>.json` (as earlier versions published for cached
/// calls). Lower case.
pub fn md5_of_key(key: &str) -> Option<String> {
    let key = key.trim();
    let last = key.rsplit('/').next().unwrap_or(key);
    let md5 = last.strip_suffix(".json").unwrap_or(last);
    (md5.len() == 32 && md5.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| md5.to_ascii_lowercase())
}

/// The object key of a cached call, or `None` for [`CachePolicy::None`].
///
/// - `run`: `result_cache/flow-<flow_run_id>/tasks/<task_name>/<md5>.json` (the original);
/// - `inputs`: `result_cache/inputs/<task_name>/v<version>/<md5>.json`.
pub fn object_key(
    policy: CachePolicy,
    flow_run_id: FlowRunId,
    task_name: &str,
    version: &str,
    md5_hex: &str,
) -> Option<String> {
    match policy {
        CachePolicy::None => None,
        CachePolicy::Run => Some(format!(
            "{}/tasks/{task_name}/{md5_hex}.json",
            run_prefix(flow_run_id)
        )),
        CachePolicy::Inputs => Some(format!(
            "{INPUTS_PREFIX}/{task_name}/v{}/{md5_hex}.json",
            if version.is_empty() { "0" } else { version }
        )),
    }
}

/// Prefix of every `inputs`-policy object.
pub const INPUTS_PREFIX: &str = "result_cache/inputs";

/// Prefix of a run's `run`-policy objects.
pub fn run_prefix(flow_run_id: FlowRunId) -> String {
    format!("result_cache/flow-{flow_run_id}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn md5_matches_the_original_compact_sorted_json() {
        // md5 of {"args":[3],"kwargs":{},"task_name":"square"}
        let text = r#"{"args":[3],"kwargs":{},"task_name":"square"}"#;
        let expected = format!("{:x}", md5::compute(text.as_bytes()));
        assert_eq!(original_md5("square", &json!([3])), expected);
        // nested keys are sorted too
        // no parameters: `"args":[]`
        let text = r#"{"args":[],"kwargs":{},"task_name":"probe"}"#;
        assert_eq!(
            original_md5("probe", &serde_json::Value::Null),
            format!("{:x}", md5::compute(text.as_bytes()))
        );
        let a = original_md5("t", &json!([{"b": 1, "a": 2}]));
        let text = r#"{"args":[{"a":2,"b":1}],"kwargs":{},"task_name":"t"}"#;
        assert_eq!(a, format!("{:x}", md5::compute(text.as_bytes())));
    }

    #[test]
    fn keys_are_read_bare_or_as_object_paths() {
        let m = "0123456789abcdef0123456789ABCDEF";
        let lower = m.to_ascii_lowercase();
        assert_eq!(md5_of_key(m).as_deref(), Some(lower.as_str()));
        let path = format!("result_cache/flow-x/tasks/square/{m}.json");
        assert_eq!(md5_of_key(&path).as_deref(), Some(lower.as_str()));
        assert_eq!(md5_of_key("square"), None);
        assert_eq!(md5_of_key("result_cache/a/b.json"), None);
    }

    #[test]
    fn run_layout_is_the_original() {
        let run = FlowRunId(uuid::Uuid::nil());
        assert_eq!(
            object_key(CachePolicy::Run, run, "square", "", "abc").unwrap(),
            "result_cache/flow-00000000-0000-0000-0000-000000000000/tasks/square/abc.json"
        );
        assert_eq!(
            object_key(CachePolicy::None, run, "square", "", "abc"),
            None
        );
    }

    #[test]
    fn age_parses_our_timestamps() {
        let now = std::time::SystemTime::now();
        let rec = CacheResult {
            flow_run_id: FlowRunId::new(),
            task_name: "t".into(),
            result: json!(1),
            cache_key: "k".into(),
            timestamp: crate::events::timestamp(now - std::time::Duration::from_secs(30)),
        };
        let age = rec.age(now).unwrap().as_secs();
        assert!((29..=31).contains(&age), "{age}");
    }
}
