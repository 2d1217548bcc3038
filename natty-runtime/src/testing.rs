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

pub mod stores;

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

/// A `nats-server` child process with JetStream on, listening on `127.0.0.1`, killed on drop.
///
/// Its temporary directory holds the JetStream store, the log, the ports file and the config
/// file; it lives as long as the `NatsServer`, so [`restart`](Self::restart) finds the same
/// streams.
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use natty_runtime::testing::NatsServer;
///
/// let mut server = NatsServer::start().await?;
/// let url = server.url();
/// server.restart().await?;
/// assert_eq!(server.url(), url);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NatsServer {
    launch: Launch,
    /// `None` once stopped.
    child: Option<Child>,
    pid: u32,
    port: u16,
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on a free port and waits until JetStream answers.
    ///
    /// # Errors
    ///
    /// When the binary cannot be found (see [`nats_server_binary`]), the server exits, or it is
    /// not ready within 10 s; the error then quotes the tail of the server's log.
    pub async fn start() -> io::Result<NatsServer> {
        Self::builder().start().await
    }

    /// A builder for a server with a config file, extra arguments, a fixed port, or no JetStream.
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// The client URL, e.g. `nats://127.0.0.1:4222`. It stays the same across restarts.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port. It stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary directory: its JetStream store is `jetstream/` inside it, and it
    /// also holds the log (`nats-server.log`) and the config file (`server.conf`) if any.
    pub fn store_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The path of the server's log file, which collects its stdout and stderr across restarts.
    pub fn log_file(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// The process id of the running server, or of the last one if it has been stopped.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the server process is still alive (neither stopped nor exited by itself).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Connects a plain client to the server.
    ///
    /// # Panics
    ///
    /// When the connection fails: this is a test helper and a test cannot go on without it.
    /// Servers that need credentials or TLS want their own `async_nats::ConnectOptions`.
    pub async fn client(&self) -> async_nats::Client {
        let url = self.url();
        async_nats::connect(&url)
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the test nats-server at {url}: {err}"))
    }

    /// Kills the server (SIGKILL) and starts it again on the same port with the same store
    /// directory, config and arguments, waiting until it is ready as [`start`](Self::start) does.
    ///
    /// SIGKILL rather than a graceful stop, because what a test wants to know is whether its
    /// data and clients survive a crash. Also starts a server that was [`stop`](Self::stop)ped.
    ///
    /// # Errors
    ///
    /// When the server does not come back within 10 s; the error quotes the log tail.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.stop().await;
        let deadline = Instant::now() + START_DEADLINE;
        let (child, pid, port) = self.launch.run(self.dir.path(), Some(self.port), deadline).await?;
        self.child = Some(child);
        self.pid = pid;
        self.port = port;
        Ok(())
    }

    /// Kills the server (SIGKILL) and waits for the process to exit. Does nothing if it is
    /// already stopped.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means the process had already exited, which is what was asked for.
            if let Err(err) = child.kill().await {
                tracing::debug!(pid = self.pid, err = %crate::error::chain(&err), "nats-server had already exited");
            }
        }
    }

    /// Sends the unix signal `sig` to the server, e.g. 19 (SIGSTOP) and 18 (SIGCONT) on Linux to
    /// freeze and thaw it, or 1 (SIGHUP) to reload its config.
    ///
    /// # Panics
    ///
    /// When the server is stopped, or `kill` fails: a test that meant to signal the server
    /// cannot go on without it.
    pub fn signal(&self, sig: i32) {
        assert!(
            self.child.is_some(),
            "cannot signal the test nats-server (last pid {}): it is stopped",
            self.pid
        );
        // `kill(1)` rather than libc: the workspace denies unsafe code.
        let status = std::process::Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .stdin(Stdio::null())
            .status()
            .unwrap_or_else(|err| panic!("cannot run `kill` to signal nats-server: {err}"));
        assert!(status.success(), "`kill -{sig} {}` failed with {status}", self.pid);
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if child.start_kill().is_err() {
            return;
        }
        // Wait briefly (a SIGKILLed process goes in milliseconds) so the store directory is not
        // removed under a live server; `kill_on_drop` and tokio's reaper cover anything left.
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Builds a [`NatsServer`] with a config file, extra arguments, a fixed port, or no JetStream.
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use natty_runtime::testing::NatsServer;
///
/// // A plain client cannot connect without the token, so only wait for the port.
/// let server = NatsServer::builder()
///     .config(r#"authorization { token: "s3cret" }"#)
///     .ready_check(false)
///     .start()
///     .await?;
/// let client = async_nats::ConnectOptions::with_token("s3cret".into())
///     .connect(server.url())
///     .await
///     .expect("connect with token");
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NatsServerBuilder {
    config: Option<String>,
    jetstream: bool,
    args: Vec<String>,
    port: Option<u16>,
    ready_check: bool,
    /// Set by [`NatsCluster`], whose config files must name the store directory before start.
    dir: Option<TempDir>,
}

impl Default for NatsServerBuilder {
    fn default() -> Self {
        Self {
            config: None,
            jetstream: true,
            args: Vec::new(),
            port: None,
            ready_check: true,
            dir: None,
        }
    }
}

impl NatsServerBuilder {
    /// Extra config file content, written to `server.conf` in the server's directory and passed
    /// with `-c` (for TLS, accounts, authorization...).
    ///
    /// The address, port, JetStream and store directory flags are still passed on the command
    /// line, and nats-server lets them override the file (`listen`, `port`), with one
    /// exception: it refuses to start when the file sets `jetstream { store_dir }` and `-sd` is
    /// passed too ("Duplicate 'store_dir' configuration"). To configure JetStream in the file,
    /// turn off [`jetstream`](Self::jetstream) so no `-js -sd` is passed.
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config = Some(text.into());
        self
    }

    /// Whether to pass `-js -sd <dir>` (JetStream on, stored in the server's directory).
    /// Default: on. Off also means readiness does not wait for JetStream.
    pub fn jetstream(mut self, enabled: bool) -> Self {
        self.jetstream = enabled;
        self
    }

    /// An extra command-line argument, passed after the harness's own.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// A fixed client port instead of one the server picks.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Whether to wait for a client to get through (default: on).
    ///
    /// On: wait until a plain client connects and, with JetStream on, until JetStream answers
    /// an account info request. Off: wait only until the server has written its ports file and
    /// accepts TCP connections, for servers a plain client cannot use (TLS or auth required).
    pub fn ready_check(mut self, enabled: bool) -> Self {
        self.ready_check = enabled;
        self
    }

    fn with_dir(mut self, dir: TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// Starts the server and waits until it is ready.
    ///
    /// # Errors
    ///
    /// When the binary cannot be found (see [`nats_server_binary`]), the temporary directory or
    /// config file cannot be written, the server exits, or it is not ready within 10 s; the
    /// error then quotes the tail of the server's log. With a fixed port, a server that exits
    /// because the port is still in use is retried until the deadline.
    pub async fn start(self) -> io::Result<NatsServer> {
        let binary = nats_server_binary()?;
        let dir = match self.dir {
            Some(dir) => dir,
            None => tempfile::Builder::new().prefix("natty-nats-").tempdir()?,
        };
        let config = match self.config {
            Some(text) => {
                let path = dir.path().join(CONFIG_FILE);
                tokio::fs::write(&path, text).await?;
                Some(path)
            }
            None => None,
        };
        let readiness = match (self.ready_check, self.jetstream) {
            (false, _) => Readiness::Tcp,
            (true, false) => Readiness::Client,
            (true, true) => Readiness::JetStream,
        };
        let launch = Launch {
            binary,
            jetstream: self.jetstream,
            config,
            args: self.args,
            readiness,
        };
        let deadline = Instant::now() + START_DEADLINE;
        let (child, pid, port) = launch.run(dir.path(), self.port, deadline).await?;
        Ok(NatsServer {
            launch,
            child: Some(child),
            pid,
            port,
            dir,
        })
    }
}

/// What "ready" means for one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Readiness {
    /// The ports file is written and the client port accepts TCP connections.
    Tcp,
    /// And a plain client connects and round-trips a flush.
    Client,
    /// And JetStream answers an account info request.
    JetStream,
}

