//! Counters kept by the server (nats-server 2.12, ADR-49): every subject of a stream declared
//! with `counters = true` holds a total, which a message adds to (`Nats-Incr: +5`) and whose
//! latest value the server writes into the subject's last message. Additions from any number
//! of processes at once sum exactly, with no read-modify-write on the client: what a KV bucket
//! cannot do without retries on conflicts.
//!
//! A counter is a number that only changes by additions; a KV entry is a value replaced as a
//! whole (with compare-and-set when writers race). Reach for a counter for tallies, quotas
//! and statistics; for a KV entry for state.
//!
//! Every addition carries a key (`Nats-Msg-Id`), which the stream deduplicates within its
//! `duplicate_window`, so an addition whose answer was lost (an election, a dropped
//! connection) is sent again and counted once, as a publish is.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::client::Client;
use crate::error::BoxError;

/// The header a counter's additions carry.
const INCREMENT: &str = "Nats-Incr";

/// One counter: a subject of a stream declared with `counters = true`
/// ([`StreamDef::counters`](crate::StreamDef::counters)). Made by [`Client::counter`].
///
/// # Examples
///
/// ```no_run
/// # async fn example(client: natty_runtime::Client) -> Result<(), natty_runtime::CounterError> {
/// let hits = client.counter("hits.home");
/// let total = hits.increment().await?;
/// let after_a_batch = hits.add(-3).await?;
/// assert_eq!(hits.get().await?, after_a_batch);
/// # let _ = total;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Counter {
    client: Client,
    subject: String,
}

/// Why a counter could not be added to or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CounterError {
    /// The addition was not stored: no stream takes the subject, the stream does not keep
    /// counters (declare it with `counters = true`), or the server is older than 2.12.
    #[error("cannot add to the counter `{subject}`: {source}")]
    Add {
        /// The counter's subject.
        subject: String,
        /// The server's or client's error.
        #[source]
        source: BoxError,
    },
    /// No answer came for the addition after natty sent it again for 20 seconds (no stream
    /// leader, a lost connection): it may have been counted. Adding again with the same key
    /// ([`Counter::add_with_key`]) within the stream's `duplicate_window` counts it at most
    /// once.
    #[error("the addition to the counter `{subject}` (key `{key}`) is unconfirmed: {source}")]
    Unconfirmed {
        /// The counter's subject.
        subject: String,
        /// The addition's key.
        key: String,
        /// The last error.
        #[source]
        source: BoxError,
    },
    /// The counter could not be read.
    #[error("cannot read the counter `{subject}`: {source}")]
    Read {
        /// The counter's subject.
        subject: String,
        /// The server's or client's error.
        #[source]
        source: BoxError,
    },
    /// The server answered with something that is not a total natty can hold.
    #[error("the counter `{subject}` holds {value:?}, which is not a whole number within ±2^127")]
    Value {
        /// The counter's subject.
        subject: String,
        /// What the server answered.
        value: String,
    },
}

impl Client {
    /// The counter on `subject`, in a stream declared with `counters = true`.
    pub fn counter(&self, subject: impl Into<String>) -> Counter {
        Counter {
            client: self.clone(),
            subject: subject.into(),
        }
    }
}

impl Counter {
    /// The counter's subject.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Adds `delta` (negative to subtract) and returns the total right after this addition,
    /// as the stream stored it. Through a stream leader election or a lost answer the
    /// addition is sent again with the key natty gave it, and counted once.
    ///
    /// # Errors
    ///
    /// [`CounterError::Add`] when it was not stored; [`CounterError::Unconfirmed`] when no
    /// answer came for 20 seconds; [`CounterError::Value`] for a total out of range.
    pub async fn add(&self, delta: i64) -> Result<i128, CounterError> {
        self.add_with_key(&crate::publish::new_msg_id(), delta).await
    }

