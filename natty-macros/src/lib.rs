//! Attribute macros for [natty](https://docs.rs/natty-runtime).
//!
//! Depend on `natty-runtime`, not on this crate: it re-exports every macro here and provides
//! the types the generated code refers to. Each macro checks what it can at compile time
//! (subjects, durable names, durations, the handler's signature) and points its error at the
//! token at fault; on error it still emits the user's item so IDEs keep working.
//!
//! Every macro takes a `crate = "path"` key, for a user crate that renamed natty-runtime in its
//! Cargo.toml (`natty = { package = "natty-runtime", ... }` then `crate = "natty"`) or reaches it
//! through a re-export, as `#[serde(crate = "...")]` does for serde.

use proc_macro::TokenStream;

mod attr;
mod capture;
mod consumer;
mod declaration;
mod handler;
mod kv_bucket;
mod kv_watch;
mod leader;
mod object_store;
mod payload;
mod schedule;
mod service;
mod stream;
mod subscribe;

/// Declares a JetStream pull consumer whose messages are handled by this `async fn`: durable
/// and shared by every instance when `durable` is given, else ephemeral, one per instance.
///
/// ```ignore
/// #[consumer(stream = "orders", durable = "billing", subject = "orders.created", concurrency = 16)]
/// async fn bill(order: OrderCreated, ctx: Context) -> anyhow::Result<()> { Ok(()) }
/// ```
///
/// Keys: `stream` (required), `durable`, `subject` (a string or a list of filter subjects),
/// `ack_wait`, `max_deliver`, `max_ack_pending`, `replicas` (of the consumer's state; default:
/// the stream's), `concurrency`, `prefetch`, `backoff` (a list of
/// durations: the delay before each redelivery after an error), `dead_letter` (a subject),
/// `deliver` / `start_sequence` / `start_time` (where to start), `inactive_threshold` (ephemeral only),
/// `ack` (`"sent"`, the default, or `"confirmed"`: wait until the server confirms each ack),
/// `order_by`, `while_leading`, `batch` / `batch_wait`.
/// Arguments: at most one payload (any `serde::Deserialize` type, JSON) and a `Context`.
/// `Ok` or `()` acks; `Err(Reject::...)` naks now, naks after a delay, or terminates; any other
/// error retries with the backoff; after `max_deliver`, the message goes to the dead-letter subject.
#[proc_macro_attribute]
pub fn consumer(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    consumer::expand(args.into(), item.into()).into()
}

/// Handles core-NATS messages on `subject` (wildcards allowed): at-most-once publish-subscribe.
///
/// ```ignore
/// #[subscribe(subject = "prices.>", queue = "pricing", concurrency = 4)]
/// async fn on_price(price: Price, envelope: Envelope) { /* ... */ }
/// ```
///
/// Keys: `subject` (required), `queue` (a queue group: each message to one member),
/// `concurrency`. Arguments: one payload and optionally an `Envelope`. Errors are logged;
/// nothing is redelivered (use `#[consumer]` for that).
#[proc_macro_attribute]
pub fn subscribe(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    subscribe::expand(args.into(), item.into()).into()
}

/// Answers requests on `subject`: the handler's `Ok` value is the JSON reply, its `Err` reaches
/// the requester as `RequestError::Remote`. Instances share a queue group (the subject, unless
/// `queue` is given), so each request is answered once; with `queue = false` every instance
/// answers, and `Client::request_many` gathers the replies.
///
/// ```ignore
/// #[service(subject = "orders.lookup")]
/// async fn lookup(query: Lookup) -> anyhow::Result<Order> { /* ... */ }
/// ```
///
/// Keys: `subject` (required), `queue` (a group name, or `false`), `concurrency`.
#[proc_macro_attribute]
pub fn service(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    service::expand(args.into(), item.into()).into()
}

/// Calls this `async fn` on each change of a KV key, in revision order.
///
/// ```ignore
/// #[kv_watch(bucket = "config", key = "features.>", history = true)]
/// async fn on_feature(change: KvChange<Feature>) { /* ... */ }
/// ```
///
/// Keys: `bucket` (required), `key` (wildcards allowed; default every key), `history` (start with
/// the current values; default only later changes). The handler takes one `KvChange<T>`.
#[proc_macro_attribute]
pub fn kv_watch(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    kv_watch::expand(args.into(), item.into()).into()
}

/// Declares a JetStream stream that `natty_runtime::run()` provisions (or verifies).
///
/// ```ignore
/// #[stream(name = "orders", subjects = ["orders.>"], max_age = "30d", duplicate_window = "2m")]
/// struct Orders;
/// ```
///
/// Keys: `name` and `subjects` (required), `retention` (`"limits"`, `"interest"`, `"workqueue"`),
/// `max_age`, `max_bytes`, `max_messages`, `storage` (`"file"`, `"memory"`), `replicas`,
/// `cluster` and `tags` (placement: the cluster, and server tags every replica's server must
/// have), `duplicate_window`, `description`, `counters` (every subject a counter: see
/// `natty_runtime::Counter`; nats-server 2.12), `atomic_publish` (takes atomic batches: see
/// `natty_runtime::AtomicBatch`; 2.12), `schedules` (holds messages the server publishes
/// later: delayed publishes and `#[schedule]`s, which set it on their stream themselves; 2.12).
#[proc_macro_attribute]
pub fn stream(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    stream::expand(args.into(), item.into()).into()
}

