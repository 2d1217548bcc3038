//! Capture: decode each message of a durable consumer, split it by a key, write it into a
//! block per (key, time window), store the block, and ack its messages only after the store
//! succeeded. `#[capture(...)]` registers a [`CaptureDef`]; the runtime runs it.
//!
//! # What holds
//!
//! - **Acked after stored.** A message is acked only once the block holding it is stored. While a
//!   store fails, it is retried with backoff and the block's messages are kept alive with
//!   in-progress acks: nothing is acked early, nothing is dropped.
//! - **Blocks.** A message belongs to the window its stream timestamp falls in (`every`, aligned
//!   to the Unix epoch), so redelivered messages go back to the window they came from. A block
//!   closes when it reaches `max_messages` or `max_bytes` (payload bytes), when a message from a
//!   later window arrives, or when its window is over (plus a grace period) and the consumer is
//!   caught up or idle.
//! - **Names.** A block is named `<stream>-<stream created>-<first sequence>-<last
//!   sequence>.<extension>` under its rendered path template (see
//!   [`store::incarnation_block_file_name`]), so a block rebuilt from the same messages
//!   overwrites itself, and a stream deleted and created again (its sequences start at 1 again)
//!   never overwrites the blocks of the old one. A block is never visible half written (see
//!   [`BlockStore::put`]).
//! - **Stored once, whatever the crash.** Before a block is written, a manifest of its exact
//!   sequences is (see the `ledger` module). A message delivered again that a visible block
//!   holds is acked, not written again: a crash between a block's store and its acks leaves no
//!   duplicate. Held and stored messages are keyed by (stream incarnation, sequence).
//! - **A message's own failures stay its own.** A payload that cannot be decoded, a key function
//!   that panics, or a key the path template cannot take (a struct key without a field the
//!   template names) dead-letters that message with the reason; the capture goes on.
//! - **Acks are explicit, one per message.** `AckPolicy::All` would be faster, but its ack of a
//!   sequence also acks every earlier message of the consumer: those of other keys' blocks still
//!   open here, those another instance holds, and those waiting for redelivery after a crash.
//! - **Drain.** On shutdown, open blocks are closed and stored within
//!   [`Config::capture_drain_timeout`](crate::Config::capture_drain_timeout), a deadline of its
//!   own; what is not stored by then stays unacked and is redelivered to the next run.
//! - **Dead letters** are terminated like a consumer's; they never hold up their block.
//! - **Memory is bounded** by [`CaptureDef::max_memory`] (see the `memory` module): near it the
//!   biggest open block closes early; at it the capture stops pulling, so messages wait on the
//!   server, not in memory, while stores fail. One task per capture sends every in-progress ack.

pub mod format;
mod keep_alive;
mod ledger;
mod memory;
pub mod store;

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::consumer::pull;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Provision;
use crate::consumer::{Consumer, ConsumerDef, Original, Settle};
use crate::error::{BoxError, Error, Result};
use crate::handler::{Delivery, Outcome};
use crate::publish::Client;
use crate::puller::{delivery_meta, Pulled, Puller};
use crate::stream::{Location, StreamDef};
use crate::telemetry::CaptureMetrics;
use keep_alive::KeepAlive;
use ledger::Ledger;
use memory::{Charge, Remembered, Usage, PER_MESSAGE, REMEMBERED_PER_MESSAGE};

pub use format::{BlockFormat, BlockWriter, Compression, FormatError, WriterFactory};
pub use memory::DEFAULT_MAX_MEMORY;
pub use store::{BlockStore, PathVars, StoreError};

/// Default block age.
const DEFAULT_EVERY: Duration = Duration::from_secs(60);
/// Default most messages per block.
const DEFAULT_MAX_MESSAGES: u64 = 100_000;
/// Default most payload bytes per block.
const DEFAULT_MAX_BYTES: u64 = 64 << 20;
/// Default `max_ack_pending` of a capture's consumer: room for a few full blocks, since every
/// message of an open block is unacked.
const DEFAULT_MAX_ACK_PENDING: i64 = 250_000;
/// Default number of blocks stored at once.
const DEFAULT_STORE_CONCURRENCY: usize = 4;
/// The shortest `ack_wait` with which blocks can be kept alive: in-progress acks go out every
/// half `ack_wait`, for every held message.
const MIN_ACK_WAIT: Duration = Duration::from_secs(1);
/// Most messages asked of the server at once.
const MAX_CREDITS: usize = 1000;
/// First and largest delay between attempts to store a block.
const STORE_RETRY_FIRST: Duration = Duration::from_millis(200);
const STORE_RETRY_MAX: Duration = Duration::from_secs(15);

/// Decodes a message's payload and computes its split key (generated by `#[capture]`).
pub type DecodeFn = fn(Option<&HeaderMap>, &[u8]) -> std::result::Result<Captured, BoxError>;
/// Builds the block writers for the capture's payload type (generated by `#[capture]`).
pub type WritersFn = fn(BlockFormat, Compression) -> std::result::Result<WriterFactory, FormatError>;

/// A declared capture. `#[capture(...)]` registers one; [`CaptureDef::new`] builds one by hand.
#[derive(Clone, Copy)]
pub struct CaptureDef {
    pub(crate) name: &'static str,
    pub(crate) stream: &'static str,
    pub(crate) durable: &'static str,
    pub(crate) subjects: &'static [&'static str],
    pub(crate) store: &'static str,
    pub(crate) every: Duration,
    pub(crate) max_bytes: u64,
    pub(crate) max_messages: u64,
    pub(crate) format: BlockFormat,
    pub(crate) compression: Compression,
    pub(crate) ack_wait: Option<Duration>,
    pub(crate) max_ack_pending: i64,
    pub(crate) max_deliver: Option<i64>,
    pub(crate) dead_letter: Option<&'static str>,
    pub(crate) store_concurrency: usize,
    pub(crate) max_memory: u64,
    pub(crate) decode: DecodeFn,
    pub(crate) writers: WritersFn,
    pub(crate) location: Location,
    pub(crate) payload: crate::payload::PayloadSource,
}

