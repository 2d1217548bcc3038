//! The pull protocol for one durable consumer, with credit-based flow control.
//!
//! natty speaks it directly instead of using async-nats' `messages()` stream because it needs
//! to vary how much it asks for as it goes: the window follows the handlers' speed (see
//! [`crate::consumer`]), and a fixed batch size cannot. The protocol (ADR-13): publish
//! `{"batch": n, "expires": ns, "idle_heartbeat": ns}` to `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`
//! with our inbox as reply; the server sends up to `n` messages there, idle heartbeats
//! (status 100) while it has none, and a 408/409 status carrying `Nats-Pending-Messages` when
//! a request ends with credits unused.

use std::time::Duration;

use async_nats::{StatusCode, Subject};
use futures_util::{FutureExt, StreamExt};
use tokio::time::Instant;

/// How long one pull request waits on the server.
const EXPIRES: Duration = Duration::from_secs(30);
/// Idle heartbeat of a pull request.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Silence for this long while credits are outstanding means the requests are gone (server
/// restart, consumer deleted, connection lost).
const STALL: Duration = Duration::from_secs(11);
/// A stall timer that fires this late was held up by a pause of the whole process.
const PAUSED: Duration = Duration::from_secs(1);
/// How often a puller with credits outstanding looks whether the connection was re-made: the
/// server it reconnected to (a restarted one) knows none of its pull requests, and waiting for
/// the stall would leave the consumer idle for `STALL`.
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// What the server sent.
pub(crate) enum Pulled {
    /// A message to handle.
    Message(async_nats::Message),
    /// A pull request ended (expired, or cut short by a leadership change) and its unused
    /// credits came back: ask again. Returned rather than waited through, since with no
    /// credits left nothing more would arrive.
    Credits,
    /// The consumer was deleted on the server.
    ConsumerDeleted,
    /// No message, heartbeat or status for too long, or no responder: the pull may be gone.
    Stalled(&'static str),
    /// The server refuses these pull requests (e.g. a request limit of the consumer).
    Refused(String),
    /// The server turned the last request away because the consumer has as many waiting
    /// requests as it allows (`max_waiting`, shared by every instance): ask again later.
    ///
    /// nats-server 2.15 says so only to requests without an idle heartbeat (ours have one): it
    /// drops ours silently, and the missing heartbeats end it as [`Pulled::Stalled`]. Kept for
    /// servers that do answer.
    Busy,
    /// The subscription closed (the client is shutting down).
    Closed,
}

/// What [`Puller::wait`] saw.
enum Waited {
    /// The subscription's next message (`None`: it closed).
    Message(Option<async_nats::Message>),
    /// A timer found nothing wrong (no reconnect; or it woke late, after a pause): look again.
    Again,
    /// The pull requests are likely gone.
    Stalled(&'static str),
}

/// One consumer's pull subscription and its outstanding credits.
pub(crate) struct Puller {
    client: async_nats::Client,
    next_subject: Subject,
    inbox: Subject,
    subscriber: async_nats::Subscriber,
    /// Messages requested and neither received nor returned: what the server may still send,
    /// including what already sits in the subscription's channel.
    outstanding: usize,
    /// The size of the last request sent: the one a `409 Exceeded MaxWaiting` turns away.
    last_batch: usize,
    /// When the server was last heard from, as of the last check (see `heard`).
    last_heard: Instant,
    /// Something arrived since the last check: the silence starts anew.
    heard: bool,
    /// The connection's reconnect count when the outstanding requests were sent.
    connects: u64,
    /// The one timer of the waits: stall and reconnect are looked at when it fires, every
    /// `RECONNECT_CHECK` while credits are outstanding. Armed once and moved on only when it
    /// fires: a wait is on a delivery's path whenever the consumer keeps up with the server,
    /// and timers made per wait (each put into and taken out of the runtime's timer wheel)
    /// cost more than the rest of it.
    check: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// How long each request waits on the server, and its idle heartbeat.
    expires: Duration,
    heartbeat: Duration,
}

impl Puller {
    /// Subscribes a fresh inbox for `durable` on `stream`.
    pub(crate) async fn start(
        client: &async_nats::Client,
        stream: &str,
        durable: &str,
    ) -> Result<Puller, async_nats::SubscribeError> {
        let inbox: Subject = client.new_inbox().into();
        let subscriber = client.subscribe(inbox.clone()).await?;
        Ok(Puller {
            client: client.clone(),
            next_subject: format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}").into(),
            inbox,
            subscriber,
            outstanding: 0,
            last_batch: 0,
            last_heard: Instant::now(),
            heard: false,
            connects: client.statistics().connects.load(std::sync::atomic::Ordering::Relaxed),
            check: Box::pin(tokio::time::sleep(RECONNECT_CHECK)),
            expires: EXPIRES,
            heartbeat: HEARTBEAT,
        })
    }

