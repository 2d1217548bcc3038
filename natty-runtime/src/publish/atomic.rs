//! Atomic batches (nats-server 2.12, ADR-50): several messages, to subjects of one stream,
//! stored all together or not at all — the transactional outbox without a database: a state
//! change and the events it causes, committed as one.

use async_nats::HeaderMap;
use bytes::Bytes;

use super::{encode, Publish};
use crate::client::Client;
use crate::error::BoxError;
use crate::payload::{EncodePayload, Payload};

/// The most messages the server takes in one batch.
pub const MAX_BATCH: usize = 1000;

/// An atomic batch being put together: [`Client::atomic_batch`], then `add`s, then
/// [`commit`](AtomicBatch::commit). Nothing is sent before the commit.
///
/// # Examples
///
/// An outbox: the order's new state and the event announcing it, stored together or not at all,
/// and only if the order was not changed meanwhile.
///
/// ```no_run
/// # async fn demo(client: natty_runtime::Client, seen: u64) -> Result<(), natty_runtime::AtomicBatchError> {
/// use natty_runtime::Publish;
/// let ack = client
///     .atomic_batch()
///     .add_with(
///         "orders.state.42",
///         &serde_json::json!({"status": "paid"}),
///         Publish::new().expected_last_subject_sequence(seen),
///     )
///     .add("orders.events.paid", &serde_json::json!({"order": 42}))
///     .commit()
///     .await?;
/// println!("stored {} messages, the last at {}", ack.count, ack.sequence);
/// # Ok(()) }
/// ```
#[must_use = "nothing is sent until the batch is committed"]
pub struct AtomicBatch {
    client: Client,
    messages: Vec<(String, HeaderMap, Bytes)>,
    /// The first thing wrong with an `add`, reported by the commit.
    error: Option<AtomicBatchError>,
}

impl std::fmt::Debug for AtomicBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AtomicBatch")
            .field("messages", &self.messages.len())
            .finish_non_exhaustive()
    }
}

/// What the stream said of a committed batch.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct AtomicBatchAck {
    /// The stream that stored it.
    pub stream: String,
    /// The sequence of its last message; the others precede it, in order.
    pub sequence: u64,
    /// How many messages it stored.
    pub count: u64,
    /// The batch's id.
    pub id: String,
}

/// Why a batch was not stored. Nothing of it was: that is the point.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AtomicBatchError {
    /// A batch of no message.
    #[error("an atomic batch needs at least one message")]
    Empty,
    /// More messages than the server takes in one batch.
    #[error("an atomic batch holds at most {MAX_BATCH} messages; this one has {count}")]
    TooLarge {
        /// How many it has.
        count: usize,
    },
    /// A message could not be made: its subject or its encoding.
    #[error("a message of the batch: {0}")]
    Message(#[source] super::PublishError),
    /// The server refused the batch: the stream does not take atomic batches (declare it with
    /// `atomic_publish = true`), an expectation did not hold, its subjects are not all in one
    /// stream, the server is older than 2.12.
    #[error("the atomic batch was refused ({count} messages, first to `{subject}`): {reason}")]
    Refused {
        /// The first message's subject.
        subject: String,
        /// How many messages it had.
        count: usize,
        /// The server's words.
        reason: String,
    },
    /// No answer to the commit: the batch may or may not have been stored. Read the stream
    /// before committing again.
    #[error("the atomic batch's commit got no answer (first to `{subject}`): it may be stored")]
    Unconfirmed {
        /// The first message's subject.
        subject: String,
        /// Why.
        #[source]
        source: BoxError,
    },
}

impl Client {
    /// A new atomic batch on this connection.
    pub fn atomic_batch(&self) -> AtomicBatch {
        AtomicBatch {
            client: self.clone(),
            messages: Vec::new(),
            error: None,
        }
    }
}

/// The server's answer to a batch's first message or its commit.
#[derive(serde::Deserialize)]
struct Answer {
    error: Option<ApiError>,
    stream: Option<String>,
    seq: Option<u64>,
    count: Option<u64>,
    batch: Option<String>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    description: Option<String>,
    err_code: Option<u64>,
}

impl AtomicBatch {
    /// Adds `value` (as JSON, or Protobuf for a Protobuf [`Payload`]) to `subject`.
    pub fn add<T: EncodePayload + ?Sized>(self, subject: impl Into<String>, value: &T) -> Self {
        self.add_with(subject, value, Publish::new())
    }

    /// Adds `value` to the subject its [`Payload`] template makes.
    pub fn emit<T: Payload + ?Sized>(mut self, value: &T) -> Self {
        match value.subject() {
            Ok(subject) => self.add(subject.into_owned(), value),
            Err(error) => {
                self.error.get_or_insert(AtomicBatchError::Message(error));
                self
            }
        }
    }

