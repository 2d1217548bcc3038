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

/// The adapter a `#[consumer]` generates: decodes, calls the handler, reports the outcome.
pub type HandlerFn = fn(Delivery) -> BoxFuture<'static, Outcome>;

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

/// A declared durable pull consumer. `#[consumer(...)]` registers one; [`ConsumerDef::new`]
/// builds one by hand with the same defaults.
#[derive(Clone, Copy)]
pub struct ConsumerDef {
    pub(crate) name: &'static str,
    pub(crate) stream: &'static str,
    pub(crate) durable: &'static str,
    pub(crate) subjects: &'static [&'static str],
    pub(crate) ack_wait: Option<Duration>,
    pub(crate) max_deliver: Option<i64>,
    pub(crate) max_ack_pending: Option<i64>,
    pub(crate) replicas: Option<usize>,
    pub(crate) concurrency: usize,
    pub(crate) prefetch: Option<usize>,
    pub(crate) backoff: &'static [Duration],
    pub(crate) dead_letter: Option<&'static str>,
    pub(crate) deliver: Deliver,
    pub(crate) ephemeral: bool,
    pub(crate) inactive_threshold: Option<Duration>,
    pub(crate) order_by: Option<OrderBy>,
    pub(crate) while_leading: Option<(&'static str, &'static str)>,
    pub(crate) handler: HandlerFn,
    pub(crate) location: Location,
    pub(crate) payload: crate::payload::PayloadSource,
}