/// Everything needed to start the same server again.
#[derive(Debug, Clone)]
struct Launch {
    binary: PathBuf,
    jetstream: bool,
    config: Option<PathBuf>,
    args: Vec<String>,
    readiness: Readiness,
}

/// Why a start attempt failed.
enum WaitError {
    Exited(ExitStatus),
    TimedOut(String),
    Io(io::Error),
}

impl Launch {
    /// Starts the server and waits until it is ready; returns the child, its pid and its port.
    async fn run(&self, dir: &Path, port: Option<u16>, deadline: Instant) -> io::Result<(Child, u32, u16)> {
        let log_path = dir.join(LOG_FILE);
        let mut port_busy = false;
        loop {
            // Only this attempt's part of the log tells whether this attempt lost the port.
            let log_start = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
            let (mut child, pid) = self.spawn(dir, port, &log_path)?;
            let failure = match wait_ready(&mut child, pid, dir, self.readiness, deadline).await {
                Ok(port) => return Ok((child, pid, port)),
                Err(failure) => failure,
            };
            // A fixed port can still be held by the process just killed: try again.
            if let WaitError::Exited(_) = failure {
                if port.is_some()
                    && Instant::now() < deadline
                    && read_log(&log_path, log_start).contains("address already in use")
                {
                    port_busy = true;
                    tokio::time::sleep(POLL).await;
                    continue;
                }
            }
            if let Err(err) = child.kill().await {
                tracing::debug!(pid, err = %crate::error::chain(&err), "nats-server had already exited");
            }
            // The last attempt may have been cut short by the deadline before it could report
            // the port clash that made the earlier ones fail.
            let note = match (port_busy, port) {
                (true, Some(port)) => format!("; earlier attempts found port {port} in use"),
                _ => String::new(),
            };
            return Err(self.startup_error(failure, &note, &log_path));
        }
    }

