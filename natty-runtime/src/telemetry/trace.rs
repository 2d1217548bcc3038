//! W3C trace context (`traceparent`, `tracestate`) in NATS message headers: injected from the
//! current span when publishing, extracted to parent a delivery's span when consuming, so one
//! trace follows an event across services.
//!
//! The context lives in the `tracing` span through `tracing-opentelemetry`: with its layer
//! installed (as [`crate::run`] does), every natty span has an OpenTelemetry span context;
//! without it, injection writes nothing and extraction is a no-op.

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header names, to check cheaply whether a message carries a context.
const TRACEPARENT: &str = "traceparent";

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
fn find<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    if let Some(value) = headers.get(name) {
        return Some(value.as_str());
    }
    headers
        .iter()
        .find(|(key, _)| AsRef::<str>::as_ref(key).eq_ignore_ascii_case(name))
        .and_then(|(_, values)| values.first())
        .map(|value| value.as_str())
}

/// Writes the context of `span` into `headers`, when it has a valid one; true if it did.
pub(crate) fn inject(span: &tracing::Span, headers: &mut HeaderMap) -> bool {
    let context = span.context();
    if !context.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(&context, &mut Inject(headers));
    true
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
