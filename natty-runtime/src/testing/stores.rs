//! Real object stores for tests: a moto S3 server and Azurite (Azure Blob storage) on loopback,
//! each a child process with its own free port and temporary directory, killed on drop.
//!
//! The binaries are the pinned releases that `scripts/install-moto.sh` (PyPI `moto[server]`
//! 5.2.5, into `<workspace>/.natty/moto`) and `scripts/install-azurite.sh` (npm `azurite`
//! 3.37.0, into `<workspace>/.natty/azurite`) install; [`moto_server_binary`] and
//! [`azurite_binary`] find them. A server's output goes to a log file in its temporary
//! directory, and the tail of that log is part of the error when it fails to start.
//!
//! A process under test reaches a server through the variables of its `env()`; a test in this
//! process passes them to `BlockStore::open_with_env` rather than setting them process-wide,
//! which would leak into the tests running beside it.
//!
//! # Examples
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! use natty_runtime::testing::stores::{Azurite, MotoServer};
//!
//! let s3 = MotoServer::start().await?;
//! s3.create_bucket("archive").await?;
//! let azure = Azurite::start().await?;
//! azure.create_container("archive").await?;
//! let mut child = std::process::Command::new("my-capture-service");
//! child.envs(s3.env());
//! # Ok(())
//! # }
//! ```

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

use super::read_log;

/// Environment variable naming the `moto_server` binary to use, ahead of any other.
pub const MOTO_SERVER_ENV: &str = "NATTY_MOTO_SERVER";
/// Environment variable naming the `azurite-blob` binary to use, ahead of any other.
pub const AZURITE_ENV: &str = "NATTY_AZURITE";

/// The Azurite account every request uses (Azurite's well-known development account).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// The well-known, public key of [`AZURITE_ACCOUNT`].
pub const AZURITE_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The dummy credentials moto accepts (it checks no signature).
const MOTO_KEY_ID: &str = "testing";
const MOTO_SECRET: &str = "testing";
const MOTO_REGION: &str = "us-east-1";

/// How long a server gets to answer HTTP. Generous: a cold Python or Node start on a busy
/// 2-core CI machine takes seconds.
const START_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of the readiness loop.
const POLL: Duration = Duration::from_millis(50);
/// Upper bound on one HTTP request of the harness (probes, bucket and container creation).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long Azurite gets to save its data and exit after SIGTERM.
const GRACEFUL_STOP: Duration = Duration::from_secs(10);
/// Lines of the server log quoted in a startup error.
const LOG_TAIL_LINES: usize = 40;

/// Finds the `moto_server` binary.
///
/// In order: the path in `NATTY_MOTO_SERVER`; `.natty/moto/bin/moto_server` in this crate's
/// directory or any directory above it, then in the current directory or any above it.
///
/// # Errors
///
/// `NotFound` when none exists, saying how to install it.
pub fn moto_server_binary() -> io::Result<PathBuf> {
    locate(
        MOTO_SERVER_ENV,
        ".natty/moto/bin/moto_server",
        "run `scripts/install-moto.sh` from the workspace root to install moto[server]==5.2.5 into \
         .natty/moto, or set NATTY_MOTO_SERVER to a moto_server binary",
    )
}

/// Finds the `azurite-blob` binary (a Node.js script: `node` must be on `PATH`).
///
/// In order: the path in `NATTY_AZURITE`; `.natty/azurite/node_modules/.bin/azurite-blob` in
/// this crate's directory or any directory above it, then in the current directory or any above.
///
/// # Errors
///
/// `NotFound` when none exists, saying how to install it.
pub fn azurite_binary() -> io::Result<PathBuf> {
    locate(
        AZURITE_ENV,
        ".natty/azurite/node_modules/.bin/azurite-blob",
        "run `scripts/install-azurite.sh` from the workspace root to install azurite@3.37.0 into \
         .natty/azurite, or set NATTY_AZURITE to an azurite-blob binary",
    )
}

