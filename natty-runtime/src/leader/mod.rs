//! Leader election that is safe under pauses: `#[leader(bucket, key, ttl)]` runs a task in one
//! instance at a time.
//!
//! The election key in a KV bucket is written only with compare-and-set on its revision (the
//! stream sequence of its last write) and a per-message TTL (`Nats-TTL`), so a leader that stops
//! renewing loses the key when its TTL runs out on the server. The lease deadline is measured
//! locally, from the monotonic clock read *before* the renewal was sent: the server starts the
//! TTL when it stores the write, which is later, so the local deadline (minus a margin) always
//! ends first. A leader steps down at that deadline without waiting for any error — a process
//! paused past it (GC, SIGSTOP, a frozen VM) wakes up already knowing it is no longer leader.
//!
//! The revision is also a fencing token: [`Lease::fenced_put`] writes to the bucket only while
//! the election key's last revision is still the lease's, checked by the server in the same
//! write (`Nats-Expected-Last-Subject-Sequence-Subject`), so a stale leader's late write is
//! rejected by the server rather than by hope.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};
use async_nats::HeaderMap;
use futures_util::future::BoxFuture;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Provision;
use crate::error::{BoxError, Error, Result};
use crate::handler::Outcome;
use crate::payload::EncodePayload;
use crate::publish::Client;
use crate::stream::Location;

mod election;

pub(crate) use election::holder_of;
use election::{Election, TermEnd};

/// The adapter a `#[leader]` generates: runs the task for one lease.
pub type LeaderFn = fn(Lease) -> BoxFuture<'static, Outcome>;

/// A declared leader task. `#[leader(...)]` registers one; [`LeaderDef::new`] builds one by hand.
#[derive(Debug, Clone, Copy)]
pub struct LeaderDef {
    pub(crate) name: &'static str,
    pub(crate) bucket: &'static str,
    pub(crate) key: &'static str,
    pub(crate) ttl: Duration,
    pub(crate) handler: LeaderFn,
    pub(crate) location: Location,
    /// The state types its arguments take (see [`crate::State`]), checked at startup.
    pub(crate) needs: &'static [crate::state::NeedFn],
}

impl LeaderDef {
    /// A task named `name` led through key `key` of KV bucket `bucket`, with leases of `ttl`
    /// (at least one second: the server counts TTLs in whole seconds).
    pub const fn new(
        name: &'static str,
        bucket: &'static str,
        key: &'static str,
        ttl: Duration,
        handler: LeaderFn,
    ) -> Self {
        LeaderDef {
            name,
            bucket,
            key,
            ttl,
            handler,
            location: Location::UNKNOWN,
            needs: &[],
        }
    }

    /// Records where the declaration was written (the macros set this).
    pub const fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    crate::state::needs_setter!();

    /// The handler's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    fn subject(&self) -> String {
        format!("$KV.{}.{}", self.bucket, self.key)
    }
}

inventory::collect!(LeaderDef);

/// The header giving a write its time to live on the server.
const TTL_HEADER: &str = "Nats-TTL";
/// Makes a write's expected-last-subject-sequence refer to another subject: the fence.
const EXPECTED_SUBJECT_HEADER: &str = "Nats-Expected-Last-Subject-Sequence-Subject";
/// How KV marks a delete.
const KV_OPERATION_HEADER: &str = "KV-Operation";
/// Set on the delete that releases a lease, so a successor knows it need not wait.
const RELEASED_HEADER: &str = "Natty-Released";
/// Set on the delete of a term that ended with a wait still owed (its predecessor not yet waited
/// out, or what it held not confirmed back on the server): how many milliseconds its successor
/// must wait from its own win, so that the wait is passed on, not started again.
const WAIT_HEADER: &str = "Natty-Wait-Ms";

/// Leadership of one key, handed to a `#[leader]` task. Cheap to clone.
///
/// When leadership ends — at the local deadline without a renewal, when the key was taken,
/// or on shutdown — [`lost`](Lease::lost) resolves, [`is_valid`](Lease::is_valid) turns false,
/// and the task is cancelled at its next `.await`. Check `is_valid()` before an action that
/// must not run twice, and make writes that must be fenced with [`fenced_put`](Lease::fenced_put).
#[derive(Clone)]
pub struct Lease {
    inner: Arc<LeaseState>,
}

