//! Durable pull consumers: the [`ConsumerDef`] a `#[consumer]` registers, its provisioning,
//! and the running task that pulls, dispatches to the handler, settles each message, recovers
//! a consumer whose server-side state disappeared, and drains on shutdown.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{pull, AckPolicy, PullConsumer},
};
use async_nats::Subject;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::Provision;
use crate::error::{Error, Result};
use crate::handler::{ConsumerShared, Delivery, Outcome};
use crate::publish::Client;
use crate::stream::{is_stream_not_found, Location, StreamDef};

/// The adapter a `#[consumer]` generates: decodes, calls the handler, reports the outcome.
pub type HandlerFn = fn(Delivery) -> BoxFuture<'static, Outcome>;

/// How long a pull request waits on the server before it is renewed.
const PULL_EXPIRES: Duration = Duration::from_secs(10);
/// Idle heartbeat of a pull request: two missed ones mean the pull (or the consumer) is gone.
const PULL_HEARTBEAT: Duration = Duration::from_secs(3);
/// On shutdown, prefetched messages are handed back until none arrives for this long.
const HAND_BACK_QUIET: Duration = Duration::from_millis(50);

/// A declared durable pull consumer. `#[consumer(...)]` registers one; [`ConsumerDef::new`]
/// builds one by hand with the same defaults.
#[derive(Clone, Copy)]
pub struct ConsumerDef {
    pub(crate) name: &'static str,
    pub(crate) stream: &'static str,
    pub(crate) durable: &'static str,
    pub(crate) subjects: &'static [&'static str],
    pub(crate) ack_wait: Option<Duration>,
    pub(crate) max_deliver: Option<i64>,
    pub(crate) max_ack_pending: Option<i64>,
    pub(crate) concurrency: usize,
    pub(crate) prefetch: Option<usize>,
    pub(crate) handler: HandlerFn,
    pub(crate) location: Location,
}

impl std::fmt::Debug for ConsumerDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerDef")
            .field("name", &self.name)
            .field("stream", &self.stream)
            .field("durable", &self.durable)
            .field("subjects", &self.subjects)
            .field("concurrency", &self.concurrency)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl ConsumerDef {
    /// A consumer named `durable` on `stream`, handled by `handler` (named `name` in logs).
    pub const fn new(name: &'static str, stream: &'static str, durable: &'static str, handler: HandlerFn) -> Self {
        ConsumerDef {
            name,
            stream,
            durable,
            subjects: &[],
            ack_wait: None,
            max_deliver: None,
            max_ack_pending: None,
            concurrency: 1,
            prefetch: None,
            handler,
            location: Location::UNKNOWN,
        }
    }

    /// Filter subjects; none means every subject of the stream.
    pub const fn subjects(mut self, subjects: &'static [&'static str]) -> Self {
        self.subjects = subjects;
        self
    }

    /// How long the server waits for an ack before redelivering (server default 30 s).
    pub const fn ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = Some(ack_wait);
        self
    }

    /// How many times a message is delivered at most (server default: unlimited).
    pub const fn max_deliver(mut self, max_deliver: i64) -> Self {
        self.max_deliver = Some(max_deliver);
        self
    }

    /// How many messages may be unacknowledged across all instances (server default 1000).
    pub const fn max_ack_pending(mut self, max_ack_pending: i64) -> Self {
        self.max_ack_pending = Some(max_ack_pending);
        self
    }

    /// How many handlers run at once in this instance (default 1).
    pub const fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = if concurrency == 0 { 1 } else { concurrency };
        self
    }

    /// How many messages this instance asks the server for ahead of its handlers.
    pub const fn prefetch(mut self, prefetch: usize) -> Self {
        self.prefetch = Some(if prefetch == 0 { 1 } else { prefetch });
        self
    }

    /// Records where the declaration was written (the macros set this).
    pub const fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// The handler's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The stream it consumes.
    pub fn stream(&self) -> &'static str {
        self.stream
    }

    /// The durable name, shared by every instance of the service.
    pub fn durable(&self) -> &'static str {
        self.durable
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// Messages requested ahead: 32 per handler slot by default (enough to hide the pull
    /// round trip for fast handlers), so what waits behind a slow handler grows with its
    /// concurrency rather than with the stream; capped by `max_ack_pending` so the server
    /// never stalls delivery with a request half-filled.
    pub(crate) fn effective_prefetch(&self) -> usize {
        let wanted = self.prefetch.unwrap_or((self.concurrency * 32).min(1000));
        let cap = self.max_ack_pending.unwrap_or(1000).max(1) as usize;
        wanted.min(cap).max(1)
    }

    fn server_config(&self) -> pull::Config {
        let mut config = pull::Config {
            durable_name: Some(self.durable.to_string()),
            ack_policy: AckPolicy::Explicit,
            ..Default::default()
        };
        match self.subjects {
            [] => {}
            [one] => config.filter_subject = one.to_string(),
            many => config.filter_subjects = many.iter().map(|s| s.to_string()).collect(),
        }
        if let Some(value) = self.ack_wait {
            config.ack_wait = value;
        }
        if let Some(value) = self.max_deliver {
            config.max_deliver = value;
        }
        if let Some(value) = self.max_ack_pending {
            config.max_ack_pending = value;
        }
        config
    }

    fn error(&self, action: &'static str) -> impl FnOnce(crate::error::BoxError) -> Error + '_ {
        move |source| Error::Consumer {
            stream: self.stream.into(),
            consumer: self.durable.into(),
            action,
            source,
        }
    }
}

