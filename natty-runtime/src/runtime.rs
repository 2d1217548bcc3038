//! The runtime: collects what was registered, connects, provisions, runs every handler
//! supervised, and drains on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::classify::transient;
use crate::config::{Auth, Config, Provision};
use crate::consumer::{Consumer, ConsumerDef, DEAD_LETTER_STREAM};
use crate::core_nats::SubscriptionDef;
use crate::dev_server::DevServer;
use crate::error::{Error, Result};
use crate::kv::KvBucketDef;
use crate::kv_watch::KvWatchDef;
use crate::leader::LeaderDef;
use crate::object_store::ObjectStoreDef;
use crate::publish::Client;
use crate::stream::StreamDef;
use crate::telemetry::http::Endpoint;
use crate::telemetry::Telemetry;

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
#[derive(Debug, Default)]
#[must_use]
pub struct RuntimeBuilder {
    config: Option<Config>,
    url: Option<String>,
    auth: Option<Auth>,
    tls_ca: Option<PathBuf>,
    tls_client: Option<(PathBuf, PathBuf)>,
    name: Option<String>,
    provision: Option<Provision>,
    drain_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    stream_leader_timeout: Option<Duration>,
    metrics_addr: Option<std::net::SocketAddr>,
    metrics_listener: Option<std::net::TcpListener>,
    registered: bool,
    only: Option<Vec<String>>,
    streams: Vec<StreamDef>,
    consumers: Vec<ConsumerDef>,
    subscriptions: Vec<SubscriptionDef>,
    kv_watches: Vec<KvWatchDef>,
    leaders: Vec<LeaderDef>,
    kv_buckets: Vec<KvBucketDef>,
    object_stores: Vec<ObjectStoreDef>,
    #[cfg(feature = "capture")]
    captures: Vec<crate::capture::CaptureDef>,
}

impl RuntimeBuilder {
    /// Starts from `config` instead of reading the environment.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// Server URL(s), comma-separated. Overrides `NATS_URL`.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Authentication. Overrides the `NATS_*` credentials.
    pub fn auth(mut self, auth: Auth) -> Self {
        self.auth = Some(auth);
        self
    }

    /// CA certificates to trust (PEM); turns TLS on.
    pub fn tls_ca(mut self, ca: impl Into<PathBuf>) -> Self {
        self.tls_ca = Some(ca.into());
        self
    }

