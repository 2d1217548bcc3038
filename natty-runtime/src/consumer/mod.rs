//! Durable pull consumers: the [`ConsumerDef`] a `#[consumer]` registers, its provisioning,
//! and the running task that pulls, dispatches to the handler, settles each message, recovers
//! a consumer whose server-side state disappeared, and drains on shutdown.

use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, PullConsumer},
};
use async_nats::Subject;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Provision;
use crate::error::{Error, Result};
use crate::handler::{ConsumerShared, Delivery, Outcome, Reject, RejectKind};
use crate::publish::Client;
use crate::puller::{delivery_info, Pulled, Puller};
use crate::stream::{check, is_stream_not_found, Location, StreamDef};
use crate::telemetry::{ConsumerMetrics, DeliveryScope};

mod ack;
mod batch;
mod def;
mod exhausted;
mod held;
mod lanes;
mod settle;

pub(crate) use ack::{confirm, Confirmed, HandlerAcks};
pub use ack::{Ack, AckError};
pub use batch::{batch_only, Batch, BatchDelivery, BatchHandlerFn, FromBatch, FromBatchParts};
pub use def::{hash_key, ConsumerDef, Deliver, HandlerFn, KeyFn, OrderBy};
use held::Held;
use lanes::{beside, Inline, Lanes};
pub(crate) use settle::{panic_message, Original, Settle};

/// How much work, in handler time, may wait in this instance's prefetch: enough to hide the
/// pull round trip, small enough that a slow handler does not hoard messages other instances
/// could take, or let them age towards `ack_wait` while they wait.
const PREFETCH_BUDGET: Duration = Duration::from_millis(250);
/// Upper bound of the adaptive prefetch (also async-nats' largest useful batch).
const MAX_PREFETCH: usize = 1000;
/// Default dead-letter subjects are `natty.dead.<stream>.<durable>`, kept by [`DEAD_LETTER_STREAM`].
pub const DEAD_LETTER_PREFIX: &str = "natty.dead";
/// The stream natty provisions for default dead-letter subjects.
pub const DEAD_LETTER_STREAM: &str = "natty-dead-letters";
/// How long an ephemeral consumer outlives its last pull by default.
const EPHEMERAL_INACTIVE_THRESHOLD: Duration = Duration::from_secs(300);
/// On shutdown, how long to wait for prefetched messages still on their way, to hand them back.
pub(crate) const HAND_BACK_WITHIN: Duration = Duration::from_secs(2);
/// How long an ack, nak or ping may wait to be handed to the connection. While the server is
/// unreachable the connection's queue can fill; a settle that cannot go out is left to the
/// server's redelivery after `ack_wait` (at-least-once holds), and a shutdown does not hang.
pub(crate) const SETTLE_WITHIN: Duration = Duration::from_secs(2);

/// A running consumer: the definition plus what it needs to bind and recover.
pub(crate) struct Consumer {
    def: ConsumerDef,
    shared: Arc<ConsumerShared>,
    provision: Provision,
    /// The declaration of this consumer's stream, if the service declares it: used to
    /// re-create a stream that vanished (a memory stream after a server restart).
    stream_def: Option<StreamDef>,
    pacing: Pacing,
    /// What this instance read and has not settled, kept alive together.
    held: Held,
    /// Signalled when a handler slot frees up or a waiting message starts: the pull loop may
    /// ask for more.
    room: tokio::sync::Notify,
    dead_letter: async_nats::Subject,
    /// The consumer's name on the server: the durable name, or a fresh one per ephemeral instance.
    name: Arc<str>,
    pub(crate) metrics: ConsumerMetrics,
    /// A partition of a group: the last message given back, whose nak is confirmed before the
    /// partition is released (the server applies a consumer's acks in order, so that one
    /// answered means every earlier nak is in its redelivery queue before a successor pulls).
    last_given_back: std::sync::Mutex<Option<Subject>>,
    /// The highest stream sequence the consumer had delivered when last bound: for a partition
    /// taken over, what came before it is a redelivery of an earlier owner's.
    delivered_through: AtomicU64,
    /// Handler slots shared with other consumers (the partitions an instance owns of one group
    /// share its `concurrency`); `None`: its own.
    shared_permits: Option<Arc<Semaphore>>,
    /// The lease a bound consumer runs under: nothing starts once it is no longer valid.
    lease: Option<crate::leader::Lease>,
    /// When in-flight handlers are given up on (their messages naked): the token of the run
    /// this consumer is in, kept here so that starting a delivery does not clone it (a clone
    /// and its drop each lock the token's node).
    hard_stop: CancellationToken,
}