    /// Makes each pull request wait at most `expires` on the server (heartbeats every quarter
    /// of it). A partition's owner asks with short requests: once its lease is gone, no
    /// request of its may still be waiting to deliver it messages.
    pub(crate) fn expiring(mut self, expires: Duration) -> Self {
        self.expires = expires.min(EXPIRES);
        self.heartbeat = (self.expires / 4).min(HEARTBEAT);
        self
    }

    /// Asks for more once the credits outstanding fall to half of `target`, so the server
    /// never holds more than `target` for us and requests stay few and large.
    pub(crate) async fn top_up(&mut self, target: usize) -> Result<(), async_nats::PublishError> {
        if target == 0 || self.outstanding > target / 2 {
            return Ok(());
        }
        let batch = target - self.outstanding;
        let body = format!(
            r#"{{"batch":{batch},"expires":{},"idle_heartbeat":{}}}"#,
            self.expires.as_nanos(),
            self.heartbeat.as_nanos()
        );
        self.client
            .publish_with_reply(self.next_subject.clone(), self.inbox.clone(), body.into())
            .await?;
        if self.outstanding == 0 {
            // The stall clock starts with the first credit, not with the last idle period.
            self.last_heard = Instant::now();
            self.heard = false;
            self.check.as_mut().reset(self.last_heard + RECONNECT_CHECK);
            self.connects = self.reconnects();
        }
        self.outstanding += batch;
        self.last_batch = batch;
        tracing::trace!(subject = %self.next_subject, batch, outstanding = self.outstanding, "pull request sent");
        Ok(())
    }

    /// How many times the connection was made.
    fn reconnects(&self) -> u64 {
        self.client
            .statistics()
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next message or event.
    pub(crate) async fn next(&mut self) -> Pulled {
        loop {
            // The hot path: a message already waits in the subscription's channel. It is taken
            // without making the two timers of `wait` (each reads the runtime's handle) and
            // without reading the clock.
            let message = match self.subscriber.next().now_or_never() {
                Some(message) => {
                    self.heard = true;
                    message
                }
                None => match self.wait().await {
                    Waited::Message(message) => message,
                    Waited::Again => continue,
                    Waited::Stalled(why) => {
                        self.outstanding = 0;
                        return Pulled::Stalled(why);
                    }
                },
            };
            let Some(message) = message else {
                return Pulled::Closed;
            };
            if message.status.is_some_and(|status| status != StatusCode::OK) {
                tracing::trace!(status = ?message.status, description = ?message.description, outstanding = self.outstanding, "pull status");
            }
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.outstanding = self.outstanding.saturating_sub(1);
                    return Pulled::Message(message);
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::NO_RESPONDERS) => {
                    self.outstanding = 0;
                    return Pulled::Stalled("no responders: JetStream or the consumer is unavailable");
                }
                Some(StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED | StatusCode::NOT_FOUND) => {
                    let description = message.description.unwrap_or_default();
                    if description == "Consumer Deleted" {
                        self.outstanding = 0;
                        return Pulled::ConsumerDeleted;
                    }
                    if description == "Exceeded MaxWaiting" {
                        // Only the request just sent was turned away; the others still stand.
                        self.outstanding = self.outstanding.saturating_sub(self.last_batch);
                        return Pulled::Busy;
                    }
                    if description.starts_with("Exceeded MaxRequest") || description == "Consumer is push based" {
                        self.outstanding = 0;
                        return Pulled::Refused(description);
                    }
                    // A request ended: its unused credits come back. Without the header (leadership
                    // change, server shutdown) every request is gone.
                    let returned = message
                        .headers
                        .as_ref()
                        .and_then(|headers| headers.get("Nats-Pending-Messages"))
                        .and_then(|value| value.as_str().parse::<usize>().ok());
                    match returned {
                        Some(returned) => self.outstanding = self.outstanding.saturating_sub(returned),
                        None => self.outstanding = 0,
                    }
                    return Pulled::Credits;
                }
                Some(other) => {
                    tracing::debug!(status = %other, description = ?message.description, "unexpected pull status");
                }
            }
        }
    }

