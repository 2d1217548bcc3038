//! `#[service]`: request-reply over core NATS. The handler's `Ok` is encoded as the reply, its
//! `Err` goes back in the `Natty-Error` header; [`Client::request`] is the typed other side.
//! A service runs as a subscription (see [`crate::subscribe`](mod@crate::subscribe)) in a queue
//! group, so each request is answered once; without one (`queue = false`) every instance
//! answers, and [`Client::request_many`] gathers the replies as a [`Replies`] stream.

use std::future::{Future, IntoFuture};
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::stream::{FusedStream, Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use crate::error::BoxError;
use crate::handler::CoreOutcome;
use crate::payload::{DecodeError, DecodePayload, EncodePayload, Format};
use crate::publish::Client;

/// The header carrying a service handler's error back to the requester.
pub const ERROR_HEADER: &str = "Natty-Error";

/// Default time [`Client::request`] waits for a reply, and [`Client::request_many`] for all of
/// them.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Default quiet period of [`Client::request_many`]: the gather ends once no reply has come for
/// this long, counted from the request for the first reply and from the latest reply after.
///
/// Because it also bounds the wait for the first reply, it has to cover a responder's own work
/// (a database query, a call out), not only the network's round trip: a second does, while a
/// gather of live responders still ends a second after the last of them rather than at the
/// [`REQUEST_TIMEOUT`] deadline. Responders that answer from memory take a shorter one (nats.js's
/// "stall" default is 300 ms); one that may think longer, a longer one.
pub const REQUEST_MANY_QUIET: Duration = Duration::from_secs(1);

/// A `#[service]` handler's return type: `Result<R, E>` where the reply `R` is encoded (JSON,
/// or Protobuf for a Protobuf `Payload`) and an error `E` is sent back in the `Natty-Error` header.
#[diagnostic::on_unimplemented(
    message = "a service handler cannot return `{Self}`",
    label = "return `Result<R, E>` with `R: Serialize`",
    note = "`Ok(reply)` is sent encoded; an `Err` reaches the requester as `RequestError::Remote`"
)]
pub trait IntoReply {
    /// Converts the return value.
    fn into_reply(self) -> CoreOutcome;
}

impl<R: EncodePayload, E: Into<BoxError>> IntoReply for Result<R, E> {
    fn into_reply(self) -> CoreOutcome {
        match self {
            Ok(reply) => match reply.to_bytes() {
                Ok(bytes) => CoreOutcome::Reply(bytes, R::FORMAT),
                Err(error) => CoreOutcome::Failed(format!("cannot encode the reply as {}: {error}", R::FORMAT).into()),
            },
            Err(error) => CoreOutcome::Failed(error.into()),
        }
    }
}

/// A request that got no good reply.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// The request could not be encoded.
    #[error("cannot encode the request to `{subject}` as {format}")]
    Encode {
        /// The subject.
        subject: String,
        /// The format it was encoded in.
        format: Format,
        /// What the encoder reported.
        #[source]
        source: BoxError,
    },
    /// Nobody listens on the subject.
    #[error("no service answers on `{subject}`")]
    NoResponders {
        /// The subject.
        subject: String,
    },
    /// No reply within the timeout.
    #[error("no reply from `{subject}` within {timeout:?}")]
    Timeout {
        /// The subject.
        subject: String,
        /// How long it waited.
        timeout: Duration,
    },
    /// The service's handler returned an error.
    #[error("the service on `{subject}` failed: {message}")]
    Remote {
        /// The subject.
        subject: String,
        /// The handler's error, as the service sent it.
        message: String,
    },
    /// The reply is not the expected type.
    #[error("cannot decode the reply from `{subject}`")]
    Decode {
        /// The subject.
        subject: String,
        /// What is wrong with the reply.
        #[source]
        source: DecodeError,
    },
    /// Anything else the client reported.
    #[error("request to `{subject}` failed")]
    Other {
        /// The subject.
        subject: String,
        /// The client's error.
        #[source]
        source: async_nats::RequestError,
    },
    /// [`Client::request_many`] could not listen for replies or send the request: the
    /// connection is closed or its buffer is full.
    #[error("cannot send the request to `{subject}`")]
    Send {
        /// The subject.
        subject: String,
        /// The client's error: subscribing to the reply inbox, or publishing.
        #[source]
        source: BoxError,
    },
}

