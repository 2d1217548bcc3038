//! What one instance reports to the console: its handlers with their counts, latencies and
//! plots, its leaders, its share of partitioned groups, its captures.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};

use super::rfc3339;
use crate::client::Client;
use crate::consumer::ConsumerDef;
use crate::registry::Declarations;
use crate::telemetry::latency::Snapshot;
use crate::telemetry::Telemetry;

/// How long the console waits for one consumer's info.
const INFO_TIMEOUT: Duration = Duration::from_secs(2);
/// Info requests in flight at once.
const CONCURRENT_INFO: usize = 8;
/// The window of the p50 and p99 shown beside a handler.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);

/// One instance, as `/api/fleet` lists it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Status {
    pub(crate) instance: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) version: Option<String>,
    pub(crate) natty: String,
    pub(crate) started_at: String,
    pub(crate) uptime_s: f64,
    pub(crate) connected: bool,
    pub(crate) ready: bool,
    pub(crate) draining: bool,
    pub(crate) handlers: Vec<HandlerStatus>,
    pub(crate) leaders: Vec<LeaderStatus>,
    pub(crate) groups: Vec<GroupStatus>,
    pub(crate) captures: Vec<CaptureStatus>,
}

/// A handler on one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct HandlerStatus {
    pub(crate) name: String,
    pub(crate) kind: String,
    pub(crate) stream: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) durable: Option<String>,
    pub(crate) partitions: Option<u32>,
    /// Whether this instance runs it now (a leader's consumers run on the leader only, a
    /// group's on the owners of its partitions).
    pub(crate) running: bool,
    pub(crate) delivered: Option<u64>,
    pub(crate) acked: Option<u64>,
    pub(crate) naked: Option<u64>,
    pub(crate) terminated: Option<u64>,
    pub(crate) dead_lettered: Option<u64>,
    pub(crate) in_flight: Option<i64>,
    /// The server's counts, when this instance read them (the one whose page is open).
    pub(crate) pending: Option<u64>,
    pub(crate) ack_pending: Option<u64>,
    pub(crate) redelivered: Option<u64>,
    pub(crate) paused_until: Option<String>,
    /// Over the last minute (since start, before a minute of history).
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
    pub(crate) history: Vec<Point>,
}

/// A point of a handler's plots.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Point {
    /// Unix seconds.
    pub(crate) at: f64,
    /// Delivered since start, as of `at` (the page plots its differences).
    pub(crate) delivered: u64,
    pub(crate) pending: Option<u64>,
    /// Over the interval before `at`.
    pub(crate) p50_ms: Option<f64>,
    pub(crate) p99_ms: Option<f64>,
}

/// A leader election as one instance sees it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LeaderStatus {
    pub(crate) name: String,
    pub(crate) bucket: String,
    pub(crate) key: String,
    /// Whether this instance leads.
    pub(crate) leader: bool,
    /// Who holds the lease, as the bucket says.
    pub(crate) holder: Option<String>,
    /// The fencing token of this instance's term, while it leads.
    pub(crate) token: Option<u64>,
    /// When this instance's term began, while it leads.
    pub(crate) since: Option<String>,
    /// Terms this instance began.
    pub(crate) terms: u64,
}

/// One instance's part in a partitioned group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupStatus {
    pub(crate) consumer: String,
    pub(crate) group: String,
    pub(crate) partitions: u32,
    /// The partitions this instance runs.
    pub(crate) owned: Vec<u32>,
    /// Every partition's lease holder, as this instance last read them.
    pub(crate) owners: HashMap<String, String>,
}

/// A capture on one instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CaptureStatus {
    pub(crate) name: String,
    pub(crate) stream: String,
    pub(crate) blocks: u64,
    pub(crate) bytes: u64,
    pub(crate) messages: u64,
    /// Messages held unacked in open or storing blocks.
    pub(crate) held: i64,
    pub(crate) open_blocks: i64,
    pub(crate) store_failures: u64,
    pub(crate) last_block: Option<StoredBlockStatus>,
}

/// The last block a capture stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredBlockStatus {
    pub(crate) path: String,
    pub(crate) bytes: u64,
    pub(crate) at: String,
}

/// What the server says of one consumer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ServerCounts {
    pending: u64,
    ack_pending: u64,
    redelivered: u64,
    paused_until: Option<SystemTime>,
}