fn locate(env_var: &str, relative: &str, hint: &str) -> io::Result<PathBuf> {
    if let Some(explicit) = std::env::var_os(env_var).filter(|value| !value.is_empty()) {
        let path = PathBuf::from(explicit);
        if path.is_file() {
            return Ok(path);
        }
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("{env_var}={} does not exist; {hint}", path.display()),
        ));
    }
    // The manifest dir finds the workspace's install from any test of this crate; the current
    // dir covers a crate outside this workspace that installed its own copy.
    let roots = std::iter::once(PathBuf::from(env!("CARGO_MANIFEST_DIR"))).chain(std::env::current_dir().ok());
    for root in roots {
        if let Some(found) = root
            .ancestors()
            .map(|dir| dir.join(relative))
            .find(|path| path.is_file())
        {
            return Ok(found);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "no {relative} found above {} or the current directory; {hint}",
            env!("CARGO_MANIFEST_DIR")
        ),
    ))
}

/// moto's S3 server (`moto_server`) on `127.0.0.1`, killed on drop.
///
/// moto keeps everything in memory: a [`restart`](Self::restart) comes back on the same port
/// with no buckets and no objects, like a store that lost its data. Buckets are created with
/// [`create_bucket`](Self::create_bucket); moto accepts any credentials.
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use natty_runtime::testing::stores::MotoServer;
///
/// let mut s3 = MotoServer::start().await?;
/// s3.create_bucket("archive").await?;
/// let endpoint = s3.endpoint();
/// s3.restart().await?; // same endpoint, no buckets
/// assert_eq!(s3.endpoint(), endpoint);
/// s3.create_bucket("archive").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct MotoServer {
    server: Server,
}

impl MotoServer {
    /// Starts moto on a free port and waits until it answers HTTP.
    ///
    /// # Errors
    ///
    /// When the binary cannot be found (see [`moto_server_binary`]), the server exits, or it
    /// does not answer within 30 s; the error then quotes the tail of its log.
    pub async fn start() -> io::Result<MotoServer> {
        let server = Server::start(Kind::Moto, moto_server_binary()?).await?;
        Ok(MotoServer { server })
    }

    /// The S3 endpoint, e.g. `http://127.0.0.1:40123`. It stays the same across restarts.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// The port. It stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The log file collecting the server's output across restarts.
    pub fn log_file(&self) -> PathBuf {
        self.server.log_file()
    }

    /// The variables a process needs to reach this server as S3: `AWS_ENDPOINT_URL`,
    /// `AWS_ALLOW_HTTP=true`, dummy `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, and
    /// `AWS_REGION=us-east-1`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_ACCESS_KEY_ID", MOTO_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET.to_owned()),
            ("AWS_REGION", MOTO_REGION.to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// Creates a bucket. Does nothing if it exists already.
    ///
    /// # Errors
    ///
    /// When the request fails or moto refuses it (the error quotes its answer).
    pub async fn create_bucket(&self, name: &str) -> io::Result<()> {
        // moto does not check signatures, so a bare PUT creates the bucket.
        let path = format!("/{name}");
        let (status, body) = http_request(self.server.port, "PUT", &path, &[], REQUEST_TIMEOUT)
            .await
            .map_err(io::Error::other)?;
        if status == 200 {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "moto at {} refused to create bucket {name:?}: HTTP {status}: {body}",
                self.endpoint()
            )))
        }
    }

    /// Kills the server (SIGKILL) and waits for it to exit; its buckets are gone. Does nothing
    /// if it is already stopped.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }

    /// Kills the server and starts it again on the same port, waiting until it answers. moto
    /// keeps its state in memory, so the restarted server has no buckets.
    ///
    /// # Errors
    ///
    /// When it does not come back within 30 s; the error quotes the log tail.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.server.restart().await
    }

    /// A client for `bucket` on this server, to read back what the code under test wrote.
    ///
    /// # Panics
    ///
    /// When object_store refuses the configuration, which would be a bug of this harness.
    #[cfg(feature = "capture")]
    pub fn store(&self, bucket: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        install_crypto_provider();
        let store = object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id(MOTO_KEY_ID)
            .with_secret_access_key(MOTO_SECRET)
            .with_region(MOTO_REGION)
            .with_bucket_name(bucket)
            .build()
            .unwrap_or_else(|err| panic!("an S3 client for moto at {}: {err}", self.endpoint()));
        std::sync::Arc::new(store)
    }
}

