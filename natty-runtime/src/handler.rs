//! What a handler may take and return: the payload (decoded with serde), the [`Context`]
//! extractor, and the return types that turn into an ack or a nak.

use std::sync::Arc;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;

use crate::error::BoxError;
use crate::format::Format;
use crate::payload::{DecodeError, EncodePayload, Payload};
use crate::publish::{Client, PublishAck, PublishError};

/// What a consumer shares with every delivery it hands out.
pub(crate) struct ConsumerShared {
    pub(crate) stream: &'static str,
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) client: Client,
    /// The consumer's `ack_wait` as the server has it (read at each bind; the declared one, or
    /// the server's default, until then): for in-progress pings, and how long a confirmed ack
    /// is retried.
    pub(crate) ack_wait_nanos: std::sync::atomic::AtomicU64,
    /// The sequences whose ack was confirmed lately (see [`crate::consumer::Confirmed`]).
    pub(crate) confirmed: crate::consumer::Confirmed,
    /// The messages whose handler acked them itself (see [`crate::consumer::HandlerAcks`]).
    pub(crate) handler_acks: crate::consumer::HandlerAcks,
    /// The runtime's hard stop, once the consumer runs: a confirmed ack stops retrying then.
    pub(crate) hard_stop: std::sync::OnceLock<tokio_util::sync::CancellationToken>,
}

impl ConsumerShared {
    /// The consumer's `ack_wait`.
    pub(crate) fn ack_wait(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.ack_wait_nanos.load(std::sync::atomic::Ordering::Relaxed))
    }
}

/// One message as handed to a handler's generated adapter. Not constructed by users.
#[doc(hidden)]
pub struct Delivery {
    pub(crate) subject: Subject,
    pub(crate) reply: Subject,
    pub(crate) payload: bytes::Bytes,
    /// Shared with the runtime's copy of the message (kept for a dead letter or a retry in
    /// place) and with each `Context`: a header map is a hash map of strings, not cheap to clone.
    pub(crate) headers: Option<Arc<HeaderMap>>,
    pub(crate) stream_sequence: u64,
    pub(crate) delivery_count: u64,
    pub(crate) shared: Arc<ConsumerShared>,
}

/// Message metadata and a publish handle, available to any handler that takes it.
///
/// # Examples
///
/// ```ignore
/// #[consumer(stream = "orders", durable = "audit")]
/// async fn audit(order: Order, ctx: Context) -> anyhow::Result<()> {
///     tracing::info!(seq = ctx.stream_sequence(), attempt = ctx.delivery_count(), "auditing");
///     ctx.publish("audit.done", &order.id).await?;
///     Ok(())
/// }
/// ```
#[derive(Clone)]
pub struct Context {
    subject: Subject,
    reply: Subject,
    headers: Option<Arc<HeaderMap>>,
    stream_sequence: u64,
    delivery_count: u64,
    shared: Arc<ConsumerShared>,
}

