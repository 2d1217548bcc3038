//! Object stores: the [`ObjectStoreDef`] an `#[object_store]` registers and its provisioning,
//! and [`ObjectStore`], streaming access to objects of any size (put from an `AsyncRead`, get
//! as an `AsyncRead`, typed metadata, list, delete, watch).

use std::collections::HashMap;
use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use async_nats::jetstream::{
    self, object_store,
    stream::{Config as StreamConfig, StorageType},
};
use futures_util::stream::BoxStream;
use futures_util::{Stream, StreamExt, TryStreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncRead;

pub use async_nats::jetstream::object_store::ObjectInfo;

use crate::config::Provision;
use crate::error::{BoxError, Result};
use crate::kv::source_is_stream_not_found;
use crate::publish::Client;
use crate::stream::Location;
use crate::stream::{apply_placement, check, placement_drift, Placement, Provisioned};

mod reader;

pub use reader::ObjectReader;

/// The entry of an object's metadata map that holds the typed metadata of
/// [`ObjectStore::put_with`], as one JSON document.
pub const METADATA_KEY: &str = "natty-metadata";

/// A declared object store. `#[object_store(...)]` registers one; [`ObjectStoreDef::new`] builds
/// one by hand.
///
/// Only the settings given are enforced: the server keeps its value for the rest. The store is
/// the stream `OBJ_<name>`.
///
/// # Examples
///
/// ```
/// use natty_runtime::object_store::ObjectStoreDef;
/// const REPORTS: ObjectStoreDef = ObjectStoreDef::new("reports").max_bytes(10 << 30);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct ObjectStoreDef {
    name: &'static str,
    replicas: Option<usize>,
    placement: Option<Placement>,
    max_bytes: Option<i64>,
    storage: Option<StorageType>,
    ttl: Option<Duration>,
    description: Option<&'static str>,
    location: Location,
}

impl ObjectStoreDef {
    /// A store named `name` (letters, digits, `-` and `_`).
    pub const fn new(name: &'static str) -> Self {
        ObjectStoreDef {
            name,
            replicas: None,
            placement: None,
            max_bytes: None,
            storage: None,
            ttl: None,
            description: None,
            location: Location::UNKNOWN,
        }
    }

    /// Number of replicas (1, 3 or 5 in practice).
    pub const fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = Some(replicas);
        self
    }

    /// Where the bucket's replicas are placed (cluster, server tags).
    pub const fn placement(mut self, placement: Placement) -> Self {
        self.placement = Some(placement);
        self
    }

    /// Size limit of the whole store, in bytes.
    pub const fn max_bytes(mut self, max_bytes: i64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// File or memory storage.
    pub const fn storage(mut self, storage: StorageType) -> Self {
        self.storage = Some(storage);
        self
    }

    /// Objects older than this are removed.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Human-readable description.
    pub const fn description(mut self, description: &'static str) -> Self {
        self.description = Some(description);
        self
    }

    /// Records where the declaration was written (the macros set this).
    pub const fn at(mut self, location: Location) -> Self {
        self.location = location;
        self
    }

    /// The store's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// Creates the store or brings it in line with this declaration (`CreateOrUpdate`), checks
    /// it (`VerifyOnly`), or does nothing (`Off`).
    ///
    /// # Errors
    ///
    /// [`crate::Error::StreamNotFound`] when the store is missing in verify-only mode;
    /// [`crate::Error::Drift`] naming the first differing setting in verify-only mode, or
    /// the setting the server refused to change; [`crate::Error::Stream`] when a request fails.
    pub async fn provision(&self, client: &Client, mode: Provision) -> Result<()> {
        let js = client.jetstream();
        let bucket = Provisioned {
            stream: format!("OBJ_{}", self.name),
            location: self.location,
            owner: Some(("object store", self.name)),
        };
        let config = object_store::Config {
            bucket: self.name.to_string(),
            description: self.description.map(String::from),
            max_age: self.ttl.unwrap_or_default(),
            // -1 is what the server stores for "no limit".
            max_bytes: self.max_bytes.unwrap_or(-1),
            storage: self.storage.unwrap_or(StorageType::File),
            num_replicas: self.replicas.unwrap_or(1),
            placement: self.placement.map(|placement| placement.server()),
            ..Default::default()
        };
        bucket
            .provision(
                js,
                mode,
                |_| Ok(()),
                |actual| self.drift(actual),
                |config| self.apply(config),
                async {
                    js.create_object_store(config)
                        .await
                        .map(drop)
                        .map_err(|error| Box::new(error) as BoxError)
                },
            )
            .await
    }

    fn apply(&self, config: &mut StreamConfig) {
        if let Some(value) = self.replicas {
            config.num_replicas = value;
        }
        apply_placement(self.placement, config);
        if let Some(value) = self.max_bytes {
            config.max_bytes = value;
        }
        if let Some(value) = self.storage {
            config.storage = value;
        }
        if let Some(value) = self.ttl {
            config.max_age = value;
        }
        if let Some(value) = self.description {
            config.description = Some(value.to_string());
        }
    }

    fn drift(&self, actual: &StreamConfig) -> Option<(&'static str, String, String)> {
        check("replicas", self.replicas, actual.num_replicas)
            .or_else(|| placement_drift(self.placement, actual.placement.as_ref()))
            .or_else(|| check("max_bytes", self.max_bytes, actual.max_bytes))
            .or_else(|| check("storage", self.storage, actual.storage))
            .or_else(|| check("ttl", self.ttl, actual.max_age))
            .or_else(|| {
                check(
                    "description",
                    self.description,
                    actual.description.as_deref().unwrap_or(""),
                )
            })
    }
}

