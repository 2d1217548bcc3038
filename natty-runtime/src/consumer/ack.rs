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

/// The sequences whose ack the server confirmed lately, in one consumer of this instance.
///
/// A delivery of one of them that arrives after the confirmation was sent before the ack was
/// applied: a redelivery after `ack_wait` (a consumer leader election can swallow the
/// keep-alive pings) that the retried ack raced. The server no longer holds it; handling it
/// would run the handler twice for a message whose ack was confirmed, so it is dropped. Kept
/// two `ack_wait`s, past which no such redelivery can still be on its way.
#[derive(Default)]
pub(crate) struct Confirmed {
    /// Whether `at` holds anything: the common case (no confirmed acks) reads no lock.
    any: std::sync::atomic::AtomicBool,
    at: std::sync::Mutex<std::collections::HashMap<u64, Instant>>,
}

impl Confirmed {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Instant>> {
        self.at.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that the ack of `sequence` was confirmed.
    pub(crate) fn record(&self, sequence: u64) {
        self.lock().insert(sequence, Instant::now());
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the ack of `sequence` was confirmed lately.
    pub(crate) fn contains(&self, sequence: u64) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed) && self.lock().contains_key(&sequence)
    }

    /// Forgets confirmations older than `age`.
    pub(crate) fn forget_older_than(&self, age: Duration) {
        if !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut at = self.lock();
        at.retain(|_, confirmed| confirmed.elapsed() < age);
        self.any.store(!at.is_empty(), std::sync::atomic::Ordering::Relaxed);
    }
}

/// Sends `body` (`+ACK`) to the message's `reply` subject until the server confirms it, for at
/// most the consumer's `ack_wait` (see [`Ack::Confirmed`]).
pub(crate) async fn confirm(
    shared: &ConsumerShared,
    reply: &Subject,
    sequence: u64,
    body: &'static [u8],
) -> Result<(), AckError> {
    let started = Instant::now();
    let within = shared.ack_wait();
    let deadline = started + within;
    let nats = shared.client.nats();
    let mut pause = FIRST_PAUSE;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(10), ATTEMPT);
        let request = async_nats::Request::new()
            .payload(Bytes::from_static(body))
            .timeout(Some(wait));
        let last = match nats.send_request(reply.clone(), request).await {
            // The answer to an applied ack is an empty message without a status.
            Ok(answer) if answer.status.is_none_or(|status| status.is_success()) => {
                shared.confirmed.record(sequence);
                return Ok(());
            }
            Ok(answer) => format!(
                "the server answered {}{}",
                answer.status.map(|status| status.to_string()).unwrap_or_default(),
                answer.description.map(|text| format!(" ({text})")).unwrap_or_default()
            ),
            Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {
                // Nothing takes this consumer's acks: an election in progress (brief), or the
                // consumer is gone, which no retry mends.
                if consumer_gone(shared).await {
                    return Err(AckError::Refused {
                        stream: shared.stream.to_string(),
                        consumer: shared.name.to_string(),
                        sequence,
                        reason: "the consumer no longer exists on the server".into(),
                    });
                }
                "no responders (no consumer leader)".into()
            }
            Err(error) if error.kind() == async_nats::RequestErrorKind::TimedOut => {
                format!("no answer within {wait:?}")
            }
            Err(error) => crate::error::chain(&error).to_string(),
        };
        if Instant::now() + pause >= deadline {
            return Err(AckError::Unconfirmed {
                stream: shared.stream.to_string(),
                consumer: shared.name.to_string(),
                sequence,
                attempts,
                waited: started.elapsed(),
                last,
            });
        }
        tracing::debug!(stream = shared.stream, consumer = &*shared.name, sequence, attempts, reason = %last,
            "ack not confirmed yet; sending it again");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(ATTEMPT);
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
