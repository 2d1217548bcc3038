//! Log lines of natty's light subscriber: a line emitted while a handler runs shows its delivery
//! (handler, stream, consumer, subject, sequence, delivery count, trace id) where the
//! `natty.deliver` span would have been, without a span per delivery.
//!
//! A formatter runs synchronously on the task that emits the event, so the delivery's
//! task-local [`DeliveryScope`] is readable here. Lines outside a delivery are formatted by
//! tracing-subscriber's own formatters, unchanged.

use std::fmt::{self, Write as _};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Json, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

use super::context::DeliveryScope;

/// The name a delivery goes by in log lines, as the span it stands for.
const NAME: &str = "natty.deliver";
/// The name of a core message's scope (a `#[subscribe]` or `#[service]` handler), as its
/// `natty.handle` span is named when something records spans.
const CORE_NAME: &str = "natty.handle";

/// The scope's name as logs show it.
fn name(delivery: &DeliveryScope) -> &'static str {
    if delivery.is_jetstream() {
        NAME
    } else {
        CORE_NAME
    }
}

/// Human-readable lines: `time LEVEL natty.deliver{handler="…" …}: target: message fields`,
/// as tracing-subscriber's `Full` format prints a line inside the `natty.deliver` span.
pub(crate) struct Text {
    /// Lines outside a delivery.
    full: Format<Full, SystemTime>,
    /// What follows the delivery: the program's own spans, target, message and fields.
    rest: Format<Full, ()>,
}

impl Text {
    pub(crate) fn new() -> Text {
        Text {
            full: tracing_subscriber::fmt::format(),
            rest: tracing_subscriber::fmt::format().without_time().with_level(false),
        }
    }
}

impl<S, N> FormatEvent<S, N> for Text
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let inside = DeliveryScope::with_current(|delivery| {
            let ansi = writer.has_ansi_escapes();
            write_time_and_level(&mut writer, event.metadata().level(), ansi)?;
            write_delivery_text(&mut writer, delivery, ansi)?;
            // `Full` puts no space between spans and one after the last.
            if ctx.event_scope().is_none() {
                writer.write_char(' ')?;
            }
            self.rest.format_event(ctx, writer.by_ref(), event)
        });
        match inside {
            Some(result) => result,
            None => self.full.format_event(ctx, writer, event),
        }
    }
}

/// The timestamp and level as `Full` writes them (dimmed time, coloured level with ANSI).
fn write_time_and_level(writer: &mut Writer<'_>, level: &Level, ansi: bool) -> fmt::Result {
    if ansi {
        writer.write_str("\x1b[2m")?;
    }
    if SystemTime.format_time(writer).is_err() {
        writer.write_str("<unknown time>")?;
    }
    if ansi {
        writer.write_str("\x1b[0m")?;
    }
    writer.write_char(' ')?;
    let (label, colour) = match *level {
        Level::TRACE => ("TRACE", "35"),
        Level::DEBUG => ("DEBUG", "34"),
        Level::INFO => (" INFO", "32"),
        Level::WARN => (" WARN", "33"),
        Level::ERROR => ("ERROR", "31"),
    };
    if ansi {
        write!(writer, "\x1b[{colour}m{label}\x1b[0m ")
    } else {
        write!(writer, "{label} ")
    }
}

/// `natty.deliver{handler="…" stream="…" …}:` with the field syntax of tracing-subscriber's
/// default field formatter (strings quoted, the subject as displayed).
fn write_delivery_text(writer: &mut Writer<'_>, delivery: &DeliveryScope, ansi: bool) -> fmt::Result {
    let (bold, dim, italic, reset) = if ansi {
        ("\x1b[1m", "\x1b[2m", "\x1b[3m", "\x1b[0m")
    } else {
        ("", "", "", "")
    };
    let field = |writer: &mut Writer<'_>, name: &str, value: &dyn fmt::Display| {
        write!(writer, "{italic}{name}{reset}{dim}={reset}{value}")
    };
    write!(writer, "{bold}{}{reset}{bold}{{{reset}", name(delivery))?;
    field(writer, "handler", &format_args!("{:?}", delivery.handler))?;
    writer.write_char(' ')?;
    if delivery.is_jetstream() {
        field(writer, "stream", &format_args!("{:?}", delivery.stream))?;
        writer.write_char(' ')?;
        field(writer, "consumer", &format_args!("{:?}", &*delivery.consumer))?;
        writer.write_char(' ')?;
    }
    field(writer, "subject", &delivery.subject)?;
    writer.write_char(' ')?;
    if delivery.is_jetstream() {
        field(writer, "sequence", &delivery.sequence)?;
        writer.write_char(' ')?;
        field(writer, "delivery_count", &delivery.delivery_count)?;
        writer.write_char(' ')?;
    }
    field(writer, "trace_id", &format_args!("{:032x}", delivery.trace.trace_id))?;
    write!(writer, "{bold}}}{reset}{dim}:{reset}")
}