impl std::fmt::Debug for CaptureDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureDef")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("store", &self.store)
            .field("format", &self.format)
            .field("compression", &self.compression)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl CaptureDef {
    /// A capture named `name` reading `stream` through the durable consumer `durable`, storing
    /// blocks at `store` (a URL with a path template, see [`BlockStore::open`]). `decode` turns
    /// a message into its record and key; `writers` makes the block writers for the record type.
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        name: &'static str,
        stream: &'static str,
        durable: &'static str,
        store: &'static str,
        decode: DecodeFn,
        writers: WritersFn,
    ) -> Self {
        CaptureDef {
            name,
            stream,
            durable,
            subjects: &[],
            store,
            every: DEFAULT_EVERY,
            max_bytes: DEFAULT_MAX_BYTES,
            max_messages: DEFAULT_MAX_MESSAGES,
            format: BlockFormat::Ndjson,
            compression: Compression::None,
            ack_wait: None,
            max_ack_pending: DEFAULT_MAX_ACK_PENDING,
            max_deliver: None,
            dead_letter: None,
            store_concurrency: DEFAULT_STORE_CONCURRENCY,
            max_memory: DEFAULT_MAX_MEMORY,
            decode,
            writers,
            location: Location::UNKNOWN,
            payload: crate::payload::PayloadSource::Unknown,
        }
    }

    /// Filter subjects; none means every subject of the stream.
    pub const fn subjects(mut self, subjects: &'static [&'static str]) -> Self {
        self.subjects = subjects;
        self
    }

    /// The length of a block's time window (default 1 minute).
    pub const fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }

    /// Closes a block once its payloads add up to this many bytes (default 64 MiB).
    pub const fn max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = if max_bytes == 0 { 1 } else { max_bytes };
        self
    }

    /// Closes a block once it holds this many messages (default 100,000).
    pub const fn max_messages(mut self, max_messages: u64) -> Self {
        self.max_messages = if max_messages == 0 { 1 } else { max_messages };
        self
    }

    /// The block format (default NDJSON).
    pub const fn format(mut self, format: BlockFormat) -> Self {
        self.format = format;
        self
    }

    /// The block compression (default none).
    pub const fn compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// The consumer's `ack_wait` (server default 30 s): how soon messages of a block lost in a
    /// crash are redelivered. Held messages are kept alive meanwhile, so it does not bound a
    /// block's age.
    pub const fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = Some(ack_wait);
        self
    }

    /// The consumer's `max_ack_pending` (default 250,000): every message of an open or storing
    /// block counts against it.
    pub const fn max_ack_pending(mut self, max_ack_pending: i64) -> Self {
        self.max_ack_pending = max_ack_pending;
        self
    }

    /// The consumer's `max_deliver`.
    pub const fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = Some(max_deliver);
        self
    }

    /// Where undecodable messages go (default `natty.dead.<stream>.<durable>`).
    pub const fn dead_letter(mut self, subject: &'static str) -> Self {
        self.dead_letter = Some(subject);
        self
    }

    /// How many blocks are stored at once (default 4), so one slow upload does not stall the rest.
    pub const fn store_concurrency(mut self, concurrency: usize) -> Self {
        self.store_concurrency = if concurrency == 0 { 1 } else { concurrency };
        self
    }

    /// The capture's memory budget, in bytes (default [`DEFAULT_MAX_MEMORY`], 256 MiB): what its
    /// open blocks, its blocks waiting to be stored and its memory of recently stored blocks may
    /// hold. Near it, the biggest open block is closed early; at it, the capture stops pulling
    /// (messages wait on the server) until stores make room, so a store outage costs no more.
    /// Give it room for a few blocks of `max_bytes`, or blocks close smaller than declared.
    pub const fn max_memory(mut self, bytes: u64) -> Self {
        self.max_memory = if bytes == 0 { 1 } else { bytes };
        self
    }

    /// Records where the declaration was written (the macro sets this).
    pub const fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// Records the record type the capture decodes, for the AsyncAPI document
    /// ([`Runtime::asyncapi`](crate::Runtime::asyncapi)); the macro sets it. By hand:
    /// `.payload(natty_runtime::__private::describe_payload::<MyRecord>)`.
    pub const fn payload(mut self, describe: fn() -> crate::payload::PayloadDescription) -> Self {
        self.payload = crate::payload::PayloadSource::Given(describe);
        self
    }

    /// What generated code registers: a function describing the records' type, when natty
    /// can decode it.
    #[doc(hidden)]
    pub const fn payload_probe(mut self, describe: fn() -> Option<crate::payload::PayloadDescription>) -> Self {
        self.payload = crate::payload::PayloadSource::Probed(describe);
        self
    }

    /// The capture's name (its function's name).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The stream it reads.
    pub fn stream(&self) -> &'static str {
        self.stream
    }

    /// Its durable consumer.
    pub fn durable(&self) -> &'static str {
        self.durable
    }

    /// Its store URL and path template, as declared.
    pub fn store(&self) -> &'static str {
        self.store
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The consumer behind the capture: explicit acks, the declared limits.
    pub(crate) fn consumer_def(&self) -> ConsumerDef {
        let mut def = ConsumerDef::new(self.name, self.stream, self.durable, never_called)
            .subjects(self.subjects)
            .max_ack_pending(self.max_ack_pending)
            .at(self.location);
        if let Some(ack_wait) = self.ack_wait {
            def = def.ack_wait(ack_wait);
        }
        if let Some(max_deliver) = self.max_deliver {
            def = def.max_deliver(max_deliver);
        }
        if let Some(subject) = self.dead_letter {
            def = def.dead_letter(subject);
        }
        def
    }

    fn error(&self, reason: impl Into<String>) -> Error {
        Error::Capture {
            capture: self.name.into(),
            location: self.location.to_string(),
            reason: reason.into(),
        }
    }
}

inventory::collect!(CaptureDef);

/// A capture's consumer has no handler: the capture pulls and settles its messages itself.
fn never_called(_: Delivery) -> futures_util::future::BoxFuture<'static, Outcome> {
    Box::pin(async { Outcome::Ack })
}

/// A decoded message: its record and its split key.
pub struct Captured {
    record: Box<dyn Any + Send>,
    key: BlockKey,
}

impl Captured {
    /// Pairs a record with its key. The key is anything serde can serialize to a string, a
    /// number, or a struct of those (each field usable in the path template by name).
    ///
    /// # Errors
    ///
    /// A key that is not a scalar or a flat struct of scalars.
    pub fn new<T, K>(record: T, key: &K) -> std::result::Result<Captured, BoxError>
    where
        T: Any + Send,
        K: serde::Serialize + ?Sized,
    {
        Ok(Captured {
            record: Box::new(record),
            key: BlockKey::of(key)?,
        })
    }
}

/// A split key, as (field, value) pairs: a plain key is one pair named `key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey(Vec<(String, String)>);

impl BlockKey {
    fn of<K: serde::Serialize + ?Sized>(key: &K) -> std::result::Result<BlockKey, BoxError> {
        use serde_json::Value;
        let scalar = |value: Value| match value {
            Value::String(text) => Some(text),
            Value::Number(number) => Some(number.to_string()),
            Value::Bool(flag) => Some(flag.to_string()),
            Value::Null => Some(String::new()),
            Value::Array(_) | Value::Object(_) => None,
        };
        match serde_json::to_value(key)? {
            Value::Object(fields) => fields
                .into_iter()
                .map(|(name, value)| match scalar(value) {
                    Some(text) => Ok((name, text)),
                    None => Err(format!("key field `{name}` is not a string, number or bool").into()),
                })
                .collect::<std::result::Result<Vec<_>, BoxError>>()
                .map(BlockKey),
            value => scalar(value)
                .map(|text| BlockKey(vec![("key".into(), text)]))
                .ok_or_else(|| "a capture key must be a string, a number, a bool or a struct of those".into()),
        }
    }
}

/// A capture's counters since the process started: the stats the logs report and metrics export.
#[derive(Debug, Default)]
pub struct CaptureStats {
    /// Blocks stored.
    pub blocks: AtomicU64,
    /// Bytes stored (as written: compressed, framed).
    pub bytes: AtomicU64,
    /// Messages stored and acked.
    pub messages: AtomicU64,
    /// Failed store attempts (each retried).
    pub store_failures: AtomicU64,
    /// Total time of successful stores, in microseconds.
    pub store_micros: AtomicU64,
    /// Messages dead-lettered because they could not be decoded or written.
    pub dead_lettered: AtomicU64,
    /// Messages held in open or storing blocks right now (unacked).
    pub held: AtomicU64,
}

/// The stats of every capture started in this process, by name.
pub fn stats() -> Vec<(&'static str, Arc<CaptureStats>)> {
    STATS.lock().map(|all| all.clone()).unwrap_or_default()
}

