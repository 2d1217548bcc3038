//! `#[subscribe]`: handlers of core NATS messages, outside JetStream (at-most-once
//! publish-subscribe, with optional queue groups). A `#[service]` is a subscription whose
//! handler's result is the reply: it runs here too, and its own parts (replies, errors, the
//! typed request client) are in [`crate::service`](mod@crate::service).
//!
//! Core NATS keeps nothing: a message published while no subscriber listens is gone, and one
//! whose handler fails is not redelivered. Use a `#[consumer]` where that matters.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::handler::CoreOutcome;
use crate::publish::Client;
use crate::service::ERROR_HEADER;
use crate::stream::Location;
use crate::telemetry::DeliveryScope;
use tracing::Instrument;

/// The adapter a `#[subscribe]` or `#[service]` generates.
pub type CoreHandlerFn = fn(CoreDelivery) -> BoxFuture<'static, CoreOutcome>;

/// Which pattern a [`SubscriptionDef`] serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoreKind {
    /// Publish-subscribe: the handler's result is only logged.
    Subscribe,
    /// Request-reply: the handler's result is the reply.
    Service,
}

/// A declared core-NATS subscription. `#[subscribe]` and `#[service]` register one.
#[derive(Clone, Copy)]
pub struct SubscriptionDef {
    pub(crate) name: &'static str,
    pub(crate) subject: &'static str,
    pub(crate) queue: Option<&'static str>,
    pub(crate) concurrency: usize,
    pub(crate) kind: CoreKind,
    pub(crate) handler: CoreHandlerFn,
    pub(crate) location: Location,
    /// The state types its arguments take (see [`crate::State`]), checked at startup.
    pub(crate) needs: &'static [crate::state::NeedFn],
    pub(crate) payload: crate::payload::PayloadSource,
    pub(crate) reply: Option<fn() -> crate::payload::PayloadDescription>,
}

impl std::fmt::Debug for SubscriptionDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionDef")
            .field("name", &self.name)
            .field("subject", &self.subject)
            .field("queue", &self.queue)
            .field("kind", &self.kind)
            .field("location", &self.location)
            .finish_non_exhaustive()
    }
}

impl SubscriptionDef {
    /// A publish-subscribe handler named `name` on `subject` (wildcards allowed).
    pub const fn subscribe(name: &'static str, subject: &'static str, handler: CoreHandlerFn) -> Self {
        SubscriptionDef {
            name,
            subject,
            queue: None,
            concurrency: 1,
            kind: CoreKind::Subscribe,
            handler,
            location: Location::UNKNOWN,
            needs: &[],
            payload: crate::payload::PayloadSource::Unknown,
            reply: None,
        }
    }

    /// A request-reply handler. Instances share the queue group `subject` unless told
    /// otherwise ([`queue`](Self::queue), [`no_queue`](Self::no_queue)), so each request is
    /// answered once.
    pub const fn service(name: &'static str, subject: &'static str, handler: CoreHandlerFn) -> Self {
        SubscriptionDef {
            name,
            subject,
            queue: Some(subject),
            concurrency: 1,
            kind: CoreKind::Service,
            handler,
            location: Location::UNKNOWN,
            needs: &[],
            payload: crate::payload::PayloadSource::Unknown,
            reply: None,
        }
    }

    /// A queue group: each message goes to one member of the group.
    pub const fn queue(mut self, queue: &'static str) -> Self {
        self.queue = Some(queue);
        self
    }

    /// No queue group: every instance receives every message. What a `#[subscribe]` does
    /// unless given a `queue`; for a `#[service]` (`queue = false`), every instance answers
    /// each request, and [`Client::request_many`](crate::Client::request_many) gathers the
    /// replies.
    pub const fn no_queue(mut self) -> Self {
        self.queue = None;
        self
    }

