//! Connecting: turns a [`Config`] into an async-nats connection with auth, TLS and
//! reconnects that handlers never notice.

use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};

use crate::config::{Auth, Config};
use crate::error::{Error, Result};

/// A new connection, and what keeps its lame-duck handling alive.
pub(crate) struct Connected {
    pub(crate) nats: async_nats::Client,
    /// The client the connection's event callback reaches through a weak reference, to move
    /// to another server when this one enters lame duck mode. Whoever holds the connection
    /// holds this; when they drop it, the callback lets go too (no reference cycle keeps the
    /// connection open).
    pub(crate) anchor: Arc<async_nats::Client>,
}

/// Connects to `url` with the settings in `config`.
///
/// The first connection must succeed within `connect_timeout` (an unreachable server is a
/// startup error, not a hang); after that, the client reconnects forever and logs each event.
/// When its server enters lame duck mode (shutting down for maintenance), the client
/// reconnects to another server of the cluster at once, rather than waiting to be cut off.
pub(crate) async fn connect(config: &Config, url: &str) -> Result<Connected> {
    let reconnect: Arc<OnceLock<Weak<async_nats::Client>>> = Arc::default();
    let connect_error = |source: crate::error::BoxError| Error::Connect {
        url: url.to_string(),
        source,
    };
    let mut options = ConnectOptions::new()
        .name(&config.name)
        .connection_timeout(config.connect_timeout)
        .max_reconnects(None::<usize>)
        .event_callback({
            let url = url.to_string();
            let reconnect = reconnect.clone();
            move |event| {
                let url = url.clone();
                let reconnect = reconnect.clone();
                async move {
                    match event {
                        Event::Connected => tracing::info!(%url, "connected to NATS"),
                        Event::Disconnected => tracing::warn!(%url, "disconnected from NATS; reconnecting"),
                        Event::LameDuckMode => {
                            tracing::warn!(%url, "the NATS server entered lame duck mode; moving to another server");
                            if let Some(client) = reconnect.get().and_then(Weak::upgrade) {
                                tokio::spawn(leave_lame_duck(client));
                            }
                        }
                        Event::SlowConsumer(sid) => tracing::warn!(sid, "slow consumer: the client dropped messages"),
                        other => tracing::info!(%url, "NATS connection event: {other}"),
                    }
                }
            }
        });
    options = match &config.auth {
        Auth::None => options,
        Auth::UserPassword { user, password } => options.user_and_password(user.clone(), password.clone()),
        Auth::Token(token) => options.token(token.clone()),
        Auth::NKey(seed) => {
            // Checked here so a malformed seed is named, rather than failing as "authorization violation".
            nkeys::KeyPair::from_seed(seed)
                .map_err(|error| Error::config("NATS_NKEY", "<seed>", format!("not a valid nkey seed: {error}")))?;
            options.nkey(seed.clone())
        }
        Auth::CredsFile(path) => options.credentials_file(path).await.map_err(|error| {
            Error::config(
                "NATS_CREDS",
                path.display().to_string(),
                format!("cannot read the creds file: {error}"),
            )
        })?,
    };
    let tls = &config.tls;
    for (setting, path) in [("NATS_CA", &tls.ca), ("NATS_CERT", &tls.cert), ("NATS_KEY", &tls.key)] {
        if let Some(path) = path {
            if !path.is_file() {
                return Err(Error::config(setting, path.display().to_string(), "no such file"));
            }
        }
    }
    if let Some(ca) = &tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.required || tls.ca.is_some() || tls.cert.is_some() {
        options = options.require_tls(true);
    }
    let addrs: Vec<async_nats::ServerAddr> = url
        .split(',')
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .map(|part| {
            part.parse::<async_nats::ServerAddr>()
                .map_err(|error| Error::config("NATS_URL", part, error.to_string()))
        })
        .collect::<Result<_>>()?;
    if addrs.is_empty() {
        return Err(Error::config("NATS_URL", url, "no server URL given"));
    }
    // A blackholed address can stall the TCP connect past connection_timeout on some
    // platforms; the outer timeout makes "never hang" hold regardless.
    let attempt = options.connect(addrs);
    match tokio::time::timeout(config.connect_timeout * 2, attempt).await {
        Ok(Ok(nats)) => {
            let anchor = Arc::new(nats.clone());
            let _ = reconnect.set(Arc::downgrade(&anchor));
            Ok(Connected { nats, anchor })
        }
        Ok(Err(error)) => Err(connect_error(Box::new(error))),
        Err(_) => Err(connect_error(
            format!("timed out after {:?}", config.connect_timeout * 2).into(),
        )),
    }
}

/// Reconnects away from a server in lame duck mode, after a random pause below one second so
/// that the clients of a large service do not all land on the next server at the same instant.
/// The server no longer accepts connections, so the reconnect picks another one.
async fn leave_lame_duck(client: Arc<async_nats::Client>) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |now| now.subsec_nanos());
    tokio::time::sleep(Duration::from_nanos(u64::from(nanos % 1_000_000_000))).await;
    if let Err(error) = client.force_reconnect().await {
        tracing::warn!(error = %crate::error::chain(&error), "cannot reconnect away from the lame-duck server");
    }
}
