//! Confirmed acks: an ack sent with a reply subject, which the server answers once it has
//! applied the ack (for a replicated consumer, once the ack is replicated: nats-server 2.11+),
//! sent again with backoff until it is answered or the message's `ack_wait` has passed.
//!
//! A fire-and-forget ack is lost when the connection drops or the consumer's leader changes
//! between sending and applying it; the message then comes again after `ack_wait`, at least
//! once as promised, but a handler whose side effect must not repeat needs to know.

use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::time::Instant;

use crate::handler::ConsumerShared;

/// How long one attempt waits for the server's answer.
const ATTEMPT: Duration = Duration::from_secs(1);
/// The first pause between attempts; it doubles up to [`ATTEMPT`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// How a consumer tells the server that a handler finished a message.
///
/// Set with `#[consumer(..., ack = "confirmed")]` or [`ConsumerDef::ack`](super::ConsumerDef::ack);
/// a handler can also confirm one message itself with [`Context::ack`](crate::Context::ack).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ack {
    /// Sent and not waited for (the default, and the fastest). An ack lost on the way (a
    /// dropped connection, a consumer leader election) means the message comes again after
    /// `ack_wait`: at least once.
    #[default]
    Sent,
    /// Sent with a reply subject and waited for: the server answers once it applied the ack
    /// (replicated, for a replicated consumer). Unanswered, it is sent again with backoff (50 ms
    /// doubling to 1 s) until the consumer's `ack_wait` has passed since the handler finished;
    /// one never confirmed is logged and counted in `natty_consumer_acks_unconfirmed_total`.
    /// Costs a round trip per message (see the README's performance table).
    Confirmed,
}

/// Why a confirmed ack did not land.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AckError {
    /// The server turned the ack down: nothing takes acks for this consumer any more (it was
    /// deleted). The message is not acked; what happens to it depends on the consumer.
    #[error("the ack of {stream} #{sequence} (consumer {consumer}) was refused: {reason}")]
    Refused {
        /// The stream of the message.
        stream: String,
        /// The consumer that delivered it.
        consumer: String,
        /// The message's stream sequence.
        sequence: u64,
        /// What the server said.
        reason: String,
    },
    /// No answer came within the consumer's `ack_wait`: the server may or may not have applied
    /// the ack, and the message may be delivered again.
    #[error(
        "the ack of {stream} #{sequence} (consumer {consumer}) was not confirmed after {attempts} attempts in {waited:?}: {last}"
    )]
    Unconfirmed {
        /// The stream of the message.
        stream: String,
        /// The consumer that delivered it.
        consumer: String,
        /// The message's stream sequence.
        sequence: u64,
        /// How many times it was sent.
        attempts: u32,
        /// How long it was tried.
        waited: Duration,
        /// Why the last attempt failed.
        last: String,
    },
}

/// The sequences whose ack the server confirmed lately, in one consumer of this instance, each
/// with the delivery count of the copy that was acked.
///
/// A delivery of one of them with a *higher* count, arriving after the confirmation, was sent
/// before the ack was applied: a redelivery after `ack_wait` (a consumer leader election can
/// swallow the keep-alive pings) that the retried ack raced. The server no longer holds it;
/// handling it would run the handler twice for a message whose ack was confirmed, so it is
/// dropped. A delivery with the same or a lower count is a new one (the consumer was deleted
/// and made again, or reset) and is handled; binding the consumer again forgets everything.
/// Kept two `ack_wait`s, past which no such redelivery can still be on its way.
#[derive(Default)]
pub(crate) struct Confirmed {
    /// Whether anything is recorded: consumers without confirmed acks read no lock.
    any: std::sync::atomic::AtomicBool,
    recorded: std::sync::Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    /// Sequence → the delivery count of the copy acked.
    delivered: std::collections::HashMap<u64, u64>,
    /// (when, sequence, delivery count), oldest first: forgetting is a walk from the front.
    order: std::collections::VecDeque<(Instant, u64, u64)>,
}