impl Context {
    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The message's headers, if it has any.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.headers.as_deref()
    }

    /// The message's sequence number in its stream: unique and stable across redeliveries.
    pub fn stream_sequence(&self) -> u64 {
        self.stream_sequence
    }

    /// 1 on the first delivery, 2 on the first redelivery, and so on.
    pub fn delivery_count(&self) -> u64 {
        self.delivery_count
    }

    /// The stream the message came from.
    pub fn stream(&self) -> &str {
        self.shared.stream
    }

    /// The consumer that delivered it: the durable name, or an ephemeral consumer's own name.
    pub fn consumer(&self) -> &str {
        &self.shared.name
    }

    /// The connected client, for publishing or anything else.
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Seed 001's guard against reordering, in one line: an event carrying `incoming` version
    /// of an entity whose stored version is `current` is applied only if it is the next one.
    ///
    /// Returns `Ok(true)` to apply it; `Ok(false)` for a version already applied (a
    /// duplicate or redelivery: return `Ok(())` so it is acked and skipped); and
    /// `Err(Reject)` for a version that came too early, so that it is redelivered after its
    /// predecessor had a chance to arrive (with a short delay growing per attempt).
    ///
    /// # Examples
    ///
    /// ```ignore
    /// #[consumer(stream = "tickets", durable = "orders")]
    /// async fn on_ticket_updated(ticket: TicketUpdated, ctx: Context) -> Result<(), Reject> {
    ///     if !ctx.in_version_order(db.version_of(&ticket.id), ticket.version)? {
    ///         return Ok(());
    ///     }
    ///     db.apply(&ticket); // stores ticket.version
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Reject::retry_after`] when `incoming > current + 1`.
    pub fn in_version_order(&self, current: u64, incoming: u64) -> Result<bool, Reject> {
        match incoming.cmp(&(current + 1)) {
            std::cmp::Ordering::Equal => Ok(true),
            std::cmp::Ordering::Less => Ok(false),
            std::cmp::Ordering::Greater => {
                // 50 ms, doubling per attempt, at most 1 s: the predecessor is usually close.
                let exponent = self.delivery_count.saturating_sub(1).min(7) as u32;
                let delay =
                    std::time::Duration::from_millis(50 * 2u64.pow(exponent)).min(std::time::Duration::from_secs(1));
                Err(Reject::retry_after(delay))
            }
        }
    }

    /// Acks the message now and waits until the server confirms it, sending it again with
    /// backoff for up to the consumer's `ack_wait` (as [`Ack::Confirmed`](crate::Ack::Confirmed)
    /// does after a handler returns, whatever the consumer's own `ack` setting).
    ///
    /// Call it before a step that must not be repeated, when the message must not come again
    /// once that step has begun. The message is then settled: what the handler returns
    /// afterwards is logged, not acted on. For a side effect that must happen exactly once,
    /// see [`idempotency_key`](Context::idempotency_key).
    ///
    /// # Examples
    ///
    /// ```ignore
    /// #[consumer(stream = "orders", durable = "shipping")]
    /// async fn ship(order: Order, ctx: Context) -> anyhow::Result<()> {
    ///     ctx.ack().await?; // from here on, the order is not handled again
    ///     courier.dispatch(&order).await?;
    ///     Ok(())
    /// }
    /// ```
    ///
    /// # Errors
    ///
    /// [`AckError::Refused`](crate::AckError::Refused) when the consumer is gone from the
    /// server; [`AckError::Unconfirmed`](crate::AckError::Unconfirmed) when no answer came
    /// within `ack_wait` (the ack may or may not have been applied).
    pub async fn ack(&self) -> Result<(), crate::AckError> {
        // Acked already: the same answer, without acking again.
        if let Some(acked) = self.shared.handler_acks.get(self.stream_sequence) {
            return acked;
        }
        let acked = crate::consumer::confirm(&self.shared, &self.reply, b"+ACK").await;
        // The runtime must not settle the message again (a nak or a dead letter after the
        // handler fails), even if the ack was not confirmed: the handler was told so.
        self.shared.handler_acks.set(self.stream_sequence, acked.clone());
        acked
    }

    /// A key that names this message across redeliveries and republishing: the publisher's
    /// idempotency key (its `Nats-Msg-Id`, which every natty publish carries) when it has one
    /// that is also a valid KV key, else `<stream>.<stream sequence>`. Either way it is a valid
    /// KV key, so it can be the key of the guard below.
    ///
    /// Exactly once, as NATS offers it, is an idempotent side effect keyed by this plus a
    /// confirmed ack: write the effect where a second write with the same key is refused or
    /// deduplicated — a [`Kv::create`](crate::Kv::create) of the key, a publish with
    /// [`Publish::id`](crate::Publish::id) set to it, a database row with it as a unique key —
    /// then [`ack`](Context::ack). A crash between the two redelivers the message; the second
    /// write finds the first and the handler only acks. The guide's "Exactly once" section has
    /// the whole recipe.
    pub fn idempotency_key(&self) -> String {
        match self
            .headers
            .as_deref()
            .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID))
            .map(|id| id.as_str())
            .filter(|id| crate::kv::valid_key(id))
        {
            Some(id) => id.to_string(),
            None => format!("{}.{}", self.shared.stream, self.stream_sequence),
        }
    }

    /// Tells the server the message is still being worked on, resetting its `ack_wait` timer.
    /// natty already does this on its own every half `ack_wait` while the handler runs; call it
    /// to be explicit, e.g. before a step known to be long.
    ///
    /// # Errors
    ///
    /// When the connection is gone.
    pub async fn in_progress(&self) -> Result<(), async_nats::PublishError> {
        self.shared
            .client
            .nats()
            .publish(self.reply.clone(), bytes::Bytes::from_static(b"+WPI"))
            .await
    }

    /// Publishes `value` to `subject` and waits for the stream's ack.
    ///
    /// # Errors
    ///
    /// As [`Client::publish`].
    pub async fn publish<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> Result<PublishAck, PublishError> {
        self.shared.client.publish(subject, value).await
    }

    /// Publishes a [`Payload`] to its own subject and waits for the stream's ack.
    ///
    /// # Errors
    ///
    /// As [`Client::emit`].
    pub async fn emit<T: Payload + ?Sized>(&self, value: &T) -> Result<PublishAck, PublishError> {
        self.shared.client.emit(value).await
    }
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("stream", &self.shared.stream)
            .field("consumer", &self.shared.name)
            .field("subject", &self.subject)
            .field("stream_sequence", &self.stream_sequence)
            .field("delivery_count", &self.delivery_count)
            .finish()
    }
}