impl ServerCounts {
    fn add(&mut self, other: &ServerCounts) {
        self.pending += other.pending;
        self.ack_pending += other.ack_pending;
        self.redelivered += other.redelivered;
        self.paused_until = self.paused_until.max(other.paused_until);
    }
}

/// The server's counts by (stream, consumer).
pub(crate) type Counts = HashMap<(String, String), ServerCounts>;

/// The plots' point for every handler at one moment.
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    at: SystemTime,
    handlers: HashMap<&'static str, (u64, Snapshot, Option<u64>)>,
}

/// A declared handler, as the console shows it.
struct Entry {
    name: &'static str,
    kind: &'static str,
    stream: Option<&'static str>,
    subject: Option<String>,
    durable: Option<&'static str>,
    partitions: Option<u32>,
    /// The durable consumers on the server that are this handler's (a group's partitions).
    consumers: Vec<(String, String)>,
    /// `(bucket, key)` of the leader it runs under.
    while_leading: Option<(&'static str, &'static str)>,
}

/// Every handler a service declared.
pub(crate) struct Catalog {
    entries: Vec<Entry>,
    /// `(name, bucket, key)` of every leader task.
    leaders: Vec<(&'static str, &'static str, &'static str)>,
}

/// The handler's entry for a consumer (or a capture's consumer).
fn consumer_entry(
    def: &ConsumerDef,
    kind: &'static str,
    group: impl FnOnce() -> crate::Result<crate::partition::group::Group>,
) -> Entry {
    let consumers = if def.ephemeral {
        Vec::new()
    } else {
        crate::operate::server_consumers(def, group).unwrap_or_default()
    };
    Entry {
        name: def.name,
        kind,
        stream: Some(def.stream),
        subject: (!def.subjects.is_empty()).then(|| def.subjects.join(", ")),
        durable: (!def.ephemeral).then_some(def.durable),
        partitions: (def.partitions > 0).then_some(def.partitions),
        consumers,
        while_leading: def.while_leading,
    }
}

impl Catalog {
    pub(crate) fn new(declared: &Declarations) -> Catalog {
        let mut entries = Vec::new();
        for def in &declared.consumers {
            let kind = if def.batch.is_some() { "batch" } else { "consumer" };
            entries.push(consumer_entry(def, kind, || crate::partition::group::Group::new(*def)));
        }
        #[cfg(feature = "capture")]
        for capture in &declared.captures {
            let def = capture.consumer_def();
            let mut entry = consumer_entry(&def, "capture", || {
                crate::partition::group::Group::for_capture(*capture)
            });
            entry.name = capture.name();
            entries.push(entry);
        }
        for sub in &declared.subscriptions {
            let kind = match sub.kind {
                crate::subscribe::CoreKind::Subscribe => "subscribe",
                crate::subscribe::CoreKind::Service => "service",
            };
            entries.push(Entry {
                name: sub.name,
                kind,
                stream: None,
                subject: Some(sub.subject.to_string()),
                durable: None,
                partitions: None,
                consumers: Vec::new(),
                while_leading: None,
            });
        }
        for watch in &declared.kv_watches {
            entries.push(Entry {
                name: watch.name,
                kind: "kv_watch",
                stream: None,
                subject: Some(format!("bucket {}, key {}", watch.bucket, watch.key)),
                durable: None,
                partitions: None,
                consumers: Vec::new(),
                while_leading: None,
            });
        }
        for leader in &declared.leaders {
            entries.push(Entry {
                name: leader.name,
                kind: "leader",
                stream: None,
                subject: Some(format!("bucket {}, key {}", leader.bucket, leader.key)),
                durable: None,
                partitions: None,
                consumers: Vec::new(),
                // A leader task runs where it leads.
                while_leading: Some((leader.bucket, leader.key)),
            });
        }
        Catalog {
            entries,
            leaders: declared
                .leaders
                .iter()
                .map(|leader| (leader.name, leader.bucket, leader.key))
                .collect(),
        }
    }