static STATS: Mutex<Vec<(&'static str, Arc<CaptureStats>)>> = Mutex::new(Vec::new());

/// What store tasks share with the capture's loop.
struct Shared {
    def: CaptureDef,
    consumer: Consumer,
    nats: async_nats::Client,
    store: BlockStore,
    stats: Arc<CaptureStats>,
    /// The same figures for the metrics endpoint, plus the store latency histogram.
    metrics: CaptureMetrics,
    /// A third of the consumer's `ack_wait`: how often held messages are kept alive, leaving
    /// room for a busy process to send the pings late.
    keep_alive: Duration,
    /// Sends the in-progress acks of every held message: one task for the whole capture.
    pings: Arc<KeepAlive>,
    /// Bytes of sealed and remembered blocks, counted against `def.max_memory`.
    usage: Arc<Usage>,
    /// The messages in open and storing blocks, and those waiting for the ledger. A message
    /// redelivered while its first delivery is still held (a keep-alive came too late) is not
    /// written twice: the first delivery's ack, after its block is stored, settles it.
    held_sequences: Mutex<std::collections::HashSet<MessageId>>,
    /// Stored blocks whose acks the server has not yet been seen to take, with their stream
    /// incarnation and sorted sequences: a redelivery of one of them (the server sent it before
    /// it saw the ack, or the ack was lost in a leader election) is acked again instead of
    /// stored twice. A block is forgotten once the consumer's ack floor has passed its last
    /// sequence, or its incarnation is gone, and the oldest regardless past an eighth of the
    /// memory budget.
    recently_stored: Mutex<Remembered>,
    /// The consumer's ack floor (stream sequence) as last read from the server, in the current
    /// incarnation.
    ack_floor: AtomicU64,
    /// The current incarnation of the stream: its creation time in nanoseconds since the Unix
    /// epoch. A stream deleted and created again, or a memory stream lost in a server restart,
    /// numbers its messages from 1 again; everything keyed by sequence is keyed by this too.
    incarnation: AtomicU64,
    /// Which messages the stored blocks hold, in the store beside them: a message redelivered
    /// after a crash between its block's store and its ack is acked, not written again.
    ledger: Ledger,
    /// Limits how many blocks are being stored at once.
    storing: Semaphore,
    /// Cancelled when the drain deadline passes: stores give up, leaving their messages unacked.
    abandon: CancellationToken,
}

impl Shared {
    /// Marks a message held; false if it already is. The `held` stat follows the set.
    fn hold(&self, id: MessageId) -> bool {
        self.held_sequences
            .lock()
            .map(|mut held| {
                let new = held.insert(id);
                self.stats.held.store(held.len() as u64, Ordering::Relaxed);
                self.metrics.held.set(held.len() as i64);
                new
            })
            .unwrap_or(true)
    }

    /// Remembers a stored block's sequences until the server has taken their acks (see
    /// `recently_stored`).
    fn stored(&self, incarnation: u64, sorted: Vec<u64>) {
        if let Ok(mut recent) = self.recently_stored.lock() {
            recent.push(Instant::now(), incarnation, sorted);
        }
        self.forget_acked();
    }

    /// How long a stored block is remembered after the ack floor passed it (see
    /// `forget_acked`), and how far apart ledger sweeps are.
    fn keep(&self) -> Duration {
        (self.keep_alive * 12).max(Duration::from_secs(30))
    }

    /// Starts a new stream incarnation: the ack floor read so far was the old one's.
    fn set_incarnation(&self, incarnation: u64) {
        let old = self.incarnation.swap(incarnation, Ordering::Relaxed);
        if old != incarnation {
            self.ack_floor.store(0, Ordering::Relaxed);
            if old != 0 {
                tracing::warn!(
                    capture = self.def.name,
                    stream = self.def.stream,
                    old,
                    new = incarnation,
                    "the stream was created anew (its sequences start again): blocks of the new stream get names of their own"
                );
            }
        }
    }

    /// Drops the remembered blocks that are both below the ack floor (their acks were taken)
    /// and old enough: on a cluster, a consumer leader can report acks it had not yet
    /// replicated, and the leader elected when it dies redelivers them an `ack_wait` after the
    /// election. Twelve keep-alives (four `ack_wait`s), and at least 30 s, cover that. Past an
    /// eighth of the memory budget, the oldest go regardless: memory must not grow while the
    /// ack floor cannot be read, or while messages arrive faster than that memory lasts.
    fn forget_acked(&self) {
        let most = (self.def.max_memory / 8 / REMEMBERED_PER_MESSAGE).max(1);
        let keep = self.keep();
        let floor = self.ack_floor.load(Ordering::Relaxed);
        let current = self.incarnation.load(Ordering::Relaxed);
        if let Ok(mut recent) = self.recently_stored.lock() {
            recent.forget_while(most, |at, incarnation, last| {
                at.elapsed() > keep && (incarnation != current || last.is_none_or(|last| last <= floor))
            });
            self.usage
                .remembered
                .store(recent.messages() * REMEMBERED_PER_MESSAGE, Ordering::Relaxed);
        }
    }

    /// Reads the consumer's ack floor from the server every `keep_alive`, until `stop`, and
    /// sweeps the ledger of manifests no redelivery can need any more every `keep`.
    async fn follow_ack_floor(self: Arc<Self>, stop: CancellationToken) {
        let (stream, durable) = (self.def.stream, self.def.durable);
        let js = async_nats::jetstream::new(self.nats.clone());
        let every = self.keep_alive.max(Duration::from_secs(1));
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let incarnation = self.incarnation.load(Ordering::Relaxed);
            let info = js.get_consumer_from_stream::<pull::Config, _, _>(durable, stream);
            let Ok(Ok(consumer)) = tokio::time::timeout(every, info).await else {
                continue;
            };
            // A floor read across a change of incarnation belongs to neither.
            if self.incarnation.load(Ordering::Relaxed) != incarnation {
                continue;
            }
            let floor = consumer.cached_info().ack_floor.stream_sequence;
            self.ack_floor.fetch_max(floor, Ordering::Relaxed);
            self.forget_acked();
            if last_sweep.elapsed() >= self.keep() {
                last_sweep = Instant::now();
                match tokio::time::timeout(self.keep(), self.ledger.sweep(incarnation, floor)).await {
                    Ok(Ok(0)) | Err(_) => {}
                    Ok(Ok(removed)) => {
                        tracing::debug!(
                            capture = self.def.name,
                            removed,
                            "removed manifests of fully acked blocks"
                        )
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(capture = self.def.name, error = %crate::error::chain(&error), "cannot sweep the manifests of acked blocks")
                    }
                }
            }
        }
    }

    /// On stop: waits up to two seconds for the ack floor to pass the blocks stored here (the
    /// server applies acks a moment after taking them), then removes the manifests the floor
    /// has passed, so that a stopped capture leaves only blocks behind. Unlike the sweep, it
    /// does not wait out `keep`: a consumer leader that fails over right after a capture
    /// stops, with acks it had not replicated, can then have them stored twice.
    async fn remove_acked_manifests(&self) {
        const WAIT: Duration = Duration::from_secs(2);
        let incarnation = self.incarnation.load(Ordering::Relaxed);
        let target = self
            .recently_stored
            .lock()
            .map_or(0, |recent| recent.last_in(incarnation));
        let js = async_nats::jetstream::new(self.nats.clone());
        let deadline = Instant::now() + WAIT;
        let mut floor = None;
        loop {
            let info = js.get_consumer_from_stream::<pull::Config, _, _>(self.def.durable, self.def.stream);
            if let Ok(Ok(consumer)) = tokio::time::timeout(WAIT, info).await {
                floor = Some(consumer.cached_info().ack_floor.stream_sequence);
            }
            if floor.is_some_and(|floor| floor >= target) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(floor) = floor else { return };
        match tokio::time::timeout(WAIT, self.ledger.remove_acked(incarnation, floor)).await {
            Ok(Ok(removed)) => tracing::debug!(
                capture = self.def.name,
                removed,
                floor,
                "removed the manifests of acked blocks"
            ),
            Ok(Err(error)) => {
                tracing::warn!(capture = self.def.name, error = %crate::error::chain(&error), "cannot remove the manifests of acked blocks")
            }
            Err(_) => tracing::warn!(
                capture = self.def.name,
                "removing the manifests of acked blocks took too long; left for the next run"
            ),
        }
    }

    /// Whether a message is in a block stored moments ago.
    fn was_stored(&self, id: MessageId) -> bool {
        self.recently_stored.lock().is_ok_and(|recent| recent.contains(id))
    }

    /// Forgets messages whose block was stored or given up.
    fn release(&self, incarnation: u64, sequences: &[u64]) {
        if let Ok(mut held) = self.held_sequences.lock() {
            for sequence in sequences {
                held.remove(&(incarnation, *sequence));
            }
            self.stats.held.store(held.len() as u64, Ordering::Relaxed);
            self.metrics.held.set(held.len() as i64);
        }
    }
}

/// A message's identity across incarnations of its stream: (incarnation, stream sequence).
type MessageId = (u64, u64);

/// Binds the capture's consumer and reads which incarnation of the stream it belongs to.
///
/// The stream is read after the consumer: a consumer older than the stream it was read with
/// belongs to an incarnation deleted in between, and is bound again.
async fn bind(
    def: &CaptureDef,
    consumer: &Consumer,
    nats: &async_nats::Client,
) -> Result<(async_nats::jetstream::consumer::PullConsumer, u64)> {
    let mut attempts = 0;
    loop {
        attempts += 1;
        let bound = consumer.bind().await?;
        let bound_at = bound.cached_info().created.unix_timestamp_nanos();
        let created = stream_created(nats, def.stream)
            .await
            .map_err(|error| def.error(format!("cannot read the stream `{}`: {error}", def.stream)))?;
        if i128::from(created) <= bound_at || attempts >= 5 {
            return Ok((bound, created));
        }
    }
}

/// When the stream was created, in nanoseconds since the Unix epoch: its incarnation.
async fn stream_created(nats: &async_nats::Client, stream: &str) -> std::result::Result<u64, BoxError> {
    let js = async_nats::jetstream::new(nats.clone());
    let stream = js.get_stream(stream).await?;
    let created = stream.cached_info().created.unix_timestamp_nanos();
    Ok(created.clamp(1, i128::from(u64::MAX)) as u64)
}

impl Capture {
    /// The capture's name (its key function's), for logs and readiness.
    pub(crate) fn name(&self) -> &'static str {
        self.shared.def.name
    }
}