    /// How many handlers run at once in this instance (default 1).
    pub const fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = if concurrency == 0 { 1 } else { concurrency };
        self
    }

    crate::payload::handler_definition_setters!("the payload type the handler decodes", "MyPayload");

    crate::state::needs_setter!();

    /// Records a `#[service]`'s reply type, for the AsyncAPI document
    /// ([`Runtime::asyncapi`](crate::Runtime::asyncapi)); the macros set it. By hand:
    /// `.reply(natty_runtime::__private::describe_payload::<MyPayload>)`.
    pub const fn reply(mut self, describe: fn() -> crate::payload::PayloadDescription) -> Self {
        self.reply = Some(describe);
        self
    }

    /// The handler's name.
    pub fn name(&self) -> &'static str {
        self.name
    }
}

inventory::collect!(SubscriptionDef);

/// One core message as handed to a generated adapter. Not constructed by users.
#[doc(hidden)]
pub struct CoreDelivery {
    pub(crate) subject: Subject,
    pub(crate) payload: Bytes,
    pub(crate) headers: Option<HeaderMap>,
    pub(crate) client: Client,
}

/// A core message's subject and headers, and the client: what a `#[subscribe]` or `#[service]`
/// handler may take besides its payload.
#[derive(Clone, Debug)]
pub struct Envelope {
    subject: Subject,
    headers: Option<HeaderMap>,
    client: Client,
}

impl Envelope {
    /// The subject the message was published to.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The message's headers, if any.
    pub fn headers(&self) -> Option<&HeaderMap> {
        self.headers.as_ref()
    }

    /// The connected client.
    pub fn client(&self) -> &Client {
        &self.client
    }
}

/// An argument of a core handler built from the message rather than decoded from it.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler argument",
    label = "the runtime cannot provide this",
    note = "a #[subscribe] or #[service] handler takes one payload (a serde::Deserialize type, or a Protobuf `Payload`) and optionally `natty_runtime::Envelope`"
)]
pub trait FromCoreDelivery: Sized {
    /// Builds the argument.
    fn from_delivery(delivery: &CoreDelivery) -> Self;
}

impl<T: Clone + Send + Sync + 'static> FromCoreDelivery for crate::State<T> {
    fn from_delivery(delivery: &CoreDelivery) -> Self {
        delivery.client.states.argument()
    }
}

impl FromCoreDelivery for Envelope {
    fn from_delivery(delivery: &CoreDelivery) -> Self {
        Envelope {
            subject: delivery.subject.clone(),
            headers: delivery.headers.clone(),
            client: delivery.client.clone(),
        }
    }
}

/// The task that runs the subscription or service `def` (see [`run`]). It subscribes now, so
/// that a service reported ready receives what is published from then on; should that fail,
/// the task keeps trying.
pub(crate) async fn task(def: SubscriptionDef, client: Client) -> crate::supervise::Task {
    let subscribed = subscribe(&def, &client).await.ok();
    crate::supervise::Task::new(format!("subscription {}", def.name), move |stop| async move {
        run(def, client, subscribed, stop.cancel, stop.hard_stop).await;
        Ok(())
    })
}

/// Subscribes to `def`'s subject, in its queue group if it has one.
async fn subscribe(
    def: &SubscriptionDef,
    client: &Client,
) -> Result<async_nats::Subscriber, async_nats::SubscribeError> {
    let subject = def.subject.to_string();
    match def.queue {
        Some(queue) => client.nats().queue_subscribe(subject, queue.to_string()).await,
        None => client.nats().subscribe(subject).await,
    }
}

