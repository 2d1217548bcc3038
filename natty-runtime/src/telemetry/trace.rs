//! W3C trace context (`traceparent`, `tracestate`) in NATS message headers: injected when
//! publishing, taken up by the consumer's delivery, so one trace follows an event across
//! services.
//!
//! Two ways, one on-the-wire result. With an OpenTelemetry layer in the subscriber (an exporter
//! configured, or a program's own subscriber with `tracing-opentelemetry`), the context lives
//! in the `tracing` spans. Otherwise (natty's default subscriber, no exporter) it lives in the
//! delivery's [`DeliveryScope`] and no SDK does any work per message; a publish with no context
//! from either starts a new trace.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::context::{self, DeliveryScope, TraceContext, TRACEPARENT};

struct Inject<'a>(&'a mut HeaderMap);

impl Injector for Inject<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct Extract<'a>(&'a HeaderMap);

impl Extractor for Extract<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        find(self.0, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}

/// The value of header `name`. NATS header names are case-sensitive, but HTTP's are not, and a
/// bridge or another client may have written `Traceparent`: the exact name is tried first, then
/// any spelling.
pub(crate) fn find<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(value) = headers.get(name) {
        return Some(value.as_str());
    }
    headers
        .iter()
        .find(|(key, _)| AsRef::<str>::as_ref(key).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str())
}

/// Writes a trace context into `headers`: the OpenTelemetry context of `span` when it has a
/// valid one; else a child of the delivery this task runs (a new span id in its trace); else a
/// new trace. Returns true when the context came from `span`.
pub(crate) fn inject(span: &tracing::Span, headers: &mut HeaderMap) -> bool {
    // With natty's light subscriber no span has an OpenTelemetry context: do not ask.
    if !context::light() {
        let context = span.context();
        if context.span().span_context().is_valid() {
            TraceContextPropagator::new().inject_context(&context, &mut Inject(headers));
            return true;
        }
    }
    DeliveryScope::with_current(|delivery| delivery.trace.child())
        .unwrap_or_else(TraceContext::root)
        .inject(headers);
    false
}

/// The trace a delivery of a message with `headers` continues: the one they carry, or a new one.
pub(crate) fn incoming(headers: Option<&HeaderMap>) -> TraceContext {
    headers
        .and_then(TraceContext::extract)
        .unwrap_or_else(TraceContext::root)
}

/// Makes the context carried by `headers` (if any) the parent of `span`.
pub(crate) fn adopt(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else {
        return;
    };
    if find(headers, TRACEPARENT).is_none() {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Extract(headers));
    if parent.span().span_context().is_valid() {
        // Fails only when the span is disabled or already started elsewhere: nothing to parent.
        let _ = span.set_parent(parent);
    }
}
