//! Publish acks gathered on one subscription of natty's own.
//!
//! async-nats answers a JetStream publish as a request: a fresh inbox string, a timer armed
//! for the send and another for the ack, and the ack parsed through an untagged enum (which
//! buffers the whole JSON document before it picks a side). At the rates a publisher reaches,
//! that made a natty publish cost the client ~6 µs of CPU, more than the server's own work on
//! it. Here every publish of a [`Client`](super::Client) is sent with a reply subject
//! `<inbox>.<n>` under one wildcard subscription: the answer finds its waiter by `n`, one
//! sweep a quarter second fails the waiters whose time is up, and the ack is parsed into a
//! plain struct. The semantics are async-nats': the same error kinds for the same answers
//! ("no responders" is `StreamNotFound`, wrong-last expectations their own kinds, no answer
//! in time `TimedOut`), the same bound on publishes in flight, waiting for room when full.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::ErrorCode;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

/// How long an ack may take: async-nats' JetStream default.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waiters past their time are failed.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Most publishes awaiting their ack at once; a publish beyond waits for room (async-nats'
/// JetStream default), so a publisher that never awaits its acks cannot grow without bound.
const MAX_IN_FLIGHT: usize = 5_000;

/// What a waiter receives: the answer, or why none will come.
type Answer = Result<async_nats::Message, PublishError>;

/// The ack side of one client's publishes. When the last clone of its client and the last
/// publish awaiting its ack are dropped, the dispatcher stops and the subscription ends.
pub(crate) struct Acks {
    nats: async_nats::Client,
    shared: Arc<Shared>,
    /// The reply subject prefix (`<inbox>.`), once the subscription is up.
    prefix: tokio::sync::OnceCell<String>,
    room: Arc<Semaphore>,
    stop: CancellationToken,
    /// Shared with every [`Awaiting`]: an ack awaited after its client was dropped still comes.
    keep: Arc<DropGuard>,
}

impl std::fmt::Debug for Acks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acks")
            .field("prefix", &self.prefix.get())
            .field("in_flight", &(MAX_IN_FLIGHT - self.room.available_permits()))
            .finish()
    }
}

#[derive(Default)]
struct Shared {
    next: AtomicU64,
    waiting: Mutex<Waiting>,
}

#[derive(Default)]
struct Waiting {
    by_id: HashMap<u64, Waiter>,
    /// The dispatcher has ended: nothing will answer a new waiter.
    closed: bool,
}

struct Waiter {
    answer: oneshot::Sender<Answer>,
    deadline: Instant,
}

impl Acks {
    pub(crate) fn new(nats: async_nats::Client) -> Acks {
        let stop = CancellationToken::new();
        Acks {
            nats,
            shared: Arc::default(),
            prefix: tokio::sync::OnceCell::new(),
            room: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            keep: Arc::new(stop.clone().drop_guard()),
            stop,
        }
    }

    /// Sends one message whose ack comes back through this client's subscription.
    pub(crate) async fn send(
        &self,
        subject: async_nats::Subject,
        headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
    ) -> Result<Awaiting, PublishError> {
        let prefix = self
            .prefix
            .get_or_try_init(|| self.subscribe())
            .await
            .map_err(|error| PublishError::with_source(PublishErrorKind::Other, error))?;
        let permit = self
            .room
            .clone()
            .acquire_owned()
            .await
            .map_err(|error| PublishError::with_source(PublishErrorKind::Other, error))?;
        let id = self.shared.next.fetch_add(1, Ordering::Relaxed);
        let (answer, receiver) = oneshot::channel();
        {
            let mut waiting = lock(&self.shared.waiting);
            if waiting.closed {
                return Err(PublishError::new(PublishErrorKind::BrokenPipe));
            }
            waiting.by_id.insert(
                id,
                Waiter {
                    answer,
                    deadline: Instant::now() + ACK_TIMEOUT,
                },
            );
        }
        let mut reply = String::with_capacity(prefix.len() + 20);
        reply.push_str(prefix);
        reply.push_str(itoa::Buffer::new().format(id));
        if let Err(error) = self
            .nats
            .publish_with_reply_and_headers(subject, reply, headers, payload)
            .await
        {
            lock(&self.shared.waiting).by_id.remove(&id);
            let kind = match error.kind() {
                async_nats::client::PublishErrorKind::MaxPayloadExceeded => PublishErrorKind::MaxPayloadExceeded,
                _ => PublishErrorKind::Other,
            };
            return Err(PublishError::with_source(kind, error));
        }
        Ok(Awaiting {
            answer: receiver,
            _room: permit,
            _keep: self.keep.clone(),
        })
    }

