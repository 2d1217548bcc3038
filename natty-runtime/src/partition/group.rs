//! A partitioned consumer group (`#[consumer(partitions = N)]`), as `docs/design/partitions.md`
//! chose to build it:
//!
//! - **Partition token.** A derived work-queue stream `<stream>_<durable>` sources the user's
//!   stream through a `{{partition(N, ...)}}` subject transform, so each stored subject starts
//!   with its partition: `3.accounts.42.posted`. The user's stream and its other readers are
//!   untouched. Handlers see the original subject (the token is taken off on receipt).
//! - **One durable per partition.** `<durable>-p<k>` filters `<k>.>`: its own ack floor,
//!   pending set and redelivery queue, never re-created when instances come and go.
//! - **Membership from liveness.** Each instance keeps `<group>.m.<instance>` alive in the
//!   `natty_groups` KV bucket with a per-key TTL (see [`super::membership`]).
//! - **Assignment.** Every instance computes the same balanced, sticky owners from the same
//!   members and holders ([`super::assign`]) and contests only its own partitions.
//! - **Ownership.** Partition k is led through the lease `<group>.p.<k>`: the `#[leader]`
//!   election (compare-and-set writes with a TTL, a local deadline that ends first, the
//!   revision as epoch), with the partition's consumer bound to it. A partition given up is
//!   drained (in-flight handlers finish, waiting messages are naked in order, the last nak is
//!   confirmed) before its lease is released; a successor taking a lease that was not released
//!   (its owner was killed or cut off) waits until every message the old owner held has come
//!   back to the server, so a key's messages are never handled out of order or by two owners.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, stream::RetentionPolicy};
use futures_util::StreamExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::membership::Membership;
use crate::config::Provision;
use crate::consumer::{ConsumerDef, Deliver, OrderBy};
use crate::error::{Error, Result};
use crate::leader::{BoundConsumer, LeaderDef};
use crate::publish::Client;

/// The KV bucket holding every group's members and partition leases.
pub(crate) const GROUPS_BUCKET: &str = "natty_groups";
/// The most partitions a group may have: each is a durable consumer (a Raft group of its own
/// on a cluster) and a lease renewed every few seconds.
pub(crate) const MAX_PARTITIONS: u32 = 64;
/// How long a partition's lease and an instance's membership last without renewal. A pull
/// request of a partition's owner waits at most [`PULL_EXPIRES`], which must end before the
/// lease does on the server: the election's margin is a fifth of the TTL (1 s here).
pub(crate) const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long an owner's pull request may wait on the server.
pub(crate) const PULL_EXPIRES: Duration = Duration::from_secs(1);
/// `ack_wait` of the partitions' consumers unless declared: after an owner is killed, its
/// partitions move once its lease has run out and its messages have come back, so this bounds
/// how long they stand still.
pub(crate) const DEFAULT_ACK_WAIT: Duration = Duration::from_secs(10);
/// How long a partition given up (to a newcomer, or on shutdown) waits for its running
/// handlers before cutting them off (their messages are naked and handled by the next owner).
pub(crate) const HANDOVER_TIMEOUT: Duration = Duration::from_secs(1);
/// How often an instance reads the membership when nothing woke it.
const POLL: Duration = Duration::from_millis(500);
/// How long after a change in the group the owners are worked out again.
const SETTLE: Duration = Duration::from_millis(50);
/// Room added to a successor's wait for the old owner's messages to come back.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(1);

/// A declared partitioned group: the user's consumer and what its group is made of.
#[derive(Clone)]
pub(crate) struct Group {
    def: ConsumerDef,
    /// The derived work-queue stream, also the group's name in the bucket.
    derived: &'static str,
    /// The transforms (source, destination) from the user's subjects to the partitioned ones.
    transforms: Vec<(String, String)>,
    /// One consumer definition per partition.
    consumers: Vec<ConsumerDef>,
    /// For a partitioned capture: its definition (per partition, see [`Group::capture`]).
    #[cfg(feature = "capture")]
    capture: Option<crate::capture::CaptureDef>,
    /// This instance's name in the group (also the holder written into its leases).
    member: String,
}