impl Client {
    /// Sends `request` to `subject` and decodes the reply, waiting at most
    /// [`REQUEST_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// See [`RequestError`]: no responder, timeout, the service's own error, an undecodable reply.
    pub async fn request<Req: EncodePayload + ?Sized, Resp: DecodePayload>(
        &self,
        subject: impl Into<String>,
        request: &Req,
    ) -> Result<Resp, RequestError> {
        self.request_with_timeout(subject, request, REQUEST_TIMEOUT).await
    }

    /// [`request`](Client::request) with its own timeout.
    ///
    /// # Errors
    ///
    /// As [`Client::request`].
    pub async fn request_with_timeout<Req: EncodePayload + ?Sized, Resp: DecodePayload>(
        &self,
        subject: impl Into<String>,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp, RequestError> {
        let subject = subject.into();
        let (payload, format) = encode(&subject, request);
        let payload = payload?;
        let mut headers = HeaderMap::new();
        format.write_content_type(&mut headers);
        // A request inside a delivery carries a child of its trace, as a publish does.
        crate::telemetry::trace::inject(&tracing::Span::current(), &mut headers);
        let sent = self
            .nats()
            .send_request(
                subject.clone(),
                async_nats::Request::new()
                    .payload(payload)
                    .headers(headers)
                    .timeout(Some(timeout)),
            )
            .await;
        let reply = match sent {
            Ok(reply) => reply,
            Err(source) => {
                return Err(match source.kind() {
                    async_nats::RequestErrorKind::NoResponders => RequestError::NoResponders { subject },
                    async_nats::RequestErrorKind::TimedOut => RequestError::Timeout { subject, timeout },
                    _ => RequestError::Other { subject, source },
                })
            }
        };
        decode_reply(&subject, reply.headers.as_ref(), &reply.payload)
    }

    /// Sends `request` to `subject` once and gathers the typed replies of every service that
    /// answers (scatter-gather): with `#[service(queue = false)]` every instance answers, and
    /// different services may listen on one subject.
    ///
    /// The returned [`RequestMany`] sets when the gather ends, whichever comes first:
    /// [`max_replies`](RequestMany::max_replies) (default: no limit),
    /// [`quiet`](RequestMany::quiet) (default [`REQUEST_MANY_QUIET`]) and
    /// [`deadline`](RequestMany::deadline) (default [`REQUEST_TIMEOUT`]). Awaiting it listens for
    /// replies, sends the request, and gives the [`Replies`] stream.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use futures_util::StreamExt;
    ///
    /// #[derive(serde::Serialize)]
    /// struct QuoteRequest { symbol: String }
    ///
    /// #[derive(serde::Deserialize)]
    /// struct Quote { venue: String, cents: u64 }
    ///
    /// # async fn example(client: natty_runtime::Client) -> Result<(), natty_runtime::RequestError> {
    /// let request = QuoteRequest { symbol: "ACME".into() };
    /// let mut quotes = client
    ///     .request_many::<Quote>("prices.quote", &request)
    ///     .max_replies(3)
    ///     .quiet(Duration::from_millis(200))
    ///     .deadline(Duration::from_secs(2))
    ///     .await?;
    /// while let Some(quote) = quotes.next().await {
    ///     match quote {
    ///         Ok(quote) => println!("{}: {}", quote.venue, quote.cents),
    ///         // One responder's failure; the others' replies still come.
    ///         Err(error) => eprintln!("{error}"),
    ///     }
    /// }
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// Awaiting the [`RequestMany`]: [`RequestError::Encode`] for a request that cannot be
    /// encoded, [`RequestError::Send`] when the client cannot subscribe or publish. Each reply
    /// is an item of the stream; see [`Replies`] for the errors there.
    pub fn request_many<Resp: DecodePayload>(
        &self,
        subject: impl Into<String>,
        request: &(impl EncodePayload + ?Sized),
    ) -> RequestMany<Resp> {
        let subject = subject.into();
        let (payload, format) = encode(&subject, request);
        RequestMany {
            nats: self.nats().clone(),
            subject,
            payload,
            format,
            max_replies: None,
            quiet: REQUEST_MANY_QUIET,
            deadline: REQUEST_TIMEOUT,
            _reply: PhantomData,
        }
    }
}

/// Encodes a request, and says in which format (for its `Content-Type`). A [`RequestMany`]
/// keeps the error for the await, where it reports its errors.
fn encode<Req: EncodePayload + ?Sized>(subject: &str, request: &Req) -> (Result<Bytes, RequestError>, Format) {
    let payload = request.to_bytes().map_err(|source| RequestError::Encode {
        subject: subject.to_owned(),
        format: Req::FORMAT,
        source,
    });
    (payload, Req::FORMAT)
}

/// One reply, as the requester sees it: the service's error (in [`ERROR_HEADER`]) or the decoded
/// value.
fn decode_reply<Resp: DecodePayload>(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Resp, RequestError> {
    if let Some(message) = headers.and_then(|headers| headers.get(ERROR_HEADER)) {
        return Err(RequestError::Remote {
            subject: subject.to_owned(),
            message: message.to_string(),
        });
    }
    crate::payload::decode(headers, payload).map_err(|source| RequestError::Decode {
        subject: subject.to_owned(),
        source,
    })
}

/// `start + wait`, or a time too far off to come (30 years, as tokio's own `sleep` does) when
/// that does not fit: `Duration::MAX` means "no limit", not a panic.
fn after(start: Instant, wait: Duration) -> Instant {
    start
        .checked_add(wait)
        .or_else(|| start.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(start)
}

/// A scatter-gather request being set up: [`Client::request_many`] makes it, its setters choose
/// when the gather ends, and awaiting it sends the request and gives the [`Replies`].
#[must_use = "nothing is sent until the request is awaited"]
pub struct RequestMany<Resp> {
    nats: async_nats::Client,
    subject: String,
    payload: Result<Bytes, RequestError>,
    format: Format,
    max_replies: Option<usize>,
    quiet: Duration,
    deadline: Duration,
    _reply: PhantomData<fn() -> Resp>,
}

impl<Resp> std::fmt::Debug for RequestMany<Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMany")
            .field("subject", &self.subject)
            .field("format", &self.format)
            .field("max_replies", &self.max_replies)
            .field("quiet", &self.quiet)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl<Resp: DecodePayload> RequestMany<Resp> {
    /// Ends the gather at the `count`th reply (every reply counts, a service's error or an
    /// undecodable one too), so a caller that needs a few answers does not wait for the rest.
    /// Default: no limit. A count of 0 is taken as 1: a request waits for at least one reply.
    pub fn max_replies(mut self, count: usize) -> Self {
        self.max_replies = Some(count.max(1));
        self
    }

    /// Ends the gather when no reply has come for `quiet`: after the latest reply, and from the
    /// request until the first. Default [`REQUEST_MANY_QUIET`], which says how to choose one.
    pub fn quiet(mut self, quiet: Duration) -> Self {
        self.quiet = quiet;
        self
    }

    /// Ends the gather `deadline` after the request, whatever is still on its way or being
    /// read: the bound on the whole call. Default [`REQUEST_TIMEOUT`].
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    async fn send(self) -> Result<Replies<Resp>, RequestError> {
        let subject = self.subject;
        let payload = self.payload?;
        let failed = |source: BoxError| RequestError::Send {
            subject: subject.clone(),
            source,
        };
        let start = Instant::now();
        // A fresh inbox, subscribed before the request goes out: a responder can answer before
        // `publish` returns, and the server sends "no responders" there as soon as it sees the
        // request. Its own subscription (not the client's shared request inbox) so that
        // dropping the stream unsubscribes and late replies are not delivered anywhere.
        let inbox = self.nats.new_inbox();
        let subscriber = self
            .nats
            .subscribe(inbox.clone())
            .await
            .map_err(|error| failed(error.into()))?;
        let mut headers = HeaderMap::new();
        self.format.write_content_type(&mut headers);
        crate::telemetry::trace::inject(&tracing::Span::current(), &mut headers);
        self.nats
            .publish_with_reply_and_headers(subject.clone(), inbox, headers, payload)
            .await
            .map_err(|error| failed(error.into()))?;
        Ok(Replies {
            inbox: Some(subscriber),
            deadline: Box::pin(tokio::time::sleep_until(after(start, self.deadline))),
            quiet: Box::pin(tokio::time::sleep_until(after(start, self.quiet))),
            quiet_for: self.quiet,
            left: self.max_replies,
            ended_by: None,
            subject,
            _reply: PhantomData,
        })
    }
}

impl<Resp: DecodePayload> IntoFuture for RequestMany<Resp> {
    type Output = Result<Replies<Resp>, RequestError>;
    type IntoFuture = BoxFuture<'static, Self::Output>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(self.send())
    }
}

/// Why a [`Replies`] stream ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EndedBy {
    /// [`max_replies`](RequestMany::max_replies) replies came.
    MaxReplies,
    /// No reply came for the [`quiet`](RequestMany::quiet) period.
    Quiet,
    /// The [`deadline`](RequestMany::deadline) passed.
    Deadline,
    /// Nobody listens on the subject; the stream's last item was [`RequestError::NoResponders`].
    NoResponders,
    /// The connection closed the reply inbox (the client was closed).
    Closed,
}

/// The replies to a [`Client::request_many`], as they come: a [`Stream`] of each responder's
/// decoded reply, or of what was wrong with it, until the gather ends (see [`EndedBy`]). It
/// unsubscribes from the reply inbox when it ends or is dropped, so a late reply goes nowhere.
///
/// # Errors
///
/// An item is an error, and the stream goes on, for [`RequestError::Remote`] (that service's
/// handler failed) and [`RequestError::Decode`] (a reply that is not a `Resp`).
/// [`RequestError::NoResponders`] is the last item when nobody listens on the subject. Replies
/// that do not come in time are no error: the stream ends with what came, and
/// [`ended_by`](Replies::ended_by) says why.
pub struct Replies<Resp> {
    subject: String,
    /// `None` once ended: dropping the subscriber unsubscribes.
    inbox: Option<async_nats::Subscriber>,
    deadline: Pin<Box<Sleep>>,
    quiet: Pin<Box<Sleep>>,
    quiet_for: Duration,
    /// Replies still wanted, with a count.
    left: Option<usize>,
    ended_by: Option<EndedBy>,
    _reply: PhantomData<fn() -> Resp>,
}

impl<Resp> std::fmt::Debug for Replies<Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replies")
            .field("subject", &self.subject)
            .field("left", &self.left)
            .field("ended_by", &self.ended_by)
            .finish_non_exhaustive()
    }
}

