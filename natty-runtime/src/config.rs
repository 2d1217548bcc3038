//! Configuration: read from the environment, overridable through [`crate::Runtime::builder`].
//!
//! Every setting, its variable, its builder method and its default are in one table, in the
//! guide's [configuration chapter](crate::guide::configuration).

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{Error, Result};

/// How `run()` treats declared streams and consumers at startup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Provision {
    /// Create what is missing and update what differs; a refused change is an error.
    #[default]
    CreateOrUpdate,
    /// Change nothing; a missing or different stream or consumer is an error.
    VerifyOnly,
    /// Neither create nor check; consumers must already exist.
    Off,
}

impl Provision {
    /// The name used in `NATTY_PROVISION` and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Provision::CreateOrUpdate => "create-or-update",
            Provision::VerifyOnly => "verify-only",
            Provision::Off => "off",
        }
    }
}

impl std::str::FromStr for Provision {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, String> {
        match text.trim().to_ascii_lowercase().replace('_', "-").as_str() {
            "create-or-update" | "create" | "update" => Ok(Provision::CreateOrUpdate),
            "verify-only" | "verify" => Ok(Provision::VerifyOnly),
            "off" | "none" => Ok(Provision::Off),
            _ => Err("expected create-or-update, verify-only or off".into()),
        }
    }
}

/// How to authenticate to the server. At most one method is used.
#[derive(Clone, Default)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// `user` and `password`.
    UserPassword {
        /// The user name.
        user: String,
        /// The password.
        password: String,
    },
    /// A token.
    Token(String),
    /// An nkey seed; the client signs the server's nonce with it.
    NKey(String),
    /// A `.creds` file holding a user JWT and its nkey seed.
    CredsFile(PathBuf),
}

impl std::fmt::Debug for Auth {
    // Secrets never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::None => write!(f, "none"),
            Auth::UserPassword { user, .. } => write!(f, "user {user:?} with password"),
            Auth::Token(_) => write!(f, "token"),
            Auth::NKey(_) => write!(f, "nkey"),
            Auth::CredsFile(path) => write!(f, "creds file {}", path.display()),
        }
    }
}

/// The console's token (`NATTY_CONSOLE_TOKEN`); shown as `ConsoleToken(..)`, never itself.
#[derive(Clone, PartialEq, Eq)]
pub struct ConsoleToken(String);

/// The shortest console token taken: one that can be guessed is no lock.
const MIN_CONSOLE_TOKEN: usize = 16;

impl ConsoleToken {
    /// A token of at least 16 characters, none of them whitespace or control characters.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming `NATTY_CONSOLE_TOKEN` otherwise (the token is not repeated).
    pub fn new(token: impl Into<String>) -> Result<ConsoleToken> {
        let token = token.into();
        if token.chars().count() < MIN_CONSOLE_TOKEN {
            return Err(Error::config(
                "NATTY_CONSOLE_TOKEN",
                "(hidden)",
                format!("expected at least {MIN_CONSOLE_TOKEN} characters, e.g. from `openssl rand -hex 16`"),
            ));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::config(
                "NATTY_CONSOLE_TOKEN",
                "(hidden)",
                "expected no spaces or control characters (it travels in an HTTP header)",
            ));
        }
        Ok(ConsoleToken(token))
    }

    /// The token itself.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ConsoleToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleToken(..)")
    }
}

/// TLS settings. Setting any file turns TLS on.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    /// PEM file with the CA certificates to trust.
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for mutual TLS.
    pub cert: Option<PathBuf>,
    /// PEM client key, for mutual TLS.
    pub key: Option<PathBuf>,
    /// Refuse to connect without TLS.
    pub required: bool,
}

