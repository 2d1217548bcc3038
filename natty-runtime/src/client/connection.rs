//! Connecting from settings: the development server when no URL is configured, and the
//! [`Connection`] that keeps it alive for code outside handlers.

use std::sync::Arc;

use crate::config::Config;
use crate::dev_server::DevServer;
use crate::error::Result;
use crate::telemetry::Telemetry;

use super::Client;

/// Connects with `config`, starting the development server when no URL is configured.
pub(crate) async fn connect_config(
    config: &Config,
    telemetry: Arc<Telemetry>,
) -> Result<(Client, Option<Arc<DevServer>>)> {
    let (url, dev) = match &config.url {
        Some(url) => (url.clone(), None),
        None => {
            let dev = DevServer::ensure(config).await?;
            (dev.url().to_string(), Some(Arc::new(dev)))
        }
    };
    let connected = crate::connect::connect(config, &url).await?;
    Ok((Client::connected(connected, telemetry), dev))
}

/// Connects using the environment's settings (see [`Config`]), for code outside handlers,
/// such as a publisher's `main`. With no `NATS_URL`, it uses (or starts) the development
/// server, which lives as long as the returned [`Connection`].
///
/// # Errors
///
/// [`Error::Config`](crate::Error::Config), [`Error::DevServer`](crate::Error::DevServer) or
/// [`Error::Connect`](crate::Error::Connect).
pub async fn connect() -> Result<Connection> {
    let config = Config::from_env()?;
    let (client, dev) = connect_config(&config, Arc::default()).await?;
    Ok(Connection { client, _dev: dev })
}

/// A [`Client`] that keeps the development server it started alive. Derefs to [`Client`].
#[derive(Clone)]
pub struct Connection {
    client: Client,
    _dev: Option<Arc<DevServer>>,
}

impl std::ops::Deref for Connection {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}