struct LeaseState {
    bucket: &'static str,
    key: &'static str,
    term: u64,
    token: AtomicU64,
    deadline: Mutex<Instant>,
    lost: CancellationToken,
    client: Client,
}

impl Lease {
    /// The current fencing token: the election key's revision, which every renewal advances.
    /// Tokens only grow, within a term and from one leader to the next.
    pub fn token(&self) -> u64 {
        self.inner.token.load(Ordering::SeqCst)
    }

    /// The revision that won this term: constant while it lasts, and larger than every earlier
    /// term's.
    pub fn term(&self) -> u64 {
        self.inner.term
    }

    /// Whether this instance still leads: false from the local deadline on, or once leadership
    /// was lost. Judged on the monotonic clock, so it is right even just after a pause.
    pub fn is_valid(&self) -> bool {
        !self.inner.lost.is_cancelled() && Instant::now() < self.deadline()
    }

    /// When the lease ends unless renewed (renewals push it forward).
    pub fn deadline(&self) -> Instant {
        *self.inner.deadline.lock().expect("lease lock")
    }

    /// Resolves when leadership is gone.
    pub async fn lost(&self) {
        self.inner.lost.cancelled().await;
    }

    /// The connected client, for publishing or anything else.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// The KV bucket of the election.
    pub fn bucket(&self) -> &str {
        self.inner.bucket
    }

    /// The election key.
    pub fn key(&self) -> &str {
        self.inner.key
    }

    /// Writes `value` to `key` of the election's bucket only if this lease is still the
    /// current one: the server checks, in the same write, that the election key's last
    /// revision is this lease's token. After a pause, a deleted key or a new leader, the write
    /// is refused with [`FencedError::Fenced`]. Returns the written revision.
    ///
    /// # Errors
    ///
    /// [`FencedError::Fenced`] when leadership has moved on; [`FencedError::Write`] when the
    /// write failed otherwise.
    pub async fn fenced_put<T: EncodePayload + ?Sized>(&self, key: &str, value: &T) -> Result<u64, FencedError> {
        let payload = value.to_bytes().map_err(|source| FencedError::Write {
            key: key.to_string(),
            source,
        })?;
        let subject = format!("$KV.{}.{key}", self.inner.bucket);
        let fence = format!("$KV.{}.{}", self.inner.bucket, self.inner.key);
        loop {
            let token = self.token();
            let mut headers = HeaderMap::new();
            T::FORMAT.write_content_type(&mut headers);
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                token.to_string().as_str(),
            );
            headers.insert(EXPECTED_SUBJECT_HEADER, fence.as_str());
            let written = async {
                self.inner
                    .client
                    .jetstream()
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await?
                    .await
            }
            .await;
            match written {
                Ok(ack) => return Ok(ack.sequence),
                Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => {
                    // A renewal may have advanced the token between reading and writing it.
                    if self.token() != token && self.is_valid() {
                        continue;
                    }
                    return Err(FencedError::Fenced {
                        key: key.to_string(),
                        token,
                    });
                }
                Err(error) => {
                    return Err(FencedError::Write {
                        key: key.to_string(),
                        source: error.into(),
                    })
                }
            }
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("bucket", &self.inner.bucket)
            .field("key", &self.inner.key)
            .field("term", &self.inner.term)
            .field("token", &self.token())
            .field("valid", &self.is_valid())
            .finish()
    }
}

/// A fenced write that did not happen.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FencedError {
    /// The server refused it: the election key is no longer at this lease's token, so this
    /// instance is not the leader any more.
    #[error("fenced write to `{key}` refused: the lease with token {token} is no longer current")]
    Fenced {
        /// The key written.
        key: String,
        /// The token the write was fenced by.
        token: u64,
    },
    /// Encoding or publishing failed.
    #[error("fenced write to `{key}` failed")]
    Write {
        /// The key written.
        key: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
}

/// For a generated adapter: builds the task's argument.
#[doc(hidden)]
pub trait FromLease: Sized {
    /// Builds the argument.
    fn from_delivery(lease: &Lease) -> Self;
}