    /// Adds `value` to `subject` with `options`: an expectation
    /// ([`Publish::expected_last_subject_sequence`]; [`Publish::expected_last_sequence`] on
    /// the first message only), headers, an idempotency key (the batch is refused as a whole
    /// if one repeats a stored message's).
    pub fn add_with<T: EncodePayload + ?Sized>(
        mut self,
        subject: impl Into<String>,
        value: &T,
        options: Publish,
    ) -> Self {
        let subject = subject.into();
        if let Some(problem) = super::publish_subject_problem(&subject) {
            self.error
                .get_or_insert(AtomicBatchError::Message(super::PublishError::InvalidSubject {
                    subject,
                    problem,
                }));
            return self;
        }
        if let Some(refused) = options.refusal(&subject) {
            self.error.get_or_insert(AtomicBatchError::Message(refused));
            return self;
        }
        if options.at.is_some() {
            // A batch is stored now, whole: a message of it cannot wait on a schedule.
            self.error.get_or_insert(AtomicBatchError::Refused {
                subject: subject.clone(),
                count: self.messages.len() + 1,
                reason: "a message of an atomic batch cannot be delayed (Publish::at / after)".to_string(),
            });
            return self;
        }
        let target = async_nats::Subject::from(subject.as_str());
        match encode(&target, value) {
            Ok((payload, format)) => {
                let mut headers = options.into_headers(format);
                crate::telemetry::trace::inject(&tracing::Span::current(), &mut headers);
                self.messages.push((subject, headers, payload));
            }
            Err(error) => {
                self.error.get_or_insert(AtomicBatchError::Message(error));
            }
        }
        self
    }

    /// How many messages it holds.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// Sends the batch and commits it: every message is stored, in order, or none is.
    ///
    /// # Errors
    ///
    /// [`AtomicBatchError::Empty`], [`AtomicBatchError::TooLarge`] or
    /// [`AtomicBatchError::Message`] with nothing sent; [`AtomicBatchError::Refused`] when the
    /// server stored nothing; [`AtomicBatchError::Unconfirmed`] when the commit's answer did
    /// not come.
    pub async fn commit(self) -> Result<AtomicBatchAck, AtomicBatchError> {
        if let Some(error) = self.error {
            return Err(error);
        }
        let count = self.messages.len();
        if count == 0 {
            return Err(AtomicBatchError::Empty);
        }
        if count > MAX_BATCH {
            return Err(AtomicBatchError::TooLarge { count });
        }
        let first = self.messages[0].0.clone();
        let id = nuid::next().to_string();
        let nats = self.client.nats();
        if let Some(why) = crate::operate::too_old(nats, 2, 12, "an atomic batch") {
            return Err(AtomicBatchError::Refused {
                subject: first,
                count,
                reason: why,
            });
        }
        let refused = |reason: String| AtomicBatchError::Refused {
            subject: first.clone(),
            count,
            reason,
        };
        let unconfirmed = |source: BoxError| AtomicBatchError::Unconfirmed {
            subject: first.clone(),
            source,
        };
        for (index, (subject, mut headers, payload)) in self.messages.into_iter().enumerate() {
            let sequence = index + 1;
            headers.insert("Nats-Batch-Id", id.as_str());
            headers.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
            let last = sequence == count;
            if last {
                headers.insert("Nats-Batch-Commit", "1");
            }
            if sequence == 1 || last {
                // The first is a request: its answer says whether the stream takes batches at
                // all, before the rest is sent. The last is the commit, answered with the ack.
                let answer = nats
                    .request_with_headers(subject.clone(), headers, payload)
                    .await
                    .map_err(|error| match error.kind() {
                        async_nats::RequestErrorKind::NoResponders => {
                            refused(format!("no stream captures `{subject}`"))
                        }
                        _ if last => unconfirmed(error.into()),
                        _ => refused(crate::error::chain(&error).to_string()),
                    })?;
                let parsed: Option<Answer> = (!answer.payload.is_empty())
                    .then(|| serde_json::from_slice(&answer.payload).ok())
                    .flatten();
                if let Some(error) = parsed.as_ref().and_then(|answer| answer.error.as_ref()) {
                    let mut reason = error.description.clone().unwrap_or_else(|| "refused".into());
                    if error.err_code == Some(10174) {
                        reason.push_str(" (declare the stream with atomic_publish = true)");
                    }
                    return Err(refused(reason));
                }
                if last {
                    let answer = parsed.ok_or_else(|| unconfirmed("the commit's answer is not an ack".into()))?;
                    return Ok(AtomicBatchAck {
                        stream: answer.stream.unwrap_or_default(),
                        sequence: answer.seq.unwrap_or_default(),
                        count: answer.count.unwrap_or(count as u64),
                        id: answer.batch.unwrap_or(id),
                    });
                }
            } else {
                nats.publish_with_headers(subject, headers, payload)
                    .await
                    .map_err(|error| refused(crate::error::chain(&error).to_string()))?;
            }
        }
        Err(unconfirmed("the batch ended before its commit".into()))
    }
}
