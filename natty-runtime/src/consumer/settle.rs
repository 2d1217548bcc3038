//! Running the handler for one delivery and settling it: ack, nak with backoff, in-progress
//! holds, and terminate with a dead letter that keeps the original's headers and says why.

use super::*;

impl Consumer {
    /// Runs the handler for one message and settles it, in a span that continues the trace
    /// the message's headers carry. Holds `permit` until settled.
    pub(super) async fn deliver(self: Arc<Self>, ready: Ready, permit: OwnedSemaphorePermit) {
        if self.lease.as_ref().is_some_and(|lease| !lease.is_valid()) {
            // The lease ended (this process may have been frozen past it): the next holder
            // handles the message.
            // Boxed: a rare path, kept out of every delivery's future (see below).
            Box::pin(self.give_back(ready)).await;
            drop(permit);
            self.room.notify_one();
            return;
        }
        let stream_sequence = ready.sequence;
        let def = &self.def;
        let metrics = &self.metrics;
        metrics.delivered.inc();
        let in_flight = metrics.enter();
        let span: Option<tracing::Span>;
        let started: Option<std::time::Instant>;
        // The future is made in a block and awaited as it is: the block's locals end before
        // the await, so they take no place in this future (a local moved from keeps its place
        // until its scope ends). One future type whether or not there is a span (entering
        // `Span::none()` is a branch), for the same reason. The settling's future (904 bytes)
        // is boxed: made on the stack, it was copied whole into the span's wrapper, then the
        // scope's, then this future, three copies per message against one into its box (memmove
        // calls counted with a uprobe; see bench/RESULTS.md, 2026-12-06 eighth session).
        let settled = {
            let Ready {
                message,
                reply,
                sequence: _,
                delivered: delivery_count,
            } = ready;
            // What logs and trace context need of this delivery, for the handler's whole run.
            let scope = DeliveryScope {
                handler: def.name,
                stream: def.stream,
                consumer: self.name.clone(),
                subject: message.subject.clone(),
                sequence: stream_sequence,
                delivery_count,
                trace: crate::telemetry::trace::incoming(message.headers.as_ref()),
            };
            // A span per delivery only where something records it: with natty's own subscriber
            // and no exporter, the scope gives logs their fields and publishes their trace context.
            span = (!crate::telemetry::light()).then(|| {
                let span = tracing::info_span!(
                    "natty.deliver",
                    otel.kind = "consumer",
                    otel.status_code = tracing::field::Empty,
                    handler = def.name,
                    stream = def.stream,
                    consumer = &*self.name,
                    subject = %message.subject,
                    sequence = stream_sequence,
                    delivery_count,
                    outcome = tracing::field::Empty,
                    duration_ms = tracing::field::Empty,
                );
                crate::telemetry::trace::adopt(&span, message.headers.as_ref());
                span
            });
            started = span.is_some().then(std::time::Instant::now);
            scope.run(
                Box::pin(self.settle_one(
                    Original {
                        subject: message.subject,
                        payload: message.payload,
                        headers: message.headers.map(Arc::new),
                        stream_sequence,
                        delivery_count,
                    },
                    reply,
                ))
                .instrument(span.clone().unwrap_or_else(tracing::Span::none)),
            )
        }
        .await;
        drop(in_flight);
        // Settled (or given up on at the drain timeout): no longer ours to keep alive.
        self.held.release(stream_sequence);
        drop(permit);
        self.room.notify_one();
        settled.count(metrics);
        if let (Some(span), Some(started)) = (span, started) {
            if settled != Settled::Acked {
                span.record("otel.status_code", "error");
            }
            span.record("outcome", settled.as_str());
            span.record("duration_ms", started.elapsed().as_secs_f64() * 1e3);
        }
    }