    fn spawn(&self, dir: &Path, port: Option<u16>, log_path: &Path) -> io::Result<(Child, u32)> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
        let mut command = Command::new(&self.binary);
        command
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port.map_or_else(|| "-1".to_owned(), |p| p.to_string()));
        if self.jetstream {
            command.arg("-js").arg("-sd").arg(dir);
        }
        command.arg("--ports_file_dir").arg(dir);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        command
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        let child = command.spawn().map_err(|err| {
            io::Error::new(
                err.kind(),
                format!("cannot run {}: {err}; {INSTALL_HINT}", self.binary.display()),
            )
        })?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other(format!("{} exited at once", self.binary.display())))?;
        Ok((child, pid))
    }

    fn startup_error(&self, failure: WaitError, note: &str, log_path: &Path) -> io::Error {
        let (kind, reason) = match failure {
            WaitError::Exited(status) => (io::ErrorKind::Other, format!("it exited with {status}")),
            WaitError::TimedOut(last) => (io::ErrorKind::TimedOut, format!("it was not ready in time ({last})")),
            WaitError::Io(err) => (err.kind(), format!("waiting for it failed: {err}")),
        };
        let mut message = format!(
            "test nats-server {} did not start: {reason}{note}\n--- last lines of {} ---\n",
            self.binary.display(),
            log_path.display()
        );
        let log = read_log(log_path, 0);
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
            let _ = writeln!(message, "{line}");
        }
        io::Error::new(kind, message)
    }
}

