//! The embedded default: with no `NATS_URL`, `run()` uses a local development nats-server,
//! starting one (JetStream on, data in `NATTY_DEV_DIR`) when none is listening on `NATTY_DEV_PORT`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use crate::config::Config;
use crate::error::{Error, Result};

/// The oldest server natty supports: per-consumer filter subjects and the consumer
/// create-or-update API arrived in 2.10.
const MIN_VERSION: (u32, u32) = (2, 10);

/// A development server: either one this process started (killed when dropped) or one
/// that was already running.
pub(crate) struct DevServer {
    _child: Option<tokio::process::Child>,
    url: String,
}

impl DevServer {
    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    /// Finds a server on the development port or starts one.
    pub(crate) async fn ensure(config: &Config) -> Result<DevServer> {
        let port = config.dev_port;
        let url = format!("nats://127.0.0.1:{port}");
        if listening(port).await {
            tracing::info!(%url, "NATS_URL is not set: using the development nats-server already running at {url}");
            return Ok(DevServer { _child: None, url });
        }
        let binary = find_nats_server(config.nats_server.as_deref()).map_err(|reason| Error::DevServer { reason })?;
        let dir = &config.dev_dir;
        std::fs::create_dir_all(dir).map_err(|error| Error::DevServer {
            reason: format!("cannot create its data folder {}: {error}", dir.display()),
        })?;
        let log_path = dir.join("nats-server.log");
        let log = std::fs::File::create(&log_path).map_err(|error| Error::DevServer {
            reason: format!("cannot create {}: {error}", log_path.display()),
        })?;
        let log_err = log.try_clone().map_err(|error| Error::DevServer {
            reason: error.to_string(),
        })?;
        let mut child = tokio::process::Command::new(&binary)
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.join("jetstream"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|error| Error::DevServer {
                reason: format!("cannot run {}: {error}", binary.display()),
            })?;

        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if listening(port).await {
                break;
            }
            let exited = child.try_wait().ok().flatten();
            if exited.is_some() || tokio::time::Instant::now() >= deadline {
                let tail = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                return Err(Error::DevServer {
                    reason: format!(
                        "{} did not start listening on port {port} ({}); last log lines: {}",
                        binary.display(),
                        match exited {
                            Some(status) => format!("it exited with {status}"),
                            None => "timed out".into(),
                        },
                        tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            %url,
            data = %dir.display(),
            "NATS_URL is not set: started a development nats-server at {url} (data in {}); set NATS_URL to use your own server",
            dir.display()
        );
        Ok(DevServer {
            _child: Some(child),
            url,
        })
    }
}

async fn listening(port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            Duration::from_millis(250),
            tokio::net::TcpStream::connect(("127.0.0.1", port))
        )
        .await,
        Ok(Ok(_))
    )
}

/// Finds a `nats-server` binary no older than 2.10: `explicit` (from `NATTY_NATS_SERVER`), then
/// `.natty/bin/nats-server` in the current folder or one above it (where
/// `scripts/install-nats-server.sh` puts it), then `PATH`.
///
/// # Errors
///
/// A message naming what was tried and how to install one.
pub fn find_nats_server(explicit: Option<&Path>) -> std::result::Result<PathBuf, String> {
    let roots: Vec<PathBuf> = std::env::current_dir().into_iter().collect();
    locate_nats_server(explicit, &roots)
}

/// [`find_nats_server`] with the folders whose ancestors may hold `.natty/bin/nats-server`.
pub(crate) fn locate_nats_server(explicit: Option<&Path>, roots: &[PathBuf]) -> std::result::Result<PathBuf, String> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = explicit {
        candidates.push(path.to_path_buf());
    } else {
        for root in roots {
            candidates.extend(root.ancestors().map(|dir| dir.join(".natty/bin/nats-server")));
        }
        if let Some(paths) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&paths).map(|dir| dir.join("nats-server")));
        }
    }
    let mut tried = Vec::new();
    for candidate in candidates {
        if !candidate.is_file() {
            if explicit.is_some() {
                tried.push(format!("{} does not exist", candidate.display()));
            }
            continue;
        }
        match version(&candidate) {
            Some(found) if found >= MIN_VERSION => return Ok(candidate),
            Some((major, minor)) => tried.push(format!("{} is v{major}.{minor}", candidate.display())),
            None => tried.push(format!("{} does not run", candidate.display())),
        }
    }
    let tried = if tried.is_empty() {
        String::new()
    } else {
        format!(" ({})", tried.join("; "))
    };
    Err(format!(
        "no nats-server >= {}.{} found{tried}: run scripts/install-nats-server.sh, \
         set NATTY_NATS_SERVER to a binary, or set NATS_URL to use a running server",
        MIN_VERSION.0, MIN_VERSION.1
    ))
}

/// Runs `nats-server --version` (it prints `nats-server: v2.15.1`).
fn version(binary: &Path) -> Option<(u32, u32)> {
    let output = std::process::Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text.split_whitespace().find_map(|word| word.strip_prefix('v'))?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}