    /// Runs the handler (again, in place, for an ordered consumer) until the message is settled.
    pub(super) async fn settle_one(
        &self,
        // Kept for a dead letter and for retries in place: the handler takes its delivery.
        original: Original,
        reply: Subject,
    ) -> Settled {
        let (stream_sequence, delivery_count) = (original.stream_sequence, original.delivery_count);
        let settle = Settle {
            client: self.shared.client.nats(),
            reply: reply.clone(),
        };
        let def = &self.def;
        // Ordered consumers retry in place, holding their key's lane, so that the message
        // after this one never overtakes it; others nak and let the server redeliver.
        let in_place = def.order_by.is_some();
        // The rare paths below (dead letter, nak with a delay, retry in place) are boxed: inline,
        // their state would be part of this future, which is copied into its box per message
        // (see `deliver`).
        let mut attempt = delivery_count;
        loop {
            // Made where it is awaited, like the delivery (see `deliver`).
            let attempted = self
                .attempt(
                    Delivery {
                        subject: original.subject.clone(),
                        reply: reply.clone(),
                        payload: original.payload.clone(),
                        headers: original.headers.clone(),
                        stream_sequence,
                        delivery_count: attempt,
                        shared: self.shared.clone(),
                    },
                    &settle,
                )
                .await;
            let Some(outcome) = attempted else {
                return Settled::CutOff;
            };
            if self.shared.handler_acks.take(stream_sequence) {
                // `ctx.ack()` acked it: what the handler did after that changes nothing.
                if !matches!(outcome, Ok(Outcome::Ack)) {
                    tracing::warn!(
                        handler = def.name,
                        stream = def.stream,
                        consumer = &*self.name,
                        sequence = stream_sequence,
                        "the handler failed after acking its message; it is not retried"
                    );
                }
                return Settled::Acked;
            }
            let last_attempt = def.max_deliver.is_some_and(|max| attempt >= max as u64);
            let failure = match outcome {
                Ok(Outcome::Ack) => {
                    match def.ack {
                        Ack::Sent => settle.send(Bytes::from_static(b"+ACK")).await,
                        Ack::Confirmed => {
                            if let Err(error) = Box::pin(confirm(&self.shared, &reply, b"+ACK")).await {
                                self.unconfirmed(&error);
                            }
                        }
                    }
                    return Settled::Acked;
                }
                Ok(Outcome::Failed(error)) => match error.downcast::<Reject>() {
                    Ok(reject) => match reject.0 {
                        RejectKind::Terminate(reason) => {
                            tracing::warn!(handler = def.name, stream = def.stream, consumer = &*self.name,
                                sequence = stream_sequence, %reason, "handler terminated the message");
                            return Box::pin(self.dead_letter_and_terminate(&settle, original, &reason)).await;
                        }
                        RejectKind::Retry if !last_attempt && !in_place => {
                            Box::pin(settle.send(Bytes::from_static(b"-NAK"))).await;
                            return Settled::Naked;
                        }
                        RejectKind::RetryAfter(delay) if !last_attempt && !in_place => {
                            Box::pin(settle.nak(delay)).await;
                            return Settled::Naked;
                        }
                        RejectKind::Retry => (Duration::ZERO, "the handler asked for a retry".to_string()),
                        RejectKind::RetryAfter(delay) => (delay, "the handler asked for a retry".to_string()),
                    },
                    Err(error) => (def.retry_delay(attempt), crate::error::chain(&*error).to_string()),
                },
                Ok(Outcome::Undecodable(error)) => {
                    tracing::error!(
                        handler = def.name, stream = def.stream, consumer = &*self.name, sequence = stream_sequence,
                        payload_type = error.type_name, error = %crate::error::chain(&error),
                        "terminating a message whose payload cannot be decoded (stream {}, consumer {}, sequence {})",
                        def.stream, self.name, stream_sequence
                    );
                    let reason = crate::error::chain(&error).to_string();
                    return Box::pin(self.dead_letter_and_terminate(&settle, original, &reason)).await;
                }
                Err(panic) => {
                    let what = panic_message(&*panic);
                    (def.retry_delay(attempt), format!("the handler panicked: {what}"))
                }
            };
            let (delay, failure) = failure;
            if last_attempt {
                let reason = format!("failed on the last of {attempt} deliveries: {failure}");
                tracing::error!(handler = def.name, stream = def.stream, consumer = &*self.name,
                    sequence = stream_sequence, %reason, "giving up on the message");
                return Box::pin(self.dead_letter_and_terminate(&settle, original, &reason)).await;
            }
            tracing::warn!(
                handler = def.name, stream = def.stream, consumer = &*self.name, sequence = stream_sequence,
                delivery_count = attempt, error = %failure, retry_in = ?delay,
                "handler failed; the message will be redelivered"
            );
            if !in_place {
                Box::pin(settle.nak(delay)).await;
                return Settled::Naked;
            }
            // Wait out the delay holding the message (pinging so it stays ours), then go again.
            if !Box::pin(self.hold(&settle, delay)).await {
                return Settled::CutOff;
            }
            attempt += 1;
        }
    }

    /// Runs the handler once; `None` if the drain timeout cut it off (the message was naked).
    pub(super) async fn attempt(
        &self,
        delivery: Delivery,
        settle: &Settle<'_>,
    ) -> Option<std::thread::Result<Outcome>> {
        let def = &self.def;
        let sequence = delivery.stream_sequence;
        // Runs inside the delivery's span (see `deliver`).
        let handled = AssertUnwindSafe((def.handler)(delivery)).catch_unwind();
        tokio::pin!(handled);
        let started = std::time::Instant::now();
        // The keep-alive task pings the message while the handler runs (see `keep_alive`).
        tokio::select! {
            biased;
            outcome = &mut handled => {
                let took = started.elapsed();
                self.pacing.record(took);
                self.metrics.handled_in(took);
                Some(outcome)
            }
            _ = self.hard_stop.cancelled() => {
                if self.shared.handler_acks.contains(sequence) {
                    // Acked by the handler already: a nak now would be a lie.
                    tracing::warn!(stream = def.stream, consumer = &*self.name, sequence,
                        "drain timeout: handler still running after acking its message");
                } else {
                    tracing::warn!(stream = def.stream, consumer = &*self.name, sequence,
                        "drain timeout: handler still running; nak so the message is redelivered");
                    Box::pin(self.nak(settle.reply.clone())).await;
                }
                None
            }
        }
    }

