//! Starting a nats-server process and waiting until it is ready: listening, JetStream up.

use super::*;

/// What "ready" means for one server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Readiness {
    /// The ports file is written and the client port accepts TCP connections.
    Tcp,
    /// And a plain client connects and round-trips a flush.
    Client,
    /// And JetStream answers an account info request.
    JetStream,
}

/// Everything needed to start the same server again.
#[derive(Debug, Clone)]
pub(super) struct Launch {
    pub(super) binary: PathBuf,
    pub(super) jetstream: bool,
    pub(super) config: Option<PathBuf>,
    pub(super) args: Vec<String>,
    pub(super) readiness: Readiness,
}

/// Why a start attempt failed.
pub(super) enum WaitError {
    Exited(ExitStatus),
    TimedOut(String),
    Io(io::Error),
}

impl Launch {
    /// Starts the server and waits until it is ready; returns the child, its pid and its port.
    pub(super) async fn run(&self, dir: &Path, port: Option<u16>, deadline: Instant) -> io::Result<(Child, u32, u16)> {
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

    pub(super) fn spawn(&self, dir: &Path, port: Option<u16>, log_path: &Path) -> io::Result<(Child, u32)> {
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

    pub(super) fn startup_error(&self, failure: WaitError, note: &str, log_path: &Path) -> io::Error {
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

/// Kills a server process and waits briefly (a SIGKILLed process goes in milliseconds) so its
/// directory is not removed under it; `kill_on_drop` and tokio's reaper cover anything left.
/// What the servers' `Drop` does.
pub(super) fn kill_and_reap(child: &mut Child) {
    if child.start_kill().is_err() {
        return;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The server's log from byte `from` on (empty when it cannot be read).
pub(super) fn read_log(path: &Path, from: u64) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(from).unwrap_or(usize::MAX).min(bytes.len());
    String::from_utf8_lossy(&bytes[from..]).into_owned()
}

/// Polls until the server is ready as `readiness` asks, it exits, or the deadline passes.
pub(super) async fn wait_ready(
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

pub(super) fn read_ports_file(dir: &Path, pid: u32) -> Result<u16, String> {
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

pub(super) async fn connect_probe(port: u16, timeout: Duration) -> Result<async_nats::Client, String> {
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

pub(super) async fn jetstream_probe(client: &async_nats::Client, timeout: Duration) -> Result<(), String> {
    let mut js = async_nats::jetstream::new(client.clone());
    js.set_timeout(timeout);
    match tokio::time::timeout(timeout, js.query_account()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(format!("JetStream account info: {err}")),
        Err(_) => Err("JetStream account info timed out".to_owned()),
    }
}