impl std::fmt::Debug for ConsumerDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerDef")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("subjects", &self.subjects)
            .field("concurrency", &self.concurrency)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl ConsumerDef {
    /// A consumer named `durable` on `stream`, handled by `handler` (named `name` in logs).
    pub const fn new(name: &'static str, stream: &'static str, durable: &'static str, handler: HandlerFn) -> Self {
        ConsumerDef {
            name,
            stream,
            durable,
            subjects: &[],
            ack_wait: None,
            max_deliver: None,
            max_ack_pending: None,
            replicas: None,
            concurrency: 1,
            prefetch: None,
            backoff: &[],
            dead_letter: None,
            deliver: Deliver::All,
            ephemeral: false,
            inactive_threshold: None,
            order_by: None,
            while_leading: None,
            handler,
            location: Location::UNKNOWN,
            payload: crate::payload::PayloadSource::Unknown,
        }
    }

    /// An ephemeral consumer: each instance of the service gets its own, sees every message,
    /// and the server removes it after [`inactive_threshold`](Self::inactive_threshold)
    /// without a pull (natty also deletes it on a clean shutdown). For one-off processing,
    /// caches, projections per instance.
    pub const fn ephemeral(name: &'static str, stream: &'static str, handler: HandlerFn) -> Self {
        let mut def = ConsumerDef::new(name, stream, "", handler);
        def.ephemeral = true;
        def
    }

    /// How long an ephemeral consumer survives without a pull (default 5 minutes).
    pub const fn inactive_threshold(mut self, threshold: Duration) -> Self {
        self.inactive_threshold = Some(threshold);
        self
    }

    /// Filter subjects; none means every subject of the stream.
    pub const fn subjects(mut self, subjects: &'static [&'static str]) -> Self {
        self.subjects = subjects;
        self
    }

    /// How many servers keep the consumer's state (delivered and acked sequences). By
    /// default the consumer has as many as its stream; fewer saves work on a cluster at the
    /// cost of losing the consumer's position when its servers are lost.
    pub const fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// How long the server waits for an ack before redelivering (server default 30 s).
    pub const fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = Some(ack_wait);
        self
    }

    /// How many times a message is delivered at most (server default: unlimited).
    pub const fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = Some(max_deliver);
        self
    }

    /// How many messages may be unacknowledged across all instances (server default 1000).
    pub const fn max_ack_pending(mut self, max_ack_pending: i64) -> Self {
        self.max_ack_pending = Some(max_ack_pending);
        self
    }

    /// How many handlers run at once in this instance (default 1).
    pub const fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = if concurrency == 0 { 1 } else { concurrency };
        self
    }

    /// How many messages this instance asks the server for ahead of its handlers.
    pub const fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(if prefetch == 0 { 1 } else { prefetch });
        self
    }

    /// Redelivery delays after a handler error, by attempt: the first error waits
    /// `backoff[0]`, the second `backoff[1]`, and so on, the last repeating. Without it, 100 ms
    /// doubling to 10 s.
    pub const fn backoff(mut self, backoff: &'static [Duration]) -> Self {
        self.backoff = backoff;
        self
    }

    /// Where messages go when they are terminated or run out of deliveries (default
    /// `natty.dead.<stream>.<durable>`, stored in the `natty-dead-letters` stream).
    pub const fn dead_letter(mut self, subject: &'static str) -> Self {
        self.dead_letter = Some(subject);
        self
    }

    /// Where a new consumer starts in its stream (default: the first message). The server
    /// refuses to change it for an existing durable consumer.
    pub const fn deliver(mut self, deliver: Deliver) -> Self {
        self.deliver = deliver;
        self
    }

    /// Handles messages with the same key one at a time, in stream order, while different
    /// keys run in parallel (up to the concurrency). A failed message is retried in place,
    /// holding its key, so the next one never overtakes it. The order holds within one
    /// instance: for several instances, give each its own subjects.
    pub const fn order_by(mut self, order_by: OrderBy) -> Self {
        self.order_by = Some(order_by);
        self
    }

    /// Runs this consumer only while this instance leads `key` of KV bucket `bucket` (the
    /// election of a `#[leader]` on the same key, or its own with a 10 s TTL): it starts when
    /// the lease is won and stops, naking what is in flight, when the lease ends.
    pub const fn while_leading(mut self, bucket: &'static str, key: &'static str) -> Self {
        self.while_leading = Some((bucket, key));
        self
    }

    /// Records where the declaration was written (the macros set this).
    pub const fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// Records the payload type the handler decodes, for the AsyncAPI document
    /// ([`Runtime::asyncapi`](crate::Runtime::asyncapi)); the macros set it. By hand:
    /// `.payload(natty_runtime::__private::describe_payload::<MyPayload>)`.
    pub const fn payload(mut self, describe: fn() -> crate::payload::PayloadDescription) -> Self {
        self.payload = crate::payload::PayloadSource::Given(describe);
        self
    }

    /// What generated code registers: a function describing whichever argument is the
    /// payload, if any is.
    #[doc(hidden)]
    pub const fn payload_probe(mut self, describe: fn() -> Option<crate::payload::PayloadDescription>) -> Self {
        self.payload = crate::payload::PayloadSource::Probed(describe);
        self
    }

    /// The dead-letter subject in force.
    pub fn dead_letter_subject(&self) -> String {
        match self.dead_letter {
            Some(subject) => subject.to_string(),
            None => format!("{DEAD_LETTER_PREFIX}.{}.{}", self.stream, self.label()),
        }
    }

    /// How long to wait before redelivering after the `attempt`-th delivery failed.
    pub(crate) fn retry_delay(&self, attempt: u64) -> Duration {
        match self.backoff {
            [] => default_retry_delay(attempt),
            steps => steps[(attempt.saturating_sub(1) as usize).min(steps.len() - 1)],
        }
    }

    /// The handler's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The stream it consumes.
    pub fn stream(&self) -> &'static str {
        self.stream
    }

    /// The durable name, shared by every instance of the service (`None` for an ephemeral consumer).
    pub fn durable(&self) -> Option<&'static str> {
        (!self.ephemeral).then_some(self.durable)
    }

    /// The durable name, or the handler's name for an ephemeral consumer: what logs and the
    /// default dead-letter subject use.
    pub(crate) fn label(&self) -> &'static str {
        if self.ephemeral {
            self.name
        } else {
            self.durable
        }
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The most messages this instance may have prefetched (beyond those being handled):
    /// the declared `prefetch`, or up to 1000, and never more than `max_ack_pending`, at
    /// which the server would stop delivering with a request half-filled.
    pub(crate) fn max_prefetch(&self) -> usize {
        let wanted = self.prefetch.unwrap_or(MAX_PREFETCH);
        let cap = self.max_ack_pending.unwrap_or(1000).max(1) as usize;
        wanted.min(cap).max(1)
    }

    /// The configuration a new consumer is created with: explicit acks, the name, and every
    /// declared setting; the rest are the server's defaults.
    fn server_config(&self, consumer: &str) -> Result<pull::Config> {
        let mut config = pull::Config {
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        };
        if self.ephemeral {
            config.name = Some(consumer.to_string());
            config.inactive_threshold = self.inactive_threshold.unwrap_or(EPHEMERAL_INACTIVE_THRESHOLD);
        } else {
            config.durable_name = Some(consumer.to_string());
        }
        self.apply(consumer, &mut config)?;
        Ok(config)
    }

    /// Sets every declared setting on `config` and leaves the others as they are, so that an
    /// update changes what was declared and nothing an operator set besides (`max_waiting`,
    /// a description, a backoff...: some the server refuses to change at all).
    fn apply(&self, consumer: &str, config: &mut pull::Config) -> Result<()> {
        use async_nats::jetstream::consumer::DeliverPolicy;
        config.deliver_policy = match self.deliver {
            Deliver::All => DeliverPolicy::All,
            Deliver::New => DeliverPolicy::New,
            Deliver::Last => DeliverPolicy::Last,
            Deliver::LastPerSubject => DeliverPolicy::LastPerSubject,
            Deliver::FromSequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            Deliver::FromTime(rfc3339) => DeliverPolicy::ByStartTime {
                start_time: async_nats::datetime::parse_rfc3339(rfc3339).map_err(|error| {
                    Error::config(
                        format!("start_time of consumer `{consumer}`"),
                        rfc3339,
                        format!("not an RFC 3339 time: {error}"),
                    )
                })?,
            },
        };
        // The subjects are always compared (none declared means the whole stream), so always set.
        (config.filter_subject, config.filter_subjects) = match self.subjects {
            [] => (String::new(), Vec::new()),
            [one] => (one.to_string(), Vec::new()),
            many => (String::new(), many.iter().map(|s| s.to_string()).collect()),
        };
        if let Some(value) = self.ack_wait {
            config.ack_wait = value;
        }
        if let Some(value) = self.max_deliver {
            config.max_deliver = value;
        }
        if let Some(value) = self.max_ack_pending {
            config.max_ack_pending = value;
        }
        if let Some(value) = self.replicas {
            config.num_replicas = value;
        }
        Ok(())
    }

    /// The first declared setting that differs from the server's `actual` configuration:
    /// (field, declared, actual). Settings left to the server's defaults are not compared; the
    /// deliver policy always is, since natty always sets it (`all` unless declared).
    pub(crate) fn drift(&self, actual: &jetstream::consumer::Config) -> Option<(&'static str, String, String)> {
        let mut declared: Vec<&str> = self.subjects.to_vec();
        let mut server: Vec<&str> = actual.filter_subjects.iter().map(String::as_str).collect();
        if !actual.filter_subject.is_empty() {
            server.push(&actual.filter_subject);
        }
        declared.sort_unstable();
        server.sort_unstable();
        if declared != server {
            return Some(("subjects", format!("{declared:?}"), format!("{server:?}")));
        }
        check("ack_wait", self.ack_wait, actual.ack_wait)
            .or_else(|| check("max_deliver", self.max_deliver, actual.max_deliver))
            .or_else(|| check("max_ack_pending", self.max_ack_pending, actual.max_ack_pending))
            .or_else(|| check("replicas", self.replicas, actual.num_replicas))
            .or_else(|| {
                let wanted = self.server_config(self.durable).ok()?.deliver_policy;
                check("deliver", Some(wanted), actual.deliver_policy)
            })
    }

    fn error<'a>(
        &'a self,
        consumer: &'a str,
        action: &'static str,
    ) -> impl FnOnce(crate::error::BoxError) -> Error + 'a {
        move |source| Error::Consumer {
            stream: self.stream.into(),
            consumer: consumer.into(),
            action,
            source,
        }
    }
}

