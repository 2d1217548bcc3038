//! One instance's side of an election: reading the key, campaigning with compare-and-set
//! writes, leading a term (renewing the lease before its local deadline, running the task and
//! the bound consumers) and releasing it.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{context::PublishErrorKind, stream::LastRawMessageErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::error::BoxError;
use crate::handler::Outcome;
use crate::publish::Client;

use super::{
    BoundConsumer, LeaderDef, Lease, LeaseState, KV_OPERATION_HEADER, RELEASED_HEADER, TTL_HEADER, WAIT_HEADER,
};

/// What the election key holds.
enum KeyState {
    /// Nobody leads: the key is absent (never written, or its TTL ran out) or deleted.
    Free {
        /// The revision a create must expect (0 when absent).
        expected: u64,
        /// Deleted by a leader that stepped down cleanly: nothing to wait out.
        released: bool,
        /// Deleted by a leader that stepped down owing a wait (see `WAIT_HEADER`).
        owed: Option<Duration>,
    },
    /// A lease is held, as of `revision`.
    Held { revision: u64 },
}

/// What the value of the election key says, for people looking at the bucket (and for a
/// partitioned group, which reads who holds each of its partitions).
#[derive(serde::Serialize, serde::Deserialize)]
struct Holder<'a> {
    #[serde(borrow)]
    holder: std::borrow::Cow<'a, str>,
    ttl_ms: u128,
}

/// The holder named in an election key's value.
pub(crate) fn holder_of(value: &[u8]) -> Option<String> {
    serde_json::from_slice::<Holder<'_>>(value)
        .ok()
        .map(|holder| holder.holder.into_owned())
}

/// One instance's side of one election.
pub(super) struct Election {
    def: LeaderDef,
    client: Client,
    bound: Vec<BoundConsumer>,
    /// The runtime's hard stop: bound consumers nak what is in flight when it fires.
    hard_stop: CancellationToken,
    subject: String,
    stream: String,
    holder: String,
    /// The TTL sent to the server: whole seconds, rounded up, so the server never expires a
    /// lease before the local deadline.
    server_ttl: String,
    /// How much earlier than the TTL the local deadline falls: room for clock-rate differences
    /// and for servers in a cluster judging the TTL with their own clocks.
    margin: Duration,
    /// How often a follower looks at the key when nothing woke it.
    pub(super) poll: Duration,
    /// See [`super::Contender::takeover_wait`].
    takeover_wait: Duration,
}

impl TermEnd {
    pub(super) fn as_str(&self) -> &'static str {
        match self {
            TermEnd::Lost => "lost",
            TermEnd::Finished => "finished",
            TermEnd::Shutdown => "shutdown",
        }
    }
}

/// How a term ended.
pub(super) enum TermEnd {
    /// Lost (deadline, taken over): contest again.
    Lost,
    /// The task returned `Ok`: released; contest again after a pause.
    Finished,
    /// Shutdown.
    Shutdown,
}

impl Election {
    pub(super) fn new(
        def: LeaderDef,
        client: Client,
        bound: Vec<BoundConsumer>,
        hard_stop: CancellationToken,
        contender: super::Contender,
    ) -> Election {
        let ttl = def.ttl.max(Duration::from_secs(1));
        let seconds = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        Election {
            subject: def.subject(),
            stream: format!("KV_{}", def.bucket),
            holder: contender.holder,
            takeover_wait: contender.takeover_wait,
            server_ttl: format!("{seconds}s"),
            margin: (ttl / 5).max(Duration::from_millis(200)).min(ttl / 2),
            poll: (ttl / 8).clamp(Duration::from_millis(50), Duration::from_millis(500)),
            def,
            client,
            bound,
            hard_stop,
        }
    }

    fn ttl(&self) -> Duration {
        self.def.ttl.max(Duration::from_secs(1))
    }

