//! Typed publishing: values to JetStream subjects, each awaited until the stream acks it.

use crate::payload::{EncodePayload, Format, Payload, CONTENT_TYPE};

use async_nats::jetstream;
pub use async_nats::jetstream::publish::PublishAck;

use std::sync::Arc;

use tracing::Instrument;

use crate::classify::{failure, Failure};
use crate::config::Config;
use crate::error::Result;
use crate::telemetry::Telemetry;

/// The span of one publish: a producer span whose context travels in the message's headers.
fn publish_span(subject: &str) -> tracing::Span {
    tracing::info_span!(
        "natty.publish",
        otel.kind = "producer",
        otel.status_code = tracing::field::Empty,
        subject,
        stream = tracing::field::Empty,
        sequence = tracing::field::Empty,
        error = tracing::field::Empty,
    )
}

/// Publishing failed. Except for [`PublishError::Unconfirmed`], nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// An optimistic-concurrency expectation did not hold (`expected_last_*`): another writer
    /// got there first. Nothing was stored; re-read and decide.
    #[error("publish to `{subject}` rejected: {expectation} does not hold ({source})")]
    Conflict {
        /// The target subject.
        subject: String,
        /// Which expectation failed, e.g. "expected last subject sequence 41".
        expectation: String,
        /// The server's answer.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// No ack came in time, even after retries: the message may or may not be stored.
    /// Publishing again with the same [`Publish::id`] is safe: the stream keeps one copy.
    #[error("publish to `{subject}` unconfirmed after {attempts} attempts (it may be stored): {source}")]
    Unconfirmed {
        /// The target subject.
        subject: String,
        /// How many times it was sent.
        attempts: u32,
        /// The last error.
        #[source]
        source: jetstream::context::PublishError,
    },
    /// No stream captures the subject: nothing was stored, and retrying would not help.
    #[error(
        "no stream captures `{subject}`: nothing was stored (declare a #[stream] whose subjects include it, \
         or publish with core NATS if no stream should keep it)"
    )]
    NoStream {
        /// The target subject.
        subject: String,
    },
    /// The subject is not one a message can be published to: an empty token (`a..b`, a
    /// leading or trailing `.`), a wildcard token (`*`, `>`), whitespace or a control
    /// character. Refused before anything is sent, and never retried: it cannot heal.
    #[error("cannot publish to {subject:?}: {problem}; nothing was sent")]
    InvalidSubject {
        /// The subject given.
        subject: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A field of a [`Payload`] fills a placeholder of its subject template with a value that
    /// is not exactly one subject token (empty, or holding `.`, `*`, `>`, whitespace or a control
    /// character): published, it would land on another subject than the template says.
    /// Refused before anything is sent, and never retried.
    #[error(
        "{type_name}.{field} = {value:?} cannot fill `{{{field}}}` in the subject `{template}`: {problem}; nothing was sent"
    )]
    InvalidSubjectField {
        /// The payload's Rust type.
        type_name: &'static str,
        /// The field at fault.
        field: &'static str,
        /// Its value, as `Display` wrote it.
        value: String,
        /// The subject template the type declares.
        template: &'static str,
        /// What is wrong with the value.
        problem: &'static str,
    },
    /// The value could not be encoded.
    #[error("cannot encode the message for `{subject}` as {format}: {source}")]
    Encode {
        /// The target subject.
        subject: String,
        /// The format it was encoded in.
        format: Format,
        /// What the encoder reported.
        #[source]
        source: crate::error::BoxError,
    },
    /// The server did not ack the message (no stream for the subject, timeout, refused).
    #[error("publish to `{subject}` was not acknowledged: {source}")]
    Publish {
        /// The target subject.
        subject: String,
        /// What the client reported.
        #[source]
        source: jetstream::context::PublishError,
    },
}

/// A connection to NATS with JetStream: what handlers publish through, and what `main` gets
/// from [`crate::connect`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    nats: async_nats::Client,
    jetstream: jetstream::Context,
    /// The metrics and health of everything running on this connection.
    telemetry: Arc<Telemetry>,
    /// Keeps the connection's lame-duck handling alive (see [`crate::connect`]); `None` for a
    /// client the program connected itself.
    _anchor: Option<Arc<async_nats::Client>>,
}

impl Client {
    /// Wraps an async-nats client.
    pub fn new(nats: async_nats::Client) -> Self {
        let jetstream = jetstream::new(nats.clone());
        Client {
            nats,
            jetstream,
            telemetry: Arc::default(),
            _anchor: None,
        }
    }