    /// Waits for the subscription's next message, watching for a stall and a reconnect while
    /// credits are outstanding.
    async fn wait(&mut self) -> Waited {
        tokio::select! {
            biased;
            message = self.subscriber.next() => {
                self.heard = true;
                Waited::Message(message)
            }
            () = self.check.as_mut(), if self.outstanding > 0 => self.checked(),
        }
    }

    /// What the check timer found: nothing wrong, or the requests likely gone.
    fn checked(&mut self) -> Waited {
        let now = Instant::now();
        let late = now.saturating_duration_since(self.check.deadline());
        self.check.as_mut().reset(now + RECONNECT_CHECK);
        if std::mem::take(&mut self.heard) {
            // Heard from since the last check (at most `RECONNECT_CHECK` ago): the silence, if
            // any, starts about now.
            self.last_heard = now;
            return Waited::Again;
        }
        if late > PAUSED {
            // Woken long after its time: this process was paused (SIGSTOP, a frozen VM), not
            // the server silent. What it sent meanwhile may still be unread: give it a
            // heartbeat's time to speak before judging, rather than dropping credits the
            // server still holds and asking for them twice.
            self.last_heard = now;
            return Waited::Again;
        }
        if self.reconnects() != self.connects {
            return Waited::Stalled("reconnected: the server may not know the pull requests");
        }
        if now >= self.last_heard + STALL {
            return Waited::Stalled("no message or heartbeat from the server");
        }
        Waited::Again
    }

    /// Asks for nothing more and listens until every request sent has ended (its messages came
    /// or its unused credits came back), at most `listen`; then [`stop`](Puller::stop)s. Returns
    /// the messages that came meanwhile.
    pub(crate) async fn finish(mut self, listen: Duration, within: Duration) -> Vec<async_nats::Message> {
        let deadline = Instant::now() + listen;
        let mut left = Vec::new();
        while self.outstanding > 0 {
            match tokio::time::timeout_at(deadline, self.next()).await {
                Ok(Pulled::Message(message)) => left.push(message),
                Ok(Pulled::Credits) => {}
                // Gone, refused or silent: nothing more will come from these requests.
                Ok(_) | Err(_) => break,
            }
        }
        left.extend(self.stop(within).await);
        left
    }

    /// Stops the subscription and returns the messages already sent to it, so they can be
    /// handed back; waits at most `within`.
    pub(crate) async fn stop(mut self, within: Duration) -> Vec<async_nats::Message> {
        let mut left = Vec::new();
        let deadline = Instant::now() + within;
        // Drain, not drop: messages the server sent before it saw the unsubscribe still arrive.
        // With the server gone the connection may take nothing: the deadline bounds that too.
        if !matches!(
            tokio::time::timeout_at(deadline, self.subscriber.drain()).await,
            Ok(Ok(()))
        ) {
            return left;
        }
        while let Ok(Some(message)) = tokio::time::timeout_at(deadline, self.subscriber.next()).await {
            if matches!(message.status, None | Some(StatusCode::OK)) {
                left.push(message);
            }
        }
        left
    }
}

