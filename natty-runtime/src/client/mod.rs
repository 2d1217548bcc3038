//! [`Client`]: a connection to NATS with JetStream, natty's way. It connects from settings
//! ([`connect`], the development server when no URL is set), owns the subscription its
//! publishes get their acks on, and counts into the service's metrics. Publishing through it
//! is in [`crate::publish`].

use std::sync::Arc;

use async_nats::jetstream;

use crate::config::Config;
use crate::error::Result;
use crate::telemetry::Telemetry;

pub(crate) mod acks;
mod connection;

pub(crate) use connection::connect_config;
pub use connection::{connect, Connection};

/// A connection to NATS with JetStream: what handlers publish through, and what `main` gets
/// from [`crate::connect`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Client {
    pub(crate) nats: async_nats::Client,
    pub(crate) jetstream: jetstream::Context,
    /// Where this client's publishes get their acks (see the `acks` module).
    pub(crate) acks: Arc<acks::Acks>,
    /// The metrics and health of everything running on this connection.
    pub(crate) telemetry: Arc<Telemetry>,
    /// The application state handlers take as `State<T>`: the runtime's, or none.
    pub(crate) states: Arc<crate::state::States>,
    /// Keeps the connection's lame-duck handling alive (see [`crate::connect`]); `None` for a
    /// client the program connected itself.
    _anchor: Option<Arc<async_nats::Client>>,
}

impl Client {
    /// Wraps an async-nats client.
    pub fn new(nats: async_nats::Client) -> Self {
        let jetstream = jetstream::new(nats.clone());
        Client {
            acks: Arc::new(acks::Acks::new(nats.clone())),
            nats,
            jetstream,
            telemetry: Arc::default(),
            states: Arc::default(),
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
