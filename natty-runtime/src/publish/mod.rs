//! Typed publishing: values to JetStream subjects, each awaited until the stream acks it.

pub use crate::error::PublishError;
use crate::payload::{EncodePayload, Format, Payload};

use async_nats::jetstream;
pub use async_nats::jetstream::publish::PublishAck;

use tracing::Instrument;

use crate::classify::{failure, Failure};

mod atomic;
mod durable;

pub use atomic::{AtomicBatch, AtomicBatchAck, AtomicBatchError, MAX_BATCH};

pub use crate::client::Client;
use durable::send_once;
pub(crate) use durable::{publish_durably, PUBLISH_RETRY_FOR};

/// The span of one publish: a producer span whose context travels in the message's headers.
/// None with natty's own subscriber and no exporter: nothing would record it, and the trace
/// context comes from the delivery scope or a new root instead (see [`crate::telemetry`]).
fn publish_span(subject: &str) -> tracing::Span {
    if crate::telemetry::light() {
        return tracing::Span::none();
    }
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

impl Client {
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
    /// [`PublishError::InvalidSubject`] at once, with nothing sent, for a subject with an
    /// empty or wildcard token, whitespace or a control character; [`PublishError::Encode`]
    /// if serialization fails; [`PublishError::NoStream`] if no stream captures the subject;
    /// [`PublishError::Unconfirmed`] or [`PublishError::Publish`] if the ack does not come.
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
    /// [`PublishError::InvalidSubject`] at once for a subject no message can be published to,
    /// [`PublishError::InvalidHeader`] for a header of `options` that cannot be sent;
    /// [`PublishError::Conflict`] when an expectation fails (not because of this call's own
    /// earlier attempt: that is looked up and its ack returned); [`PublishError::Unconfirmed`]
    /// when no ack came after the retries; [`PublishError::Encode`], [`PublishError::NoStream`]
    /// and [`PublishError::Publish`] otherwise.
    pub async fn publish_with<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
        options: Publish,
    ) -> std::result::Result<PublishAck, PublishError> {
        let subject = checked_subject(subject.into())?;
        if let Some(refused) = options.refusal(&subject) {
            return Err(refused);
        }
        let (payload, format) = encode(&subject, value)?;
        // The key that makes a retry after a lost ack safe: without it, a retry could store
        // the message twice, and not retrying could lose it.
        let options = match options.msg_id {
            Some(_) => options,
            None => options.id(new_msg_id()),
        };
        let delayed = options.delayed();
        let mut headers = options.into_headers(format);
        let span = publish_span(&subject);
        crate::telemetry::trace::inject(&span, &mut headers);
        let sent_to = destination(self, &subject, delayed, &mut headers).await?;
        let result = publish_durably(self, &sent_to, headers, payload)
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
    /// [`PublishError::InvalidSubject`] as [`Client::publish`]; [`PublishError::Encode`] if
    /// serialization fails, [`PublishError::Publish`] if the message cannot be sent; the
    /// [`PendingAck`] reports a missing or refused ack.
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
        if let Some(refused) = options.refusal(&subject) {
            return Err(refused);
        }
        let (payload, format) = encode(&subject, value)?;
        let delayed = options.delayed();
        let mut headers = options.into_headers(format);
        let sent_to = destination(self, &subject, delayed, &mut headers).await?;
        self.send_raw(&sent_to, headers, payload)
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
        send_once(self, subject, headers, payload).await
    }
}

/// A publish that was sent and whose ack has not arrived yet; await it for the [`PublishAck`].
#[must_use = "a publish is confirmed only when its ack is awaited"]
pub struct PendingAck {
    subject: async_nats::Subject,
    ack: crate::client::acks::Awaiting,
}

impl std::future::Future for PendingAck {
    type Output = std::result::Result<PublishAck, PublishError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.ack)
            .poll(cx)
            .map_err(|source| classify(&self.subject, source))
    }
}

/// Where a publish to `subject` goes: there, or for a delayed one (`Publish::at`) its holder
/// subject, with the schedule written into `headers`.
async fn destination(
    client: &Client,
    subject: &async_nats::Subject,
    delayed: Option<(std::time::SystemTime, String)>,
    headers: &mut async_nats::HeaderMap,
) -> std::result::Result<async_nats::Subject, PublishError> {
    match delayed {
        // Boxed: a rare path, whose state would otherwise be part of every publish's future.
        Some((at, id)) => Box::pin(crate::schedule::delay(client, subject, &id, at, headers)).await,
        None => Ok(subject.clone()),
    }
}

