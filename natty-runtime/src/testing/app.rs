//! [`TestApp`]: a service under test on a real nats-server of its own, with JetStream's real
//! semantics (`ack_wait`, `max_deliver`, durable cursors, dead letters), started in well under
//! a second.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use super::{NatsServer, RunningRuntime};
use crate::config::Config;
pub use crate::dead_letters::DeadLetter;
use crate::error::{Error, Result};
use crate::payload::{EncodePayload, Payload};
use crate::publish::{Client, PublishAck, PublishError};
use crate::runtime::{Runtime, RuntimeBuilder};

/// How long [`TestApp::start`] waits for the service to be ready.
const READY_DEADLINE: Duration = Duration::from_secs(10);
/// How long [`TestApp::settled`] waits by default.
const SETTLE_DEADLINE: Duration = Duration::from_secs(30);
/// Poll interval of the waits: a local server answers in well under a millisecond.
const POLL: Duration = Duration::from_millis(10);

/// A service under test: a nats-server of its own (random port, temporary store, killed on
/// drop), this test binary's registered handlers running against it through the real runtime,
/// and a [`Client`] to drive it.
///
/// Handlers are registered by their macros in the binary that links them: a test file that
/// declares handlers (or brings a service's module in with `#[path = "../src/bin/svc.rs"] mod
/// svc;`) gets them all; [`TestApp::builder`] picks some, gives state, changes settings.
///
/// # Examples
///
/// ```no_run
/// use natty_runtime::prelude::*;
/// use natty_runtime::testing::TestApp;
///
/// #[derive(serde::Serialize, serde::Deserialize, Payload)]
/// #[payload(subject = "orders.created")]
/// struct OrderCreated { id: u64, total_cents: u64 }
///
/// #[stream(name = "orders", subjects = ["orders.>"])]
/// struct Orders;
///
/// #[consumer(stream = "orders", durable = "billing", max_deliver = 1)]
/// async fn bill(order: OrderCreated) -> Result<(), Reject> {
///     if order.total_cents == 0 {
///         return Err(Reject::terminate("an order for nothing"));
///     }
///     Ok(())
/// }
///
/// # async fn test() -> natty_runtime::Result<()> {
/// let app = TestApp::start().await?;
/// app.emit(&OrderCreated { id: 1, total_cents: 1200 }).await?;
/// app.emit(&OrderCreated { id: 2, total_cents: 0 }).await?;
/// app.settled().await?;
/// let dead = app.dead_letters().await?;
/// assert_eq!(dead.len(), 1);
/// assert!(dead[0].reason.contains("an order for nothing"));
/// app.stop().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TestApp {
    server: NatsServer,
    client: Client,
    running: Option<RunningRuntime>,
    metrics: SocketAddr,
    /// The durable consumers of the handlers and captures running, `(stream, durable)`.
    consumers: Vec<(&'static str, &'static str)>,
}

/// Builds a [`TestApp`]: which handlers run, the state they take, any setting.
#[derive(Debug)]
#[must_use]
pub struct TestAppBuilder {
    runtime: RuntimeBuilder,
}

impl TestAppBuilder {
    /// Runs only the registered handlers with these names (see [`RuntimeBuilder::handlers`]).
    pub fn handlers<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.runtime = self.runtime.handlers(names);
        self
    }

    /// Gives handlers a value they take as [`State<T>`](crate::State) (see
    /// [`RuntimeBuilder::state`]).
    pub fn state<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Self {
        self.runtime = self.runtime.state(value);
        self
    }

    /// Changes any setting, e.g. a shorter drain timeout (see [`RuntimeBuilder::configure`]).
    /// The environment is not read: a test runs with natty's defaults and what is set here.
    pub fn configure(mut self, change: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.runtime = self.runtime.configure(change);
        self
    }

    /// Starts a nats-server, then the service against it, and returns once the service is
    /// ready: connected, its streams and consumers provisioned, every handler running.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when no nats-server can be started (its causes say how to install one);
    /// the service's own startup error (a refused declaration, [`Error::MissingState`], ...);
    /// [`Error::Io`] when it is not ready within 10 s.
    pub async fn start(self) -> Result<TestApp> {
        let server = NatsServer::start().await.map_err(|source| Error::Io {
            what: "cannot start a nats-server for the test app".into(),
            source,
        })?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            what: "cannot bind the test app's metrics endpoint".into(),
            source,
        })?;
        let metrics = listener.local_addr().map_err(|source| Error::Io {
            what: "cannot read the test app's metrics address".into(),
            source,
        })?;
        let runtime: Runtime = self.runtime.url(server.url()).metrics_listener(listener).build()?;
        let consumers = runtime
            .declared
            .all_consumers()
            .iter()
            .filter(|consumer| !consumer.ephemeral)
            .map(|consumer| (consumer.stream, consumer.durable))
            .collect();
        let running = RunningRuntime::spawn(runtime);
        let deadline = tokio::time::Instant::now() + READY_DEADLINE;
        loop {
            if running.finished() {
                // It stopped by itself: a startup error, returned as the service would.
                running.stop().await?;
                return Err(timed_out("the service stopped during startup without an error"));
            }
            if matches!(super::http_get(metrics, "/readyz").await, Ok((200, _))) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out(format!(
                    "the service was not ready within {READY_DEADLINE:?}"
                )));
            }
            tokio::time::sleep(POLL).await;
        }
        let client = Client::connect_with(&Config::default(), &server.url()).await?;
        Ok(TestApp {
            server,
            client,
            running: Some(running),
            metrics,
            consumers,
        })
    }
}