/// Runs one subscription (`subscribed` already, or subscribing until it can) until `cancel`,
/// then drains: stops receiving and lets in-flight handlers finish until `hard_stop`.
pub(crate) async fn run(
    def: SubscriptionDef,
    client: Client,
    subscribed: Option<async_nats::Subscriber>,
    cancel: CancellationToken,
    hard_stop: CancellationToken,
) {
    let mut subscriber = match subscribed {
        Some(subscriber) => subscriber,
        None => loop {
            match subscribe(&def, &client).await {
                Ok(subscriber) => break subscriber,
                Err(error) => {
                    tracing::warn!(handler = def.name, subject = def.subject, error = %crate::error::chain(&error), "cannot subscribe; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        },
    };
    let permits = Arc::new(Semaphore::new(def.concurrency));
    loop {
        let permit = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let message = tokio::select! {
            biased;
            _ = cancel.cancelled() => break,
            message = subscriber.next() => message,
        };
        let Some(message) = message else { break };
        let (client, hard_stop) = (client.clone(), hard_stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            handle(def, client, message, hard_stop).await;
        });
    }
    // Messages already delivered to the subscription are still handled: drain, not drop.
    if subscriber.unsubscribe().await.is_ok() {
        while let Ok(Some(message)) = tokio::time::timeout(Duration::from_millis(100), subscriber.next()).await {
            handle(def, client.clone(), message, hard_stop.clone()).await;
        }
    }
    let _ = permits.acquire_many(def.concurrency as u32).await;
}

async fn handle(def: SubscriptionDef, client: Client, message: async_nats::Message, hard_stop: CancellationToken) {
    let reply = message.reply.clone();
    // The handler runs in the trace its message carries (or a new one), as a consumer's does:
    // what it publishes or requests carries a child of it, and its log lines show it.
    let scope = DeliveryScope {
        handler: def.name,
        stream: "",
        consumer: Arc::from(""),
        subject: message.subject.clone(),
        sequence: 0,
        delivery_count: 0,
        trace: crate::telemetry::trace::incoming(message.headers.as_ref()),
    };
    let span = (!crate::telemetry::light()).then(|| {
        let span = tracing::info_span!(
            "natty.handle",
            otel.kind = if def.kind == CoreKind::Service { "server" } else { "consumer" },
            handler = def.name,
            subject = %message.subject,
        );
        crate::telemetry::trace::adopt(&span, message.headers.as_ref());
        span
    });
    let delivery = CoreDelivery {
        subject: message.subject,
        payload: message.payload,
        headers: message.headers,
        client: client.clone(),
    };
    let handled = AssertUnwindSafe((def.handler)(delivery)).catch_unwind();
    let handled = scope.run(handled.instrument(span.unwrap_or_else(tracing::Span::none)));
    let outcome = tokio::select! {
        biased;
        outcome = handled => outcome.unwrap_or_else(|_| CoreOutcome::Failed("the handler panicked".into())),
        _ = hard_stop.cancelled() => CoreOutcome::Failed("the service is shutting down".into()),
    };
    let failure = match outcome {
        CoreOutcome::Done => return,
        CoreOutcome::Reply(body, format) => {
            let Some(reply) = reply.clone() else { return };
            let mut headers = HeaderMap::new();
            format.write_content_type(&mut headers);
            let size = body.len();
            match client.nats().publish_with_headers(reply, headers, body).await {
                Ok(()) => return,
                // Most often larger than the server takes: the requester is told so, rather
                // than left to time out.
                Err(error) => format!("cannot send the reply ({size} bytes): {}", crate::error::chain(&error)),
            }
        }
        CoreOutcome::Failed(error) => crate::error::chain(&*error).to_string(),
        CoreOutcome::Undecodable(error) => crate::error::chain(&error).to_string(),
    };
    tracing::warn!(handler = def.name, subject = def.subject, error = %failure, "handler failed");
    if let (CoreKind::Service, Some(reply)) = (def.kind, reply) {
        let mut headers = HeaderMap::new();
        headers.insert(ERROR_HEADER, error_header(&failure).as_str());
        if let Err(error) = client.nats().publish_with_headers(reply, headers, Bytes::new()).await {
            tracing::warn!(handler = def.name, error = %crate::error::chain(&error), "cannot send the error reply");
        }
    }
}

/// The longest error a reply's header carries, in bytes: far below any server's `max_payload`,
/// so that the error itself always reaches the requester.
const ERROR_HEADER_MAX: usize = 4096;

/// `failure` as a header value: on one line, cut to [`ERROR_HEADER_MAX`] bytes (at a character
/// boundary, marked `...`).
fn error_header(failure: &str) -> String {
    let mut line = failure.replace(['\r', '\n'], " ");
    if line.len() > ERROR_HEADER_MAX {
        let mut end = ERROR_HEADER_MAX - "...".len();
        while !line.is_char_boundary(end) {
            end -= 1;
        }
        line.truncate(end);
        line.push_str("...");
    }
    line
}