    /// A client on a connection natty made, counting into `telemetry`.
    pub(crate) fn connected(connected: crate::connect::Connected, telemetry: Arc<Telemetry>) -> Self {
        Client {
            telemetry,
            _anchor: Some(connected.anchor),
            ..Client::new(connected.nats)
        }
    }

    pub(crate) fn telemetry(&self) -> &Telemetry {
        &self.telemetry
    }

    /// Connects using `config` (see [`Config`]); with no URL configured this needs a server
    /// on the development port, see [`crate::connect`].
    ///
    /// # Errors
    ///
    /// [`crate::Error::Connect`] or [`crate::Error::Config`].
    pub async fn connect_with(config: &Config, url: &str) -> Result<Client> {
        Ok(Client::connected(
            crate::connect::connect(config, url).await?,
            Arc::default(),
        ))
    }

    /// Publishes `value` to `subject` (as JSON, or Protobuf for a Protobuf [`Payload`]) and waits until the stream has stored it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: natty_runtime::Client) -> Result<(), natty_runtime::PublishError> {
    /// let ack = client.publish("tickets.created", &serde_json::json!({"id": 1})).await?;
    /// println!("stored as {} #{}", ack.stream, ack.sequence);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishError::Encode`] if serialization fails; [`PublishError::Publish`] if no
    /// stream captures the subject, or the ack does not come.
    pub async fn publish<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> std::result::Result<PublishAck, PublishError> {
        self.publish_with(subject, value, Publish::new()).await
    }