/// Every setting the runtime reads. Build with [`Config::from_env`] or
/// [`crate::Runtime::builder`], which starts from the environment.
#[derive(Debug, Clone)]
pub struct Config {
    /// Server URL(s); `None` starts the development server.
    pub url: Option<String>,
    /// Authentication.
    pub auth: Auth,
    /// TLS.
    pub tls: Tls,
    /// The connection name shown by the server.
    pub name: String,
    /// Provisioning mode.
    pub provision: Provision,
    /// How long in-flight handlers may run after a shutdown signal before their messages are naked.
    pub drain_timeout: Duration,
    /// How long open capture blocks may take to be stored after a shutdown signal: separate from
    /// `drain_timeout`, because an upload is slower than a handler and must not be cut short by it.
    pub capture_drain_timeout: Duration,
    /// Timeout of one connection attempt.
    pub connect_timeout: Duration,
    /// How long startup waits for each consumed stream to have a leader (on a cluster, while
    /// its servers elect one) before failing.
    pub stream_leader_timeout: Duration,
    /// Port of the development server.
    pub dev_port: u16,
    /// Data folder of the development server.
    pub dev_dir: PathBuf,
    /// Explicit path of the `nats-server` binary.
    pub nats_server: Option<PathBuf>,
    /// Run only the registered handlers with these names.
    pub handlers: Option<Vec<String>>,
    /// Where to serve the console, `/metrics`, `/healthz` and `/readyz`; `None` serves nothing.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The console's token: needed to read it from anywhere but the machine it runs on, and
    /// for every action; `None` makes it read-only and loopback-only.
    pub console_token: Option<ConsoleToken>,
    /// How many times a capture's store retries one S3 or Azure request; `None` keeps
    /// `object_store`'s default (10).
    pub store_max_retries: Option<usize>,
    /// How long a capture's store retries one S3 or Azure request; `None` keeps
    /// `object_store`'s default (3 minutes).
    pub store_retry_timeout: Option<Duration>,
    /// The service's version: `info.version` of its AsyncAPI document; `None` says `0.0.0`
    /// (natty cannot see the application's crate version, only its own).
    pub service_version: Option<String>,
    /// How log lines are written. [`crate::run`] reads it before anything else, to set up
    /// logging, so the builder cannot change it there; a program that calls
    /// [`crate::init_logging`] itself gets the same.
    pub log_format: LogFormat,
}

/// How log lines are written on stderr (`NATTY_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// Reads `NATTY_LOG_FORMAT` as `lookup` gives it.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a value other than `text` or `json`.
    pub(crate) fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<LogFormat> {
        match lookup("NATTY_LOG_FORMAT").as_deref() {
            None | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(Error::config("NATTY_LOG_FORMAT", other, "expected `text` or `json`")),
        }
    }
}

/// An environment variable as natty reads its settings: unset and empty are the same.
pub(crate) fn env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|value| !value.is_empty())
}

/// The binary's file name: the default connection and service name.
pub(crate) fn default_name() -> String {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.file_stem().map(|stem| stem.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "natty".into())
}

impl Default for Config {
    fn default() -> Self {
        Config {
            url: None,
            auth: Auth::None,
            tls: Tls::default(),
            name: default_name(),
            provision: Provision::CreateOrUpdate,
            drain_timeout: Duration::from_secs(30),
            capture_drain_timeout: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(5),
            stream_leader_timeout: Duration::from_secs(30),
            dev_port: 4222,
            dev_dir: PathBuf::from(".natty/dev"),
            nats_server: None,
            handlers: None,
            metrics_addr: None,
            console_token: None,
            store_max_retries: None,
            store_retry_timeout: None,
            service_version: None,
            log_format: LogFormat::Text,
        }
    }
}

impl Config {
    /// Reads every variable in the table above.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] naming the variable whose value cannot be used, or when more than
    /// one authentication method is set.
    pub fn from_env() -> Result<Config> {
        Config::from_lookup(env)
    }