impl<T: Clone + Send + Sync + 'static> FromLease for crate::State<T> {
    fn from_delivery(lease: &Lease) -> Self {
        lease.inner.client.states.argument()
    }
}

impl FromLease for Lease {
    fn from_delivery(lease: &Lease) -> Self {
        lease.clone()
    }
}

/// A consumer that runs only while this instance leads (see [`crate::ConsumerDef::while_leading`]),
/// or a partition of a partitioned group.
#[derive(Clone)]
pub(crate) struct BoundConsumer {
    pub(crate) def: crate::consumer::ConsumerDef,
    pub(crate) provision: Provision,
    pub(crate) stream: Option<crate::stream::StreamDef>,
    /// Set when what runs on the consumer is a capture (a partition of a partitioned capture),
    /// with the settings it starts with.
    #[cfg(feature = "capture")]
    pub(crate) capture: Option<(crate::capture::CaptureDef, Arc<crate::Config>)>,
    /// Handler slots shared with the other partitions this instance owns of the same group.
    pub(crate) permits: Option<Arc<tokio::sync::Semaphore>>,
}

impl BoundConsumer {
    pub(crate) fn new(
        def: crate::consumer::ConsumerDef,
        provision: Provision,
        stream: Option<crate::stream::StreamDef>,
    ) -> Self {
        BoundConsumer {
            def,
            provision,
            stream,
            #[cfg(feature = "capture")]
            capture: None,
            permits: None,
        }
    }

    /// Runs it for a term: until `cancel` (draining) or `hard_stop` (cut off; a capture abandons
    /// its open blocks, whose messages the next holder captures). True when it drained cleanly:
    /// nothing it held is still out (see `Consumer::run_drained`).
    pub(crate) async fn run(
        &self,
        client: Client,
        lease: Lease,
        cancel: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Result<bool> {
        #[cfg(feature = "capture")]
        if let Some((capture, settings)) = &self.capture {
            let started = crate::capture::Capture::start(*capture, client, self.provision, None, settings).await?;
            // Unstored messages come back to the next holder, whose ledger tells it which of
            // them a block already holds: order does not matter to a capture.
            return started.run_until(cancel, hard_stop).await.map(|()| true);
        }
        let owner = client.clone();
        let mut consumer = crate::consumer::Consumer::new(self.def, client, self.provision, self.stream).under(lease);
        if let Some(permits) = &self.permits {
            consumer = consumer.sharing(permits.clone());
        }
        // Bound first: the keep-alive follows the consumer's ack_wait as the server has it.
        let mut failures = 0;
        let drained = if consumer.rebind(&cancel, &mut failures).await {
            consumer.run_drained(cancel, hard_stop).await
        } else {
            Ok(true)
        };
        if self.def.partition.is_some() {
            // A partition handed over is another instance's to report on.
            owner
                .telemetry()
                .metrics
                .unwatch(self.def.name, self.def.stream, self.def.durable);
        }
        drained
    }
}

/// The task of an election that only exists for bound consumers: it holds the lease.
pub(crate) fn idle(lease: Lease) -> BoxFuture<'static, Outcome> {
    Box::pin(async move {
        lease.lost().await;
        Outcome::Ack
    })
}

/// Makes sure the leader's bucket exists and accepts per-message TTLs.
pub(crate) async fn provision(def: &LeaderDef, js: &jetstream::Context, mode: Provision) -> Result<()> {
    provision_ttl_bucket(
        js,
        def.bucket,
        "natty leader election",
        mode,
        &format!("leader `{}`", def.name),
        1,
    )
    .await
}