/// A handler's decision not to process a message now, returned as its error: `Err(Reject::...)`.
///
/// Any other error retries with the consumer's backoff; a `Reject` says exactly what to do.
/// Return it from a handler whose error type is `Reject`, a boxed error or `anyhow::Error`
/// (`Err(Reject::terminate(..))?` in an `anyhow::Result` handler works).
///
/// # Examples
///
/// ```ignore
/// #[consumer(stream = "orders", durable = "billing")]
/// async fn bill(order: Order, ctx: Context) -> Result<(), Reject> {
///     if order.amount == 0 {
///         return Err(Reject::terminate("an order of nothing cannot be billed"));
///     }
///     if !payments_up().await {
///         return Err(Reject::retry_after(Duration::from_secs(30)));
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject(pub(crate) RejectKind);

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RejectKind {
    Retry,
    RetryAfter(std::time::Duration),
    Terminate(String),
}

impl Reject {
    /// Redeliver now (a nak without delay).
    pub fn retry() -> Reject {
        Reject(RejectKind::Retry)
    }

    /// Redeliver after `delay` (a nak with delay), not sooner.
    pub fn retry_after(delay: std::time::Duration) -> Reject {
        Reject(RejectKind::RetryAfter(delay))
    }

    /// Redeliver after the delay `decide` picks from the attempt number (1 for the first
    /// delivery) and the message's headers.
    pub fn retry_with(ctx: &Context, decide: impl FnOnce(u64, Option<&HeaderMap>) -> std::time::Duration) -> Reject {
        Reject::retry_after(decide(ctx.delivery_count(), ctx.headers()))
    }

    /// Never redeliver: the message is terminated (`+TERM` with `reason`) and sent to the
    /// consumer's dead-letter subject.
    pub fn terminate(reason: impl Into<String>) -> Reject {
        Reject(RejectKind::Terminate(reason.into()))
    }
}

impl std::fmt::Display for Reject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            RejectKind::Retry => write!(f, "rejected: retry now"),
            RejectKind::RetryAfter(delay) => write!(f, "rejected: retry after {delay:?}"),
            RejectKind::Terminate(reason) => write!(f, "rejected for good: {reason}"),
        }
    }
}

impl std::error::Error for Reject {}

/// A handler argument built from the delivery rather than decoded from the payload.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "the runtime cannot provide this",
    note = "a handler takes one payload (a serde::Deserialize type, or a Protobuf `Payload`) and optionally `natty_runtime::Context`"
)]
pub trait FromDelivery: Sized {
    /// Builds the argument.
    fn from_delivery(delivery: &Delivery) -> Self;
}

impl<T: Clone + Send + Sync + 'static> FromDelivery for crate::State<T> {
    fn from_delivery(delivery: &Delivery) -> Self {
        delivery.shared.client.states.argument()
    }
}