impl Consumer {
    pub(crate) fn new(def: ConsumerDef, client: Client, provision: Provision, stream_def: Option<StreamDef>) -> Self {
        let name: Arc<str> = if def.ephemeral {
            format!("{}-{}", def.name, unique_suffix()).into()
        } else {
            def.durable.into()
        };
        let metrics = client
            .telemetry()
            .metrics
            .consumer(def.name, def.stream, &name, def.ephemeral);
        let shared = Arc::new(ConsumerShared {
            stream: def.stream,
            name: name.clone(),
            client,
            ack_wait_nanos: AtomicU64::new(def.ack_wait.unwrap_or(Duration::from_secs(30)).as_nanos() as u64),
            confirmed: Confirmed::default(),
            handler_acks: HandlerAcks::default(),
            hard_stop: std::sync::OnceLock::new(),
        });
        Consumer {
            def,
            shared,
            provision,
            stream_def,
            pacing: Pacing::default(),
            held: Held::default(),
            room: tokio::sync::Notify::new(),
            dead_letter: def.dead_letter_subject().into(),
            name,
            metrics,
            last_given_back: std::sync::Mutex::new(None),
            delivered_through: AtomicU64::new(0),
            shared_permits: None,
            lease: None,
            hard_stop: CancellationToken::new(),
        }
    }

    /// Takes its handler slots from `permits`, shared with other consumers. Only for ordered
    /// consumers, whose lanes hold every running handler (the drain waits for them there).
    pub(crate) fn sharing(mut self, permits: Arc<Semaphore>) -> Self {
        debug_assert!(self.def.order_by.is_some(), "shared handler slots need lanes");
        self.shared_permits = Some(permits);
        self
    }

    /// Starts no handler once `lease` is no longer valid: a process frozen past its lease wakes
    /// up knowing, before its renewal fails, and gives what it holds back.
    pub(crate) fn under(mut self, lease: crate::leader::Lease) -> Self {
        self.lease = Some(lease);
        self
    }