    /// Subscribes to `<inbox>.*` and starts the dispatcher; the prefix replies are built on.
    async fn subscribe(&self) -> Result<String, async_nats::SubscribeError> {
        let mut prefix = self.nats.new_inbox();
        prefix.push('.');
        let subscription = self.nats.subscribe(format!("{prefix}*")).await?;
        tokio::spawn(dispatch(
            subscription,
            prefix.len(),
            self.shared.clone(),
            self.stop.clone(),
        ));
        Ok(prefix)
    }
}

/// Hands each answer to its waiter and fails the waiters whose time is up, until the client
/// is dropped or the connection closed; then fails every waiter left.
///
/// Answers come about as fast as a publisher sends, so each wake hands over every answer
/// already here under one lock, and the select (whose cancellation branch locks twice to
/// register its waiter and again to drop it) runs once per wake, not once per answer.
async fn dispatch(
    mut subscription: async_nats::Subscriber,
    prefix_len: usize,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Reused from wake to wake: the answers just read, then their waiters.
    let (mut arrived, mut handing) = (Vec::new(), Vec::new());
    'dispatch: loop {
        tokio::select! {
            biased;
            // First, so that a steady stream of answers does not keep late waiters waiting.
            _ = sweep.tick() => {
                let now = Instant::now();
                let mut expired = Vec::new();
                {
                    let mut waiting = lock(&shared.waiting);
                    // A waiter whose publish was dropped unawaited goes too.
                    waiting.by_id.retain(|_, waiter| !waiter.answer.is_closed());
                    let late: Vec<u64> = waiting
                        .by_id
                        .iter()
                        .filter(|(_, waiter)| waiter.deadline <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in late {
                        expired.extend(waiting.by_id.remove(&id).map(|waiter| waiter.answer));
                    }
                }
                for answer in expired {
                    let _ = answer.send(Err(PublishError::new(PublishErrorKind::TimedOut)));
                }
            }
            message = subscription.next() => {
                let mut closed = message.is_none();
                arrived.extend(message);
                while let Some(next) = subscription.next().now_or_never() {
                    match next {
                        Some(message) => arrived.push(message),
                        None => {
                            closed = true;
                            break;
                        }
                    }
                }
                {
                    let mut waiting = lock(&shared.waiting);
                    handing.extend(arrived.drain(..).filter_map(|message| {
                        let id = message.subject.get(prefix_len..)?.parse::<u64>().ok()?;
                        // No waiter: its time was up, or its publish was dropped unawaited.
                        Some((waiting.by_id.remove(&id)?, message))
                    }));
                }
                // Outside the lock, which every publish takes to make its waiter.
                for (waiter, message) in handing.drain(..) {
                    let _ = waiter.answer.send(Ok(message));
                }
                if closed {
                    break 'dispatch;
                }
            }
            () = stop.cancelled() => break,
        }
    }
    let left = {
        let mut waiting = lock(&shared.waiting);
        waiting.closed = true;
        std::mem::take(&mut waiting.by_id)
    };
    for (_, waiter) in left {
        let _ = waiter.answer.send(Err(PublishError::new(PublishErrorKind::BrokenPipe)));
    }
}

/// A lock that a panic elsewhere does not poison for good: the map stays consistent, since
/// every critical section is a single insert, remove or retain.
fn lock(waiting: &Mutex<Waiting>) -> std::sync::MutexGuard<'_, Waiting> {
    waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A sent publish waiting for its ack; holds its place among the publishes in flight.
pub(crate) struct Awaiting {
    answer: oneshot::Receiver<Answer>,
    _room: OwnedSemaphorePermit,
    _keep: Arc<DropGuard>,
}

impl std::future::Future for Awaiting {
    type Output = Result<PublishAck, PublishError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(&mut self.answer)
            .poll(cx)
            .map(|answer| match answer {
                Ok(Ok(message)) => read_ack(&message),
                Ok(Err(error)) => Err(error),
                Err(_) => Err(PublishError::new(PublishErrorKind::BrokenPipe)),
            })
    }
}

/// The stream's answer to a publish, as async-nats reads it: "no responders" means no stream
/// takes the subject; an error document keeps its code.
fn read_ack(message: &async_nats::Message) -> Result<PublishAck, PublishError> {
    if message.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
        return Err(PublishError::new(PublishErrorKind::StreamNotFound));
    }
    let answer: AckDocument = serde_json::from_slice(&message.payload)
        .map_err(|error| PublishError::with_source(PublishErrorKind::Other, error))?;
    if let Some(error) = answer.error {
        let kind = match error.error_code() {
            ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => PublishErrorKind::WrongLastMessageId,
            ErrorCode::STREAM_WRONG_LAST_SEQUENCE => PublishErrorKind::WrongLastSequence,
            _ => PublishErrorKind::Other,
        };
        return Err(PublishError::with_source(kind, error));
    }
    match (answer.stream, answer.seq) {
        (Some(stream), Some(sequence)) => Ok(PublishAck {
            stream,
            sequence,
            domain: answer.domain,
            duplicate: answer.duplicate,
            value: answer.val,
            ..PublishAck::default()
        }),
        _ => Err(PublishError::with_source(
            PublishErrorKind::Other,
            format!(
                "an answer that is neither an ack nor an error: {}",
                String::from_utf8_lossy(&message.payload)
            ),
        )),
    }
}