    /// Like [`Config::from_env`], reading through `lookup` (for tests and embedding). Every
    /// setting natty reads is read here, except the URL of each capture's store and the
    /// `AWS_*` / `AZURE_*` variables `object_store` reads when the store opens (they belong to
    /// the store, which may be prefixed per capture: see the `capture::store` module).
    ///
    /// # Errors
    ///
    /// As [`Config::from_env`].
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Config> {
        let mut config = Config {
            url: lookup("NATS_URL"),
            ..Config::default()
        };

        let mut methods = Vec::new();
        match (lookup("NATS_USER"), lookup("NATS_PASSWORD")) {
            (Some(user), Some(password)) => methods.push(("NATS_USER", Auth::UserPassword { user, password })),
            (Some(_), None) => {
                return Err(Error::config(
                    "NATS_PASSWORD",
                    "",
                    "NATS_USER is set but NATS_PASSWORD is not",
                ))
            }
            (None, Some(_)) => {
                return Err(Error::config(
                    "NATS_USER",
                    "",
                    "NATS_PASSWORD is set but NATS_USER is not",
                ))
            }
            (None, None) => {}
        }
        if let Some(token) = lookup("NATS_TOKEN") {
            methods.push(("NATS_TOKEN", Auth::Token(token)));
        }
        if let Some(seed) = lookup("NATS_NKEY") {
            methods.push(("NATS_NKEY", Auth::NKey(seed)));
        }
        if let Some(path) = lookup("NATS_CREDS") {
            methods.push(("NATS_CREDS", Auth::CredsFile(path.into())));
        }
        if methods.len() > 1 {
            let names: Vec<_> = methods.iter().map(|(name, _)| *name).collect();
            return Err(Error::config(
                names.join(" and "),
                "",
                "set at most one authentication method",
            ));
        }
        if let Some((_, auth)) = methods.pop() {
            config.auth = auth;
        }

        config.tls = Tls {
            ca: lookup("NATS_CA").map(PathBuf::from),
            cert: lookup("NATS_CERT").map(PathBuf::from),
            key: lookup("NATS_KEY").map(PathBuf::from),
            required: match lookup("NATS_TLS_REQUIRED") {
                Some(value) => parse_bool("NATS_TLS_REQUIRED", &value)?,
                None => false,
            },
        };
        if config.tls.cert.is_some() != config.tls.key.is_some() {
            return Err(Error::config(
                "NATS_CERT/NATS_KEY",
                "",
                "a client certificate needs both NATS_CERT and NATS_KEY",
            ));
        }

        if let Some(name) = lookup("NATTY_NAME") {
            config.name = name;
        }
        if let Some(mode) = lookup("NATTY_PROVISION") {
            config.provision = mode
                .parse()
                .map_err(|reason: String| Error::config("NATTY_PROVISION", &mode, reason))?;
        }
        if let Some(value) = lookup("NATTY_DRAIN_TIMEOUT") {
            config.drain_timeout = parse_duration("NATTY_DRAIN_TIMEOUT", &value)?;
        }
        if let Some(value) = lookup("NATTY_CAPTURE_DRAIN_TIMEOUT") {
            config.capture_drain_timeout = parse_duration("NATTY_CAPTURE_DRAIN_TIMEOUT", &value)?;
        }
        if let Some(value) = lookup("NATTY_CONNECT_TIMEOUT") {
            config.connect_timeout = parse_duration("NATTY_CONNECT_TIMEOUT", &value)?;
        }
        if let Some(value) = lookup("NATTY_STREAM_LEADER_TIMEOUT") {
            config.stream_leader_timeout = parse_duration("NATTY_STREAM_LEADER_TIMEOUT", &value)?;
        }
        if let Some(value) = lookup("NATTY_DEV_PORT") {
            config.dev_port = value
                .parse()
                .map_err(|_| Error::config("NATTY_DEV_PORT", &value, "expected a port number"))?;
        }
        if let Some(value) = lookup("NATTY_METRICS_ADDR") {
            config.metrics_addr = Some(value.parse().map_err(|_| {
                Error::config(
                    "NATTY_METRICS_ADDR",
                    &value,
                    "expected an address and port, e.g. 0.0.0.0:9090 or 127.0.0.1:0",
                )
            })?);
        }
        if let Some(value) = lookup("NATTY_CONSOLE_TOKEN") {
            config.console_token = Some(ConsoleToken::new(value)?);
        }
        if let Some(value) = lookup("NATTY_STORE_MAX_RETRIES") {
            config.store_max_retries = Some(value.trim().parse().map_err(|_| {
                Error::config(
                    "NATTY_STORE_MAX_RETRIES",
                    &value,
                    "expected a number of retries, e.g. 3",
                )
            })?);
        }
        if let Some(value) = lookup("NATTY_STORE_RETRY_TIMEOUT") {
            config.store_retry_timeout = Some(parse_duration("NATTY_STORE_RETRY_TIMEOUT", &value)?);
        }
        config.service_version = lookup("NATTY_SERVICE_VERSION").filter(|version| !version.trim().is_empty());
        config.log_format = LogFormat::from_lookup(&lookup)?;
        if let Some(value) = lookup("NATTY_DEV_DIR") {
            config.dev_dir = value.into();
        }
        config.nats_server = lookup("NATTY_NATS_SERVER").map(PathBuf::from);
        config.handlers = lookup("NATTY_HANDLERS").map(|names| {
            names
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(String::from)
                .collect()
        });
        Ok(config)
    }
}

/// Parses `"30s"`, `"500ms"`, `"2m"`; the error names the setting.
pub(crate) fn parse_duration(setting: &str, value: &str) -> Result<Duration> {
    humantime::parse_duration(value.trim()).map_err(|error| {
        Error::config(
            setting,
            value,
            format!("{error}; write e.g. \"500ms\", \"30s\", \"2m\""),
        )
    })
}

