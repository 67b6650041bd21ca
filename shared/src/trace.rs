//! W3C trace context for OpenTelemetry spans (feature `otel`): a span's `traceparent`,
//! and a span made the child of one, through the propagator the process installed.

use std::collections::HashMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the W3C `traceparent` (nothing when there is none).
pub fn child_of(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(cx);
}

/// The W3C `traceparent` of `span` (none when it is not recorded).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut carrier: HashMap<String, String> = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}
