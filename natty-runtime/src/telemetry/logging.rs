//! The subscriber [`crate::run`] installs: human-readable or JSON lines on stderr, filtered by
//! `RUST_LOG`.
//!
//! Without an exporter, that is all: no OpenTelemetry SDK, and no span per message (nothing
//! would record it). Deliveries carry their log fields and W3C trace context in a task-local
//! scope instead (see [`super::context`]). With the `otlp` feature and an
//! `OTEL_EXPORTER_OTLP_*ENDPOINT`, the OpenTelemetry layer is added and every delivery and
//! publish is a span, exported in batches and sampled as `OTEL_TRACES_SAMPLER` says.

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::level_filters::LevelFilter;
use tracing::subscriber::Interest;
use tracing::Metadata;
use tracing_subscriber::filter::{self, FilterExt as _};
use tracing_subscriber::fmt::format::JsonFields;
use tracing_subscriber::layer::{Context, Filter, Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use super::context;
use super::format;

/// The provider [`init`] installed, kept to flush its exporter on [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the subscriber unless the program installed its own.
pub(crate) fn init() {
    if tracing::dispatcher::has_been_set() {
        return;
    }
    // A wrong value is reported by the configuration, right after: logging starts in text.
    let json = matches!(
        crate::config::LogFormat::from_lookup(crate::config::env),
        Ok(crate::config::LogFormat::Json)
    );
    match exporting_provider() {
        Some(provider) => init_exporting(json, provider),
        None => init_light(json),
    }
}

/// Log lines only: no OpenTelemetry layer, and natty's per-message spans disabled at their
/// callsites, so a delivery or a publish costs no span (the delivery scope stands in for it).
fn init_light(json: bool) {
    let filter = PerMessageSpansOff.and(env_filter());
    let layer = if json {
        tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(format::JsonLines::new())
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .event_format(format::Text::new())
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed()
    };
    if tracing_subscriber::registry().with(layer).try_init().is_ok() {
        context::set_light();
    }
}

/// Log lines plus the OpenTelemetry layer over `provider`, which exports.
fn init_exporting(json: bool, provider: SdkTracerProvider) {
    let filter = env_filter();
    // RUST_LOG filters what is logged. Spans are what carry the trace context from a delivery
    // to the publishes its handler makes, so the OpenTelemetry layer keeps every span at info
    // or above whatever RUST_LOG says (RUST_LOG=warn must not break traces), plus what RUST_LOG
    // enables.
    let (text, json) = if json {
        let layer = tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .with_filter(filter);
        (None, Some(layer))
    } else {
        let layer = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_writer(std::io::stderr)
            .with_filter(filter);
        (Some(layer), None)
    };
    let spans = filter::filter_fn(|metadata| metadata.is_span() && *metadata.level() <= tracing::Level::INFO);
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("natty"))
        .with_filter(spans.or(env_filter()));
    let installed = tracing_subscriber::registry()
        .with(text)
        .with(json)
        .with(otel)
        .try_init()
        .is_ok();
    if installed {
        let _ = PROVIDER.set(provider);
    }
}

/// Turns off natty's span per delivery and per publish, for the light subscriber. Decided once
/// per callsite (`Interest::never`), so `info_span!` there returns a disabled span at the cost of
/// one atomic load. Other natty spans (leader terms, capture blocks) are rare and stay.
struct PerMessageSpansOff;

impl PerMessageSpansOff {
    fn is_per_message(metadata: &Metadata<'_>) -> bool {
        metadata.is_span()
            && matches!(metadata.name(), "natty.deliver" | "natty.publish")
            && metadata.target().starts_with("natty_runtime")
    }
}

impl<S> Filter<S> for PerMessageSpansOff {
    fn enabled(&self, metadata: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        !Self::is_per_message(metadata)
    }

    fn callsite_enabled(&self, metadata: &'static Metadata<'static>) -> Interest {
        if Self::is_per_message(metadata) {
            Interest::never()
        } else {
            Interest::always()
        }
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        // No limit of its own: leaves RUST_LOG's level as the hint.
        Some(LevelFilter::TRACE)
    }
}

/// `RUST_LOG`, or natty's default: info, with async-nats' reconnect chatter at warn.
fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"))
}

/// Flushes and stops the span exporter, if one was installed.
pub(crate) fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(error) = provider.shutdown() {
            tracing::warn!(error = %crate::error::chain(&error), "could not flush the span exporter");
        }
    }
}

/// A tracer provider that exports, when the environment asks for one and this build can.
/// Its sampler is the SDK's default, which reads `OTEL_TRACES_SAMPLER` and
/// `OTEL_TRACES_SAMPLER_ARG` itself (`parentbased_always_on` when unset).
fn exporting_provider() -> Option<SdkTracerProvider> {
    #[cfg(feature = "otlp")]
    {
        let exporter = exporter()?;
        let mut resource = opentelemetry_sdk::Resource::builder();
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(crate::config::default_name());
        }
        Some(
            SdkTracerProvider::builder()
                .with_resource(resource.build())
                .with_batch_exporter(exporter)
                .build(),
        )
    }
    #[cfg(not(feature = "otlp"))]
    {
        if otlp_wanted() {
            eprintln!(
                "natty: OTEL_EXPORTER_OTLP_ENDPOINT is set, but this binary was built without natty-runtime's \
                 `otlp` feature; spans are not exported"
            );
        }
        None
    }
}

/// Whether the standard variables ask for an OTLP exporter.
fn otlp_wanted() -> bool {
    let endpoint = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()));
    endpoint && std::env::var("OTEL_TRACES_EXPORTER").as_deref() != Ok("none")
}

#[cfg(feature = "otlp")]
fn exporter() -> Option<opentelemetry_otlp::SpanExporter> {
    use opentelemetry_otlp::WithExportConfig as _;
    if !otlp_wanted() {
        return None;
    }
    // reqwest is built without a TLS provider of its own (the capture stores share it): use
    // ring, as async-nats does. A provider installed earlier stays.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The builder reads the rest of the OTEL_EXPORTER_OTLP_* variables (headers, timeout).
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .build()
    {
        Ok(exporter) => Some(exporter),
        Err(error) => {
            eprintln!("natty: cannot set up the OTLP span exporter: {error}; spans are not exported");
            None
        }
    }
}
