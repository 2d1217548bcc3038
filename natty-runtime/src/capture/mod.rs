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

mod blocks;
mod def;
mod shared;
mod storing;
mod unsure;

use blocks::*;
#[doc(hidden)]
pub use def::{raw_writers, writers};
pub use def::{CaptureDef, Captured, DecodeFn, WritersFn};
use shared::*;
use storing::*;
use unsure::*;

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

inventory::collect!(CaptureDef);

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

/// A message's identity across incarnations of its stream: (incarnation, stream sequence).
type MessageId = (u64, u64);

/// The hasher of the maps a capture touches for every message (held messages, remembered
/// blocks, open blocks). SipHash was the largest item of a capture's own CPU in a profile of
/// the benchmark. foldhash is seeded per map too; the keys are stream sequences (the server's)
/// and block keys, which a publisher could choose but whose open blocks the memory budget
/// bounds.
type FastHash = foldhash::fast::RandomState;

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
        settings: &crate::Config,
    ) -> Result<Capture> {
        if def.every.is_zero() {
            return Err(def.error("`every` must be longer than zero"));
        }
        // The store reads its retry settings by their variables' names; the runtime's Config
        // (the environment, overridden by the builder) stands in for those two.
        let (max_retries, retry_timeout) = (settings.store_max_retries, settings.store_retry_timeout);
        let env = move |name: &str| match name {
            store::MAX_RETRIES_ENV => max_retries.map(|retries| retries.to_string()),
            store::RETRY_TIMEOUT_ENV => retry_timeout.map(|timeout| humantime::format_duration(timeout).to_string()),
            _ => std::env::var(name).ok(),
        };
        let store = BlockStore::open_with_env(def.store, &env)
            .map_err(|error| def.error(crate::error::chain(&error).to_string()))?;
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
            // A partition's capture starts at every takeover, beside other writers of the folder:
            // only what no write can still be working on.
            .sweep_temporaries_older_than(match def.partition {
                Some(_) => Duration::from_secs(3600),
                None => Duration::ZERO,
            })
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
                held_sequences: Mutex::new(std::collections::HashSet::default()),
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
            drain_timeout: settings.capture_drain_timeout,
        })
    }

    /// The task that runs this capture (see [`Capture::run`]). It drains on a deadline of
    /// its own (`capture_drain_timeout`), not the supervisor's hard stop.
    pub(crate) fn task(self) -> crate::supervise::Task {
        crate::supervise::Task::new(format!("capture {}", self.name()), move |stop| self.run(stop.cancel))
    }

    /// [`run`](Capture::run), abandoning what is open or storing at `hard_stop` (the capture of
    /// a partition whose lease ended: the next holder captures those messages).
    pub(crate) async fn run_until(self, cancel: CancellationToken, hard_stop: CancellationToken) -> Result<()> {
        let abandon = self.shared.abandon.clone();
        let run = self.run(cancel);
        tokio::pin!(run);
        tokio::select! {
            ended = &mut run => ended,
            _ = hard_stop.cancelled() => {
                abandon.cancel();
                run.await
            }
        }
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
            open: HashMap::default(),
            watermark: 0,
            every,
            memory: 0,
            next_id: 0,
        };
        let mut stores: JoinSet<std::result::Result<(), Error>> = JoinSet::new();
        let mut unsure = Unsure::default();
        let mut open_blocks = OpenBlocks::new(&shared.metrics.open_blocks);
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
                // A partition's owner must have no request waiting once its lease has ended.
                Ok(puller) if def.partition.is_some() => puller.expiring(crate::partition::group::PULL_EXPIRES),
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
                        open_blocks.show(blocks.open.len());
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
                        let arrived = Instant::now();
                        let Some(reply) = message.reply else { continue };
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
                        // Dead letters show the subject published, not the stored one.
                        let subject = match def.partition {
                            Some(_) => crate::partition::published_subject(&message.subject),
                            None => message.subject,
                        };
                        let original = Original {
                            subject,
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
                                    crate::consumer::panic_message(&*panic)
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
                            arrived,
                        };
                        // Redeliveries of messages already held or stored are not activity:
                        // counted as such, a storm of them (keep-alives late under load) would
                        // keep the last window from ever closing as idle, and nothing would be
                        // stored or acked to end the storm.
                        if self.admit(arrival, false, &mut blocks, &mut unsure, &mut stores) {
                            last_message = arrived;
                        }
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
                shared
                    .consumer
                    .hand_back(shared.consumer.stop_pulling(puller).await)
                    .await;
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

        // Drain: every open block is closed and stored, within a deadline of its own.
        let deadline = tokio::time::sleep(self.drain_timeout);
        tokio::pin!(deadline);
        // Redelivered messages waiting for the ledger were received: one read of it (unless a
        // failed read is backing off) lets them into the blocks about to be stored rather than
        // back to the server for yet another delivery. What it cannot settle goes back.
        if fatal.is_none() && !unsure.waiting.is_empty() {
            unsure.not_before = None;
            unsure.refresh_if_due(&shared);
            tokio::select! {
                refreshed = unsure.refreshed() => {
                    for arrival in unsure.settle(refreshed, &shared) {
                        self.admit(arrival, true, &mut blocks, &mut unsure, &mut stores);
                    }
                }
                _ = &mut deadline => {}
            }
        }
        unsure.hand_back(&shared);
        let open = blocks.open.len();
        for block in blocks.drain() {
            self.seal(block, &mut stores);
        }
        tracing::info!(capture = def.name, open, deadline = ?self.drain_timeout, "capture draining: storing open blocks");
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
    /// ledger, and so is held already. False when the message was already held or stored.
    fn admit(
        &self,
        arrival: Arrival,
        held: bool,
        blocks: &mut Blocks,
        unsure: &mut Unsure,
        stores: &mut JoinSet<std::result::Result<(), Error>>,
    ) -> bool {
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
                return false;
            }
            if !shared.hold(id) {
                tracing::debug!(
                    capture = shared.def.name,
                    sequence = id.1,
                    "redelivered while held; skipped"
                );
                return false;
            }
        }
        if redelivered {
            let since = arrival
                .arrived
                .checked_sub(shared.keep_alive)
                .unwrap_or(arrival.arrived);
            if !shared.ledger.listed_since(since) {
                unsure.push(arrival);
                return true;
            }
            if shared.ledger.holds(id.0, id.1) {
                tracing::debug!(
                    capture = shared.def.name,
                    sequence = id.1,
                    "redelivered, and a stored block holds it (its ack was lost in a crash); acked"
                );
                shared.release(id.0, &[id.1]);
                settle_all(&shared.nats, vec![arrival.reply], b"+ACK");
                return false;
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
        true
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

/// The current time in nanoseconds since the Unix epoch.
fn wall_clock_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
        .min(u64::MAX as u128) as u64
}

/// This capture's share of the `open_blocks` gauge: the partitions of a partitioned capture
/// count into one gauge, each adding what changed since it last showed, and taking its share
/// back when it stops.
struct OpenBlocks<'a> {
    gauge: &'a prometheus_client::metrics::gauge::Gauge,
    shown: i64,
}

impl<'a> OpenBlocks<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        OpenBlocks { gauge, shown: 0 }
    }

    fn show(&mut self, open: usize) {
        let open = open as i64;
        self.gauge.inc_by(open - self.shown);
        self.shown = open;
    }
}

impl Drop for OpenBlocks<'_> {
    fn drop(&mut self) {
        self.gauge.dec_by(self.shown);
    }
}