    /// Reads the key from the stream leader (not a direct get, which a replica may answer late).
    async fn read(&self) -> std::result::Result<KeyState, BoxError> {
        let stream = self.client.jetstream().get_stream_no_info(&self.stream).await?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(message) => {
                let deleted = message
                    .headers
                    .get(KV_OPERATION_HEADER)
                    .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"));
                Ok(if deleted {
                    KeyState::Free {
                        expected: message.sequence,
                        released: message.headers.get(RELEASED_HEADER).is_some(),
                        owed: message
                            .headers
                            .get(WAIT_HEADER)
                            .and_then(|ms| ms.as_str().parse().ok())
                            .map(Duration::from_millis),
                    }
                } else {
                    KeyState::Held {
                        revision: message.sequence,
                    }
                })
            }
            Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(KeyState::Free {
                expected: 0,
                released: false,
                owed: None,
            }),
            Err(error) => Err(error.into()),
        }
    }

    /// Writes the key if its last revision is `expected`, with a TTL; `Ok(None)` when someone
    /// else wrote it first.
    async fn write(&self, expected: u64, limit: Duration) -> std::result::Result<Option<u64>, BoxError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        headers.insert(TTL_HEADER, self.server_ttl.as_str());
        let value = serde_json::to_vec(&Holder {
            holder: std::borrow::Cow::Borrowed(&self.holder),
            ttl_ms: self.ttl().as_millis(),
        })?;
        let js = self.client.jetstream();
        let written = tokio::time::timeout(limit, async {
            js.publish_with_headers(self.subject.clone(), headers, Bytes::from(value))
                .await?
                .await
        })
        .await
        .map_err(|_| format!("no answer within {limit:?}"))?;
        match written {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(error) if error.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(error) => Err(error.into()),
        }
    }

    /// Deletes the key if it is still at `revision`, marking the delete as a release when
    /// `clean` (nothing this term or an earlier one started can still be running), or else with
    /// the wait its successor owes (`owed`, from now).
    async fn release(&self, revision: u64, clean: bool, owed: Duration) {
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            revision.to_string().as_str(),
        );
        headers.insert(KV_OPERATION_HEADER, "DEL");
        if clean {
            headers.insert(RELEASED_HEADER, self.holder.as_str());
        } else {
            // Rounded up: never less than owed.
            let ms = owed.as_millis() + u128::from(owed.subsec_nanos() % 1_000_000 > 0);
            headers.insert(WAIT_HEADER, ms.to_string().as_str());
        }
        let released = tokio::time::timeout(Duration::from_secs(2), async {
            self.client
                .jetstream()
                .publish_with_headers(self.subject.clone(), headers, Bytes::new())
                .await?
                .await
        })
        .await;
        match released {
            Ok(Ok(_)) => tracing::info!(
                handler = self.def.name,
                bucket = self.def.bucket,
                key = self.def.key,
                "leadership released"
            ),
            Ok(Err(error)) => {
                tracing::warn!(handler = self.def.name, error = %crate::error::chain(&error), "cannot release leadership; it ends with its TTL")
            }
            Err(_) => tracing::warn!(
                handler = self.def.name,
                "no answer to the release; leadership ends with its TTL"
            ),
        }
    }

    /// Contests the key until this instance wins it; returns the revision, when the write was
    /// sent, and until when the previous leader might still act. `None` on shutdown.
    pub(super) async fn campaign(&self, cancel: &CancellationToken) -> Option<(u64, Instant, Instant)> {
        // Every write to the key, a renewal or a release, wakes the followers at once.
        let mut activity = match self.client.nats().subscribe(self.subject.clone()).await {
            Ok(subscriber) => Some(subscriber),
            Err(error) => {
                tracing::warn!(handler = self.def.name, error = %crate::error::chain(&error), "cannot watch the election key; polling it");
                None
            }
        };
        // The holder's revision and when this instance first saw it: that holder cannot act
        // past then + TTL, since its deadline counts from before its write reached the server.
        let mut seen: Option<(u64, Instant)> = None;
        let mut failures = 0u32;
        loop {
            if cancel.is_cancelled() {
                return None;
            }
            let state = match self.read().await {
                Ok(state) => {
                    failures = 0;
                    state
                }
                Err(error) => {
                    failures += 1;
                    if failures == 1 || failures % 20 == 0 {
                        tracing::warn!(handler = self.def.name, bucket = self.def.bucket, error = %crate::error::chain(&*error), "cannot read the election key; retrying");
                    }
                    if !self.pause(cancel, &mut activity, &mut seen).await {
                        return None;
                    }
                    continue;
                }
            };
            match state {
                KeyState::Held { revision } => {
                    if seen.is_none_or(|(known, _)| known != revision) {
                        seen = Some((revision, Instant::now()));
                    }
                }
                KeyState::Free {
                    expected,
                    released,
                    owed,
                } => {
                    let sent_at = Instant::now();
                    match self.write(expected, self.ttl() - self.margin).await {
                        Ok(Some(revision)) => {
                            let previous_until = match seen {
                                // Deleted by a holder that owed a wait: it is passed on.
                                _ if owed.is_some() => sent_at + owed.unwrap_or_default(),
                                // Expired on the server: the holder's local deadline, which ends
                                // first, has passed; what it held comes back within the wait.
                                Some(_) if !released && expected == 0 && !self.takeover_wait.is_zero() => {
                                    sent_at + self.takeover_wait
                                }
                                Some((_, at)) if !released => at + self.ttl() + self.takeover_wait,
                                // A delete or purge marker that is not a release: the key was
                                // removed under a holder this instance never saw, which acts
                                // until its next renewal fails. Wait out a whole lease.
                                None if !released && expected > 0 => sent_at + self.ttl() + self.takeover_wait,
                                // Absent: any holder's lease has ended on the server already.
                                None if !released => sent_at + self.takeover_wait,
                                _ => sent_at,
                            };
                            return Some((revision, sent_at, previous_until));
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::warn!(handler = self.def.name, error = %crate::error::chain(&*error), "cannot write the election key; retrying");
                        }
                    }
                }
            }
            if !self.pause(cancel, &mut activity, &mut seen).await {
                return None;
            }
        }
    }

    /// Waits for activity on the key or the poll interval; false on shutdown.
    async fn pause(
        &self,
        cancel: &CancellationToken,
        activity: &mut Option<async_nats::Subscriber>,
        seen: &mut Option<(u64, Instant)>,
    ) -> bool {
        let woken = async {
            match activity {
                Some(subscriber) => subscriber.next().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => false,
            message = woken => {
                if let Some(message) = message {
                    let released = message.headers.as_ref().is_some_and(|h| h.get(RELEASED_HEADER).is_some());
                    if !released {
                        // A renewal: the holder's lease now runs from about now.
                        if let Some((_, at)) = seen {
                            *at = Instant::now();
                        }
                    }
                } else {
                    *activity = None;
                }
                true
            }
            _ = tokio::time::sleep(self.poll) => true,
        }
    }

    /// Leads one term: waits out the previous leader, runs the task (restarting it after an
    /// error while still leading), renews, and steps down at the deadline or on shutdown.
    pub(super) async fn lead(
        &self,
        revision: u64,
        sent_at: Instant,
        previous_until: Instant,
        cancel: &CancellationToken,
    ) -> TermEnd {
        let lease = Lease {
            inner: Arc::new(LeaseState {
                bucket: self.def.bucket,
                key: self.def.key,
                term: revision,
                token: AtomicU64::new(revision),
                deadline: Mutex::new(sent_at + self.ttl() - self.margin),
                lost: CancellationToken::new(),
                client: self.client.clone(),
            }),
        };
        tracing::info!(
            handler = self.def.name,
            bucket = self.def.bucket,
            key = self.def.key,
            term = revision,
            "leading"
        );
        let renewing = self.renew(lease.clone());
        tokio::pin!(renewing);
        // The previous leader's lease may not be over yet (it was not released): wait it out.
        // A takeover wait is for messages an old holder left unacked: with none, there is none.
        let previous_until =
            if previous_until > Instant::now() && !self.takeover_wait.is_zero() && self.nothing_pending().await {
                Instant::now()
            } else {
                previous_until
            };
        let mut start_at = Some(previous_until);
        // Whether the predecessor was waited out (the term's work could start).
        let mut waited_out = false;
        let mut task: Option<tokio::task::JoinHandle<Outcome>> = None;
        let mut failures = 0u32;
        // Bound consumers run for the whole term (not restarted with the task); on shutdown
        // they drain like any consumer, on a lost lease they stop at once.
        let term_cancel = cancel.child_token();
        let term_hard_stop = self.hard_stop.child_token();
        let mut consumers: tokio::task::JoinSet<crate::error::Result<bool>> = tokio::task::JoinSet::new();
        let mut consumers_started = false;
        // Whether everything bound to this term drained cleanly (see `BoundConsumer::run`).
        let mut clean = true;
        let end = loop {
            let started = async {
                match (&mut task, start_at) {
                    (Some(handle), _) => Err(handle.await),
                    (None, Some(at)) => {
                        tokio::time::sleep_until(at).await;
                        Ok(())
                    }
                    (None, None) => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break TermEnd::Shutdown,
                _ = lease.lost() => break TermEnd::Lost,
                _ = &mut renewing => break TermEnd::Lost,
                // A bound consumer or capture runs until the term ends: one that stops on its
                // own (it cannot start, it failed) ends the term, so that the lease is contested
                // again rather than held with nothing behind it.
                Some(ended) = consumers.join_next(), if !consumers.is_empty() => {
                    clean = false;
                    match ended {
                        Ok(Err(error)) => tracing::error!(handler = self.def.name, key = self.def.key,
                            error = %crate::error::chain(&error), "a consumer bound to the lease failed; stepping down to contest it again"),
                        _ => tracing::error!(handler = self.def.name, key = self.def.key,
                            "a consumer bound to the lease stopped; stepping down to contest it again"),
                    }
                    break TermEnd::Finished;
                }
                ended = started => match ended {
                    Ok(()) => {
                        start_at = None;
                        waited_out = true;
                        if !consumers_started && lease.is_valid() {
                            consumers_started = true;
                            for bound in &self.bound {
                                let (bound, client, lease) = (bound.clone(), self.client.clone(), lease.clone());
                                let (cancel, hard_stop) = (term_cancel.clone(), term_hard_stop.clone());
                                consumers.spawn(async move { bound.run(client, lease, cancel, hard_stop).await });
                            }
                        }
                        if lease.is_valid() {
                            // The task runs in the term's span.
                            let run = (self.def.handler)(lease.clone()).instrument(tracing::Span::current());
                            task = Some(tokio::spawn(AssertUnwindSafe(run).catch_unwind().map(|outcome| {
                                outcome.unwrap_or_else(|_| Outcome::Failed("the task panicked".into()))
                            })));
                        }
                    }
                    Err(joined) => {
                        task = None;
                        let failure = match joined {
                            Ok(Outcome::Ack) => break TermEnd::Finished,
                            Ok(Outcome::Failed(error)) => crate::error::chain(&*error).to_string(),
                            Ok(Outcome::Undecodable(error)) => crate::error::chain(&error).to_string(),
                            Err(error) => error.to_string(),
                        };
                        failures += 1;
                        let delay = restart_delay(failures);
                        tracing::warn!(handler = self.def.name, error = %failure, ?delay,
                            "the leader task failed; restarting it while still leading");
                        start_at = Some(Instant::now() + delay);
                    }
                },
            }
        };
        // Leadership ends here. The task is told and cancelled at once. Every handler bound to
        // the lease must have ended before the lease can end: on shutdown the bound consumers
        // drain while the lease is still renewed, and if a renewal fails they are cut off at
        // once, before the deadline passes; on a lost lease they stop at once. Only then is the
        // key released, so a successor never overlaps with anything this term started.
        lease.inner.lost.cancel();
        if let Some(handle) = &task {
            handle.abort();
        }
        term_cancel.cancel();
        if !matches!(end, TermEnd::Shutdown) {
            term_hard_stop.cancel();
        }
        let drained = async {
            let mut clean = true;
            while let Some(ended) = consumers.join_next().await {
                clean &= matches!(ended, Ok(Ok(true)));
            }
            clean
        };
        tokio::pin!(drained);
        let drained_cleanly = if matches!(end, TermEnd::Shutdown) {
            tokio::select! {
                biased;
                clean = &mut drained => clean,
                _ = &mut renewing => {
                    tracing::warn!(handler = self.def.name,
                        "the lease cannot be kept while bound handlers drain: stopping them now");
                    term_hard_stop.cancel();
                    (&mut drained).await
                }
            }
        } else {
            (&mut drained).await
        };
        if let Some(handle) = task {
            if tokio::time::timeout(Duration::from_secs(5), handle).await.is_err() {
                tracing::error!(
                    handler = self.def.name,
                    "the leader task does not yield to cancellation; it may still be running"
                );
            }
        }
        match end {
            TermEnd::Lost => {
                tracing::warn!(
                    handler = self.def.name,
                    term = revision,
                    "leadership lost: stepped down"
                );
            }
            // Conditional on the token: if the lease ran out meanwhile, this changes nothing.
            // A term that ended while still waiting out its predecessor, or whose bound consumers
            // did not drain cleanly, passes the wait on: its delete is no release, so the
            // successor waits as it would have after a crash.
            TermEnd::Finished | TermEnd::Shutdown => {
                let owed = match start_at {
                    // Still waiting out the predecessor: the rest of that wait.
                    Some(until) if !waited_out => until.saturating_duration_since(Instant::now()),
                    // What this term held may still be out: until it comes back.
                    _ => self.takeover_wait,
                };
                self.release(lease.token(), waited_out && clean && drained_cleanly, owed)
                    .await
            }
        }
        end
    }

    /// Whether no bound consumer has a message delivered and unacked on the server (one that
    /// does not exist yet has none). Any doubt (no answer) counts as pending.
    async fn nothing_pending(&self) -> bool {
        use async_nats::jetstream::context::ConsumerInfoErrorKind as Kind;
        for bound in &self.bound {
            let Some(durable) = bound.def.durable() else { continue };
            // Bounded well inside the lease, which is not renewed while this waits.
            let info = tokio::time::timeout(Duration::from_secs(1), async {
                let stream = self
                    .client
                    .jetstream()
                    .get_stream_no_info(bound.def.stream())
                    .await
                    .ok()?;
                Some(stream.consumer_info(durable).await)
            })
            .await;
            match info {
                Ok(Some(Ok(info))) if info.num_ack_pending == 0 => {}
                Ok(Some(Err(error))) if matches!(error.kind(), Kind::NotFound) => {}
                Ok(Some(Ok(info))) => {
                    tracing::info!(
                        handler = self.def.name,
                        key = self.def.key,
                        pending = info.num_ack_pending,
                        "the previous holder left messages unacked: waiting until they come back to the server"
                    );
                    return false;
                }
                _ => return false,
            }
        }
        true
    }

    /// Renews the lease every third of its TTL until it cannot: returns (and the term ends)
    /// at the local deadline, or when the key was taken or deleted.
    async fn renew(&self, lease: Lease) {
        let period = self.ttl() / 3;
        let mut next = Instant::now() + period;
        loop {
            let deadline = lease.deadline();
            tokio::select! {
                _ = tokio::time::sleep_until(next) => {}
                _ = tokio::time::sleep_until(deadline) => {
                    if Instant::now() >= lease.deadline() {
                        tracing::warn!(handler = self.def.name, "lease deadline reached without a renewal");
                        return;
                    }
                    continue;
                }
            }
            let sent_at = Instant::now();
            let remaining = lease.deadline().saturating_duration_since(sent_at);
            if remaining.is_zero() {
                return;
            }
            match self.write(lease.token(), remaining).await {
                Ok(Some(revision)) => {
                    lease.inner.token.store(revision, Ordering::SeqCst);
                    *lease.inner.deadline.lock().expect("lease lock") = sent_at + self.ttl() - self.margin;
                    next = sent_at + period;
                }
                Ok(None) => {
                    tracing::warn!(handler = self.def.name, "the election key was taken or deleted");
                    return;
                }
                Err(error) => {
                    tracing::warn!(handler = self.def.name, error = %crate::error::chain(&*error), "cannot renew the lease; retrying until its deadline");
                    next = Instant::now() + Duration::from_millis(100);
                }
            }
        }
    }
}

/// 100 ms doubling per failure, at most 10 s.
fn restart_delay(failures: u32) -> Duration {
    Duration::from_millis(100 * 2u64.pow(failures.saturating_sub(1).min(7))).min(Duration::from_secs(10))
}