    /// Logs and counts an ack `ack = "confirmed"` could not confirm (the message may come again).
    pub(super) fn unconfirmed(&self, error: &AckError) {
        tracing::warn!(handler = self.def.name, error = %error, "the message may be delivered again");
        self.metrics.acks_unconfirmed.inc();
    }

    /// Keeps a message for `delay` without handling it (the keep-alive task pings it); false if
    /// the drain timeout came first (the message was naked).
    pub(super) async fn hold(&self, settle: &Settle<'_>, delay: Duration) -> bool {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(delay) => true,
            _ = self.hard_stop.cancelled() => {
                self.nak(settle.reply.clone()).await;
                false
            }
        }
    }

    /// Republishes the message to the dead-letter subject, with where it came from and why in
    /// its headers, then terminates it. The copy carries a message id derived from the stream,
    /// the consumer and the sequence, so a retried dead letter is stored once, and two
    /// consumers giving up on one message store one each. A copy that the headers would push
    /// past the server's `max_payload` is sent without its payload, saying so. If the copy cannot
    /// be stored, the message is naked instead of terminated: it is never dropped unrecorded.
    pub(crate) async fn dead_letter_and_terminate(
        &self,
        settle: &Settle<'_>,
        original: Original,
        reason: &str,
    ) -> Settled {
        let sequence = original.stream_sequence;
        let reason = reason.replace(['\r', '\n'], " ");
        // Kept in progress between attempts.
        let stored = self
            .store_dead_letter(original, &reason, || settle.send(Bytes::from_static(b"+WPI")))
            .await;
        if stored {
            settle.send(format!("+TERM {reason}").into()).await;
            Settled::Terminated
        } else {
            tracing::error!(
                stream = self.def.stream, consumer = &*self.name, sequence,
                dead_letter = %self.dead_letter, %reason,
                "cannot store the dead letter (is a stream capturing its subject?); the message stays in its stream, naked"
            );
            settle.nak(Duration::from_secs(30)).await;
            Settled::Naked
        }
    }

    /// Publishes `original`'s dead letter (see [`dead_letter_and_terminate`](Consumer::dead_letter_and_terminate)),
    /// up to three attempts, `between` them; whether it was stored.
    pub(crate) async fn store_dead_letter<F, Fut>(&self, original: Original, reason: &str, mut between: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let def = &self.def;
        // Header values are single lines.
        let reason = reason.replace(['\r', '\n'], " ");
        let mut headers = without_publish_directives(original.headers.map(Arc::unwrap_or_clone));
        headers.insert("Natty-Dead-Letter-Reason", reason.as_str());
        headers.insert("Natty-Original-Subject", original.subject.as_str());
        headers.insert("Natty-Original-Stream", def.stream);
        headers.insert("Natty-Original-Consumer", &*self.name);
        headers.insert("Natty-Original-Sequence", original.stream_sequence.to_string().as_str());
        headers.insert("Natty-Delivery-Count", original.delivery_count.to_string().as_str());
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!(
                "natty-dead-letter:{}:{}:{}",
                def.stream, self.name, original.stream_sequence
            )
            .as_str(),
        );
        let mut payload = original.payload;
        for attempt in 0..3u32 {
            let sent = self
                .js()
                .publish_with_headers(self.dead_letter.clone(), headers.clone(), payload.clone())
                .await;
            match sent {
                Ok(ack) => match ack.await {
                    Ok(_) => return true,
                    Err(error) => {
                        tracing::warn!(error = %crate::error::chain(&error), attempt, subject = %self.dead_letter, "dead letter not acked")
                    }
                },
                Err(error)
                    if error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded
                        && !payload.is_empty() =>
                {
                    // The original fitted; its copy with natty's headers does not. The record of
                    // what failed, and why, matters more than a second copy of the payload.
                    let omitted = format!(
                        "{} bytes: with the dead-letter headers the copy exceeds the server's max_payload; the original is sequence {} of stream {}",
                        payload.len(),
                        original.stream_sequence,
                        def.stream
                    );
                    tracing::warn!(subject = %self.dead_letter, %omitted, "dead letter sent without its payload");
                    headers.insert("Natty-Payload-Omitted", omitted.as_str());
                    payload = Bytes::new();
                    continue;
                }
                Err(error) => {
                    tracing::warn!(error = %crate::error::chain(&error), attempt, subject = %self.dead_letter, "cannot publish the dead letter")
                }
            }
            between().await;
            tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
        }
        false
    }
}