fn read_log(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// Polls until the server is ready as `readiness` asks, it exits, or the deadline passes.
async fn wait_ready(
    child: &mut Child,
    pid: u32,
    dir: &Path,
    readiness: Readiness,
    deadline: Instant,
) -> Result<u16, WaitError> {
    let mut port = None;
    let mut tcp_ok = false;
    let mut client: Option<async_nats::Client> = None;
    let mut last = String::from("no ports file yet");
    loop {
        if let Some(status) = child.try_wait().map_err(WaitError::Io)? {
            return Err(WaitError::Exited(status));
        }
        let probe = deadline
            .saturating_duration_since(Instant::now())
            .clamp(POLL, PROBE_TIMEOUT);

        // The server writes the ports file once all its listeners are up; it names the port
        // that `-p -1` picked. The file name starts with the executable's name, so match the pid.
        if port.is_none() {
            match read_ports_file(dir, pid) {
                Ok(found) => port = Some(found),
                Err(reason) => last = reason,
            }
        }
        if let (Some(port), false) = (port, tcp_ok) {
            match tokio::time::timeout(probe, TcpStream::connect(("127.0.0.1", port))).await {
                Ok(Ok(_)) => tcp_ok = true,
                Ok(Err(err)) => last = format!("TCP connect to port {port}: {err}"),
                Err(_) => last = format!("TCP connect to port {port} timed out"),
            }
        }
        if let (Some(port), true) = (port, tcp_ok) {
            if readiness == Readiness::Tcp {
                return Ok(port);
            }
            if client.is_none() {
                match connect_probe(port, probe).await {
                    Ok(connected) => client = Some(connected),
                    Err(reason) => last = reason,
                }
            }
            if let Some(client) = &client {
                let outcome = match readiness {
                    Readiness::JetStream => jetstream_probe(client, probe).await,
                    _ => match tokio::time::timeout(probe, client.flush()).await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(err)) => Err(format!("flush: {err}")),
                        Err(_) => Err("flush timed out".to_owned()),
                    },
                };
                match outcome {
                    Ok(()) => return Ok(port),
                    Err(reason) => last = reason,
                }
            }
        }

        if Instant::now() >= deadline {
            return Err(WaitError::TimedOut(last));
        }
        tokio::time::sleep(POLL).await;
    }
}

fn read_ports_file(dir: &Path, pid: u32) -> Result<u16, String> {
    let suffix = format!("_{pid}.ports");
    let entries = std::fs::read_dir(dir).map_err(|err| format!("reading {}: {err}", dir.display()))?;
    let path = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.ends_with(&suffix))
        })
        .ok_or_else(|| format!("no *{suffix} file in {} yet", dir.display()))?;
    // The file may be caught half-written: a parse error just means "not yet".
    let text = std::fs::read_to_string(&path).map_err(|err| format!("{}: {err}", path.display()))?;
    let ports: serde_json::Value = serde_json::from_str(&text).map_err(|err| format!("{}: {err}", path.display()))?;
    ports["nats"][0]
        .as_str()
        .and_then(|url| url.rsplit(':').next())
        .and_then(|port| port.parse().ok())
        .ok_or_else(|| format!("{} has no client URL: {text}", path.display()))
}

async fn connect_probe(port: u16, timeout: Duration) -> Result<async_nats::Client, String> {
    let url = format!("nats://127.0.0.1:{port}");
    let connect = async_nats::ConnectOptions::new()
        .connection_timeout(timeout)
        .connect(&url);
    match tokio::time::timeout(timeout, connect).await {
        Ok(Ok(client)) => Ok(client),
        Ok(Err(err)) => Err(format!("connect to {url}: {err}")),
        Err(_) => Err(format!("connect to {url} timed out")),
    }
}

async fn jetstream_probe(client: &async_nats::Client, timeout: Duration) -> Result<(), String> {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(timeout);
    match tokio::time::timeout(timeout, js.query_account()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("JetStream account info: {err}")),
        Err(_) => Err("JetStream account info timed out".to_owned()),
    }
}