impl FromDelivery for Context {
    fn from_delivery(delivery: &Delivery) -> Self {
        Context {
            subject: delivery.subject.clone(),
            reply: delivery.reply.clone(),
            headers: delivery.headers.clone(),
            stream_sequence: delivery.stream_sequence,
            delivery_count: delivery.delivery_count,
            shared: delivery.shared.clone(),
        }
    }
}

/// How a delivery ended, as the runtime settles it with the server.
#[doc(hidden)]
#[derive(Debug)]
pub enum Outcome {
    /// Handled: ack.
    Ack,
    /// The handler failed: nak, so the message is redelivered.
    Failed(BoxError),
    /// The payload cannot be decoded: terminate, it would fail forever.
    Undecodable(DecodeError),
}

/// A handler's return type: `()` or `Ok` acks, `Err` naks for redelivery.
#[diagnostic::on_unimplemented(
    message = "a consumer handler cannot return `{Self}`",
    label = "return `()` or `Result<(), E>`",
    note = "`Ok(())` acks the message; an `Err` (any std error or anyhow::Error) naks it for redelivery"
)]
pub trait IntoOutcome {
    /// Converts the return value.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Ack
    }
}

impl<E: Into<BoxError> + 'static> IntoOutcome for Result<(), E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(()) => Outcome::Ack,
            Err(error) => Outcome::Failed(boxed(error)),
        }
    }
}

/// `error` boxed, with a [`Reject`] inside an `anyhow::Error` taken out: anyhow's conversion
/// into a boxed error wraps it, and the wrapper no longer downcasts to the `Reject` that `?`
/// put in (it would be retried with backoff instead of doing what it says).
fn boxed<E: Into<BoxError> + 'static>(error: E) -> BoxError {
    let mut slot = Some(error);
    if let Some(anyhow) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<anyhow::Error>>() {
        let error = anyhow.take().expect("the slot is full");
        return match error.downcast::<Reject>() {
            Ok(reject) => Box::new(reject),
            Err(error) => error.into(),
        };
    }
    slot.take().expect("the slot is full").into()
}

/// How a core handler ended.
#[doc(hidden)]
#[derive(Debug)]
pub enum CoreOutcome {
    /// Done; nothing to send.
    Done,
    /// The reply to send, and its format.
    Reply(Bytes, Format),
    /// The handler failed.
    Failed(BoxError),
    /// The payload cannot be decoded.
    Undecodable(DecodeError),
}

impl CoreOutcome {
    /// A `#[subscribe]` handler's result.
    pub fn from_outcome(outcome: Outcome) -> CoreOutcome {
        match outcome {
            Outcome::Ack => CoreOutcome::Done,
            Outcome::Failed(error) => CoreOutcome::Failed(error),
            Outcome::Undecodable(error) => CoreOutcome::Undecodable(error),
        }
    }

    /// For the `#[subscribe]` adapter: any handler return type a consumer may have.
    pub fn subscribed(result: impl IntoOutcome) -> CoreOutcome {
        CoreOutcome::from_outcome(result.into_outcome())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Err(Reject::terminate(..))?` in a handler returning `anyhow::Result` terminates, as in
    /// one returning `Result<(), Reject>` or a boxed error; other errors stay plain failures.
    #[test]
    fn a_reject_is_recognised_through_anyhow() {
        let through_anyhow = || -> anyhow::Result<()> {
            Err(Reject::terminate("bad"))?;
            Ok(())
        };
        let boxed = || -> Result<(), BoxError> { Err(Reject::terminate("bad").into()) };
        for outcome in [through_anyhow().into_outcome(), boxed().into_outcome()] {
            let Outcome::Failed(error) = outcome else {
                panic!("a failure")
            };
            assert!(error.downcast::<Reject>().is_ok(), "still a Reject");
        }
        let other = || -> anyhow::Result<()> { Err(anyhow::anyhow!("database down")) };
        let Outcome::Failed(error) = other().into_outcome() else {
            panic!("a failure")
        };
        assert_eq!(error.to_string(), "database down");
        assert!(error.downcast::<Reject>().is_err());
    }
}
