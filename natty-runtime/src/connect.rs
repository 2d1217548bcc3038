//! Connecting: turns a [`Config`] into an async-nats connection with auth, TLS and
//! reconnects that handlers never notice.

use async_nats::{ConnectOptions, Event};

use crate::config::{Auth, Config};
use crate::error::{Error, Result};

/// Connects to `url` with the settings in `config`.
///
/// The first connection must succeed within `connect_timeout` (an unreachable server is a
/// startup error, not a hang); after that, the client reconnects forever and logs each event.
pub(crate) async fn connect(config: &Config, url: &str) -> Result<async_nats::Client> {
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
            move |event| {
                let url = url.clone();
                async move {
                    match event {
                        Event::Connected => tracing::info!(%url, "connected to NATS"),
                        Event::Disconnected => tracing::warn!(%url, "disconnected from NATS; reconnecting"),
                        Event::LameDuckMode => tracing::warn!(%url, "the NATS server entered lame duck mode"),
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
        Ok(Ok(client)) => Ok(client),
        Ok(Err(error)) => Err(connect_error(Box::new(error))),
        Err(_) => Err(connect_error(
            format!("timed out after {:?}", config.connect_timeout * 2).into(),
        )),
    }
}