/// A publish ack or error, in one plain struct: both shapes parse in a single pass.
#[derive(serde::Deserialize)]
struct AckDocument {
    #[serde(default)]
    error: Option<async_nats::jetstream::Error>,
    #[serde(default)]
    stream: Option<String>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    domain: String,
    #[serde(default)]
    duplicate: bool,
    #[serde(default)]
    val: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(payload: &str) -> async_nats::Message {
        async_nats::Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: payload.to_owned().into(),
            headers: None,
            status: None,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn acks_and_errors_read_as_async_nats_reads_them() {
        let ack = read_ack(&answer(r#"{"stream":"orders","seq":42,"duplicate":true}"#)).unwrap();
        assert_eq!((ack.stream.as_str(), ack.sequence, ack.duplicate), ("orders", 42, true));
        let ack = read_ack(&answer(r#"{"stream":"orders","domain":"hub","seq":7}"#)).unwrap();
        assert_eq!((ack.domain.as_str(), ack.duplicate), ("hub", false));

        let wrong = r#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 3"}}"#;
        assert_eq!(
            read_ack(&answer(wrong)).unwrap_err().kind(),
            PublishErrorKind::WrongLastSequence
        );
        let wrong = r#"{"error":{"code":400,"err_code":10070,"description":"wrong last msg ID: a"}}"#;
        assert_eq!(
            read_ack(&answer(wrong)).unwrap_err().kind(),
            PublishErrorKind::WrongLastMessageId
        );
        let other = r#"{"error":{"code":503,"err_code":10008,"description":"unavailable"}}"#;
        let error = read_ack(&answer(other)).unwrap_err();
        assert_eq!(error.kind(), PublishErrorKind::Other);
        assert_eq!(
            crate::classify::failure(&error),
            crate::classify::Failure::Unavailable,
            "the server's code stays readable through the error's source"
        );

        let mut none = answer("");
        none.status = Some(async_nats::StatusCode::NO_RESPONDERS);
        assert_eq!(read_ack(&none).unwrap_err().kind(), PublishErrorKind::StreamNotFound);
        assert_eq!(read_ack(&answer("{}")).unwrap_err().kind(), PublishErrorKind::Other);
        assert_eq!(
            read_ack(&answer("not json")).unwrap_err().kind(),
            PublishErrorKind::Other
        );
    }

    /// An ack awaited after its client was dropped still arrives; a publish that something
    /// other than a stream receives, and nobody answers, times out as async-nats' would; a
    /// subject no stream takes is "no responders".
    #[cfg(feature = "testing")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn acks_outlive_their_client_and_silence_times_out() {
        use crate::publish::{Client, PublishError as Error};
        let server = crate::testing::NatsServer::start().await.expect("nats-server");
        let nats = server.client().await;
        async_nats::jetstream::new(nats.clone())
            .create_stream(async_nats::jetstream::stream::Config {
                name: "acks".into(),
                subjects: vec!["acks.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();

        let client = Client::new(nats.clone());
        let mut pending = Vec::new();
        for i in 0..3 {
            pending.push(client.send("acks.kept", &i).await.unwrap());
        }
        drop(client);
        for (i, ack) in futures_util::future::try_join_all(pending)
            .await
            .unwrap()
            .into_iter()
            .enumerate()
        {
            assert_eq!((ack.stream.as_str(), ack.sequence), ("acks", i as u64 + 1));
        }

        let client = Client::new(nats.clone());
        match client.publish("nowhere.at.all", &1).await {
            Err(Error::NoStream { subject }) => assert_eq!(subject, "nowhere.at.all"),
            other => panic!("expected NoStream, got {other:?}"),
        }

        // A plain subscriber takes the message and never answers.
        let _silent = nats.subscribe("silent").await.unwrap();
        nats.flush().await.unwrap();
        let started = std::time::Instant::now();
        let answer = client.send("silent", &1).await.unwrap().await;
        match answer {
            Err(Error::Unconfirmed { ref source, .. }) => assert_eq!(source.kind(), PublishErrorKind::TimedOut),
            ref other => panic!("expected a timeout, got {other:?}"),
        }
        let took = started.elapsed();
        assert!(
            took >= ACK_TIMEOUT && took < ACK_TIMEOUT + Duration::from_secs(2),
            "timed out after {took:?}"
        );
    }
}
