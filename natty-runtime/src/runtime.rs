//! The runtime: collects what was registered, connects, provisions, runs every handler
//! supervised, and drains on shutdown.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::classify::{patiently, transient};
use crate::config::{Auth, Config, Provision};
use crate::consumer::{Consumer, ConsumerDef, DEAD_LETTER_STREAM};
use crate::error::{Error, Result};
use crate::kv::KvBucketDef;
use crate::kv_watch::KvWatchDef;
use crate::leader::LeaderDef;
use crate::object_store::ObjectStoreDef;
use crate::publish::Client;
use crate::registry::Declarations;
use crate::state::States;
use crate::stream::StreamDef;
use crate::subscribe::SubscriptionDef;
use crate::supervise::{Supervisor, Task};
use crate::telemetry::http::Endpoint;
use crate::telemetry::Telemetry;
use tokio_util::sync::CancellationToken;

/// Builds a [`Runtime`]: the environment's settings, overridden by what is set here, plus
/// handlers registered by the macros and any added by hand.
///
/// # Examples
///
/// ```no_run
/// # async fn demo() -> natty_runtime::Result<()> {
/// use natty_runtime::{Provision, Runtime};
/// use std::time::Duration;
/// Runtime::builder()
///     .url("nats://127.0.0.1:4222")
///     .provision(Provision::VerifyOnly)
///     .drain_timeout(Duration::from_secs(10))
///     .build()?
///     .run()
///     .await
/// # }
/// ```
#[derive(Default)]
#[must_use]
pub struct RuntimeBuilder {
    config: Option<Config>,
    /// The settings given here, applied in order over the environment's (or `config`).
    overrides: Vec<Override>,
    metrics_listener: Option<std::net::TcpListener>,
    registered: bool,
    only: Option<Vec<String>>,
    /// What was added by hand.
    declared: Declarations,
    /// The application state handlers take as `State<T>`.
    states: States,
}

/// One setting given to the builder.
type Override = Box<dyn FnOnce(&mut Config) + Send>;

impl std::fmt::Debug for RuntimeBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeBuilder")
            .field("config", &self.config)
            .field("overrides", &self.overrides.len())
            .field("metrics_listener", &self.metrics_listener)
            .field("registered", &self.registered)
            .field("only", &self.only)
            .field("declared", &self.declared)
            .field("states", &self.states)
            .finish()
    }
}

impl RuntimeBuilder {
    /// Starts from `config` instead of reading the environment.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Sets anything in the [`Config`], for settings without a method of their own.
    ///
    /// ```
    /// let runtime = natty_runtime::Runtime::builder()
    ///     .configure(|config| config.dev_port = 4333)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(runtime.config().dev_port, 4333);
    /// ```
    pub fn configure(mut self, change: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.overrides.push(Box::new(change));
        self
    }

    /// Server URL(s), comma-separated. Overrides `NATS_URL`.
    pub fn url(self, url: impl Into<String>) -> Self {
        let url = url.into();
        self.configure(move |config| config.url = Some(url))
    }

    /// Authentication. Overrides the `NATS_*` credentials.
    pub fn auth(self, auth: Auth) -> Self {
        self.configure(move |config| config.auth = auth)
    }

    /// CA certificates to trust (PEM); turns TLS on. Overrides `NATS_CA`.
    pub fn tls_ca(self, ca: impl Into<PathBuf>) -> Self {
        let ca = ca.into();
        self.configure(move |config| config.tls.ca = Some(ca))
    }

    /// Client certificate and key (PEM), for mutual TLS. Overrides `NATS_CERT` and `NATS_KEY`.
    pub fn tls_client_cert(self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        let (cert, key) = (cert.into(), key.into());
        self.configure(move |config| {
            config.tls.cert = Some(cert);
            config.tls.key = Some(key);
        })
    }

    /// Refuses a plain-text connection. Overrides `NATS_TLS_REQUIRED`.
    pub fn tls_required(self, required: bool) -> Self {
        self.configure(move |config| config.tls.required = required)
    }

    /// The console's token. Overrides `NATTY_CONSOLE_TOKEN`.
    pub fn console_token(self, token: crate::config::ConsoleToken) -> Self {
        self.configure(move |config| config.console_token = Some(token))
    }

