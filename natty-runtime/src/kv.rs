//! Typed KV buckets: [`Kv`], typed access to a bucket's values (get, put, create, compare-and-set, delete, purge,
//! keys, and watches that resume after an interruption without losing or repeating a change),
//! and the [`KvBucketDef`] a `#[kv_bucket]` registers.

use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};

use crate::error::BoxError;
use crate::kv_watch::{Entries, KvChange, WatchStart};
use crate::payload::{DecodeError, DecodePayload, EncodePayload, Format};
use crate::publish::{Client, PublishError};
use crate::stream::is_stream_not_found;

pub use crate::kv_bucket::{KvBucketDef, MAX_HISTORY};

/// A KV operation failed. Each variant names the bucket, and the key where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The bucket does not exist.
    #[error("KV bucket `{bucket}` does not exist; declare it with #[kv_bucket(name = \"{bucket}\")] or create it")]
    BucketNotFound {
        /// The bucket's name.
        bucket: String,
    },
    /// `create` found a value already there.
    #[error("KV bucket `{bucket}`: key `{key}` already exists")]
    Exists {
        /// The bucket's name.
        bucket: String,
        /// The key.
        key: String,
    },
    /// A compare-and-set (`update`, `delete_expect`) found the key at another revision: another
    /// writer changed it first. Nothing was written; read it again and decide.
    #[error("KV bucket `{bucket}`: key `{key}` is no longer at revision {expected}: another writer changed it first")]
    Conflict {
        /// The bucket's name.
        bucket: String,
        /// The key.
        key: String,
        /// The revision the write expected to replace.
        expected: u64,
        /// The server's answer.
        #[source]
        source: kv::UpdateError,
    },
    /// The key is not a valid KV key (letters, digits, `-`, `_`, `/`, `=` and `.`-separated
    /// tokens; a watch may use the wildcards `*` and `>`).
    #[error("KV bucket `{bucket}`: invalid key `{key}`")]
    InvalidKey {
        /// The bucket's name.
        bucket: String,
        /// The key.
        key: String,
    },
    /// The value could not be encoded.
    #[error("KV bucket `{bucket}`: cannot encode the value of `{key}` as {format}")]
    Encode {
        /// The bucket's name.
        bucket: String,
        /// The key.
        key: String,
        /// The format it was encoded in.
        format: Format,
        /// What the encoder reported.
        #[source]
        source: BoxError,
    },
    /// A stored value could not be decoded as the handle's type.
    #[error("KV bucket `{bucket}`: key `{key}` at revision {revision}")]
    Decode {
        /// The bucket's name.
        bucket: String,
        /// The key.
        key: String,
        /// The revision of the value.
        revision: u64,
        /// What the decoder reported.
        #[source]
        source: DecodeError,
    },
    /// A request about one key failed (no server, timeout, refused).
    #[error("KV bucket `{bucket}`: {action} `{key}` failed")]
    Request {
        /// The bucket's name.
        bucket: String,
        /// The key (or the watched pattern).
        key: String,
        /// What was attempted.
        action: &'static str,
        /// The client's or the server's error.
        #[source]
        source: BoxError,
    },
    /// A request about the whole bucket failed.
    #[error("KV bucket `{bucket}`: {action} failed")]
    Bucket {
        /// The bucket's name.
        bucket: String,
        /// What was attempted.
        action: &'static str,
        /// The client's or the server's error.
        #[source]
        source: BoxError,
    },
}

/// The header that marks a KV entry as a delete or purge (`DEL`, `PURGE`); a put has none.
const KV_OPERATION: &str = "KV-Operation";

/// What a write of a key stores.
#[derive(Debug, Clone, Copy)]
enum Write {
    /// A value.
    Put,
    /// A delete marker.
    Delete,
    /// A purge marker that rolls up (removes) the key's earlier revisions.
    Purge,
}

/// Whether `key` is a valid KV key, as async-nats judges it (letters, digits, `-`, `/`, `_`,
/// `=`, and `.` between non-empty tokens).
pub(crate) fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.split('.').all(|token| !token.is_empty())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '/' | '_' | '=' | '.'))
}

/// A value read from a bucket, with its revision (the token for [`Kv::update`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KvEntry<T> {
    /// The key.
    pub key: String,
    /// The decoded value.
    pub value: T,
    /// The bucket's revision of this value.
    pub revision: u64,
}

