//! Batch handlers: `#[consumer(..., batch = 500, batch_wait = "100ms")]` on a handler taking
//! `Vec<T>` (or [`Batch<T>`]) gets up to `batch` messages at once, fewer when `batch_wait`
//! passed since the first of them arrived. `Ok` acks them all; an error retries them all (or
//! dead-letters those on their last delivery); a [`Batch<T>`] settles messages one by one
//! with [`Batch::reject`]. A message whose payload cannot be decoded is dead-lettered on its
//! own and left out of the batch. Every message is kept alive while its batch waits and runs.

use std::sync::Mutex;

use super::*;
use crate::payload::{DecodeError, DecodePayload};
use crate::state::State;

use super::settle::Settled;

/// The adapter a batch `#[consumer]` generates.
pub type BatchHandlerFn = fn(BatchDelivery) -> BoxFuture<'static, Outcome>;

/// How a consumer gathers its batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchDef {
    /// Most messages per batch.
    pub(crate) size: usize,
    /// Longest a batch waits to fill, from its first message.
    pub(crate) wait: Duration,
    pub(crate) handler: BatchHandlerFn,
}

/// What became of one message of a batch, besides the handler's result.
#[derive(Debug)]
pub(crate) enum Verdict {
    /// Its payload could not be decoded: left out of the batch.
    Undecodable(DecodeError),
    /// The handler settled it on its own.
    Rejected(Reject),
}

/// The messages handed to a batch adapter. Not constructed by users.
#[doc(hidden)]
pub struct BatchDelivery {
    pub(crate) messages: Vec<(bytes::Bytes, Option<Arc<async_nats::HeaderMap>>)>,
    pub(crate) shared: Arc<ConsumerShared>,
    pub(crate) verdicts: Arc<Mutex<Vec<Option<Verdict>>>>,
}

impl BatchDelivery {
    /// Decodes every message as `T`: the decoded ones with their index in the batch; the
    /// others are marked undecodable.
    fn decode<T: DecodePayload>(&self) -> (Vec<T>, Vec<usize>) {
        let mut items = Vec::with_capacity(self.messages.len());
        let mut indices = Vec::with_capacity(self.messages.len());
        for (index, (payload, headers)) in self.messages.iter().enumerate() {
            match crate::payload::decode::<T>(headers.as_deref(), payload) {
                Ok(item) => {
                    items.push(item);
                    indices.push(index);
                }
                Err(error) => {
                    if let Ok(mut verdicts) = self.verdicts.lock() {
                        verdicts[index] = Some(Verdict::Undecodable(error));
                    }
                }
            }
        }
        (items, indices)
    }
}

/// A batch of decoded messages whose handler settles some of them on its own: any message it
/// does not [`reject`](Batch::reject) follows the handler's result.
///
/// # Examples
///
/// ```no_run
/// use natty_runtime::prelude::*;
/// use natty_runtime::Batch;
///
/// #[derive(serde::Deserialize)]
/// struct Row { id: u64, valid: bool }
///
/// #[consumer(stream = "rows", durable = "loader", batch = 500, batch_wait = "100ms")]
/// async fn load(rows: Batch<Row>) -> anyhow::Result<()> {
///     for (i, row) in rows.iter().enumerate() {
///         if !row.valid {
///             rows.reject(i, Reject::terminate(format!("row {} is invalid", row.id)));
///         }
///     }
///     // ... insert the valid rows in one statement ...
///     Ok(())
/// }
/// ```
pub struct Batch<T> {
    items: Vec<T>,
    /// Each item's index among the messages of the batch.
    indices: Vec<usize>,
    verdicts: Arc<Mutex<Vec<Option<Verdict>>>>,
}

impl<T> Batch<T> {
    /// Settles item `index` (of this batch's items) on its own: terminated to the dead letters,
    /// or retried, whatever the handler returns. An index past the end is ignored.
    pub fn reject(&self, index: usize, reject: Reject) {
        let Some(&message) = self.indices.get(index) else {
            return;
        };
        if let Ok(mut verdicts) = self.verdicts.lock() {
            verdicts[message] = Some(Verdict::Rejected(reject));
        }
    }