/// A running capture.
pub(crate) struct Capture {
    shared: Arc<Shared>,
    writers: WriterFactory,
    extension: &'static str,
    /// Most messages held at once: the consumer's `max_ack_pending`.
    max_held: u64,
    drain_timeout: Duration,
}

impl Capture {
    /// Opens the store, builds the writers, binds the consumer and checks its limits against
    /// the block limits; every problem is an [`Error::Capture`] naming the capture.
    pub(crate) async fn start(
        def: CaptureDef,
        client: Client,
        provision: Provision,
        stream_def: Option<StreamDef>,
        drain_timeout: Duration,
    ) -> Result<Capture> {
        if def.every.is_zero() {
            return Err(def.error("`every` must be longer than zero"));
        }
        let store = BlockStore::open(def.store).map_err(|error| def.error(crate::error::chain(&error).to_string()))?;
        let writers = (def.writers)(def.format, def.compression)
            .map_err(|error| def.error(crate::error::chain(&error).to_string()))?;
        let nats = client.nats().clone();
        let metrics = client.telemetry().metrics.capture(def.name, def.stream);
        let consumer = Consumer::new(def.consumer_def(), client, provision, stream_def);
        let (bound, incarnation) = bind(&def, &consumer, &nats).await?;
        let config = &bound.cached_info().config;
        // Checked against what the server has, which may differ from the declaration when
        // provisioning is off or verify-only.
        let max_ack_pending = if config.max_ack_pending <= 0 {
            u64::MAX
        } else {
            config.max_ack_pending as u64
        };
        if def.max_messages > max_ack_pending {
            return Err(def.error(format!(
                "a block could never fill: max_messages is {} but the consumer `{}` allows only {} unacked messages \
                 (max_ack_pending); lower max_messages or raise max_ack_pending",
                def.max_messages, def.durable, max_ack_pending
            )));
        }
        if config.ack_wait < MIN_ACK_WAIT {
            return Err(def.error(format!(
                "blocks would outlive their acks: the consumer `{}` has ack_wait {:?}, too short to keep every held \
                 message alive with in-progress acks (at least {:?})",
                def.durable, config.ack_wait, MIN_ACK_WAIT
            )));
        }
        if !config.backoff.is_empty() {
            return Err(def.error(format!(
                "the consumer `{}` has a redelivery backoff, which replaces ack_wait and would redeliver held \
                 messages of open blocks; remove it",
                def.durable
            )));
        }
        let swept = store
            .sweep_temporaries()
            .await
            .map_err(|error| def.error(crate::error::chain(&error).to_string()))?;
        if swept > 0 {
            tracing::info!(
                capture = def.name,
                swept,
                "removed temporary files left by an earlier run"
            );
        }
        let stats = Arc::new(CaptureStats::default());
        if let Ok(mut all) = STATS.lock() {
            all.retain(|(name, _)| *name != def.name);
            all.push((def.name, stats.clone()));
        }
        Ok(Capture {
            shared: Arc::new(Shared {
                def,
                consumer,
                nats,
                stats,
                metrics,
                keep_alive: config.ack_wait / 3,
                pings: Arc::new(KeepAlive::new(config.ack_wait / 3)),
                usage: Arc::new(Usage::default()),
                held_sequences: Mutex::new(std::collections::HashSet::new()),
                recently_stored: Mutex::new(Remembered::default()),
                ack_floor: AtomicU64::new(0),
                incarnation: AtomicU64::new(incarnation),
                ledger: Ledger::new(store.clone(), def.stream, def.durable),
                store,
                storing: Semaphore::new(def.store_concurrency),
                abandon: CancellationToken::new(),
            }),
            writers,
            extension: format::extension(def.format, def.compression),
            max_held: max_ack_pending,
            drain_timeout,
        })
    }

    /// The task that runs this capture (see [`Capture::run`]). It drains on a deadline of
    /// its own (`capture_drain_timeout`), not the supervisor's hard stop.
    pub(crate) fn task(self) -> crate::supervise::Task {
        crate::supervise::Task::new(format!("capture {}", self.name()), move |stop| self.run(stop.cancel))
    }