    /// Client certificate and key (PEM), for mutual TLS.
    pub fn tls_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.tls_client = Some((cert.into(), key.into()));
        self
    }

    /// The connection name the server shows.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The provisioning mode. Overrides `NATTY_PROVISION`.
    pub fn provision(mut self, provision: Provision) -> Self {
        self.provision = Some(provision);
        self
    }

    /// How long in-flight handlers may run after shutdown starts. Overrides `NATTY_DRAIN_TIMEOUT`.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = Some(timeout);
        self
    }

    /// How long startup waits for each consumed stream to have a leader. Overrides
    /// `NATTY_STREAM_LEADER_TIMEOUT`.
    pub fn stream_leader_timeout(mut self, timeout: Duration) -> Self {
        self.stream_leader_timeout = Some(timeout);
        self
    }

    /// Timeout of one connection attempt. Overrides `NATTY_CONNECT_TIMEOUT`.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on this address. Overrides `NATTY_METRICS_ADDR`.
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.metrics_addr = Some(addr);
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on a listener the caller bound (to learn a
    /// port chosen by the system, say). Takes precedence over any address.
    pub fn metrics_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.metrics_listener = Some(listener);
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
        self.streams.push(stream);
        self
    }

    /// Adds a consumer by hand.
    pub fn consumer(mut self, consumer: ConsumerDef) -> Self {
        self.consumers.push(consumer);
        self
    }

    /// Adds a core-NATS subscription or service by hand.
    pub fn subscription(mut self, subscription: SubscriptionDef) -> Self {
        self.subscriptions.push(subscription);
        self
    }

    /// Adds a KV watch by hand.
    pub fn kv_watch(mut self, watch: KvWatchDef) -> Self {
        self.kv_watches.push(watch);
        self
    }

    /// Declares a KV bucket by hand.
    pub fn kv_bucket(mut self, bucket: KvBucketDef) -> Self {
        self.kv_buckets.push(bucket);
        self
    }

    /// Declares an object store by hand.
    pub fn object_store(mut self, store: ObjectStoreDef) -> Self {
        self.object_stores.push(store);
        self
    }

    /// Adds a leader task by hand.
    pub fn leader(mut self, leader: LeaderDef) -> Self {
        self.leaders.push(leader);
        self
    }

    /// Adds a capture by hand.
    #[cfg(feature = "capture")]
    pub fn capture(mut self, capture: crate::capture::CaptureDef) -> Self {
        self.captures.push(capture);
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
        if let Some(url) = self.url {
            config.url = Some(url);
        }
        if let Some(auth) = self.auth {
            config.auth = auth;
        }
        if let Some(ca) = self.tls_ca {
            config.tls.ca = Some(ca);
        }
        if let Some((cert, key)) = self.tls_client {
            config.tls.cert = Some(cert);
            config.tls.key = Some(key);
        }
        if let Some(name) = self.name {
            config.name = name;
        }
        if let Some(provision) = self.provision {
            config.provision = provision;
        }
        if let Some(timeout) = self.drain_timeout {
            config.drain_timeout = timeout;
        }
        if let Some(timeout) = self.connect_timeout {
            config.connect_timeout = timeout;
        }
        if let Some(timeout) = self.stream_leader_timeout {
            config.stream_leader_timeout = timeout;
        }
        if let Some(addr) = self.metrics_addr {
            config.metrics_addr = Some(addr);
        }
        let mut streams = self.streams;
        let mut consumers = self.consumers;
        let mut subscriptions = self.subscriptions;
        let mut kv_watches = self.kv_watches;
        let mut leaders = self.leaders;
        let mut kv_buckets = self.kv_buckets;
        let mut object_stores = self.object_stores;
        #[cfg(feature = "capture")]
        let mut captures = self.captures;
        #[cfg(feature = "capture")]
        let registered_captures: Vec<crate::capture::CaptureDef> = if self.registered {
            inventory::iter::<crate::capture::CaptureDef>
                .into_iter()
                .copied()
                .collect()
        } else {
            Vec::new()
        };
        #[cfg(feature = "capture")]
        let capture_names: Vec<&str> = registered_captures.iter().map(|c| c.name()).collect();
        #[cfg(not(feature = "capture"))]
        let capture_names: Vec<&str> = Vec::new();
        if self.registered {
            streams.extend(inventory::iter::<StreamDef>.into_iter().copied());
            kv_buckets.extend(inventory::iter::<KvBucketDef>.into_iter().copied());
            object_stores.extend(inventory::iter::<ObjectStoreDef>.into_iter().copied());
            let registered: Vec<ConsumerDef> = inventory::iter::<ConsumerDef>.into_iter().copied().collect();
            let registered_subs: Vec<SubscriptionDef> =
                inventory::iter::<SubscriptionDef>.into_iter().copied().collect();
            let registered_watches: Vec<KvWatchDef> = inventory::iter::<KvWatchDef>.into_iter().copied().collect();
            let registered_leaders: Vec<LeaderDef> = inventory::iter::<LeaderDef>.into_iter().copied().collect();
            let only = self.only.or_else(|| config.handlers.clone());
            if let Some(only) = &only {
                let known: Vec<&str> = registered
                    .iter()
                    .map(|c| c.name)
                    .chain(registered_subs.iter().map(|s| s.name))
                    .chain(registered_watches.iter().map(|w| w.name))
                    .chain(registered_leaders.iter().map(|l| l.name))
                    .chain(capture_names.iter().copied())
                    .collect();
                if let Some(unknown) = only.iter().find(|name| !known.contains(&name.as_str())) {
                    return Err(Error::config(
                        "NATTY_HANDLERS",
                        only.join(","),
                        format!(
                            "no handler named `{unknown}` is registered; registered: {}",
                            known.join(", ")
                        ),
                    ));
                }
            }
            let selected = |name: &str| only.as_ref().is_none_or(|only| only.iter().any(|o| o == name));
            consumers.extend(registered.into_iter().filter(|c| selected(c.name)));
            subscriptions.extend(registered_subs.into_iter().filter(|s| selected(s.name)));
            kv_watches.extend(registered_watches.into_iter().filter(|w| selected(w.name)));
            leaders.extend(registered_leaders.into_iter().filter(|l| selected(l.name)));
            #[cfg(feature = "capture")]
            captures.extend(registered_captures.into_iter().filter(|c| selected(c.name())));
        }
        let _ = capture_names;
        Ok(Runtime {
            config,
            metrics_listener: self.metrics_listener,
            streams,
            consumers,
            subscriptions,
            kv_watches,
            leaders,
            kv_buckets,
            object_stores,
            #[cfg(feature = "capture")]
            captures,
        })
    }
}