/// Makes sure KV bucket `bucket` exists and accepts per-message TTLs (what elections and group
/// memberships need), created with `replicas`; `user` names who needs it, in errors.
pub(crate) async fn provision_ttl_bucket(
    js: &jetstream::Context,
    bucket: &str,
    description: &str,
    mode: Provision,
    user: &str,
    replicas: usize,
) -> Result<()> {
    if mode == Provision::Off {
        return Ok(());
    }
    let stream_name = format!("KV_{bucket}");
    let error = |action: &'static str, source: BoxError| Error::Stream {
        stream: stream_name.clone(),
        action,
        source,
    };
    let mut stream = match js.get_stream(&stream_name).await {
        Ok(stream) => stream,
        Err(_) if mode == Provision::CreateOrUpdate => {
            let created = js
                .create_key_value(jetstream::kv::Config {
                    bucket: bucket.to_string(),
                    history: 1,
                    description: description.into(),
                    num_replicas: replicas,
                    ..Default::default()
                })
                .await;
            // Another instance starting at the same time may have created it (and already
            // allowed TTLs, so that this create sees a different configuration): use theirs.
            match crate::stream::read_back(js, &stream_name).await {
                Ok(stream) => stream,
                Err(read) => {
                    let source: BoxError = match created {
                        Err(create) => create.into(),
                        Ok(_) => read.into(),
                    };
                    return Err(error("creating the bucket", source));
                }
            }
        }
        Err(_) => {
            return Err(Error::StreamNotFound {
                stream: stream_name,
                hint: format!(
                    " (the KV bucket `{bucket}` of {user}; provisioning is {})",
                    mode.as_str()
                ),
            })
        }
    };
    let mut config = stream
        .info()
        .await
        .map_err(|e| error("reading the bucket", e.into()))?
        .config
        .clone();
    if !config.allow_message_ttl {
        if mode != Provision::CreateOrUpdate {
            return Err(crate::error::Drift {
                declared_on: crate::error::Declared::Stream(stream_name),
                field: "allow_msg_ttl",
                declared: format!("true ({user} needs per-key TTLs)"),
                actual: "false".into(),
                hint: String::new(),
            }
            .into());
        }
        config.allow_message_ttl = true;
        js.update_stream(&config)
            .await
            .map_err(|e| error("allowing per-key TTLs", e.into()))?;
    }
    Ok(())
}

/// The task that contests and leads the election `def`, with the consumers bound to it (see [`run`]).
pub(crate) fn task(def: LeaderDef, client: Client, bound: Vec<BoundConsumer>) -> crate::supervise::Task {
    crate::supervise::Task::new(format!("leader {}", def.name), move |stop| async move {
        run(def, client, bound, stop.cancel, stop.hard_stop).await;
        Ok(())
    })
}

/// Contests and leads until `cancel`, then releases leadership.
pub(crate) async fn run(
    def: LeaderDef,
    client: Client,
    bound: Vec<BoundConsumer>,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
) {
    let contender = Contender {
        holder: client.telemetry().instance.id.clone(),
        takeover_wait: Duration::ZERO,
    };
    run_as(def, client, bound, cancel, hard_stop, contender).await
}

/// Who contests an election, and how a term taken over from a holder that did not release
/// starts (a partition of a group: see `partition::group`).
pub(crate) struct Contender {
    /// The name written into the key while leading.
    pub(crate) holder: String,
    /// How much longer than the old holder's lease to wait before the bound consumers start,
    /// when the old holder did not release and its consumers still have messages unacked:
    /// until they came back to the server.
    pub(crate) takeover_wait: Duration,
}

/// [`run`] as `contender`.
pub(crate) async fn run_as(
    def: LeaderDef,
    client: Client,
    bound: Vec<BoundConsumer>,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
    contender: Contender,
) {
    let metrics = client.telemetry().metrics.leader(def.name, def.bucket, def.key);
    let election = Election::new(def, client, bound, hard_stop, contender);
    loop {
        let Some((revision, sent_at, previous_until)) = election.campaign(&cancel).await else {
            return;
        };
        metrics.began(revision);
        let span = tracing::info_span!(
            "natty.leader.term",
            handler = def.name,
            bucket = def.bucket,
            key = def.key,
            term = revision,
            ended = tracing::field::Empty,
        );
        let end = election
            .lead(revision, sent_at, previous_until, &cancel)
            .instrument(span.clone())
            .await;
        metrics.ended();
        span.record("ended", end.as_str());
        match end {
            TermEnd::Shutdown => return,
            // Let a waiting instance try first: leadership is contested again, not kept.
            TermEnd::Lost | TermEnd::Finished => {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(election.poll * 2) => {}
                }
            }
        }
    }
}