/// A JetStream cluster of `nats-server` processes on loopback, killed on drop.
///
/// Node `i` (0-based) is named `n{i+1}`, has its own client, cluster (route) and monitoring
/// ports and its own store directory; all of these survive a [`ClusterNode::restart`].
///
/// async-nats does not split a comma-separated URL into several servers (`"nats://a,nats://b"`
/// is parsed as one address), so there is no single-string URL: use [`urls`](Self::urls) (a
/// `Vec<String>` is accepted by `async_nats::connect`) or [`client`](Self::client).
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use natty_runtime::testing::NatsCluster;
///
/// let mut cluster = NatsCluster::start(3).await?;
/// let client = cluster.client().await;
/// cluster.node_mut(2).kill().await;
/// // ... the stream still takes publishes with two of three nodes ...
/// cluster.node_mut(2).restart().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
}

/// One node of a [`NatsCluster`].
#[derive(Debug)]
pub struct ClusterNode {
    name: String,
    cluster_port: u16,
    monitor_port: u16,
    server: NatsServer,
}

impl NatsCluster {
    /// Starts an `n`-node JetStream cluster and waits until every node reports healthy and
    /// JetStream answers on node 1 (which needs an elected meta leader).
    ///
    /// Ports are picked by binding `127.0.0.1:0` and releasing them, so another process may
    /// take one in between; the whole start is then tried once more.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for `n == 0`; otherwise when a node cannot be started or the cluster is
    /// not ready within 30 s, twice. The error quotes the failing node's log tail.
    pub async fn start(n: usize) -> io::Result<NatsCluster> {
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a cluster needs at least one node",
            ));
        }
        match Self::start_once(n).await {
            Ok(cluster) => Ok(cluster),
            Err(first) => {
                tracing::warn!(%first, "test cluster did not start; trying once more");
                Self::start_once(n).await.map_err(|second| {
                    io::Error::new(
                        second.kind(),
                        format!("{second}\n(an earlier attempt failed too: {first})"),
                    )
                })
            }
        }
    }

    async fn start_once(n: usize) -> io::Result<NatsCluster> {
        let ports = free_ports(3 * n)?;
        let client_port = |i: usize| ports[3 * i];
        let cluster_port = |i: usize| ports[3 * i + 1];
        let monitor_port = |i: usize| ports[3 * i + 2];

        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let dir = tempfile::Builder::new()
                .prefix(&format!("natty-nats-{name}-"))
                .tempdir()?;
            let routes = (0..n)
                .filter(|&j| j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", cluster_port(j)))
                .collect::<Vec<_>>()
                .join(", ");
            // Every node carries the tag `natty-test`, and `node:<name>` of its own, so that
            // tests can declare placements that all, one or none of the servers satisfy.
            let config = format!(
                "server_name: {name}\n\
                 server_tags: [\"natty-test\", \"node:{name}\"]\n\
                 listen: 127.0.0.1:{client}\n\
                 http: 127.0.0.1:{monitor}\n\
                 jetstream {{\n  store_dir: {store}\n}}\n\
                 cluster {{\n  name: natty-test\n  listen: 127.0.0.1:{cluster}\n  routes: [{routes}]\n}}\n",
                client = client_port(i),
                monitor = monitor_port(i),
                cluster = cluster_port(i),
                store = quoted(dir.path()),
            );
            // JetStream comes from the config's block, which names the store: nats-server
            // refuses `-sd` next to a config `store_dir` ("Duplicate 'store_dir'"). Wait only
            // for TCP here: a node's JetStream cannot answer until a quorum of nodes is up.
            let server = NatsServer::builder()
                .config(config)
                .jetstream(false)
                .port(client_port(i))
                .ready_check(false)
                .with_dir(dir)
                .start()
                .await?;
            nodes.push(ClusterNode {
                name,
                cluster_port: cluster_port(i),
                monitor_port: monitor_port(i),
                server,
            });
        }

        let cluster = NatsCluster { nodes };
        cluster.wait_ready(Instant::now() + CLUSTER_DEADLINE).await?;
        Ok(cluster)
    }

    /// Waits until every node is healthy, JetStream answers on node 1, and every existing stream
    /// has a leader. The last matters after [`restart_all`](Self::restart_all): `/healthz` and
    /// account info are fine seconds before the streams' own elections finish.
    async fn wait_ready(&self, deadline: Instant) -> io::Result<()> {
        for node in &self.nodes {
            node.wait_healthy(deadline).await?;
        }
        let first = &self.nodes[0];
        let mut client = None;
        loop {
            let probe = deadline
                .saturating_duration_since(Instant::now())
                .clamp(POLL, PROBE_TIMEOUT);
            let reason = match &client {
                None => match connect_probe(first.port(), probe).await {
                    Ok(connected) => {
                        client = Some(connected);
                        continue;
                    }
                    Err(reason) => reason,
                },
                Some(connected) => match jetstream_probe(connected, probe).await {
                    Ok(()) => match streams_have_leaders(connected, probe).await {
                        Ok(()) => return Ok(()),
                        Err(reason) => reason,
                    },
                    Err(reason) => reason,
                },
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "test cluster JetStream is not ready on {} after {CLUSTER_DEADLINE:?}: \
                         {reason}; see the log in {}",
                        first.name,
                        first.server.log_file().display()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The client URLs of all nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(ClusterNode::url).collect()
    }

    /// Connects a client that knows every node, so it fails over when one is killed.
    ///
    /// # Panics
    ///
    /// When no node accepts the connection: this is a test helper.
    pub async fn client(&self) -> async_nats::Client {
        let urls = self.urls();
        async_nats::ConnectOptions::new()
            .connect(urls.as_slice())
            .await
            .unwrap_or_else(|err| panic!("cannot connect to the test cluster at {urls:?}: {err}"))
    }

    /// All nodes, in order.
    pub fn nodes(&self) -> &[ClusterNode] {
        &self.nodes
    }

    /// Node `i` (0-based; node 0 is `n1`).
    ///
    /// # Panics
    ///
    /// When `i` is out of range.
    pub fn node(&self, i: usize) -> &ClusterNode {
        &self.nodes[i]
    }

    /// Node `i` (0-based; node 0 is `n1`), to kill, restart or signal it.
    ///
    /// # Panics
    ///
    /// When `i` is out of range.
    pub fn node_mut(&mut self, i: usize) -> &mut ClusterNode {
        &mut self.nodes[i]
    }

    /// The node whose server name is `name` (`"n1"`...), e.g. a stream's leader as reported by
    /// stream info.
    pub fn node_named(&mut self, name: &str) -> Option<&mut ClusterNode> {
        self.nodes.iter_mut().find(|node| node.name == name)
    }

    /// Kills every node, then starts them all again and waits as [`start`](Self::start) does:
    /// the whole-cluster crash case, which restarting nodes one by one cannot cover because a
    /// lone node never becomes healthy without a quorum.
    ///
    /// # Errors
    ///
    /// When a node does not come back, or the cluster is not ready within 30 s.
    pub async fn restart_all(&mut self) -> io::Result<()> {
        for node in &mut self.nodes {
            node.kill().await;
        }
        for node in &mut self.nodes {
            node.server.restart().await?;
        }
        self.wait_ready(Instant::now() + CLUSTER_DEADLINE).await
    }
}

impl ClusterNode {
    /// The server name, `n1`..`nN`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The client URL, e.g. `nats://127.0.0.1:4222`.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.server.port()
    }

    /// The route port other nodes connect to.
    pub fn cluster_port(&self) -> u16 {
        self.cluster_port
    }

    /// The HTTP monitoring port (`/healthz`, `/jsz`, `/varz`...).
    pub fn monitor_port(&self) -> u16 {
        self.monitor_port
    }

    /// The process id of the running node, or of the last one if it has been killed.
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// The node's directory (store in `jetstream/`, log, config).
    pub fn store_dir(&self) -> &Path {
        self.server.store_dir()
    }

    /// The node as a single server.
    pub fn server(&self) -> &NatsServer {
        &self.server
    }

    /// Connects a client to this node only.
    ///
    /// # Panics
    ///
    /// When the connection fails: this is a test helper.
    pub async fn client(&self) -> async_nats::Client {
        self.server.client().await
    }

    /// Kills the node (SIGKILL) and waits for the process to exit.
    pub async fn kill(&mut self) {
        self.server.stop().await;
    }

    /// Kills the node if it runs, starts it again with the same ports and store, and waits
    /// until its `/healthz` says it has caught up with the cluster.
    ///
    /// # Errors
    ///
    /// When the node does not start within 10 s, or is not healthy within 30 s (it needs a
    /// quorum of the cluster running: after killing every node use
    /// [`NatsCluster::restart_all`]).
    pub async fn restart(&mut self) -> io::Result<()> {
        self.server.restart().await?;
        self.wait_healthy(Instant::now() + CLUSTER_DEADLINE).await
    }

    /// Sends the unix signal `sig` to the node; see [`NatsServer::signal`].
    ///
    /// # Panics
    ///
    /// When the node is stopped, or `kill` fails.
    pub fn signal(&self, sig: i32) {
        self.server.signal(sig);
    }

    /// Polls `/healthz` until it answers 200: the node is up, JetStream has a meta leader and
    /// this node's streams and consumers are current.
    async fn wait_healthy(&self, deadline: Instant) -> io::Result<()> {
        loop {
            let probe = deadline
                .saturating_duration_since(Instant::now())
                .clamp(POLL, PROBE_TIMEOUT);
            let reason = match tokio::time::timeout(probe, healthz(self.monitor_port)).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(reason)) => reason,
                Err(_) => "/healthz timed out".to_owned(),
            };
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "test cluster node {} is not healthy: {reason}; see the log in {}",
                        self.name,
                        self.server.log_file().display()
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// Whether every stream of the account has an elected leader (stream info is answered by the
/// leader, and names it).
async fn streams_have_leaders(client: &async_nats::Client, timeout: Duration) -> Result<(), String> {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(timeout);
    let names: serde_json::Value = js
        .request("STREAM.NAMES", &serde_json::json!({}))
        .await
        .map_err(|err| format!("listing streams: {err}"))?;
    if let Some(error) = names.get("error") {
        return Err(format!("listing streams: {error}"));
    }
    let names = names["streams"].as_array().cloned().unwrap_or_default();
    for name in names.iter().filter_map(|name| name.as_str()) {
        let mut stream = js
            .get_stream(name)
            .await
            .map_err(|err| format!("stream {name}: {err}"))?;
        let info = stream
            .info()
            .await
            .map_err(|err| format!("stream {name} info: {err}"))?;
        let led = info
            .cluster
            .as_ref()
            .and_then(|cluster| cluster.leader.as_deref())
            .is_some_and(|leader| !leader.is_empty());
        if !led {
            return Err(format!("stream {name} has no leader yet"));
        }
    }
    Ok(())
}

/// One `GET /healthz` on the monitoring port; `Err` carries the answer for the error message.
async fn healthz(port: u16) -> Result<(), String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|err| format!("monitoring port {port}: {err}"))?;
    // HTTP/1.0 so the server closes the connection after answering and read_to_end returns.
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .map_err(|err| format!("monitoring port {port}: {err}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|err| format!("monitoring port {port}: {err}"))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    if status_line.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        Err(format!("/healthz: {status_line} {body}"))
    }
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
}