inventory::collect!(ConsumerDef);

/// A running consumer: the definition plus what it needs to bind and recover.
pub(crate) struct Consumer {
    def: ConsumerDef,
    shared: Arc<ConsumerShared>,
    provision: Provision,
    /// The declaration of this consumer's stream, if the service declares it: used to
    /// re-create a stream that vanished (a memory stream after a server restart).
    stream_def: Option<StreamDef>,
}

impl Consumer {
    pub(crate) fn new(def: ConsumerDef, client: Client, provision: Provision, stream_def: Option<StreamDef>) -> Self {
        let shared = Arc::new(ConsumerShared {
            stream: def.stream,
            durable: def.durable,
            client,
        });
        Consumer {
            def,
            shared,
            provision,
            stream_def,
        }
    }

    fn js(&self) -> &jetstream::Context {
        self.shared.client.jetstream()
    }

    /// Creates, updates or looks up the durable consumer according to the provisioning mode.
    pub(crate) async fn bind(&self) -> Result<PullConsumer> {
        let def = &self.def;
        let stream = match self.js().get_stream(def.stream).await {
            Ok(stream) => stream,
            Err(error) if is_stream_not_found(&error) => match (&self.stream_def, self.provision) {
                (Some(stream_def), Provision::CreateOrUpdate) => {
                    stream_def.provision(self.js(), self.provision).await?;
                    self.js()
                        .get_stream(def.stream)
                        .await
                        .map_err(|e| def.error("looking up its stream")(Box::new(e)))?
                }
                _ => {
                    return Err(Error::StreamNotFound {
                        stream: def.stream.into(),
                        hint: format!(
                            " (consumer `{}` at {} reads it); declare it with #[stream(name = \"{}\", subjects = [...])] or create it on the server",
                            def.durable, def.location, def.stream
                        ),
                    })
                }
            },
            Err(error) => return Err(def.error("looking up its stream")(Box::new(error))),
        };
        match self.provision {
            Provision::CreateOrUpdate => stream
                .create_consumer(def.server_config())
                .await
                .map_err(|e| def.error("creating or updating it")(Box::new(e))),
            Provision::VerifyOnly | Provision::Off => {
                use jetstream::context::ConsumerInfoErrorKind as Kind;
                match stream.consumer_info(def.durable).await {
                    Ok(_) => {}
                    Err(error) if matches!(error.kind(), Kind::NotFound) => {
                        return Err(Error::ConsumerNotFound {
                            stream: def.stream.into(),
                            consumer: def.durable.into(),
                            mode: self.provision.as_str(),
                        })
                    }
                    Err(error) => return Err(def.error("looking it up")(Box::new(error))),
                }
                stream
                    .get_consumer::<pull::Config>(def.durable)
                    .await
                    .map_err(def.error("binding it"))
            }
        }
    }