    /// The handler's name, for logs and readiness.
    pub(crate) fn label(&self) -> &'static str {
        self.def.name
    }

    /// The stream it reads.
    pub(crate) fn stream(&self) -> &'static str {
        self.def.stream
    }

    fn js(&self) -> &jetstream::Context {
        self.shared.client.jetstream()
    }

    /// Creates, updates or looks up the durable consumer according to the provisioning mode,
    /// and records its `ack_wait`.
    pub(crate) async fn bind(&self) -> Result<PullConsumer> {
        let consumer = self.bind_inner().await?;
        // Possibly a new consumer, whose deliveries start again at 1: no earlier confirmation
        // may drop one of them.
        self.shared.confirmed.clear();
        let ack_wait = consumer.cached_info().config.ack_wait;
        self.delivered_through
            .store(consumer.cached_info().delivered.stream_sequence, Ordering::Relaxed);
        self.shared
            .ack_wait_nanos
            .store(ack_wait.as_nanos().max(1) as u64, Ordering::Relaxed);
        Ok(consumer)
    }

    async fn bind_inner(&self) -> Result<PullConsumer> {
        let def = &self.def;
        let stream = match self.js().get_stream(def.stream).await {
            Ok(stream) => stream,
            Err(error) if is_stream_not_found(&error) => match (&self.stream_def, self.provision) {
                (Some(stream_def), Provision::CreateOrUpdate) => {
                    stream_def.provision(self.js(), self.provision).await?;
                    // Just created: on a cluster the server answering may not know of it yet.
                    crate::stream::read_back(self.js(), def.stream)
                        .await
                        .map_err(|e| def.error(&self.name, "looking up its stream")(Box::new(e)))?
                }
                _ => {
                    return Err(Error::StreamNotFound {
                        stream: def.stream.into(),
                        hint: format!(
                            " (consumer `{}` at {} reads it); declare it with #[stream(name = \"{}\", subjects = [...])] or create it on the server",
                            def.label(), def.location, def.stream
                        ),
                    })
                }
            },
            Err(error) => return Err(def.error(&self.name, "looking up its stream")(Box::new(error))),
        };
        // An ephemeral consumer is this instance's own state, not shared infrastructure: it is
        // created whatever the provisioning mode.
        if def.ephemeral {
            return stream
                .create_consumer(def.server_config(&self.name)?)
                .await
                .map_err(|e| def.error(&self.name, "creating it")(Box::new(e)));
        }
        use jetstream::consumer::FromConsumer;
        use jetstream::context::ConsumerInfoErrorKind as Kind;
        // One lookup serves every mode: its answer both decides and binds.
        let info = match stream.consumer_info(&*self.name).await {
            Ok(info) => info,
            Err(error) if matches!(error.kind(), Kind::NotFound) => {
                if self.provision != Provision::CreateOrUpdate {
                    return Err(Error::ConsumerNotFound {
                        stream: def.stream.into(),
                        consumer: self.name.to_string(),
                        mode: self.provision.as_str(),
                    });
                }
                // Two instances starting together both create it: the same configuration twice
                // is one consumer.
                return stream
                    .create_consumer(def.server_config(&self.name)?)
                    .await
                    .map_err(|e| def.error(&self.name, "creating it")(Box::new(e)));
            }
            Err(error) => return Err(def.error(&self.name, "looking it up")(Box::new(error))),
        };
        let drift = match self.provision {
            Provision::Off => None,
            Provision::CreateOrUpdate | Provision::VerifyOnly => def.drift(&info.config),
        };
        if let (Provision::VerifyOnly, Some((field, declared, actual))) = (self.provision, &drift) {
            return Err(crate::error::Drift {
                declared_on: crate::error::Declared::Consumer {
                    stream: def.stream.into(),
                    consumer: self.name.to_string(),
                },
                field,
                declared: declared.clone(),
                actual: actual.clone(),
                hint: " (provisioning is verify-only)".into(),
            }
            .into());
        }
        let mut config = pull::Config::try_from_consumer_config(info.config.clone())
            .map_err(|e| def.error(&self.name, "reading its configuration")(e))?;
        let Some((field, declared, server)) = drift else {
            // As it is on the server: settings natty does not declare stay untouched.
            return Ok(PullConsumer::new(config, info, self.js().clone()));
        };
        // Only what differs from the declaration changes; the rest stays the server's.
        def.apply(&self.name, &mut config)?;
        let updated = stream
            .create_consumer(config)
            .await
            .map_err(|e| def.error(&self.name, "updating it")(Box::new(e)))?;
        tracing::info!(stream = def.stream, consumer = &*self.name, field, from = %server, to = %declared, "updated consumer");
        Ok(updated)
    }

    /// The task that runs this consumer (see [`Consumer::run`]).
    pub(crate) fn task(self) -> crate::supervise::Task {
        crate::supervise::Task::new(format!("consumer {}", self.label()), move |stop| {
            self.run(stop.cancel, stop.hard_stop)
        })
    }

    /// Runs until `cancel`, then drains: stops pulling, naks what was prefetched but not
    /// started, and lets in-flight handlers finish until `hard_stop`, when their messages are naked.
    pub(crate) async fn run(self, cancel: CancellationToken, hard_stop: CancellationToken) -> Result<()> {
        self.run_drained(cancel, hard_stop).await.map(drop)
    }

    /// [`run`](Consumer::run), telling whether the drain was clean: every message this instance
    /// held was settled, and for a partition's consumer the server confirmed it has what was
    /// given back (so a successor may start at once).
    pub(crate) async fn run_drained(mut self, cancel: CancellationToken, hard_stop: CancellationToken) -> Result<bool> {
        self.hard_stop = hard_stop.clone();
        let this = Arc::new(self);
        // Set once: a supervised restart runs under the same runtime and the same hard stop.
        let _ = this.shared.hard_stop.set(hard_stop.clone());
        let concurrency = this.def.concurrency;
        let permits = match &this.shared_permits {
            Some(shared) => shared.clone(),
            None => Arc::new(Semaphore::new(concurrency)),
        };
        let lanes = Lanes::default();
        // Messages read and held but not started (an ordered consumer's wait in their lanes).
        let mut queue: VecDeque<Ready> = VecDeque::new();
        // With one handler slot the handler runs in this task, sparing a spawn per message; it
        // is polled beside the pull, so messages keep being read, held and kept alive meanwhile.
        let mut inline = Inline::new();
        let keep_alive = tokio::spawn(this.clone().keep_alive());
        // Messages the server gives up on (`max_deliver`) without this consumer settling them.
        let exhausted = this
            .def
            .max_deliver
            .is_some_and(|max| max > 0)
            .then(|| tokio::spawn(this.clone().dead_letter_exhausted()));
        // A handler running in this task wakes the loop when it ends; spawned handlers and
        // lanes signal `room` instead.
        let batch = this.def.batch;
        let signalled = concurrency > 1 || this.def.order_by.is_some() || batch.is_some();
        // When the first message of the batch being gathered arrived.
        let mut gathering: Option<tokio::time::Instant> = None;
        let mut failures = 0u32;
        // Prefetched messages that arrived after the pull stopped, for an ordered consumer.
        let mut late = Vec::new();
        // A partition taken over: what its earlier owners were delivered comes back first, in
        // the order it was given back or expired, which is not always stream order (a nak goes
        // behind redeliveries already queued; expiries are sorted only within one pass of the
        // server's timer). Held until all of it is here, then handled in stream order.
        let mut resequence = this.def.partition.and_then(|_| {
            let through = this.delivered_through.load(Ordering::Relaxed);
            (through > 0).then(|| Resequence {
                through,
                held: Vec::new(),
            })
        });
        // Starts a message: in its key's lane, or queued for a handler slot.
        macro_rules! dispatch {
            ($ready:expr) => {
                match this.def.order_by {
                    Some(order_by) => lanes.dispatch(this.clone(), order_by, $ready, &permits, &cancel),
                    None => {
                        // Only a batch waits for its first message's age (a clock read
                        // per message otherwise).
                        if batch.is_some() && queue.is_empty() {
                            gathering = Some(tokio::time::Instant::now());
                        }
                        queue.push_back($ready)
                    }
                }
            };
        }
        loop {
            let started = beside(
                &mut inline,
                Puller::start(this.shared.client.nats(), this.def.stream, &this.name),
            )
            .await;
            let mut puller = match started {
                // A partition's owner must have no request waiting on the server once its lease
                // has ended there (see `partition::group`).
                Ok(puller) if this.def.partition.is_some() => puller.expiring(crate::partition::group::PULL_EXPIRES),
                Ok(puller) => puller,
                Err(error) => {
                    tracing::warn!(stream = this.def.stream, consumer = &*this.name, error = %crate::error::chain(&error), "cannot subscribe; retrying");
                    if !beside(&mut inline, pause(&cancel, &mut failures)).await {
                        break;
                    }
                    continue;
                }
            };
            let rebind = loop {
                // Cancellation first (one uncontended lock of the token's node), so that nothing
                // more starts or is asked for once it came (a waiter is registered only when
                // the loop is about to sleep: the branch comes last in the select below).
                if cancel.is_cancelled() {
                    break false;
                }
                // Start what can start now: the permit is taken without waiting (no waiter is
                // registered on the hot path); a slot that frees up later wakes the loop.
                // A batch starts when full, or once its first message has waited `batch_wait`.
                while let Some(batch) = batch {
                    let due = gathering.is_some_and(|since| since.elapsed() >= batch.wait);
                    if queue.is_empty() || (queue.len() < batch.size && !due) {
                        break;
                    }
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        break;
                    };
                    let readies: Vec<Ready> = queue.drain(..queue.len().min(batch.size)).collect();
                    gathering = (!queue.is_empty()).then(tokio::time::Instant::now);
                    tokio::spawn(this.clone().deliver_batch(batch, readies, permit));
                }
                while batch.is_none() && !queue.is_empty() {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        break;
                    };
                    let ready = queue.pop_front().expect("the queue is not empty");
                    // Made in the call that takes it, where the compiler builds it in place: built
                    // in a local first, the delivery's future (832 bytes) was copied whole twice
                    // more per message on its way to its slot.
                    if concurrency == 1 {
                        inline.start(this.clone().deliver(ready, permit));
                    } else {
                        tokio::spawn(this.clone().deliver(ready, permit));
                    }
                }
                // Credits cover the free handler slots plus the prefetch, less what was already
                // read and waits: a message is asked for only when there is room to start it soon.
                let busy = concurrency - permits.available_permits();
                let waiting = queue.len() + lanes.waiting();
                let wanted = match batch {
                    // Every batch slot full, and one more batch gathering.
                    Some(batch) => ((concurrency + 1) * batch.size).saturating_sub(busy * batch.size + waiting),
                    None => {
                        let prefetch =
                            this.pacing
                                .prefetch(concurrency, this.def.max_prefetch(), this.def.prefetch.is_some());
                        (concurrency + prefetch).saturating_sub(busy + waiting)
                    }
                };
                if let Err(error) = puller.top_up(wanted).await {
                    tracing::warn!(stream = this.def.stream, consumer = &*this.name, error = %crate::error::chain(&error), "cannot send a pull request");
                }
                // A partial batch is due at its deadline, if a batch slot is free to take it.
                let batch_due = match (batch, gathering) {
                    (Some(batch), Some(since)) if permits.available_permits() > 0 => Some(since + batch.wait),
                    _ => None,
                };
                // Polled once or twice per message, so nothing here costs unless it is needed:
                // the cancellation waiter is registered only when the loop is about to sleep
                // (its branch comes last), the batch timer made only when a batch is due.
                let pulled = tokio::select! {
                    biased;
                    Some(()) = inline.next(), if !inline.is_empty() => continue,
                    _ = this.room.notified(), if signalled => continue,
                    _ = async { tokio::time::sleep_until(batch_due?).await; Some(()) }, if batch_due.is_some() => continue,
                    pulled = puller.next() => pulled,
                    _ = cancel.cancelled() => break false,
                };
                match pulled {
                    Pulled::Message(message) => {
                        failures = 0;
                        let Some(ready) = this.take_hold(message) else {
                            continue;
                        };
                        if let Some(redelivered) = resequence.as_mut() {
                            if ready.sequence <= redelivered.through {
                                redelivered.held.push(ready);
                                continue;
                            }
                            // Past what was delivered before: every earlier message came first.
                            for ready in resequence.take().map(Resequence::sorted).unwrap_or_default() {
                                dispatch!(ready);
                            }
                        }
                        dispatch!(ready);
                    }
                    Pulled::Credits => {
                        // A request ended with credits unused: nothing more is waiting to be
                        // redelivered.
                        for ready in resequence.take().map(Resequence::sorted).unwrap_or_default() {
                            dispatch!(ready);
                        }
                    }
                    Pulled::ConsumerDeleted => {
                        tracing::warn!(
                            stream = this.def.stream,
                            consumer = &*this.name,
                            "the consumer was deleted on the server; re-binding"
                        );
                        break true;
                    }
                    Pulled::Stalled(why) => {
                        if beside(&mut inline, this.must_rebind(why)).await {
                            break true;
                        }
                        // No consumer leader, or no server: ask again, but not in a tight loop.
                        if !beside(&mut inline, pause(&cancel, &mut failures)).await {
                            break false;
                        }
                    }
                    Pulled::Busy => {
                        tracing::warn!(stream = this.def.stream, consumer = &*this.name,
                            "the consumer has as many waiting pull requests as it allows (max_waiting); asking again later");
                        if !beside(&mut inline, pause(&cancel, &mut failures)).await {
                            break false;
                        }
                    }
                    Pulled::Refused(why) => {
                        tracing::error!(stream = this.def.stream, consumer = &*this.name, reason = %why,
                            "the server refuses this consumer's pull requests; re-binding");
                        if !beside(&mut inline, pause(&cancel, &mut failures)).await {
                            break false;
                        }
                        break true;
                    }
                    Pulled::Closed => break false,
                }
            };
            if !rebind {
                let left = beside(&mut inline, this.stop_pulling(puller)).await;
                if this.def.order_by.is_some() {
                    // Later than anything waiting in the lanes: given back after them, so that
                    // the server redelivers each key's messages in their order.
                    late = left;
                } else {
                    beside(&mut inline, this.hand_back(left)).await;
                }
                break;
            }
            drop(puller);
            if !beside(&mut inline, this.rebind(&cancel, &mut failures)).await {
                break;
            }
        }
        // What was read but not started goes back to the server at once, for another instance.
        for ready in resequence.take().map(Resequence::sorted).unwrap_or_default() {
            beside(&mut inline, this.give_back(ready)).await;
        }
        for ready in queue.drain(..) {
            beside(&mut inline, this.give_back(ready)).await;
        }
        // In-flight handlers hold permits; they release them when settled (or naked at hard_stop).
        while inline.next().await.is_some() {}
        lanes.finish().await;
        this.hand_back(late).await;
        if this.shared_permits.is_none() {
            let _ = permits.acquire_many(concurrency as u32).await;
        }
        let mut clean = true;
        let last_given_back = this.last_given_back.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(reply) = last_given_back {
            // Its own short deadline, not the hard stop (which may have cut handlers off already).
            let request = async_nats::Request::new().payload(Bytes::from_static(b"-NAK"));
            let answer =
                tokio::time::timeout(SETTLE_WITHIN, this.shared.client.nats().send_request(reply, request)).await;
            if !matches!(&answer, Ok(Ok(answer)) if answer.status.is_none_or(|status| status.is_success())) {
                clean = false;
                tracing::warn!(stream = this.def.stream, consumer = &*this.name,
                    "the server did not confirm the partition's last nak; its successor waits for what this instance held");
            }
        }
        keep_alive.abort();
        if let Some(exhausted) = exhausted {
            exhausted.abort();
        }
        let left = this.held.sequences();
        if !left.is_empty() {
            clean = false;
            tracing::warn!(stream = this.def.stream, consumer = &*this.name, count = left.len(), sequences = ?left,
                "stopped with messages unsettled (the server could not be told); it redelivers them after ack_wait");
        }
        if this.def.ephemeral {
            // Nobody else will read it: remove it now rather than after the inactive threshold.
            let removed = tokio::time::timeout(SETTLE_WITHIN, async {
                if let Ok(stream) = this.js().get_stream(this.def.stream).await {
                    let _ = stream.delete_consumer(&this.name).await;
                }
            });
            if removed.await.is_err() {
                tracing::warn!(
                    consumer = &*this.name,
                    "cannot remove the ephemeral consumer; the server does after its inactive threshold"
                );
            }
        }
        Ok(clean)
    }

    /// Holds a message just read: `None` for a redelivery of one this instance still holds (the
    /// copy being worked on settles it; handling it again would run it twice) or for anything
    /// that is not a JetStream delivery.
    fn take_hold(&self, mut message: async_nats::Message) -> Option<Ready> {
        let reply = message.reply.clone()?;
        if self.def.partition.is_some() {
            // Handlers, keys and dead letters see the subject published, not the stored one.
            message.subject = crate::partition::published_subject(&message.subject);
        }
        let Some((sequence, delivered)) = delivery_info(&reply) else {
            tracing::warn!(reply = %reply, "received a message that is not a JetStream delivery; ignored");
            return None;
        };
        if self.shared.confirmed.raced(sequence, delivered) {
            tracing::debug!(
                stream = self.def.stream,
                consumer = &*self.name,
                sequence,
                delivered,
                "a delivery sent before this instance's ack of it was applied; dropped"
            );
            return None;
        }
        if !self.held.hold(sequence, &reply) {
            tracing::debug!(
                stream = self.def.stream,
                consumer = &*self.name,
                sequence,
                delivered,
                "a redelivery of a message still held here; dropped"
            );
            return None;
        }
        Some(Ready {
            message,
            reply,
            sequence,
            delivered,
        })
    }

    /// Dead-letters and terminates a message that cannot be handled at all (its ordering key
    /// cannot be computed), so it neither stops the consumer nor comes back.
    async fn give_up(&self, ready: Ready, reason: &str) {
        tracing::error!(handler = self.def.name, stream = self.def.stream, consumer = &*self.name,
            sequence = ready.sequence, %reason, "giving up on the message");
        let original = Original {
            subject: ready.message.subject,
            payload: ready.message.payload,
            headers: ready.message.headers.map(Arc::new),
            stream_sequence: ready.sequence,
            delivery_count: ready.delivered,
        };
        let settled = self
            .dead_letter_and_terminate(&self.settle(ready.reply), original, reason)
            .await;
        self.held.release(ready.sequence);
        settled.count(&self.metrics);
    }

    /// Returns a message that was read but not started to the server, for another instance.
    async fn give_back(&self, ready: Ready) {
        self.nak(ready.reply).await;
        self.held.release(ready.sequence);
        self.metrics.naked.inc();
    }

    /// Naks a message given back (not one that failed: that has its delay), remembering the
    /// last one of a partition's consumer.
    async fn nak(&self, reply: Subject) {
        if self.def.partition.is_some() {
            *self.last_given_back.lock().unwrap_or_else(|e| e.into_inner()) = Some(reply.clone());
        }
        self.settle(reply).send(Bytes::from_static(b"-NAK")).await;
    }

    /// How to settle a delivery with reply subject `reply`.
    fn settle(&self, reply: Subject) -> Settle<'_> {
        Settle {
            client: self.shared.client.nats(),
            reply,
        }
    }

    /// Keeps every held message alive: whatever it waits for (a free handler slot, its key's
    /// turn, a retry's delay, its handler), each is pinged with `+WPI` at least every half
    /// `ack_wait`, so the server never redelivers a message this instance still holds.
    async fn keep_alive(self: Arc<Self>) {
        loop {
            // A quarter of ack_wait per tick, and a message is pinged when it was held or last
            // pinged before the tick that just ended: at most half an ack_wait between two pings.
            let every = (self.shared.ack_wait() / 4).max(Duration::from_millis(5));
            tokio::time::sleep(every).await;
            self.shared.confirmed.forget_older_than(self.shared.ack_wait() * 2);
            self.shared.handler_acks.retain(|sequence| self.held.contains(sequence));
            for reply in self.held.tick() {
                self.settle(reply).send(Bytes::from_static(b"+WPI")).await;
            }
        }
    }

    /// Stops pulling: the prefetched messages still on their way. A partition's consumer keeps
    /// listening until each of its pull requests has ended (they expire within a second): in a
    /// cluster an unsubscribe reaches the consumer leader late, and a message it sent in between
    /// would only come back after `ack_wait`, behind what the successor handles.
    pub(crate) async fn stop_pulling(&self, puller: Puller) -> Vec<async_nats::Message> {
        if self.def.partition.is_some() {
            return puller
                .finish(
                    crate::partition::group::PULL_EXPIRES + Duration::from_secs(1),
                    HAND_BACK_WITHIN,
                )
                .await;
        }
        puller.stop(HAND_BACK_WITHIN).await
    }

    /// Returns prefetched messages that were not started to the server at once, so another
    /// instance can take them instead of waiting out ack_wait.
    pub(crate) async fn hand_back(&self, prefetched: Vec<async_nats::Message>) {
        let mut handed_back = 0;
        for message in prefetched {
            let Some(reply) = message.reply else { continue };
            // A redelivery of a message still held here: a nak would send the one being worked
            // on back to the server too.
            if delivery_info(&reply).is_some_and(|(sequence, _)| self.held.contains(sequence)) {
                continue;
            }
            self.nak(reply).await;
            self.metrics.naked.inc();
            handed_back += 1;
        }
        if handed_back > 0 {
            tracing::info!(
                stream = self.def.stream,
                consumer = &*self.name,
                handed_back,
                "returned prefetched messages"
            );
        }
    }

    /// Binds the consumer again, retrying with backoff until it works; false if cancelled first.
    pub(crate) async fn rebind(&self, cancel: &CancellationToken, failures: &mut u32) -> bool {
        loop {
            match self.bind().await {
                Ok(_) => {
                    tracing::info!(
                        stream = self.def.stream,
                        consumer = &*self.name,
                        "consumer bound; consuming"
                    );
                    return true;
                }
                Err(error) => {
                    tracing::error!(error = %crate::error::chain(&error), "cannot re-bind the consumer; retrying");
                    if !pause(cancel, failures).await {
                        return false;
                    }
                }
            }
        }
    }

    /// After the pull stalled: whether the consumer must be bound again (it or its stream
    /// vanished), or pulling can go on (a transient gap, e.g. during a reconnect).
    pub(crate) async fn must_rebind(&self, why: &str) -> bool {
        use jetstream::context::ConsumerInfoErrorKind as Kind;
        let (stream, durable) = (self.def.stream, &*self.name);
        let gone = match self.js().get_stream(stream).await {
            Ok(handle) => match handle.consumer_info(durable).await {
                Ok(_) => Some(false),
                Err(error) if matches!(error.kind(), Kind::NotFound | Kind::StreamNotFound) => Some(true),
                Err(_) => None,
            },
            Err(error) if is_stream_not_found(&error) => Some(true),
            Err(_) => None,
        };
        match gone {
            Some(false) => {
                tracing::debug!(stream, consumer = durable, why, "pull interrupted; continuing");
                false
            }
            Some(true) => {
                tracing::warn!(
                    stream,
                    consumer = durable,
                    why,
                    "the consumer or its stream is gone on the server; re-binding"
                );
                true
            }
            None => {
                tracing::warn!(
                    stream,
                    consumer = durable,
                    why,
                    "pull interrupted and the server does not answer; waiting"
                );
                false
            }
        }
    }
}

