//! Observability: W3C trace context from a publisher into the consumer's span, the Prometheus
//! endpoint and its counters, and readiness through startup and drain.

use futures_util::StreamExt;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::Runtime;
use natty_tests::{http_get, wait_until, Job};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const WAIT: Duration = Duration::from_secs(20);

#[stream(name = "traced", subjects = ["traced.>"])]
struct Traced;

static TRACED: AtomicUsize = AtomicUsize::new(0);

#[consumer(stream = "traced", durable = "traced")]
async fn traced(_job: Job) {
    tracing::info!("handling a traced job");
    TRACED.fetch_add(1, Ordering::SeqCst);
}

#[stream(name = "metered", subjects = ["metered.>"])]
struct Metered;

#[consumer(stream = "metered", durable = "metered", concurrency = 4)]
async fn metered(job: Job, ctx: Context) -> Result<(), Reject> {
    match job.id {
        7 => Err(Reject::terminate("seven is refused")),
        3 if ctx.delivery_count() == 1 => Err(Reject::retry()),
        _ => Ok(()),
    }
}

/// Leads until shutdown, for the leader gauges.
#[leader(bucket = "observed", key = "leader", ttl = "3s")]
async fn observed_leader(lease: Lease) -> Result<(), std::io::Error> {
    lease.lost().await;
    Ok(())
}

#[stream(name = "gated", subjects = ["gated.>"])]
struct Gated;

static GATE_ENTERED: AtomicBool = AtomicBool::new(false);
static GATE_OPEN: AtomicBool = AtomicBool::new(false);

#[consumer(stream = "gated", durable = "gated")]
async fn gated(_job: Job) {
    GATE_ENTERED.store(true, Ordering::SeqCst);
    while !GATE_OPEN.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The process-wide subscriber: every span goes to an in-memory OpenTelemetry exporter.
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("observe-test")))
            .init();
        exporter
    })
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