    /// Publishes `value` to `subject` with `options` (idempotency key, expectations,
    /// headers, event time) and waits until the stream has stored it.
    ///
    /// Every publish carries an idempotency key (`Nats-Msg-Id`): the [`id`](Publish::id)
    /// given, or a unique one natty makes. While a stream has no leader (an election, a
    /// restart), the server answers "no responders", or the ack does not come: natty sends
    /// again with the same key for up to 20 seconds, and the stream, which deduplicates keys
    /// within its `duplicate_window`, stores the message once. An error after that is
    /// [`PublishError::Unconfirmed`] when the message may have been stored.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: natty_runtime::Client) -> Result<(), natty_runtime::PublishError> {
    /// use natty_runtime::{Publish, PublishError};
    /// let options = Publish::new().id("order-42-created").expected_last_subject_sequence(7);
    /// match client.publish_with("orders.42", &"created", options).await {
    ///     Ok(ack) if ack.duplicate => println!("already stored"),
    ///     Ok(ack) => println!("stored as #{}", ack.sequence),
    ///     Err(PublishError::Conflict { .. }) => println!("someone else wrote orders.42 first"),
    ///     Err(other) => return Err(other),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishError::Conflict`] when an expectation fails; [`PublishError::Unconfirmed`]
    /// when no ack came after the retries; [`PublishError::Encode`] and
    /// [`PublishError::Publish`] otherwise.
    pub async fn publish_with<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
        options: Publish,
    ) -> std::result::Result<PublishAck, PublishError> {
        let subject = checked_subject(subject.into())?;
        let (payload, format) = encode(&subject, value)?;
        // The key that makes a retry after a lost ack safe: without it, a retry could store
        // the message twice, and not retrying could lose it.
        let options = match options.msg_id {
            Some(_) => options,
            None => options.id(new_msg_id()),
        };
        let mut headers = options.into_headers(format);
        let span = publish_span(&subject);
        crate::telemetry::trace::inject(&span, &mut headers);
        let result = publish_durably(&self.jetstream, &subject, headers, payload)
            .instrument(span.clone())
            .await;
        let metrics = &self.telemetry.metrics;
        match &result {
            Ok(ack) => {
                span.record("stream", ack.stream.as_str());
                span.record("sequence", ack.sequence);
                metrics.published(&ack.stream);
            }
            Err(error) => {
                span.record("otel.status_code", "error");
                span.record("error", tracing::field::display(error));
                metrics.publish_failed();
            }
        }
        result
    }

    /// Sends `value` to `subject` and returns at once with a [`PendingAck`] to await
    /// later: many publishes can be in flight, each still confirmed. It does not retry.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: natty_runtime::Client) -> Result<(), natty_runtime::PublishError> {
    /// let mut pending = Vec::new();
    /// for id in 0..100 {
    ///     pending.push(client.send("tickets.created", &id).await?);
    /// }
    /// for ack in pending {
    ///     ack.await?;
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishError::Encode`] if serialization fails, [`PublishError::Publish`] if the
    /// message cannot be sent; the [`PendingAck`] reports a missing or refused ack.
    pub async fn send<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> std::result::Result<PendingAck, PublishError> {
        self.send_with(subject, value, Publish::new()).await
    }

    /// [`send`](Client::send) with `options`.
    ///
    /// # Errors
    ///
    /// As [`Client::send`].
    pub async fn send_with<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
        options: Publish,
    ) -> std::result::Result<PendingAck, PublishError> {
        // A `Subject` shares its bytes, so keeping it for the error costs no copy.
        let subject = checked_subject(subject.into())?;
        let (payload, format) = encode(&subject, value)?;
        self.send_raw(&subject, options.into_headers(format), payload)
            .instrument(publish_span(&subject))
            .await
    }

    /// Publishes a [`Payload`] to its own subject and waits until the stream has stored it.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # use serde::Serialize;
    /// # use natty_runtime::Payload;
    /// #[derive(Serialize, Payload)]
    /// #[payload(subject = "orders.{store}.created")]
    /// struct OrderCreated {
    ///     store: String,
    ///     total_cents: u64,
    /// }
    ///
    /// # async fn demo(client: natty_runtime::Client) -> Result<(), natty_runtime::PublishError> {
    /// let order = OrderCreated { store: "north".into(), total_cents: 1250 };
    /// client.emit(&order).await?; // to orders.north.created
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`PublishError::InvalidSubjectField`] at once when a field in the subject template
    /// holds a value that is not exactly one subject token; otherwise as [`Client::publish`].
    #[doc(alias = "publish")]
    pub async fn emit<T: Payload + ?Sized>(&self, value: &T) -> std::result::Result<PublishAck, PublishError> {
        self.publish_with(value.subject()?.into_owned(), value, Publish::new())
            .await
    }

    /// [`emit`](Client::emit) with `options`.
    ///
    /// # Errors
    ///
    /// As [`Client::publish_with`].
    pub async fn emit_with<T: Payload + ?Sized>(
        &self,
        value: &T,
        options: Publish,
    ) -> std::result::Result<PublishAck, PublishError> {
        self.publish_with(value.subject()?.into_owned(), value, options).await
    }

    /// Sends one message, carrying the current span's trace context in its headers.
    async fn send_raw(
        &self,
        subject: &async_nats::Subject,
        mut headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> std::result::Result<PendingAck, PublishError> {
        crate::telemetry::trace::inject(&tracing::Span::current(), &mut headers);
        send_once(&self.jetstream, subject, headers, payload).await
    }

    /// The underlying async-nats client, for anything natty does not wrap.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// The JetStream context.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.jetstream
    }

    /// Sends everything buffered to the server; call before exiting.
    ///
    /// # Errors
    ///
    /// When the connection is gone.
    pub async fn flush(&self) -> std::result::Result<(), async_nats::client::FlushError> {
        self.nats.flush().await
    }
}

/// A publish that was sent and whose ack has not arrived yet; await it for the [`PublishAck`].
#[must_use = "a publish is confirmed only when its ack is awaited"]
pub struct PendingAck {
    subject: async_nats::Subject,
    ack: AckFuture,
}

/// async-nats' ack future, already boxed by async-nats: polled in place, with no second box.
type AckFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<PublishAck, jetstream::context::PublishError>> + Send>,
>;

impl std::future::Future for PendingAck {
    type Output = std::result::Result<PublishAck, PublishError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        self.ack
            .as_mut()
            .poll(cx)
            .map_err(|source| classify(&self.subject, source))
    }
}

/// How long [`Client::publish_with`] keeps trying: longer than a stream leader election on a
/// loaded cluster (a few seconds), well inside the default 2-minute duplicate window that
/// makes the retries safe.
const PUBLISH_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(20);
/// How long "no responders" lasts before natty asks whether any stream takes the subject.
const NO_STREAM_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
/// Pause before the first retry; it doubles, up to 2 s.
const PUBLISH_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

fn encode<T: EncodePayload + ?Sized>(
    subject: &async_nats::Subject,
    value: &T,
) -> std::result::Result<(bytes::Bytes, Format), PublishError> {
    let bytes = value.to_bytes().map_err(|source| PublishError::Encode {
        subject: subject.to_string(),
        format: T::FORMAT,
        source,
    })?;
    Ok((bytes, T::FORMAT))
}

/// Maps async-nats' ack errors onto natty's: conflicts and answers that may hide a stored
/// message are their own cases (see [`crate::classify`]).
fn classify(subject: &async_nats::Subject, source: jetstream::context::PublishError) -> PublishError {
    use jetstream::context::PublishErrorKind as Kind;
    let subject = subject.to_string();
    match failure(&source) {
        Failure::WrongLast => PublishError::Conflict {
            subject,
            expectation: match source.kind() {
                Kind::WrongLastMessageId => "the expected last message id".into(),
                _ => "the expected last sequence".into(),
            },
            source,
        },
        // A lost ack, a dropped connection, or "duplicate message id is in process" (an earlier
        // attempt with this key is still being replicated): it may well be stored, and asking
        // again with the same key gets its ack, as a duplicate.
        failure if failure.may_have_landed() => PublishError::Unconfirmed {
            subject,
            attempts: 1,
            source,
        },
        _ => PublishError::Publish { subject, source },
    }
}

/// A fresh idempotency key, for a write whose caller gave none.
pub(crate) fn new_msg_id() -> String {
    format!("natty-{}", nuid::next())
}

/// Why `subject` cannot be published to, or `None` when it can: every token non-empty, none
/// of them a wildcard, no whitespace or control character anywhere. `*` and `>` inside a longer
/// token are literal to the server and allowed.
pub fn publish_subject_problem(subject: &str) -> Option<&'static str> {
    if subject.is_empty() {
        return Some("it is empty");
    }
    if subject.chars().any(char::is_whitespace) {
        return Some("it contains whitespace");
    }
    if subject.chars().any(char::is_control) {
        return Some("it contains a control character");
    }
    subject.split('.').find_map(|token| match token {
        "" => Some("it has an empty token (`..`, or a leading or trailing `.`)"),
        "*" | ">" => Some("it has a wildcard token (`*` or `>`): a message is published to one subject"),
        _ => None,
    })
}

/// `subject`, checked (see [`publish_subject_problem`]).
fn checked_subject(subject: String) -> std::result::Result<async_nats::Subject, PublishError> {
    match publish_subject_problem(&subject) {
        None => Ok(async_nats::Subject::from(subject)),
        Some(problem) => Err(PublishError::InvalidSubject { subject, problem }),
    }
}

/// Sends one message through `js`, as it is.
async fn send_once(
    js: &jetstream::Context,
    subject: &async_nats::Subject,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> std::result::Result<PendingAck, PublishError> {
    match js.publish_with_headers(subject.clone(), headers, payload).await {
        Ok(ack) => Ok(PendingAck {
            subject: subject.clone(),
            ack: std::future::IntoFuture::into_future(ack),
        }),
        Err(source) => Err(PublishError::Publish {
            subject: subject.to_string(),
            source,
        }),
    }
}

/// Sends until the stream acks, retrying "no responders" and answers that may hide a stored
/// message with the same headers for up to [`PUBLISH_RETRY_FOR`] (see [`Client::publish_with`]).
/// The headers must carry a `Nats-Msg-Id`: it is what makes sending again safe. KV writes go
/// through here too.
pub(crate) async fn publish_durably(
    js: &jetstream::Context,
    subject: &async_nats::Subject,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> std::result::Result<PublishAck, PublishError> {
    debug_assert!(headers.get(async_nats::header::NATS_MESSAGE_ID).is_some());
    let started = tokio::time::Instant::now();
    let mut pause = PUBLISH_RETRY_DELAY;
    let mut attempt = 0u32;
    // "No responders" means an election, or that no stream takes the subject at all; the
    // second is asked about once it has lasted a while, so a stream being created right
    // now still gets the message.
    let mut stream_checked = false;
    // Whether an attempt went unanswered, so it may have been stored.
    let mut unconfirmed = false;
    loop {
        attempt += 1;
        let result = match send_once(js, subject, headers.clone(), payload.clone()).await {
            Ok(pending) => pending.await,
            Err(error) => Err(error),
        };
        let Err(error) = result else {
            return result;
        };
        let retry = match &error {
            // "No responders": the stream has no leader to take it right now.
            PublishError::Publish { source, .. } if failure(source) == Failure::NoResponders => {
                if !stream_checked && !unconfirmed && started.elapsed() >= NO_STREAM_AFTER {
                    stream_checked = true;
                    if no_stream_takes(js, subject).await {
                        return Err(PublishError::NoStream {
                            subject: subject.to_string(),
                        });
                    }
                }
                true
            }
            // The ack was lost: the retry carries the same key, so it is stored at most once.
            PublishError::Unconfirmed { .. } => true,
            _ => false,
        };
        if matches!(error, PublishError::Unconfirmed { .. }) {
            unconfirmed = true;
        }
        if !retry || started.elapsed() + pause > PUBLISH_RETRY_FOR {
            if unconfirmed {
                if let PublishError::Conflict { source, .. } = error {
                    // An expectation that fails after an attempt that may have been stored can
                    // be that attempt's own doing: a clustered stream answers a repeated
                    // `Nats-Msg-Id` as a duplicate first, a single server checks the
                    // expectation first and refuses it.
                    return match earlier_attempt(js, subject, &headers).await {
                        Earlier::Stored(ack) => Ok(ack),
                        Earlier::NotStored => Err(classify(subject, source)),
                        Earlier::Unknown => Err(PublishError::Unconfirmed {
                            subject: subject.to_string(),
                            attempts: attempt,
                            source,
                        }),
                    };
                }
            }
            return Err(match error {
                PublishError::Unconfirmed { subject, source, .. } => PublishError::Unconfirmed {
                    subject,
                    attempts: attempt,
                    source,
                },
                // An earlier attempt may have been stored: whatever the last one says,
                // "nothing was stored" is not known.
                PublishError::Publish { subject, source } if unconfirmed => PublishError::Unconfirmed {
                    subject,
                    attempts: attempt,
                    source,
                },
                other => other,
            });
        }
        tracing::debug!(%subject, attempt, %error, "publish not confirmed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// What became of an earlier attempt of a publish whose later attempt failed an expectation.
enum Earlier {
    /// It is stored: this is its ack.
    Stored(PublishAck),
    /// Another message is where it would be: it was not stored, the conflict is real.
    NotStored,
    /// The stream could not be asked.
    Unknown,
}

/// Looks for an earlier attempt of the publish with `headers` where its expectation says it
/// would be: right after the expected last sequence of its subject or of the stream, or else
/// as the subject's last message. It is found by its `Nats-Msg-Id`, through the stream
/// leader (not a replica that may lag).
///
/// One case cannot be told apart: on a subject that keeps one message (a KV bucket with
/// history 1), an attempt that was stored and then replaced by another writer's message
/// before this look is reported as not stored. The key has moved on either way, which is
/// what a conflict tells the caller.
async fn earlier_attempt(js: &jetstream::Context, subject: &str, headers: &async_nats::HeaderMap) -> Earlier {
    use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
    use jetstream::stream::LastRawMessageErrorKind;
    let Some(id) = headers.get(NATS_MESSAGE_ID) else {
        return Earlier::Unknown;
    };
    let expected = |name| headers.get(name).and_then(|value| value.as_str().parse::<u64>().ok());
    let Ok(name) = js.stream_by_subject(subject).await else {
        return Earlier::Unknown;
    };
    let Ok(stream) = js.get_stream_no_info(&name).await else {
        return Earlier::Unknown;
    };
    let found = if let Some(last) = expected(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE) {
        stream.get_first_raw_message_by_subject(subject, last + 1).await
    } else if let Some(last) = expected(NATS_EXPECTED_LAST_SEQUENCE) {
        stream.get_raw_message(last + 1).await
    } else {
        stream.get_last_raw_message_by_subject(subject).await
    };
    match found {
        Ok(message) if message.headers.get(NATS_MESSAGE_ID) == Some(id) => Earlier::Stored(PublishAck {
            stream: name,
            sequence: message.sequence,
            duplicate: true,
            ..PublishAck::default()
        }),
        Ok(_) => Earlier::NotStored,
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Earlier::NotStored,
        Err(_) => Earlier::Unknown,
    }
}

/// Whether the server says that no stream captures `subject` (not merely that it could
/// not answer).
async fn no_stream_takes(js: &jetstream::Context, subject: &str) -> bool {
    use jetstream::context::GetStreamByNameErrorKind as Kind;
    matches!(
        js.stream_by_subject(subject).await,
        Err(error) if error.kind() == Kind::NotFound
    )
}

/// Options of one publish: idempotency key, optimistic-concurrency expectations, headers and
/// event time. Starts empty; each setter adds one.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Publish {
    msg_id: Option<String>,
    headers: Option<async_nats::HeaderMap>,
}

impl Publish {
    /// No options.
    pub fn new() -> Publish {
        Publish::default()
    }

    fn header(mut self, name: impl async_nats::header::IntoHeaderName, value: impl AsRef<str>) -> Publish {
        self.headers
            .get_or_insert_with(async_nats::HeaderMap::new)
            .insert(name, value.as_ref());
        self
    }

    /// Idempotency key (`Nats-Msg-Id`): the stream stores one message per key within its
    /// `duplicate_window`; a repeat is acked with `duplicate: true`. Without one,
    /// [`Client::publish_with`] makes a unique key per call, so that its own retries are safe;
    /// give one derived from the event (an order id, say) to deduplicate across calls and
    /// processes too.
    pub fn id(mut self, id: impl Into<String>) -> Publish {
        let id = id.into();
        self = self.header(async_nats::header::NATS_MESSAGE_ID, &id);
        self.msg_id = Some(id);
        self
    }

    /// Store only if the stream's last sequence is `sequence`.
    pub fn expected_last_sequence(self, sequence: u64) -> Publish {
        self.header(async_nats::header::NATS_EXPECTED_LAST_SEQUENCE, sequence.to_string())
    }

    /// Store only if the last message on this subject has stream sequence `sequence`
    /// (0: there is none yet). The building block of per-entity optimistic concurrency.
    pub fn expected_last_subject_sequence(self, sequence: u64) -> Publish {
        self.header(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            sequence.to_string(),
        )
    }

    /// Store only if the stream's last message has idempotency key `id`.
    pub fn expected_last_id(self, id: impl AsRef<str>) -> Publish {
        self.header(async_nats::header::NATS_EXPECTED_LAST_MESSAGE_ID, id)
    }

    /// Store only if the subject belongs to stream `stream`.
    pub fn expected_stream(self, stream: impl AsRef<str>) -> Publish {
        self.header(async_nats::header::NATS_EXPECTED_STREAM, stream)
    }

    /// When the event happened (as opposed to when it was stored), as an RFC 3339
    /// `Natty-Event-Time` header.
    pub fn event_time(self, at: std::time::SystemTime) -> Publish {
        self.header(EVENT_TIME_HEADER, humantime::format_rfc3339_nanos(at).to_string())
    }

    /// Any other header.
    pub fn with_header(self, name: &str, value: impl AsRef<str>) -> Publish {
        self.header(name, value)
    }

    /// The headers to send: the options' plus the payload's `Content-Type`.
    fn into_headers(self, format: Format) -> async_nats::HeaderMap {
        let mut headers = self.headers.unwrap_or_default();
        headers.insert(CONTENT_TYPE, format.content_type());
        headers
    }
}

/// The header [`Publish::event_time`] sets.
pub const EVENT_TIME_HEADER: &str = "Natty-Event-Time";

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};

    fn compare_and_set(id: &str, last: u64) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, id);
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, last.to_string());
        headers
    }

    /// A single server checks a publish's expectation before its `Nats-Msg-Id`: the retry of a
    /// compare-and-set whose first attempt was stored (and whose ack was lost) is refused as a
    /// conflict. natty then finds that attempt where the expectation says it would be.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_caused_by_the_writes_own_earlier_attempt_is_found() {
        let server = crate::testing::NatsServer::start().await.expect("nats-server");
        let js = jetstream::new(server.client().await);
        js.create_stream(jetstream::stream::Config {
            name: "cas".into(),
            subjects: vec!["cas.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let send = |headers: async_nats::HeaderMap| {
            let js = js.clone();
            async move {
                js.publish_with_headers("cas.k", headers, "v".into())
                    .await
                    .unwrap()
                    .await
            }
        };
        assert_eq!(send(compare_and_set("first", 0)).await.unwrap().sequence, 1);
        // Stored at 2, as if its ack were lost; the retry is refused.
        assert_eq!(send(compare_and_set("mine", 1)).await.unwrap().sequence, 2);
        let retry = send(compare_and_set("mine", 1)).await.unwrap_err();
        assert_eq!(failure(&retry), Failure::WrongLast, "{retry}");

        match earlier_attempt(&js, "cas.k", &compare_and_set("mine", 1)).await {
            Earlier::Stored(ack) => assert_eq!((ack.stream.as_str(), ack.sequence, ack.duplicate), ("cas", 2, true)),
            _ => panic!("the earlier attempt is stored at 2"),
        }
        // Another writer's message follows revision 1: that conflict is real.
        assert!(matches!(
            earlier_attempt(&js, "cas.k", &compare_and_set("theirs", 1)).await,
            Earlier::NotStored
        ));
        // Nothing after revision 2 yet: not stored either.
        assert!(matches!(
            earlier_attempt(&js, "cas.k", &compare_and_set("later", 2)).await,
            Earlier::NotStored
        ));
    }
}