impl TestApp {
    /// Starts every handler registered in this binary (see [`TestAppBuilder::start`]).
    ///
    /// # Errors
    ///
    /// As [`TestAppBuilder::start`].
    pub async fn start() -> Result<TestApp> {
        TestApp::builder().start().await
    }

    /// A builder, to run some handlers only, give state, or change settings. It starts from
    /// natty's defaults, not from the environment.
    pub fn builder() -> TestAppBuilder {
        TestAppBuilder {
            runtime: Runtime::builder().config(Config::default()),
        }
    }

    /// A client connected to the app's server, as a publisher or a test would use it.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The server's URL, e.g. for a second process of the service.
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Where the service serves `/metrics`, `/healthz` and `/readyz`.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics
    }

    /// Publishes `value` to its type's subject and waits for the stream's ack.
    ///
    /// # Errors
    ///
    /// As [`Client::emit`].
    pub async fn emit<T: Payload + ?Sized>(&self, value: &T) -> std::result::Result<PublishAck, PublishError> {
        self.client.emit(value).await
    }

    /// Publishes `value` to `subject` and waits for the stream's ack.
    ///
    /// # Errors
    ///
    /// As [`Client::publish`].
    pub async fn publish<T: EncodePayload + ?Sized>(
        &self,
        subject: impl Into<String>,
        value: &T,
    ) -> std::result::Result<PublishAck, PublishError> {
        self.client.publish(subject, value).await
    }

    /// Waits until every durable consumer of the service (its handlers' and its captures') has
    /// caught up: nothing pending, nothing delivered and unacked. A message its handler failed
    /// and that waits for a redelivery counts as unacked, so this also waits out retries.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] after 30 s, naming the first consumer still busy and its counts.
    pub async fn settled(&self) -> Result<()> {
        self.settled_within(SETTLE_DEADLINE).await
    }

    /// [`settled`](Self::settled), waiting at most `timeout`.
    ///
    /// # Errors
    ///
    /// As [`settled`](Self::settled).
    pub async fn settled_within(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let busy = self.busy().await;
            let Some(busy) = busy else { return Ok(()) };
            if tokio::time::Instant::now() >= deadline {
                return Err(timed_out(format!("not settled after {timeout:?}: {busy}")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The first consumer not caught up, described; `None` when all are.
    async fn busy(&self) -> Option<String> {
        let js = self.client.jetstream();
        for (stream, durable) in &self.consumers {
            let described = |what: String| format!("consumer `{durable}` on stream `{stream}`: {what}");
            let info = match js.get_stream(*stream).await {
                Ok(stream) => stream.consumer_info(*durable).await,
                Err(error) => return Some(described(error.to_string())),
            };
            match info {
                Ok(info) if info.num_pending == 0 && info.num_ack_pending == 0 => {}
                Ok(info) => {
                    return Some(described(format!(
                        "{} pending, {} delivered and unacked",
                        info.num_pending, info.num_ack_pending
                    )))
                }
                Err(error) => return Some(described(error.to_string())),
            }
        }
        None
    }

    /// Every message dead-lettered so far to the service's dead-letter stream
    /// (`natty-dead-letters`, where dead letters go unless a consumer names a subject of its
    /// own), oldest first.
    ///
    /// # Errors
    ///
    /// [`Error::Stream`] when the stream cannot be read.
    pub async fn dead_letters(&self) -> Result<Vec<DeadLetter>> {
        crate::dead_letters::list(self.client.jetstream(), &crate::dead_letters::Filter::default()).await
    }

    /// Stops the server and starts it again on the same port and store: the service
    /// reconnects by itself, as in production.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] when the server does not come back.
    pub async fn restart_server(&mut self) -> Result<()> {
        self.server.restart().await.map_err(|source| Error::Io {
            what: "cannot restart the test app's nats-server".into(),
            source,
        })
    }

    /// Stops the service as SIGTERM would, draining it, and returns how it ended.
    ///
    /// # Errors
    ///
    /// The service's error, if it stopped with one.
    pub async fn stop(mut self) -> Result<()> {
        match self.running.take() {
            Some(running) => running.stop().await,
            None => Ok(()),
        }
    }
}

fn timed_out(what: impl Into<String>) -> Error {
    Error::Io {
        what: what.into(),
        source: io::Error::from(io::ErrorKind::TimedOut),
    }
}