    /// Runs until `cancel`, then drains: stops pulling, naks what was prefetched but not
    /// started, and lets in-flight handlers finish until `hard_stop`, when their messages are naked.
    pub(crate) async fn run(
        self,
        mut consumer: PullConsumer,
        cancel: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Result<()> {
        let this = Arc::new(self);
        let concurrency = this.def.concurrency;
        let permits = Arc::new(Semaphore::new(concurrency));
        let prefetch = this.def.effective_prefetch();
        let mut failures = 0u32;
        loop {
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(prefetch)
                .expires(PULL_EXPIRES)
                .heartbeat(PULL_HEARTBEAT)
                .messages()
                .await
            {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(stream = this.def.stream, consumer = this.def.durable, %error, "cannot start pulling; retrying");
                    if !pause(&cancel, &mut failures).await {
                        break;
                    }
                    consumer = match this.bind().await {
                        Ok(consumer) => consumer,
                        Err(error) => {
                            tracing::error!(%error, "cannot bind the consumer; retrying");
                            continue;
                        }
                    };
                    continue;
                }
            };
            // Pull until cancelled or until the consumer must be re-bound.
            let rebind = loop {
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break false,
                    permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                };
                let next = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => break false,
                    next = messages.next() => next,
                };
                match next {
                    Some(Ok(message)) => {
                        failures = 0;
                        let delivery = this.clone().deliver(message, permit, hard_stop.clone());
                        if concurrency == 1 {
                            // One at a time: run inline, sparing a task spawn per message.
                            delivery.await;
                        } else {
                            tokio::spawn(delivery);
                        }
                    }
                    Some(Err(error)) => {
                        drop(permit);
                        if this.must_rebind(&error).await {
                            break true;
                        }
                    }
                    None => break true,
                }
            };
            if !rebind {
                // Prefetched messages that no handler started go back to the server at once,
                // so another instance can take them instead of waiting out ack_wait. They are
                // collected first and naked only once the pull subscription is gone: naked
                // while the pull request is open, the server would deliver them straight back.
                // Collection is bounded by count and by a quiet period, because an open pull
                // request keeps receiving newly published messages.
                let mut prefetched = Vec::new();
                while prefetched.len() < 2 * prefetch {
                    match tokio::time::timeout(HAND_BACK_QUIET, messages.next()).await {
                        Ok(Some(Ok(message))) => prefetched.push(message),
                        Ok(Some(Err(_))) => continue,
                        Ok(None) | Err(_) => break,
                    }
                }
                drop(messages);
                let handed_back = prefetched.len();
                for message in prefetched {
                    let (_, acker) = message.split();
                    let _ = acker.ack_with(jetstream::AckKind::Nak(None)).await;
                }
                if handed_back > 0 {
                    tracing::info!(
                        stream = this.def.stream,
                        consumer = this.def.durable,
                        handed_back,
                        "returned prefetched messages"
                    );
                }
                break;
            }
            drop(messages);
            loop {
                match this.bind().await {
                    Ok(rebound) => {
                        tracing::info!(
                            stream = this.def.stream,
                            consumer = this.def.durable,
                            "consumer re-bound; resuming"
                        );
                        consumer = rebound;
                        break;
                    }
                    Err(error) => {
                        tracing::error!(%error, "cannot re-bind the consumer; retrying");
                        if !pause(&cancel, &mut failures).await {
                            break;
                        }
                    }
                }
            }
            if cancel.is_cancelled() {
                break;
            }
        }
        // In-flight handlers hold permits; they release them when settled (or naked at hard_stop).
        let _ = permits.acquire_many(concurrency as u32).await;
        Ok(())
    }

    /// After an error from the message stream: whether the consumer must be bound again
    /// (it or its stream vanished), or pulling can go on (a transient miss, e.g. during a reconnect).
    async fn must_rebind(&self, error: &pull::MessagesError) -> bool {
        use pull::MessagesErrorKind as Kind;
        let (stream, durable) = (self.def.stream, self.def.durable);
        match error.kind() {
            Kind::ConsumerDeleted => {
                tracing::warn!(
                    stream,
                    consumer = durable,
                    "the consumer was deleted on the server; re-binding"
                );
                true
            }
            Kind::MissingHeartbeat | Kind::NoResponders | Kind::Pull | Kind::Other => {
                let info = match self.js().get_stream(stream).await {
                    Ok(handle) => handle.consumer_info(durable).await.map(|_| ()).map_err(|e| {
                        matches!(
                            e.kind(),
                            jetstream::context::ConsumerInfoErrorKind::NotFound
                                | jetstream::context::ConsumerInfoErrorKind::StreamNotFound
                        )
                    }),
                    Err(error) => Err(is_stream_not_found(&error)),
                };
                match info {
                    Ok(()) => {
                        tracing::debug!(stream, consumer = durable, %error, "pull interrupted; continuing");
                        false
                    }
                    Err(true) => {
                        tracing::warn!(stream, consumer = durable, %error, "the consumer or its stream is gone on the server; re-binding");
                        true
                    }
                    Err(false) => {
                        tracing::warn!(stream, consumer = durable, %error, "pull interrupted and the server does not answer; waiting");
                        false
                    }
                }
            }
            Kind::RequestLimitExceeded | Kind::PushBasedConsumer => {
                tracing::error!(stream, consumer = durable, %error, "the server refuses this consumer's pull requests; re-binding");
                true
            }
        }
    }

    /// Runs the handler for one message and settles it. Holds `permit` until settled.
    async fn deliver(
        self: Arc<Self>,
        message: jetstream::Message,
        permit: OwnedSemaphorePermit,
        hard_stop: CancellationToken,
    ) {
        let _permit = permit;
        let (stream_sequence, delivery_count) = match message.info() {
            Ok(info) => (info.stream_sequence, info.delivered.max(0) as u64),
            Err(error) => {
                tracing::warn!(%error, "received a message that is not a JetStream delivery; ignored");
                return;
            }
        };
        let jetstream::Message { message, .. } = message;
        let Some(reply) = message.reply else {
            return;
        };
        let settle = Settle {
            client: self.shared.client.nats().clone(),
            reply,
        };
        let delivery = Delivery {
            subject: message.subject,
            payload: message.payload,
            headers: message.headers,
            stream_sequence,
            delivery_count,
            shared: self.shared.clone(),
        };
        let def = &self.def;
        let span = tracing::debug_span!(
            "delivery",
            handler = def.name,
            stream = def.stream,
            consumer = def.durable,
            subject = %delivery.subject,
            sequence = stream_sequence,
            delivery_count,
        );
        let handled = AssertUnwindSafe((def.handler)(delivery).instrument(span)).catch_unwind();
        let outcome = tokio::select! {
            biased;
            outcome = handled => outcome,
            _ = hard_stop.cancelled() => {
                tracing::warn!(stream = def.stream, consumer = def.durable, sequence = stream_sequence,
                    "drain timeout: handler still running; nak so the message is redelivered");
                settle.send(Bytes::from_static(b"-NAK")).await;
                return;
            }
        };
        match outcome {
            Ok(Outcome::Ack) => settle.send(Bytes::from_static(b"+ACK")).await,
            Ok(Outcome::Failed(error)) => {
                let delay = retry_delay(delivery_count);
                tracing::warn!(
                    handler = def.name, stream = def.stream, consumer = def.durable, sequence = stream_sequence,
                    delivery_count, error = %error, retry_in = ?delay,
                    "handler failed; the message will be redelivered"
                );
                settle.nak(delay).await;
            }
            Ok(Outcome::Undecodable(error)) => {
                tracing::error!(
                    handler = def.name, stream = def.stream, consumer = def.durable, sequence = stream_sequence,
                    payload_type = error.type_name, error = %error,
                    "terminating a message whose payload cannot be decoded (stream {}, consumer {}, sequence {})",
                    def.stream, def.durable, stream_sequence
                );
                settle.send(format!("+TERM {error}").into()).await;
            }
            Err(panic) => {
                let delay = retry_delay(delivery_count);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a non-string panic".into());
                tracing::error!(
                    handler = def.name, stream = def.stream, consumer = def.durable, sequence = stream_sequence,
                    panic = %what, "handler panicked; the message will be redelivered"
                );
                settle.nak(delay).await;
            }
        }
    }
}

