//! An HTTP API and natty handlers in one process, sharing their state and their shutdown.
//!
//! `POST /orders` takes an order as JSON, publishes it to the `shop` stream and answers
//! `202 Accepted` with its stream sequence once the stream has stored it. The `kitchen`
//! consumer, in the same process, prepares each order and records it in [`Orders`];
//! `GET /orders/{id}` reads that record: `404` until the consumer has the order, then `200`
//! with its status (`preparing`, then `ready`).
//!
//! The pattern, for any HTTP framework beside natty:
//!
//! - **One state value, two owners.** [`Orders`] is cheap to clone (an `Arc` inside). One clone
//!   goes to the runtime with [`RuntimeBuilder::state`](natty_runtime::RuntimeBuilder::state)
//!   and reaches the consumer as `natty_runtime::State<Orders>`; another goes into the router
//!   and reaches the HTTP handlers as `axum::extract::State<Orders>`. Both see one map.
//! - **[`Runtime::run_until`](natty_runtime::Runtime::run_until), not `run`.** `run` installs
//!   its own signal handler and returns when it has drained; the HTTP server would never hear
//!   of the signal. `run_until` takes the shutdown as a future, so the program decides when.
//! - **One [`Shutdown`].** [`Shutdown::on_signals`] turns the first SIGINT/SIGTERM into one
//!   trigger that every `wait()` sees: axum stops accepting and finishes the requests it is
//!   serving, natty stops pulling and lets in-flight handlers finish and ack. The two are
//!   joined, so the process exits once both have drained, and a startup failure of either side
//!   triggers the shutdown of the other instead of leaving a half-running service.
//!
//! Settings: `WEB_ADDR` (default `127.0.0.1:8080`; port 0 picks a free one), `PREP_MS` (how
//! long preparing an order takes, simulated work; default 0), and natty's usual ones
//! (`NATS_URL`, `NATTY_DRAIN_TIMEOUT`, ...). Prints `listening on http://<addr>` once the
//! HTTP server is bound.
//!
//! ```text
//! curl -i -H 'content-type: application/json' -d '{"id":"o-1","item":"margherita","quantity":2}' localhost:8080/orders
//! curl -i localhost:8080/orders/o-1
//! ```

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{self, FromRef, Path};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use natty_runtime::prelude::*;
use natty_runtime::{Connection, Error, Publish, PublishError, Shutdown};
use serde::{Deserialize, Serialize};

const DEFAULT_ADDR: &str = "127.0.0.1:8080";

#[stream(name = "shop", subjects = ["shop.>"], duplicate_window = "2m")]
struct Shop;

/// An order as the HTTP API takes it and the stream keeps it, on `shop.orders.<id>`.
#[derive(Debug, Clone, Serialize, Deserialize, Payload)]
#[payload(subject = "shop.orders.{id}")]
struct OrderReceived {
    /// Chosen by the client; one subject token (no `.`, spaces or wildcards).
    id: String,
    item: String,
    quantity: u32,
}

/// Where an order is.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Status {
    Preparing,
    Ready,
}

/// What `GET /orders/{id}` answers.
#[derive(Debug, Clone, Serialize)]
struct OrderView {
    id: String,
    item: String,
    quantity: u32,
    /// The order's sequence in the `shop` stream.
    sequence: u64,
    status: Status,
}

/// The orders the kitchen has seen, shared by the consumer and the HTTP handlers.
#[derive(Clone, Default)]
struct Orders(Arc<Mutex<HashMap<String, OrderView>>>);

impl Orders {
    fn record(&self, view: OrderView) {
        // A handler that panicked while holding the lock left whole entries behind: keep going.
        let mut orders = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        orders.insert(view.id.clone(), view);
    }

    fn get(&self, id: &str) -> Option<OrderView> {
        let orders = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        orders.get(id).cloned()
    }
}

/// The kitchen's settings: a second state value, found by its type.
#[derive(Clone)]
struct Kitchen {
    prep_time: Duration,
}

impl Kitchen {
    fn from_env() -> natty_runtime::Result<Kitchen> {
        let prep_ms = match std::env::var("PREP_MS") {
            Ok(value) => value.parse().map_err(|_| Error::Config {
                setting: "PREP_MS".into(),
                value,
                reason: "expected a whole number of milliseconds".into(),
            })?,
            Err(_) => 0,
        };
        Ok(Kitchen {
            prep_time: Duration::from_millis(prep_ms),
        })
    }
}