/// A message read from the server and held by this instance, with what its reply subject says.
pub(crate) struct Ready {
    message: async_nats::Message,
    reply: Subject,
    sequence: u64,
    delivered: u64,
}

/// The redeliveries a partition's new owner holds back until all of them are here.
struct Resequence {
    /// The consumer's last delivered stream sequence when bound: anything up to it is a redelivery.
    through: u64,
    held: Vec<Ready>,
}

impl Resequence {
    fn sorted(mut self) -> Vec<Ready> {
        self.held.sort_unstable_by_key(|ready| ready.sequence);
        self.held
    }
}

/// A short random suffix for an ephemeral consumer's name: unique per instance and start.
pub(crate) fn unique_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:012x}", hasher.finish() & 0xffff_ffff_ffff)
}

/// The handlers' recent speed, from which the prefetch follows: about [`PREFETCH_BUDGET`] of
/// work per handler slot, between one message and the maximum. Until a handler has finished
/// once, the prefetch is one message per slot, so a slow handler never starts with a hoard.
#[derive(Default)]
struct Pacing {
    /// Exponentially weighted mean handler time in nanoseconds; 0 until the first sample.
    mean_nanos: AtomicU64,
}

impl Pacing {
    fn record(&self, took: Duration) {
        let sample = took.as_nanos().min(u64::MAX as u128) as u64;
        let mean = self.mean_nanos.load(Ordering::Relaxed);
        // Racing updates from concurrent handlers may lose a sample; the mean stays a mean.
        let next = if mean == 0 {
            sample.max(1)
        } else {
            (mean * 7 + sample) / 8
        }
        .max(1);
        self.mean_nanos.store(next, Ordering::Relaxed);
    }

