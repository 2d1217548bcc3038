//! Typed publishing: serde values to JetStream subjects, each awaited until the stream acks it.

use serde::Serialize;

use async_nats::jetstream;
pub use async_nats::jetstream::publish::PublishAck;

use crate::config::Config;
use crate::error::Result;

/// Publishing failed; nothing is known to be stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The value could not be serialized.
    #[error("cannot encode the message for `{subject}` as JSON: {source}")]
    Encode {
        /// The target subject.
        subject: String,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
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
}

impl Client {
    /// Wraps an async-nats client.
    pub fn new(nats: async_nats::Client) -> Self {
        let jetstream = jetstream::new(nats.clone());
        Client { nats, jetstream }
    }

    /// Connects using `config` (see [`Config`]); with no URL configured this needs a server
    /// on the development port, see [`crate::connect`].
    ///
    /// # Errors
    ///
    /// [`crate::Error::Connect`] or [`crate::Error::Config`].
    pub async fn connect_with(config: &Config, url: &str) -> Result<Client> {
        Ok(Client::new(crate::connect::connect(config, url).await?))
    }

    /// Publishes `value` as JSON to `subject` and waits until the stream has stored it.
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
    pub async fn publish<T: Serialize + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> std::result::Result<PublishAck, PublishError> {
        self.send(subject, value).await?.await
    }

    /// Sends `value` as JSON to `subject` and returns at once with a [`PendingAck`] to await
    /// later: many publishes can be in flight, each still confirmed.
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
    pub async fn send<T: Serialize + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> std::result::Result<PendingAck, PublishError> {
        // A `Subject` shares its bytes, so keeping it for the error costs no copy.
        let subject = async_nats::Subject::from(subject.into());
        let payload = match serde_json::to_vec(value) {
            Ok(payload) => payload,
            Err(source) => {
                return Err(PublishError::Encode {
                    subject: subject.to_string(),
                    source,
                })
            }
        };
        match self.jetstream.publish(subject.clone(), payload.into()).await {
            Ok(ack) => Ok(PendingAck {
                subject,
                ack: std::future::IntoFuture::into_future(ack),
            }),
            Err(source) => Err(PublishError::Publish {
                subject: subject.to_string(),
                source,
            }),
        }
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
        self.ack.as_mut().poll(cx).map_err(|source| PublishError::Publish {
            subject: self.subject.to_string(),
            source,
        })
    }
}
