//! Logging like the original library: coloured console lines (time, target, level,
//! message) on a terminal, or JSON lines with `LOG_FORMAT=json`. The level comes from
//! `LOG_LEVEL` (e.g. `debug`), or a full filter from `RUST_LOG`.

use std::io::IsTerminal;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines, coloured on a terminal.
    Console,
    /// One JSON object per line.
    Json,
}

/// Stderr with secrets redacted (`pinazu_shared::redact`): the formatter writes each
/// line in one call, so a secret is never split across writes.
struct RedactingStderr;

impl std::io::Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let clean = pinazu_shared::redact::redact(&text);
        std::io::stderr().write_all(clean.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Installs the global subscriber (once; later calls are ignored). Logs go to stderr so
/// stdout stays the program's output.
pub fn init(level: Option<&str>, format: Option<LogFormat>, attempt_lines: bool) {
    init_with_service(level, format, attempt_lines, "pinazu-flows")
}

/// As [`init`]; `service` is the process's role (`pinazu-coordinator`, ...), the
/// `service.name` of its exported traces (feature `otel`).
pub fn init_with_service(
    level: Option<&str>,
    format: Option<LogFormat>,
    attempt_lines: bool,
    service: &'static str,
) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(f) if !f.trim().is_empty() => EnvFilter::new(f),
        _ => {
            let level = level
                .map(str::to_string)
                .or_else(|| std::env::var("LOG_LEVEL").ok())
                .unwrap_or_else(|| "info".into())
                .to_ascii_lowercase();
            let level = match level.as_str() {
                "warning" => "warn".to_string(),
                "critical" | "fatal" => "error".to_string(),
                "error" | "warn" | "info" | "debug" | "trace" | "off" => level,
                // a bare word would be read as a target filter, silencing everything
                other => {
                    eprintln!("LOG_LEVEL={other:?} is not a level (error, warn, info, debug, trace, off); using info");
                    "info".to_string()
                }
            };
            // the NATS client narrates every (re)connect at info; ours says what matters.
            // ractor opens a tracing span per actor, one actor per attempt: at info those
            // spans cost ~15% of embedded fan-out throughput (docs/benchmarks.md)
            // agents log one line per attempt start (`pinazu::attempts`); elsewhere they
            // would drown the output, so they are off unless asked for
            let attempts = if attempt_lines {
                ""
            } else {
                ",pinazu::attempts=warn"
            };
            EnvFilter::try_new(format!("{level},async_nats=warn,ractor=warn{attempts}")).unwrap_or_else(|_| {
                eprintln!("LOG_LEVEL={level:?} is not a level (error, warn, info, debug, trace); using info");
                EnvFilter::new("info")
            })
        }
    };
    let format = format.unwrap_or_else(|| match std::env::var("LOG_FORMAT") {
        Ok(f) if f.eq_ignore_ascii_case("json") => LogFormat::Json,
        _ => LogFormat::Console,
    });
    pinazu_coordinator::status::set_json_logs(format == LogFormat::Json);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(|| RedactingStderr)
        .with_target(true);
    let fmt = match format {
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
        LogFormat::Console => fmt.with_ansi(std::io::stderr().is_terminal()).boxed(),
    };
    let registry = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(AttemptLogLayer.with_filter(attempt_log_filter()));
    // (the exporting layer only when there is one: an absent layer in the stack would
    // answer "always" for every callsite and turn the filters' "never" into checks on
    // every event, ractor's per-actor spans among them)
    #[cfg(feature = "otel")]
    if let Some(traces) = crate::otel::layer(service) {
        let _ = registry.with(traces).try_init();
        return;
    }
    let _ = service;
    let _ = registry.try_init();
}

/// What an attempt's log keeps: info and above from the task's code and the libraries
/// it calls, not this engine's own lines, nor the actor runtime's or the NATS client's
/// (their callsites stay disabled: ractor's per-actor spans at info cost throughput).
fn attempt_log_filter() -> Targets {
    Targets::new()
        .with_default(LevelFilter::INFO)
        .with_target("ractor", LevelFilter::OFF)
        .with_target("async_nats", LevelFilter::OFF)
        .with_target("pinazu", LevelFilter::OFF)
        .with_target("pinazu_flows", LevelFilter::OFF)
        .with_target("pinazu_coordinator", LevelFilter::OFF)
        .with_target("pinazu_agent", LevelFilter::OFF)
        .with_target("pinazu_shared", LevelFilter::OFF)
        // the libraries under the engine (their info callsites stay off when the
        // process logs at warn)
        .with_target("aws_smithy_runtime", LevelFilter::OFF)
        .with_target("aws_smithy_http_client", LevelFilter::OFF)
        .with_target("aws_sdk_s3", LevelFilter::OFF)
        .with_target("aws_config", LevelFilter::OFF)
        .with_target("hyper", LevelFilter::OFF)
        .with_target("hyper_util", LevelFilter::OFF)
        .with_target("h2", LevelFilter::OFF)
        .with_target("tokio", LevelFilter::OFF)
        .with_target("tower", LevelFilter::OFF)
        .with_target("axum", LevelFilter::OFF)
        .with_target("rustls", LevelFilter::OFF)
}

/// Keeps each `tracing` event emitted inside a task attempt in the attempt's log
/// (`pinazu_shared::task_context::ATTEMPT_LOG`), which travels with its report; one
/// emitted by a flow body the coordinator publishes (`FLOW_LOG`) goes to the run's log
/// subject. Elsewhere it does nothing.
struct AttemptLogLayer;

impl<S: tracing::Subscriber> Layer<S> for AttemptLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        pinazu_shared::task_context::capture_log(|| {
            let meta = event.metadata();
            let mut line = format!(
                "{} {:>5} {}:",
                humantime::format_rfc3339_millis(std::time::SystemTime::now()),
                meta.level(),
                meta.target()
            );
            let mut fields = LineFields(&mut line);
            event.record(&mut fields);
            pinazu_shared::redact::redact(&line).into_owned()
        });
    }
}

/// Writes an event's message, then its other fields as `name=value`.
struct LineFields<'a>(&'a mut String);

impl tracing::field::Visit for LineFields<'_> {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write;
        let _ = if field.name() == "message" {
            write!(self.0, " {value:?}")
        } else {
            write!(self.0, " {}={value:?}", field.name())
        };
    }

    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        use std::fmt::Write;
        let _ = if field.name() == "message" {
            write!(self.0, " {value}")
        } else {
            write!(self.0, " {}={value:?}", field.name())
        };
    }
}