fn leak(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

impl Group {
    /// The group `def` declares, checked: a durable, one subject, a key under `*` wildcards.
    pub(crate) fn new(def: ConsumerDef) -> Result<Group> {
        let what = format!("partitions of consumer `{}` at {}", def.name, def.location);
        let refuse = |value: String, reason: &str| Err(Error::config(what.clone(), value, reason.to_string()));
        let partitions = def.partitions;
        if def.ephemeral {
            return refuse(
                partitions.to_string(),
                "a partitioned group is a durable consumer: give it a `durable`",
            );
        }
        if def.while_leading.is_some() || def.batch.is_some() {
            return refuse(
                partitions.to_string(),
                "a partitioned group cannot also be `while_leading` or a batch consumer",
            );
        }
        let [subject] = def.subjects else {
            return refuse(
                format!("{:?}", def.subjects),
                "a partitioned group consumes one subject, with its key under a `*` wildcard (e.g. \"accounts.*.posted\")",
            );
        };
        let tokens: Vec<&str> = subject.split('.').collect();
        if tokens.contains(&">") {
            return refuse(
                subject.to_string(),
                "a partitioned group's subject cannot hold `>`: its partition key must be a `*` token",
            );
        }
        // The 1-based index of each `*` among the subject's wildcards, by token position.
        let wildcards: Vec<(usize, usize)> = tokens
            .iter()
            .enumerate()
            .filter(|(_, token)| **token == "*")
            .enumerate()
            .map(|(nth, (position, _))| (position, nth + 1))
            .collect();
        let keyed: Vec<usize> =
            match def.order_by {
                Some(OrderBy::Token(position)) => match wildcards.iter().find(|(at, _)| *at == position) {
                    Some((_, nth)) => vec![*nth],
                    None => return refuse(
                        format!("order_by = subject[{position}] on \"{subject}\""),
                        "the key of a partitioned group must be a `*` token of its subject, which the server hashes",
                    ),
                },
                Some(OrderBy::Subject) if !wildcards.is_empty() => wildcards.iter().map(|(_, nth)| *nth).collect(),
                Some(OrderBy::Subject) => {
                    return refuse(
                        subject.to_string(),
                        "with `order_by = \"subject\"` the subject needs a `*` wildcard to partition by",
                    )
                }
                Some(OrderBy::Key(_)) | None => return refuse(
                    partitions.to_string(),
                    "a partitioned group needs `order_by = \"subject[N]\"` (or \"subject\"): the server computes the \
                     partition from the subject, so the key must be in it",
                ),
            };
        let keys = keyed.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
        let destination = format!("{{{{partition({partitions},{keys})}}}}.{}", with_wildcards(subject));
        Group::assemble(def, vec![(subject.to_string(), destination)])
    }

    /// The group a `#[capture(partitions = N)]` forms: partitioned by the whole subject (a
    /// capture's records have no order to keep, only a home each).
    #[cfg(feature = "capture")]
    pub(crate) fn for_capture(capture: crate::capture::CaptureDef) -> Result<Group> {
        let def = capture.consumer_def();
        let partitions = def.partitions;
        let transforms = match def.subjects {
            [] => vec![(">".to_string(), format!("{{{{partition({partitions})}}}}.>"))],
            subjects => subjects
                .iter()
                .map(|subject| {
                    let destination = format!("{{{{partition({partitions})}}}}.{}", with_wildcards(subject));
                    (subject.to_string(), destination)
                })
                .collect(),
        };
        let mut group = Group::assemble(def, transforms)?;
        group.capture = Some(capture);
        Ok(group)
    }

    /// The group of `def` with the derived stream sourcing through `transforms`.
    fn assemble(def: ConsumerDef, transforms: Vec<(String, String)>) -> Result<Group> {
        let partitions = def.partitions;
        if !(1..=MAX_PARTITIONS).contains(&partitions) {
            return Err(Error::config(
                format!("partitions of `{}` at {}", def.name, def.location),
                partitions.to_string(),
                format!("a group has 1 to {MAX_PARTITIONS} partitions"),
            ));
        }
        let derived = format!("{}_{}", def.stream, def.durable);
        if !crate::kv::valid_key(&format!("{derived}.m.x")) {
            return Err(Error::config(
                format!("partitions of `{}` at {}", def.name, def.location),
                derived,
                "the stream and durable names of a partitioned group must be letters, digits, `-`, `_`, `=` or `/` (they name its KV keys)",
            ));
        }
        let derived = leak(derived);
        let dead_letter = leak(def.dead_letter_subject());
        let consumers = (0..partitions)
            .map(|k| {
                let mut consumer = def;
                consumer.stream = derived;
                consumer.durable = leak(format!("{}-p{k}", def.durable));
                consumer.subjects = Box::leak(Box::new([leak(format!("{k}.>"))]));
                consumer.partitions = 0;
                consumer.partition = Some(k);
                // The derived stream's source starts where the user asked; its consumers read all of it.
                consumer.deliver = Deliver::All;
                consumer.dead_letter = Some(dead_letter);
                consumer.ack_wait = Some(def.ack_wait.unwrap_or(DEFAULT_ACK_WAIT));
                consumer
            })
            .collect();
        Ok(Group {
            def,
            derived,
            transforms,
            consumers,
            #[cfg(feature = "capture")]
            capture: None,
            // The instance's id, known once there is a client (`run`).
            member: String::new(),
        })
    }

    /// The capture of partition `k`, for a partitioned capture.
    #[cfg(feature = "capture")]
    fn capture(&self, k: u32) -> Option<crate::capture::CaptureDef> {
        let consumer = self.consumer(k);
        self.capture.map(|mut capture| {
            capture.stream = consumer.stream;
            capture.durable = consumer.durable;
            capture.subjects = consumer.subjects;
            capture.ack_wait = consumer.ack_wait;
            capture.dead_letter = consumer.dead_letter;
            capture.partitions = 0;
            capture.partition = Some(k);
            capture
        })
    }

    /// The derived stream's name.
    pub(crate) fn derived(&self) -> &'static str {
        self.derived
    }

    /// The consumer definition of partition `k`.
    pub(crate) fn consumer(&self, k: u32) -> ConsumerDef {
        self.consumers[k as usize]
    }

    /// The source of the derived stream: the user's stream through the partitioning transform.
    fn source(&self, origin: &jetstream::stream::Config) -> Result<jetstream::stream::Source> {
        let mut source = jetstream::stream::Source {
            name: origin.name.clone(),
            subject_transforms: self
                .transforms
                .iter()
                .map(|(source, destination)| jetstream::stream::SubjectTransform {
                    source: source.clone(),
                    destination: destination.clone(),
                })
                .collect(),
            ..Default::default()
        };
        match self.def.deliver {
            Deliver::All => {}
            Deliver::New => source.start_time = Some(async_nats::datetime::now()),
            Deliver::FromSequence(sequence) => source.start_sequence = Some(sequence),
            Deliver::FromTime(rfc3339) => source.start_time = Some(ConsumerDef::start_time(self.def.name, rfc3339)?),
            Deliver::Last | Deliver::LastPerSubject => {
                return Err(Error::config(
                    format!("deliver of consumer `{}`", self.def.name),
                    format!("{:?}", self.def.deliver),
                    "a partitioned group starts at the first message, a sequence, a time or new messages",
                ))
            }
        }
        Ok(source)
    }

    /// Creates (or checks) the derived stream and the groups bucket.
    pub(crate) async fn provision(&self, js: &jetstream::Context, mode: Provision) -> Result<()> {
        if mode == Provision::Off {
            return Ok(());
        }
        let stream_error = |action: &'static str| {
            let stream = self.derived.to_string();
            move |source: crate::error::BoxError| Error::Stream { stream, action, source }
        };
        let mut origin = js
            .get_stream(self.def.stream)
            .await
            .map_err(|e| Error::StreamNotFound {
                stream: self.def.stream.into(),
                hint: format!(
                    " (partitioned consumer `{}` at {} reads it: {e})",
                    self.def.name, self.def.location
                ),
            })?;
        let origin = origin
            .info()
            .await
            .map_err(|e| stream_error("reading the stream it sources")(e.into()))?
            .config
            .clone();
        // As available as the stream it partitions (the first group to create the bucket decides).
        crate::leader::provision_ttl_bucket(
            js,
            GROUPS_BUCKET,
            "natty partitioned groups: members and partition leases",
            mode,
            &format!("partitioned consumer `{}`", self.def.name),
            origin.num_replicas,
        )
        .await?;
        match js.get_stream(self.derived).await {
            Ok(mut stream) => {
                let info = stream
                    .info()
                    .await
                    .map_err(|e| stream_error("reading the partitioned group's stream")(e.into()))?;
                let sources = info.config.sources.clone().unwrap_or_default();
                let transforms: Vec<(&str, &str)> = sources
                    .iter()
                    .flat_map(|source| {
                        source
                            .subject_transforms
                            .iter()
                            .map(|t| (t.source.as_str(), t.destination.as_str()))
                    })
                    .collect();
                let wanted: Vec<(&str, &str)> = self.transforms.iter().map(|(s, d)| (s.as_str(), d.as_str())).collect();
                if transforms != wanted || sources.first().is_none_or(|s| s.name != self.def.stream) {
                    return Err(crate::error::Drift {
                        declared_on: crate::error::Declared::Stream(self.derived.to_string()),
                        field: "sources",
                        declared: format!("{} through {:?}", self.def.stream, self.transforms),
                        actual: format!("{sources:?}"),
                        hint:
                            " (the group's partitions or subject changed: every key would move to another partition. \
                               Let the old group drain, delete this stream and its consumers, then start the new one)"
                                .into(),
                    }
                    .into());
                }
                Ok(())
            }
            Err(error) if crate::stream::is_stream_not_found(&error) && mode == Provision::CreateOrUpdate => {
                let config = jetstream::stream::Config {
                    name: self.derived.to_string(),
                    description: Some(format!(
                        "natty: the {} partitions of `{}` for durable `{}` (partitioned consumer `{}`)",
                        self.def.partitions, self.def.stream, self.def.durable, self.def.name
                    )),
                    retention: RetentionPolicy::WorkQueue,
                    storage: origin.storage,
                    num_replicas: origin.num_replicas,
                    // Sourcing never repeats a message (the source tracks its position), and a
                    // window would drop a later origin message sharing a `Nats-Msg-Id` with an
                    // earlier one sourced together (a backfill of history): the smallest the
                    // server accepts (error 10052 below 100 ms).
                    duplicate_window: Duration::from_millis(100),
                    sources: Some(vec![self.source(&origin)?]),
                    ..Default::default()
                };
                // Two instances starting together both create it: the same configuration twice
                // is one stream.
                js.get_or_create_stream(config)
                    .await
                    .map_err(|e| stream_error("creating the partitioned group's stream")(e.into()))?;
                tracing::info!(
                    stream = self.derived,
                    source = self.def.stream,
                    partitions = self.def.partitions,
                    "created the partitioned group's stream"
                );
                Ok(())
            }
            Err(error) if crate::stream::is_stream_not_found(&error) => Err(Error::StreamNotFound {
                stream: self.derived.into(),
                hint: format!(
                    " (the stream of partitioned consumer `{}`; provisioning is {})",
                    self.def.name,
                    mode.as_str()
                ),
            }),
            Err(error) => Err(stream_error("looking up the partitioned group's stream")(error.into())),
        }
    }

    /// The group's task: joins, and contests and runs the partitions assigned to this instance.
    pub(crate) fn task(self, client: Client, provision: Provision, settings: &crate::Config) -> crate::supervise::Task {
        let settings = Arc::new(settings.clone());
        crate::supervise::Task::new(format!("group {}", self.derived), move |stop| async move {
            self.run(client, provision, settings, stop.cancel, stop.hard_stop).await;
            Ok(())
        })
    }

    /// What runs on partition `k` while this instance owns it: its consumer, or its capture.
    fn bound(
        &self,
        k: u32,
        provision: Provision,
        settings: &Arc<crate::Config>,
        permits: &Arc<tokio::sync::Semaphore>,
    ) -> BoundConsumer {
        let mut bound = BoundConsumer::new(self.consumer(k), provision, None);
        // The instance's `concurrency` is for all the partitions it owns, not each.
        bound.permits = Some(permits.clone());
        #[cfg(feature = "capture")]
        {
            bound.capture = self.capture(k).map(|capture| (capture, settings.clone()));
        }
        #[cfg(not(feature = "capture"))]
        let _ = settings;
        bound
    }

    /// How long a partition given up may drain before it is cut off: a capture stores its open
    /// blocks, on its own deadline.
    fn handover_timeout(&self, settings: &crate::Config) -> Duration {
        #[cfg(feature = "capture")]
        if self.capture.is_some() {
            return settings.capture_drain_timeout;
        }
        let _ = settings;
        HANDOVER_TIMEOUT
    }

    /// The election of partition `k`'s lease.
    fn lease(&self, k: u32) -> LeaderDef {
        LeaderDef::new(
            self.def.name,
            GROUPS_BUCKET,
            leak(format!("{}.p.{k}", self.derived)),
            LEASE_TTL,
            crate::leader::idle,
        )
        .at(self.def.location)
    }

    /// Joins the group, keeps the partitions assigned to this instance running until `cancel`,
    /// then leaves and hands every partition over.
    async fn run(
        mut self,
        client: Client,
        provision: Provision,
        settings: Arc<crate::Config>,
        cancel: CancellationToken,
        hard_stop: CancellationToken,
    ) {
        // Named as the instance is everywhere (the console maps owners to instances).
        self.member.clone_from(&client.telemetry().instance.id);
        let handover = self.handover_timeout(&settings);
        let permits = Arc::new(tokio::sync::Semaphore::new(self.def.concurrency));
        let prefix = format!("{}.m", self.derived);
        let mut attempts = 0u32;
        let membership = loop {
            match Membership::join(&client, GROUPS_BUCKET, &prefix, &self.member, LEASE_TTL).await {
                Ok(membership) => break membership,
                Err(error) => {
                    attempts += 1;
                    if attempts == 1 || attempts % 20 == 0 {
                        tracing::warn!(group = self.derived, attempts, error = %crate::error::chain(&*error), "cannot join the group; retrying");
                    }
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        };
        tracing::info!(group = self.derived, member = %self.member, partitions = self.def.partitions, "joined the partitioned group");
        let metrics = client.telemetry().metrics.group(self.def.name, self.derived);
        let leases: Vec<LeaderDef> = (0..self.def.partitions).map(|k| self.lease(k)).collect();
        let store = membership.store().clone();
        let mut holders = Holders::new(self.def.partitions);
        let mut watch = watch(&store, self.derived).await;
        let mut running: BTreeMap<u32, Partition> = BTreeMap::new();
        let mut failures = 0u32;
        let mut last_owned: Vec<u32> = Vec::new();
        // Let the members starting together see one another before claiming anything.
        let first = tokio::time::Instant::now() + POLL;
        let mut next = first;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                event = async { match watch.as_mut() { Some(w) => w.next().await, None => std::future::pending().await } } => {
                    // Only a wake-up: the holders are read anew below.
                    if !matches!(event, Some(Ok(_))) {
                        watch = None;
                    }
                    // Look again once this burst of changes has passed (a join, a leave, a
                    // release), not at the next poll.
                    next = next.min(tokio::time::Instant::now() + SETTLE).max(first);
                    continue;
                }
                _ = tokio::time::sleep_until(next) => {}
            }
            next = tokio::time::Instant::now() + POLL;
            if watch.is_none() {
                watch = self::watch(&store, self.derived).await;
            }
            let members = match membership.members().await {
                Ok(members) => {
                    failures = 0;
                    members
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(group = self.derived, error = %crate::error::chain(&*error), "cannot read the group's members");
                    }
                    continue;
                }
            };
            holders.refresh(&store, self.derived).await;
            let members: Vec<&str> = members.iter().map(String::as_str).collect();
            let current: Vec<Option<&str>> = holders.0.iter().map(Option::as_deref).collect();
            let owners = super::assign(self.def.partitions, &members, &current);
            running.retain(|_, partition| !partition.handle.is_finished());
            for k in 0..self.def.partitions {
                let mine = owners.get(k as usize) == Some(&self.member.as_str());
                match running.get_mut(&k) {
                    None if mine => {
                        let partition = Partition::start(
                            leases[k as usize],
                            self.bound(k, provision, &settings, &permits),
                            &client,
                            &self.member,
                            &hard_stop,
                            handover,
                        );
                        running.insert(k, partition);
                    }
                    Some(partition) if !mine && !partition.cancel.is_cancelled() => {
                        tracing::info!(group = self.derived, partition = k, "handing the partition over");
                        metrics.handovers.inc();
                        partition.give_up();
                    }
                    _ => {}
                }
            }
            let owned: Vec<u32> = running
                .iter()
                .filter(|(_, p)| !p.cancel.is_cancelled())
                .map(|(k, _)| *k)
                .collect();
            if owned != last_owned {
                tracing::info!(
                    group = self.derived,
                    ?owned,
                    ?members,
                    "partitions assigned to this instance"
                );
                last_owned = owned;
            }
            metrics.owned.set(last_owned.len() as i64);
            if let Ok(mut ownership) = metrics.ownership.lock() {
                *ownership = (last_owned.clone(), holders.0.clone());
            }
        }
        // Leaving first lets the others work out the new owners while this instance drains.
        membership.leave().await;
        for partition in running.values() {
            partition.give_up();
        }
        for (_, partition) in running {
            let _ = partition.handle.await;
        }
        metrics.owned.set(0);
        if let Ok(mut ownership) = metrics.ownership.lock() {
            ownership.0.clear();
        }
        tracing::info!(group = self.derived, member = %self.member, "left the partitioned group");
    }
}