    /// Pulls, splits and writes until `cancel`, storing blocks as they close; then closes every
    /// open block and waits for the stores until the drain deadline.
    pub(crate) async fn run(self, cancel: CancellationToken) -> Result<()> {
        let shared = self.shared.clone();
        let following = CancellationToken::new();
        let _stop_following = following.clone().drop_guard();
        tokio::spawn(shared.clone().follow_ack_floor(following.clone()));
        tokio::spawn(shared.pings.clone().run(shared.nats.clone(), following));
        let def = shared.def;
        let every = def.every.as_nanos().max(1) as u64;
        let grace = (def.every / 2).min(Duration::from_secs(1));
        let mut blocks = Blocks {
            open: HashMap::new(),
            watermark: 0,
            every,
            memory: 0,
            next_id: 0,
        };
        let mut stores: JoinSet<std::result::Result<(), Error>> = JoinSet::new();
        let mut unsure = Unsure::default();
        let mut tick = tokio::time::interval(grace.clamp(Duration::from_millis(20), Duration::from_millis(250)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_message = Instant::now();
        let mut caught_up = false;
        let mut failures = 0u32;
        // Reconnects seen when the incarnation was last read: a memory stream lost in a server
        // restart and created again by another instance shows only as a reconnect.
        let mut connects = shared.nats.statistics().connects.load(Ordering::Relaxed);
        // Under this many held messages, pull freely; above, close the biggest block to make room
        // before the server stops delivering at max_ack_pending.
        let pressure = self.max_held - self.max_held / 10;
        let fatal: Option<Error> = 'session: loop {
            let mut puller = match Puller::start(&shared.nats, def.stream, def.durable).await {
                Ok(puller) => puller,
                Err(error) => {
                    tracing::warn!(capture = def.name, error = %crate::error::chain(&error), "cannot subscribe; retrying");
                    if !crate::consumer::pause(&cancel, &mut failures).await {
                        break None;
                    }
                    continue;
                }
            };
            let rebind = loop {
                let held = shared.stats.held.load(Ordering::Relaxed);
                // At the memory budget, nothing more is asked for: messages wait on the server
                // (not held, so not kept alive) until stores make room.
                let room = if self.memory(&blocks) >= def.max_memory {
                    0
                } else {
                    self.max_held.saturating_sub(held).min(MAX_CREDITS as u64) as usize
                };
                if let Err(error) = puller.top_up(room).await {
                    tracing::warn!(capture = def.name, error = %crate::error::chain(&error), "cannot send a pull request");
                }
                unsure.refresh_if_due(&shared);
                let pulled = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break false,
                    Some(done) = stores.join_next(), if !stores.is_empty() => {
                        match done {
                            Ok(Ok(())) => continue,
                            Ok(Err(error)) => break 'session Some(error),
                            Err(panic) => break 'session Some(def.error(format!("a block store task failed: {panic}"))),
                        }
                    }
                    refreshed = unsure.refreshed() => {
                        for arrival in unsure.settle(refreshed, &shared) {
                            self.admit(arrival, true, &mut blocks, &mut unsure, &mut stores);
                        }
                        self.relieve(&mut blocks, &mut stores);
                        continue;
                    }
                    _ = tick.tick() => {
                        blocks.keep_alive(&shared);
                        unsure.keep_alive(&shared);
                        let idle = last_message.elapsed() >= grace;
                        for block in blocks.due(wall_clock_nanos(), grace, idle || caught_up) {
                            self.seal(block, &mut stores);
                        }
                        self.relieve(&mut blocks, &mut stores);
                        continue;
                    }
                    pulled = puller.next() => pulled,
                };
                match pulled {
                    Pulled::Message(message) => {
                        failures = 0;
                        last_message = Instant::now();
                        let Some(reply) = message.reply.clone() else { continue };
                        let Some(meta) = delivery_meta(&reply) else {
                            tracing::warn!(capture = def.name, reply = %reply, "not a JetStream delivery; ignored");
                            continue;
                        };
                        let now_connects = shared.nats.statistics().connects.load(Ordering::Relaxed);
                        if now_connects != connects {
                            connects = now_connects;
                            if let Ok(created) = stream_created(&shared.nats, def.stream).await {
                                shared.set_incarnation(created);
                            }
                        }
                        // Reaching the end of the backlog seals its ended windows now rather
                        // than at the next tick (up to 250 ms later, with the acks of the
                        // whole backlog waiting on them).
                        let reached_end = meta.pending == 0 && !caught_up;
                        caught_up = meta.pending == 0;
                        let original = Original {
                            subject: message.subject,
                            payload: message.payload,
                            headers: message.headers.map(Arc::new),
                            stream_sequence: meta.sequence,
                            delivery_count: meta.delivered,
                        };
                        // The key function is the user's code: its panic is this message's
                        // failure, not the capture's (which would restart into the same message).
                        let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            (def.decode)(original.headers.as_deref(), &original.payload)
                        }));
                        let captured = match decoded {
                            Ok(Ok(captured)) => captured,
                            Ok(Err(error)) => {
                                self.dead_letter(
                                    reply,
                                    original,
                                    format!("cannot decode the payload: {}", crate::error::chain(&*error)),
                                );
                                continue;
                            }
                            Err(panic) => {
                                let reason = format!(
                                    "decoding the payload or computing its key panicked: {}",
                                    panic_text(&*panic)
                                );
                                self.dead_letter(reply, original, reason);
                                continue;
                            }
                        };
                        let arrival = Arrival {
                            captured,
                            original,
                            reply,
                            timestamp: meta.timestamp_nanos,
                            incarnation: shared.incarnation.load(Ordering::Relaxed),
                            arrived: last_message,
                        };
                        self.admit(arrival, false, &mut blocks, &mut unsure, &mut stores);
                        if reached_end {
                            for block in blocks.due(wall_clock_nanos(), grace, true) {
                                self.seal(block, &mut stores);
                            }
                        }
                        self.relieve(&mut blocks, &mut stores);
                        // Only when open blocks hold at least half the allowance: blocks being
                        // stored count too, and closing fresh one-message blocks while they
                        // finish would only add tiny stores.
                        if shared.stats.held.load(Ordering::Relaxed) >= pressure
                            && blocks.open.values().map(|b| b.replies.len() as u64).sum::<u64>() >= self.max_held / 2
                        {
                            if let Some(block) = blocks.biggest() {
                                tracing::debug!(
                                    capture = def.name,
                                    "max_ack_pending nearly reached: closing the biggest block early"
                                );
                                self.seal(block, &mut stores);
                            }
                        }
                    }
                    // The loop tops up before it waits again.
                    Pulled::Credits => {}
                    Pulled::ConsumerDeleted => {
                        tracing::warn!(
                            capture = def.name,
                            consumer = def.durable,
                            "the consumer was deleted on the server; re-binding"
                        );
                        break true;
                    }
                    Pulled::Stalled(why) => {
                        if shared.consumer.must_rebind(why).await {
                            break true;
                        }
                        // The consumer is there, but maybe on a stream created anew meanwhile
                        // (by another instance, after a memory stream was lost in a restart).
                        let created = stream_created(&shared.nats, def.stream).await;
                        if created.is_ok_and(|created| created != shared.incarnation.load(Ordering::Relaxed)) {
                            break true;
                        }
                    }
                    Pulled::Busy => {
                        if !crate::consumer::pause(&cancel, &mut failures).await {
                            break false;
                        }
                    }
                    Pulled::Refused(why) => {
                        tracing::error!(capture = def.name, reason = %why, "the server refuses this capture's pull requests; re-binding");
                        if !crate::consumer::pause(&cancel, &mut failures).await {
                            break false;
                        }
                        break true;
                    }
                    Pulled::Closed => break false,
                }
            };
            if !rebind {
                // Messages that reached us but no block: back to the server at once.
                shared.consumer.hand_back(puller).await;
                break None;
            }
            drop(puller);
            let rebound = loop {
                match bind(&def, &shared.consumer, &shared.nats).await {
                    Ok((_, created)) => {
                        shared.set_incarnation(created);
                        connects = shared.nats.statistics().connects.load(Ordering::Relaxed);
                        tracing::info!(
                            capture = def.name,
                            consumer = def.durable,
                            "consumer re-bound; resuming"
                        );
                        break true;
                    }
                    Err(error) => {
                        tracing::error!(capture = def.name, error = %crate::error::chain(&error), "cannot re-bind the consumer; retrying");
                        if !crate::consumer::pause(&cancel, &mut failures).await {
                            break false;
                        }
                    }
                }
            };
            if !rebound {
                break None;
            }
        };

        // Messages still waiting for the ledger go back to the server.
        unsure.hand_back(&shared);
        // Drain: every open block is closed and stored, within a deadline of its own.
        let open = blocks.open.len();
        for block in blocks.drain() {
            self.seal(block, &mut stores);
        }
        tracing::info!(capture = def.name, open, deadline = ?self.drain_timeout, "capture draining: storing open blocks");
        let deadline = tokio::time::sleep(self.drain_timeout);
        tokio::pin!(deadline);
        let mut failed = fatal;
        loop {
            tokio::select! {
                done = stores.join_next() => match done {
                    None => break,
                    Some(Ok(Ok(()))) => {}
                    Some(Ok(Err(error))) => failed = failed.or(Some(error)),
                    Some(Err(panic)) => tracing::error!(capture = def.name, %panic, "a block store task failed"),
                },
                _ = &mut deadline, if !shared.abandon.is_cancelled() => {
                    let held = shared.stats.held.load(Ordering::Relaxed);
                    tracing::warn!(capture = def.name, held,
                        "capture drain deadline reached: giving up on unstored blocks; their messages stay unacked and will be redelivered");
                    shared.abandon.cancel();
                }
            }
        }
        if let Err(error) = shared.nats.flush().await {
            tracing::warn!(capture = def.name, error = %crate::error::chain(&error), "cannot flush the acks");
        }
        shared.remove_acked_manifests().await;
        let stats = &shared.stats;
        tracing::info!(
            capture = def.name,
            blocks = stats.blocks.load(Ordering::Relaxed),
            messages = stats.messages.load(Ordering::Relaxed),
            bytes = stats.bytes.load(Ordering::Relaxed),
            store_failures = stats.store_failures.load(Ordering::Relaxed),
            dead_lettered = stats.dead_lettered.load(Ordering::Relaxed),
            "capture stopped"
        );
        match failed {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Takes a decoded message in: acks it again if a stored block holds it, skips it if held,
    /// sets it aside until the ledger is fresh if it is a redelivery, else writes it into its
    /// block (storing the blocks that this closes). `held` is true for one that waited for the
    /// ledger, and so is held already.
    fn admit(
        &self,
        arrival: Arrival,
        held: bool,
        blocks: &mut Blocks,
        unsure: &mut Unsure,
        stores: &mut JoinSet<std::result::Result<(), Error>>,
    ) {
        let shared = &self.shared;
        let id = arrival.id();
        // Only a message delivered before can be in a block already.
        let redelivered = arrival.original.delivery_count > 1;
        if !held {
            if redelivered && shared.was_stored(id) {
                tracing::debug!(
                    capture = shared.def.name,
                    sequence = id.1,
                    "redelivered after it was stored; acked again"
                );
                settle_all(&shared.nats, vec![arrival.reply], b"+ACK");
                return;
            }
            if !shared.hold(id) {
                tracing::debug!(
                    capture = shared.def.name,
                    sequence = id.1,
                    "redelivered while held; skipped"
                );
                return;
            }
        }
        if redelivered {
            let since = arrival
                .arrived
                .checked_sub(shared.keep_alive)
                .unwrap_or(arrival.arrived);
            if !shared.ledger.listed_since(since) {
                unsure.push(arrival);
                return;
            }
            if shared.ledger.holds(id.0, id.1) {
                tracing::debug!(
                    capture = shared.def.name,
                    sequence = id.1,
                    "redelivered, and a stored block holds it (its ack was lost in a crash); acked"
                );
                shared.release(id.0, &[id.1]);
                settle_all(&shared.nats, vec![arrival.reply], b"+ACK");
                return;
            }
        }
        match blocks.add(arrival, &self.writers, shared) {
            Ok(sealed) => {
                for block in sealed {
                    self.seal(block, stores);
                }
            }
            Err(refused) => {
                let (reply, original, why) = *refused;
                self.dead_letter(reply, original, why);
            }
        }
    }

    /// Dead-letters and terminates one message, off the capture's loop.
    fn dead_letter(&self, reply: Subject, original: Original, reason: String) {
        let shared = self.shared.clone();
        shared.stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            capture = shared.def.name, stream = shared.def.stream, sequence = original.stream_sequence, %reason,
            "dead-lettering a message the capture cannot write"
        );
        tokio::spawn(async move {
            let settle = Settle {
                client: &shared.nats,
                reply,
            };
            let settled = shared
                .consumer
                .dead_letter_and_terminate(&settle, original, &reason)
                .await;
            settled.count(&shared.consumer.metrics);
        });
    }

    /// Hands a closed block to a store task.
    fn seal(&self, block: OpenBlock, stores: &mut JoinSet<std::result::Result<(), Error>>) {
        // A block opened for a message that could not be written holds nothing.
        if block.replies.is_empty() {
            return;
        }
        let shared = self.shared.clone();
        let extension = self.extension;
        // Counted from now, not from when its task first runs, so that the loop sees it at once.
        let charge = Charge::new(shared.usage.clone(), block.memory);
        stores.spawn(store_block(shared, block, charge, extension));
    }

    /// The bytes counted against the memory budget: open, sealed and remembered blocks.
    fn memory(&self, blocks: &Blocks) -> u64 {
        let usage = &self.shared.usage;
        blocks.memory + usage.sealed.load(Ordering::Relaxed) + usage.remembered.load(Ordering::Relaxed)
    }

    /// Near the memory budget, closes the biggest open blocks early, as long as open blocks
    /// hold at least half of it: below that, closing them would only make small blocks, and
    /// what fills the budget is blocks waiting to be stored, which only the store can free
    /// (meanwhile the loop stops pulling).
    fn relieve(&self, blocks: &mut Blocks, stores: &mut JoinSet<std::result::Result<(), Error>>) {
        let budget = self.shared.def.max_memory;
        let near = budget - budget / 10;
        while self.memory(blocks) >= near && blocks.memory >= budget / 2 {
            let Some(block) = blocks.biggest_in_memory() else { break };
            tracing::debug!(
                capture = self.shared.def.name,
                memory = block.memory,
                budget,
                "memory budget nearly reached: closing the biggest block early"
            );
            self.seal(block, stores);
        }
    }
}