    /// Adds `delta` once for `key`: an addition repeated with the same key within the
    /// stream's `duplicate_window` (two minutes by default) is not counted again — a handler
    /// that counts what it handles passes
    /// [`ctx.idempotency_key()`](crate::Context::idempotency_key), so a redelivered message
    /// is not counted twice. Returns the total right after the addition that counted; for a
    /// key counted before, that total when the stream still holds it, or else the total now.
    ///
    /// # Errors
    ///
    /// As [`Counter::add`].
    pub async fn add_with_key(&self, key: &str, delta: i64) -> Result<i128, CounterError> {
        let failed = |source: BoxError| CounterError::Add {
            subject: self.subject.clone(),
            source,
        };
        if let Some(why) = crate::operate::too_old(self.client.nats(), 2, 12, "a counter") {
            return Err(failed(why.into()));
        }
        let key_value = crate::publish::header_value(key)
            .map_err(|problem| failed(format!("its key {key:?}: {problem}").into()))?;
        let subject = crate::publish::checked_subject(self.subject.clone()).map_err(|e| failed(e.into()))?;
        let mut headers = HeaderMap::new();
        headers.insert(INCREMENT, format!("{delta:+}").as_str());
        headers.insert(async_nats::header::NATS_MESSAGE_ID, key_value);
        let ack = crate::publish::publish_durably(&self.client, &subject, headers, Bytes::new())
            .await
            .map_err(|error| match error {
                crate::PublishError::Unconfirmed { source, .. } => CounterError::Unconfirmed {
                    subject: self.subject.clone(),
                    key: key.to_string(),
                    source: source.into(),
                },
                other => failed(other.into()),
            })?;
        match ack.value {
            Some(value) => self.parse(value),
            // Counted before, under this key: the total its own message holds.
            None if ack.duplicate => match self.total_at(&ack.stream, ack.sequence).await {
                Some(total) => total,
                None => self.get().await,
            },
            None => Err(failed(
                format!(
                    "stream `{}` stored it without a total: it does not keep counters (declare it with counters = true)",
                    ack.stream
                )
                .into(),
            )),
        }
    }

    /// Adds one; the total right after.
    ///
    /// # Errors
    ///
    /// As [`Counter::add`].
    pub async fn increment(&self) -> Result<i128, CounterError> {
        self.add(1).await
    }

    /// The total now: 0 for a counter never added to (or purged).
    ///
    /// Read from the stream's leader: while the stream elects one (or a server restarts), it
    /// is asked again for up to 20 s, as an addition is sent again.
    ///
    /// # Errors
    ///
    /// [`CounterError::Read`] when no stream takes the subject or the server cannot be asked;
    /// [`CounterError::Value`] when its last message holds no total.
    pub async fn get(&self) -> Result<i128, CounterError> {
        // The stream's leader answers, so a read during its election is asked again, for as
        // long as an addition would be.
        let last =
            crate::classify::patiently("reading a counter", crate::publish::PUBLISH_RETRY_FOR, || self.last()).await?;
        match last {
            Some(payload) => self.total_in(&payload),
            None => Ok(0),
        }
    }

    /// The payload of the counter's last message, `None` if it has none; asked once.
    async fn last(&self) -> Result<Option<Bytes>, CounterError> {
        let failed = |source: BoxError| CounterError::Read {
            subject: self.subject.clone(),
            source,
        };
        let js = self.client.jetstream();
        let stream = js
            .stream_by_subject(self.subject.clone())
            .await
            .map_err(|e| failed(e.into()))?;
        let stream = js.get_stream_no_info(&stream).await.map_err(|e| failed(e.into()))?;
        match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(last) => Ok(Some(last.payload)),
            Err(error) if error.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(error) => Err(failed(error.into())),
        }
    }

    /// The total the counter's message at `sequence` holds, or `None` when that message is
    /// gone (or the stream cannot be asked).
    async fn total_at(&self, stream: &str, sequence: u64) -> Option<Result<i128, CounterError>> {
        let js = self.client.jetstream();
        let stream = js.get_stream_no_info(stream).await.ok()?;
        let message = stream.get_raw_message(sequence).await.ok()?;
        (message.subject.as_str() == self.subject).then(|| self.total_in(&message.payload))
    }

    /// The total a counter's message holds: `{"val": "<digits>"}`.
    fn total_in(&self, payload: &[u8]) -> Result<i128, CounterError> {
        #[derive(serde::Deserialize)]
        struct Total {
            val: String,
        }
        let total: Total = serde_json::from_slice(payload).map_err(|_| CounterError::Value {
            subject: self.subject.clone(),
            value: String::from_utf8_lossy(payload).into_owned(),
        })?;
        self.parse(total.val)
    }

    fn parse(&self, value: String) -> Result<i128, CounterError> {
        value.parse().map_err(|_| CounterError::Value {
            subject: self.subject.clone(),
            value,
        })
    }
}
