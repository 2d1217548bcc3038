//! `#[service]`: request-reply over core NATS. The handler's `Ok` is encoded as the reply, its
//! `Err` goes back in the `Natty-Error` header; [`Client::request`] is the typed other side.
//! A service runs as a subscription (see [`crate::subscribe`](mod@crate::subscribe)) in a queue group, so each
//! request is answered once.

use std::time::Duration;

use async_nats::HeaderMap;

use crate::error::BoxError;
use crate::handler::CoreOutcome;
use crate::payload::{DecodeError, DecodePayload, EncodePayload, Format};
use crate::publish::Client;

/// The header carrying a service handler's error back to the requester.
pub const ERROR_HEADER: &str = "Natty-Error";

/// Default time [`Client::request`] waits for a reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

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
        let payload = request.to_bytes().map_err(|source| RequestError::Encode {
            subject: subject.clone(),
            format: Req::FORMAT,
            source,
        })?;
        let mut headers = HeaderMap::new();
        Req::FORMAT.write_content_type(&mut headers);
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
        if let Some(message) = reply.headers.as_ref().and_then(|headers| headers.get(ERROR_HEADER)) {
            return Err(RequestError::Remote {
                subject,
                message: message.to_string(),
            });
        }
        crate::payload::decode(reply.headers.as_ref(), &reply.payload)
            .map_err(|source| RequestError::Decode { subject, source })
    }
}