/// Headers that direct how the server stores a publish (optimistic concurrency, TTL, rollup,
/// counters, schedules, batches) rather than describe the message: a copy carrying the original's
/// `Nats-Expected-Last-Subject-Sequence` would be refused by the dead-letter stream forever.
const PUBLISH_DIRECTIVES: &[&str] = &[
    "nats-expected-",
    "nats-rollup",
    "nats-ttl",
    "nats-incr",
    "nats-schedule",
    "nats-batch-",
    "nats-required-api-level",
];

/// The original's headers, less those that would direct how the dead-letter stream stores
/// its copy.
pub(super) fn without_publish_directives(headers: Option<async_nats::HeaderMap>) -> async_nats::HeaderMap {
    let mut kept = async_nats::HeaderMap::new();
    for (name, values) in headers.iter().flat_map(async_nats::HeaderMap::iter) {
        let lower = AsRef::<str>::as_ref(name).to_ascii_lowercase();
        if PUBLISH_DIRECTIVES.iter().any(|directive| lower.starts_with(directive)) {
            continue;
        }
        for value in values {
            kept.append(name.clone(), value.clone());
        }
    }
    kept
}

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settled {
    /// The handler succeeded; acked.
    Acked,
    /// Naked for redelivery.
    Naked,
    /// Terminated, its copy stored in the dead-letter subject.
    Terminated,
    /// The drain timeout cut the handler off; naked.
    CutOff,
}

impl Settled {
    /// Counts the outcome in the consumer's metrics; each delivery is counted once, here.
    pub(crate) fn count(self, metrics: &crate::telemetry::metrics::ConsumerMetrics) {
        match self {
            Settled::Acked => metrics.acked.inc(),
            Settled::Naked | Settled::CutOff => metrics.naked.inc(),
            Settled::Terminated => {
                metrics.dead_lettered.inc();
                metrics.terminated.inc()
            }
        };
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Settled::Acked => "ack",
            Settled::Naked => "nak",
            Settled::Terminated => "term",
            Settled::CutOff => "nak (drain timeout)",
        }
    }
}

/// What a caught panic says.
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// What a dead letter needs of the original message.
pub(crate) struct Original {
    pub(crate) subject: async_nats::Subject,
    pub(crate) payload: Bytes,
    /// Shared with the handler's `Delivery` (see there).
    pub(crate) headers: Option<Arc<async_nats::HeaderMap>>,
    pub(crate) stream_sequence: u64,
    pub(crate) delivery_count: u64,
}

/// Settles a message by publishing to its reply subject (what async-nats' `Acker` does), so
/// that `+TERM` can carry a reason.
pub(crate) struct Settle<'a> {
    /// Borrowed: a client clone is a dozen reference counts and a channel sender, per message.
    pub(crate) client: &'a async_nats::Client,
    pub(crate) reply: Subject,
}

impl Settle<'_> {
    pub(crate) async fn send(&self, body: Bytes) {
        // Almost always done at the first poll (the connection's queue has room). That poll
        // runs on the stack: async-nats' publish future is 784 bytes, and kept in this
        // future's state it would be in every delivery's, which is moved per message. Dropped
        // while pending it has sent nothing (a channel send not yet given room); then the
        // publish is made again, boxed, under a timeout (whose timer reads the clock and the
        // runtime's handle, so it is set only here).
        let first = std::future::poll_fn(|cx| {
            let publish = std::pin::pin!(self.client.publish(self.reply.clone(), body.clone()));
            std::task::Poll::Ready(match std::future::Future::poll(publish, cx) {
                std::task::Poll::Ready(sent) => Some(sent),
                std::task::Poll::Pending => None,
            })
        })
        .await;
        let sent = match first {
            Some(sent) => Ok(sent),
            None => {
                Box::pin(tokio::time::timeout(
                    SETTLE_WITHIN,
                    self.client.publish(self.reply.clone(), body),
                ))
                .await
            }
        };
        match sent {
            Ok(Ok(())) => {}
            // The server will redeliver after ack_wait: at-least-once holds.
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::error::chain(&error), "cannot settle a message; it will be redelivered after ack_wait")
            }
            Err(_) => tracing::warn!(
                within = ?SETTLE_WITHIN,
                "cannot settle a message: the connection takes nothing (is the server gone?); it will be redelivered after ack_wait"
            ),
        }
    }

    pub(super) async fn nak(&self, delay: Duration) {
        self.send(format!("-NAK {{\"delay\":{}}}", delay.as_nanos()).into())
            .await;
    }
}