    /// The decoded items, in stream order.
    pub fn items(&self) -> &[T] {
        &self.items
    }
}

impl<T> std::ops::Deref for Batch<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.items
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(&self.items).finish()
    }
}

/// A batch handler's messages, decoded: `Vec<T>` or [`Batch<T>`].
pub trait FromBatch: Sized {
    /// Decodes the batch's messages.
    fn from_batch(delivery: &BatchDelivery) -> Self;
}

impl<T: DecodePayload> FromBatch for Vec<T> {
    fn from_batch(delivery: &BatchDelivery) -> Self {
        delivery.decode().0
    }
}

impl<T: DecodePayload> FromBatch for Batch<T> {
    fn from_batch(delivery: &BatchDelivery) -> Self {
        let (items, indices) = delivery.decode();
        Batch {
            items,
            indices,
            verdicts: delivery.verdicts.clone(),
        }
    }
}

/// What a batch handler takes besides its messages: a [`State<T>`].
pub trait FromBatchParts: Sized {
    /// Builds the argument.
    fn from_parts(delivery: &BatchDelivery) -> Self;
}

impl<T: Clone + Send + Sync + 'static> FromBatchParts for State<T> {
    fn from_parts(delivery: &BatchDelivery) -> Self {
        delivery.shared.client.states.argument()
    }
}

/// The per-message handler of a batch consumer's definition: never called, the batch handler
/// runs instead.
#[doc(hidden)]
pub fn batch_only(_: Delivery) -> BoxFuture<'static, Outcome> {
    Box::pin(async { Outcome::Failed("natty bug: a batch consumer's per-message handler was called".into()) })
}