fn parse_bool(setting: &str, value: &str) -> Result<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Error::config(setting, value, "expected true or false")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(pairs: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Config::from_lookup(|key| map.get(key).cloned())
    }

    #[test]
    fn reads_settings_and_names_the_bad_one() {
        let config = from(&[
            ("NATS_URL", "nats://a:4222"),
            ("NATS_TOKEN", "s3cret"),
            ("NATTY_PROVISION", "verify-only"),
            ("NATTY_DRAIN_TIMEOUT", "2s"),
        ])
        .unwrap();
        assert_eq!(config.url.as_deref(), Some("nats://a:4222"));
        assert!(matches!(config.auth, Auth::Token(ref t) if t == "s3cret"));
        assert_eq!(config.provision, Provision::VerifyOnly);
        assert_eq!(config.drain_timeout, Duration::from_secs(2));
        assert!(!format!("{:?}", config.auth).contains("s3cret"));

        assert_eq!(config.service_version, None);
        assert_eq!(config.log_format, LogFormat::Text);
        let config = from(&[("NATTY_SERVICE_VERSION", "2.0.1"), ("NATTY_LOG_FORMAT", "json")]).unwrap();
        assert_eq!(config.service_version.as_deref(), Some("2.0.1"));
        assert_eq!(config.log_format, LogFormat::Json);
        let error = from(&[("NATTY_LOG_FORMAT", "xml")]).unwrap_err().to_string();
        assert!(error.contains("NATTY_LOG_FORMAT") && error.contains("xml"), "{error}");

        let config = from(&[("NATTY_STORE_MAX_RETRIES", "3"), ("NATTY_STORE_RETRY_TIMEOUT", "20s")]).unwrap();
        assert_eq!(config.store_max_retries, Some(3));
        assert_eq!(config.store_retry_timeout, Some(Duration::from_secs(20)));
        let error = from(&[("NATTY_STORE_MAX_RETRIES", "lots")]).unwrap_err().to_string();
        assert!(
            error.contains("NATTY_STORE_MAX_RETRIES") && error.contains("lots"),
            "{error}"
        );
        let error = from(&[("NATTY_STORE_RETRY_TIMEOUT", "soon")]).unwrap_err().to_string();
        assert!(error.contains("NATTY_STORE_RETRY_TIMEOUT"), "{error}");

        let error = from(&[("NATTY_DRAIN_TIMEOUT", "soon")]).unwrap_err().to_string();
        assert!(error.contains("NATTY_DRAIN_TIMEOUT"), "{error}");
        let error = from(&[("NATTY_PROVISION", "sometimes")]).unwrap_err().to_string();
        assert!(error.contains("NATTY_PROVISION"), "{error}");
        let error = from(&[("NATS_TOKEN", "a"), ("NATS_NKEY", "b")])
            .unwrap_err()
            .to_string();
        assert!(error.contains("at most one"), "{error}");
        let error = from(&[("NATS_USER", "a")]).unwrap_err().to_string();
        assert!(error.contains("NATS_PASSWORD"), "{error}");
    }

    /// Every setting the environment gives can be set through the builder, which wins.
    #[test]
    fn the_builder_overrides_every_setting() {
        let runtime = crate::Runtime::builder()
            .config(from(&[("NATTY_STORE_MAX_RETRIES", "3"), ("NATTY_DEV_PORT", "4999")]).unwrap())
            .without_registered()
            .url("nats://b:4222")
            .name("svc")
            .provision(Provision::Off)
            .drain_timeout(Duration::from_secs(1))
            .capture_drain_timeout(Duration::from_secs(2))
            .connect_timeout(Duration::from_secs(3))
            .stream_leader_timeout(Duration::from_secs(4))
            .store_max_retries(5)
            .store_retry_timeout(Duration::from_secs(6))
            .service_version("1.2.3")
            .dev_port(4333)
            .dev_dir("/tmp/natty-dev")
            .nats_server("/opt/nats-server")
            .tls_required(true)
            .configure(|config| config.name.push_str("-1"))
            .build()
            .unwrap();
        let config = runtime.config();
        assert_eq!(config.url.as_deref(), Some("nats://b:4222"));
        assert_eq!(config.name, "svc-1", "overrides apply in order");
        assert_eq!(config.provision, Provision::Off);
        assert_eq!(config.drain_timeout, Duration::from_secs(1));
        assert_eq!(config.capture_drain_timeout, Duration::from_secs(2));
        assert_eq!(config.connect_timeout, Duration::from_secs(3));
        assert_eq!(config.stream_leader_timeout, Duration::from_secs(4));
        assert_eq!(config.store_max_retries, Some(5));
        assert_eq!(config.store_retry_timeout, Some(Duration::from_secs(6)));
        assert_eq!(config.service_version.as_deref(), Some("1.2.3"));
        assert_eq!(config.dev_port, 4333);
        assert_eq!(config.dev_dir, PathBuf::from("/tmp/natty-dev"));
        assert_eq!(config.nats_server, Some(PathBuf::from("/opt/nats-server")));
        assert!(config.tls.required);
    }

    /// The guide's table lists every variable `from_lookup` reads: the one table stays whole.
    #[test]
    fn the_guide_lists_every_setting() {
        let asked = std::sync::Mutex::new(Vec::new());
        let _ = Config::from_lookup(|name| {
            asked.lock().unwrap().push(name.to_owned());
            None
        });
        let table = include_str!("guide/configuration.md");
        let asked = asked.into_inner().unwrap();
        assert!(asked.len() >= 20, "{asked:?}");
        for name in asked {
            assert!(
                table.contains(&format!("`{name}`")),
                "{name} is missing from guide/configuration.md"
            );
        }
    }
}