    /// The connection name the server shows. Overrides `NATTY_NAME`.
    pub fn name(self, name: impl Into<String>) -> Self {
        let name = name.into();
        self.configure(move |config| config.name = name)
    }

    /// The provisioning mode. Overrides `NATTY_PROVISION`.
    pub fn provision(self, provision: Provision) -> Self {
        self.configure(move |config| config.provision = provision)
    }

    /// How long in-flight handlers may run after shutdown starts. Overrides `NATTY_DRAIN_TIMEOUT`.
    pub fn drain_timeout(self, timeout: Duration) -> Self {
        self.configure(move |config| config.drain_timeout = timeout)
    }

    /// How long open capture blocks may take to be stored after shutdown starts. Overrides
    /// `NATTY_CAPTURE_DRAIN_TIMEOUT`.
    pub fn capture_drain_timeout(self, timeout: Duration) -> Self {
        self.configure(move |config| config.capture_drain_timeout = timeout)
    }

    /// How long startup waits for each consumed stream to have a leader. Overrides
    /// `NATTY_STREAM_LEADER_TIMEOUT`.
    pub fn stream_leader_timeout(self, timeout: Duration) -> Self {
        self.configure(move |config| config.stream_leader_timeout = timeout)
    }

    /// Timeout of one connection attempt. Overrides `NATTY_CONNECT_TIMEOUT`.
    pub fn connect_timeout(self, timeout: Duration) -> Self {
        self.configure(move |config| config.connect_timeout = timeout)
    }

    /// How many times a capture's store retries one S3 or Azure request. Overrides
    /// `NATTY_STORE_MAX_RETRIES`.
    pub fn store_max_retries(self, retries: usize) -> Self {
        self.configure(move |config| config.store_max_retries = Some(retries))
    }

    /// How long a capture's store retries one S3 or Azure request. Overrides
    /// `NATTY_STORE_RETRY_TIMEOUT`.
    pub fn store_retry_timeout(self, timeout: Duration) -> Self {
        self.configure(move |config| config.store_retry_timeout = Some(timeout))
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on this address. Overrides `NATTY_METRICS_ADDR`.
    pub fn metrics_addr(self, addr: std::net::SocketAddr) -> Self {
        self.configure(move |config| config.metrics_addr = Some(addr))
    }

    /// The service's version, for its AsyncAPI document's `info.version`. Overrides
    /// `NATTY_SERVICE_VERSION`; e.g. `.service_version(env!("CARGO_PKG_VERSION"))`.
    pub fn service_version(self, version: impl Into<String>) -> Self {
        let version = version.into();
        self.configure(move |config| config.service_version = Some(version))
    }

    /// Port of the development server started when no URL is set. Overrides `NATTY_DEV_PORT`.
    pub fn dev_port(self, port: u16) -> Self {
        self.configure(move |config| config.dev_port = port)
    }

    /// Data folder of the development server. Overrides `NATTY_DEV_DIR`.
    pub fn dev_dir(self, dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        self.configure(move |config| config.dev_dir = dir)
    }

    /// The `nats-server` binary the development server runs. Overrides `NATTY_NATS_SERVER`.
    pub fn nats_server(self, binary: impl Into<PathBuf>) -> Self {
        let binary = binary.into();
        self.configure(move |config| config.nats_server = Some(binary))
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on a listener the caller bound (to learn a
    /// port chosen by the system, say). Takes precedence over any address.
    pub fn metrics_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.metrics_listener = Some(listener);
        self
    }

    /// Gives handlers a value they take as [`State<T>`](crate::State), found by its type: a
    /// database pool, an HTTP client, the service's settings. Call it once per type; a later
    /// value of the same type replaces the earlier. The value is cloned for each handler call,
    /// so make it cheap to clone (a pool, an `Arc`).
    ///
    /// A handler taking a `State<T>` that was never given stops the service at startup, naming
    /// the handler and the type ([`Error::MissingState`]).
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.states.insert(value);
        self
    }

    /// Leaves out what the macros registered: only handlers added by hand run.
    pub fn without_registered(mut self) -> Self {
        self.registered = false;
        self
    }

    /// Runs only the registered handlers with these names (a handler's name is its function's
    /// name), e.g. to deploy one binary's handlers as separate services. Overrides
    /// `NATTY_HANDLERS`. Declared streams are still provisioned.
    pub fn handlers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.only = Some(names.into_iter().map(Into::into).collect());
        self
    }