/// Exported spans named `name` whose attribute `key` is `value` (other tests run alongside).
fn finished(name: &str, key: &str, value: &str) -> Vec<SpanData> {
    spans()
        .get_finished_spans()
        .expect("exported spans")
        .into_iter()
        .filter(|span| span.name == name && attribute(span, key).as_deref() == Some(value))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_started_by_a_publisher_continues_in_the_consumer_span() {
    spans();
    let server = NatsServer::start().await.expect("nats-server");
    let runtime = Runtime::builder()
        .url(server.url())
        .handlers(["traced"])
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    let publisher = natty_runtime::Client::new(server.client().await);
    wait_until(WAIT, "the traced stream exists", || async {
        publisher.jetstream().get_stream("traced").await.is_ok()
    })
    .await;

    let request = tracing::info_span!("place-order");
    publisher
        .publish("traced.1", &Job { id: 1 })
        .instrument(request)
        .await
        .expect("publish");
    wait_until(WAIT, "the consumer's span is exported", || async {
        !finished("natty.deliver", "stream", "traced").is_empty()
    })
    .await;
    running.stop().await.unwrap();

    let root = spans()
        .get_finished_spans()
        .unwrap()
        .into_iter()
        .find(|span| span.name == "place-order")
        .expect("the publisher's root span");
    let publish = finished("natty.publish", "subject", "traced.1")
        .pop()
        .expect("the publish span");
    let deliver = finished("natty.deliver", "stream", "traced")
        .pop()
        .expect("the delivery span");
    let trace = root.span_context.trace_id();
    assert_eq!(
        publish.span_context.trace_id(),
        trace,
        "publish joins the caller's trace"
    );
    assert_eq!(publish.parent_span_id, root.span_context.span_id());
    assert_eq!(
        deliver.span_context.trace_id(),
        trace,
        "the consumer continues the publisher's trace"
    );
    assert_eq!(
        deliver.parent_span_id,
        publish.span_context.span_id(),
        "the delivery's parent is the publish that sent it"
    );
    assert_eq!(attribute(&deliver, "stream").as_deref(), Some("traced"));
    assert_eq!(attribute(&deliver, "consumer").as_deref(), Some("traced"));
    assert_eq!(attribute(&deliver, "sequence").as_deref(), Some("1"));
    assert_eq!(attribute(&deliver, "delivery_count").as_deref(), Some("1"));
    assert_eq!(attribute(&deliver, "outcome").as_deref(), Some("ack"));
    assert!(attribute(&deliver, "duration_ms").is_some(), "{:?}", deliver.attributes);
    assert_eq!(TRACED.load(Ordering::SeqCst), 1);
}

/// Parses OpenMetrics text strictly — every line a family's `# TYPE`/`# HELP`, a sample of a
/// declared family with well-formed labels and a number, and `# EOF` last — into series → value.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    fn is_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut families: Vec<String> = Vec::new();
    let mut series = BTreeMap::new();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics text ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            assert!(is_name(name), "bad family name in {line:?}");
            assert!(
                [
                    "counter",
                    "gauge",
                    "histogram",
                    "summary",
                    "info",
                    "stateset",
                    "unknown"
                ]
                .contains(&kind),
                "bad type in {line:?}"
            );
            families.push(name.to_string());
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# UNIT ")) {
            assert!(
                rest.split(' ').next().is_some_and(is_name),
                "bad HELP/UNIT line {line:?}"
            );
            continue;
        }
        assert!(!line.starts_with('#'), "unknown comment line {line:?}");
        let (sample, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample {line:?}"));
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            number => number.parse().unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = sample.split('{').next().unwrap();
        assert!(is_name(name), "bad metric name in {line:?}");
        let family = families
            .iter()
            .find(|family| {
                name.strip_prefix(family.as_str())
                    .is_some_and(|suffix| ["", "_total", "_created", "_bucket", "_count", "_sum"].contains(&suffix))
            })
            .unwrap_or_else(|| panic!("sample {line:?} has no # TYPE before it"));
        let _ = family;
        if let Some(labels) = sample.strip_prefix(name) {
            if !labels.is_empty() {
                let inner = labels
                    .strip_prefix('{')
                    .and_then(|l| l.strip_suffix('}'))
                    .unwrap_or_else(|| panic!("bad labels in {line:?}"));
                for pair in inner.split(',') {
                    let (key, quoted) = pair.split_once('=').unwrap_or_else(|| panic!("bad label in {line:?}"));
                    assert!(is_name(key), "bad label name in {line:?}");
                    assert!(
                        quoted.len() >= 2 && quoted.starts_with('"') && quoted.ends_with('"'),
                        "unquoted label value in {line:?}"
                    );
                }
            }
        }
        assert!(
            series.insert(sample.to_string(), value).is_none(),
            "duplicate series {sample}"
        );
    }
    series
}

async fn scrape(addr: SocketAddr) -> BTreeMap<String, f64> {
    let (status, body) = http_get(addr, "/metrics").await.expect("scrape /metrics");
    assert_eq!(status, 200, "{body}");
    parse_metrics(&body)
}