inventory::collect!(ObjectStoreDef);

/// An object store operation failed. Each variant names the store, and the object where there is one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ObjectStoreError {
    /// The store does not exist.
    #[error(
        "object store `{bucket}` does not exist; declare it with #[object_store(name = \"{bucket}\")] or create it"
    )]
    BucketNotFound {
        /// The store's name.
        bucket: String,
    },
    /// There is no such object (never put, or deleted).
    #[error("object store `{bucket}`: no object `{object}`")]
    NotFound {
        /// The store's name.
        bucket: String,
        /// The object's name.
        object: String,
    },
    /// The object name is empty or otherwise unusable.
    #[error("object store `{bucket}`: invalid object name `{object}`")]
    InvalidName {
        /// The store's name.
        bucket: String,
        /// The object's name.
        object: String,
    },
    /// Reading the data to store failed; what was sent of it is not visible as the object.
    #[error("object store `{bucket}`: reading the data for `{object}` failed")]
    Read {
        /// The store's name.
        bucket: String,
        /// The object's name.
        object: String,
        /// What the reader reported.
        #[source]
        source: BoxError,
    },
    /// The typed metadata could not be encoded, or the stored metadata decoded, as JSON.
    #[error("object store `{bucket}`: the metadata of `{object}`")]
    Metadata {
        /// The store's name.
        bucket: String,
        /// The object's name.
        object: String,
        /// What serde reported.
        #[source]
        source: serde_json::Error,
    },
    /// A request about one object failed (no server, timeout, refused, store full).
    #[error("object store `{bucket}`: {action} `{object}` failed")]
    Request {
        /// The store's name.
        bucket: String,
        /// The object's name.
        object: String,
        /// What was attempted.
        action: &'static str,
        /// The client's or the server's error.
        #[source]
        source: BoxError,
    },
    /// A request about the whole store failed.
    #[error("object store `{bucket}`: {action} failed")]
    Bucket {
        /// The store's name.
        bucket: String,
        /// What was attempted.
        action: &'static str,
        /// The client's or the server's error.
        #[source]
        source: BoxError,
    },
}

/// A handle on an object store. Objects are streamed in chunks (128 KiB) in both directions,
/// so memory use does not grow with their size. Cheap to clone.
///
/// # Examples
///
/// ```no_run
/// # async fn demo(client: natty_runtime::Client) -> Result<(), Box<dyn std::error::Error>> {
/// let reports = client.object_store("reports").await?;
/// let file = tokio::fs::File::open("q3.pdf").await?;
/// reports.put("2024/q3.pdf", file).await?;
///
/// let mut object = reports.get("2024/q3.pdf").await?;
/// let mut copy = tokio::fs::File::create("q3-copy.pdf").await?;
/// tokio::io::copy(&mut object, &mut copy).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ObjectStore {
    bucket: String,
    store: object_store::ObjectStore,
    js: jetstream::Context,
}

impl fmt::Debug for ObjectStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectStore").field("bucket", &self.bucket).finish()
    }
}