impl<Resp: DecodePayload> Replies<Resp> {
    /// Why the stream ended; `None` while it goes on.
    pub fn ended_by(&self) -> Option<EndedBy> {
        self.ended_by
    }

    /// The subject the request went to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    fn end(&mut self, by: EndedBy) {
        self.inbox = None;
        self.ended_by = Some(by);
    }

    /// One message on the inbox, as the stream's item.
    fn reply(&mut self, message: async_nats::Message) -> Result<Resp, RequestError> {
        if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
            self.end(EndedBy::NoResponders);
            return Err(RequestError::NoResponders {
                subject: self.subject.clone(),
            });
        }
        let reply = decode_reply(&self.subject, message.headers.as_ref(), &message.payload);
        if let Some(left) = &mut self.left {
            *left -= 1;
            if *left == 0 {
                // Unsubscribed now, not at the next poll: the caller may keep the stream.
                self.end(EndedBy::MaxReplies);
                return reply;
            }
        }
        let quiet_until = after(Instant::now(), self.quiet_for);
        self.quiet.as_mut().reset(quiet_until);
        reply
    }
}

impl<Resp: DecodePayload> Stream for Replies<Resp> {
    type Item = Result<Resp, RequestError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        let Some(inbox) = this.inbox.as_mut() else {
            return Poll::Ready(None);
        };
        // The deadline first: a responder that never stops cannot hold the stream open past it.
        if this.deadline.as_mut().poll(cx).is_ready() {
            this.end(EndedBy::Deadline);
            return Poll::Ready(None);
        }
        match inbox.poll_next_unpin(cx) {
            Poll::Ready(Some(message)) => return Poll::Ready(Some(this.reply(message))),
            Poll::Ready(None) => {
                this.end(EndedBy::Closed);
                return Poll::Ready(None);
            }
            Poll::Pending => {}
        }
        // The quiet period after the inbox: a reply that came in time but that the caller was
        // slow to read still counts.
        if this.quiet.as_mut().poll(cx).is_ready() {
            this.end(EndedBy::Quiet);
            return Poll::Ready(None);
        }
        Poll::Pending
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match (&self.inbox, self.left) {
            (None, _) => (0, Some(0)),
            (Some(_), left) => (0, left),
        }
    }
}

impl<Resp: DecodePayload> FusedStream for Replies<Resp> {
    fn is_terminated(&self) -> bool {
        self.inbox.is_none()
    }
}