/// Azurite's Blob service (`azurite-blob`) on `127.0.0.1`, killed on drop.
///
/// Its data lives in its temporary directory, so a [`restart`](Self::restart) keeps the
/// containers and blobs. Every request uses the well-known account [`AZURITE_ACCOUNT`] with
/// path-style URLs: `http://127.0.0.1:<port>/devstoreaccount1/<container>/<blob>`.
///
/// # Examples
///
/// ```no_run
/// # async fn example() -> std::io::Result<()> {
/// use natty_runtime::testing::stores::Azurite;
///
/// let azure = Azurite::start().await?;
/// azure.create_container("archive").await?;
/// let vars = azure.env();
/// assert!(vars.iter().any(|(name, value)| name == "AZURITE_BLOB_STORAGE_URL" && *value == azure.endpoint()));
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct Azurite {
    server: Server,
}

impl Azurite {
    /// Starts Azurite's Blob service on a free port and waits until it answers HTTP.
    ///
    /// # Errors
    ///
    /// When the binary cannot be found (see [`azurite_binary`]), the server exits, or it does
    /// not answer within 30 s; the error then quotes the tail of its log.
    pub async fn start() -> io::Result<Azurite> {
        let server = Server::start(Kind::Azurite, azurite_binary()?).await?;
        Ok(Azurite { server })
    }

    /// The Blob service URL without the account, e.g. `http://127.0.0.1:40124`, as
    /// `AZURITE_BLOB_STORAGE_URL` wants it. It stays the same across restarts.
    pub fn endpoint(&self) -> String {
        self.server.endpoint()
    }

    /// The port. It stays the same across restarts.
    pub fn port(&self) -> u16 {
        self.server.port
    }

    /// The log file collecting the server's output across restarts.
    pub fn log_file(&self) -> PathBuf {
        self.server.log_file()
    }

    /// The variables a process needs to reach this server through `object_store`'s emulator
    /// mode: `AZURE_STORAGE_USE_EMULATOR=true`, `AZURITE_BLOB_STORAGE_URL`, and the well-known
    /// `AZURE_STORAGE_ACCOUNT_NAME` / `AZURE_STORAGE_ACCOUNT_KEY`.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AZURE_STORAGE_USE_EMULATOR", "true".to_owned()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
            ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT.to_owned()),
            ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_ACCOUNT_KEY.to_owned()),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_owned(), value))
        .collect()
    }

    /// Creates a container (3 to 63 lowercase letters, digits and `-`). Does nothing if it
    /// exists already.
    ///
    /// # Errors
    ///
    /// When the request fails or Azurite refuses it (the error quotes its answer).
    pub async fn create_container(&self, name: &str) -> io::Result<()> {
        let path = format!("/{AZURITE_ACCOUNT}/{name}?restype=container");
        let date = http_date(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
        );
        let version = "2021-12-02";
        // Shared Key: the verb, eleven standard headers that are all empty here (a zero
        // Content-Length is signed as empty), the x-ms- headers sorted, then the resource:
        // `/<account><URL path>` and each query parameter as `\nname:value`.
        let string_to_sign = format!(
            "PUT{}x-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container",
            "\n".repeat(12)
        );
        let authorization = format!("SharedKey {AZURITE_ACCOUNT}:{}", shared_key_signature(&string_to_sign)?);
        let headers = [
            ("x-ms-date", date),
            ("x-ms-version", version.to_owned()),
            ("Authorization", authorization),
        ];
        let (status, body) = http_request(self.server.port, "PUT", &path, &headers, REQUEST_TIMEOUT)
            .await
            .map_err(io::Error::other)?;
        match status {
            201 => Ok(()),
            409 if body.contains("ContainerAlreadyExists") => Ok(()),
            _ => Err(io::Error::other(format!(
                "Azurite at {} refused to create container {name:?}: HTTP {status}: {body}",
                self.endpoint()
            ))),
        }
    }

    /// Stops the server and waits for it to exit. Does nothing if it is already stopped.
    ///
    /// It gets a SIGTERM, on which Azurite saves its metadata, and a SIGKILL only if it is
    /// still running 10 s later: Azurite saves metadata every 5 s otherwise, so a SIGKILL would
    /// lose the containers and blobs of the last few seconds.
    pub async fn stop(&mut self) {
        self.server.stop().await;
    }

    /// Stops the server as [`stop`](Self::stop) does and starts it again on the same port with
    /// the same data directory, waiting until it answers; containers and blobs are kept.
    ///
    /// # Errors
    ///
    /// When it does not come back within 30 s; the error quotes the log tail.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.server.restart().await
    }

    /// A client for `container` on this server, to read back what the code under test wrote.
    ///
    /// Built as a plain account whose endpoint is `<endpoint>/devstoreaccount1`: object_store's
    /// own emulator mode would read the URL from the process environment.
    ///
    /// # Panics
    ///
    /// When object_store refuses the configuration, which would be a bug of this harness.
    #[cfg(feature = "capture")]
    pub fn store(&self, container: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        install_crypto_provider();
        let store = object_store::azure::MicrosoftAzureBuilder::new()
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_ACCOUNT_KEY)
            .with_endpoint(format!("{}/{AZURITE_ACCOUNT}", self.endpoint()))
            .with_allow_http(true)
            .with_container_name(container)
            .build()
            .unwrap_or_else(|err| panic!("an Azure client for Azurite at {}: {err}", self.endpoint()));
        std::sync::Arc::new(store)
    }
}

