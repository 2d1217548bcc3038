//! The subscriber [`crate::run`] installs: human-readable or JSON lines on stderr, filtered by
//! `RUST_LOG`, plus the OpenTelemetry layer that gives spans their trace context (and exports
//! them over OTLP with the `otlp` feature and an `OTEL_EXPORTER_OTLP_*ENDPOINT`).

use std::sync::OnceLock;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{self, FilterExt as _};
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// The provider [`init`] installed, kept to flush its exporter on [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the subscriber unless the program installed its own.
pub(crate) fn init() {
    if tracing::dispatcher::has_been_set() {
        return;
    }
    let filter = env_filter();
    let json = match std::env::var("NATTY_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") | Err(_) => false,
        Ok(other) => {
            // Logging is not up yet: say it the only way there is.
            eprintln!("natty: NATTY_LOG_FORMAT={other:?} is not \"text\" or \"json\"; using text");
            false
        }
    };
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
    let provider = provider();
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

/// `RUST_LOG`, or natty's default: info, with async-nats' reconnect chatter at warn.
fn env_filter() -> EnvFilter {
    EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,async_nats=warn"))
}

/// Flushes and stops the span exporter, if one was installed.
pub(crate) fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(error) = provider.shutdown() {
            tracing::warn!(%error, "could not flush the span exporter");
        }
    }
}

/// A tracer provider: without an exporter, spans still get trace ids (so context propagates
/// through this service); with one, they are sent in batches.
fn provider() -> SdkTracerProvider {
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(crate::config::default_name());
    }
    let builder = SdkTracerProvider::builder().with_resource(resource.build());
    #[cfg(feature = "otlp")]
    if let Some(exporter) = exporter() {
        return builder.with_batch_exporter(exporter).build();
    }
    #[cfg(not(feature = "otlp"))]
    if otlp_wanted() {
        eprintln!(
            "natty: OTEL_EXPORTER_OTLP_ENDPOINT is set, but this binary was built without natty-runtime's \
             `otlp` feature; spans are not exported"
        );
    }
    builder.build()
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