inventory::collect!(ConsumerDef);

/// What makes messages "the same key" for [`ConsumerDef::order_by`].
#[derive(Debug, Clone, Copy)]
pub enum OrderBy {
    /// The whole subject.
    Subject,
    /// One token of the subject, counted from 0: `orders.<id>.created` is keyed by token 1.
    Token(usize),
    /// A key computed from the message (headers and payload), as the hash of the key; `None`
    /// (a payload that does not decode) falls back to the subject. `#[consumer(order_by =
    /// key_fn)]` generates one that decodes the payload and calls `key_fn(&payload)`.
    Key(KeyFn),
}

/// Computes an [`OrderBy::Key`] from a message's headers and payload.
pub type KeyFn = fn(Option<&async_nats::HeaderMap>, &[u8]) -> Option<u64>;

impl OrderBy {
    /// The lane of `message`. Keys are compared by hash: two keys sharing one are merely
    /// handled one after the other, which keeps each key's order.
    pub(crate) fn lane(&self, message: &async_nats::Message) -> u64 {
        let subject: &str = &message.subject;
        match self {
            OrderBy::Subject => hash_key(subject),
            // A subject too short for the token is its own key.
            OrderBy::Token(index) => hash_key(subject.split('.').nth(*index).unwrap_or(subject)),
            OrderBy::Key(key) => key(message.headers.as_ref(), &message.payload).unwrap_or_else(|| hash_key(subject)),
        }
    }
}

/// Hashes an ordering key; the same key always gives the same lane within a process.
#[doc(hidden)]
pub fn hash_key<K: std::hash::Hash + ?Sized>(key: &K) -> u64 {
    use std::hash::Hasher;
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    hasher.finish()
}

/// Where a new consumer starts reading its stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Deliver {
    /// From the first message still in the stream.
    #[default]
    All,
    /// Only messages stored after the consumer was created.
    New,
    /// From the last message in the stream.
    Last,
    /// From the last message of each subject.
    LastPerSubject,
    /// From this stream sequence.
    FromSequence(u64),
    /// From the first message stored at or after this RFC 3339 time, e.g. `"2026-11-01T00:00:00Z"`.
    FromTime(&'static str),
}