    /// Declares a stream by hand.
    pub fn stream(mut self, stream: StreamDef) -> Self {
        self.declared.streams.push(stream);
        self
    }

    /// Adds a consumer by hand.
    pub fn consumer(mut self, consumer: ConsumerDef) -> Self {
        self.declared.consumers.push(consumer);
        self
    }

    /// Adds a core-NATS subscription or service by hand.
    pub fn subscription(mut self, subscription: SubscriptionDef) -> Self {
        self.declared.subscriptions.push(subscription);
        self
    }

    /// Adds a KV watch by hand.
    pub fn kv_watch(mut self, watch: KvWatchDef) -> Self {
        self.declared.kv_watches.push(watch);
        self
    }

    /// Declares a KV bucket by hand.
    pub fn kv_bucket(mut self, bucket: KvBucketDef) -> Self {
        self.declared.kv_buckets.push(bucket);
        self
    }

    /// Declares an object store by hand.
    pub fn object_store(mut self, store: ObjectStoreDef) -> Self {
        self.declared.object_stores.push(store);
        self
    }

    /// Adds a leader task by hand.
    pub fn leader(mut self, leader: LeaderDef) -> Self {
        self.declared.leaders.push(leader);
        self
    }

    /// Adds a capture by hand.
    #[cfg(feature = "capture")]
    pub fn capture(mut self, capture: crate::capture::CaptureDef) -> Self {
        self.declared.captures.push(capture);
        self
    }

    /// Reads the environment (unless a config was given) and applies the overrides.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an environment variable natty cannot use.
    pub fn build(self) -> Result<Runtime> {
        let mut config = match self.config {
            Some(config) => config,
            None => Config::from_env()?,
        };
        for change in self.overrides {
            change(&mut config);
        }
        let mut declared = self.declared;
        if self.registered {
            let mut registered = Declarations::registered();
            if let Some(only) = self.only.or_else(|| config.handlers.clone()) {
                registered.select(&only, "NATTY_HANDLERS")?;
            }
            declared.extend(registered);
        }
        declared.link_schedules();
        Ok(Runtime {
            config,
            metrics_listener: self.metrics_listener,
            declared,
            states: self.states,
        })
    }
}

/// A configured service, ready to [`run`](Runtime::run).
#[derive(Debug)]
pub struct Runtime {
    pub(crate) config: Config,
    metrics_listener: Option<std::net::TcpListener>,
    pub(crate) declared: Declarations,
    states: States,
}