/// reqwest is built without a default TLS provider and panics building a client without one.
#[cfg(feature = "capture")]
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// base64 of HMAC-SHA256 of `string_to_sign` under the decoded account key.
fn shared_key_signature(string_to_sign: &str) -> io::Result<String> {
    use base64::Engine as _;
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine
        .decode(AZURITE_ACCOUNT_KEY)
        .map_err(|err| io::Error::other(format!("the Azurite account key is not base64: {err}")))?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &key);
    Ok(engine.encode(ring::hmac::sign(&key, string_to_sign.as_bytes()).as_ref()))
}

/// An HTTP date (RFC 7231 IMF-fixdate), e.g. `Mon, 23 Nov 2026 10:56:31 GMT`.
fn http_date(secs: u64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"]; // 1970-01-01 was a Thursday
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let (year, month, day) = civil_from_days(days);
    let of_day = secs % 86_400;
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        of_day / 3_600,
        of_day % 3_600 / 60,
        of_day % 60
    )
}

/// Howard Hinnant's `civil_from_days` for days since 1970-01-01. A copy of the one in
/// `capture::store`, because this module is compiled without the `capture` feature too.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + u64::from(month <= 2), month, day)
}

/// Which server a [`Server`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Moto,
    Azurite,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Moto => "moto_server",
            Kind::Azurite => "azurite-blob",
        }
    }

    fn log_name(self) -> &'static str {
        match self {
            Kind::Moto => "moto.log",
            Kind::Azurite => "azurite.log",
        }
    }

    fn args(self, port: u16, dir: &Path) -> Vec<std::ffi::OsString> {
        let port = port.to_string();
        match self {
            Kind::Moto => vec!["-H".into(), "127.0.0.1".into(), "-p".into(), port.into()],
            Kind::Azurite => vec![
                "--blobHost".into(),
                "127.0.0.1".into(),
                "--blobPort".into(),
                port.into(),
                "--location".into(),
                dir.join("data").into_os_string(),
                // Any client API version, lenient about headers it does not know, no access
                // log on stdout, and no attempt to send telemetry off the machine.
                "--skipApiVersionCheck".into(),
                "--loose".into(),
                "--silent".into(),
                "--disableTelemetry".into(),
            ],
        }
    }
}

