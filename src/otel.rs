//! OpenTelemetry traces (feature `otel`): when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the
//! spans of target `pinazu::trace` (a run, its calls, their attempts, cache reads, the
//! journal's last flush) are exported over OTLP/HTTP (JSON) in batches, with the W3C
//! trace-context propagator that carries a run's trace from `run` through the
//! coordinator (its start request) to the agents (each dispatch).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use std::sync::OnceLock;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::Layer;

static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The exporting layer for this process (`service`: its role, the exported
/// `service.name`), or `None` when `OTEL_EXPORTER_OTLP_ENDPOINT` is unset or the
/// exporter cannot be built (said on stderr: logging is not up yet).
pub fn layer<S>(service: &'static str) -> Option<Box<dyn Layer<S> + Send + Sync>>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").ok()?;
    if endpoint.trim().is_empty() {
        return None;
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(e) => e,
        Err(e) => {
            eprintln!("warning: OTEL_EXPORTER_OTLP_ENDPOINT={endpoint}: no traces exported: {e}");
            return None;
        }
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let tracer = provider.tracer("pinazu-flows");
    let _ = PROVIDER.set(provider);
    // our spans only (trace level: the console's filter leaves their callsites off)
    let only_ours = Targets::new().with_target("pinazu::trace", LevelFilter::TRACE);
    Some(
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(only_ours)
            .boxed(),
    )
}

/// Exports what is still buffered (at the process's end).
pub fn shutdown() {
    if let Some(p) = PROVIDER.get() {
        // (bounded: a collector that does not answer delays the exit this much at most)
        let _ = p.shutdown_with_timeout(std::time::Duration::from_secs(2));
    }
}
