//! natty: write NATS JetStream services by annotating plain async functions.
//!
//! ```ignore
//! use natty_runtime::prelude::*;
//!
//! #[stream(name = "tickets", subjects = ["tickets.>"])]
//! struct Tickets;
//!
//! #[derive(serde::Deserialize)]
//! struct TicketCreated { id: String, title: String, price: u32 }
//!
//! #[consumer(stream = "tickets", durable = "orders", subject = "tickets.created", concurrency = 8)]
//! async fn on_ticket(ticket: TicketCreated, ctx: Context) -> anyhow::Result<()> {
//!     tracing::info!(id = %ticket.id, seq = ctx.stream_sequence(), "ticket created");
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> natty_runtime::Result<()> {
//!     natty_runtime::run().await
//! }
//! ```
//!
//! [`run`] reads its settings from the environment (see [`config`]), connects (or starts a
//! development server when `NATS_URL` is unset), provisions the declared streams and durable
//! consumers, runs every handler, and drains on SIGINT/SIGTERM: it stops pulling, lets
//! in-flight handlers finish within the drain timeout, naks what did not, flushes, and returns.
//!
//! Delivery is at-least-once: a message is acked only after its handler returned `Ok`; an
//! error naks it for redelivery; a payload that cannot be decoded is terminated and logged.
//!
//! Start with [the guide](guide): its chapters, read in order, cover every handler kind,
//! configuration, observability, running on a cluster, the guarantees and testing.

mod args;
mod asyncapi;
#[cfg(feature = "capture")]
pub mod capture;
mod classify;
mod cli;
mod client;
pub mod config;
mod connect;
mod console;
pub mod consumer;
mod counter;
pub mod dead_letters;
mod dev_server;
mod error;
mod format;
/// The guide: how to write, run, operate and test a natty service, in chapters read in order.
pub mod guide;
mod handler;
pub mod kv;
mod kv_bucket;
pub mod kv_watch;
pub mod leader;
pub mod object_store;
mod operate;
pub mod partition;
pub mod payload;
pub mod publish;
mod puller;
mod registry;
mod runtime;
pub mod schedule;
mod schema;
pub mod service;
mod state;
pub mod stream;
pub mod subscribe;
mod supervise;
mod telemetry;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::{connect, Connection};
pub use config::{Auth, Config, ConsoleToken, LogFormat, Provision, Tls};
pub use consumer::{Ack, AckError, Batch, ConsumerDef, Deliver, KeyFn, OrderBy};
pub use counter::{Counter, CounterError};
pub use dev_server::find_nats_server;
pub use error::{BoxError, Declared, Drift, Error, Result};
pub use handler::{Context, FromDelivery, IntoOutcome, Reject};
pub use kv::{Kv, KvBucketDef, KvChanges, KvEntry, KvError};
pub use kv_watch::{KvChange, KvOperation, KvWatchDef};
pub use leader::{FencedError, LeaderDef, Lease};
pub use natty_macros::Payload;
pub use natty_macros::{
    capture, consumer, kv_bucket, kv_watch, leader, object_store, schedule, service, stream, subscribe,
};
pub use object_store::{ObjectStore, ObjectStoreDef, ObjectStoreError};
pub use payload::{DecodeError, DecodePayload, EncodePayload, Format, Payload};
pub use publish::{
    AtomicBatch, AtomicBatchAck, AtomicBatchError, Client, PendingAck, Publish, PublishAck, PublishError, MAX_BATCH,
};
pub use runtime::{Runtime, RuntimeBuilder, Shutdown};
pub use schedule::{ScheduleDef, Spec};
pub use service::{EndedBy, Replies, RequestError, RequestMany};
pub use state::State;
pub use stream::{Location, Placement, StreamDef};
pub use subscribe::{Envelope, SubscriptionDef};

/// Re-exports of async-nats, for settings natty passes through.
pub use async_nats;

/// What a service needs in scope: the macros, [`Context`] and [`Client`].
pub mod prelude {
    pub use crate::{
        capture, consumer, kv_bucket, kv_watch, leader, object_store, schedule, service, stream, subscribe, Batch,
        Client, Context, Envelope, KvChange, Lease, Payload, Publish, Reject, State,
    };
}

/// Runs every registered handler with settings from the environment, until SIGINT or SIGTERM;
/// or answers the command line: `--list`, `--check`, `--asyncapi`, `--help`.
///
/// Sets up logging (see [`init_logging`]) unless the program installed its own `tracing`
/// subscriber. A program with arguments of its own uses [`Runtime::builder`] instead; one whose
/// handlers take application state, [`run_with`].
///
/// # Errors
///
/// See [`Runtime::run`]; [`Error::Usage`] for an argument it does not know;
/// [`Error::CheckFailed`] when `--check` finds a difference.
pub async fn run() -> Result<()> {
    serve(Runtime::builder()).await
}

/// [`run`], with `state` for the handlers that take it as [`State<T>`](State). For values of
/// several types, call [`state`](RuntimeBuilder::state) once per type on [`Runtime::builder`].
///
/// # Errors
///
/// As [`run`]; [`Error::MissingState`] when a handler takes a state of another type.
pub async fn run_with<T: Clone + Send + Sync + 'static>(state: T) -> Result<()> {
    serve(Runtime::builder().state(state)).await
}