impl Confirmed {
    fn lock(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the ack of the copy of `sequence` delivered `delivered` times was confirmed.
    pub(crate) fn record(&self, sequence: u64, delivered: u64) {
        let mut recorded = self.lock();
        recorded.delivered.insert(sequence, delivered);
        recorded.order.push_back((Instant::now(), sequence, delivered));
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether a delivery of `sequence`, the `delivered`-th, raced an ack confirmed lately.
    pub(crate) fn raced(&self, sequence: u64, delivered: u64) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .lock()
                .delivered
                .get(&sequence)
                .is_some_and(|acked| delivered > *acked)
    }

    /// Forgets confirmations older than `age`.
    pub(crate) fn forget_older_than(&self, age: Duration) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut recorded = self.lock();
        while let Some(&(at, sequence, delivered)) = recorded.order.front() {
            if at.elapsed() < age {
                break;
            }
            recorded.order.pop_front();
            // Recorded again since (a later copy acked): that record stays.
            if recorded.delivered.get(&sequence) == Some(&delivered) {
                recorded.delivered.remove(&sequence);
            }
        }
        self.any
            .store(!recorded.order.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }

    /// Forgets everything: the consumer was bound again, and may be a new one.
    pub(crate) fn clear(&self) {
        if self.any.swap(false, std::sync::atomic::Ordering::Relaxed) {
            *self.lock() = Recorded::default();
        }
    }
}

/// How one attempt of `confirm` went.
enum Attempt {
    Confirmed,
    /// The consumer no longer exists.
    Gone,
    Failed(String),
}

/// After this many "no responders", `confirm` asks whether the consumer still exists (two API
/// requests): once or twice is an election, not worth a burst of requests at that moment.
const NO_RESPONDERS_BEFORE_LOOKUP: u32 = 3;

/// Sends `body` (`+ACK`) to the message's `reply` subject until the server confirms it, for at
/// most the consumer's `ack_wait` (see [`Ack::Confirmed`]), every attempt bounded by that
/// deadline. At the runtime's hard stop it sends the ack once more without waiting and gives up.
pub(crate) async fn confirm(shared: &ConsumerShared, reply: &Subject, body: &'static [u8]) -> Result<(), AckError> {
    let (sequence, delivered) = crate::puller::delivery_info(reply).unwrap_or((0, 0));
    let started = Instant::now();
    let deadline = started + shared.ack_wait();
    let nats = shared.client.nats();
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    let mut no_responders = 0u32;
    let unconfirmed = |attempts, last: String| AckError::Unconfirmed {
        stream: shared.stream.to_string(),
        consumer: shared.name.to_string(),
        sequence,
        attempts,
        waited: started.elapsed(),
        last,
    };
    let hard_stop = shared.hard_stop.get().cloned().unwrap_or_default();
    loop {
        attempts += 1;
        let attempt_started = Instant::now();
        let until = deadline.min(attempt_started + ATTEMPT);
        let attempt = async {
            let request = async_nats::Request::new()
                .payload(Bytes::from_static(body))
                // The attempt's own bound is `until`, which also covers sending while the
                // connection's queue is full (async-nats' timeout starts after that).
                .timeout(None);
            let answer = nats.send_request(reply.clone(), request).await;
            match answer {
                // The answer to an applied ack is an empty message without a status.
                Ok(answer) if answer.status.is_none_or(|status| status.is_success()) => Attempt::Confirmed,
                Ok(answer) => Attempt::Failed(format!(
                    "the server answered {}{}",
                    answer.status.map(|status| status.to_string()).unwrap_or_default(),
                    answer.description.map(|text| format!(" ({text})")).unwrap_or_default()
                )),
                Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                    no_responders += 1;
                    // Nothing takes this consumer's acks: an election in progress (brief), or
                    // the consumer is gone, which no retry mends.
                    if no_responders >= NO_RESPONDERS_BEFORE_LOOKUP && consumer_gone(shared).await {
                        return Attempt::Gone;
                    }
                    Attempt::Failed("no responders (no consumer leader)".into())
                }
                Err(error) => Attempt::Failed(crate::error::chain(&error).to_string()),
            }
        };
        let last = tokio::select! {
            biased;
            _ = hard_stop.cancelled() => {
                // Shutting down: one last ack, not waited for (the message comes again if it
                // is lost, as with a fire-and-forget ack).
                let _ = tokio::time::timeout(Duration::from_millis(100), nats.publish(reply.clone(), Bytes::from_static(body))).await;
                return Err(unconfirmed(attempts, "the service is shutting down".into()));
            }
            attempted = tokio::time::timeout_at(until, attempt) => match attempted {
                Ok(Attempt::Confirmed) => {
                    shared.confirmed.record(sequence, delivered);
                    return Ok(());
                }
                Ok(Attempt::Gone) => {
                    return Err(AckError::Refused {
                        stream: shared.stream.to_string(),
                        consumer: shared.name.to_string(),
                        sequence,
                        reason: "the consumer no longer exists on the server".into(),
                    });
                }
                Ok(Attempt::Failed(last)) => last,
                Err(_) => format!("no answer within {:?}", until.saturating_duration_since(attempt_started)),
            },
        };
        if Instant::now() + pause >= deadline {
            return Err(unconfirmed(attempts, last));
        }
        tracing::debug!(stream = shared.stream, consumer = &*shared.name, sequence, attempts, reason = %last,
            "ack not confirmed yet; sending it again");
        tokio::select! {
            _ = hard_stop.cancelled() => {}
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(ATTEMPT);
    }
}

/// What [`Context::ack`](crate::Context::ack) did, for the messages whose handler acked them
/// itself: kept by sequence (not in the delivery's task-local, since a handler may ack from a
/// task it spawned) until the runtime settles the message, which it then leaves alone.
#[derive(Default)]
pub(crate) struct HandlerAcks {
    /// Whether anything is kept: settling reads no lock unless a handler acked lately.
    any: std::sync::atomic::AtomicBool,
    by_sequence: std::sync::Mutex<std::collections::HashMap<u64, Result<(), AckError>>>,
}

impl HandlerAcks {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Result<(), AckError>>> {
        self.by_sequence
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What an earlier `ctx.ack()` of `sequence` returned, if there was one.
    pub(crate) fn get(&self, sequence: u64) -> Option<Result<(), AckError>> {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.lock().get(&sequence).cloned()
    }