impl Runtime {
    /// A builder starting from the environment and the registered handlers.
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder {
            registered: true,
            ..RuntimeBuilder::default()
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Runs until SIGINT or SIGTERM, then drains and returns `Ok(())`.
    ///
    /// # Errors
    ///
    /// A startup failure: nothing registered, bad configuration, no connection, a stream or
    /// consumer that cannot be provisioned or verified.
    pub async fn run(self) -> Result<()> {
        let signals = shutdown_signal()?;
        self.run_until(signals).await
    }

    /// Runs until `shutdown` completes, then drains and returns `Ok(())`.
    ///
    /// # Errors
    ///
    /// As [`Runtime::run`].
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let Runtime {
            config,
            metrics_listener,
            declared,
            states,
        } = self;
        declared.check()?;
        declared.check_states(&states)?;
        // Served before connecting, so that readiness says "not connected" rather than nothing.
        let telemetry = Arc::new(Telemetry::default());
        let endpoint = serve_endpoint(metrics_listener, &config, &telemetry)?;
        let (mut client, _dev) = crate::client::connect_config(&config, telemetry.clone()).await?;
        client.states = Arc::new(states);
        if let Some(endpoint) = &endpoint {
            endpoint.connected(client.nats());
        }
        provision(&config, &declared, &client).await?;
        let tasks = start(&config, &declared, &client).await?;
        // After the consumers were bound, and so given their filters: an unfiltered durable
        // that instances of an earlier version still read would otherwise get the holders.
        for schedule in &declared.schedules {
            patiently("provisioning", config.stream_leader_timeout, || {
                schedule.provision(&client, config.provision)
            })
            .await?;
        }
        // Every instance answers the fleet's status requests, whether it serves a page or not.
        let console = crate::console::Console::new(&config, &declared, &client);
        let console_stop = CancellationToken::new();
        console.start(console_stop.clone());
        let _console_stop = console_stop.drop_guard();
        if let Some(endpoint) = &endpoint {
            endpoint.console(&console);
        }
        telemetry.health.set_provisioned();
        tracing::info!(
            consumers = declared.consumers.iter().filter(|c| c.while_leading.is_none()).count(),
            captures = declared.capture_consumers().len(),
            subscriptions = declared.subscriptions.len(),
            leaders = declared.leaders.len(),
            streams = declared.streams.len(),
            provision = config.provision.as_str(),
            "natty is running"
        );

        let mut supervisor = Supervisor::new(&telemetry.health);
        for task in tasks {
            supervisor.spawn(task);
        }
        let failure = supervisor.watch(shutdown).await;
        tracing::info!(drain_timeout = ?config.drain_timeout, "shutting down: draining in-flight handlers");
        supervisor
            .drain(config.drain_timeout, stop_grace(&config, &declared))
            .await;
        match tokio::time::timeout(FLUSH_WITHIN, client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(error = %crate::error::chain(&error), "could not flush the connection on shutdown"),
            Err(_) => tracing::warn!(
                "could not flush the connection on shutdown within {FLUSH_WITHIN:?} (is the server gone?); unsent acks are redelivered"
            ),
        }
        tracing::info!("stopped");
        drop(endpoint);
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// What `--list` prints: one line per handler and declaration, with where it is declared.
    pub fn list(&self) -> String {
        crate::cli::list(&self.declared)
    }

    /// What `--check` does: connects, compares every declared stream, consumer, KV bucket and
    /// object store with the server, and prints one line each to stdout. Changes nothing.
    ///
    /// # Errors
    ///
    /// [`Error::CheckFailed`] when anything differs or is missing; a connection error as
    /// [`Runtime::run`].
    pub async fn check(self) -> Result<()> {
        crate::cli::check(&self.config, &self.declared).await
    }

    /// An [AsyncAPI 3.0.0](https://www.asyncapi.com/docs/reference/specification/v3.0.0)
    /// document of this service: what an app built on [`run`](crate::run) prints for
    /// `--asyncapi`.
    ///
    /// - `info.title` is the connection name ([`Config::name`](crate::Config::name));
    ///   `info.version` is `NATTY_SERVICE_VERSION`, or `0.0.0` when unset (e.g. set it to
    ///   the application's `CARGO_PKG_VERSION` at build time).
    /// - `servers`: one per URL of [`Config::url`](crate::Config::url), without credentials;
    ///   without a URL, the local development server natty would start.
    /// - `channels`: one per subject a handler receives from: a consumer's filter subjects
    ///   (its stream's subjects when it has none), a capture's likewise, a subscription's or
    ///   service's subject, and `$KV.<bucket>.<key>` for a KV watch; and a schedule's target
    ///   subject. A service's reply goes to a channel with a `null` address: the requester's
    ///   inbox.
    /// - `operations`: one `receive` per handler (one per handler and subject when a handler
    ///   has several), keyed by the handler's name, summarised with its kind, stream, durable
    ///   and where it was declared; a service's has a `reply`; one `send` per schedule, with
    ///   when it fires. Details are under `x-natty`.
    /// - `components.messages`: one per payload type, with its `contentType` and its schema
    ///   as `payload`; `components.schemas`: the named types those schemas refer to.
    ///
    /// Schemas are JSON Schema draft-07, AsyncAPI's default schema format, traced from each
    /// serde payload type's `Deserialize` impl (see [`DecodePayload::json_schema`](crate::DecodePayload::json_schema)): structs
    /// are objects with their fields required unless `Option`, sequences arrays, maps objects,
    /// enums `oneOf` their variants as serde_json writes them, integers bounded by their type.
    /// A type that cannot be traced (one that deserializes from any value, such as
    /// `serde_json::Value` or an untagged enum) gets an empty schema whose `description` says
    /// so. A Protobuf payload gets a schema naming the message and `application/protobuf`:
    /// AsyncAPI's Protobuf schema format wants `.proto` source, which prost types do not keep.
    /// A `#[service]`'s reply is described when its type is `Deserialize` too (otherwise the
    /// reply's schema is empty and says why); a `#[schedule]` is a `send` operation on its
    /// target subject with its body's type (the server publishes it for the service);
    /// declared streams and leader tasks are listed under the document's `x-natty`.
    ///
    /// # Examples
    ///
    /// ```
    /// use natty_runtime::Runtime;
    ///
    /// let runtime = Runtime::builder()
    ///     .without_registered()
    ///     .url("nats://user:secret@127.0.0.1:4222")
    ///     .name("billing")
    ///     .service_version("1.4.2")
    ///     .build()?;
    /// let document = runtime.asyncapi();
    /// assert_eq!(document["asyncapi"], "3.0.0");
    /// assert_eq!(document["info"]["title"], "billing");
    /// assert_eq!(document["info"]["version"], "1.4.2");
    /// // Credentials never reach the document.
    /// assert_eq!(document["servers"]["nats"]["host"], "127.0.0.1:4222");
    /// println!("{document:#}");
    /// # Ok::<(), natty_runtime::Error>(())
    /// ```
    pub fn asyncapi(&self) -> serde_json::Value {
        crate::asyncapi::Service {
            config: &self.config,
            declared: &self.declared,
        }
        .document()
    }
}

/// Startup, first phase: serves the console, `/metrics`, `/healthz` and `/readyz` when asked to, on the
/// caller's listener or the configured address.
fn serve_endpoint(
    listener: Option<std::net::TcpListener>,
    config: &Config,
    telemetry: &Arc<Telemetry>,
) -> Result<Option<Endpoint>> {
    let token = config.console_token.as_ref().map(|token| token.expose().to_string());
    Ok(match listener {
        Some(listener) => Some(Endpoint::serve(listener, telemetry.clone(), token)?),
        None => match config.metrics_addr {
            Some(addr) => Some(Endpoint::bind(addr, telemetry.clone(), token)?),
            None => None,
        },
    })
}

/// Startup, second phase: creates or checks (as `config.provision` says) every declared stream,
/// the dead-letter stream when a consumer uses the default dead-letter subjects, the declared
/// buckets and object stores and the leaders' buckets, then waits until every stream a handler
/// reads has a leader.
async fn provision(config: &Config, declared: &Declarations, client: &Client) -> Result<()> {
    let js = client.jetstream();
    let provision = config.provision;
    // How long provisioning rides through a cluster electing leaders.
    let patience = config.stream_leader_timeout;
    for stream in &declared.streams {
        patiently("provisioning", patience, || stream.provision(js, provision)).await?;
    }
    let all_consumers = declared.all_consumers();
    // The streams handlers read, each once.
    let mut consumed: Vec<&str> = all_consumers.iter().map(|def| def.stream).collect();
    consumed.sort_unstable();
    consumed.dedup();
    // Default dead-letter subjects need a stream to land in; a service that names its own
    // dead-letter subjects (or provisions by other means) does not get one.
    let default_dead_letters = all_consumers.iter().any(|c| c.dead_letter.is_none());
    if default_dead_letters && provision == Provision::CreateOrUpdate && declared.stream(DEAD_LETTER_STREAM).is_none() {
        // As replicated as the streams it takes messages from: on a cluster, a one-replica
        // dead-letter stream on a node that is down would keep every instance from starting.
        let mut replicas = declared
            .streams
            .iter()
            .filter_map(|stream| stream.replicas)
            .max()
            .unwrap_or(1);
        for name in &consumed {
            if let Ok(Ok(stream)) = tokio::time::timeout(patience, js.get_stream(*name)).await {
                replicas = replicas.max(stream.cached_info().config.num_replicas);
            }
        }
        let dead_letters = StreamDef::new(DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS)
            .replicas(replicas)
            .description("messages natty terminated or gave up on, with the reason in their headers");
        patiently("provisioning", patience, || dead_letters.provision(js, provision)).await?;
    }
    // Declared buckets first: a leader's bucket may be one of them (with its replicas).
    for bucket in &declared.kv_buckets {
        patiently("provisioning", patience, || bucket.provision(client, provision)).await?;
    }
    for store in &declared.object_stores {
        patiently("provisioning", patience, || store.provision(client, provision)).await?;
    }
    for leader in &declared.leaders {
        patiently("provisioning", patience, || {
            crate::leader::provision(leader, js, provision)
        })
        .await?;
    }
    // On a cluster a stream is usable only once its replicas have elected a leader: right
    // after creation, or while a quorum of its servers is restarting.
    for stream in &consumed {
        crate::stream::wait_for_leader(js, stream, config.stream_leader_timeout).await?;
    }
    Ok(())
}

/// Startup, third phase: binds every consumer (so a missing or refused one is a startup error,
/// not a retry loop), groups consumers bound to a lease under their election, starts captures,
/// and returns the service's tasks, none started yet: consumers, captures, KV watches,
/// elections, subscriptions.
async fn start(config: &Config, declared: &Declarations, client: &Client) -> Result<Vec<Task>> {
    let js = client.jetstream();
    let provision = config.provision;
    let patience = config.stream_leader_timeout;
    let mut tasks = Vec::new();
    // Elections: each #[leader], plus one per key that only bound consumers name.
    let mut elections: Vec<(LeaderDef, Vec<crate::leader::BoundConsumer>)> =
        declared.leaders.iter().map(|leader| (*leader, Vec::new())).collect();
    for def in &declared.consumers {
        if def.partitions > 0 {
            // A partitioned group: its partitions' consumers are bound by whichever instance
            // owns them, when it does.
            let group = crate::partition::group::Group::new(*def)?;
            tasks.push(start_group(group, config, client).await?);
            continue;
        }
        let stream_def = declared.stream(def.stream);
        let consumer = Consumer::new(*def, client.clone(), provision, stream_def);
        bind_when_led(&consumer, js, config.stream_leader_timeout).await?;
        let Some((bucket, key)) = def.while_leading else {
            tasks.push(consumer.task());
            continue;
        };
        let leading = crate::leader::BoundConsumer::new(*def, provision, stream_def);
        match elections
            .iter_mut()
            .find(|(leader, _)| leader.bucket == bucket && leader.key == key)
        {
            Some((_, consumers)) => consumers.push(leading),
            None => {
                let leader = LeaderDef::new(def.name, bucket, key, Duration::from_secs(10), crate::leader::idle);
                patiently("provisioning", patience, || {
                    crate::leader::provision(&leader, js, provision)
                })
                .await?;
                elections.push((leader, vec![leading]));
            }
        }
    }
    #[cfg(feature = "capture")]
    for def in &declared.captures {
        if def.partitions > 0 {
            // A partitioned capture: each partition captured by the instance that owns it.
            let group = crate::partition::group::Group::for_capture(*def)?;
            tasks.push(start_group(group, config, client).await?);
            continue;
        }
        let stream_def = declared.stream(def.stream());
        let started = patiently("provisioning", patience, || {
            crate::capture::Capture::start(*def, client.clone(), provision, stream_def, config)
        })
        .await?;
        tasks.push(started.task());
    }
    for watch in &declared.kv_watches {
        tasks.push(crate::kv_watch::task(*watch, client.clone(), provision));
    }
    for (leader, consumers) in elections {
        tasks.push(crate::leader::task(leader, client.clone(), consumers));
    }
    for subscription in &declared.subscriptions {
        tasks.push(crate::subscribe::task(*subscription, client.clone()).await);
    }
    Ok(tasks)
}

/// Provisions a partitioned group's stream and bucket, waits for the stream's leader, and
/// returns the group's task.
async fn start_group(group: crate::partition::group::Group, config: &Config, client: &Client) -> Result<Task> {
    let js = client.jetstream();
    patiently("provisioning", config.stream_leader_timeout, || {
        group.provision(js, config.provision)
    })
    .await?;
    crate::stream::wait_for_leader(js, group.derived(), config.stream_leader_timeout).await?;
    Ok(group.task(client.clone(), config.provision, config))
}

/// How long tasks may take to stop once the drain timeout cut them off: captures store their
/// open blocks on a deadline of their own (`capture_drain_timeout`).
fn stop_grace(config: &Config, declared: &Declarations) -> Duration {
    if declared.capture_consumers().is_empty() {
        STOP_GRACE
    } else {
        config.capture_drain_timeout.saturating_sub(config.drain_timeout) + STOP_GRACE
    }
}

/// How long tasks may take to stop once the drain timeout cut off their handlers.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long the last flush may take on shutdown.
const FLUSH_WITHIN: Duration = Duration::from_secs(1);

/// Binds `consumer`, whose stream was seen with a leader. A server that still believes it leads
/// right after losing its quorum answers stream info but refuses the consumer request: such
/// transient refusals are retried, after waiting for a leader again, until `timeout`, and then
/// reported as the missing leader they are.
async fn bind_when_led(consumer: &Consumer, js: &async_nats::jetstream::Context, timeout: Duration) -> Result<()> {
    let started = tokio::time::Instant::now();
    let stream = consumer.stream();
    let mut pause = Duration::from_millis(250);
    loop {
        match consumer.bind().await {
            Ok(_) => return Ok(()),
            Err(error) if transient(&error) => {
                let waited = started.elapsed();
                if waited >= timeout {
                    return Err(Error::NoStreamLeader {
                        stream: stream.to_string(),
                        waited,
                        detail: crate::error::chain(&error).to_string(),
                    });
                }
                tracing::warn!(error = %crate::error::chain(&error), stream, "the stream is not available yet; trying again");
                tokio::time::sleep(pause.min(timeout - waited)).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                crate::stream::wait_for_leader(js, stream, timeout.saturating_sub(started.elapsed())).await?;
            }
            Err(error) => return Err(error),
        }
    }
}

/// What the dead-letter stream captures: every default dead-letter subject.
const DEAD_LETTER_SUBJECTS: &[&str] = &["natty.dead.>"];

/// A shutdown shared by everything a program runs: natty's runtime, an HTTP server beside it,
/// a task of its own. Every clone's [`wait`](Shutdown::wait) resolves once it is
/// [`trigger`](Shutdown::trigger)ed, which [`on_signals`](Shutdown::on_signals) does on the first
/// SIGINT or SIGTERM.
///
/// # Examples
///
/// One SIGTERM drains both an axum server and the handlers:
///
/// ```no_run
/// # async fn demo() -> natty_runtime::Result<()> {
/// let shutdown = natty_runtime::Shutdown::on_signals()?;
/// // With axum: `axum::serve(listener, app).with_graceful_shutdown(shutdown.wait())`.
/// let http = tokio::spawn(shutdown.wait());
/// let natty = natty_runtime::Runtime::builder().build()?.run_until(shutdown.wait());
/// let (http, natty) = tokio::join!(http, natty);
/// # let _ = http;
/// natty
/// # }
/// ```
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    token: tokio_util::sync::CancellationToken,
}