fn consumer_series(name: &str, consumer: &str) -> String {
    format!("natty_consumer_{name}{{handler=\"{consumer}\",stream=\"{consumer}\",consumer=\"{consumer}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_serves_prometheus_text_and_its_counters_follow_the_messages() {
    let server = NatsServer::start().await.expect("nats-server");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = Runtime::builder()
        .url(server.url())
        .handlers(["metered", "observed_leader"])
        .metrics_listener(listener)
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    wait_until(WAIT, "the consumer is provisioned", || async {
        js.get_stream("metered").await.is_ok() && http_get(addr, "/readyz").await.is_ok_and(|(status, _)| status == 200)
    })
    .await;

    let before = scrape(addr).await;
    assert_eq!(before.get(&consumer_series("delivered_total", "metered")), Some(&0.0));
    assert_eq!(before.get("natty_connection_connected"), Some(&1.0), "{before:#?}");

    for id in 0..10 {
        js.publish(format!("metered.{id}"), serde_json::to_vec(&Job { id }).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(WAIT, "9 acked and 1 dead-lettered", || async {
        let now = scrape(addr).await;
        now.get(&consumer_series("acked_total", "metered")) == Some(&9.0)
            && now.get(&consumer_series("dead_lettered_total", "metered")) == Some(&1.0)
            && now.get(&consumer_series("pending_messages", "metered")) == Some(&0.0)
            && now.get(&consumer_series("ack_pending_messages", "metered")) == Some(&0.0)
    })
    .await;
    let after = scrape(addr).await;
    let get = |name: &str| after.get(&consumer_series(name, "metered")).copied();
    assert_eq!(get("delivered_total"), Some(11.0), "ten messages, one of them twice");
    assert_eq!(get("naked_total"), Some(1.0));
    assert_eq!(get("terminated_total"), Some(1.0));
    assert_eq!(get("in_flight"), Some(0.0));
    assert_eq!(get("handler_duration_seconds_count"), Some(11.0));
    let inf = "natty_consumer_handler_duration_seconds_bucket{le=\"+Inf\",handler=\"metered\",stream=\"metered\",consumer=\"metered\"}";
    assert_eq!(after.get(inf), Some(&11.0), "{after:#?}");
    assert_eq!(after.get("natty_connection_reconnects_total"), Some(&0.0));
    let leader = "{leader=\"observed_leader\",bucket=\"observed\",key=\"leader\"}";
    wait_until(WAIT, "this instance leads", || async {
        scrape(addr).await.get(&format!("natty_leader_is_leader{leader}")) == Some(&1.0)
    })
    .await;
    // Another term may have begun since (a renewal that timed out on a busy machine).
    let terms = scrape(addr)
        .await
        .get(&format!("natty_leader_terms_total{leader}"))
        .copied();
    assert!(terms >= Some(1.0), "terms: {terms:?}");

    let (status, body) = http_get(addr, "/healthz").await.unwrap();
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, _) = http_get(addr, "/nothing-here").await.unwrap();
    assert_eq!(status, 404);
    running.stop().await.unwrap();
}

async fn readiness(addr: SocketAddr) -> Option<(u16, serde_json::Value)> {
    let (status, body) = http_get(addr, "/readyz").await.ok()?;
    Some((status, serde_json::from_str(&body).expect("/readyz answers JSON")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_false_before_provisioning_true_after_and_false_again_while_draining() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    // A stopped server accepts the connection but never answers: startup waits there.
    server.signal(19);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let runtime = Runtime::builder()
        .url(server.url())
        .handlers(["gated"])
        .connect_timeout(Duration::from_secs(60))
        .metrics_listener(listener)
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);

    let (status, report) = readiness(addr).await.expect("the endpoint answers before connecting");
    assert_eq!(status, 503, "{report}");
    assert_eq!(report["provisioned"], false, "{report}");
    assert_eq!(report["connected"], false, "{report}");

    server.signal(18);
    wait_until(WAIT, "ready once provisioned", || async {
        readiness(addr).await.is_some_and(|(status, _)| status == 200)
    })
    .await;
    let (_, report) = readiness(addr).await.unwrap();
    assert_eq!(report["provisioned"], true, "{report}");
    assert_eq!(report["handlers"], 1, "{report}");

    let js = async_nats::jetstream::new(client.clone());
    js.publish("gated.1", serde_json::to_vec(&Job { id: 1 }).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    wait_until(WAIT, "the handler is running", || async {
        GATE_ENTERED.load(Ordering::SeqCst)
    })
    .await;
    let stopping = tokio::spawn(running.stop());
    wait_until(WAIT, "not ready while draining", || async {
        readiness(addr)
            .await
            .is_some_and(|(status, report)| status == 503 && report["draining"] == true)
    })
    .await;
    GATE_OPEN.store(true, Ordering::SeqCst);
    stopping.await.unwrap().unwrap();
    wait_until(WAIT, "the endpoint closes with the runtime", || async {
        http_get(addr, "/readyz").await.is_err()
    })
    .await;
}

/// A stand-in OTLP/HTTP collector: answers every request with an empty (valid) protobuf
/// response and keeps (path, content type, body).
async fn collector() -> (
    SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = received.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut line = String::new();
                    if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let path = line.split_whitespace().nth(1).unwrap_or_default().to_string();
                    let (mut length, mut content_type) = (0usize, String::new());
                    loop {
                        let mut header = String::new();
                        stream.read_line(&mut header).await.unwrap();
                        let header = header.trim_end();
                        if header.is_empty() {
                            break;
                        }
                        let (name, value) = header.split_once(':').unwrap_or((header, ""));
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap(),
                            "content-type" => content_type = value.trim().to_string(),
                            _ => {}
                        }
                    }
                    let mut body = vec![0; length];
                    stream.read_exact(&mut body).await.unwrap();
                    sink.lock().unwrap().push((path, content_type, body));
                    let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    stream.get_mut().write_all(reply.as_bytes()).await.unwrap();
                }
            });
        }
    });
    (addr, received)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|window| window == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_exports_its_delivery_spans_over_otlp_in_the_trace_its_message_carried() {
    // RUST_LOG at warn silences the logs, not the spans: the trace must still continue. The
    // header is spelled `Traceparent`, as an HTTP bridge may write it.
    const WORKER: &str = env!("CARGO_BIN_EXE_natty-test-worker");
    let server = NatsServer::start().await.expect("nats-server");
    let (collector, received) = collector().await;
    let endpoint = format!("http://{collector}");
    let mut worker = natty_tests::spawn_service(
        std::path::Path::new(WORKER),
        Some(&server.url()),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SERVICE_NAME", "otlp-test-worker"),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
            ("RUST_LOG", "warn"),
        ],
    );
    let logs = natty_tests::collect_stderr(&mut worker);
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    natty_tests::wait_for_consumer(&js, "jobs", "workers", WAIT).await;

    // The trace an upstream service started, as its publish would have carried it.
    let trace_hex = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Traceparent", format!("00-{trace_hex}-00f067aa0ba902b7-01").as_str());
    js.publish_with_headers("jobs.1", headers, serde_json::to_vec(&Job { id: 1 }).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    wait_until(WAIT, "the delivery span reaches the collector", || async {
        received.lock().unwrap().iter().any(|(_, _, body)| {
            contains(body, &trace_id) && contains(body, b"natty.deliver") && contains(body, b"jobs.1")
        })
    })
    .await;
    let received = received.lock().unwrap().clone();
    let (path, content_type, body) = received.iter().find(|(_, _, body)| contains(body, &trace_id)).unwrap();
    assert_eq!(path, "/v1/traces");
    assert_eq!(content_type, "application/x-protobuf");
    assert!(
        contains(body, b"otlp-test-worker"),
        "the service name is in the resource"
    );
    drop(worker);
    drop(logs);
}