/// What a panic carried, for a dead letter's reason.
fn panic_text(panic: &(dyn Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|text| (*text).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// A decoded message on its way into a block.
struct Arrival {
    captured: Captured,
    original: Original,
    reply: Subject,
    /// Its stream timestamp, in nanoseconds since the Unix epoch.
    timestamp: u64,
    /// The stream incarnation it was delivered from.
    incarnation: u64,
    /// When it was received: a ledger listed since (less a keep-alive period) is fresh enough
    /// to say whether a stored block holds it.
    arrived: Instant,
}

impl Arrival {
    fn id(&self) -> MessageId {
        (self.incarnation, self.original.stream_sequence)
    }
}

/// Redelivered messages waiting for the ledger to be read (again), held and kept alive
/// meanwhile, and the refresh under way.
#[derive(Default)]
struct Unsure {
    waiting: Vec<Arrival>,
    /// When the waiting messages were last kept alive.
    touched: Option<Instant>,
    refresh: Option<tokio::task::JoinHandle<std::result::Result<(), StoreError>>>,
    /// No refresh before this (after a failed one).
    not_before: Option<Instant>,
    failures: u32,
}

impl Unsure {
    fn push(&mut self, arrival: Arrival) {
        if self.waiting.is_empty() {
            self.touched = Some(Instant::now());
        }
        self.waiting.push(arrival);
    }

    /// Starts reading the ledger if messages wait and no read is under way or backing off.
    fn refresh_if_due(&mut self, shared: &Arc<Shared>) {
        if self.waiting.is_empty() || self.refresh.is_some() || self.not_before.is_some_and(|at| at > Instant::now()) {
            return;
        }
        let shared = shared.clone();
        self.refresh = Some(tokio::spawn(async move { shared.ledger.refresh().await }));
    }

    /// Resolves when the refresh under way ends; never if none is.
    async fn refreshed(&mut self) -> std::result::Result<(), String> {
        match self.refresh.as_mut() {
            Some(refresh) => {
                let outcome = refresh.await;
                self.refresh = None;
                match outcome {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(crate::error::chain(&error).to_string()),
                    Err(panic) => Err(format!("the ledger read failed: {panic}")),
                }
            }
            None => std::future::pending().await,
        }
    }

    /// After a refresh: the waiting messages to admit again, or none (they wait for a retry).
    fn settle(&mut self, refreshed: std::result::Result<(), String>, shared: &Shared) -> Vec<Arrival> {
        match refreshed {
            Ok(()) => {
                self.failures = 0;
                self.not_before = None;
                std::mem::take(&mut self.waiting)
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                let delay = (STORE_RETRY_FIRST * 2u32.pow(self.failures.min(7))).min(STORE_RETRY_MAX);
                self.not_before = Some(Instant::now() + delay);
                tracing::warn!(
                    capture = shared.def.name, %error, waiting = self.waiting.len(), retry_in = ?delay,
                    "cannot read which messages the stored blocks hold; the redelivered ones wait, unacked"
                );
                Vec::new()
            }
        }
    }

    /// Sends in-progress acks for the waiting messages every keep-alive period.
    fn keep_alive(&mut self, shared: &Shared) {
        if self.touched.is_some_and(|at| at.elapsed() >= shared.keep_alive) {
            self.touched = Some(Instant::now());
            let replies: Vec<Subject> = self.waiting.iter().map(|arrival| arrival.reply.clone()).collect();
            shared.pings.ask(keep_alive::UNSURE, replies);
        }
    }

    /// On shutdown: the waiting messages go back to the server.
    fn hand_back(&mut self, shared: &Shared) {
        let waiting = std::mem::take(&mut self.waiting);
        let mut replies = Vec::with_capacity(waiting.len());
        for arrival in waiting {
            shared.release(arrival.incarnation, &[arrival.original.stream_sequence]);
            replies.push(arrival.reply);
        }
        settle_all(&shared.nats, replies, b"-NAK");
    }
}

/// The current time in nanoseconds since the Unix epoch.
fn wall_clock_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .min(u64::MAX as u128) as u64
}

/// The open blocks of one capture, by stream incarnation, key and window.
struct Blocks {
    open: HashMap<(u64, BlockKey, u64), OpenBlock>,
    /// The latest window any message came from, in nanoseconds since the epoch.
    watermark: u64,
    /// Window length in nanoseconds.
    every: u64,
    /// What the open blocks hold, in bytes (the sum of their `memory`).
    memory: u64,
    /// The number of the next block opened (its keep-alive holder).
    next_id: u64,
}

/// A block being filled.
struct OpenBlock {
    /// Its number, unique within the capture.
    id: u64,
    /// About what it holds, in bytes: its writer's buffers and [`PER_MESSAGE`] a message.
    memory: u64,
    /// The stream incarnation its messages come from.
    incarnation: u64,
    /// Where it goes: the path template rendered for its key and window.
    folder: object_store::path::Path,
    writer: Box<dyn BlockWriter>,
    replies: Vec<Subject>,
    /// The stream sequence of each reply.
    sequences: Vec<u64>,
    bytes: u64,
    /// When its messages were last kept alive (or the first arrived).
    touched: Instant,
}

/// A message that cannot go into a block: its reply, the message, and why.
type Refused = (Subject, Original, String);

impl Blocks {
    /// Writes a message (held already) into its block; returns the blocks that this closes:
    /// its own when full, and older windows' once a message from a later window arrives.
    fn add(
        &mut self,
        arrival: Arrival,
        writers: &WriterFactory,
        shared: &Shared,
    ) -> std::result::Result<Vec<OpenBlock>, Box<Refused>> {
        let def = &shared.def;
        let Arrival {
            captured,
            original,
            reply,
            timestamp,
            incarnation,
            ..
        } = arrival;
        let window = timestamp - timestamp % self.every;
        let Captured { record, key } = captured;
        let slot = (incarnation, key, window);
        let block = match self.open.get_mut(&slot) {
            Some(block) => block,
            None => {
                // Rendered when the block opens, so that a key the template cannot take is this
                // message's failure, not a failed store of the whole block later.
                let vars = PathVars {
                    stream: def.stream,
                    durable: def.durable,
                    key: &slot.1 .0,
                    window_start: window / 1_000_000_000,
                };
                let folder = match shared.store.block_folder(&vars) {
                    Ok(folder) => folder,
                    Err(error) => {
                        shared.release(incarnation, &[original.stream_sequence]);
                        let reason = format!(
                            "its key cannot fill the store's path template: {}",
                            crate::error::chain(&error)
                        );
                        return Err(Box::new((reply, original, reason)));
                    }
                };
                self.next_id += 1;
                let block = OpenBlock {
                    id: self.next_id,
                    memory: 0,
                    incarnation,
                    folder,
                    writer: writers(),
                    replies: Vec::new(),
                    sequences: Vec::new(),
                    bytes: 0,
                    touched: Instant::now(),
                };
                self.open.entry(slot.clone()).or_insert(block)
            }
        };
        if let Err(error) = block.writer.append(&*record, &original.payload) {
            shared.release(incarnation, &[original.stream_sequence]);
            if def.format == BlockFormat::Parquet {
                // A Parquet writer cannot take back a half-written row: it refuses anything
                // more. Its messages go back to the server, to be written into a fresh block.
                if let Some(broken) = self.remove(&slot) {
                    shared.release(incarnation, &broken.sequences);
                    settle_all(&shared.nats, broken.replies, b"-NAK");
                }
            }
            return Err(Box::new((
                reply,
                original,
                format!(
                    "cannot write the record as {}: {}",
                    def.format,
                    crate::error::chain(&error)
                ),
            )));
        }
        block.replies.push(reply);
        block.sequences.push(original.stream_sequence);
        block.bytes += original.payload.len() as u64;
        let memory = block.writer.memory().map_or(block.bytes, |bytes| bytes as u64)
            + PER_MESSAGE * block.replies.len() as u64
            + (block.replies.capacity() * std::mem::size_of::<Subject>()) as u64;
        self.memory = self.memory - block.memory + memory;
        block.memory = memory;
        let full = block.replies.len() as u64 >= def.max_messages || block.bytes >= def.max_bytes;
        let mut closed = Vec::new();
        if full {
            closed.extend(self.remove(&slot));
        }
        if window > self.watermark {
            self.watermark = window;
            let older: Vec<_> = self.open.keys().filter(|(_, _, w)| *w < window).cloned().collect();
            closed.extend(older.iter().filter_map(|slot| self.remove(slot)));
        }
        Ok(closed)
    }

    /// Blocks whose window ended more than `grace` ago, and either a later window has begun
    /// or the consumer has nothing more to deliver (`quiet`).
    fn due(&mut self, now: u64, grace: Duration, quiet: bool) -> Vec<OpenBlock> {
        let grace = grace.as_nanos() as u64;
        let due: Vec<_> = self
            .open
            .keys()
            .filter(|(_, _, window)| {
                let ended = now >= window + self.every + grace;
                ended && (quiet || *window < self.watermark)
            })
            .cloned()
            .collect();
        due.iter().filter_map(|slot| self.remove(slot)).collect()
    }

    /// Takes a block out of the open ones.
    fn remove(&mut self, slot: &(u64, BlockKey, u64)) -> Option<OpenBlock> {
        let block = self.open.remove(slot)?;
        self.memory -= block.memory;
        Some(block)
    }

    /// Takes every open block out (on shutdown).
    fn drain(&mut self) -> Vec<OpenBlock> {
        self.memory = 0;
        self.open.drain().map(|(_, block)| block).collect()
    }

    /// The block holding the most messages.
    fn biggest(&mut self) -> Option<OpenBlock> {
        let slot = self
            .open
            .iter()
            .max_by_key(|(_, block)| block.replies.len())
            .map(|(slot, _)| slot.clone())?;
        self.remove(&slot)
    }

    /// The block holding the most memory.
    fn biggest_in_memory(&mut self) -> Option<OpenBlock> {
        let slot = self
            .open
            .iter()
            .max_by_key(|(_, block)| block.memory)
            .map(|(slot, _)| slot.clone())?;
        self.remove(&slot)
    }

    /// Asks for in-progress acks for the messages of blocks not touched for a keep-alive period.
    fn keep_alive(&mut self, shared: &Shared) {
        for block in self.open.values_mut() {
            if block.touched.elapsed() >= shared.keep_alive {
                block.touched = Instant::now();
                shared.pings.ask(block.id, block.replies.clone());
            }
        }
    }
}

/// Publishes `body` to each reply from a task of its own.
fn settle_all(nats: &async_nats::Client, replies: Vec<Subject>, body: &'static [u8]) {
    let nats = nats.clone();
    tokio::spawn(async move {
        for reply in replies {
            let _ = nats.publish(reply, Bytes::from_static(body)).await;
        }
    });
}

/// Stores one block: waits for a store slot, serializes the block, writes it (retrying with
/// backoff and keeping its messages alive while it fails), then acks its messages.
async fn store_block(
    shared: Arc<Shared>,
    block: OpenBlock,
    charge: Charge,
    extension: &'static str,
) -> std::result::Result<(), Error> {
    let span = tracing::info_span!(
        "natty.capture.block",
        capture = shared.def.name,
        stream = shared.def.stream,
        messages = block.replies.len(),
        first = block.sequences.iter().copied().min().unwrap_or_default(),
        last = block.sequences.iter().copied().max().unwrap_or_default(),
        bytes = tracing::field::Empty,
        path = tracing::field::Empty,
        attempts = tracing::field::Empty,
    );
    // Its messages are kept alive by the capture's one keep-alive task until this ends, however
    // it ends.
    let id = block.id;
    let pings = shared.pings.clone();
    let _forget = Forget(&pings, id);
    store_block_in_span(shared, block, charge, extension)
        .instrument(span)
        .await
}

/// Stops keeping a block's messages alive when dropped.
struct Forget<'a>(&'a KeepAlive, keep_alive::Holder);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