/// What [`run`] and [`run_with`] do with their builder: the command line, logging, the run.
async fn serve(builder: RuntimeBuilder) -> Result<()> {
    use cli::Command;
    let command = Command::parse(std::env::args_os().skip(1))?;
    if command == Command::Help {
        print!("{}", cli::help());
        return Ok(());
    }
    init_logging();
    let runtime = builder.build()?;
    let result = match command {
        Command::Run | Command::Help => runtime.run().await,
        Command::List => {
            print!("{}", runtime.list());
            Ok(())
        }
        Command::Check => runtime.check().await,
        Command::DeadLetters(action, filter, _all) => cli::dead_letters(runtime.config(), action, &filter).await,
        Command::Consumer(action) => cli::consumer(runtime.config(), &runtime.declared, &action).await,
        Command::AsyncApi => {
            println!("{:#}", runtime.asyncapi());
            Ok(())
        }
    };
    telemetry::logging::shutdown();
    result
}

/// Installs a `tracing` subscriber; does nothing if the program installed its own.
///
/// - Lines go to stderr, human-readable, or one JSON object per line with
///   `NATTY_LOG_FORMAT=json`; `RUST_LOG` filters them (default: `info`, with async-nats at
///   `warn` since natty logs connection events itself). A line a handler logs shows its
///   delivery: handler, stream, consumer, subject, sequence, delivery count and trace id.
/// - W3C trace context travels in message headers either way: a delivery continues the trace
///   its message carries, a publish inside it carries a child of that trace, a publish outside
///   any delivery starts one.
/// - With no exporter configured, no OpenTelemetry SDK runs and no span is made per message:
///   the delivery's fields and trace context live in a task-local for the handler's run.
/// - With natty-runtime's `otlp` feature and `OTEL_EXPORTER_OTLP_ENDPOINT` (or
///   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, every delivery and publish is a span
///   (`tracing-opentelemetry`), exported over OTLP/HTTP; the other standard `OTEL_*` variables
///   apply (`OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_EXPORTER=none`, and
///   `OTEL_TRACES_SAMPLER`/`OTEL_TRACES_SAMPLER_ARG`, `parentbased_always_on` by default).
///
/// A program that sets up its own subscriber keeps it, and natty makes its spans for it; to
/// carry trace context in them it adds `tracing_opentelemetry::layer()` with a tracer of its
/// choice (without one, publishes still carry the delivery's trace context).
pub fn init_logging() {
    telemetry::logging::init();
}

/// What `#[capture]` generates goes through here: as it is with the `capture` feature, and
/// as a compile error that says to enable it without.
#[doc(hidden)]
#[cfg(feature = "capture")]
#[macro_export]
macro_rules! __natty_capture {
    ($($generated:tt)*) => { $($generated)* };
}

/// What `#[capture]` generates goes through here: as it is with the `capture` feature, and
/// as a compile error that says to enable it without.
#[doc(hidden)]
#[cfg(not(feature = "capture"))]
#[macro_export]
macro_rules! __natty_capture {
    ($($generated:tt)*) => {
        ::core::compile_error!(
            "#[capture] needs natty-runtime's `capture` feature: \
             natty-runtime = { version = \"...\", features = [\"capture\"] } in Cargo.toml"
        );
    };
}

/// Used by the code the macros generate. Not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::args::{
        arg, ArgState, ArgStateless, AtMostOne, HandlerArg, HoldsPayload, KeyArg, KeyTakes, OneMore, Probe,
        TwoPayloads, ViaParts, ViaPayload,
    };
    pub use crate::asyncapi::{
        ArgBatchItems, ArgDecoded, ArgKvValue, ArgOther, DescribeDecodedBody, DescribeDecodedReply,
        DescribeEncodedBody, DescribeEncodedReply, DescribeUnknownBody, DescribeUnknownReply,
    };
    #[cfg(feature = "capture")]
    pub use crate::capture;
    pub use crate::consumer::{
        batch_only, hash_key, Ack, BatchDelivery, BatchHandlerFn, ConsumerDef, Deliver, HandlerFn, OrderBy,
    };
    pub use crate::error::BoxError;
    pub use crate::handler::CoreOutcome;
    pub use crate::handler::{Delivery, FromDelivery, IntoOutcome, Outcome};
    pub use crate::kv::KvBucketDef;
    pub use crate::kv_watch::{KvDelivery, KvHandlerFn, KvWatchDef};
    pub use crate::leader::{FromLease, LeaderDef, LeaderFn, Lease};
    pub use crate::object_store::ObjectStoreDef;
    pub use crate::payload::decode;
    pub use crate::payload::{
        describe_payload, subject_token, DecodePayload, EncodePayload, Format, Payload, PayloadDescription,
    };
    pub use crate::publish::PublishError;
    pub use crate::schedule::{body as schedule_body, ScheduleDef, Spec};
    pub use crate::schema::protobuf as protobuf_schema;
    pub use crate::service::IntoReply;
    pub use crate::state::{Need, NeedFn};
    pub use crate::stream::{Location, Placement, StreamDef};
    pub use crate::subscribe::{CoreDelivery, CoreHandlerFn, FromCoreDelivery, SubscriptionDef};
    pub use async_nats::jetstream::stream::{RetentionPolicy as Retention, StorageType};
    pub use async_nats::HeaderMap;
    pub use bytes::Bytes;
    pub use futures_util::future::BoxFuture;
    pub use inventory;
    pub use prost;
    pub use serde_json::Value as JsonValue;
}