/// A running consumer: the definition plus what it needs to bind and recover.
pub(crate) struct Consumer {
    def: ConsumerDef,
    shared: Arc<ConsumerShared>,
    provision: Provision,
    /// The declaration of this consumer's stream, if the service declares it: used to
    /// re-create a stream that vanished (a memory stream after a server restart).
    stream_def: Option<StreamDef>,
    pacing: Pacing,
    /// The consumer's `ack_wait` as the server has it (read at each bind; the declared one, or
    /// the server's default, until then), for in-progress pings.
    ack_wait_nanos: AtomicU64,
    /// What this instance read and has not settled, kept alive together.
    held: Held,
    /// Signalled when a handler slot frees up or a waiting message starts: the pull loop may
    /// ask for more.
    room: tokio::sync::Notify,
    dead_letter: async_nats::Subject,
    /// The consumer's name on the server: the durable name, or a fresh one per ephemeral instance.
    name: Arc<str>,
    pub(crate) metrics: ConsumerMetrics,
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
        });
        Consumer {
            def,
            shared,
            provision,
            stream_def,
            pacing: Pacing::default(),
            ack_wait_nanos: AtomicU64::new(def.ack_wait.unwrap_or(Duration::from_secs(30)).as_nanos() as u64),
            held: Held::default(),
            room: tokio::sync::Notify::new(),
            dead_letter: def.dead_letter_subject().into(),
            name,
            metrics,
        }
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
        let ack_wait = consumer.cached_info().config.ack_wait;
        self.ack_wait_nanos
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
                    self.js()
                        .get_stream(def.stream)
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
            Provision::CreateOrUpdate => def.drift(&info.config),
            Provision::VerifyOnly | Provision::Off => None,
        };
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
        let this = Arc::new(self);
        let concurrency = this.def.concurrency;
        let permits = Arc::new(Semaphore::new(concurrency));
        let lanes = Lanes::default();
        // Messages read and held but not started (an ordered consumer's wait in their lanes).
        let mut queue: VecDeque<Ready> = VecDeque::new();
        // With one handler slot the handler runs in this task, sparing a spawn per message; it
        // is polled beside the pull, so messages keep being read, held and kept alive meanwhile.
        let mut inline = Inline::new();
        let keep_alive = tokio::spawn(this.clone().keep_alive());
        // A handler running in this task wakes the loop when it ends; spawned handlers and
        // lanes signal `room` instead.
        let signalled = concurrency > 1 || this.def.order_by.is_some();
        let mut failures = 0u32;
        loop {
            let started = beside(
                &mut inline,
                Puller::start(this.shared.client.nats(), this.def.stream, &this.name),
            )
            .await;
            let mut puller = match started {
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
                // Start what can start now: the permit is taken without waiting (no waiter is
                // registered on the hot path); a slot that frees up later wakes the loop.
                while !queue.is_empty() {
                    let Ok(permit) = permits.clone().try_acquire_owned() else {
                        break;
                    };
                    let ready = queue.pop_front().expect("the queue is not empty");
                    let delivery = this.clone().deliver(ready, permit, hard_stop.clone());
                    if concurrency == 1 {
                        inline.start(delivery);
                    } else {
                        tokio::spawn(delivery);
                    }
                }
                // Credits cover the free handler slots plus the prefetch, less what was already
                // read and waits: a message is asked for only when there is room to start it soon.
                let busy = concurrency - permits.available_permits();
                let waiting = queue.len() + lanes.waiting();
                let prefetch = this
                    .pacing
                    .prefetch(concurrency, this.def.max_prefetch(), this.def.prefetch.is_some());
                if let Err(error) = puller
                    .top_up((concurrency + prefetch).saturating_sub(busy + waiting))
                    .await
                {
                    tracing::warn!(stream = this.def.stream, consumer = &*this.name, error = %crate::error::chain(&error), "cannot send a pull request");
                }
                let pulled = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break false,
                    Some(()) = inline.next(), if !inline.is_empty() => continue,
                    _ = this.room.notified(), if signalled => continue,
                    pulled = puller.next() => pulled,
                };
                match pulled {
                    Pulled::Message(message) => {
                        failures = 0;
                        let Some(ready) = this.take_hold(message) else {
                            continue;
                        };
                        match this.def.order_by {
                            Some(order_by) => {
                                lanes.dispatch(this.clone(), order_by, ready, &permits, &cancel, &hard_stop)
                            }
                            None => queue.push_back(ready),
                        }
                    }
                    Pulled::Credits => {}
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
                beside(&mut inline, this.hand_back(puller)).await;
                break;
            }
            drop(puller);
            if !beside(&mut inline, this.rebind(&cancel, &mut failures)).await {
                break;
            }
        }
        // What was read but not started goes back to the server at once, for another instance.
        for ready in queue.drain(..) {
            beside(&mut inline, this.give_back(ready)).await;
        }
        // In-flight handlers hold permits; they release them when settled (or naked at hard_stop).
        while inline.next().await.is_some() {}
        lanes.finish().await;
        let _ = permits.acquire_many(concurrency as u32).await;
        keep_alive.abort();
        let left = this.held.sequences();
        if !left.is_empty() {
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
        Ok(())
    }

    /// Holds a message just read: `None` for a redelivery of one this instance still holds (the
    /// copy being worked on settles it; handling it again would run it twice) or for anything
    /// that is not a JetStream delivery.
    fn take_hold(&self, message: async_nats::Message) -> Option<Ready> {
        let reply = message.reply.clone()?;
        let Some((sequence, delivered)) = delivery_info(&reply) else {
            tracing::warn!(reply = %reply, "received a message that is not a JetStream delivery; ignored");
            return None;
        };
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
        self.settle(ready.reply).send(Bytes::from_static(b"-NAK")).await;
        self.held.release(ready.sequence);
        self.metrics.naked.inc();
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
            let every =
                Duration::from_nanos(self.ack_wait_nanos.load(Ordering::Relaxed) / 4).max(Duration::from_millis(5));
            tokio::time::sleep(every).await;
            for reply in self.held.tick() {
                self.settle(reply).send(Bytes::from_static(b"+WPI")).await;
            }
        }
    }

    /// Stops pulling and returns prefetched messages that were not started to the server at
    /// once, so another instance can take them instead of waiting out ack_wait.
    pub(crate) async fn hand_back(&self, puller: Puller) {
        let prefetched = puller.stop(HAND_BACK_WITHIN).await;
        let mut handed_back = 0;
        for message in prefetched {
            let Some(reply) = message.reply else { continue };
            // A redelivery of a message still held here: a nak would send the one being worked
            // on back to the server too.
            if delivery_info(&reply).is_some_and(|(sequence, _)| self.held.contains(sequence)) {
                continue;
            }
            self.settle(reply).send(Bytes::from_static(b"-NAK")).await;
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

    /// Runs the handler for one message and settles it, in a span that continues the trace
    /// the message's headers carry. Holds `permit` until settled.
    async fn deliver(self: Arc<Self>, ready: Ready, permit: OwnedSemaphorePermit, hard_stop: CancellationToken) {
        let Ready {
            message,
            reply,
            sequence: stream_sequence,
            delivered: delivery_count,
        } = ready;
        let def = &self.def;
        // What logs and trace context need of this delivery, for the handler's whole run.
        let scope = DeliveryScope {
            handler: def.name,
            stream: def.stream,
            consumer: self.name.clone(),
            subject: message.subject.clone(),
            sequence: stream_sequence,
            delivery_count,
            trace: crate::telemetry::trace::incoming(message.headers.as_ref()),
        };
        // A span per delivery only where something records it: with natty's own subscriber and
        // no exporter, the scope gives logs their fields and publishes their trace context.
        let span = (!crate::telemetry::light()).then(|| {
            let span = tracing::info_span!(
                "natty.deliver",
                otel.kind = "consumer",
                otel.status_code = tracing::field::Empty,
                handler = def.name,
                stream = def.stream,
                consumer = &*self.name,
                subject = %message.subject,
                sequence = stream_sequence,
                delivery_count,
                outcome = tracing::field::Empty,
                duration_ms = tracing::field::Empty,
            );
            crate::telemetry::trace::adopt(&span, message.headers.as_ref());
            span
        });
        let metrics = &self.metrics;
        metrics.delivered.inc();
        let in_flight = metrics.enter();
        let started = span.is_some().then(std::time::Instant::now);
        let settle = self.settle_one(message, reply, stream_sequence, delivery_count, &hard_stop);
        let settled = match &span {
            Some(span) => scope.run(settle.instrument(span.clone())).await,
            None => scope.run(settle).await,
        };
        drop(in_flight);
        // Settled (or given up on at the drain timeout): no longer ours to keep alive.
        self.held.release(stream_sequence);
        drop(permit);
        self.room.notify_one();
        settled.count(metrics);
        if let (Some(span), Some(started)) = (span, started) {
            if settled != Settled::Acked {
                span.record("otel.status_code", "error");
            }
            span.record("outcome", settled.as_str());
            span.record("duration_ms", started.elapsed().as_secs_f64() * 1e3);
        }
    }

    /// Runs the handler (again, in place, for an ordered consumer) until the message is settled.
    async fn settle_one(
        &self,
        message: async_nats::Message,
        reply: Subject,
        stream_sequence: u64,
        delivery_count: u64,
        hard_stop: &CancellationToken,
    ) -> Settled {
        let settle = Settle {
            client: self.shared.client.nats(),
            reply: reply.clone(),
        };
        // Kept for a dead letter and for retries in place: the handler takes its delivery.
        let original = Original {
            subject: message.subject,
            payload: message.payload,
            headers: message.headers.map(Arc::new),
            stream_sequence,
            delivery_count,
        };
        let def = &self.def;
        // Ordered consumers retry in place, holding their key's lane, so that the message
        // after this one never overtakes it; others nak and let the server redeliver.
        let in_place = def.order_by.is_some();
        // The rare paths below (dead letter, nak with a delay, retry in place) are boxed: inline,
        // their state would be part of every delivery's future, which is moved to the heap per
        // message (3,040 bytes with them inline, 2,304 boxed).
        let mut attempt = delivery_count;
        loop {
            let delivery = Delivery {
                subject: original.subject.clone(),
                reply: reply.clone(),
                payload: original.payload.clone(),
                headers: original.headers.clone(),
                stream_sequence,
                delivery_count: attempt,
                shared: self.shared.clone(),
            };
            let Some(outcome) = self.attempt(delivery, &settle, hard_stop).await else {
                return Settled::CutOff;
            };
            let last_attempt = def.max_deliver.is_some_and(|max| attempt >= max as u64);
            let failure = match outcome {
                Ok(Outcome::Ack) => {
                    settle.send(Bytes::from_static(b"+ACK")).await;
                    return Settled::Acked;
                }
                Ok(Outcome::Failed(error)) => match error.downcast::<Reject>() {
                    Ok(reject) => match reject.0 {
                        RejectKind::Terminate(reason) => {
                            tracing::warn!(handler = def.name, stream = def.stream, consumer = &*self.name,
                                sequence = stream_sequence, %reason, "handler terminated the message");
                            return Box::pin(self.dead_letter_and_terminate(&settle, original, &reason)).await;
                        }
                        RejectKind::Retry if !last_attempt && !in_place => {
                            Box::pin(settle.send(Bytes::from_static(b"-NAK"))).await;
                            return Settled::Naked;
                        }
                        RejectKind::RetryAfter(delay) if !last_attempt && !in_place => {
                            Box::pin(settle.nak(delay)).await;
                            return Settled::Naked;
                        }
                        RejectKind::Retry => (Duration::ZERO, "the handler asked for a retry".to_string()),
                        RejectKind::RetryAfter(delay) => (delay, "the handler asked for a retry".to_string()),
                    },
                    Err(error) => (def.retry_delay(attempt), crate::error::chain(&*error).to_string()),
                },
                Ok(Outcome::Undecodable(error)) => {
                    tracing::error!(
                        handler = def.name, stream = def.stream, consumer = &*self.name, sequence = stream_sequence,
                        payload_type = error.type_name, error = %crate::error::chain(&error),
                        "terminating a message whose payload cannot be decoded (stream {}, consumer {}, sequence {})",
                        def.stream, self.name, stream_sequence
                    );
                    let reason = crate::error::chain(&error).to_string();
                    return Box::pin(self.dead_letter_and_terminate(&settle, original, &reason)).await;
                }
                Err(panic) => {
                    let what = panic_message(&*panic);
                    (def.retry_delay(attempt), format!("the handler panicked: {what}"))
                }
            };
            let (delay, failure) = failure;
            if last_attempt {
                let reason = format!("failed on the last of {attempt} deliveries: {failure}");
                tracing::error!(handler = def.name, stream = def.stream, consumer = &*self.name,
                    sequence = stream_sequence, %reason, "giving up on the message");
                return Box::pin(self.dead_letter_and_terminate(&settle, original, &reason)).await;
            }
            tracing::warn!(
                handler = def.name, stream = def.stream, consumer = &*self.name, sequence = stream_sequence,
                delivery_count = attempt, error = %failure, retry_in = ?delay,
                "handler failed; the message will be redelivered"
            );
            if !in_place {
                Box::pin(settle.nak(delay)).await;
                return Settled::Naked;
            }
            // Wait out the delay holding the message (pinging so it stays ours), then go again.
            if !Box::pin(self.hold(&settle, hard_stop, delay)).await {
                return Settled::CutOff;
            }
            attempt += 1;
        }
    }

    /// Runs the handler once; `None` if the drain timeout cut it off (the message was naked).
    async fn attempt(
        &self,
        delivery: Delivery,
        settle: &Settle<'_>,
        hard_stop: &CancellationToken,
    ) -> Option<std::thread::Result<Outcome>> {
        let def = &self.def;
        let sequence = delivery.stream_sequence;
        // Runs inside the delivery's span (see `deliver`).
        let handled = AssertUnwindSafe((def.handler)(delivery)).catch_unwind();
        tokio::pin!(handled);
        let started = std::time::Instant::now();
        // The keep-alive task pings the message while the handler runs (see `keep_alive`).
        tokio::select! {
            biased;
            outcome = &mut handled => {
                let took = started.elapsed();
                self.pacing.record(took);
                self.metrics.handled_in(took);
                Some(outcome)
            }
            _ = hard_stop.cancelled() => {
                tracing::warn!(stream = def.stream, consumer = &*self.name, sequence,
                    "drain timeout: handler still running; nak so the message is redelivered");
                Box::pin(settle.send(Bytes::from_static(b"-NAK"))).await;
                None
            }
        }
    }

    /// Keeps a message for `delay` without handling it (the keep-alive task pings it); false if
    /// the drain timeout came first (the message was naked).
    async fn hold(&self, settle: &Settle<'_>, hard_stop: &CancellationToken, delay: Duration) -> bool {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(delay) => true,
            _ = hard_stop.cancelled() => {
                settle.send(Bytes::from_static(b"-NAK")).await;
                false
            }
        }
    }

    /// Republishes the message to the dead-letter subject, with where it came from and why in
    /// its headers, then terminates it. The copy carries a message id derived from the stream,
    /// the consumer and the sequence, so a retried dead letter is stored once, and two
    /// consumers giving up on one message store one each. A copy that the headers would push
    /// past the server's `max_payload` is sent without its payload, saying so. If the copy cannot
    /// be stored, the message is naked instead of terminated: it is never dropped unrecorded.
    pub(crate) async fn dead_letter_and_terminate(
        &self,
        settle: &Settle<'_>,
        original: Original,
        reason: &str,
    ) -> Settled {
        let def = &self.def;
        // Header values are single lines.
        let reason = reason.replace(['\r', '\n'], " ");
        let mut headers = without_publish_directives(original.headers.map(Arc::unwrap_or_clone));
        headers.insert("Natty-Dead-Letter-Reason", reason.as_str());
        headers.insert("Natty-Original-Subject", original.subject.as_str());
        headers.insert("Natty-Original-Stream", def.stream);
        headers.insert("Natty-Original-Consumer", &*self.name);
        headers.insert("Natty-Original-Sequence", original.stream_sequence.to_string().as_str());
        headers.insert("Natty-Delivery-Count", original.delivery_count.to_string().as_str());
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!(
                "natty-dead-letter:{}:{}:{}",
                def.stream, self.name, original.stream_sequence
            )
            .as_str(),
        );
        let mut payload = original.payload;
        let mut stored = false;
        for attempt in 0..3u32 {
            let sent = self
                .js()
                .publish_with_headers(self.dead_letter.clone(), headers.clone(), payload.clone())
                .await;
            match sent {
                Ok(ack) => match ack.await {
                    Ok(_) => {
                        stored = true;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(error = %crate::error::chain(&error), attempt, subject = %self.dead_letter, "dead letter not acked")
                    }
                },
                Err(error)
                    if error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                        && !payload.is_empty() =>
                {
                    // The original fitted; its copy with natty's headers does not. The record of
                    // what failed, and why, matters more than a second copy of the payload.
                    let omitted = format!(
                        "{} bytes: with the dead-letter headers the copy exceeds the server's max_payload; the original is sequence {} of stream {}",
                        payload.len(),
                        original.stream_sequence,
                        def.stream
                    );
                    tracing::warn!(subject = %self.dead_letter, %omitted, "dead letter sent without its payload");
                    headers.insert("Natty-Payload-Omitted", omitted.as_str());
                    payload = Bytes::new();
                    continue;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error::chain(&error), attempt, subject = %self.dead_letter, "cannot publish the dead letter")
                }
            }
            settle.send(Bytes::from_static(b"+WPI")).await;
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        if stored {
            settle.send(format!("+TERM {reason}").into()).await;
            Settled::Terminated
        } else {
            tracing::error!(
                stream = def.stream, consumer = &*self.name, sequence = original.stream_sequence,
                dead_letter = %self.dead_letter, %reason,
                "cannot store the dead letter (is a stream capturing its subject?); the message stays in its stream, naked"
            );
            settle.nak(Duration::from_secs(30)).await;
            Settled::Naked
        }
    }
}

