//! Messages the server stops delivering without natty having settled them. With `max_deliver`
//! set, natty dead-letters a message whose handler fails on its last delivery; but a last
//! delivery can also go to an instance that dies or freezes before settling it, or never reach
//! natty at all (a header or subject the client cannot parse drops the connection instead).
//! The server then gives up on it, publishing a `MAX_DELIVERIES` advisory with its sequence:
//! natty reads the message from the stream and dead-letters it, so it is not dropped
//! unrecorded.

use serde::Deserialize;

use super::*;

/// The advisory the server publishes when a message reached a consumer's `max_deliver`.
#[derive(Debug, Deserialize)]
struct MaxDeliveries {
    stream_seq: u64,
    deliveries: u64,
}

/// A message as the JSON message-get API answers (`$JS.API.STREAM.MSG.GET`): read without the
/// connection's protocol parser, so a message it could not deliver can still be read.
#[derive(Debug, Deserialize)]
struct Stored {
    message: Option<jetstream::stream::RawMessage>,
}

impl Consumer {
    /// Dead-letters each message the server gave up on, until the consumer stops (its task is
    /// aborted). The instances of one consumer share a queue group: one takes each advisory;
    /// the dead letter's id makes a repeat (or natty's own dead letter of the same delivery)
    /// store nothing new.
    pub(super) async fn dead_letter_exhausted(self: Arc<Self>) {
        let subject = format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.{}",
            self.def.stream, self.name
        );
        let nats = self.shared.client.nats();
        let mut advisories = match nats
            .queue_subscribe(subject, format!("natty-exhausted-{}", self.name))
            .await
        {
            Ok(advisories) => advisories,
            Err(error) => {
                tracing::warn!(stream = self.def.stream, consumer = &*self.name, error = %crate::error::chain(&error),
                    "cannot listen for messages past max_deliver; they would not be dead-lettered");
                return;
            }
        };
        while let Some(advisory) = futures_util::StreamExt::next(&mut advisories).await {
            let Ok(advisory) = serde_json::from_slice::<MaxDeliveries>(&advisory.payload) else {
                continue;
            };
            self.dead_letter_given_up(advisory).await;
        }
    }

    /// Reads the message of `advisory` from the stream and stores its dead letter.
    async fn dead_letter_given_up(&self, advisory: MaxDeliveries) {
        let sequence = advisory.stream_seq;
        let request = serde_json::json!({ "seq": sequence });
        let read = crate::classify::patiently("reading a message past max_deliver", SETTLE_WITHIN * 5, || {
            self.js()
                .request::<_, _, Stored>(format!("STREAM.MSG.GET.{}", self.def.stream), &request)
        })
        .await;
        let raw = match read {
            Ok(Stored { message: Some(raw) }) => raw,
            // Gone (acked after all, or removed by a limit) or unreadable: nothing to record.
            Ok(Stored { message: None }) => return,
            Err(error) => {
                tracing::warn!(stream = self.def.stream, consumer = &*self.name, sequence, error = %crate::error::chain(&error),
                    "a message past max_deliver cannot be read; not dead-lettered");
                return;
            }
        };
        let subject: async_nats::Subject = raw.subject.clone().into();
        let encoded = raw.payload.clone();
        // As the client reads it; headers it cannot read are left out, and said so.
        let (payload, headers, unreadable) = match jetstream::message::StreamMessage::try_from(raw) {
            Ok(message) => (message.payload, Some(Arc::new(message.headers)), None),
            Err(error) => {
                use base64::Engine;
                let payload = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .unwrap_or_default();
                (
                    Bytes::from(payload),
                    None,
                    Some(crate::error::chain(&*error).to_string()),
                )
            }
        };
        let mut reason = format!(
            "delivered {} times (max_deliver) without being settled: its last delivery went to an instance that stopped, or never reached natty",
            advisory.deliveries
        );
        if let Some(unreadable) = unreadable {
            reason.push_str(&format!(" (its headers cannot be read: {unreadable}; left out)"));
        }
        let original = Original {
            subject,
            payload,
            headers,
            stream_sequence: sequence,
            delivery_count: advisory.deliveries,
        };
        if self.store_dead_letter(original, &reason, || async {}).await {
            tracing::warn!(stream = self.def.stream, consumer = &*self.name, sequence, %reason, "dead-lettered");
        } else {
            tracing::error!(stream = self.def.stream, consumer = &*self.name, sequence, dead_letter = %self.dead_letter,
                "cannot store the dead letter of a message past max_deliver; it stays in its stream");
        }
    }
}
