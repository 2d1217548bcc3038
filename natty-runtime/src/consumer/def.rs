//! What a `#[consumer]` declares: [`ConsumerDef`] with its defaults, how it becomes the
//! server's consumer configuration, and how a server's consumer drifts from it.

use super::*;

/// The adapter a `#[consumer]` generates: decodes, calls the handler, reports the outcome.
pub type HandlerFn = fn(Delivery) -> BoxFuture<'static, Outcome>;
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
    /// How many partitions its group has (0: not a group; see [`ConsumerDef::partitions`]).
    pub(crate) partitions: u32,
    /// Set on the consumer of one partition of a group: which one.
    pub(crate) partition: Option<u32>,
    pub(crate) ack: super::Ack,
    pub(crate) handler: HandlerFn,
    /// Set for a batch handler, which runs instead of `handler`.
    pub(crate) batch: Option<super::batch::BatchDef>,
    pub(crate) location: Location,
    /// The state types its arguments take (see [`crate::State`]), checked at startup.
    pub(crate) needs: &'static [crate::state::NeedFn],
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
            partitions: 0,
            partition: None,
            ack: super::Ack::Sent,
            handler,
            batch: None,
            location: Location::UNKNOWN,
            needs: &[],
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

    /// How a handler's success is acked: sent (the default) or [`Ack::Confirmed`](super::Ack::Confirmed),
    /// waiting for the server to confirm it and sending it again until it does.
    pub const fn ack(mut self, ack: super::Ack) -> Self {
        self.ack = ack;
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

    /// Makes the durable a partitioned group of `partitions` partitions (Kafka-like scale-out):
    /// each message belongs to the partition of its [`order_by`](Self::order_by) key, computed
    /// by the server from the subject; each partition is owned by one live instance at a time,
    /// spread evenly over the instances running, and handed over when one joins or leaves. The
    /// order of a key then holds across every instance. Needs a durable, one subject with the key
    /// under a `*` wildcard, and `order_by` on the subject or one of its tokens; the group is
    /// checked at startup (see the consumers guide, "Partitioned groups").
    pub const fn partitions(mut self, partitions: u32) -> Self {
        self.partitions = partitions;
        self
    }

    /// How many partitions its group has; 0 for a consumer that is not a group.
    pub fn partition_count(&self) -> u32 {
        self.partitions
    }

    /// Makes this a batch consumer: `handler` gets up to `size` messages at once, fewer once
    /// `wait` has passed since the first of them arrived (see [`Batch`](crate::Batch)). The
    /// macros set it for `#[consumer(..., batch = 500, batch_wait = "100ms")]`.
    pub const fn batch(mut self, size: usize, wait: Duration, handler: super::batch::BatchHandlerFn) -> Self {
        self.batch = Some(super::batch::BatchDef {
            size: if size == 0 { 1 } else { size },
            wait,
            handler,
        });
        self
    }

    crate::payload::handler_definition_setters!("the payload type the handler decodes", "MyPayload");

    crate::state::needs_setter!();

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
    pub(super) fn server_config(&self, consumer: &str) -> Result<pull::Config> {
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
    pub(super) fn apply(&self, consumer: &str, config: &mut pull::Config) -> Result<()> {
        use async_nats::jetstream::consumer::DeliverPolicy;
        config.deliver_policy = match self.deliver {
            Deliver::All => DeliverPolicy::All,
            Deliver::New => DeliverPolicy::New,
            Deliver::Last => DeliverPolicy::Last,
            Deliver::LastPerSubject => DeliverPolicy::LastPerSubject,
            Deliver::FromSequence(start_sequence) => DeliverPolicy::ByStartSequence { start_sequence },
            Deliver::FromTime(rfc3339) => DeliverPolicy::ByStartTime {
                start_time: ConsumerDef::start_time(consumer, rfc3339)?,
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

    /// `start_time` of consumer `consumer` as the server takes it; a time that is not RFC 3339
    /// is a config error.
    pub(crate) fn start_time(consumer: &str, rfc3339: &str) -> Result<async_nats::datetime::DateTime> {
        async_nats::datetime::parse_rfc3339(rfc3339).map_err(|error| {
            Error::config(
                format!("start_time of consumer `{consumer}`"),
                rfc3339,
                format!("not an RFC 3339 time: {error}"),
            )
        })
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

    pub(super) fn error<'a>(
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

/// Redelivery delay after a handler error, without a declared backoff: 100 ms, doubling per
/// attempt, at most 10 s, so a failing dependency is not hammered and a transient failure is
/// retried quickly.
pub(super) fn default_retry_delay(delivery_count: u64) -> Duration {
    let exponent = delivery_count.saturating_sub(1).min(7) as u32;
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(10))
}
