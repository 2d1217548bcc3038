//! W3C trace context without an OpenTelemetry SDK, and the delivery scope that carries it (with
//! the fields logs show) through a handler.
//!
//! With natty's own subscriber and no exporter (what [`crate::run`] sets up by default), no
//! `tracing` span is made per message: [`crate::consumer`] runs each handler inside a
//! [`DeliveryScope`] (a task-local), publishes take their `traceparent` from it, and the log
//! formatter prints its fields. What always holds: a delivery continues the trace its message
//! carries (or starts one), every publish inside it carries a child of that trace with a new span
//! id, and a publish outside any delivery starts a new trace.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_nats::{HeaderMap, HeaderName, Subject};

/// Set by [`super::logging::init`] when it installed natty's subscriber without an
/// OpenTelemetry layer: nothing would record a per-message span, so none is made.
static LIGHT: AtomicBool = AtomicBool::new(false);

/// Records that natty's light subscriber (no OpenTelemetry layer) is the one installed.
pub(crate) fn set_light() {
    LIGHT.store(true, Ordering::Relaxed);
}

/// Whether per-message spans are skipped: natty's own subscriber is installed and no exporter
/// would receive them. False with an exporter, with a subscriber the program installed, or with
/// none (the spans then cost a disabled callsite check each).
pub(crate) fn light() -> bool {
    LIGHT.load(Ordering::Relaxed)
}

tokio::task_local! {
    /// The delivery whose handler is running on this task.
    static DELIVERY: DeliveryScope;
}

/// One delivery as logs and trace context see it: what the `natty.deliver` span holds, at the
/// cost of a struct. Cheap to build: static names, shared strings, integers.
#[derive(Debug)]
pub(crate) struct DeliveryScope {
    pub(crate) handler: &'static str,
    pub(crate) stream: &'static str,
    pub(crate) consumer: Arc<str>,
    pub(crate) subject: Subject,
    pub(crate) sequence: u64,
    pub(crate) delivery_count: u64,
    pub(crate) trace: TraceContext,
}

impl DeliveryScope {
    /// `future` (a handler and its settling) run inside this scope. Not an `async fn`: that
    /// would move the (large) future once more per delivery, into its own state.
    pub(crate) fn run<F: std::future::Future>(
        self,
        future: F,
    ) -> tokio::task::futures::TaskLocalFuture<DeliveryScope, F> {
        DELIVERY.scope(self, future)
    }

    /// A JetStream delivery (a consumer's), as opposed to a core message (`#[subscribe]`,
    /// `#[service]`), which has no stream, consumer, sequence or delivery count.
    pub(crate) fn is_jetstream(&self) -> bool {
        !self.stream.is_empty()
    }

    /// Calls `f` with the scope of the delivery running on this task, if any.
    pub(crate) fn with_current<R>(f: impl FnOnce(&DeliveryScope) -> R) -> Option<R> {
        DELIVERY.try_with(f).ok()
    }
}

/// A W3C trace context: the `traceparent` fields and the `tracestate` passed through unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TraceContext {
    pub(crate) trace_id: u128,
    /// The parent span: the remote span a delivery continues, or the span a publish is.
    pub(crate) span_id: u64,
    pub(crate) flags: u8,
    pub(crate) state: Option<String>,
}

pub(crate) const TRACEPARENT: &str = "traceparent";
pub(crate) const TRACESTATE: &str = "tracestate";

impl TraceContext {
    /// A new trace, made where no OpenTelemetry SDK decided (one that records gives its own
    /// span's context instead). It is **not** marked sampled, as W3C trace context asks of a
    /// caller that records nothing: the ids still tie logs together across services, and a
    /// downstream service that records with a parent-based sampler (OpenTelemetry's default)
    /// does not record this trace. It also spares the server: nats-server 2.11+ turns every
    /// message whose `traceparent` is sampled into a map of its headers, to look for a trace
    /// destination (about 8% of its CPU per published message here).
    pub(crate) fn root() -> TraceContext {
        TraceContext {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            flags: 0,
            state: None,
        }
    }

    /// The context of a span started under this one: same trace, flags and state, a new span id.
    pub(crate) fn child(&self) -> TraceContext {
        TraceContext {
            span_id: nonzero_u64(),
            ..self.clone()
        }
    }

    /// The context `headers` carry (`traceparent`, and `tracestate` with it), if valid.
    pub(crate) fn extract(headers: &HeaderMap) -> Option<TraceContext> {
        let mut context = parse_traceparent(super::trace::find(headers, TRACEPARENT)?)?;
        context.state = super::trace::find(headers, TRACESTATE)
            .filter(|state| !state.is_empty())
            .map(str::to_string);
        Some(context)
    }

    /// Writes `traceparent` (and `tracestate`, when there is one) into `headers`.
    pub(crate) fn inject(&self, headers: &mut HeaderMap) {
        // Static names: a `&str` name is validated and copied on every insert, once per message.
        headers.insert(const { HeaderName::from_static(TRACEPARENT) }, self.traceparent());
        if let Some(state) = &self.state {
            headers.insert(const { HeaderName::from_static(TRACESTATE) }, state.as_str());
        }
    }