/// A typed handle on a KV bucket: values of `T`, as JSON through serde (or Protobuf for a
/// Protobuf [`Payload`](crate::Payload)). Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(client: natty_runtime::Client) -> Result<(), natty_runtime::kv::KvError> {
/// use natty_runtime::kv::KvError;
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Limits { max_orders: u32 }
///
/// let limits = client.kv::<Limits>("config").await?;
/// let revision = limits.put("north", &Limits { max_orders: 10 }).await?;
/// match limits.update("north", &Limits { max_orders: 11 }, revision).await {
///     Ok(revision) => println!("now at revision {revision}"),
///     Err(KvError::Conflict { .. }) => println!("someone else changed it first"),
///     Err(other) => return Err(other),
/// }
/// # Ok(()) }
/// ```
pub struct Kv<T> {
    store: kv::Store,
    /// natty writes through its own publish path (see [`Kv::put`]), on the client the store
    /// came from.
    client: Client,
    _value: PhantomData<fn() -> T>,
}

impl<T> Clone for Kv<T> {
    fn clone(&self) -> Self {
        Kv {
            store: self.store.clone(),
            client: self.client.clone(),
            _value: PhantomData,
        }
    }
}

impl<T> fmt::Debug for Kv<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kv")
            .field("bucket", &self.store.name)
            .field("value", &std::any::type_name::<T>())
            .finish()
    }
}

impl Client {
    /// A typed handle on the existing KV bucket `bucket`.
    ///
    /// # Errors
    ///
    /// [`KvError::BucketNotFound`] when there is no such bucket; [`KvError::Bucket`] for an
    /// invalid name or a failed request.
    pub async fn kv<T>(&self, bucket: &str) -> std::result::Result<Kv<T>, KvError> {
        match self.jetstream().get_key_value(bucket).await {
            Ok(store) => Ok(Kv {
                store,
                client: self.clone(),
                _value: PhantomData,
            }),
            Err(error)
                if error.kind() == jetstream::context::KeyValueErrorKind::GetBucket
                    && source_is_stream_not_found(&error) =>
            {
                Err(KvError::BucketNotFound { bucket: bucket.into() })
            }
            Err(error) => Err(KvError::Bucket {
                bucket: bucket.into(),
                action: "opening it",
                source: Box::new(error),
            }),
        }
    }
}