impl Consumer {
    /// Runs the batch handler for `readies` and settles each message, in a span for the batch.
    /// Holds `permit` until all are settled.
    pub(super) async fn deliver_batch(
        self: Arc<Self>,
        batch: BatchDef,
        readies: Vec<Ready>,
        permit: OwnedSemaphorePermit,
    ) {
        let def = &self.def;
        let count = readies.len();
        let span = tracing::info_span!(
            "natty.deliver_batch",
            otel.kind = "consumer",
            handler = def.name,
            stream = def.stream,
            consumer = &*self.name,
            messages = count,
            outcome = tracing::field::Empty,
        );
        let mut originals = Vec::with_capacity(count);
        let mut messages = Vec::with_capacity(count);
        for ready in readies {
            self.metrics.delivered.inc();
            let headers = ready.message.headers.map(Arc::new);
            messages.push((ready.message.payload.clone(), headers.clone()));
            originals.push((
                ready.reply,
                Original {
                    subject: ready.message.subject,
                    payload: ready.message.payload,
                    headers,
                    stream_sequence: ready.sequence,
                    delivery_count: ready.delivered,
                },
            ));
        }
        let verdicts = Arc::new(Mutex::new((0..count).map(|_| None).collect::<Vec<_>>()));
        let delivery = BatchDelivery {
            messages,
            shared: self.shared.clone(),
            verdicts: verdicts.clone(),
        };
        let in_flight = self.metrics.enter();
        let started = std::time::Instant::now();
        let handled = AssertUnwindSafe((batch.handler)(delivery)).catch_unwind();
        let outcome = tokio::select! {
            biased;
            outcome = handled.instrument(span.clone()) => Some(outcome),
            _ = self.hard_stop.cancelled() => None,
        };
        let took = started.elapsed();
        self.metrics.handled_in(took);
        drop(in_flight);
        let verdicts: Vec<Option<Verdict>> = match verdicts.lock() {
            Ok(mut verdicts) => std::mem::take(&mut *verdicts),
            Err(_) => Vec::new(),
        };
        let mut verdicts = verdicts.into_iter();
        // What the handler's result means for the messages it did not settle on its own.
        let failure: Option<(Option<RejectKind>, String)> = match &outcome {
            Some(Ok(Outcome::Ack)) | None => None,
            Some(Ok(Outcome::Failed(error))) => match error.downcast_ref::<Reject>() {
                Some(reject) => Some((Some(reject.0.clone()), "the handler rejected the batch".into())),
                None => Some((None, crate::error::chain(&**error).to_string())),
            },
            Some(Ok(Outcome::Undecodable(error))) => Some((None, crate::error::chain(error).to_string())),
            Some(Err(panic)) => Some((None, format!("the handler panicked: {}", panic_message(&**panic)))),
        };
        if let Some((_, failure)) = &failure {
            tracing::warn!(handler = def.name, stream = def.stream, consumer = &*self.name, messages = count,
                error = %failure, "batch handler failed; its messages will be redelivered");
        }
        let mut outcomes = [0usize; 4];
        // With confirmed acks, the batch's acks go out together and are waited for together:
        // one round trip for the batch, not one per message.
        let mut to_confirm = Vec::new();
        for (reply, original) in originals {
            let sequence = original.stream_sequence;
            let verdict = verdicts.next().flatten();
            if def.ack == Ack::Confirmed && outcome.is_some() && verdict.is_none() && failure.is_none() {
                to_confirm.push((sequence, reply));
                continue;
            }
            let settle = self.settle(reply);
            let settled = match (outcome.is_some(), verdict, &failure) {
                (false, _, _) => {
                    settle.send(Bytes::from_static(b"-NAK")).await;
                    Settled::CutOff
                }
                (true, Some(Verdict::Undecodable(error)), _) => {
                    let reason = crate::error::chain(&error).to_string();
                    self.dead_letter_and_terminate(&settle, original, &reason).await
                }
                (true, Some(Verdict::Rejected(reject)), _) => {
                    self.settle_rejected(&settle, original, reject.0, "the handler rejected it".into())
                        .await
                }
                (true, None, None) => {
                    settle.send(Bytes::from_static(b"+ACK")).await;
                    Settled::Acked
                }
                (true, None, Some((Some(kind), why))) => {
                    self.settle_rejected(&settle, original, kind.clone(), why.clone()).await
                }
                (true, None, Some((None, why))) => {
                    let delay = def.retry_delay(original.delivery_count);
                    self.retry_or_give_up(&settle, original, delay, why).await
                }
            };
            self.held.release(sequence);
            settled.count(&self.metrics);
            outcomes[settled as usize] += 1;
        }
        let confirmed = futures_util::future::join_all(
            to_confirm
                .iter()
                .map(|(_, reply)| confirm(&self.shared, reply, b"+ACK")),
        )
        .await;
        for ((sequence, _), acked) in to_confirm.iter().zip(confirmed) {
            if let Err(error) = acked {
                self.unconfirmed(&error);
            }
            self.held.release(*sequence);
            Settled::Acked.count(&self.metrics);
            outcomes[Settled::Acked as usize] += 1;
        }
        span.record(
            "outcome",
            format!(
                "{} acked, {} naked, {} terminated, {} cut off",
                outcomes[Settled::Acked as usize],
                outcomes[Settled::Naked as usize],
                outcomes[Settled::Terminated as usize],
                outcomes[Settled::CutOff as usize]
            ),
        );
        drop(permit);
        self.room.notify_one();
    }

    /// Settles one message of a batch as `kind` says.
    async fn settle_rejected(&self, settle: &Settle<'_>, original: Original, kind: RejectKind, why: String) -> Settled {
        match kind {
            RejectKind::Terminate(reason) => self.dead_letter_and_terminate(settle, original, &reason).await,
            RejectKind::Retry => self.retry_or_give_up(settle, original, Duration::ZERO, &why).await,
            RejectKind::RetryAfter(delay) => self.retry_or_give_up(settle, original, delay, &why).await,
        }
    }

    /// Naks one message of a batch for redelivery after `delay`, or dead-letters it when this
    /// was its last delivery.
    async fn retry_or_give_up(&self, settle: &Settle<'_>, original: Original, delay: Duration, why: &str) -> Settled {
        let def = &self.def;
        let attempt = original.delivery_count;
        if def.max_deliver.is_some_and(|max| attempt >= max as u64) {
            let reason = format!("failed on the last of {attempt} deliveries: {why}");
            return self.dead_letter_and_terminate(settle, original, &reason).await;
        }
        settle.nak(delay).await;
        Settled::Naked
    }
}
