//! Prometheus metrics: one registry per connection, with per-handler handles resolved once at
//! start so that counting a message is an atomic add, not a label lookup.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::latency::Latency;

type Labels = Vec<(&'static str, String)>;
type Counters = Family<Labels, Counter>;
type Gauges = Family<Labels, Gauge>;
type Histograms = Family<Labels, Latency>;

/// Every metric natty exports, registered once.
pub(crate) struct Metrics {
    registry: Registry,
    delivered: Counters,
    acked: Counters,
    naked: Counters,
    terminated: Counters,
    dead_lettered: Counters,
    acks_unconfirmed: Counters,
    handler_seconds: Histograms,
    in_flight: Gauges,
    pending: Gauges,
    ack_pending: Gauges,
    redelivered: Gauges,
    is_leader: Gauges,
    terms: Counters,
    partitions_owned: Gauges,
    handovers: Counters,
    capture_blocks: Counters,
    capture_bytes: Counters,
    capture_messages: Counters,
    capture_store_seconds: Histograms,
    capture_store_failures: Counters,
    capture_held: Gauges,
    capture_open_blocks: Gauges,
    published: Counters,
    /// `published` by stream name, resolved once per stream.
    published_by_stream: RwLock<HashMap<String, Counter>>,
    publish_failures: Counter,
    connected: Gauge,
    reconnects: Counter,
    connects_seen: AtomicU64,
    /// The consumers whose server-side counts (pending, ack pending) are read at each scrape.
    consumers: Mutex<Vec<Watched>>,
    /// Leaders, groups and captures, for the console.
    pub(crate) board: Mutex<Board>,
}

/// A consumer to ask the server about at scrape time, with its counters (the console sums
/// them per handler).
#[derive(Clone)]
pub(crate) struct Watched {
    pub(crate) handler: &'static str,
    pub(crate) stream: &'static str,
    pub(crate) consumer: String,
    /// What its series are labelled with: the consumer's name, or `ephemeral`.
    label: String,
    pending: Gauge,
    ack_pending: Gauge,
    redelivered: Gauge,
    pub(crate) counts: ConsumerMetrics,
    /// Whether a scrape reads its server-side counts: while this instance runs it.
    pub(crate) scraped: bool,
}

impl Watched {
    /// Records the server's counts for this consumer.
    pub(crate) fn record(&self, pending: u64, ack_pending: usize, redelivered: usize) {
        self.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.ack_pending.set(ack_pending as i64);
        self.redelivered.set(redelivered as i64);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// A consumer's counters, shared by its deliveries.
#[derive(Clone, Default)]
pub(crate) struct ConsumerMetrics {
    pub(crate) delivered: Counter,
    pub(crate) acked: Counter,
    pub(crate) naked: Counter,
    pub(crate) terminated: Counter,
    pub(crate) dead_lettered: Counter,
    pub(crate) acks_unconfirmed: Counter,
    pub(crate) handler_seconds: Option<Latency>,
    pub(crate) in_flight: Gauge,
}

impl ConsumerMetrics {
    /// Counts a message in flight until the returned guard is dropped, however the delivery ends.
    pub(crate) fn enter(&self) -> InFlight<'_> {
        self.in_flight.inc();
        InFlight(&self.in_flight)
    }

    /// Records how long one handler call took.
    pub(crate) fn handled_in(&self, took: Duration) {
        if let Some(histogram) = &self.handler_seconds {
            histogram.observe(took);
        }
    }
}

/// A message counted in flight; uncounted on drop.
pub(crate) struct InFlight<'a>(&'a Gauge);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A leader task's gauges, and its term for the console.
#[derive(Clone, Default)]
pub(crate) struct LeaderMetrics {
    pub(crate) is_leader: Gauge,
    pub(crate) terms: Counter,
    /// The term this instance holds: its fencing token and since when.
    pub(crate) term: Arc<Mutex<Option<(u64, SystemTime)>>>,
}

impl LeaderMetrics {
    /// A term begins.
    pub(crate) fn began(&self, token: u64) {
        self.terms.inc();
        self.is_leader.set(1);
        if let Ok(mut term) = self.term.lock() {
            *term = Some((token, SystemTime::now()));
        }
    }

    /// The term ended.
    pub(crate) fn ended(&self) {
        self.is_leader.set(0);
        if let Ok(mut term) = self.term.lock() {
            *term = None;
        }
    }
}

/// A partitioned group's gauge and counter, for one instance, and who owns what.
#[derive(Clone, Default)]
pub(crate) struct GroupMetrics {
    pub(crate) owned: Gauge,
    pub(crate) handovers: Counter,
    /// The partitions this instance runs, and every partition's lease holder as last read.
    pub(crate) ownership: Arc<Mutex<Ownership>>,
}

/// The partitions an instance runs, and every partition's lease holder (`None`: free).
pub(crate) type Ownership = (Vec<u32>, Vec<Option<String>>);

/// The last block a capture stored, for the console.
#[derive(Clone, Debug)]
#[cfg_attr(not(feature = "capture"), allow(dead_code))] // made only by a capture
pub(crate) struct StoredBlock {
    pub(crate) path: String,
    pub(crate) bytes: u64,
    pub(crate) at: SystemTime,
}

/// What the console lists besides consumers: every leader, group and capture of this instance.
#[derive(Default)]
pub(crate) struct Board {
    /// Name, bucket, key.
    pub(crate) leaders: Vec<(&'static str, &'static str, &'static str, LeaderMetrics)>,
    /// Consumer name, group (its derived stream).
    pub(crate) groups: Vec<(&'static str, &'static str, GroupMetrics)>,
    /// Name, stream.
    #[cfg(feature = "capture")]
    pub(crate) captures: Vec<(&'static str, &'static str, CaptureMetrics)>,
}

/// A capture's counters.
#[cfg(feature = "capture")]
#[derive(Clone)]
pub(crate) struct CaptureMetrics {
    pub(crate) blocks: Counter,
    pub(crate) bytes: Counter,
    pub(crate) messages: Counter,
    pub(crate) store_seconds: Latency,
    pub(crate) store_failures: Counter,
    pub(crate) held: Gauge,
    pub(crate) open_blocks: Gauge,
    pub(crate) last_block: Arc<Mutex<Option<StoredBlock>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("natty");
        let metrics = Metrics {
            registry: Registry::default(),
            delivered: Counters::default(),
            acked: Counters::default(),
            naked: Counters::default(),
            terminated: Counters::default(),
            dead_lettered: Counters::default(),
            acks_unconfirmed: Counters::default(),
            handler_seconds: Histograms::default(),
            in_flight: Gauges::default(),
            pending: Gauges::default(),
            ack_pending: Gauges::default(),
            redelivered: Gauges::default(),
            is_leader: Gauges::default(),
            terms: Counters::default(),
            partitions_owned: Gauges::default(),
            handovers: Counters::default(),
            capture_blocks: Counters::default(),
            capture_bytes: Counters::default(),
            capture_messages: Counters::default(),
            capture_store_seconds: Histograms::default(),
            capture_store_failures: Counters::default(),
            capture_held: Gauges::default(),
            capture_open_blocks: Gauges::default(),
            published: Counters::default(),
            published_by_stream: RwLock::default(),
            publish_failures: Counter::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            connects_seen: AtomicU64::new(0),
            consumers: Mutex::new(Vec::new()),
            board: Mutex::default(),
        };
        let m = &metrics;
        let consumer = registry.sub_registry_with_prefix("consumer");
        consumer.register(
            "delivered",
            "Messages delivered to the handler, redeliveries included",
            m.delivered.clone(),
        );
        consumer.register("acked", "Messages acked after their handler succeeded", m.acked.clone());
        consumer.register(
            "naked",
            "Messages naked for redelivery (failure, retry, drain)",
            m.naked.clone(),
        );
        consumer.register(
            "terminated",
            "Messages terminated (undecodable, rejected, out of deliveries)",
            m.terminated.clone(),
        );
        consumer.register(
            "dead_lettered",
            "Messages copied to the dead-letter subject",
            m.dead_lettered.clone(),
        );
        consumer.register(
            "acks_unconfirmed",
            "Confirmed acks the server did not confirm within ack_wait (the message may come again)",
            m.acks_unconfirmed.clone(),
        );
        consumer.register(
            "handler_duration_seconds",
            "Time from handler start to its outcome",
            m.handler_seconds.clone(),
        );
        consumer.register(
            "in_flight",
            "Messages whose handler is running or waiting to retry",
            m.in_flight.clone(),
        );
        consumer.register(
            "pending_messages",
            "Messages in the stream not yet delivered to the consumer (server's count, read at scrape)",
            m.pending.clone(),
        );
        consumer.register(
            "ack_pending_messages",
            "Messages delivered and not yet acked (server's count, read at scrape)",
            m.ack_pending.clone(),
        );
        consumer.register(
            "redelivered_messages",
            "Messages delivered more than once and not yet acked (server's count, read at scrape)",
            m.redelivered.clone(),
        );
        let leader = registry.sub_registry_with_prefix("leader");
        leader.register(
            "is_leader",
            "1 while this instance holds the lease",
            m.is_leader.clone(),
        );
        leader.register("terms", "Terms this instance began as leader", m.terms.clone());
        let group = registry.sub_registry_with_prefix("group");
        group.register(
            "partitions_owned",
            "Partitions of a partitioned group assigned to this instance (held, or contested until their lease is free)",
            m.partitions_owned.clone(),
        );
        group.register(
            "handovers",
            "Partitions this instance gave up to another (a join or a rebalance; not shutdown)",
            m.handovers.clone(),
        );
        let capture = registry.sub_registry_with_prefix("capture");
        capture.register("blocks", "Blocks stored", m.capture_blocks.clone());
        capture.register(
            "bytes",
            "Bytes stored, as written (compressed, framed)",
            m.capture_bytes.clone(),
        );
        capture.register("messages", "Messages stored and acked", m.capture_messages.clone());
        capture.register(
            "store_duration_seconds",
            "Time to store one block (successful attempts)",
            m.capture_store_seconds.clone(),
        );
        capture.register(
            "store_failures",
            "Failed store attempts (each retried)",
            m.capture_store_failures.clone(),
        );
        capture.register(
            "held_messages",
            "Messages held unacked in open or storing blocks",
            m.capture_held.clone(),
        );
        capture.register(
            "open_blocks",
            "Blocks open (filling, not yet sealed for storing)",
            m.capture_open_blocks.clone(),
        );
        let publish = registry.sub_registry_with_prefix("publish");
        publish.register(
            "messages",
            "Messages published and acked by their stream",
            m.published.clone(),
        );
        publish.register(
            "failures",
            "Publishes that failed or stayed unconfirmed",
            m.publish_failures.clone(),
        );
        let connection = registry.sub_registry_with_prefix("connection");
        connection.register("connected", "1 while connected to a NATS server", m.connected.clone());
        connection.register("reconnects", "Connections made after the first", m.reconnects.clone());
        Metrics { registry, ..metrics }
    }

    /// Handles for one consumer, labelled by handler, stream and consumer name. An ephemeral
    /// consumer gets a new name on the server each time it starts (each leadership term, for
    /// one bound to a leader); it is labelled `ephemeral` so its series do not multiply.
    pub(crate) fn consumer(
        &self,
        handler: &'static str,
        stream: &'static str,
        consumer: &str,
        ephemeral: bool,
    ) -> ConsumerMetrics {
        let label = if ephemeral { "ephemeral" } else { consumer };
        let labels: Labels = vec![
            ("handler", handler.into()),
            ("stream", stream.into()),
            ("consumer", label.into()),
        ];
        let counts = ConsumerMetrics {
            delivered: self.delivered.get_or_create_owned(&labels),
            acked: self.acked.get_or_create_owned(&labels),
            naked: self.naked.get_or_create_owned(&labels),
            terminated: self.terminated.get_or_create_owned(&labels),
            dead_lettered: self.dead_lettered.get_or_create_owned(&labels),
            acks_unconfirmed: self.acks_unconfirmed.get_or_create_owned(&labels),
            handler_seconds: Some(self.handler_seconds.get_or_create_owned(&labels)),
            in_flight: self.in_flight.get_or_create_owned(&labels),
        };
        let watched = Watched {
            handler,
            stream,
            consumer: consumer.to_string(),
            label: label.to_string(),
            pending: self.pending.get_or_create_owned(&labels),
            ack_pending: self.ack_pending.get_or_create_owned(&labels),
            redelivered: self.redelivered.get_or_create_owned(&labels),
            counts: counts.clone(),
            scraped: true,
        };
        if let Ok(mut all) = self.consumers.lock() {
            // The newest instance of a handler's consumer replaces the one before it (an
            // ephemeral one is named anew each time); a partitioned group's partitions are
            // consumers of their own.
            all.retain(|w| !(w.handler == handler && w.stream == stream && w.label == label));
            all.push(watched);
        }
        counts
    }

    /// Handles for one leader task.
    pub(crate) fn leader(&self, name: &'static str, bucket: &'static str, key: &'static str) -> LeaderMetrics {
        let labels: Labels = vec![("leader", name.into()), ("bucket", bucket.into()), ("key", key.into())];
        let metrics = LeaderMetrics {
            is_leader: self.is_leader.get_or_create_owned(&labels),
            terms: self.terms.get_or_create_owned(&labels),
            term: Arc::default(),
        };
        if let Ok(mut board) = self.board.lock() {
            board.leaders.retain(|(n, b, k, _)| (*n, *b, *k) != (name, bucket, key));
            board.leaders.push((name, bucket, key, metrics.clone()));
        }
        metrics
    }

    /// Handles for one partitioned group.
    pub(crate) fn group(&self, name: &'static str, group: &'static str) -> GroupMetrics {
        let labels: Labels = vec![("consumer", name.into()), ("group", group.into())];
        let metrics = GroupMetrics {
            owned: self.partitions_owned.get_or_create_owned(&labels),
            handovers: self.handovers.get_or_create_owned(&labels),
            ownership: Arc::default(),
        };
        if let Ok(mut board) = self.board.lock() {
            board.groups.retain(|(n, g, _)| (*n, *g) != (name, group));
            board.groups.push((name, group, metrics.clone()));
        }
        metrics
    }

    /// Handles for one capture.
    #[cfg(feature = "capture")]
    pub(crate) fn capture(&self, name: &'static str, stream: &'static str) -> CaptureMetrics {
        let labels: Labels = vec![("capture", name.into()), ("stream", stream.into())];
        let metrics = CaptureMetrics {
            blocks: self.capture_blocks.get_or_create_owned(&labels),
            bytes: self.capture_bytes.get_or_create_owned(&labels),
            messages: self.capture_messages.get_or_create_owned(&labels),
            store_seconds: self.capture_store_seconds.get_or_create_owned(&labels),
            store_failures: self.capture_store_failures.get_or_create_owned(&labels),
            held: self.capture_held.get_or_create_owned(&labels),
            open_blocks: self.capture_open_blocks.get_or_create_owned(&labels),
            last_block: Arc::default(),
        };
        if let Ok(mut board) = self.board.lock() {
            // A partitioned capture runs one capture per partition, all under its name and
            // the group's stream: they share the last block shown.
            match board.captures.iter().find(|(n, s, _)| (*n, *s) == (name, stream)) {
                Some((_, _, known)) => {
                    return CaptureMetrics {
                        last_block: known.last_block.clone(),
                        ..metrics
                    }
                }
                None => board.captures.push((name, stream, metrics.clone())),
            }
        }
        metrics
    }

    /// Counts a publish acked by `stream`. The counter is looked up by name in a cache, so the
    /// hot path does not build a label set per publish.
    pub(crate) fn published(&self, stream: &str) {
        if let Some(counter) = self
            .published_by_stream
            .read()
            .ok()
            .and_then(|all| all.get(stream).cloned())
        {
            counter.inc();
            return;
        }
        let counter = self
            .published
            .get_or_create_owned(&vec![("stream", stream.to_string())]);
        counter.inc();
        if let Ok(mut all) = self.published_by_stream.write() {
            all.insert(stream.to_string(), counter);
        }
    }

    /// Counts a publish that failed. Not labelled by subject: subjects are unbounded.
    pub(crate) fn publish_failed(&self) {
        self.publish_failures.inc();
    }

    /// Stops reading the server's counts of a consumer this instance no longer runs (a
    /// partition handed over: another instance reports them now); its counters still count in
    /// the console's totals.
    pub(crate) fn unwatch(&self, handler: &str, stream: &str, consumer: &str) {
        if let Ok(mut all) = self.consumers.lock() {
            for watched in all
                .iter_mut()
                .filter(|w| w.handler == handler && w.stream == stream && w.consumer == consumer)
            {
                watched.scraped = false;
            }
        }
    }

    /// The consumers to read server-side counts for.
    pub(crate) fn watched(&self) -> Vec<Watched> {
        self.consumers.lock().map(|all| all.clone()).unwrap_or_default()
    }

    /// Brings the connection gauges up to date from the client's own state and statistics.
    pub(crate) fn observe_connection(&self, client: &async_nats::Client) {
        let connected = client.connection_state() == async_nats::connection::State::Connected;
        self.connected.set(i64::from(connected));
        let connects = client.statistics().connects.load(Ordering::Relaxed);
        let seen = self.connects_seen.swap(connects, Ordering::Relaxed);
        // The first connect is not a reconnect.
        let before = seen.max(1);
        if connects > before {
            self.reconnects.inc_by(connects - before);
        }
    }

    /// The registry in the OpenMetrics text format, which Prometheus scrapes.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}