async fn store_block_in_span(
    shared: Arc<Shared>,
    block: OpenBlock,
    mut charge: Charge,
    extension: &'static str,
) -> std::result::Result<(), Error> {
    let def = shared.def;
    let count = block.replies.len() as u64;
    let OpenBlock {
        id,
        incarnation,
        folder,
        writer,
        replies,
        sequences,
        touched,
        ..
    } = block;
    let replies: Arc<[Subject]> = replies.into();
    // The messages were last kept alive (or delivered) at `touched`, not when the block was
    // sealed: counted from the seal, a block sealed just before its keep-alive was due would go
    // a whole ack_wait without one, and the server would redeliver its messages.
    shared.pings.hold(id, touched, replies.clone());
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    // Sealed blocks hold at least one message (see `Capture::seal`).
    let first = sorted.first().copied().unwrap_or_default();
    let last = sorted.last().copied().unwrap_or_default();
    let release = || shared.release(incarnation, &sequences);

    let permit = tokio::select! {
        permit = shared.storing.acquire() => permit.expect("the semaphore is never closed"),
        _ = shared.abandon.cancelled() => { release(); return Ok(()) }
    };
    let finished = tokio::task::spawn_blocking(move || writer.finish()).await;
    let bytes = match finished {
        Ok(Ok(bytes)) => {
            // The writer's buffers are gone; the finished bytes and the replies stay.
            charge.set(bytes.len() as u64 + PER_MESSAGE * count);
            Bytes::from(bytes)
        }
        Ok(Err(error)) => {
            release();
            return Err(def.error(format!(
                "cannot finish a {} block: {}",
                def.format,
                crate::error::chain(&error)
            )));
        }
        Err(panic) => {
            release();
            return Err(def.error(format!("finishing a block panicked: {panic}")));
        }
    };
    let file_name = store::incarnation_block_file_name(def.stream, incarnation, first, last, extension);
    let path = match shared.store.in_folder(&folder, &file_name) {
        Ok(path) => path,
        Err(error) => {
            release();
            return Err(def.error(crate::error::chain(&error).to_string()));
        }
    };
    let location = shared.store.describe(&path);
    let mut delay = STORE_RETRY_FIRST;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let started = std::time::Instant::now();
        // The manifest goes first: a block is never visible without the ledger knowing which
        // messages it holds, so that a crash before their acks does not store them twice.
        let put = async {
            shared.ledger.record(&path, incarnation, &sorted).await?;
            shared.store.put(&path, bytes.clone()).await
        };
        tokio::pin!(put);
        let outcome = tokio::select! {
            outcome = &mut put => Some(outcome),
            _ = shared.abandon.cancelled() => None,
        };
        match outcome {
            None => {
                release();
                return Ok(());
            }
            Some(Ok(())) => {
                let took = started.elapsed();
                drop(permit);
                for reply in replies.iter() {
                    Settle {
                        client: &shared.nats,
                        reply: reply.clone(),
                    }
                    .send(Bytes::from_static(b"+ACK"))
                    .await;
                }
                // A round trip after the acks: once it returns, the server has them all, which
                // narrows the window in which a crash loses some acks of a stored block.
                if let Err(error) = shared.nats.flush().await {
                    tracing::warn!(capture = def.name, error = %crate::error::chain(&error), "cannot flush the acks of a stored block");
                }
                shared.stored(incarnation, sorted.clone());
                release();
                let stats = &shared.stats;
                stats.blocks.fetch_add(1, Ordering::Relaxed);
                stats.messages.fetch_add(count, Ordering::Relaxed);
                stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                stats.store_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                let metrics = &shared.metrics;
                metrics.blocks.inc();
                metrics.messages.inc_by(count);
                metrics.bytes.inc_by(bytes.len() as u64);
                metrics.store_seconds.observe(took.as_secs_f64());
                let span = tracing::Span::current();
                span.record("bytes", bytes.len());
                span.record("path", tracing::field::display(&location));
                span.record("attempts", attempts);
                tracing::info!(
                    capture = def.name, block = %location, messages = count, bytes = bytes.len(), first, last,
                    took_ms = took.as_millis() as u64, attempts, "block stored"
                );
                return Ok(());
            }
            Some(Err(error)) => {
                shared.stats.store_failures.fetch_add(1, Ordering::Relaxed);
                shared.metrics.store_failures.inc();
                tracing::warn!(
                    capture = def.name, block = %location, messages = count, attempts, retry_in = ?delay, error = %crate::error::chain(&error),
                    "cannot store a block; retrying, its messages stay unacked"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.abandon.cancelled() => { release(); return Ok(()) }
                }
                delay = (delay * 2).min(STORE_RETRY_MAX);
            }
        }
    }
}

/// Builds the writers of a payload type (what `#[capture]` registers for every format but raw).
#[doc(hidden)]
pub fn writers<T>(format: BlockFormat, compression: Compression) -> std::result::Result<WriterFactory, FormatError>
where
    T: serde::Serialize + serde::de::DeserializeOwned + Send + Sync + 'static,
{
    format::writers::<T>(format, compression)
}

/// Builds the raw-bytes writers (`format = "raw"`), which need nothing of the payload type.
#[doc(hidden)]
pub fn raw_writers(format: BlockFormat, compression: Compression) -> std::result::Result<WriterFactory, FormatError> {
    format::writers::<serde_json::Value>(format, compression)
}