    /// Keeps what `ctx.ack()` of `sequence` returned.
    pub(crate) fn set(&self, sequence: u64, acked: Result<(), AckError>) {
        self.lock().insert(sequence, acked);
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the handler acked `sequence` itself; forgets it (the message is being settled).
    pub(crate) fn take(&self, sequence: u64) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return false;
        }
        let mut by_sequence = self.lock();
        let taken = by_sequence.remove(&sequence).is_some();
        self.any
            .store(!by_sequence.is_empty(), std::sync::atomic::Ordering::Relaxed);
        taken
    }

    /// Whether the handler acked `sequence` itself.
    pub(crate) fn contains(&self, sequence: u64) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed) && self.lock().contains_key(&sequence)
    }

    /// Forgets what is no longer `held` (acked by a task that outlived its message's settling).
    pub(crate) fn retain(&self, held: impl Fn(u64) -> bool) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut by_sequence = self.lock();
        by_sequence.retain(|sequence, _| held(*sequence));
        self.any
            .store(!by_sequence.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Whether the server says the consumer does not exist (not merely unreachable).
async fn consumer_gone(shared: &ConsumerShared) -> bool {
    use async_nats::jetstream::context::ConsumerInfoErrorKind as Kind;
    let stream = match shared.client.jetstream().get_stream(shared.stream).await {
        Ok(stream) => stream,
        Err(error) => return crate::stream::is_stream_not_found(&error),
    };
    matches!(
        stream.consumer_info(&*shared.name).await,
        Err(error) if matches!(error.kind(), Kind::NotFound)
    )
}