/// The relay service (`tests/bin/relay.rs`) run with `run()`'s default subscriber and no
/// exporter (the OTLP variables set empty count as unset), logging in `format`.
async fn relay_service(
    server: &NatsServer,
    format: &str,
) -> (tokio::process::Child, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    const RELAY: &str = env!("CARGO_BIN_EXE_natty-test-relay");
    let mut relay = natty_tests::spawn_service(
        std::path::Path::new(RELAY),
        Some(&server.url()),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", ""),
            ("NATTY_LOG_FORMAT", format),
        ],
    );
    let logs = natty_tests::collect_stderr(&mut relay);
    let js = async_nats::jetstream::new(server.client().await);
    natty_tests::wait_for_consumer(&js, "relay", "relay", WAIT).await;
    (relay, logs)
}

/// The trace an upstream service started: its trace id and the span id of its publish.
const UPSTREAM_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const UPSTREAM_SPAN: &str = "00f067aa0ba902b7";

/// Publishes job 1 to `relay.in` as an upstream service in trace [`UPSTREAM_TRACE`] would.
async fn publish_traced(js: &async_nats::jetstream::Context) {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01").as_str(),
    );
    headers.insert("tracestate", "congo=t61rcWkgMzE");
    js.publish_with_headers("relay.in", headers, serde_json::to_vec(&Job { id: 1 }).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The headers of the last message on `subject` of the relay stream, once there is one.
async fn last_on(js: &async_nats::jetstream::Context, subject: &str) -> async_nats::HeaderMap {
    let stream = js.get_stream("relay").await.expect("the relay stream");
    wait_until(WAIT, &format!("a message on {subject}"), || async {
        stream.get_last_raw_message_by_subject(subject).await.is_ok()
    })
    .await;
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .expect("the message just seen")
        .headers
}

/// (trace id, span id, flags) of a `traceparent` that the W3C spec calls valid, else a panic.
fn valid_traceparent(headers: &async_nats::HeaderMap) -> (String, String, String) {
    let value = headers.get("traceparent").expect("a traceparent header").as_str();
    let parts: Vec<&str> = value.split('-').collect();
    let hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    assert!(
        parts.len() == 4
            && parts[0] == "00"
            && [parts[1].len(), parts[2].len(), parts[3].len()] == [32, 16, 2]
            && parts.iter().all(|part| hex(part))
            && parts[1].bytes().any(|b| b != b'0')
            && parts[2].bytes().any(|b| b != b'0'),
        "not a valid traceparent: {value:?}"
    );
    (parts[1].to_string(), parts[2].to_string(), parts[3].to_string())
}

/// The one log line of the relay handler, once it is there.
async fn handler_line(logs: &std::sync::Mutex<Vec<String>>) -> String {
    let lines = || -> Vec<String> {
        logs.lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("relaying a job"))
            .cloned()
            .collect()
    };
    wait_until(WAIT, "the handler's log line", || async { !lines().is_empty() }).await;
    let lines = lines();
    assert_eq!(lines.len(), 1, "one delivery, one line: {lines:#?}");
    lines[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_trace_context_flows_through_a_service_and_its_logs_show_the_delivery() {
    let server = NatsServer::start().await.expect("nats-server");
    let (relay, logs) = relay_service(&server, "text").await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());

    // A delivery continues the trace its message carries: the handler's publish is a child.
    publish_traced(&js).await;
    let out = last_on(&js, "relay.out").await;
    let (trace, span, flags) = valid_traceparent(&out);
    assert_eq!(
        trace, UPSTREAM_TRACE,
        "the publish inside the delivery stays in its trace"
    );
    assert_ne!(span, UPSTREAM_SPAN, "the publish is a new span, not the upstream one");
    assert_eq!(flags, "01", "the upstream sampling decision is kept");
    assert_eq!(
        out.get("tracestate").map(|v| v.as_str()),
        Some("congo=t61rcWkgMzE"),
        "tracestate passes through unchanged"
    );

    // A publish outside any delivery starts a trace of its own.
    // Kicked until the subscription (started beside the consumer) is there to hear it.
    let kick = serde_json::to_vec(&Job { id: 2 }).unwrap();
    let stream = js.get_stream("relay").await.unwrap();
    wait_until(WAIT, "a publish outside a delivery", || async {
        client.publish("relay.kick", kick.clone().into()).await.unwrap();
        stream.get_last_raw_message_by_subject("relay.fresh").await.is_ok()
    })
    .await;
    let fresh = last_on(&js, "relay.fresh").await;
    let (fresh_trace, _, _) = valid_traceparent(&fresh);
    assert_ne!(fresh_trace, UPSTREAM_TRACE, "a new trace, not the last delivery's");

    // The handler's log line (stderr, text) shows the delivery it ran in.
    let line = handler_line(&logs).await;
    for field in [
        "natty.deliver{",
        "handler=\"relay\"",
        "stream=\"relay\"",
        "consumer=\"relay\"",
        "subject=relay.in",
        "sequence=1",
        "delivery_count=1",
        &format!("trace_id={UPSTREAM_TRACE}"),
        "relaying a job job=1",
    ] {
        assert!(line.contains(field), "{field:?} missing from {line:?}");
    }
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_json_log_lines_inside_a_delivery_carry_its_fields() {
    let server = NatsServer::start().await.expect("nats-server");
    let (relay, logs) = relay_service(&server, "json").await;
    let js = async_nats::jetstream::new(server.client().await);
    publish_traced(&js).await;
    let line = handler_line(&logs).await;
    let value: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
    assert_eq!(value["fields"]["message"], "relaying a job", "{line}");
    assert_eq!(value["fields"]["job"], 1, "{line}");
    let expected = serde_json::json!({
        "name": "natty.deliver",
        "handler": "relay",
        "stream": "relay",
        "consumer": "relay",
        "subject": "relay.in",
        "sequence": 1,
        "delivery_count": 1,
        "trace_id": UPSTREAM_TRACE,
    });
    assert_eq!(value["span"], expected, "{line}");
    assert_eq!(value["spans"], serde_json::json!([expected]), "{line}");
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_exporter_a_service_continues_the_trace_of_its_request() {
    let server = NatsServer::start().await.expect("nats-server");
    let (relay, logs) = relay_service(&server, "text").await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    // The test answers the service's own request, keeping its headers.
    let mut probe = client.subscribe("questions.probe").await.unwrap();
    let asked = tokio::spawn({
        let client = client.clone();
        async move {
            let request = probe.next().await.expect("the service's request");
            let reply = request.reply.clone().expect("a request has a reply subject");
            client.publish(reply, request.payload.clone()).await.unwrap();
            request.headers.expect("the request's headers")
        }
    });
    // A core request in the upstream trace.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        "traceparent",
        format!("00-{UPSTREAM_TRACE}-{UPSTREAM_SPAN}-01").as_str(),
    );
    let payload = serde_json::to_vec(&Job { id: 3 }).unwrap();
    let answer = wait_until_answered(&client, headers, payload).await;
    let body = String::from_utf8_lossy(&answer.payload).to_string();
    let job: Job =
        serde_json::from_slice(&answer.payload).unwrap_or_else(|error| panic!("{error}: {body} {:?}", answer.headers));
    assert_eq!(job.id, 3);

    // The request the service made, and the message it published, continue that trace.
    let probe_headers = tokio::time::timeout(WAIT, asked).await.unwrap().unwrap();
    let (trace, span, _) = valid_traceparent(&probe_headers);
    assert_eq!(
        trace, UPSTREAM_TRACE,
        "a request inside a service handler stays in its trace"
    );
    assert_ne!(span, UPSTREAM_SPAN);
    let published = last_on(&js, "relay.asked").await;
    assert_eq!(valid_traceparent(&published).0, UPSTREAM_TRACE, "so does its publish");

    // Its log line shows the handler, the subject and the trace, and no JetStream fields.
    let line = {
        let found = || -> Option<String> {
            logs.lock()
                .unwrap()
                .iter()
                .find(|line| line.contains("answering a question"))
                .cloned()
        };
        wait_until(WAIT, "the service's log line", || async { found().is_some() }).await;
        found().unwrap()
    };
    for field in [
        "natty.handle{",
        "handler=\"ask\"",
        "subject=questions.ask",
        &format!("trace_id={UPSTREAM_TRACE}"),
    ] {
        assert!(line.contains(field), "{field:?} missing from {line:?}");
    }
    assert!(!line.contains("stream=") && !line.contains("sequence="), "{line}");
    drop(relay);
}

/// Sends the traced request until the service, still starting, answers it.
async fn wait_until_answered(
    client: &async_nats::Client,
    headers: async_nats::HeaderMap,
    payload: Vec<u8>,
) -> async_nats::Message {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let request = async_nats::Request::new()
            .headers(headers.clone())
            .payload(payload.clone().into())
            .timeout(Some(Duration::from_secs(5)));
        match client.send_request("questions.ask", request).await {
            Ok(answer) => return answer,
            // Not listening yet (no responders): ask again shortly.
            Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(error) => panic!("the service never answered: {error}"),
        }
    }
}