#[consumer(stream = "shop", durable = "kitchen", subject = "shop.orders.>", concurrency = 4)]
async fn prepare(
    order: OrderReceived,
    ctx: Context,
    natty_runtime::State(orders): natty_runtime::State<Orders>,
    natty_runtime::State(kitchen): natty_runtime::State<Kitchen>,
) {
    let view = |status| OrderView {
        id: order.id.clone(),
        item: order.item.clone(),
        quantity: order.quantity,
        sequence: ctx.stream_sequence(),
        status,
    };
    orders.record(view(Status::Preparing));
    tokio::time::sleep(kitchen.prep_time).await;
    orders.record(view(Status::Ready));
    println!("order {} ready (seq {})", order.id, ctx.stream_sequence());
}

/// The router's state: what each HTTP handler takes is found in it by [`FromRef`].
#[derive(Clone)]
struct Web {
    orders: Orders,
    nats: Connection,
}

impl FromRef<Web> for Orders {
    fn from_ref(web: &Web) -> Orders {
        web.orders.clone()
    }
}

impl FromRef<Web> for Connection {
    fn from_ref(web: &Web) -> Connection {
        web.nats.clone()
    }
}

fn router(web: Web) -> Router {
    Router::new()
        .route("/orders", post(place))
        .route("/orders/{id}", get(show))
        .with_state(web)
}

/// What `POST /orders` answers once the stream has stored the order.
#[derive(Serialize)]
struct Accepted {
    id: String,
    stream: String,
    sequence: u64,
    /// The same id was posted before (within the stream's duplicate window): stored once.
    duplicate: bool,
}

/// `POST /orders`: a body that is not an order is refused by axum's `Json` (400 or 422) before
/// this runs.
async fn place(extract::State(nats): extract::State<Connection>, Json(order): Json<OrderReceived>) -> Response {
    // The order id is the idempotency key: a client retrying after a lost answer stores it once.
    let options = Publish::new().id(format!("order-{}", order.id));
    match nats.emit_with(&order, options).await {
        Ok(ack) => (
            StatusCode::ACCEPTED,
            Json(Accepted {
                id: order.id,
                stream: ack.stream,
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
        )
            .into_response(),
        Err(error) => {
            let status = match &error {
                // An id that cannot be a subject token: the client's mistake.
                PublishError::InvalidSubjectField { .. } | PublishError::InvalidSubject { .. } => {
                    StatusCode::BAD_REQUEST
                }
                // No stream yet (natty is still provisioning) or no ack: worth retrying.
                PublishError::NoStream { .. } | PublishError::Unconfirmed { .. } | PublishError::Publish { .. } => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            tracing::warn!(order = order.id, %status, error = %error, "order not accepted");
            (status, error.to_string()).into_response()
        }
    }
}

/// `GET /orders/{id}`: what the kitchen consumer recorded, or 404 before it has the order.
async fn show(extract::State(orders): extract::State<Orders>, Path(id): Path<String>) -> Response {
    match orders.get(&id) {
        Some(view) => Json(view).into_response(),
        None => (StatusCode::NOT_FOUND, format!("no order {id} in the kitchen (yet)")).into_response(),
    }
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::init_logging();
    // First, so that a signal during startup is not lost: both sides then stop at once.
    let shutdown = Shutdown::on_signals()?;
    let orders = Orders::default();
    let runtime = natty_runtime::Runtime::builder()
        .state(orders.clone())
        .state(Kitchen::from_env()?)
        .build()?;
    let drain_timeout = runtime.config().drain_timeout;
    // The HTTP handlers publish through a connection of their own, which outlives the
    // runtime's: a request still in flight when natty has stopped can still be stored.
    let nats = natty_runtime::connect().await?;

    let addr = std::env::var("WEB_ADDR").unwrap_or_else(|_| DEFAULT_ADDR.into());
    let io = |what: String| move |source| Error::Io { what, source };
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .map_err(io(format!("cannot listen on {addr} (WEB_ADDR)")))?;
    let local = listener
        .local_addr()
        .map_err(io(format!("cannot read the address bound for {addr}")))?;
    println!("listening on http://{local}");

    let serve = axum::serve(listener, router(Web { orders, nats }))
        .with_graceful_shutdown(shutdown.wait())
        .into_future();
    let http = async {
        // axum waits for every open request, however slow its client: bound that as natty
        // bounds its handlers.
        let late = async {
            shutdown.wait().await;
            tokio::time::sleep(drain_timeout).await;
        };
        let served = tokio::select! {
            served = serve => served,
            () = late => {
                tracing::warn!(?drain_timeout, "HTTP requests still open after the drain timeout: dropping them");
                Ok(())
            }
        };
        shutdown.trigger();
        tracing::info!("HTTP server stopped");
        served
    };
    let natty = async {
        let ran = runtime.run_until(shutdown.wait()).await;
        shutdown.trigger();
        ran
    };
    let (served, ran) = tokio::join!(http, natty);
    ran?;
    served.map_err(io("the HTTP server failed".into()))
}