/// Redelivery delay after a handler error: 100 ms, doubling per attempt, at most 10 s, so a
/// failing dependency is not hammered and a transient failure is retried quickly.
fn retry_delay(delivery_count: u64) -> Duration {
    let exponent = delivery_count.saturating_sub(1).min(7) as u32;
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(10))
}

/// Settles a message by publishing to its reply subject (what async-nats' `Acker` does), so
/// that `+TERM` can carry a reason.
struct Settle {
    client: async_nats::Client,
    reply: Subject,
}

impl Settle {
    async fn send(&self, body: Bytes) {
        if let Err(error) = self.client.publish(self.reply.clone(), body).await {
            // The server will redeliver after ack_wait: at-least-once holds.
            tracing::warn!(%error, "cannot settle a message; it will be redelivered after ack_wait");
        }
    }

    async fn nak(&self, delay: Duration) {
        self.send(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()).into())
            .await;
    }
}

/// Waits before a retry, longer after each failure; false if cancelled meanwhile.
async fn pause(cancel: &CancellationToken, failures: &mut u32) -> bool {
    *failures = failures.saturating_add(1);
    let delay = Duration::from_millis(250 * 2u64.pow((*failures).min(5))).min(Duration::from_secs(5));
    tokio::select! {
        _ = cancel.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(_: Delivery) -> BoxFuture<'static, Outcome> {
        Box::pin(async { Outcome::Ack })
    }

    #[test]
    fn prefetch_is_bounded_by_concurrency_and_max_ack_pending() {
        let base = ConsumerDef::new("h", "s", "d", handler);
        assert_eq!(base.effective_prefetch(), 32);
        assert_eq!(base.concurrency(4).effective_prefetch(), 128);
        assert_eq!(base.concurrency(500).effective_prefetch(), 1000);
        assert_eq!(base.max_ack_pending(10).effective_prefetch(), 10);
        assert_eq!(base.prefetch(5).effective_prefetch(), 5);
    }

    #[test]
    fn retry_delay_grows_and_is_capped() {
        assert_eq!(retry_delay(1), Duration::from_millis(100));
        assert_eq!(retry_delay(2), Duration::from_millis(200));
        assert_eq!(retry_delay(50), Duration::from_secs(10));
    }
}