/// Gives a message type its subject and wire format, so that `client.emit(&value)` needs no
/// subject and consumers check the format of what they receive.
///
/// ```ignore
/// #[derive(Serialize, Deserialize, Payload)]
/// #[payload(subject = "orders.{store}.created")]
/// struct OrderCreated { store: String, total_cents: u64 }
///
/// #[derive(Clone, PartialEq, prost::Message, Payload)]
/// #[payload(subject = "billing.invoiced", format = "protobuf")]
/// struct Invoiced { #[prost(string, tag = "1")] order_id: String }
/// ```
///
/// Keys: `subject` (placeholders `{field}` are whole tokens, formatted with `Display`; required
/// for JSON), `format` (`"json"`, the default, through serde; `"protobuf"` through prost).
#[proc_macro_derive(Payload, attributes(payload))]
pub fn derive_payload(input: TokenStream) -> TokenStream {
    attr::start_expansion();
    payload::expand(input.into()).into()
}

/// Declares a KV bucket that `natty_runtime::run()` provisions (or verifies).
///
/// ```ignore
/// #[kv_bucket(name = "config", history = 5, ttl = "1h")]
/// struct ConfigBucket;
/// ```
///
/// Keys: `name` (required), `history`, `ttl`, `replicas`, `cluster` and `tags` (placement),
/// `max_value_size`, `max_bytes`, `storage`, `description`.
#[proc_macro_attribute]
pub fn kv_bucket(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    kv_bucket::expand(args.into(), item.into()).into()
}

/// Declares an object store that `natty_runtime::run()` provisions (or verifies).
///
/// ```ignore
/// #[object_store(name = "reports")]
/// struct Reports;
/// ```
///
/// Keys: `name` (required), `replicas`, `cluster` and `tags` (placement), `max_bytes`,
/// `storage`, `ttl`, `description`.
#[proc_macro_attribute]
pub fn object_store(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    object_store::expand(args.into(), item.into()).into()
}

/// Has the server publish what this function returns to `subject` on a cron expression or at
/// an interval (nats-server 2.12; `time_zone` 2.14). Stored in the stream at start (again only
/// when the declaration changes), so it fires whether or not the service runs.
///
/// ```ignore
/// #[schedule(stream = "reports", subject = "reports.daily", cron = "0 0 6 * * *", time_zone = "Europe/Prague")]
/// fn daily() -> ReportRequest { ReportRequest { period: "day".into() } }
///
/// #[schedule(stream = "reports", subject = "reports.tick", every = "5m")]
/// fn tick() -> &'static str { "tick" }
/// ```
///
/// Keys: `stream`, `subject` (required); `cron` (six fields, seconds first, or `@hourly`,
/// `@daily`, …) or `every` (at least `1s`); `time_zone` (an IANA name, with `cron` only).
#[proc_macro_attribute]
pub fn schedule(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    schedule::expand(args.into(), item.into()).into()
}

/// Runs this `async fn` in exactly one instance at a time, across every process of the service.
///
/// ```ignore
/// #[leader(bucket = "election", key = "scheduler", ttl = "10s")]
/// async fn scheduler(lease: Lease) -> anyhow::Result<()> { /* ... */ }
/// ```
#[proc_macro_attribute]
pub fn leader(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    leader::expand(args.into(), item.into()).into()
}

/// Captures a stream into files: `fn key(record: &Payload) -> Key` is called for each decoded
/// message, and the message is written into the block of its key and time window; blocks are
/// stored (a local folder, S3 or Azure Blob storage) and their messages acked after the store.
///
/// ```ignore
/// #[capture(stream = "orders", durable = "backup", every = "15m", format = "parquet",
///           compression = "zstd", store = "s3://orders-backup/{key}/{date}/")]
/// fn backup(order: &OrderCreated) -> String { order.region.clone() }
/// ```
///
/// Keys: `stream`, `durable`, `store` (required); `subject`, `format` (`"csv"`, `"ndjson"`
/// (default), `"parquet"`, `"raw"`), `compression` (`"none"`, `"gzip"`, `"zstd"`), `every`
/// (window, default `"1m"`), `max_messages`, `max_bytes`, `ack_wait`, `max_ack_pending`,
/// `max_deliver`, `dead_letter`, `store_concurrency`, `max_memory` (default `"256MiB"`). Needs
/// natty-runtime's `capture` feature.
#[proc_macro_attribute]
pub fn capture(args: TokenStream, item: TokenStream) -> TokenStream {
    attr::start_expansion();
    capture::expand(args.into(), item.into()).into()
}