/// A configured service, ready to [`run`](Runtime::run).
#[derive(Debug)]
pub struct Runtime {
    pub(crate) config: Config,
    metrics_listener: Option<std::net::TcpListener>,
    pub(crate) streams: Vec<StreamDef>,
    pub(crate) consumers: Vec<ConsumerDef>,
    pub(crate) subscriptions: Vec<SubscriptionDef>,
    pub(crate) kv_watches: Vec<KvWatchDef>,
    pub(crate) leaders: Vec<LeaderDef>,
    pub(crate) kv_buckets: Vec<KvBucketDef>,
    pub(crate) object_stores: Vec<ObjectStoreDef>,
    #[cfg(feature = "capture")]
    pub(crate) captures: Vec<crate::capture::CaptureDef>,
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
        #[cfg(feature = "capture")]
        let capture_consumers: Vec<ConsumerDef> = self.captures.iter().map(|c| c.consumer_def()).collect();
        #[cfg(not(feature = "capture"))]
        let capture_consumers: Vec<ConsumerDef> = Vec::new();
        if self.consumers.is_empty()
            && self.subscriptions.is_empty()
            && self.kv_watches.is_empty()
            && self.leaders.is_empty()
            && capture_consumers.is_empty()
        {
            return Err(Error::NothingRegistered);
        }
        let streams = dedup_streams(&self.streams)?;
        let all_consumers: Vec<ConsumerDef> = self.consumers.iter().chain(&capture_consumers).copied().collect();
        check_consumers(&all_consumers)?;
        // The streams handlers read, each once.
        let mut consumed: Vec<&str> = all_consumers.iter().map(|def| def.stream).collect();
        consumed.sort_unstable();
        consumed.dedup();