    fn prefetch(&self, concurrency: usize, max: usize, fixed: bool) -> usize {
        if fixed {
            return max;
        }
        let mean = self.mean_nanos.load(Ordering::Relaxed);
        if mean == 0 {
            return concurrency.min(max);
        }
        let per_slot = (PREFETCH_BUDGET.as_nanos() as u64 / mean).max(1) as usize;
        per_slot.saturating_mul(concurrency).clamp(1, max)
    }
}

/// Waits before a retry, longer after each failure; false if cancelled meanwhile.
pub(crate) async fn pause(cancel: &CancellationToken, failures: &mut u32) -> bool {
    *failures = failures.saturating_add(1);
    let delay = Duration::from_millis(250 * 2u64.pow((*failures).min(5))).min(Duration::from_secs(5));
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::def::default_retry_delay;
    use super::settle::without_publish_directives;
    use super::*;

    fn handler(_: Delivery) -> BoxFuture<'static, Outcome> {
        Box::pin(async { Outcome::Ack })
    }

    #[test]
    fn prefetch_follows_handler_speed_within_bounds() {
        let base = ConsumerDef::new("h", "s", "d", handler);
        assert_eq!(base.max_prefetch(), 1000);
        assert_eq!(base.max_ack_pending(10).max_prefetch(), 10);
        assert_eq!(base.prefetch(5).max_prefetch(), 5);

        let pacing = Pacing::default();
        assert_eq!(pacing.prefetch(4, 1000, false), 4, "one per slot before any sample");
        assert_eq!(pacing.prefetch(4, 5, true), 5, "a declared prefetch is fixed");
        pacing.record(Duration::from_micros(5));
        assert_eq!(pacing.prefetch(1, 1000, false), 1000, "fast handlers: the maximum");
        let slow = Pacing::default();
        slow.record(Duration::from_secs(2));
        assert_eq!(slow.prefetch(8, 1000, false), 8, "slow handlers: one per slot");
        let medium = Pacing::default();
        medium.record(Duration::from_millis(10));
        assert_eq!(medium.prefetch(2, 1000, false), 50, "250 ms of work per slot");
    }

    #[test]
    fn a_dead_letter_keeps_the_originals_headers_but_not_its_publish_directives() {
        let mut original = async_nats::HeaderMap::new();
        original.insert("Traceparent", "00-abc-def-01");
        original.insert("Content-Type", "application/json");
        original.insert("Nats-Expected-Last-Subject-Sequence", "7");
        original.insert("Nats-Expected-Stream", "orders");
        original.insert("Nats-TTL", "1s");
        original.insert("Nats-Rollup", "sub");
        let kept = without_publish_directives(Some(original));
        assert_eq!(kept.get("Traceparent").unwrap().as_str(), "00-abc-def-01");
        assert_eq!(kept.get("Content-Type").unwrap().as_str(), "application/json");
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(without_publish_directives(None).is_empty());
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        assert_eq!(default_retry_delay(1), Duration::from_millis(100));
        assert_eq!(default_retry_delay(2), Duration::from_millis(200));
        assert_eq!(default_retry_delay(50), Duration::from_secs(10));
        const STEPS: &[Duration] = &[Duration::from_secs(1), Duration::from_secs(10)];
        let def = ConsumerDef::new("h", "s", "d", handler).backoff(STEPS);
        assert_eq!(def.retry_delay(1), Duration::from_secs(1));
        assert_eq!(def.retry_delay(2), Duration::from_secs(10));
        assert_eq!(def.retry_delay(9), Duration::from_secs(10));
    }
}
