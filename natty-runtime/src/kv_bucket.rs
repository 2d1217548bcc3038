//! `#[kv_bucket]`: a declared KV bucket and its provisioning (the bucket is the stream
//! `KV_<name>`; only the declared settings are enforced). [`Kv`](crate::Kv) reads and writes it.

use std::time::Duration;

use async_nats::jetstream::{
    kv,
    stream::{Config as StreamConfig, StorageType},
};

use crate::config::Provision;
use crate::error::{BoxError, Error, Result};
use crate::publish::Client;
use crate::stream::{apply_placement, check, placement_drift, Location, Placement, Provisioned};

/// The most revisions per key a bucket may keep: the server's limit.
pub const MAX_HISTORY: i64 = 64;

/// A declared KV bucket. `#[kv_bucket(...)]` registers one; [`KvBucketDef::new`] builds one by hand.
///
/// Only the settings given are enforced: the server keeps its value for the rest. The bucket is
/// the stream `KV_<name>`.
///
/// # Examples
///
/// ```
/// use natty_runtime::kv::KvBucketDef;
/// use std::time::Duration;
/// const CONFIG: KvBucketDef = KvBucketDef::new("config").history(5).ttl(Duration::from_secs(3600));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct KvBucketDef {
    name: &'static str,
    history: Option<i64>,
    ttl: Option<Duration>,
    replicas: Option<usize>,
    placement: Option<Placement>,
    max_value_size: Option<i32>,
    max_bytes: Option<i64>,
    storage: Option<StorageType>,
    description: Option<&'static str>,
    location: Location,
}

impl KvBucketDef {
    /// A bucket named `name` (letters, digits, `-` and `_`).
    pub const fn new(name: &'static str) -> Self {
        KvBucketDef {
            name,
            history: None,
            ttl: None,
            replicas: None,
            placement: None,
            max_value_size: None,
            max_bytes: None,
            storage: None,
            description: None,
            location: Location::UNKNOWN,
        }
    }

    /// How many revisions of each key are kept, 1 to [`MAX_HISTORY`] (the default is 1).
    pub const fn history(mut self, history: i64) -> Self {
        self.history = Some(history);
        self
    }

    /// Entries older than this are removed.
    pub const fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
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

    /// The largest value accepted, in bytes.
    pub const fn max_value_size(mut self, max_value_size: i32) -> Self {
        self.max_value_size = Some(max_value_size);
        self
    }

    /// Size limit of the whole bucket, in bytes.
    pub const fn max_bytes(mut self, max_bytes: i64) -> Self {
        self.max_bytes = Some(max_bytes);
        self
    }

    /// File or memory storage.
    pub const fn storage(mut self, storage: StorageType) -> Self {
        self.storage = Some(storage);
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

    /// The bucket's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// Creates the bucket or brings it in line with this declaration (`CreateOrUpdate`),
    /// checks it (`VerifyOnly`), or does nothing (`Off`).
    ///
    /// An update changes only the declared settings of the bucket's stream and keeps its
    /// entries; the server refuses some changes (e.g. the storage type).
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # async fn demo(client: natty_runtime::Client) -> natty_runtime::Result<()> {
    /// use natty_runtime::{kv::KvBucketDef, Provision};
    /// KvBucketDef::new("config").history(5).provision(&client, Provision::CreateOrUpdate).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for a history outside 1..=64; [`Error::StreamNotFound`] when the bucket
    /// is missing in verify-only mode; [`Error::Drift`] naming the first differing setting
    /// in verify-only mode, or the setting the server refused to change; [`Error::Stream`] when
    /// a request fails.
    pub async fn provision(&self, client: &Client, mode: Provision) -> Result<()> {
        if let Some(history) = self.history.filter(|history| !(1..=MAX_HISTORY).contains(history)) {
            return Err(Error::config(
                format!(
                    "history of the KV bucket `{}` (declared at {})",
                    self.name, self.location
                ),
                history.to_string(),
                format!("must be between 1 and {MAX_HISTORY}"),
            ));
        }
        let js = client.jetstream();
        let bucket = Provisioned {
            stream: format!("KV_{}", self.name),
            location: self.location,
            owner: Some(("KV bucket", self.name)),
        };
        bucket
            .provision(
                js,
                mode,
                |_| Ok(()),
                |actual| self.drift(actual),
                |config| self.apply(config),
                async {
                    js.create_key_value(self.new_config())
                        .await
                        .map(drop)
                        .map_err(|error| Box::new(error) as BoxError)
                },
            )
            .await
    }

    fn new_config(&self) -> kv::Config {
        kv::Config {
            bucket: self.name.to_string(),
            description: self.description.unwrap_or_default().to_string(),
            history: self.history.unwrap_or(1),
            max_age: self.ttl.unwrap_or_default(),
            // -1 is what the server stores for "no limit".
            max_value_size: self.max_value_size.unwrap_or(-1),
            max_bytes: self.max_bytes.unwrap_or(-1),
            storage: self.storage.unwrap_or(StorageType::File),
            num_replicas: self.replicas.unwrap_or(1),
            placement: self.placement.map(|placement| placement.server()),
            ..Default::default()
        }
    }

    /// Overwrites the declared settings in the bucket's stream config.
    fn apply(&self, config: &mut StreamConfig) {
        if let Some(value) = self.history {
            config.max_messages_per_subject = value;
        }
        if let Some(value) = self.ttl {
            config.max_age = value;
        }
        if let Some(value) = self.replicas {
            config.num_replicas = value;
        }
        apply_placement(self.placement, config);
        if let Some(value) = self.max_value_size {
            config.max_message_size = value;
        }
        if let Some(value) = self.max_bytes {
            config.max_bytes = value;
        }
        if let Some(value) = self.storage {
            config.storage = value;
        }
        if let Some(value) = self.description {
            config.description = Some(value.to_string());
        }
    }

    /// The first declared setting that differs from the bucket's stream: (field, declared, actual).
    fn drift(&self, actual: &StreamConfig) -> Option<(&'static str, String, String)> {
        check("history", self.history, actual.max_messages_per_subject)
            .or_else(|| check("ttl", self.ttl, actual.max_age))
            .or_else(|| {
                check("replicas", self.replicas, actual.num_replicas)
                    .or_else(|| placement_drift(self.placement, actual.placement.as_ref()))
            })
            .or_else(|| check("max_value_size", self.max_value_size, actual.max_message_size))
            .or_else(|| check("max_bytes", self.max_bytes, actual.max_bytes))
            .or_else(|| check("storage", self.storage, actual.storage))
            .or_else(|| {
                check(
                    "description",
                    self.description,
                    actual.description.as_deref().unwrap_or(""),
                )
            })
    }
}

inventory::collect!(KvBucketDef);
