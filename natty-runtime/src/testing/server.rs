//! One nats-server for a test: started on free ports with its own store, restarted, killed on drop.

use super::*;

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
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
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

    pub(super) fn with_dir(mut self, dir: TempDir) -> Self {
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