/// One JSON object per line, as tracing-subscriber's JSON format with the current span and the
/// span list: inside a delivery, `span` (unless a span of the program's is current) and the
/// first entry of `spans` are the delivery, as the `natty.deliver` span's would be.
pub(crate) struct JsonLines {
    json: Format<Json, SystemTime>,
}

impl JsonLines {
    pub(crate) fn new() -> JsonLines {
        JsonLines {
            json: tracing_subscriber::fmt::format().json().with_current_span(true),
        }
    }
}

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let inside = DeliveryScope::with_current(|delivery| {
            let mut line = String::new();
            self.json.format_event(ctx, Writer::new(&mut line), event)?;
            writer.write_str(&with_delivery(&line, &delivery_json(delivery)))
        });
        match inside {
            Some(result) => result,
            None => self.json.format_event(ctx, writer, event),
        }
    }
}

/// The delivery as the JSON format writes a span: its fields by name, then `name`.
fn delivery_json(delivery: &DeliveryScope) -> String {
    let quoted = |value: &str| serde_json::to_string(value).unwrap_or_else(|_| "\"\"".to_string());
    if !delivery.is_jetstream() {
        return format!(
            r#"{{"handler":{},"subject":{},"trace_id":"{:032x}","name":"{CORE_NAME}"}}"#,
            quoted(delivery.handler),
            quoted(delivery.subject.as_str()),
            delivery.trace.trace_id,
        );
    }
    format!(
        r#"{{"consumer":{},"delivery_count":{},"handler":{},"sequence":{},"stream":{},"subject":{},"trace_id":"{:032x}","name":"{NAME}"}}"#,
        quoted(&delivery.consumer),
        delivery.delivery_count,
        quoted(delivery.handler),
        delivery.sequence,
        quoted(delivery.stream),
        quoted(delivery.subject.as_str()),
        delivery.trace.trace_id,
    )
}

/// `line` (one JSON object and a newline) with `delivery` as the outermost span. Keys are
/// found as text: inside a JSON string a quote is escaped, so `"spans":[` can only be the
/// top-level key (field values are never arrays), and it comes after the event's fields.
fn with_delivery(line: &str, delivery: &str) -> String {
    let body = line.trim_end_matches('\n');
    let Some(open) = body.strip_suffix('}') else {
        return line.to_string();
    };
    let mut out = String::with_capacity(line.len() + 2 * delivery.len() + 24);
    const SPANS: &str = "\"spans\":[";
    match open.rfind(SPANS) {
        Some(at) => {
            let (before, after) = open.split_at(at + SPANS.len());
            let _ = write!(out, "{before}{delivery},{after}}}");
        }
        None => {
            let comma = if open.ends_with('{') { "" } else { "," };
            let _ = write!(out, r#"{open}{comma}"span":{delivery},"spans":[{delivery}]}}"#);
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::with_delivery;

    #[test]
    fn a_line_without_spans_gets_the_delivery_as_span_and_list() {
        let line = "{\"level\":\"INFO\",\"fields\":{\"message\":\"hi \\\"spans\\\":[\"},\"target\":\"t\"}\n";
        let out = with_delivery(line, r#"{"name":"d"}"#);
        assert_eq!(
            out,
            "{\"level\":\"INFO\",\"fields\":{\"message\":\"hi \\\"spans\\\":[\"},\"target\":\"t\",\"span\":{\"name\":\"d\"},\"spans\":[{\"name\":\"d\"}]}\n"
        );
        let value: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(value["span"]["name"], "d");
    }

    #[test]
    fn a_line_inside_a_program_span_gets_the_delivery_first_in_the_list() {
        let line = r#"{"target":"t","span":{"name":"mine"},"spans":[{"name":"mine"}]}"#;
        let out = with_delivery(line, r#"{"name":"d"}"#);
        let value: serde_json::Value = serde_json::from_str(&out).expect("still JSON");
        assert_eq!(value["span"]["name"], "mine", "the current span stays the program's");
        assert_eq!(value["spans"][0]["name"], "d");
        assert_eq!(value["spans"][1]["name"], "mine");
    }
}