/// Stream sequence and delivery count from a JetStream reply subject (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...`).
/// Read for every message a consumer takes: the two numbers only.
pub(crate) fn delivery_info(reply: &str) -> Option<(u64, u64)> {
    let tokens = AckTokens::read(reply)?;
    Some((tokens.number(1)?, tokens.number(0)?))
}

/// What a JetStream reply subject says of its message (read by capture, which stores it):
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>` (v1),
/// or `$JS.ACK.<domain>.<account hash>.<stream>.<consumer>.<delivered>.<stream seq>...` (v2).
#[cfg(feature = "capture")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DeliveryMeta {
    /// The stream sequence.
    pub(crate) sequence: u64,
    /// How many times it was delivered, this time included.
    pub(crate) delivered: u64,
    /// When the stream stored it, in nanoseconds since the Unix epoch (the server's clock).
    pub(crate) timestamp_nanos: u64,
    /// Messages left in the stream for this consumer after this one.
    pub(crate) pending: u64,
}

/// Everything a reply subject says (see [`DeliveryMeta`]); `None` for anything else.
#[cfg(feature = "capture")]
pub(crate) fn delivery_meta(reply: &str) -> Option<DeliveryMeta> {
    let tokens = AckTokens::read(reply)?;
    Some(DeliveryMeta {
        delivered: tokens.number(0)?,
        sequence: tokens.number(1)?,
        timestamp_nanos: tokens.number(3)?,
        pending: tokens.number(4)?,
    })
}

/// The tokens of a JetStream reply subject, found in one pass (`memchr` for the dots; the
/// stream and consumer names are skipped at its speed), numbers read only when asked for:
/// `str::split` and `u64::from_str` cost more than the rest of holding a message.
struct AckTokens<'a> {
    bytes: &'a [u8],
    /// Where each token starts; twelve at most are read (the v2 form's last is a random token,
    /// and any the server adds after it are not ours to read).
    starts: [usize; 12],
    count: usize,
    /// The index of the delivery count's token: 4 (v1) or 6 (v2).
    numbers: usize,
}

impl<'a> AckTokens<'a> {
    fn read(reply: &'a str) -> Option<AckTokens<'a>> {
        let bytes = reply.as_bytes();
        let mut tokens = AckTokens {
            bytes,
            starts: [0; 12],
            count: 1,
            numbers: 0,
        };
        for dot in memchr::memchr_iter(b'.', bytes) {
            if tokens.count == tokens.starts.len() {
                break;
            }
            tokens.starts[tokens.count] = dot + 1;
            tokens.count += 1;
        }
        if tokens.count < 2 || tokens.token(0) != b"$JS" || tokens.token(1) != b"ACK" {
            return None;
        }
        tokens.numbers = match tokens.count {
            9 => 4,
            11 | 12 => 6,
            _ => return None,
        };
        Some(tokens)
    }

    fn token(&self, index: usize) -> &'a [u8] {
        let end = if index + 1 < self.count {
            self.starts[index + 1] - 1
        } else {
            self.bytes.len()
        };
        &self.bytes[self.starts[index]..end]
    }

    /// The `index`-th number: 0 the delivery count, 1 the stream sequence, 2 the consumer
    /// sequence, 3 the timestamp, 4 the pending count.
    fn number(&self, index: usize) -> Option<u64> {
        decimal(self.token(self.numbers + index))
    }
}

/// A non-empty run of ASCII digits as a `u64`; `None` for anything else or on overflow.
fn decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |value, digit| {
        let digit = digit.checked_sub(b'0').filter(|digit| *digit < 10)?;
        value.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

#[cfg(test)]
mod tests {
    use super::delivery_info;

    #[test]
    fn parses_both_reply_formats() {
        assert_eq!(
            delivery_info("$JS.ACK.orders.billing.3.100.7.1790230470084404000.42"),
            Some((100, 3))
        );
        assert_eq!(
            delivery_info("$JS.ACK._.szMpdrwD.orders.billing.1.5.1.1790230470084404000.1"),
            Some((5, 1))
        );
        assert_eq!(
            delivery_info("$JS.ACK.hub.szMpdrwD.orders.billing.2.9.4.1790230470084404000.0.tok"),
            Some((9, 2))
        );
        assert_eq!(delivery_info("_INBOX.abc"), None);
        assert_eq!(delivery_info("$JS.ACK.orders.billing.x.5.1.1.1"), None);
        assert_eq!(delivery_info("$JS.ACK.orders.billing..5.1.1.1"), None);
        assert_eq!(delivery_info("$JS.ACK.orders.billing.+3.5.1.1.1"), None);
        assert_eq!(delivery_info("$JS.ACK.orders.billing.3.5.1.1"), None);
        assert_eq!(
            delivery_info("$JS.ACK.orders.billing.3.99999999999999999999.1.1.1"),
            None
        );
        assert_eq!(
            delivery_info("$JS.ACK.hub.szMpdrwD.orders.billing.2.9.4.1790230470084404000.0.tok.more.x"),
            Some((9, 2))
        );
        assert_eq!(delivery_info("$JS.ACK"), None);
        assert_eq!(delivery_info(""), None);
        #[cfg(feature = "capture")]
        assert_eq!(
            super::delivery_meta("$JS.ACK.orders.billing.3.100.7.1790230470084404000.42"),
            Some(super::DeliveryMeta {
                sequence: 100,
                delivered: 3,
                timestamp_nanos: 1790230470084404000,
                pending: 42
            })
        );
    }
}

#[cfg(all(test, feature = "testing"))]
mod server_tests {
    use std::time::Duration;

    use async_nats::jetstream::{self, consumer::pull};

    use super::{Pulled, Puller, STALL};
    use crate::testing::NatsServer;

    /// A whole-process pause longer than the stall timeout (SIGSTOP, a frozen VM) is not taken
    /// for the server's silence: the credits the server still holds are not dropped, so they
    /// are not asked for twice. The server is stopped too while this process is blocked, so
    /// nothing it sends can race the judgement.
    #[tokio::test(flavor = "current_thread")]
    async fn a_process_pause_is_not_taken_for_a_stall() {
        let server = NatsServer::start().await.expect("nats-server");
        let client = server.client().await;
        let js = jetstream::new(client.clone());
        js.create_stream(jetstream::stream::Config {
            name: "s".into(),
            subjects: vec!["s.>".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .create_consumer(pull::Config {
            durable_name: Some("d".into()),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut puller = Puller::start(&client, "s", "d").await.unwrap();
        puller.top_up(10).await.unwrap();
        client.flush().await.unwrap();
        // The whole process stands still past the stall timeout; the server says nothing.
        server.signal(19); // SIGSTOP
        std::thread::sleep(STALL + Duration::from_secs(2));
        let judged = tokio::time::timeout(Duration::from_millis(500), puller.next()).await;
        server.signal(18); // SIGCONT
        assert!(
            judged.is_err(),
            "woken from a pause, the puller must not report a stall at once"
        );
        assert_eq!(puller.outstanding, 10, "the server still holds the request's credits");
        let publisher = jetstream::new(server.client().await);
        publisher.publish("s.one", "1".into()).await.unwrap().await.unwrap();
        let pulled = tokio::time::timeout(Duration::from_secs(10), puller.next())
            .await
            .unwrap();
        assert!(matches!(pulled, Pulled::Message(_)), "the request still stands");
        assert_eq!(puller.outstanding, 9);
    }
}
