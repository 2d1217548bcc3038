//! A real `nats-server` for tests: finding the binary, running single servers and small JetStream
//! clusters on loopback, waiting until they are ready, restarting them in place, and killing them
//! on drop.
//!
//! Compiled only with the crate feature `testing`. Tests never talk to a mock: every [`NatsServer`]
//! is a child process with its own temporary store directory, listening on `127.0.0.1` on a port
//! picked by the server (`-p -1`). Its log goes to a file in that directory rather than to the
//! test's output, and the tail of that log is part of the error when the server fails to start.
//!
//! The binary is found by [`nats_server_binary`]; `scripts/install-nats-server.sh` installs the
//! pinned release into `<workspace>/.natty/bin/nats-server`, where it is found without any setup.
//!
//! # Examples
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use natty_runtime::testing::NatsServer;
//!
//! let server = NatsServer::start().await?;
//! let client = server.client().await;
//! let js = async_nats::jetstream::new(client);
//! js.create_stream(async_nats::jetstream::stream::Config {
//!     name: "ORDERS".into(),
//!     subjects: vec!["orders.>".into()],
//!     ..Default::default()
//! })
//! .await
//! .expect("create stream");
//! # Ok(())
//! # }
//! ```

mod app;
mod cluster;
mod launch;
mod server;
pub mod stores;

pub use app::{DeadLetter, TestApp, TestAppBuilder};
pub use cluster::{ClusterNode, NatsCluster};
use launch::*;
pub use server::{NatsServer, NatsServerBuilder};

use std::fmt::Write as _;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Environment variable naming the `nats-server` binary to use, ahead of any other.
pub const NATS_SERVER_ENV: &str = "NATTY_NATS_SERVER";

/// How long a single server gets to become ready.
const START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a cluster gets to elect a JetStream meta leader, and a restarted node to catch up.
const CLUSTER_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of every readiness loop. Short, because a local server starts in milliseconds.
const POLL: Duration = Duration::from_millis(20);
/// Upper bound on one readiness probe, so a hung probe cannot eat the whole deadline at once.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Lines of the server log quoted in a startup error.
const LOG_TAIL_LINES: usize = 40;

const INSTALL_HINT: &str = "run `scripts/install-nats-server.sh` from the workspace root to install the pinned \
     nats-server into .natty/bin, or set NATTY_NATS_SERVER to the path of a nats-server >= 2.10";

const LOG_FILE: &str = "nats-server.log";
const CONFIG_FILE: &str = "server.conf";

/// Finds the `nats-server` binary the harness runs.
///
/// In order: the path in `NATTY_NATS_SERVER`; `.natty/bin/nats-server` in this crate's
/// directory or any directory above it, then in the current directory or any above it (where
/// `scripts/install-nats-server.sh` puts it); `nats-server` on `PATH`.
///
/// # Errors
///
/// `NotFound` when none of these exists, with a message saying how to install one; also when
/// `NATTY_NATS_SERVER` names a file that does not exist.
pub fn nats_server_binary() -> io::Result<PathBuf> {
    let explicit = std::env::var_os(NATS_SERVER_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from);
    // The manifest dir finds the workspace's install from any test of this crate; the current
    // dir covers a crate outside this workspace that installed its own copy.
    let roots: Vec<PathBuf> = std::iter::once(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .chain(std::env::current_dir().ok())
        .collect();
    crate::dev_server::locate_nats_server(explicit.as_deref(), &roots)
        .map_err(|reason| io::Error::new(io::ErrorKind::NotFound, reason))
}

/// `count` distinct free loopback ports. All listeners are held until every port is picked, so
/// the same port is never handed out twice.
fn free_ports(count: usize) -> io::Result<Vec<u16>> {
    let listeners = (0..count)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|listener| listener.local_addr().map(|addr| addr.port()))
        .collect()
}

/// One `GET path` over HTTP/1.0 (the server closes the connection after answering): the
/// status code and the body.
pub(crate) async fn http_get(addr: std::net::SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(PROBE_TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    let answer = String::from_utf8_lossy(&answer);
    let status = answer
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("not an HTTP answer: {answer:?}")))?;
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A path as a quoted nats-server config string (JSON string syntax, which the config accepts).
fn quoted(path: &Path) -> String {
    serde_json::Value::from(path.to_string_lossy().into_owned()).to_string()
}

/// A [`crate::Runtime`] running in the background of a test, stopped (and drained) on demand.
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> natty_runtime::Result<()> {
/// use natty_runtime::testing::{NatsServer, RunningRuntime};
///
/// let server = NatsServer::start().await.expect("nats-server");
/// let running = RunningRuntime::spawn(natty_runtime::Runtime::builder().url(server.url()).build()?);
/// // ... publish, wait for the handlers' effects ...
/// running.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct RunningRuntime {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<crate::Result<()>>,
}

impl RunningRuntime {
    /// Runs `runtime` on a background task until [`stop`](Self::stop).
    pub fn spawn(runtime: crate::Runtime) -> RunningRuntime {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(runtime.run_until(async {
            let _ = stopped.await;
        }));
        RunningRuntime { stop, task }
    }

    /// Runs every registered handler against the server at `url`, with the rest of the
    /// settings from the environment.
    ///
    /// # Panics
    ///
    /// If the environment holds a setting natty cannot use.
    pub fn registered(url: impl Into<String>) -> RunningRuntime {
        let runtime = crate::Runtime::builder()
            .url(url)
            .build()
            .expect("a runtime from the environment's settings");
        RunningRuntime::spawn(runtime)
    }

    /// Starts the drain, as SIGTERM would, and waits until the runtime has returned.
    ///
    /// # Errors
    ///
    /// What the runtime returned: a startup error, if it never got going.
    ///
    /// # Panics
    ///
    /// If the runtime's task panicked.
    pub async fn stop(self) -> crate::Result<()> {
        let _ = self.stop.send(());
        self.task.await.expect("the runtime task panicked")
    }

    /// Whether the runtime has stopped by itself (a startup error, most likely).
    pub fn finished(&self) -> bool {
        self.task.is_finished()
    }
}