        // Served before connecting, so that readiness says "not connected" rather than nothing.
        let telemetry = Arc::new(Telemetry::default());
        let endpoint = match self.metrics_listener {
            Some(listener) => Some(Endpoint::serve(listener, telemetry.clone())?),
            None => match self.config.metrics_addr {
                Some(addr) => Some(Endpoint::bind(addr, telemetry.clone())?),
                None => None,
            },
        };
        let (client, _dev) = connect_config(&self.config, telemetry.clone()).await?;
        if let Some(endpoint) = &endpoint {
            endpoint.connected(&client);
        }
        let js = client.jetstream();
        let provision = self.config.provision;
        // How long provisioning rides through a cluster electing leaders.
        let patience = self.config.stream_leader_timeout;
        for stream in &streams {
            patiently(patience, || stream.provision(js, provision)).await?;
        }
        // Default dead-letter subjects need a stream to land in; a service that names its own
        // dead-letter subjects (or provisions by other means) does not get one.
        let default_dead_letters = all_consumers.iter().any(|c| c.dead_letter.is_none());
        if default_dead_letters
            && provision == Provision::CreateOrUpdate
            && !streams.iter().any(|s| s.name == DEAD_LETTER_STREAM)
        {
            // As replicated as the streams it takes messages from: on a cluster, a one-replica
            // dead-letter stream on a node that is down would keep every instance from starting.
            let mut replicas = streams.iter().filter_map(|stream| stream.replicas).max().unwrap_or(1);
            for name in &consumed {
                if let Ok(Ok(stream)) = tokio::time::timeout(patience, js.get_stream(*name)).await {
                    replicas = replicas.max(stream.cached_info().config.num_replicas);
                }
            }
            let dead_letters = StreamDef::new(DEAD_LETTER_STREAM, DEAD_LETTER_SUBJECTS)
                .replicas(replicas)
                .description("messages natty terminated or gave up on, with the reason in their headers");
            patiently(patience, || dead_letters.provision(js, provision)).await?;
        }
        // Declared buckets first: a leader's bucket may be one of them (with its replicas).
        for bucket in &self.kv_buckets {
            patiently(patience, || bucket.ensure(&client, provision)).await?;
        }
        for store in &self.object_stores {
            patiently(patience, || store.ensure(&client, provision)).await?;
        }
        for leader in &self.leaders {
            patiently(patience, || crate::leader::provision(leader, js, provision)).await?;
        }
        // On a cluster a stream is usable only once its replicas have elected a leader: right
        // after creation, or while a quorum of its servers is restarting.
        for stream in &consumed {
            crate::stream::wait_for_leader(js, stream, self.config.stream_leader_timeout).await?;
        }
        let mut bound = Vec::with_capacity(self.consumers.len());
        // Elections: each #[leader], plus one per key that only bound consumers name.
        let mut elections: Vec<(LeaderDef, Vec<crate::leader::BoundConsumer>)> =
            self.leaders.iter().map(|leader| (*leader, Vec::new())).collect();
        for def in &self.consumers {
            let stream_def = streams.iter().find(|s| s.name == def.stream).copied();
            let consumer = Consumer::new(*def, client.clone(), provision, stream_def);
            // Bound here so a missing or refused consumer is a startup error, not a retry loop.
            bind_when_led(&consumer, js, self.config.stream_leader_timeout).await?;
            let Some((bucket, key)) = def.while_leading else {
                bound.push(consumer);
                continue;
            };
            let leading = crate::leader::BoundConsumer {
                def: *def,
                provision,
                stream: stream_def,
            };
            match elections
                .iter_mut()
                .find(|(leader, _)| leader.bucket == bucket && leader.key == key)
            {
                Some((_, consumers)) => consumers.push(leading),
                None => {
                    let leader = LeaderDef::new(def.name, bucket, key, Duration::from_secs(10), crate::leader::idle);
                    patiently(patience, || crate::leader::provision(&leader, js, provision)).await?;
                    elections.push((leader, vec![leading]));
                }
            }
        }
        #[cfg(feature = "capture")]
        let mut captures = Vec::with_capacity(self.captures.len());
        #[cfg(feature = "capture")]
        for def in &self.captures {
            let stream_def = streams.iter().find(|s| s.name == def.stream()).copied();
            let slot = std::sync::Mutex::new(None);
            patiently(patience, || async {
                let started = crate::capture::Capture::start(
                    *def,
                    client.clone(),
                    provision,
                    stream_def,
                    self.config.capture_drain_timeout,
                )
                .await?;
                *slot.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started);
                Ok(())
            })
            .await?;
            captures.extend(slot.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner));
        }
        telemetry.health.set_provisioned();
        tracing::info!(
            consumers = bound.len(),
            captures = capture_consumers.len(),
            subscriptions = self.subscriptions.len(),
            leaders = self.leaders.len(),
            streams = streams.len(),
            provision = provision.as_str(),
            "natty is running"
        );

        let cancel = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let health = &telemetry.health;
        for consumer in bound {
            let running = health.task(format!("consumer {}", consumer.label()));
            let run = consumer.run(cancel.clone(), hard_stop.clone());
            tasks.spawn(async move {
                let _running = running;
                run.await
            });
        }
        // A capture drains on a deadline of its own (`capture_drain_timeout`), not `hard_stop`.
        #[cfg(feature = "capture")]
        for capture in captures {
            let running = health.task(format!("capture {}", capture.name()));
            let run = capture.run(cancel.clone());
            tasks.spawn(async move {
                let _running = running;
                run.await
            });
        }
        for watch in &self.kv_watches {
            let (client, cancel, hard_stop, watch) = (client.clone(), cancel.clone(), hard_stop.clone(), *watch);
            let running = health.task(format!("kv_watch {}", watch.name));
            tasks.spawn(async move {
                let _running = running;
                crate::kv_watch::run(watch, client, provision, cancel, hard_stop).await;
                Ok(())
            });
        }
        for (leader, consumers) in elections {
            let (client, cancel, hard_stop) = (client.clone(), cancel.clone(), hard_stop.clone());
            let running = health.task(format!("leader {}", leader.name));
            tasks.spawn(async move {
                let _running = running;
                crate::leader::run(leader, client, consumers, cancel, hard_stop).await;
                Ok(())
            });
        }
        for subscription in &self.subscriptions {
            let (client, cancel, hard_stop) = (client.clone(), cancel.clone(), hard_stop.clone());
            let subscription = *subscription;
            let running = health.task(format!("subscription {}", subscription.name));
            tasks.spawn(async move {
                let _running = running;
                crate::core_nats::run(subscription, client, cancel, hard_stop).await;
                Ok(())
            });
        }

        tokio::pin!(shutdown);
        let mut failure = None;
        tokio::select! {
            _ = &mut shutdown => {}
            Some(result) = tasks.join_next() => match result {
                // A capture stops on an error it cannot retry (a path template its keys cannot fill).
                Ok(Err(error)) => {
                    tracing::error!(%error, "a task failed; shutting down");
                    failure = Some(error);
                }
                // Any other task only ends on its own when it panicked: that is a bug, stop loudly.
                other => tracing::error!(result = ?other, "a task stopped unexpectedly; shutting down"),
            }
        }

        tracing::info!(drain_timeout = ?self.config.drain_timeout, "shutting down: draining in-flight handlers");
        health.set_draining();
        cancel.cancel();
        // Every wait from here on has a deadline: with the server gone, a flush or a send waits
        // for a reconnect that may never come. What is left unsettled is redelivered later.
        let drain = async { while tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(self.config.drain_timeout, drain).await.is_err() {
            tracing::warn!("drain timeout reached: naking what is still in flight");
            hard_stop.cancel();
            // Captures store their open blocks on a deadline of their own.
            #[cfg(feature = "capture")]
            let grace = if capture_consumers.is_empty() {
                STOP_GRACE
            } else {
                self.config
                    .capture_drain_timeout
                    .saturating_sub(self.config.drain_timeout)
                    + STOP_GRACE
            };
            #[cfg(not(feature = "capture"))]
            let grace = STOP_GRACE;
            let stopped = async { while tasks.join_next().await.is_some() {} };
            if tokio::time::timeout(grace, stopped).await.is_err() {
                tracing::error!(
                    tasks = tasks.len(),
                    "tasks still running after the drain timeout (a handler that ignores cancellation, or a server that is gone); abandoning them: what they held is redelivered"
                );
                tasks.abort_all();
            }
        }
        match tokio::time::timeout(FLUSH_WITHIN, client.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "could not flush the connection on shutdown"),
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
}

