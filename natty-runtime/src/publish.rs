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
        let ack = match self.jetstream.publish(subject.clone(), payload.into()).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        ack.map_err(|source| PublishError::Publish {
            subject: subject.to_string(),
            source,
        })
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