/// Why one start attempt failed.
enum WaitError {
    Exited(ExitStatus),
    TimedOut(String),
    Io(io::Error),
}

/// A server child process on a fixed port with its temporary directory.
#[derive(Debug)]
struct Server {
    kind: Kind,
    binary: PathBuf,
    dir: TempDir,
    port: u16,
    /// `None` once stopped.
    child: Option<Child>,
    pid: u32,
}

impl Server {
    async fn start(kind: Kind, binary: PathBuf) -> io::Result<Server> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("natty-{}-", kind.name()))
            .tempdir()?;
        let mut server = Server {
            kind,
            binary,
            dir,
            port: 0,
            child: None,
            pid: 0,
        };
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            // The port is free when picked but released before the server binds it, so another
            // process may take it in between: then the server exits and a new port is tried.
            server.port = free_port()?;
            match server.launch(deadline).await {
                Ok(()) => return Ok(server),
                Err((failure, log_start)) => {
                    if !server.lost_port(&failure, log_start, deadline) {
                        return Err(server.startup_error(failure));
                    }
                }
            }
        }
    }

    async fn restart(&mut self) -> io::Result<()> {
        self.stop().await;
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            match self.launch(deadline).await {
                Ok(()) => return Ok(()),
                // The port may still be held briefly after the kill: try the same one again.
                Err((failure, log_start)) => {
                    if !self.lost_port(&failure, log_start, deadline) {
                        return Err(self.startup_error(failure));
                    }
                    tokio::time::sleep(POLL).await;
                }
            }
        }
    }

    /// Stops the server: moto with SIGKILL (it has nothing to save); Azurite with SIGTERM,
    /// so that it saves its metadata (it otherwise saves every 5 s, and a SIGKILL loses what
    /// changed since), falling back to SIGKILL if it has not exited within 10 s.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if self.kind == Kind::Azurite {
            // `kill(1)` rather than libc: the workspace denies unsafe code.
            let sent = std::process::Command::new("kill")
                .arg("-TERM")
                .arg(self.pid.to_string())
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if sent && matches!(tokio::time::timeout(GRACEFUL_STOP, child.wait()).await, Ok(Ok(_))) {
                return;
            }
            tracing::debug!(pid = self.pid, "azurite-blob did not stop on SIGTERM, killing it");
        }
        // An error means the process had already exited, which is what was asked for.
        if let Err(err) = child.kill().await {
            tracing::debug!(pid = self.pid, err = %crate::error::chain(&err), "{} had already exited", self.kind.name());
        }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log_file(&self) -> PathBuf {
        self.dir.path().join(self.kind.log_name())
    }

    /// Spawns the server on `self.port` and waits until it answers HTTP. On failure the child
    /// is killed, and the error comes with where this attempt's part of the log starts.
    async fn launch(&mut self, deadline: Instant) -> Result<(), (WaitError, u64)> {
        let log_path = self.log_file();
        let log_start = std::fs::metadata(&log_path).map_or(0, |meta| meta.len());
        let mut child = match self.spawn(&log_path) {
            Ok(child) => child,
            Err(err) => return Err((WaitError::Io(err), log_start)),
        };
        self.pid = child.id().unwrap_or(0);
        match wait_ready(&mut child, self.port, deadline).await {
            Ok(()) => {
                self.child = Some(child);
                Ok(())
            }
            Err(failure) => {
                if let Err(err) = child.kill().await {
                    tracing::debug!(pid = self.pid, err = %crate::error::chain(&err), "{} had already exited", self.kind.name());
                }
                Err((failure, log_start))
            }
        }
    }

    fn spawn(&self, log_path: &Path) -> io::Result<Child> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(log_path)?;
        Command::new(&self.binary)
            .args(self.kind.args(self.port, self.dir.path()))
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                let hint = match self.kind {
                    Kind::Moto => "scripts/install-moto.sh",
                    Kind::Azurite => "scripts/install-azurite.sh (it needs node on PATH)",
                };
                io::Error::new(
                    err.kind(),
                    format!("cannot run {}: {err}; reinstall with {hint}", self.binary.display()),
                )
            })
    }

    /// Whether the attempt failed because the port was taken, with time left to try again.
    fn lost_port(&self, failure: &WaitError, log_start: u64, deadline: Instant) -> bool {
        if !matches!(failure, WaitError::Exited(_)) || Instant::now() >= deadline {
            return false;
        }
        let log = read_log(&self.log_file(), log_start);
        // Python says "Address already in use", Node says "EADDRINUSE".
        log.contains("Address already in use") || log.contains("EADDRINUSE")
    }

    fn startup_error(&self, failure: WaitError) -> io::Error {
        let (kind, reason) = match failure {
            WaitError::Exited(status) => (io::ErrorKind::Other, format!("it exited with {status}")),
            WaitError::TimedOut(last) => (io::ErrorKind::TimedOut, format!("it did not answer in time ({last})")),
            WaitError::Io(err) => (err.kind(), format!("{err}")),
        };
        let log_path = self.log_file();
        let mut message = format!(
            "test {} {} on port {} did not start: {reason}\n--- last lines of {} ---\n",
            self.kind.name(),
            self.binary.display(),
            self.port,
            log_path.display()
        );
        let log = read_log(&log_path, 0);
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..] {
            let _ = writeln!(message, "{line}");
        }
        io::Error::new(kind, message)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            super::kill_and_reap(child);
        }
    }
}