/// How long tasks may take to stop once the drain timeout cut off their handlers.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long the last flush may take on shutdown.
const FLUSH_WITHIN: Duration = Duration::from_secs(1);

/// Runs a provisioning step again while it fails for a transient reason (see [`transient`]),
/// with growing pauses, for up to `timeout`: a replicated bucket created by several instances at
/// once on a busy cluster, or a stream looked up while its servers elect a leader, can take
/// longer than one JetStream request allows. Any other error is returned at once.
async fn patiently<F, Fut>(timeout: Duration, mut step: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match step().await {
            Err(error) if transient(&error) && started.elapsed() + pause < timeout => {
                tracing::warn!(%error, attempt, "provisioning did not go through (the cluster may be electing leaders); trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            other => return other,
        }
    }
}

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
                        detail: error.to_string(),
                    });
                }
                tracing::warn!(%error, stream, "the stream is not available yet; trying again");
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

/// Connects with `config`, starting the development server when no URL is configured.
pub(crate) async fn connect_config(
    config: &Config,
    telemetry: Arc<Telemetry>,
) -> Result<(Client, Option<Arc<DevServer>>)> {
    let (url, dev) = match &config.url {
        Some(url) => (url.clone(), None),
        None => {
            let dev = DevServer::ensure(config).await?;
            (dev.url().to_string(), Some(Arc::new(dev)))
        }
    };
    let connected = crate::connect::connect(config, &url).await?;
    Ok((Client::connected(connected, telemetry), dev))
}

/// Connects using the environment's settings (see [`Config`]), for code outside handlers,
/// such as a publisher's `main`. With no `NATS_URL`, it uses (or starts) the development
/// server, which lives as long as the returned [`Connection`].
///
/// # Errors
///
/// [`Error::Config`], [`Error::DevServer`] or [`Error::Connect`].
pub async fn connect() -> Result<Connection> {
    let config = Config::from_env()?;
    let (client, dev) = connect_config(&config, Arc::default()).await?;
    Ok(Connection { client, _dev: dev })
}

/// A [`Client`] that keeps the development server it started alive. Derefs to [`Client`].
#[derive(Clone)]
pub struct Connection {
    client: Client,
    _dev: Option<Arc<DevServer>>,
}

impl std::ops::Deref for Connection {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

fn dedup_streams(streams: &[StreamDef]) -> Result<Vec<StreamDef>> {
    let mut seen: HashMap<&str, StreamDef> = HashMap::new();
    for stream in streams {
        if let Some(first) = seen.get(stream.name) {
            return Err(Error::Duplicate {
                what: format!("stream `{}`", stream.name),
                first: first.location.to_string(),
                second: stream.location.to_string(),
            });
        }
        seen.insert(stream.name, *stream);
    }
    Ok(streams.to_vec())
}

fn check_consumers(consumers: &[ConsumerDef]) -> Result<()> {
    let mut seen: HashMap<(&str, &str), &ConsumerDef> = HashMap::new();
    for consumer in consumers.iter().filter(|c| !c.ephemeral) {
        if let Some(first) = seen.insert((consumer.stream, consumer.durable), consumer) {
            return Err(Error::Duplicate {
                what: format!("consumer `{}` on stream `{}`", consumer.durable, consumer.stream),
                first: first.location.to_string(),
                second: consumer.location.to_string(),
            });
        }
    }
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
fn shutdown_signal() -> Result<impl Future<Output = ()>> {
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