/// `value` in its payload format; an error names `subject`.
pub(crate) fn encode<T: EncodePayload + ?Sized>(
    subject: &str,
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

/// `value` as a header value, or why it cannot be one: async-nats' own check (a line break
/// would end the header early on the wire), which its conversions from a string enforce with
/// a panic.
pub(crate) fn header_value(value: &str) -> std::result::Result<async_nats::HeaderValue, &'static str> {
    value.parse().map_err(|_| "a header value holds no line break")
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
pub(crate) fn checked_subject(subject: String) -> std::result::Result<async_nats::Subject, PublishError> {
    match publish_subject_problem(&subject) {
        None => Ok(async_nats::Subject::from(subject)),
        Some(problem) => Err(PublishError::InvalidSubject { subject, problem }),
    }
}

/// Options of one publish: idempotency key, optimistic-concurrency expectations, headers and
/// event time. Starts empty; each setter adds one.
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct Publish {
    msg_id: Option<String>,
    headers: Option<async_nats::HeaderMap>,
    /// When the server is to publish the message (see [`Publish::at`]).
    pub(super) at: Option<std::time::SystemTime>,
    /// The first header that cannot go on the wire (its name, why), refused when the message
    /// is published ([`PublishError::InvalidHeader`]): async-nats panics on it, and a key or a
    /// value taken from a payload must not bring a handler down.
    refused: Option<(String, &'static str)>,
}

impl Publish {
    /// No options.
    pub fn new() -> Publish {
        Publish::default()
    }

    fn header(mut self, name: impl async_nats::header::IntoHeaderName, value: impl AsRef<str>) -> Publish {
        let name = name.into_header_name();
        match header_value(value.as_ref()) {
            Ok(value) => self
                .headers
                .get_or_insert_with(async_nats::HeaderMap::new)
                .insert(name, value),
            Err(problem) => {
                self.refused.get_or_insert_with(|| (name.to_string(), problem));
            }
        }
        self
    }

    /// [`PublishError::InvalidHeader`] for the first header that could not be set.
    pub(crate) fn refusal(&self, subject: &str) -> Option<PublishError> {
        self.refused
            .as_ref()
            .map(|(header, problem)| PublishError::InvalidHeader {
                subject: subject.to_string(),
                header: header.clone(),
                problem,
            })
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
    pub fn with_header(mut self, name: &str, value: impl AsRef<str>) -> Publish {
        // async-nats' own check of a name (its conversion from a string panics on one it
        // refuses); an empty name is refused here too.
        match name.parse::<async_nats::HeaderName>() {
            Ok(parsed) if !name.is_empty() => self.header(parsed, value),
            _ => {
                self.refused
                    .get_or_insert_with(|| (name.to_string(), "a header name is printable ASCII without `:`"));
                self
            }
        }
    }

    /// Has the server publish the message at `time` (rounded up to the second; at once if it
    /// is past), not now (nats-server 2.12, ADR-51). The stream keeps it until then, so it
    /// survives restarts of this service and of the server; the ack says it is kept.
    ///
    /// The subject's stream must take schedules (`#[stream(..., schedules = true)]`). The
    /// message waits on a subject of its own, `natty.schedules.<stream>.at.<key>`, named after
    /// its idempotency key: sent again with the same [`id`](Publish::id) while it waits, it
    /// replaces itself rather than coming twice. Headers set here (trace context,
    /// a Protobuf `Content-Type`, yours) come with it; expectations (`expected_*`) and `Nats-TTL` are
    /// refused, since they would apply to the copy that waits. So is a delay past the stream's
    /// `max_age`, and a stream with interest retention (it would drop what waits). natty first
    /// asks the server which stream takes the subject and how: two requests more than a publish.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: natty_runtime::Client) -> Result<(), natty_runtime::PublishError> {
    /// use std::time::{Duration, SystemTime};
    /// use natty_runtime::Publish;
    /// let remind = Publish::new().id("order-42-reminder").at(SystemTime::now() + Duration::from_secs(3600));
    /// client.publish_with("orders.42.remind", &"unpaid", remind).await?;
    /// # Ok(()) }
    /// ```
    pub fn at(mut self, time: std::time::SystemTime) -> Publish {
        self.at = Some(time);
        self
    }

    /// Has the server publish the message `delay` from now (see [`at`](Publish::at)).
    pub fn after(self, delay: std::time::Duration) -> Publish {
        self.at(std::time::SystemTime::now() + delay)
    }

    /// For a delayed publish, when, and the key that names its holder (made here when none
    /// was given); nothing is made for the others, which are most publishes.
    fn delayed(&self) -> Option<(std::time::SystemTime, String)> {
        let at = self.at?;
        Some((at, self.msg_id.clone().unwrap_or_else(new_msg_id)))
    }

    /// The headers to send: the options' plus the payload's `Content-Type`.
    fn into_headers(self, format: Format) -> async_nats::HeaderMap {
        let mut headers = self.headers.unwrap_or_default();
        format.write_content_type(&mut headers);
        headers
    }
}

/// The header [`Publish::event_time`] sets.
pub const EVENT_TIME_HEADER: &str = "Natty-Event-Time";