    /// The consumers `stream`/`durable` stands for: a partitioned group's partitions, or the
    /// consumer itself; `None` when this service declares no such durable.
    pub(crate) fn consumers_of(&self, stream: &str, durable: &str) -> Option<Vec<(String, String)>> {
        self.entries
            .iter()
            .find(|entry| entry.stream == Some(stream) && entry.durable == Some(durable))
            .map(|entry| entry.consumers.clone())
            .filter(|consumers| !consumers.is_empty())
    }

    /// Asks the server for the counts of every consumer of this service: its durables (every
    /// partition of a group) and the ephemeral consumers it runs now.
    pub(crate) async fn server_counts(&self, client: &Client) -> Counts {
        let mut wanted: Vec<(String, String)> = self
            .entries
            .iter()
            .flat_map(|entry| entry.consumers.iter().cloned())
            .collect();
        let ephemeral: Vec<&'static str> = self
            .entries
            .iter()
            .filter(|entry| entry.kind != "leader" && entry.stream.is_some() && entry.durable.is_none())
            .map(|entry| entry.name)
            .collect();
        for watched in client.telemetry().metrics.watched() {
            if ephemeral.contains(&watched.handler) {
                wanted.push((watched.stream.to_string(), watched.consumer.clone()));
            }
        }
        let js = client.jetstream();
        futures_util::stream::iter(wanted)
            .map(|(stream, consumer)| async move {
                let info = js.get_consumer_from_stream::<jetstream::consumer::pull::Config, _, _>(&consumer, &stream);
                let info = match tokio::time::timeout(INFO_TIMEOUT, info).await {
                    Ok(Ok(found)) => found.cached_info().clone(),
                    _ => return None,
                };
                let paused_until = info
                    .paused
                    .then(|| info.pause_remaining.map(|left| SystemTime::now() + left))
                    .flatten();
                let counts = ServerCounts {
                    pending: info.num_pending,
                    ack_pending: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                    paused_until,
                };
                Some(((stream, consumer), counts))
            })
            .buffer_unordered(CONCURRENT_INFO)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// Reads who holds each leader's lease.
    pub(crate) async fn leases(&self, client: &Client) -> HashMap<&'static str, Option<String>> {
        let js = client.jetstream();
        let mut leases = HashMap::new();
        for &(name, bucket, key) in &self.leaders {
            let read = async {
                let store = js.get_key_value(bucket).await.ok()?;
                let entry = store.entry(key).await.ok()??;
                let live = matches!(entry.operation, jetstream::kv::Operation::Put);
                Some(live.then(|| crate::leader::holder_of(&entry.value)).flatten())
            };
            if let Ok(Some(lease)) = tokio::time::timeout(INFO_TIMEOUT, read).await {
                leases.insert(name, lease);
            }
        }
        leases
    }

    /// This instance's counts of `entry`: summed over its consumers (a group's partitions).
    fn local(entry: &Entry, watched: &[crate::telemetry::metrics::Watched], stored: &Stored) -> Option<Local> {
        let mut local: Option<Local> = None;
        for w in watched.iter().filter(|w| w.handler == entry.name) {
            let sum = local.get_or_insert_with(Local::default);
            let c = &w.counts;
            sum.delivered += c.delivered.get();
            sum.acked += c.acked.get();
            sum.naked += c.naked.get();
            sum.terminated += c.terminated.get();
            sum.dead_lettered += c.dead_lettered.get();
            sum.in_flight += c.in_flight.get();
            if let Some(latency) = &c.handler_seconds {
                sum.latency.add(&latency.snapshot());
            }
        }
        // A capture hands no message to a handler: what it delivers is what it stored.
        if let Some(messages) = stored.get(entry.name).filter(|_| entry.kind == "capture") {
            local.get_or_insert_with(Local::default).delivered += messages;
        }
        local
    }

    /// The server's counts of `entry`, summed over its consumers; `None` if none was read.
    fn server(entry: &Entry, counts: &Counts, watched: &[crate::telemetry::metrics::Watched]) -> Option<ServerCounts> {
        let mut sum: Option<ServerCounts> = None;
        let ephemeral = watched
            .iter()
            .filter(|w| entry.durable.is_none() && w.handler == entry.name)
            .map(|w| (w.stream.to_string(), w.consumer.clone()));
        for key in entry.consumers.iter().cloned().chain(ephemeral) {
            if let Some(found) = counts.get(&key) {
                sum.get_or_insert_with(ServerCounts::default).add(found);
            }
        }
        sum
    }