/// `subject` with each `*` as the transform's `{{wildcard(i)}}` (a `>` stays: it carries the rest).
fn with_wildcards(subject: &str) -> String {
    let mut nth = 0;
    subject
        .split('.')
        .map(|token| match token {
            "*" => {
                nth += 1;
                format!("{{{{wildcard({nth})}}}}")
            }
            other => other.to_string(),
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// A partition this instance contests or owns: the election task with its bound consumer.
struct Partition {
    cancel: CancellationToken,
    hard_stop: CancellationToken,
    handle: JoinHandle<()>,
    handover: Duration,
}

impl Partition {
    fn start(
        lease: LeaderDef,
        bound: BoundConsumer,
        client: &Client,
        member: &str,
        hard_stop: &CancellationToken,
        handover: Duration,
    ) -> Partition {
        let cancel = CancellationToken::new();
        let own_hard_stop = hard_stop.child_token();
        // The successor of an owner that did not release waits until every message that owner
        // held is back on the server (it expires `ack_wait` after its last keep-alive).
        let takeover_wait = bound.def.ack_wait.unwrap_or(DEFAULT_ACK_WAIT) + TAKEOVER_MARGIN;
        let bound = vec![bound];
        let handle = tokio::spawn(crate::leader::run_as(
            lease,
            client.clone(),
            bound,
            cancel.clone(),
            own_hard_stop.clone(),
            crate::leader::Contender {
                holder: member.to_string(),
                takeover_wait,
            },
        ));
        Partition {
            cancel,
            hard_stop: own_hard_stop,
            handle,
            handover,
        }
    }

    /// Drains the partition and releases its lease; handlers still running after the handover
    /// timeout ([`HANDOVER_TIMEOUT`] for handlers) are cut off.
    fn give_up(&self) {
        if self.cancel.is_cancelled() {
            return;
        }
        self.cancel.cancel();
        let (hard_stop, handover) = (self.hard_stop.clone(), self.handover);
        tokio::spawn(async move {
            tokio::time::sleep(handover).await;
            hard_stop.cancel();
        });
    }
}

/// Watches the group (leases and members) to wake the assignment at once after a join, a leave or
/// a release, rather than at the next poll.
async fn watch(store: &async_nats::jetstream::kv::Store, group: &str) -> Option<async_nats::jetstream::kv::Watch> {
    store.watch_with_history(format!("{group}.>")).await.ok()
}

/// Who holds each partition's lease, as this instance last read the bucket.
struct Holders(Vec<Option<String>>);

impl Holders {
    fn new(partitions: u32) -> Holders {
        Holders(vec![None; partitions as usize])
    }

    /// Reads every lease anew (a lease that ran out on the server, its holder having stopped
    /// renewing, leaves no trace a watch would see).
    async fn refresh(&mut self, store: &async_nats::jetstream::kv::Store, group: &str) {
        for (k, slot) in self.0.iter_mut().enumerate() {
            match store.entry(format!("{group}.p.{k}")).await {
                Ok(Some(entry)) if entry.operation == async_nats::jetstream::kv::Operation::Put => {
                    *slot = crate::leader::holder_of(&entry.value)
                }
                Ok(_) => *slot = None,
                // Unknown: keep what was seen.
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::{Delivery, Outcome};
    use futures_util::future::BoxFuture;

    fn handler(_: Delivery) -> BoxFuture<'static, Outcome> {
        Box::pin(async { Outcome::Ack })
    }

    fn def(subjects: &'static [&'static str], order_by: Option<OrderBy>) -> ConsumerDef {
        let def = ConsumerDef::new("post", "accounts", "ledger", handler)
            .subjects(subjects)
            .partitions(8);
        match order_by {
            Some(order_by) => def.order_by(order_by),
            None => def,
        }
    }

    #[test]
    fn the_transform_prefixes_the_partition_of_the_key_tokens() {
        let group = Group::new(def(&["accounts.*.posted"], Some(OrderBy::Token(1)))).unwrap();
        assert_eq!(group.derived(), "accounts_ledger");
        assert_eq!(
            group.transforms,
            [(
                "accounts.*.posted".to_string(),
                "{{partition(8,1)}}.accounts.{{wildcard(1)}}.posted".to_string()
            )]
        );
        let third = group.consumer(3);
        assert_eq!(
            (third.stream, third.durable, third.subjects),
            ("accounts_ledger", "ledger-p3", &["3.>"][..])
        );
        assert_eq!(third.partition, Some(3));
        assert_eq!(
            third.dead_letter_subject(),
            "natty.dead.accounts.ledger",
            "the group's, not the partition's"
        );
        assert_eq!(third.ack_wait, Some(DEFAULT_ACK_WAIT));

        // The second wildcard as the key; the whole subject as the key takes every wildcard.
        let second = Group::new(def(&["a.*.b.*"], Some(OrderBy::Token(3)))).unwrap();
        assert_eq!(
            second.transforms[0].1,
            "{{partition(8,2)}}.a.{{wildcard(1)}}.b.{{wildcard(2)}}"
        );
        let whole = Group::new(def(&["a.*.b.*"], Some(OrderBy::Subject))).unwrap();
        assert_eq!(
            whole.transforms[0].1,
            "{{partition(8,1,2)}}.a.{{wildcard(1)}}.b.{{wildcard(2)}}"
        );
    }

    #[test]
    fn a_group_the_server_cannot_partition_is_refused_with_the_reason() {
        let refused = |def: ConsumerDef| match Group::new(def) {
            Err(error) => error.to_string(),
            Ok(_) => panic!("accepted"),
        };
        assert!(refused(def(&["accounts.*.posted"], Some(OrderBy::Token(2)))).contains("must be a `*` token"));
        assert!(refused(def(&["accounts.*.posted"], None)).contains("needs `order_by"));
        assert!(refused(def(&["accounts.>"], Some(OrderBy::Subject))).contains("cannot hold `>`"));
        assert!(refused(def(&["a.*", "b.*"], Some(OrderBy::Token(1)))).contains("one subject"));
        assert!(refused(def(&["a.*"], Some(OrderBy::Token(1))).partitions(65)).contains("1 to 64"));
        let ephemeral = ConsumerDef::ephemeral("post", "accounts", handler)
            .subjects(&["a.*"])
            .order_by(OrderBy::Token(1))
            .partitions(2);
        assert!(refused(ephemeral).contains("durable"));
    }
}
