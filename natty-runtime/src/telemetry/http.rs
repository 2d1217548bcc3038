//! The operations endpoint: the console (`/` and `/api/`, see [`crate::console`]), `/metrics`
//! (Prometheus), `/healthz` (liveness) and `/readyz` (readiness), served with hyper on the
//! address in `NATTY_METRICS_ADDR`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::StreamExt as _;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::OnceLock;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::console::Console;
use crate::error::{Error, Result};
use crate::telemetry::Telemetry;

/// How long a scrape waits for the server's consumer counts before answering without them.
const CONSUMER_INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// Consumer info requests a scrape has in flight at once.
const CONCURRENT_INFO_REQUESTS: usize = 8;
/// Connections served at once.
const MAX_CONNECTIONS: usize = 64;
/// How long a client has to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The running endpoint; stops serving when dropped.
pub(crate) struct Endpoint {
    client: Arc<OnceLock<async_nats::Client>>,
    console: Arc<OnceLock<Arc<Console>>>,
    _stop: tokio_util::sync::DropGuard,
}

impl Endpoint {
    /// Binds `addr` and serves on it.
    pub(crate) fn bind(addr: SocketAddr, telemetry: Arc<Telemetry>, token: Option<String>) -> Result<Endpoint> {
        let listener = std::net::TcpListener::bind(addr).map_err(|source| Error::Io {
            what: format!("cannot listen on {addr} for metrics and health (NATTY_METRICS_ADDR)"),
            source,
        })?;
        Endpoint::serve(listener, telemetry, token)
    }

    /// Serves on a bound listener; `token` is the console's (`NATTY_CONSOLE_TOKEN`).
    pub(crate) fn serve(
        listener: std::net::TcpListener,
        telemetry: Arc<Telemetry>,
        token: Option<String>,
    ) -> Result<Endpoint> {
        let io = |source| Error::Io {
            what: "cannot serve metrics and health".into(),
            source,
        };
        listener.set_nonblocking(true).map_err(io)?;
        let addr = listener.local_addr().map_err(io)?;
        let listener = TcpListener::from_std(listener).map_err(io)?;
        let stop = CancellationToken::new();
        let client = Arc::new(OnceLock::new());
        let console = Arc::new(OnceLock::new());
        let state = Arc::new(State {
            telemetry,
            client: client.clone(),
            console: console.clone(),
            token,
        });
        tokio::spawn(serve(listener, state, stop.clone()));
        tracing::info!("serving the console, metrics and health on http://{addr} (/, /metrics, /healthz, /readyz)");
        Ok(Endpoint {
            client,
            console,
            _stop: stop.drop_guard(),
        })
    }

    /// Hands the endpoint the connection, once there is one.
    pub(crate) fn connected(&self, nats: &async_nats::Client) {
        let _ = self.client.set(nats.clone());
    }

    /// Hands the endpoint the console, once it runs.
    pub(crate) fn console(&self, console: &Arc<Console>) {
        let _ = self.console.set(console.clone());
    }
}

/// What a request handler sees.
struct State {
    telemetry: Arc<Telemetry>,
    client: Arc<OnceLock<async_nats::Client>>,
    console: Arc<OnceLock<Arc<Console>>>,
    /// The console's token.
    token: Option<String>,
}

/// Serves the endpoint on `listener` until `stop`.
async fn serve(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    // Scrapers and probes make a handful of connections; more are refused rather than let
    // anyone on the network tie up the service's memory.
    let connections = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: back off rather than spin.
                    tracing::warn!(error = %crate::error::chain(&error), "metrics endpoint: cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!("metrics endpoint: {MAX_CONNECTIONS} connections open; refusing another");
            continue;
        };
        let state = state.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&state, peer, request).await) }
            });
            // A client that opens a connection and sends nothing is dropped after the header
            // timeout (hyper needs a timer to enforce it).
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stop.cancelled() => connection.as_mut().graceful_shutdown(),
            }
        });
    }
}

async fn respond(state: &State, peer: SocketAddr, request: Request<Incoming>) -> Response<Full<Bytes>> {
    if crate::console::api::serves(request.uri().path()) {
        let console = state.console.get().cloned();
        return crate::console::api::respond(console, state.token.as_deref(), peer, request).await;
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    let telemetry = &state.telemetry;
    let client = state.client.get();
    match request.uri().path() {
        "/metrics" => {
            if let Some(nats) = client {
                refresh(telemetry, nats).await;
            }
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                telemetry.metrics.encode(),
            )
        }
        "/healthz" | "/livez" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => {
            let report = telemetry.health.report(client);
            let status = if report.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::to_string_pretty(&report).unwrap_or_default() + "\n";
            reply(status, "application/json", body)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try / (the console), /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

/// Reads what only the server knows (each consumer's pending counts) and the connection state,
/// so a scrape shows them as of now.
async fn refresh(telemetry: &Telemetry, nats: &async_nats::Client) {
    let metrics = &telemetry.metrics;
    metrics.observe_connection(nats);
    let js = &jetstream::new(nats.clone());
    // One CONSUMER.INFO request per consumer, a few at a time: a service with many consumers
    // must not send the server a burst per scrape.
    futures_util::stream::iter(metrics.watched().into_iter().filter(|watched| watched.scraped))
        .for_each_concurrent(CONCURRENT_INFO_REQUESTS, |watched| async move {
            let info = js
                .get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(&watched.consumer, watched.stream);
            if let Ok(Ok(consumer)) = tokio::time::timeout(CONSUMER_INFO_TIMEOUT, info).await {
                let info = consumer.cached_info();
                watched.record(info.num_pending, info.num_ack_pending, info.num_redelivered);
            }
        })
        .await;
}