/// Headers that direct how the server stores a publish (optimistic concurrency, TTL, rollup,
/// counters, schedules, batches) rather than describe the message: a copy carrying the original's
/// `Nats-Expected-Last-Subject-Sequence` would be refused by the dead-letter stream forever.
const PUBLISH_DIRECTIVES: &[&str] = &[
    "nats-expected-",
    "nats-rollup",
    "nats-ttl",
    "nats-incr",
    "nats-schedule",
    "nats-batch-",
    "nats-required-api-level",
];

/// The original's headers, less those that would direct how the dead-letter stream stores
/// its copy.
fn without_publish_directives(headers: Option<async_nats::HeaderMap>) -> async_nats::HeaderMap {
    let mut kept = async_nats::HeaderMap::new();
    for (name, values) in headers.iter().flat_map(async_nats::HeaderMap::iter) {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        if PUBLISH_DIRECTIVES.iter().any(|directive| lower.starts_with(directive)) {
            continue;
        }
        for value in values {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The handler succeeded; acked.
    Acked,
    /// Naked for redelivery.
    Naked,
    /// Terminated, its copy stored in the dead-letter subject.
    Terminated,
    /// The drain timeout cut the handler off; naked.
    CutOff,
}

impl Settled {
    /// Counts the outcome in the consumer's metrics; each delivery is counted once, here.
    pub(crate) fn count(self, metrics: &crate::telemetry::metrics::ConsumerMetrics) {
        match self {
            Settled::Acked => metrics.acked.inc(),
            Settled::Naked | Settled::CutOff => metrics.naked.inc(),
            Settled::Terminated => {
                metrics.dead_lettered.inc();
                metrics.terminated.inc()
            }
        };
    }

    fn as_str(self) -> &'static str {
        match self {
            Settled::Acked => "ack",
            Settled::Naked => "nak",
            Settled::Terminated => "term",
            Settled::CutOff => "nak (drain timeout)",
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

/// The messages a consumer holds — read from the server and not yet settled — with when each
/// was last pinged, for [`Consumer::keep_alive`] and to recognise redeliveries of them.
///
/// "When" is counted in keep-alive ticks, not read from the clock: holding a message is on
/// every delivery's path, and a clock read cost more than the rest of it.
#[derive(Default)]
pub(crate) struct Held {
    messages: std::sync::Mutex<HashMap<u64, HeldMessage, SequenceHash>>,
    /// Keep-alive ticks so far.
    tick: AtomicU64,
}

/// Hashes stream sequences for [`Held`]: they are unique integers chosen by the server, not
/// by an adversary, so one multiplication spreads them well; SipHash would cost more than the
/// rest of holding a message.
type SequenceHash = std::hash::BuildHasherDefault<SequenceHasher>;

#[derive(Default)]
pub(crate) struct SequenceHasher(u64);

impl std::hash::Hasher for SequenceHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

struct HeldMessage {
    reply: Subject,
    /// The tick it was held or last pinged in.
    pinged: u64,
}

impl Held {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HeldMessage, SequenceHash>> {
        self.messages.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds the message at `sequence`; false when it is held already.
    fn hold(&self, sequence: u64, reply: &Subject) -> bool {
        let tick = self.tick.load(Ordering::Relaxed);
        match self.lock().entry(sequence) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(HeldMessage {
                    reply: reply.clone(),
                    pinged: tick,
                });
                true
            }
        }
    }

    fn release(&self, sequence: u64) {
        self.lock().remove(&sequence);
    }

    fn contains(&self, sequence: u64) -> bool {
        self.lock().contains_key(&sequence)
    }

    /// Starts the next tick and returns the reply subjects of messages last pinged (or held)
    /// before the tick that just ended — at least one whole tick ago —, marked pinged now.
    fn tick(&self) -> Vec<Subject> {
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock()
            .values_mut()
            .filter(|held| held.pinged + 2 <= now)
            .map(|held| {
                held.pinged = now;
                held.reply.clone()
            })
            .collect()
    }

    /// The sequences held, in order.
    fn sequences(&self) -> Vec<u64> {
        let mut sequences: Vec<u64> = self.lock().keys().copied().collect();
        sequences.sort_unstable();
        sequences
    }
}

/// Per-key queues of an ordered consumer: a key with a message in progress gets later messages
/// queued behind it; each busy key has one task working through its queue in order, taking a
/// handler slot for each message. Waiting messages hold no slot, so a busy key never keeps
/// other keys from running; they are held, and so kept alive, while they wait.
#[derive(Default, Clone)]
struct Lanes(Arc<LanesInner>);

#[derive(Default)]
struct LanesInner {
    queues: std::sync::Mutex<HashMap<u64, VecDeque<Ready>>>,
    /// Messages in the lanes that have not started: they count against the prefetch.
    waiting: AtomicUsize,
    tasks: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl Lanes {
    fn waiting(&self) -> usize {
        self.0.waiting.load(Ordering::Relaxed)
    }

    /// Queues `ready` in its key's lane, starting a task for the lane when it was idle. A key
    /// function that panics is that message's failure: it is dead-lettered with the reason.
    fn dispatch(
        &self,
        consumer: Arc<Consumer>,
        order_by: OrderBy,
        ready: Ready,
        permits: &Arc<Semaphore>,
        cancel: &CancellationToken,
        hard_stop: &CancellationToken,
    ) {
        let mut tasks = self.0.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while tasks.try_join_next().is_some() {}
        let key = match std::panic::catch_unwind(AssertUnwindSafe(|| order_by.lane(&ready.message))) {
            Ok(key) => key,
            Err(panic) => {
                let reason = format!("the order_by key function panicked: {}", panic_message(&*panic));
                tasks.spawn(async move { consumer.give_up(ready, &reason).await });
                return;
            }
        };
        self.0.waiting.fetch_add(1, Ordering::Relaxed);
        {
            let mut queues = self.0.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(queue) = queues.get_mut(&key) {
                queue.push_back(ready);
                return;
            }
            queues.insert(key, VecDeque::new());
        }
        let (lanes, permits, cancel, hard_stop) = (self.clone(), permits.clone(), cancel.clone(), hard_stop.clone());
        tasks.spawn(async move {
            let mut next = Some(ready);
            while let Some(ready) = next.take() {
                // Shutting down: what has not started goes back to the server at once.
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => None,
                    permit = permits.clone().acquire_owned() => permit.ok(),
                };
                lanes.0.waiting.fetch_sub(1, Ordering::Relaxed);
                consumer.room.notify_one();
                match permit {
                    Some(permit) => consumer.clone().deliver(ready, permit, hard_stop.clone()).await,
                    None => consumer.give_back(ready).await,
                }
                let mut queues = lanes.0.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(waiting) => next = Some(waiting),
                    None => {
                        queues.remove(&key);
                    }
                }
            }
        });
    }

    /// Waits for every lane to be worked through (or handed back, on shutdown).
    async fn finish(&self) {
        let mut tasks = std::mem::take(&mut *self.0.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        while tasks.join_next().await.is_some() {}
    }
}

/// Runs `step` while still driving the handler that runs in the consumer's own task.
async fn beside<T, F: std::future::Future<Output = ()>>(
    inline: &mut Inline<F>,
    step: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(step);
    loop {
        tokio::select! {
            biased;
            output = &mut step => return output,
            Some(()) = inline.next(), if !inline.is_empty() => {}
        }
    }
}

/// The one delivery a consumer with a single handler slot runs in its own task. Its place is
/// allocated once and reused: a box (and a task of a `FuturesUnordered`) per message cost more
/// than the rest of starting one.
struct Inline<F>(std::pin::Pin<Box<Option<F>>>);

impl<F: std::future::Future<Output = ()>> Inline<F> {
    fn new() -> Self {
        Inline(Box::pin(None))
    }

    fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Starts `delivery`; the previous one must have ended.
    fn start(&mut self, delivery: F) {
        debug_assert!(self.is_empty(), "one delivery at a time");
        self.0.set(Some(delivery));
    }

    /// Runs the delivery until it ends (`Some`), or `None` at once when there is none.
    async fn next(&mut self) -> Option<()> {
        std::future::poll_fn(|cx| match self.0.as_mut().as_pin_mut() {
            None => std::task::Poll::Ready(None),
            Some(delivery) => delivery.poll(cx).map(|()| {
                self.0.set(None);
                Some(())
            }),
        })
        .await
    }
}

/// What a caught panic says.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-string panic".into())
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

/// What a dead letter needs of the original message.
pub(crate) struct Original {
    pub(crate) subject: async_nats::Subject,
    pub(crate) payload: Bytes,
    /// Shared with the handler's `Delivery` (see there).
    pub(crate) headers: Option<Arc<async_nats::HeaderMap>>,
    pub(crate) stream_sequence: u64,
    pub(crate) delivery_count: u64,
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

/// Redelivery delay after a handler error, without a declared backoff: 100 ms, doubling per
/// attempt, at most 10 s, so a failing dependency is not hammered and a transient failure is
/// retried quickly.
fn default_retry_delay(delivery_count: u64) -> Duration {
    let exponent = delivery_count.saturating_sub(1).min(7) as u32;
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(10))
}

/// Settles a message by publishing to its reply subject (what async-nats' `Acker` does), so
/// that `+TERM` can carry a reason.
pub(crate) struct Settle<'a> {
    /// Borrowed: a client clone is a dozen reference counts and a channel sender, per message.
    pub(crate) client: &'a async_nats::Client,
    pub(crate) reply: Subject,
}

impl Settle<'_> {
    pub(crate) async fn send(&self, body: Bytes) {
        match tokio::time::timeout(SETTLE_WITHIN, self.client.publish(self.reply.clone(), body)).await {
            Ok(Ok(())) => {}
            // The server will redeliver after ack_wait: at-least-once holds.
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::error::chain(&error), "cannot settle a message; it will be redelivered after ack_wait")
            }
            Err(_) => tracing::warn!(
                within = ?SETTLE_WITHIN,
                "cannot settle a message: the connection takes nothing (is the server gone?); it will be redelivered after ack_wait"
            ),
        }
    }

    async fn nak(&self, delay: Duration) {
        self.send(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()).into())
            .await;
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