    /// The `traceparent` value: `00-<trace id>-<span id>-<flags>`.
    pub(crate) fn traceparent(&self) -> String {
        // Written digit by digit: made once per publish, where `write!`'s formatting
        // machinery cost more than the rest of the header.
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut value = [b'-'; 55];
        value[..2].copy_from_slice(b"00");
        for (i, digit) in value[3..35].iter_mut().enumerate() {
            *digit = HEX[((self.trace_id >> (124 - 4 * i)) & 0xf) as usize];
        }
        for (i, digit) in value[36..52].iter_mut().enumerate() {
            *digit = HEX[((self.span_id >> (60 - 4 * i)) & 0xf) as usize];
        }
        value[53] = HEX[usize::from(self.flags >> 4)];
        value[54] = HEX[usize::from(self.flags & 0xf)];
        // Hex digits and dashes: always UTF-8, made into a `String` in one copy.
        String::from_utf8(value.to_vec()).unwrap_or_default()
    }
}

/// Parses a `traceparent` as the W3C spec says a receiver must: version 00 exactly as
/// specified; a later version by its first four fields, as long as what follows them is
/// separated by `-`; lowercase hex; ids not all zero; version `ff` invalid.
pub(crate) fn parse_traceparent(value: &str) -> Option<TraceContext> {
    let value = value.trim();
    let bytes = value.as_bytes();
    if bytes.len() < 55 {
        return None;
    }
    let version = hex_field(&bytes[0..2])? as u8;
    match version {
        0xff => return None,
        0x00 if bytes.len() != 55 => return None,
        _ if bytes.len() > 55 && bytes[55] != b'-' => return None,
        _ => {}
    }
    if bytes[2] != b'-' || bytes[35] != b'-' || bytes[52] != b'-' {
        return None;
    }
    let trace_id = hex_field(&bytes[3..35])?;
    let span_id = hex_field(&bytes[36..52])? as u64;
    let flags = hex_field(&bytes[53..55])? as u8;
    if trace_id == 0 || span_id == 0 {
        return None;
    }
    Some(TraceContext {
        trace_id,
        span_id,
        flags,
        state: None,
    })
}

/// A field of at most 32 lowercase hex digits (uppercase is invalid in `traceparent`). Read as
/// bytes: a header value may hold any UTF-8, and slicing it as a `str` could split a character.
fn hex_field(field: &[u8]) -> Option<u128> {
    field.iter().try_fold(0u128, |value, &digit| {
        let nibble = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => return None,
        };
        Some(value << 4 | u128::from(nibble))
    })
}

/// Ids come from a fast thread-local generator (wyrand, seeded per thread), as the
/// OpenTelemetry SDK's own `RandomIdGenerator` uses a thread-local `SmallRng`: ids must be
/// unique and unpredictable enough to sample on, not secret.
fn nonzero_u128() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn nonzero_u64() -> u64 {
    loop {
        let id = fastrand::u64(..);
        if id != 0 {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_spec_example_and_writes_it_back() {
        let context = parse_traceparent(VALID).expect("valid");
        assert_eq!(context.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(context.span_id, 0x00f067aa0ba902b7);
        assert_eq!(context.flags, 1);
        assert_eq!(context.traceparent(), VALID);
    }

    #[test]
    fn refuses_what_the_spec_says_to_ignore() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902g7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473é-00f067aa0ba902b7-01",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_known_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next";
        let context = parse_traceparent(later).expect("a later version");
        assert_eq!(context.span_id, 0x00f067aa0ba902b7);
        assert_eq!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_a_new_span() {
        let mut parent = parse_traceparent(VALID).unwrap();
        parent.state = Some("vendor=x".into());
        let child = parent.child();
        assert_eq!(child.trace_id, parent.trace_id);
        assert_eq!(child.flags, parent.flags);
        assert_eq!(child.state, parent.state);
        assert_ne!(child.span_id, parent.span_id);
        let reparsed = parse_traceparent(&child.traceparent()).expect("a child's traceparent is valid");
        assert_eq!(reparsed.span_id, child.span_id);
    }

    #[test]
    fn roots_are_valid_unsampled_and_distinct() {
        /// The `sampled` trace flag.
        const SAMPLED: u8 = 0x01;
        let (a, b) = (TraceContext::root(), TraceContext::root());
        assert_ne!(a.trace_id, b.trace_id);
        assert_eq!(a.flags & SAMPLED, 0);
        assert_eq!(parse_traceparent(&a.traceparent()), Some(a));
    }

    #[test]
    fn traceparent_is_the_w3c_form() {
        for context in [
            TraceContext::root(),
            TraceContext {
                trace_id: 0x0af7651916cd43dd8448eb211c80319c,
                span_id: 0xb7ad6b7169203331,
                flags: 0x01,
                state: None,
            },
            TraceContext {
                trace_id: 1,
                span_id: u64::MAX,
                flags: 0xa0,
                state: None,
            },
        ] {
            let expected = format!(
                "00-{:032x}-{:016x}-{:02x}",
                context.trace_id, context.span_id, context.flags
            );
            assert_eq!(context.traceparent(), expected);
        }
    }

    #[test]
    fn headers_round_trip_with_tracestate() {
        let mut headers = HeaderMap::new();
        let mut context = TraceContext::root();
        context.state = Some("congo=t61rcWkgMzE".into());
        context.inject(&mut headers);
        assert_eq!(TraceContext::extract(&headers), Some(context));
    }
}
