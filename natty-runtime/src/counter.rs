//! Counters kept by the server (nats-server 2.12, ADR-49): every subject of a stream declared
//! with `counters = true` holds a total, which a message adds to (`Nats-Incr: +5`) and whose
//! latest value the server writes into the subject's last message. Additions from any number
//! of processes at once sum exactly, with no read-modify-write on the client: what a KV bucket
//! cannot do without retries on conflicts.
//!
//! A counter is a number that only changes by additions; a KV entry is a value replaced as a
//! whole (with compare-and-set when writers race). Reach for a counter for tallies, quotas
//! and statistics; for a KV entry for state.

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
    /// counters (declare it with `counters = true`), the server is older than 2.12, or the
    /// connection failed. Not retried: an addition sent twice counts twice.
    #[error("cannot add to the counter `{subject}`: {source}")]
    Add {
        /// The counter's subject.
        subject: String,
        /// The server's or client's error.
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
    /// as the stream stored it.
    ///
    /// # Errors
    ///
    /// [`CounterError::Add`] when it was not stored; [`CounterError::Value`] for a total out
    /// of range.
    pub async fn add(&self, delta: i64) -> Result<i128, CounterError> {
        let failed = |source: BoxError| CounterError::Add {
            subject: self.subject.clone(),
            source,
        };
        if let Some(why) = crate::operate::too_old(self.client.nats(), 2, 12, "a counter") {
            return Err(failed(why.into()));
        }
        let mut headers = HeaderMap::new();
        headers.insert(INCREMENT, format!("{delta:+}").as_str());
        let ack = self
            .client
            .jetstream()
            .publish_with_headers(self.subject.clone(), headers, Bytes::new())
            .await
            .map_err(|e| failed(e.into()))?
            .await
            .map_err(|e| failed(e.into()))?;
        match ack.value {
            Some(value) => self.parse(value),
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
    /// # Errors
    ///
    /// [`CounterError::Read`] when no stream takes the subject or the server cannot be asked;
    /// [`CounterError::Value`] when its last message holds no total.
    pub async fn get(&self) -> Result<i128, CounterError> {
        #[derive(serde::Deserialize)]
        struct Total {
            val: String,
        }
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
        let last = match stream.get_last_raw_message_by_subject(&self.subject).await {
            Ok(last) => last,
            Err(error) if error.kind() == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                return Ok(0)
            }
            Err(error) => return Err(failed(error.into())),
        };
        let total: Total = serde_json::from_slice(&last.payload).map_err(|_| CounterError::Value {
            subject: self.subject.clone(),
            value: String::from_utf8_lossy(&last.payload).into_owned(),
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