/// Whether the cause of `error` is "stream not found".
pub(crate) fn source_is_stream_not_found(error: &(dyn std::error::Error + 'static)) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::context::GetStreamError>())
        .is_some_and(is_stream_not_found)
}

impl<T> Kv<T> {
    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        &self.store.name
    }

    /// The underlying async-nats store, for what this handle does not cover.
    pub fn raw(&self) -> &kv::Store {
        &self.store
    }

    fn request(&self, key: &str, action: &'static str) -> impl FnOnce(BoxError) -> KvError {
        let (bucket, key) = (self.store.name.clone(), key.to_string());
        move |source| KvError::Request {
            bucket,
            key,
            action,
            source,
        }
    }

    fn invalid_key(&self, key: &str) -> KvError {
        KvError::InvalidKey {
            bucket: self.store.name.clone(),
            key: key.into(),
        }
    }

    /// The current value of `key`, or `None` if it has none (never set, deleted or purged).
    ///
    /// A read unanswered while the bucket's stream elects a leader is asked again, for up to
    /// 20 s as a write is.
    ///
    /// # Errors
    ///
    /// [`KvError::Decode`] when the stored value is not a `T`; [`KvError::InvalidKey`];
    /// [`KvError::Request`] when the request fails.
    pub async fn get(&self, key: &str) -> std::result::Result<Option<KvEntry<T>>, KvError>
    where
        T: DecodePayload,
    {
        // A read during an election of the bucket's stream leader (no answer in time) is asked
        // again, for as long as a write would be.
        let read = || self.store.entry(key);
        let entry =
            match crate::classify::patiently("reading a KV entry", crate::publish::PUBLISH_RETRY_FOR, read).await {
                Ok(entry) => entry,
                Err(error) if error.kind() == kv::EntryErrorKind::InvalidKey => return Err(self.invalid_key(key)),
                Err(error) => return Err(self.request(key, "reading")(Box::new(error))),
            };
        let Some(entry) = entry.filter(|entry| entry.operation == kv::Operation::Put) else {
            return Ok(None);
        };
        // KV entries carry no headers: the value is read in `T`'s format.
        let value = crate::payload::decode::<T>(None, &entry.value).map_err(|source| KvError::Decode {
            bucket: self.store.name.clone(),
            key: key.into(),
            revision: entry.revision,
            source,
        })?;
        Ok(Some(KvEntry {
            key: entry.key,
            value,
            revision: entry.revision,
        }))
    }

    fn encode(&self, key: &str, value: &T) -> std::result::Result<bytes::Bytes, KvError>
    where
        T: EncodePayload,
    {
        value.to_bytes().map_err(|source| KvError::Encode {
            bucket: self.store.name.clone(),
            key: key.into(),
            format: T::FORMAT,
            source,
        })
    }

    /// Stores `value` under `key`, whatever is there, and returns its revision.
    ///
    /// Like every write of a [`Kv`], it rides through an election of the bucket's stream
    /// leader as [`Client::publish_with`] does: it carries an idempotency key and is sent
    /// again with it while the stream has no leader or the answer is lost, for up to 20 s.
    ///
    /// # Errors
    ///
    /// [`KvError::Encode`], [`KvError::InvalidKey`], [`KvError::BucketNotFound`] when the bucket
    /// is gone, or [`KvError::Request`] when the bucket does not acknowledge the write (e.g.
    /// the value is larger than `max_value_size`, or no leader was elected in time).
    pub async fn put(&self, key: &str, value: &T) -> std::result::Result<u64, KvError>
    where
        T: EncodePayload,
    {
        let bytes = self.encode(key, value)?;
        self.write(key, Write::Put, None, bytes, "putting").await
    }

    /// Stores `value` under `key` only if the key has no value (never set, deleted or purged),
    /// and returns its revision.
    ///
    /// # Errors
    ///
    /// [`KvError::Exists`] when it has one; otherwise as [`Kv::put`].
    pub async fn create(&self, key: &str, value: &T) -> std::result::Result<u64, KvError>
    where
        T: EncodePayload,
    {
        let bytes = self.encode(key, value)?;
        let exists = || KvError::Exists {
            bucket: self.store.name.clone(),
            key: key.into(),
        };
        match self.write(key, Write::Put, Some(0), bytes.clone(), "creating").await {
            Err(KvError::Conflict { .. }) => {}
            other => return other,
        }
        // The key has had a value: it may be created again over a delete or purge marker.
        let marker = match self.latest(key).await? {
            Some((revision, operation)) if operation != kv::Operation::Put => revision,
            _ => return Err(exists()),
        };
        match self.write(key, Write::Put, Some(marker), bytes, "creating").await {
            Err(KvError::Conflict { .. }) => Err(exists()),
            other => other,
        }
    }

    /// Replaces the value of `key` only if it is still at `revision` (compare-and-set), and
    /// returns the new revision. Of writers racing from the same revision, exactly one wins.
    ///
    /// A retried write never reports its own earlier attempt as a conflict: when an attempt's
    /// answer was lost and the next one finds the key moved on, natty asks the stream whether
    /// the message right after `revision` is its own, and returns that revision if so.
    ///
    /// # Errors
    ///
    /// [`KvError::Conflict`] when the key has moved on; otherwise as [`Kv::put`].
    pub async fn update(&self, key: &str, value: &T, revision: u64) -> std::result::Result<u64, KvError>
    where
        T: EncodePayload,
    {
        let bytes = self.encode(key, value)?;
        self.write(key, Write::Put, Some(revision), bytes, "updating").await
    }

    /// Deletes `key`: a delete marker becomes its latest revision (watches see it), earlier
    /// revisions stay in its history.
    ///
    /// # Errors
    ///
    /// [`KvError::InvalidKey`], [`KvError::BucketNotFound`], [`KvError::Request`].
    pub async fn delete(&self, key: &str) -> std::result::Result<(), KvError> {
        self.write(key, Write::Delete, None, Bytes::new(), "deleting")
            .await
            .map(drop)
    }

    /// Deletes `key` only if it is still at `revision`.
    ///
    /// # Errors
    ///
    /// [`KvError::Conflict`] when the key has moved on; otherwise as [`Kv::delete`].
    pub async fn delete_expect(&self, key: &str, revision: u64) -> std::result::Result<(), KvError> {
        self.write(key, Write::Delete, Some(revision), Bytes::new(), "deleting")
            .await
            .map(drop)
    }

    /// Purges `key`: removes every revision, leaving a purge marker (watches see it).
    ///
    /// # Errors
    ///
    /// [`KvError::InvalidKey`], [`KvError::BucketNotFound`], [`KvError::Request`].
    pub async fn purge(&self, key: &str) -> std::result::Result<(), KvError> {
        self.write(key, Write::Purge, None, Bytes::new(), "purging")
            .await
            .map(drop)
    }

    /// The subject a write of `key` goes to, as async-nats builds it (a mirror bucket writes to
    /// its origin's subjects through `put_prefix`).
    fn subject(&self, key: &str) -> std::result::Result<async_nats::Subject, KvError> {
        if !valid_key(key) {
            return Err(self.invalid_key(key));
        }
        // natty's JetStream contexts use the default API prefix, which async-nats does not
        // prepend to KV subjects.
        debug_assert!(!self.store.use_jetstream_prefix);
        let prefix = self.store.put_prefix.as_ref().unwrap_or(&self.store.prefix);
        Ok(format!("{prefix}{key}").into())
    }

    /// Sends one write of `key` (with `expected` as the compare-and-set revision, if any)
    /// through natty's publish path: an idempotency key, and retries through elections and
    /// lost answers. See [`crate::publish`] for what is retried and for how long.
    async fn write(
        &self,
        key: &str,
        write: Write,
        expected: Option<u64>,
        payload: Bytes,
        action: &'static str,
    ) -> std::result::Result<u64, KvError> {
        let subject = self.subject(key)?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, crate::publish::new_msg_id());
        match write {
            Write::Put => {}
            Write::Delete => headers.insert(KV_OPERATION, "DEL"),
            Write::Purge => {
                headers.insert(KV_OPERATION, "PURGE");
                headers.insert(async_nats::header::NATS_ROLLUP, "sub");
            }
        }
        if let Some(revision) = expected {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                revision.to_string(),
            );
        }
        let result = crate::publish::publish_durably(&self.client, &subject, headers, payload).await;
        result.map(|ack| ack.sequence).map_err(|error| match error {
            PublishError::Conflict { source, .. } => KvError::Conflict {
                bucket: self.store.name.clone(),
                key: key.into(),
                expected: expected.unwrap_or_default(),
                source: source.into(),
            },
            PublishError::NoStream { .. } => KvError::BucketNotFound {
                bucket: self.store.name.clone(),
            },
            other => self.request(key, action)(Box::new(other)),
        })
    }

    /// The revision and operation of the latest entry of `key`, read from the stream's leader
    /// (a replica answering a direct get may not have the latest write yet).
    async fn latest(&self, key: &str) -> std::result::Result<Option<(u64, kv::Operation)>, KvError> {
        use jetstream::stream::LastRawMessageErrorKind as Kind;
        let subject = format!("{}{key}", self.store.prefix);
        let read = || self.store.stream.get_last_raw_message_by_subject(&subject);
        match crate::classify::patiently("reading a KV entry", crate::publish::PUBLISH_RETRY_FOR, read).await {
            Ok(message) => {
                let operation = match message.headers.get(KV_OPERATION).map(|value| value.as_str()) {
                    Some("DEL") => kv::Operation::Delete,
                    Some("PURGE") => kv::Operation::Purge,
                    _ => kv::Operation::Put,
                };
                Ok(Some((message.sequence, operation)))
            }
            Err(error) if error.kind() == Kind::NoMessageFound => Ok(None),
            Err(error) => Err(self.request(key, "reading")(Box::new(error))),
        }
    }

    /// The keys that have a value (not deleted or purged), in the order of their latest revision.
    /// Listed again from the start if the listing is cut off by a transient failure (an
    /// election), for up to 20 s.
    ///
    /// # Errors
    ///
    /// [`KvError::Bucket`] when the request fails.
    pub async fn keys(&self) -> std::result::Result<Vec<String>, KvError> {
        let failed = |source: BoxError| KvError::Bucket {
            bucket: self.store.name.clone(),
            action: "listing its keys",
            source,
        };
        let list = || async move {
            let keys = self.store.keys().await.map_err(|error| failed(Box::new(error)))?;
            keys.try_collect().await.map_err(|error| failed(Box::new(error)))
        };
        crate::classify::patiently("listing a bucket's keys", crate::publish::PUBLISH_RETRY_FOR, list).await
    }

    /// Every change of the keys matching `key` (`*` and `>` wildcards allowed) made from now on,
    /// in revision order, each once. An interrupted watch (server restart, lost connection) is
    /// set up again after the last revision delivered, so no change is lost or repeated; a
    /// bucket created anew is watched from its first revision (see the
    /// [guide](crate::guide::kv_and_objects)).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(kv: natty_runtime::kv::Kv<u32>) -> Result<(), natty_runtime::kv::KvError> {
    /// use futures_util::StreamExt;
    /// let mut changes = kv.watch("limits.>").await?;
    /// while let Some(change) = changes.next().await {
    ///     let change = change?;
    ///     println!("{} is now {:?} (revision {})", change.key, change.value, change.revision);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`KvError::InvalidKey`] or [`KvError::Request`] when the watch cannot be set up; the
    /// stream then yields [`KvError::Decode`] for a value that is not a `T` and goes on.
    pub async fn watch(&self, key: &str) -> std::result::Result<KvChanges<T>, KvError> {
        self.watch_starting(key, WatchStart::New).await
    }

    /// Like [`Kv::watch`], starting with the current value of each matching key.
    ///
    /// # Errors
    ///
    /// As [`Kv::watch`].
    pub async fn watch_with_history(&self, key: &str) -> std::result::Result<KvChanges<T>, KvError> {
        self.watch_starting(key, WatchStart::LastPerKey).await
    }

    /// Like [`Kv::watch`], starting at `revision`: every change of the matching keys still in
    /// the bucket's history with that revision or a later one. To resume a watch, pass the last
    /// revision handled plus one.
    ///
    /// # Errors
    ///
    /// As [`Kv::watch`].
    pub async fn watch_from(&self, key: &str, revision: u64) -> std::result::Result<KvChanges<T>, KvError> {
        self.watch_starting(key, WatchStart::Revision(revision.max(1))).await
    }

    async fn watch_starting(&self, key: &str, start: WatchStart) -> std::result::Result<KvChanges<T>, KvError> {
        let entries = Entries::open(self.store.clone(), key.to_string(), start)
            .await
            .map_err(|error| match error.kind() {
                kv::WatchErrorKind::InvalidKey => self.invalid_key(key),
                _ => self.request(key, "watching")(Box::new(error)),
            })?;
        Ok(KvChanges {
            bucket: self.store.name.clone(),
            entries: entries.into_stream(),
            _value: PhantomData,
        })
    }
}

/// The changes a [`Kv`] watch delivers: [`KvChange`]s in revision order, or
/// [`KvError::Decode`] for a value that is not a `T` (the watch goes on). It never ends by
/// itself; drop it to stop watching.
///
/// When the connection drops, the watch is set up again as soon as the client reconnects;
/// when its consumer vanished unnoticed (a quick server restart), after two missed heartbeats
/// (about 10 s). Either way it goes on from the revision after the last one delivered.
pub struct KvChanges<T> {
    bucket: String,
    entries: BoxStream<'static, kv::Entry>,
    _value: PhantomData<fn() -> T>,
}

impl<T> fmt::Debug for KvChanges<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvChanges").field("bucket", &self.bucket).finish()
    }
}

impl<T: DecodePayload> Stream for KvChanges<T> {
    type Item = std::result::Result<KvChange<T>, KvError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let Some(entry) = std::task::ready!(self.entries.poll_next_unpin(cx)) else {
            return Poll::Ready(None);
        };
        let (key, revision) = (entry.key.clone(), entry.revision);
        Poll::Ready(Some(KvChange::<T>::decode(&entry).map_err(|source| KvError::Decode {
            bucket: self.bucket.clone(),
            key,
            revision,
            source,
        })))
    }
}