/// Polls until the server answers any HTTP request on `port`, exits, or the deadline passes.
async fn wait_ready(child: &mut Child, port: u16, deadline: Instant) -> Result<(), WaitError> {
    loop {
        if let Some(status) = child.try_wait().map_err(WaitError::Io)? {
            return Err(WaitError::Exited(status));
        }
        let timeout = deadline
            .saturating_duration_since(Instant::now())
            .clamp(POLL, REQUEST_TIMEOUT);
        // Any HTTP answer will do, even an error status: the server is up and parsing requests.
        match http_request(port, "GET", "/", &[], timeout).await {
            Ok(_) => return Ok(()),
            Err(reason) if Instant::now() >= deadline => return Err(WaitError::TimedOut(reason)),
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// One HTTP/1.1 request without a body to `127.0.0.1:port`; returns the status and the body.
async fn http_request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    timeout: Duration,
) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|err| format!("connect to port {port}: {err}"))?;
        // `Connection: close` so the server ends the answer by closing and read_to_end returns.
        let mut request =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Length: 0\r\n");
        for (name, value) in headers {
            let _ = write!(request, "{name}: {value}\r\n");
        }
        request.push_str("\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|err| format!("{method} {path} on port {port}: {err}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|err| format!("{method} {path} on port {port}: {err}"))?;
        let answer = String::from_utf8_lossy(&answer);
        let status_line = answer.lines().next().unwrap_or_default();
        let status = status_line
            .strip_prefix("HTTP/")
            .and_then(|rest| rest.split_whitespace().nth(1))
            .and_then(|code| code.parse().ok())
            .ok_or_else(|| format!("{method} {path} on port {port}: not an HTTP answer: {status_line:?}"))?;
        let body = answer
            .split_once("\r\n\r\n")
            .map_or("", |(_, body)| body)
            .trim()
            .to_owned();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{method} {path} on port {port} timed out after {timeout:?}")))
}

/// A loopback port that was free a moment ago (the listener is closed before returning).
fn free_port() -> io::Result<u16> {
    TcpListener::bind("127.0.0.1:0")?.local_addr().map(|addr| addr.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        assert_eq!(http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(http_date(1_795_395_391), "Mon, 23 Nov 2026 00:56:31 GMT");
        assert_eq!(http_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 GMT");
    }

    #[test]
    fn shared_key_signature_matches_an_independent_one() {
        // Computed with Python's hmac and base64 modules from the same key and string.
        assert_eq!(
            shared_key_signature("GET\n").unwrap(),
            "/ZZsmidvu/o1IWuAI6fRY2fmdvnXEMtMILD8Y+sZWjA="
        );
    }
}
