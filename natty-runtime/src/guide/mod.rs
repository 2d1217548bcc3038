//! Each chapter is a page of documentation with no code of its own; every Rust example in
//! it is compiled as a doc test, so what you read here builds against this version of natty.
//! Examples marked `no_run` need a NATS server to do anything; they compile all the same.
//!
//! 1. [Getting started](crate::guide::getting_started): a first service, the development server, the two
//!    ways to run it, application state.
//! 2. [Consumers](crate::guide::consumers): `#[consumer]`, acks, retries and backoff, [`Reject`](crate::Reject),
//!    dead letters, ordering lanes, concurrency and prefetch, consumers bound to leadership.
//! 3. [Payloads](crate::guide::payloads): JSON through serde, Protobuf through prost, subjects built from
//!    fields, headers, and what a handler may take.
//! 4. [Publishing](crate::guide::publishing): awaited publishes, idempotency keys, optimistic concurrency,
//!    windowed sends, and what the errors mean.
//! 5. [Streams and provisioning](crate::guide::streams): `#[stream]`, `NATTY_PROVISION`, drift, and
//!    declaring everything by hand.
//! 6. [Leaders](crate::guide::leaders): `#[leader]`, leases, fencing tokens, and why a paused leader never
//!    acts twice.
//! 7. [KV buckets and object stores](crate::guide::kv_and_objects): `#[kv_bucket]`, typed [`Kv`](crate::Kv),
//!    `#[kv_watch]`, `#[object_store]`.
//! 8. [Core NATS](crate::guide::core_nats): `#[subscribe]`, `#[service]` and typed requests.
//! 9. [Capture](crate::guide::capture): streams into files (CSV, NDJSON, Parquet, raw; gzip, zstd) in a
//!    folder, S3 or Azure, exactly once.
//! 10. [Configuration](crate::guide::configuration): every setting in one table.
//! 11. [Observability](crate::guide::observability): logs, W3C trace context, OTLP, metrics, health.
//! 12. [Running on a cluster](crate::guide::cluster): three servers, replicas, placement, what an ack means,
//!     what holds through faults.
//! 13. [Shutdown and guarantees](crate::guide::guarantees): the drain, at-least-once, and the known limits.
//! 14. [The command line](crate::guide::command_line): `--list`, `--check`, `--asyncapi`.
//! 15. [Testing](crate::guide::testing): real servers in tests with `natty_runtime::testing`.
//! 16. [The operator console](crate::guide::console): the page every service serves, the fleet it
//!     shows, its JSON API, its token, and replaying, deleting and pausing from it.
//!
//! For how natty is built inside, read `ARCHITECTURE.md` in the repository; for runnable
//! services, its `examples/` folder.

#[doc = include_str!("getting_started.md")]
pub mod getting_started {}

#[doc = include_str!("consumers.md")]
pub mod consumers {}

#[doc = include_str!("payloads.md")]
pub mod payloads {}

#[doc = include_str!("publishing.md")]
pub mod publishing {}

#[doc = include_str!("streams.md")]
pub mod streams {}

#[doc = include_str!("leaders.md")]
pub mod leaders {}

#[doc = include_str!("kv_and_objects.md")]
pub mod kv_and_objects {}

#[doc = include_str!("core_nats.md")]
pub mod core_nats {}

#[cfg_attr(feature = "capture", doc = include_str!("capture.md"))]
#[cfg_attr(
    not(feature = "capture"),
    doc = "# Capture\n\nThis chapter needs natty-runtime's `capture` feature: build the docs with `--features capture`."
)]
pub mod capture {}

#[doc = include_str!("configuration.md")]
pub mod configuration {}

#[doc = include_str!("observability.md")]
pub mod observability {}

#[doc = include_str!("cluster.md")]
pub mod cluster {}

#[doc = include_str!("guarantees.md")]
pub mod guarantees {}

#[doc = include_str!("command_line.md")]
pub mod command_line {}

#[cfg_attr(feature = "testing", doc = include_str!("testing.md"))]
#[cfg_attr(
    not(feature = "testing"),
    doc = "# Testing\n\nThis chapter needs natty-runtime's `testing` feature: build the docs with `--features testing`."
)]
pub mod testing {}

/// The README's example, compiled with the guide's.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct Readme;

#[doc = include_str!("console.md")]
pub mod console {}