    /// A point of every handler's plots, as of now.
    pub(crate) fn sample(&self, telemetry: &Telemetry, counts: Option<&Counts>) -> Sample {
        let watched = telemetry.metrics.watched();
        let stored = telemetry
            .metrics
            .board
            .lock()
            .map(|board| stored(&board))
            .unwrap_or_default();
        let handlers = self
            .entries
            .iter()
            .filter_map(|entry| {
                let local = Catalog::local(entry, &watched, &stored)?;
                let pending = counts
                    .and_then(|counts| Catalog::server(entry, counts, &watched))
                    .map(|server| server.pending);
                Some((entry.name, (local.delivered, local.latency, pending)))
            })
            .collect();
        Sample {
            at: SystemTime::now(),
            handlers,
        }
    }

    /// The status of this instance.
    pub(crate) fn status(
        &self,
        client: &Client,
        counts: Option<&Counts>,
        history: &[Sample],
        leases: &HashMap<&'static str, Option<String>>,
        version: Option<&str>,
    ) -> Status {
        let telemetry = client.telemetry();
        let instance = &telemetry.instance;
        let readiness = telemetry.health.report(Some(client.nats()));
        let watched = telemetry.metrics.watched();
        let board = telemetry.metrics.board.lock();
        let board = board.as_deref();
        let stored = board.map(stored).unwrap_or_default();
        let now = SystemTime::now();
        let leading = |bucket: &str, key: &str| {
            board.is_ok_and(|board| {
                board
                    .leaders
                    .iter()
                    .any(|(_, b, k, metrics)| (*b, *k) == (bucket, key) && metrics.is_leader.get() == 1)
            })
        };
        let owns = |name: &str| {
            board.is_ok_and(|board| {
                board.groups.iter().any(|(n, _, metrics)| {
                    *n == name && metrics.ownership.lock().is_ok_and(|ownership| !ownership.0.is_empty())
                })
            })
        };
        let window_start = history
            .iter()
            .rev()
            .find(|sample| now.duration_since(sample.at).unwrap_or_default() >= LATENCY_WINDOW);
        let handlers =
            self.entries
                .iter()
                .map(|entry| {
                    let local = Catalog::local(entry, &watched, &stored);
                    let server = counts.and_then(|counts| Catalog::server(entry, counts, &watched));
                    let recent = local.as_ref().map(|local| {
                        match window_start.and_then(|sample| sample.handlers.get(entry.name)) {
                            Some((_, before, _)) => local.latency.since(before),
                            None => local.latency,
                        }
                    });
                    // A task stopped and waiting to be restarted is not running either.
                    let stopped = readiness
                        .not_running
                        .iter()
                        .any(|task| task.split_once(' ').is_some_and(|(_, name)| name == entry.name));
                    let running = !stopped
                        && match (entry.while_leading, entry.partitions) {
                            (Some((bucket, key)), _) => leading(bucket, key),
                            (None, Some(_)) => owns(entry.name),
                            (None, None) => !readiness.draining,
                        };
                    HandlerStatus {
                        name: entry.name.to_string(),
                        kind: entry.kind.to_string(),
                        stream: entry.stream.map(str::to_string),
                        subject: entry.subject.clone(),
                        durable: entry.durable.map(str::to_string),
                        partitions: entry.partitions,
                        running,
                        delivered: local.as_ref().map(|l| l.delivered),
                        acked: local.as_ref().map(|l| l.acked),
                        naked: local.as_ref().map(|l| l.naked),
                        terminated: local.as_ref().map(|l| l.terminated),
                        dead_lettered: local.as_ref().map(|l| l.dead_lettered),
                        in_flight: local.as_ref().map(|l| l.in_flight),
                        pending: server.map(|s| s.pending),
                        ack_pending: server.map(|s| s.ack_pending),
                        redelivered: server.map(|s| s.redelivered),
                        paused_until: server.and_then(|s| s.paused_until).map(rfc3339),
                        p50_ms: recent.and_then(|r| r.quantile_ms(0.5)),
                        p99_ms: recent.and_then(|r| r.quantile_ms(0.99)),
                        history: points(entry.name, history),
                    }
                })
                .collect();
        let mut leaders = Vec::new();
        let mut groups = Vec::new();
        #[allow(unused_mut)]
        let mut captures = Vec::new();
        if let Ok(board) = board {
            for &(name, bucket, key) in &self.leaders {
                let metrics = board
                    .leaders
                    .iter()
                    .find(|(n, b, k, _)| (*n, *b, *k) == (name, bucket, key))
                    .map(|(_, _, _, metrics)| metrics);
                let term = metrics.and_then(|m| m.term.lock().ok().and_then(|term| *term));
                // The key's revision moves with every renewal: only the holder knows the
                // revision its term began at, its fencing token.
                let holder = leases.get(name).cloned().flatten();
                leaders.push(LeaderStatus {
                    name: name.to_string(),
                    bucket: bucket.to_string(),
                    key: key.to_string(),
                    leader: term.is_some(),
                    holder: match term {
                        Some(_) => Some(instance.id.clone()),
                        None => holder,
                    },
                    token: term.map(|(token, _)| token),
                    since: term.map(|(_, since)| rfc3339(since)),
                    terms: metrics.map_or(0, |m| m.terms.get()),
                });
            }
            for (consumer, group, metrics) in &board.groups {
                let (owned, holders) = metrics
                    .ownership
                    .lock()
                    .map(|ownership| ownership.clone())
                    .unwrap_or_default();
                groups.push(GroupStatus {
                    consumer: consumer.to_string(),
                    group: group.to_string(),
                    partitions: holders.len() as u32,
                    owned,
                    owners: holders
                        .into_iter()
                        .enumerate()
                        .filter_map(|(k, holder)| Some((k.to_string(), holder?)))
                        .collect(),
                });
            }
            #[cfg(feature = "capture")]
            for (name, stream, metrics) in &board.captures {
                let last = metrics.last_block.lock().ok().and_then(|last| last.clone());
                captures.push(CaptureStatus {
                    name: name.to_string(),
                    stream: stream.to_string(),
                    blocks: metrics.blocks.get(),
                    bytes: metrics.bytes.get(),
                    messages: metrics.messages.get(),
                    held: metrics.held.get(),
                    open_blocks: metrics.open_blocks.get(),
                    store_failures: metrics.store_failures.get(),
                    last_block: last.map(|block| StoredBlockStatus {
                        path: block.path,
                        bytes: block.bytes,
                        at: rfc3339(block.at),
                    }),
                });
            }
        }
        Status {
            instance: instance.id.clone(),
            host: instance.host.clone(),
            pid: instance.pid,
            version: version.map(str::to_string),
            natty: env!("CARGO_PKG_VERSION").to_string(),
            started_at: rfc3339(instance.started),
            uptime_s: now.duration_since(instance.started).unwrap_or_default().as_secs_f64(),
            connected: readiness.connected,
            ready: readiness.ready,
            draining: readiness.draining,
            handlers,
            leaders,
            groups,
            captures,
        }
    }
}

/// Messages each capture stored, by name (a partitioned capture's partitions summed).
type Stored = HashMap<&'static str, u64>;

fn stored(board: &crate::telemetry::metrics::Board) -> Stored {
    #[allow(unused_mut)]
    let mut stored = Stored::new();
    #[cfg(feature = "capture")]
    for (name, _, metrics) in &board.captures {
        *stored.entry(*name).or_default() += metrics.messages.get();
    }
    #[cfg(not(feature = "capture"))]
    let _ = board;
    stored
}

/// This instance's counts of one handler.
#[derive(Default)]
struct Local {
    delivered: u64,
    acked: u64,
    naked: u64,
    terminated: u64,
    dead_lettered: u64,
    in_flight: i64,
    latency: Snapshot,
}

/// A handler's plot points from the history.
fn points(name: &str, history: &[Sample]) -> Vec<Point> {
    let mut points = Vec::new();
    let mut before: Option<&Snapshot> = None;
    for sample in history {
        let Some((delivered, latency, pending)) = sample.handlers.get(name) else {
            before = None;
            continue;
        };
        let interval = before.map(|before| latency.since(before));
        points.push(Point {
            at: sample
                .at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
            delivered: *delivered,
            pending: *pending,
            p50_ms: interval.and_then(|i| i.quantile_ms(0.5)),
            p99_ms: interval.and_then(|i| i.quantile_ms(0.99)),
        });
        before = Some(latency);
    }
    points
}