impl Shutdown {
    /// A shutdown that happens when [`trigger`](Shutdown::trigger)ed.
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// A shutdown triggered by the first SIGINT or SIGTERM. Call it inside the tokio runtime.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the signal handlers cannot be installed.
    pub fn on_signals() -> Result<Shutdown> {
        let shutdown = Shutdown::new();
        let signals = shutdown_signal()?;
        let trigger = shutdown.clone();
        tokio::spawn(async move {
            signals.await;
            trigger.trigger();
        });
        Ok(shutdown)
    }

    /// Starts the shutdown: every [`wait`](Shutdown::wait) resolves.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    /// Resolves once the shutdown has started (at once if it already has).
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        self.token.clone().cancelled_owned()
    }

    /// Whether the shutdown has started.
    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let io = |source| Error::Io {
        what: "cannot install the SIGTERM/SIGINT handler".into(),
        source,
    };
    let mut term = signal(SignalKind::terminate()).map_err(io)?;
    let mut int = signal(SignalKind::interrupt()).map_err(io)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("received SIGTERM"),
            _ = int.recv() => tracing::info!("received SIGINT"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_clone_sees_one_trigger() {
        let shutdown = Shutdown::new();
        let (first, second) = (shutdown.wait(), shutdown.clone().wait());
        assert!(!shutdown.is_triggered());
        shutdown.clone().trigger();
        tokio::time::timeout(std::time::Duration::from_secs(1), async { tokio::join!(first, second) })
            .await
            .expect("both waits resolve");
        shutdown.wait().await;
        assert!(shutdown.is_triggered());
    }
}