impl Client {
    /// A handle on the existing object store `bucket`.
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::BucketNotFound`] when there is no such store;
    /// [`ObjectStoreError::Bucket`] for an invalid name or a failed request.
    pub async fn object_store(&self, bucket: &str) -> std::result::Result<ObjectStore, ObjectStoreError> {
        match self.jetstream().get_object_store(bucket).await {
            Ok(store) => Ok(ObjectStore {
                bucket: bucket.into(),
                store,
                js: self.jetstream().clone(),
            }),
            Err(error) if source_is_stream_not_found(&error) => {
                Err(ObjectStoreError::BucketNotFound { bucket: bucket.into() })
            }
            Err(error) => Err(ObjectStoreError::Bucket {
                bucket: bucket.into(),
                action: "opening it",
                source: Box::new(error),
            }),
        }
    }
}

impl ObjectStore {
    /// The store's name.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The underlying async-nats store, for what this handle does not cover (links, sealing).
    pub fn raw(&self) -> &object_store::ObjectStore {
        &self.store
    }

    fn request(&self, object: &str, action: &'static str) -> impl FnOnce(BoxError) -> ObjectStoreError {
        let (bucket, object) = (self.bucket.clone(), object.to_string());
        move |source| ObjectStoreError::Request {
            bucket,
            object,
            action,
            source,
        }
    }

    fn not_found(&self, object: &str) -> ObjectStoreError {
        ObjectStoreError::NotFound {
            bucket: self.bucket.clone(),
            object: object.into(),
        }
    }

    fn invalid_name(&self, object: &str) -> ObjectStoreError {
        ObjectStoreError::InvalidName {
            bucket: self.bucket.clone(),
            object: object.into(),
        }
    }

    /// Stores what `data` yields as the object `name`, replacing any object of that name once
    /// the new one is complete. The data is read and sent one chunk at a time, each
    /// acknowledged before the next is read.
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::InvalidName`]; [`ObjectStoreError::Read`] when `data` fails;
    /// [`ObjectStoreError::Request`] when the store does not take a chunk (e.g. it is full).
    pub async fn put(
        &self,
        name: &str,
        data: impl AsyncRead + Unpin,
    ) -> std::result::Result<ObjectInfo, ObjectStoreError> {
        self.put_object(name, data, HashMap::new()).await
    }

    /// Like [`ObjectStore::put`], with typed `metadata`: it is stored as one JSON document
    /// under [`METADATA_KEY`] in the object's metadata map (which other NATS clients show as is),
    /// and read back with [`ObjectStore::metadata`] or [`ObjectReader::metadata`].
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(store: natty_runtime::object_store::ObjectStore) -> Result<(), Box<dyn std::error::Error>> {
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Report { quarter: u8, author: String }
    ///
    /// let data: &[u8] = b"...";
    /// store.put_with("2024/q3", data, &Report { quarter: 3, author: "ada".into() }).await?;
    /// let report: Option<Report> = store.metadata("2024/q3").await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::Metadata`] when `metadata` cannot be encoded; otherwise as
    /// [`ObjectStore::put`].
    pub async fn put_with<M: Serialize + ?Sized>(
        &self,
        name: &str,
        data: impl AsyncRead + Unpin,
        metadata: &M,
    ) -> std::result::Result<ObjectInfo, ObjectStoreError> {
        let json = serde_json::to_string(metadata).map_err(|source| ObjectStoreError::Metadata {
            bucket: self.bucket.clone(),
            object: name.into(),
            source,
        })?;
        self.put_object(name, data, HashMap::from([(METADATA_KEY.to_string(), json)]))
            .await
    }

    async fn put_object(
        &self,
        name: &str,
        mut data: impl AsyncRead + Unpin,
        metadata: HashMap<String, String>,
    ) -> std::result::Result<ObjectInfo, ObjectStoreError> {
        // async-nats checks the name only after sending every chunk.
        if name.is_empty() {
            return Err(self.invalid_name(name));
        }
        let meta = object_store::ObjectMetadata {
            name: name.to_string(),
            metadata,
            ..Default::default()
        };
        self.store
            .put(meta, &mut data)
            .await
            .map_err(|error| match error.kind() {
                object_store::PutErrorKind::InvalidName => self.invalid_name(name),
                object_store::PutErrorKind::ReadChunks => ObjectStoreError::Read {
                    bucket: self.bucket.clone(),
                    object: name.into(),
                    source: Box::new(error),
                },
                _ => self.request(name, "putting")(Box::new(error)),
            })
    }

    /// The object `name`, to read as an [`AsyncRead`]: its chunks are fetched as it is read, a
    /// few at a time (about 1 MiB ahead), and its size and SHA-256 digest are checked at the end
    /// (a mismatch is an `InvalidData` read error).
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::NotFound`], [`ObjectStoreError::InvalidName`],
    /// [`ObjectStoreError::Request`].
    pub async fn get(&self, name: &str) -> std::result::Result<ObjectReader, ObjectStoreError> {
        let info = self.info(name).await?;
        if info.options.as_ref().is_some_and(|options| options.link.is_some()) {
            // Links are rare; async-nats follows them (its reader may buffer more).
            return self.get_link(name).await;
        }
        Ok(ObjectReader::chunked(&self.js, &self.bucket, info))
    }

    async fn get_link(&self, name: &str) -> std::result::Result<ObjectReader, ObjectStoreError> {
        match self.store.get(name).await {
            Ok(object) => Ok(ObjectReader::linked(&self.bucket, object)),
            Err(error) => Err(match error.kind() {
                object_store::GetErrorKind::NotFound => self.not_found(name),
                object_store::GetErrorKind::InvalidName => self.invalid_name(name),
                _ => self.request(name, "getting")(Box::new(error)),
            }),
        }
    }

    /// What the store knows of the object `name`: size, chunks, digest, modification time,
    /// metadata map.
    ///
    /// # Errors
    ///
    /// As [`ObjectStore::get`].
    pub async fn info(&self, name: &str) -> std::result::Result<ObjectInfo, ObjectStoreError> {
        match self.store.info(name).await {
            Ok(info) if info.deleted => Err(self.not_found(name)),
            Ok(info) => Ok(info),
            Err(error) => Err(match error.kind() {
                object_store::InfoErrorKind::NotFound => self.not_found(name),
                object_store::InfoErrorKind::InvalidName => self.invalid_name(name),
                _ => self.request(name, "reading the info of")(Box::new(error)),
            }),
        }
    }

    /// The typed metadata stored with the object `name` by [`ObjectStore::put_with`], or
    /// `None` if it was stored without.
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::Metadata`] when it is not an `M`; otherwise as [`ObjectStore::get`].
    pub async fn metadata<M: DeserializeOwned>(&self, name: &str) -> std::result::Result<Option<M>, ObjectStoreError> {
        decode_metadata(&self.bucket, &self.info(name).await?)
    }

    /// Every object in the store (deleted ones left out), in the order they were last written.
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::Bucket`] when the request fails.
    pub async fn list(&self) -> std::result::Result<Vec<ObjectInfo>, ObjectStoreError> {
        let failed = |source: BoxError| ObjectStoreError::Bucket {
            bucket: self.bucket.clone(),
            action: "listing its objects",
            source,
        };
        let list = self.store.list().await.map_err(|error| failed(Box::new(error)))?;
        list.try_collect().await.map_err(|error| failed(Box::new(error)))
    }

    /// Deletes the object `name` and frees its chunks.
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::NotFound`] when there is no such object; [`ObjectStoreError::Request`].
    pub async fn delete(&self, name: &str) -> std::result::Result<(), ObjectStoreError> {
        self.store.delete(name).await.map_err(|error| match error.kind() {
            object_store::DeleteErrorKind::NotFound => self.not_found(name),
            object_store::DeleteErrorKind::InvalidName => self.invalid_name(name),
            _ => self.request(name, "deleting")(Box::new(error)),
        })
    }

    /// Every change made to the store from now on: each object put (when complete) or deleted,
    /// in order. It never ends by itself; drop it to stop watching.
    ///
    /// After an interruption (a server restart) async-nats sets the watch up again; unlike
    /// [`Kv::watch`](crate::kv::Kv::watch), a change may then be delivered twice.
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::Bucket`] when the watch cannot be set up; the stream then yields
    /// [`ObjectStoreError::Bucket`] for a change it cannot read, and goes on.
    pub async fn watch(&self) -> std::result::Result<ObjectChanges, ObjectStoreError> {
        let bucket = self.bucket.clone();
        let watch = self.store.watch().await.map_err(|error| ObjectStoreError::Bucket {
            bucket: bucket.clone(),
            action: "watching it",
            source: Box::new(error),
        })?;
        let changes = watch
            .map(move |change| match change {
                Ok(info) => Ok(ObjectChange {
                    name: info.name.clone(),
                    operation: if info.deleted {
                        ObjectOperation::Delete
                    } else {
                        ObjectOperation::Put
                    },
                    info,
                }),
                Err(error) => Err(ObjectStoreError::Bucket {
                    bucket: bucket.clone(),
                    action: "reading a change",
                    source: Box::new(error),
                }),
            })
            .boxed();
        Ok(ObjectChanges { changes })
    }
}

fn decode_metadata<M: DeserializeOwned>(
    bucket: &str,
    info: &ObjectInfo,
) -> std::result::Result<Option<M>, ObjectStoreError> {
    let Some(json) = info.metadata.get(METADATA_KEY) else {
        return Ok(None);
    };
    serde_json::from_str(json)
        .map(Some)
        .map_err(|source| ObjectStoreError::Metadata {
            bucket: bucket.into(),
            object: info.name.clone(),
            source,
        })
}

/// What happened to an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ObjectOperation {
    /// It was put (created or replaced).
    Put,
    /// It was deleted.
    Delete,
}

/// One change in an object store.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectChange {
    /// The object's name.
    pub name: String,
    /// What happened.
    pub operation: ObjectOperation,
    /// The object's info after the change (size 0 for a delete).
    pub info: ObjectInfo,
}

/// The changes of an object store, as [`ObjectStore::watch`] delivers them.
pub struct ObjectChanges {
    changes: BoxStream<'static, std::result::Result<ObjectChange, ObjectStoreError>>,
}

impl fmt::Debug for ObjectChanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectChanges").finish_non_exhaustive()
    }
}

impl Stream for ObjectChanges {
    type Item = std::result::Result<ObjectChange, ObjectStoreError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        self.changes.poll_next_unpin(cx)
    }
}
