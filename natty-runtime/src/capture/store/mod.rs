//! Where blocks go: a local folder, S3 or Azure Blob storage, through the `object_store` crate.
//!
//! This module owns the store URL (`file://`, `s3://`, `az://`), its path template, the
//! credentials taken from the environment, and writing a block so that no partial block is ever
//! visible under its final name. The capture engine opens one [`BlockStore`] per capture at
//! startup, checks its [`placeholders`](BlockStore::placeholders), calls
//! [`sweep_temporaries`](BlockStore::sweep_temporaries) once, and then for every block renders
//! [`block_path`](BlockStore::block_path) and [`put`](BlockStore::put)s the bytes; it acks the
//! block's messages only after `put` returned `Ok`.
//!
//! # Store URLs
//!
//! - `file:///abs/dir/{key}/`: a local folder, absolute; `file://rel/dir/{key}/` is relative to
//!   the current directory. The folder is the part before the first segment with a placeholder.
//! - `s3://<bucket>/<template>`: Amazon S3 or any S3-compatible server, with `AWS_ACCESS_KEY_ID`,
//!   `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL` (or
//!   `AWS_ENDPOINT`), `AWS_ALLOW_HTTP`, ….
//! - `az://<container>/<template>` (or `azure://`): Azure Blob storage, with
//!   `AZURE_STORAGE_ACCOUNT_NAME`, `AZURE_STORAGE_ACCOUNT_KEY`, `AZURE_STORAGE_SAS_TOKEN`,
//!   `AZURE_STORAGE_ENDPOINT`, …; for Azurite, `AZURE_STORAGE_USE_EMULATOR=true` and
//!   `AZURITE_BLOB_STORAGE_URL` (default `http://127.0.0.1:10000`).
//!
//! The S3 and Azure variables are those `object_store`'s `from_env` builders read (the full
//! lists are [`S3_ENV_VARS`] and [`AZURE_ENV_VARS`]). Two more, for both S3 and Azure, bound how
//! long one request is retried before `put` gives up: `NATTY_STORE_MAX_RETRIES` (default 10)
//! and `NATTY_STORE_RETRY_TIMEOUT` (a duration such as `30s`, default `3m`).
//!
//! `${VAR}` anywhere in the URL is replaced with the environment variable `VAR` first, so one
//! configuration can name a bucket per deployment: `s3://${CAPTURE_BUCKET}/orders/{date}/`.
//!
//! # Path templates
//!
//! After the bucket or container (or, for `file://`, after the folder part that has no
//! placeholder), the URL is a path template. A block's path is the rendered template followed
//! by its file name. Placeholders:
//!
//! | placeholder | value |
//! | --- | --- |
//! | `{key}` | the block's split key; for a struct key, its field values joined by `/` |
//! | `{<field>}` | one field of a struct key, e.g. `{region}` |
//! | `{stream}`, `{durable}` | the stream and the durable consumer name |
//! | `{date}` | the UTC date of the block's window start, `2026-11-23` |
//! | `{yyyy}`, `{mm}`, `{dd}`, `{hh}`, `{min}` | its year, month, day, hour and minute, zero-padded |
//!
//! Each key value fills exactly one path segment: a `/` in it is percent-encoded (`%2F`), as
//! are the characters S3 and GCS advise against (`\ { } ^ % ` [ ] " < > ~ # | * ?` and control
//! characters); a value of `.` or `..` becomes `%2E` or `%2E%2E`; an empty value becomes `_`.
//! Other characters, including non-ASCII ones, are kept. So a key can never climb out of the
//! template or add a segment to it.
//!
//! # Examples
//!
//! ```no_run
//! # async fn example() -> Result<(), natty_runtime::capture::store::StoreError> {
//! use natty_runtime::capture::store::{block_file_name, BlockStore, PathVars};
//!
//! let store = BlockStore::open("s3://${CAPTURE_BUCKET}/{stream}/{key}/{date}/")?;
//! assert_eq!(store.placeholders(), ["stream", "key", "date"]);
//! store.sweep_temporaries().await?;
//!
//! let key = [("key".to_owned(), "eu-west".to_owned())];
//! let vars = PathVars { stream: "ORDERS", durable: "archive", key: &key, window_start: 1_795_392_000 };
//! let path = store.block_path(&vars, &block_file_name("ORDERS", 1, 500, "csv.gz"))?;
//! store.put(&path, bytes::Bytes::from_static(b"a,b\n")).await?;
//! println!("stored {}", store.describe(&path));
//! # Ok(())
//! # }
//! ```

use std::io::Write as _;
use std::path::{Component, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::{Path, PathPart};
use object_store::{ObjectStore, ObjectStoreExt as _, PutPayload, WriteMultipart};

mod cloud;
mod template;

use cloud::{build_azure, build_s3};
pub use cloud::{AZURE_ENV_VARS, MAX_RETRIES_ENV, RETRY_TIMEOUT_ENV, S3_ENV_VARS};
#[cfg(test)]
use template::civil_from_days;
use template::{sanitise, Piece, Template, UtcTime};

/// Blocks larger than this go up in parts (S3 multipart upload, Azure block list), so that no
/// single request carries more than [`PART_SIZE`] bytes: `object_store`'s default request
/// timeout is 30 s, which one 64 MiB PUT over a modest link would not meet.
const MULTIPART_THRESHOLD: usize = 32 * 1024 * 1024;
/// Size of one part of a multipart upload; S3 wants at least 5 MiB for every part but the last.
const PART_SIZE: usize = 16 * 1024 * 1024;
/// Parts of one block in flight at once.
const PART_CONCURRENCY: usize = 4;
/// Folder under a local store's root that holds blocks being written.
const TMP_DIR: &str = ".natty-tmp";
/// Folder, under the template's literal start, of the manifests that say which messages each
/// stored block holds.
pub const MANIFEST_DIR: &str = ".natty-manifests";

/// Why a store could not be opened or a block could not be stored.
///
/// Every message names the store URL (after `${VAR}` interpolation, once that succeeded) and,
/// for a block, its path.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL cannot be used: unknown scheme, no bucket, a malformed template or `${VAR}`.
    #[error("store URL `{url}`: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The URL names an environment variable that is not set.
    #[error("store URL `{url}`: environment variable `{var}` is not set (the URL uses `${{{var}}}`)")]
    MissingEnv {
        /// The URL as given.
        url: String,
        /// The variable.
        var: String,
    },
    /// A setting from the environment is malformed, or `object_store` refused the configuration.
    #[error("store `{url}`: cannot configure the {scheme} client: {reason}")]
    Config {
        /// The store URL.
        url: String,
        /// `s3` or `az`.
        scheme: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A block path cannot be made: the template uses a placeholder the block has no value for,
    /// or the file name is not a single path segment.
    #[error("store `{url}`: cannot make the path of block `{file_name}`: {reason}")]
    Path {
        /// The store URL.
        url: String,
        /// The block's file name.
        file_name: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the store failed.
    #[error("store `{url}`: {action} `{location}` failed")]
    Io {
        /// The store URL.
        url: String,
        /// What was being done, e.g. "writing block".
        action: &'static str,
        /// The object path or local file concerned.
        location: String,
        /// The underlying error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What a path template is rendered with.
#[derive(Debug, Clone, Copy)]
pub struct PathVars<'a> {
    /// The stream the capture reads.
    pub stream: &'a str,
    /// The durable consumer name.
    pub durable: &'a str,
    /// The block's split key by field: a plain string key is `[("key", value)]`; a struct key
    /// gives each field by name.
    pub key: &'a [(String, String)],
    /// Start of the block's time window, seconds since the Unix epoch (UTC).
    pub window_start: u64,
}

/// The file name of a block holding stream sequences `first..=last`:
/// `{stream}-{first:020}-{last:020}.{extension}`.
///
/// The capture names its blocks with [`incarnation_block_file_name`] instead, which adds the
/// stream's creation time; this form does not tell apart two streams of the same name.
///
/// The sequences are zero-padded to 20 digits (`u64::MAX` has 20), so names sort by sequence.
///
/// # Examples
///
/// ```
/// use natty_runtime::capture::store::block_file_name;
///
/// assert_eq!(
///     block_file_name("ORDERS", 1, 500, "csv.gz"),
///     "ORDERS-00000000000000000001-00000000000000000500.csv.gz"
/// );
/// ```
pub fn block_file_name(stream: &str, first: u64, last: u64, extension: &str) -> String {
    format!("{stream}-{first:020}-{last:020}.{extension}")
}

/// The file name of a block of one incarnation of a stream, the one created at `created`
/// (nanoseconds since the Unix epoch, the server's `created` of the stream):
/// `{stream}-{created as yyyymmddThhmmss_nanosZ}-{first:020}-{last:020}.{extension}`.
///
/// A stream deleted and created again (or a memory stream lost in a server restart) numbers its
/// messages from 1 again; its creation time keeps the new blocks from overwriting the old ones.
/// Within one incarnation the name depends only on the sequences, so a block rebuilt from the
/// same messages overwrites itself. Names of one stream sort by incarnation, then sequence.
///
/// # Examples
///
/// ```
/// use natty_runtime::capture::store::incarnation_block_file_name;
///
/// // 2026-11-23 13:45:00.000000042 UTC
/// let created = 1_795_441_500_000_000_042;
/// assert_eq!(
///     incarnation_block_file_name("ORDERS", created, 1, 500, "csv.gz"),
///     "ORDERS-20261123T134500_000000042Z-00000000000000000001-00000000000000000500.csv.gz"
/// );
/// ```
pub fn incarnation_block_file_name(stream: &str, created: u64, first: u64, last: u64, extension: &str) -> String {
    let time = UtcTime::from_unix(created / 1_000_000_000);
    let nanos = created % 1_000_000_000;
    format!(
        "{stream}-{:04}{:02}{:02}T{:02}{:02}{:02}_{nanos:09}Z-{first:020}-{last:020}.{extension}",
        time.year, time.month, time.day, time.hour, time.minute, time.second
    )
}

/// A place blocks are written to: a local folder, an S3 bucket or an Azure container, with the
/// path template blocks are named by. Cheap to clone.
#[derive(Debug, Clone)]
pub struct BlockStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The URL after `${VAR}` interpolation, for messages.
    url: String,
    backend: Backend,
    store: Arc<dyn ObjectStore>,
    /// Path segments every block path starts with (a local store's folder, as object path).
    prefix: Path,
    template: Template,
}

#[derive(Debug)]
enum Backend {
    Local {
        /// The folder part of the URL that has no placeholder, made absolute.
        root: PathBuf,
        fs: Arc<LocalFileSystem>,
    },
    S3 {
        bucket: String,
    },
    Azure {
        container: String,
    },
}

impl BlockStore {
    /// Opens a store from its URL, reading `${VAR}`s and credentials from the process
    /// environment. No I/O: a wrong bucket or credential shows at the first [`put`](Self::put).
    ///
    /// See the [module docs](self) for the URL forms, the variables read and the template.
    ///
    /// # Examples
    ///
    /// ```
    /// use natty_runtime::capture::store::BlockStore;
    ///
    /// let store = BlockStore::open("file:///var/lib/capture/{stream}/{date}/").unwrap();
    /// assert_eq!(store.scheme(), "file");
    /// assert_eq!(store.placeholders(), ["stream", "date"]);
    /// ```
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidUrl`] for a scheme other than `file`, `s3`, `az` or `azure`, a
    /// missing bucket or container, an unmatched `{` or `}`, an empty placeholder or path
    /// segment; [`StoreError::MissingEnv`] for a `${VAR}` that is not set;
    /// [`StoreError::Config`] when `object_store` rejects a setting from the environment.
    pub fn open(url: &str) -> Result<BlockStore, StoreError> {
        Self::open_with_env(url, &|name| std::env::var(name).ok())
    }

    /// Opens a store as [`open`](Self::open) does, reading every variable (`${VAR}`s,
    /// credentials, endpoints, retry settings) through `env` instead of the process environment.
    ///
    /// For tests running in parallel, each with its own server, and for callers that keep
    /// configuration elsewhere.
    ///
    /// # Examples
    ///
    /// ```
    /// use natty_runtime::capture::store::BlockStore;
    ///
    /// let env = |name: &str| (name == "BUCKET").then(|| "archive".to_owned());
    /// let store = BlockStore::open_with_env("s3://${BUCKET}/{key}/", &env).unwrap();
    /// assert_eq!(store.scheme(), "s3");
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`open`](Self::open).
    pub fn open_with_env(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<BlockStore, StoreError> {
        let expanded = interpolate(url, env)?;
        let invalid = |reason: String| StoreError::InvalidUrl {
            url: expanded.clone(),
            reason,
        };
        let Some((scheme, rest)) = expanded.split_once("://") else {
            return Err(invalid(format!(
                "no scheme; use file:///<folder>/<template>, s3://<bucket>/<template> or \
                 az://<container>/<template>{}",
                hint_for(&expanded)
            )));
        };
        let (backend, store, prefix, template_text) = match scheme.to_ascii_lowercase().as_str() {
            "file" => {
                let (root, template_text) = split_local(rest).map_err(&invalid)?;
                let prefix = Path::from_absolute_path(&root)
                    .map_err(|err| invalid(format!("folder {} is not usable: {err}", root.display())))?;
                let fs = Arc::new(LocalFileSystem::new());
                let store: Arc<dyn ObjectStore> = fs.clone();
                (Backend::Local { root, fs }, store, prefix, template_text)
            }
            "s3" => {
                let (bucket, template_text) = split_bucket(rest, "bucket").map_err(&invalid)?;
                let store = build_s3(&expanded, &bucket, env)?;
                (Backend::S3 { bucket }, store, Path::default(), template_text)
            }
            "az" | "azure" => {
                let (container, template_text) = split_bucket(rest, "container").map_err(&invalid)?;
                let store = build_azure(&expanded, &container, env)?;
                (Backend::Azure { container }, store, Path::default(), template_text)
            }
            other => {
                return Err(invalid(format!(
                    "unknown scheme `{other}`; use file:///<folder>/<template>, s3://<bucket>/<template> or \
                     az://<container>/<template>"
                )))
            }
        };
        let template = Template::parse(&template_text).map_err(&invalid)?;
        Ok(BlockStore {
            inner: Arc::new(Inner {
                url: expanded,
                backend,
                store,
                prefix,
                template,
            }),
        })
    }

    /// The placeholder names in the path template, in order of first use, e.g. `["key", "date"]`.
    pub fn placeholders(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for piece in self.inner.template.segments.iter().flatten() {
            if let Piece::Placeholder(name) = piece {
                if !names.contains(name) {
                    names.push(name.clone());
                }
            }
        }
        names
    }

    /// The block's full path: the template rendered with `vars`, then `file_name`.
    ///
    /// # Examples
    ///
    /// ```
    /// use natty_runtime::capture::store::{BlockStore, PathVars};
    ///
    /// let store = BlockStore::open_with_env("s3://archive/{stream}/{region}/{date}", &|_| None).unwrap();
    /// let key = [("region".to_owned(), "eu/west".to_owned())];
    /// let vars = PathVars { stream: "ORDERS", durable: "d", key: &key, window_start: 86_400 };
    /// let path = store.block_path(&vars, "b.csv").unwrap();
    /// assert_eq!(path.as_ref(), "ORDERS/eu%2Fwest/1970-01-02/b.csv");
    /// ```
    ///
    /// # Errors
    ///
    /// [`StoreError::Path`] when the template uses a placeholder that is neither a fixed one nor
    /// a field of `vars.key` (the message lists the known ones), or `file_name` is not a single
    /// usable path segment.
    pub fn block_path(&self, vars: &PathVars<'_>, file_name: &str) -> Result<Path, StoreError> {
        let folder = self.block_folder(vars).map_err(|error| match error {
            StoreError::Path { url, reason, .. } => StoreError::Path {
                url,
                file_name: file_name.to_owned(),
                reason,
            },
            other => other,
        })?;
        self.in_folder(&folder, file_name)
    }

    /// The folder a block of `vars` goes to: the template rendered, without a file name.
    ///
    /// The capture renders it when a block opens, so a key that cannot fill the template is
    /// refused with its message instead of failing the block's store later.
    ///
    /// # Errors
    ///
    /// [`StoreError::Path`] when the template uses a placeholder that is neither a fixed one nor
    /// a field of `vars.key` (the message lists the known ones).
    pub fn block_folder(&self, vars: &PathVars<'_>) -> Result<Path, StoreError> {
        let path_error = |reason: String| StoreError::Path {
            url: self.inner.url.clone(),
            file_name: String::new(),
            reason,
        };
        let segments = self.inner.template.render(vars).map_err(path_error)?;
        let mut text = self.inner.prefix.as_ref().to_owned();
        for segment in &segments {
            if !text.is_empty() {
                text.push('/');
            }
            text.push_str(segment);
        }
        // Every segment was checked or encoded already; this only guards that reasoning.
        Path::parse(&text).map_err(|err| path_error(err.to_string()))
    }

    /// `file_name` inside `folder` (from [`block_folder`](Self::block_folder)).
    ///
    /// # Errors
    ///
    /// [`StoreError::Path`] when `file_name` is not a single usable path segment.
    pub fn in_folder(&self, folder: &Path, file_name: &str) -> Result<Path, StoreError> {
        if file_name.is_empty() || PathPart::parse(file_name).is_err() {
            return Err(StoreError::Path {
                url: self.inner.url.clone(),
                file_name: file_name.to_owned(),
                reason: "a file name must be one non-empty path segment: no `/`, no control character, not `.` or `..`"
                    .to_owned(),
            });
        }
        Ok(folder.clone().join(file_name))
    }

    /// Where a capture keeps the manifests of its blocks (see `capture::ledger`):
    /// `<literal start of the template>/.natty-manifests/<stream>/<durable>/`. The leading dot
    /// keeps the folder out of what Spark, Hive, Athena and pyarrow read as data; it sits under
    /// the template's literal folders so that a store whose credentials cover only that prefix
    /// can write it.
    pub(crate) fn manifest_folder(&self, stream: &str, durable: &str) -> Path {
        let mut path = self.inner.prefix.clone();
        for segment in &self.inner.template.segments {
            let literal: Option<String> = segment
                .iter()
                .map(|piece| match piece {
                    Piece::Literal(text) => Some(text.as_str()),
                    Piece::Placeholder(_) => None,
                })
                .collect();
            match literal {
                Some(text) => path = path.join(text),
                None => break,
            }
        }
        path.join(MANIFEST_DIR).join(sanitise(stream)).join(sanitise(durable))
    }

    /// Writes a block so that no partial block is ever visible under its name.
    ///
    /// A local store writes to a new file in `<folder>/.natty-tmp/`, syncs it, and renames it
    /// into place (then syncs the folder), so a crash at any moment leaves either no block or the
    /// whole block, plus possibly a leftover in `.natty-tmp` for
    /// [`sweep_temporaries`](Self::sweep_temporaries) (a rename cannot cross file systems, so no
    /// folder under the store's root may be another mount). On S3 and Azure a PUT is visible only once
    /// complete; a block over 32 MiB goes up in 16 MiB parts that the final request commits.
    /// An existing block of the same name is replaced: a redelivery after a crash rewrites it.
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] naming the store and the path when the write fails (after
    /// `object_store`'s retries for S3 and Azure; see `NATTY_STORE_MAX_RETRIES`).
    pub async fn put(&self, path: &Path, bytes: Bytes) -> Result<(), StoreError> {
        match &self.inner.backend {
            Backend::Local { root, fs } => {
                let target = fs
                    .path_to_filesystem(path)
                    .map_err(|err| self.io_error("writing block", path, err))?;
                let tmp_dir = root.join(TMP_DIR);
                let url = self.inner.url.clone();
                let task = tokio::task::spawn_blocking(move || write_local(&tmp_dir, &target, &bytes, &url));
                match task.await {
                    Ok(outcome) => outcome,
                    Err(err) => Err(self.io_error("writing block", path, err)),
                }
            }
            Backend::S3 { .. } | Backend::Azure { .. } => {
                if bytes.len() <= MULTIPART_THRESHOLD {
                    self.inner
                        .store
                        .put(path, PutPayload::from(bytes))
                        .await
                        .map(drop)
                        .map_err(|err| self.io_error("writing block", path, err))
                } else {
                    self.put_in_parts(path, bytes).await
                }
            }
        }
    }

    /// A multipart upload: nothing is visible until `finish` commits the parts.
    async fn put_in_parts(&self, path: &Path, mut bytes: Bytes) -> Result<(), StoreError> {
        let upload = self
            .inner
            .store
            .put_multipart(path)
            .await
            .map_err(|err| self.io_error("starting multipart upload of block", path, err))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        while !bytes.is_empty() {
            if let Err(err) = writer.wait_for_capacity(PART_CONCURRENCY).await {
                self.abort(writer, path).await;
                return Err(self.io_error("uploading a part of block", path, err));
            }
            let part = bytes.split_to(bytes.len().min(PART_SIZE));
            writer.put(part);
        }
        writer
            .finish()
            .await
            .map(drop)
            .map_err(|err| self.io_error("completing multipart upload of block", path, err))
    }

    /// Aborts a failed multipart upload so the parts already sent are not kept (and billed).
    async fn abort(&self, writer: WriteMultipart, path: &Path) {
        if let Err(err) = writer.abort().await {
            tracing::warn!(store = %self.inner.url, path = %path, err = %crate::error::chain(&err), "cannot abort a failed multipart upload");
        }
    }

    /// Removes leftover temporaries of earlier runs from a local store's `.natty-tmp` folder and
    /// returns how many there were; S3 and Azure have none, and return 0. Called once at startup.
    ///
    /// It removes every file there, so it must not run while another process writes to the same
    /// folder (that writer's block would fail and be retried, nothing would be lost).
    ///
    /// # Errors
    ///
    /// [`StoreError::Io`] when the folder cannot be listed or a file cannot be removed.
    pub async fn sweep_temporaries(&self) -> Result<usize, StoreError> {
        self.sweep_temporaries_older_than(Duration::ZERO).await
    }

    /// [`sweep_temporaries`](Self::sweep_temporaries), leaving those modified within `age`:
    /// another writer's (a partitioned capture's other partitions, another instance) may be in
    /// flight.
    pub async fn sweep_temporaries_older_than(&self, age: Duration) -> Result<usize, StoreError> {
        let Backend::Local { root, .. } = &self.inner.backend else {
            return Ok(0);
        };
        let tmp_dir = root.join(TMP_DIR);
        let url = self.inner.url.clone();
        let task = tokio::task::spawn_blocking(move || sweep_local(&tmp_dir, &url, age));
        match task.await {
            Ok(outcome) => outcome,
            Err(err) => Err(StoreError::Io {
                url: self.inner.url.clone(),
                action: "sweeping temporaries in",
                location: root.join(TMP_DIR).display().to_string(),
                source: Box::new(err),
            }),
        }
    }

    /// A human-readable location for logs: `s3://bucket/a/b.csv.gz`, `az://container/a/b.csv`,
    /// `file:///abs/a/b.csv.gz`.
    pub fn describe(&self, path: &Path) -> String {
        match &self.inner.backend {
            Backend::Local { .. } => format!("file:///{path}"),
            Backend::S3 { bucket } => format!("s3://{bucket}/{path}"),
            Backend::Azure { container } => format!("az://{container}/{path}"),
        }
    }

    /// `"file"`, `"s3"` or `"az"`.
    pub fn scheme(&self) -> &'static str {
        match &self.inner.backend {
            Backend::Local { .. } => "file",
            Backend::S3 { .. } => "s3",
            Backend::Azure { .. } => "az",
        }
    }

    /// The underlying object store, to read blocks back. For a local store it is rooted at `/`,
    /// so block paths are absolute paths without the leading `/`.
    pub fn object_store(&self) -> Arc<dyn ObjectStore> {
        self.inner.store.clone()
    }

    fn io_error(
        &self,
        action: &'static str,
        path: &Path,
        err: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> StoreError {
        StoreError::Io {
            url: self.inner.url.clone(),
            action,
            location: self.describe(path),
            source: err.into(),
        }
    }
}

/// A hint for a URL without `://` that looks like a plain folder.
fn hint_for(url: &str) -> &'static str {
    if url.starts_with('/') || url.starts_with('.') {
        " (for a local folder write file://<folder>, e.g. file:///var/lib/capture/{key}/)"
    } else {
        ""
    }
}

/// Replaces each `${NAME}` with the variable's value; `$` not followed by `{` is kept.
fn interpolate(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, StoreError> {
    let invalid = |reason: String| StoreError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let mut out = String::with_capacity(url.len());
    let mut rest = url;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| {
            invalid(format!(
                "`${{` at byte {} has no closing `}}`",
                url.len() - rest.len() + start
            ))
        })?;
        // `${VAR:-default}`: the default when VAR is unset or empty, as in a shell.
        let (name, default) = match after[..end].split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (&after[..end], None),
        };
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(invalid(format!(
                "`${{{name}}}` is not an environment variable name (letters, digits and `_`, not starting with a digit)"
            )));
        }
        let value = match (env(name).filter(|value| !value.is_empty()), default) {
            (Some(value), _) => value,
            (None, Some(default)) => default.to_owned(),
            (None, None) => {
                return Err(StoreError::MissingEnv {
                    url: url.to_owned(),
                    var: name.to_owned(),
                })
            }
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Splits the part after `file://` into the folder (the segments before the first one with a
/// placeholder, made absolute against the current directory) and the template.
fn split_local(rest: &str) -> Result<(PathBuf, String), String> {
    if rest.is_empty() {
        return Err("no folder; use file:///<absolute folder>/... or file://<relative folder>/...".to_owned());
    }
    let absolute = rest.starts_with('/');
    let segments: Vec<&str> = rest.split('/').collect();
    let first_placeholder = segments
        .iter()
        .position(|segment| segment.contains('{') || segment.contains('}'))
        .unwrap_or(segments.len());
    let mut folder = PathBuf::from(if absolute { "/" } else { "." });
    for segment in &segments[..first_placeholder] {
        folder.push(segment);
    }
    let template = segments[first_placeholder..].join("/");
    let folder = if absolute {
        folder
    } else {
        let cwd = std::env::current_dir()
            .map_err(|err| format!("cannot resolve the relative folder `{rest}`: no current directory: {err}"))?;
        cwd.join(folder)
    };
    Ok((normalise(&folder)?, template))
}

/// Removes `.` and `..` from an absolute path without touching the file system (`canonicalize`
/// would need the folder to exist, and `open` does no I/O).
fn normalise(path: &std::path::Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return Err(format!("folder {} climbs above /", path.display()));
                }
            }
            other => out.push(other),
        }
    }
    Ok(out)
}

/// Splits `<bucket>/<template>`.
fn split_bucket(rest: &str, what: &str) -> Result<(String, String), String> {
    let (bucket, template) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("no {what} name after the scheme"));
    }
    if bucket.contains(['{', '}']) {
        return Err(format!(
            "the {what} name `{bucket}` cannot hold a placeholder; put placeholders in the path after it"
        ));
    }
    Ok((bucket.to_owned(), template.to_owned()))
}

/// Writes `bytes` to a new file in `tmp_dir`, syncs it, renames it to `target` and syncs
/// `target`'s folder, so the block is durable before it is acked.
fn write_local(tmp_dir: &std::path::Path, target: &std::path::Path, bytes: &[u8], url: &str) -> Result<(), StoreError> {
    let io_error = |action: &'static str, location: &std::path::Path, err: std::io::Error| StoreError::Io {
        url: url.to_owned(),
        action,
        location: location.display().to_string(),
        source: Box::new(err),
    };
    std::fs::create_dir_all(tmp_dir).map_err(|err| io_error("creating the temporary folder", tmp_dir, err))?;
    let (tmp_path, mut file) =
        new_temporary(tmp_dir).map_err(|err| io_error("creating a temporary in", tmp_dir, err))?;
    let written = file.write_all(bytes).and_then(|()| file.sync_all());
    drop(file);
    let renamed = written
        .map_err(|err| io_error("writing temporary block", &tmp_path, err))
        .and_then(|()| {
            let parent = target.parent().unwrap_or(tmp_dir);
            std::fs::create_dir_all(parent).map_err(|err| io_error("creating the folder of block", parent, err))?;
            std::fs::rename(&tmp_path, target).map_err(|err| io_error("renaming the temporary to block", target, err))
        });
    if let Err(err) = renamed {
        // Best effort: a leftover would be swept at the next startup anyway.
        let _ = std::fs::remove_file(&tmp_path);
        return Err(err);
    }
    // The rename is durable only once the folder holding the new name is synced.
    if let Some(parent) = target.parent() {
        std::fs::File::open(parent)
            .and_then(|dir| dir.sync_all())
            .map_err(|err| io_error("syncing the folder of block", parent, err))?;
    }
    Ok(())
}

/// Creates a temporary file with a name no other write in this or another process uses.
fn new_temporary(tmp_dir: &std::path::Path) -> std::io::Result<(PathBuf, std::fs::File)> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = tmp_dir.join(format!("{}-{n}.tmp", std::process::id()));
        // A leftover of an earlier process that had the same pid: take the next number.
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(file) => return Ok((path, file)),
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(err) => return Err(err),
        }
    }
}

fn sweep_local(tmp_dir: &std::path::Path, url: &str, age: Duration) -> Result<usize, StoreError> {
    let io_error = |action: &'static str, location: &std::path::Path, err: std::io::Error| StoreError::Io {
        url: url.to_owned(),
        action,
        location: location.display().to_string(),
        source: Box::new(err),
    };
    let entries = match std::fs::read_dir(tmp_dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(err) => return Err(io_error("listing temporaries in", tmp_dir, err)),
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry.map_err(|err| io_error("listing temporaries in", tmp_dir, err))?;
        let path = entry.path();
        let fresh = !age.is_zero()
            && entry
                .metadata()
                .and_then(|meta| meta.modified())
                .ok()
                .and_then(|modified| modified.elapsed().ok())
                .is_none_or(|since| since < age);
        if fresh {
            continue;
        }
        let is_dir = entry.file_type().map(|kind| kind.is_dir()).unwrap_or(false);
        let outcome = if is_dir {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match outcome {
            Ok(()) => removed += 1,
            // Gone already, e.g. swept by a concurrent call.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(io_error("removing temporary", &path, err)),
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    /// An Azure store needs an account name to be built; nothing here reaches the network.
    fn account_env(name: &str) -> Option<String> {
        (name == "AZURE_STORAGE_ACCOUNT_NAME").then(|| "account".to_owned())
    }

    fn open(url: &str) -> BlockStore {
        BlockStore::open_with_env(url, &account_env).unwrap_or_else(|err| panic!("open {url}: {err}"))
    }

    fn open_err(url: &str) -> String {
        match BlockStore::open_with_env(url, &account_env) {
            Ok(store) => panic!("open {url} should fail, got {store:?}"),
            Err(err) => err.to_string(),
        }
    }

    fn key(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn render(url: &str, key: &[(String, String)], window_start: u64) -> Result<String, StoreError> {
        let vars = PathVars {
            stream: "ORDERS",
            durable: "archive",
            key,
            window_start,
        };
        open(url).block_path(&vars, "b.csv").map(|path| path.to_string())
    }

    /// Stream `S`, durable `d`, the epoch's first window.
    fn vars(key: &[(String, String)]) -> PathVars<'_> {
        PathVars {
            stream: "S",
            durable: "d",
            key,
            window_start: 0,
        }
    }

    /// Days since the epoch of a date, the inverse algorithm, to check every day of 800 years.
    fn days_from_civil(year: u64, month: u32, day: u32) -> u64 {
        let y = if month <= 2 { year - 1 } else { year };
        let era = y / 400;
        let yoe = y - era * 400;
        let m = u64::from(month);
        let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + u64::from(day) - 1;
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        era * 146_097 + doe - 719_468
    }

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(31), (1970, 2, 1));
        assert_eq!(civil_from_days(365), (1971, 1, 1));
        // 2000 is a leap year (divisible by 400), 1900 and 2100 are not.
        assert_eq!(civil_from_days(days_from_civil(2000, 2, 29)), (2000, 2, 29));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(days_from_civil(2100, 2, 28) + 1), (2100, 3, 1));
        assert_eq!(civil_from_days(20_415), (2025, 11, 23));
        assert_eq!(civil_from_days(20_780), (2026, 11, 23));
        assert_eq!(civil_from_days(10_956), (1999, 12, 31));
        // Every day from 1970 to 2770 round-trips, and consecutive days are consecutive dates.
        let mut previous = civil_from_days(0);
        for days in 1..292_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
            assert!((1..=12).contains(&m) && (1..=31).contains(&d));
            let next_day = (y, m, d) == (previous.0, previous.1, previous.2 + 1);
            let next_month = d == 1 && ((y, m) == (previous.0, previous.1 + 1) || (y, m) == (previous.0 + 1, 1));
            assert!(next_day || next_month, "{previous:?} then {y}-{m}-{d}");
            previous = (y, m, d);
        }
    }

    #[test]
    fn time_of_day() {
        let t = UtcTime::from_unix(1_795_441_500); // 2026-11-23 13:45:00 UTC
        assert_eq!((t.year, t.month, t.day, t.hour, t.minute), (2026, 11, 23, 13, 45));
        let t = UtcTime::from_unix(86_399);
        assert_eq!((t.year, t.month, t.day, t.hour, t.minute), (1970, 1, 1, 23, 59));
    }

    #[test]
    fn file_name_is_zero_padded_and_sorts_by_sequence() {
        assert_eq!(
            block_file_name("S", 9, 10, "ndjson"),
            "S-00000000000000000009-00000000000000000010.ndjson"
        );
        assert_eq!(block_file_name("S", u64::MAX, u64::MAX, "x").len(), "S--.x".len() + 40);
        assert!(block_file_name("S", 9, 9, "x") < block_file_name("S", 10, 10, "x"));
    }

    #[test]
    fn schemes_and_roots() {
        let store = open("s3://bucket/{stream}/{key}/{date}/");
        assert_eq!(store.scheme(), "s3");
        assert_eq!(store.placeholders(), ["stream", "key", "date"]);
        let store = open("az://container/x/{key}");
        assert_eq!(store.scheme(), "az");
        assert_eq!(open("azure://container").scheme(), "az");
        assert_eq!(open("AZURE://container").scheme(), "az");
        let store = open("file:///var/lib/capture/{key}/{key}/raw");
        assert_eq!(store.scheme(), "file");
        assert_eq!(store.placeholders(), ["key"]);
        assert!(open("s3://bucket").placeholders().is_empty());
    }

    #[test]
    fn local_paths() {
        let key = key(&[("key", "k")]);
        assert_eq!(
            render("file:///var/lib/../lib/capture/{stream}/{key}/", &key, 0).unwrap(),
            "var/lib/capture/ORDERS/k/b.csv"
        );
        assert_eq!(render("file:///data", &key, 0).unwrap(), "data/b.csv");
        let cwd = std::env::current_dir().unwrap();
        let relative = render("file://out/./blocks/{key}", &key, 0).unwrap();
        let expected = Path::from_absolute_path(cwd.join("out/blocks/k/b.csv")).unwrap();
        assert_eq!(relative, expected.to_string());
        let store = open("file:///data/{key}");
        let vars = vars(&key);
        let path = store.block_path(&vars, "b.csv").unwrap();
        assert_eq!(store.describe(&path), "file:///data/k/b.csv");
        assert_eq!(
            LocalFileSystem::new().path_to_filesystem(&path).unwrap(),
            PathBuf::from("/data/k/b.csv")
        );
    }

    #[test]
    fn remote_paths_and_describe() {
        let key = key(&[("region", "eu"), ("shop", "42")]);
        assert_eq!(
            render(
                "s3://b/{stream}/{key}/{yyyy}/{mm}/{dd}/{hh}{min}/{durable}",
                &key,
                1_795_441_500
            )
            .unwrap(),
            "ORDERS/eu/42/2026/11/23/1345/archive/b.csv"
        );
        assert_eq!(
            render("s3://b/p-{region}_{shop}/{date}", &key, 0).unwrap(),
            "p-eu_42/1970-01-01/b.csv"
        );
        // `{key}` of a struct key inside a segment: the first field joins the literal before it.
        assert_eq!(render("s3://b/k={key}.x/", &key, 0).unwrap(), "k=eu/42.x/b.csv");
        let store = open("s3://bucket/{key}");
        let vars = vars(&key);
        let path = store.block_path(&vars, "b.csv").unwrap();
        assert_eq!(store.describe(&path), "s3://bucket/eu/42/b.csv");
        let store = open("azure://box/{region}");
        let path = store.block_path(&vars, "b.csv").unwrap();
        assert_eq!(store.describe(&path), "az://box/eu/b.csv");
    }

    #[test]
    fn key_values_stay_in_one_segment() {
        let cases = [
            ("a/b", "a%2Fb"),
            ("..", "%2E%2E"),
            (".", "%2E"),
            ("", "_"),
            ("../../etc", "..%2F..%2Fetc"),
            ("50%", "50%25"),
            ("%2F", "%252F"),
            ("a\\b", "a%5Cb"),
            ("x y", "x y"),
            ("Zürich", "Zürich"),
            ("line\nbreak", "line%0Abreak"),
            ("{key}", "%7Bkey%7D"),
            ("...", "..."),
        ];
        for (value, expected) in cases {
            let key = key(&[("key", value)]);
            let rendered = render("s3://b/{key}/x", &key, 0).unwrap();
            assert_eq!(rendered, format!("{expected}/x/b.csv"), "value {value:?}");
            let path = Path::from(rendered.as_str());
            assert_eq!(path.parts().count(), 3, "value {value:?} gave {rendered}");
        }
        // On disk too, the value stays one folder below the root.
        let fs = LocalFileSystem::new();
        for value in ["..", ".", "a/b", "../..", "%2E%2E", "%2F", ""] {
            let key = key(&[("key", value)]);
            let rendered = render("file:///root/dir/{key}", &key, 0).unwrap();
            let file = fs.path_to_filesystem(&Path::parse(&rendered).unwrap()).unwrap();
            assert_eq!(
                file.parent().and_then(|p| p.parent()),
                Some(std::path::Path::new("/root/dir")),
                "{value:?}"
            );
            assert!(!file
                .components()
                .any(|c| matches!(c, Component::ParentDir | Component::CurDir)));
        }
        // A struct key with an empty field and no key at all.
        let key2 = key(&[("a", ""), ("b", "x")]);
        assert_eq!(render("s3://b/{key}", &key2, 0).unwrap(), "_/x/b.csv");
        assert_eq!(render("s3://b/{key}", &[], 0).unwrap(), "_/b.csv");
        // Literal dots glued to a value cannot make a `..` segment either.
        let dot = key(&[("key", ".")]);
        assert_eq!(render("s3://b/.{key}", &dot, 0).unwrap(), ".%2E/b.csv");
    }

    #[test]
    fn unknown_placeholder_names_the_known_ones() {
        let key = key(&[("region", "eu")]);
        let err = render("s3://b/{stream}/{shop}", &key, 0).unwrap_err().to_string();
        assert!(err.contains("{shop}"), "{err}");
        assert!(
            err.contains("{region}") && err.contains("{date}") && err.contains("{key}"),
            "{err}"
        );
        assert!(err.contains("s3://b/{stream}/{shop}") && err.contains("b.csv"), "{err}");
    }

    #[test]
    fn bad_file_names() {
        let store = open("s3://b/{key}");
        let key = key(&[("key", "k")]);
        let vars = vars(&key);
        for name in ["", "a/b", "..", "."] {
            let err = store.block_path(&vars, name).unwrap_err().to_string();
            assert!(err.contains("file name"), "{name:?}: {err}");
        }
    }

    #[test]
    fn malformed_urls() {
        for (url, expected) in [
            ("ftp://host/x", "unknown scheme `ftp`"),
            ("/var/lib/x", "file://<folder>"),
            ("s3://", "no bucket name"),
            ("s3:///x", "no bucket name"),
            ("az:///x", "no container name"),
            ("file://", "no folder"),
            ("s3://b/{key", "`{` without `}`"),
            ("s3://b/key}", "`}` without `{`"),
            ("s3://b/{key}}", "`}` without `{`"),
            ("s3://b/{}", "empty placeholder"),
            ("s3://b/{a b}", "names are letters"),
            ("s3://b/{a{b}", "`{` without `}`"),
            ("s3://b/a//b", "empty segment"),
            ("s3://b/a/../b", "`..` segment"),
            ("s3://{key}/x", "cannot hold a placeholder"),
            ("file:///a/{key", "`{` without `}`"),
            ("file:///../x", "climbs above /"),
        ] {
            let err = open_err(url);
            assert!(err.contains(expected), "{url}: {err}");
            assert!(err.contains(url), "{url}: the error names the URL: {err}");
        }
    }

    #[test]
    fn environment_interpolation() {
        let env = |name: &str| match name {
            "BUCKET" => Some("archive".to_owned()),
            "PREFIX" => Some("raw/v1".to_owned()),
            _ => None,
        };
        let store = BlockStore::open_with_env("s3://${BUCKET}/${PREFIX}/{key}/$x", &env).unwrap();
        let key = key(&[("key", "k")]);
        let vars = vars(&key);
        let path = store.block_path(&vars, "b").unwrap();
        assert_eq!(store.describe(&path), "s3://archive/raw/v1/k/$x/b");

        let err = BlockStore::open_with_env("s3://${MISSING_BUCKET}/x", &env).unwrap_err();
        assert!(matches!(&err, StoreError::MissingEnv { var, .. } if var == "MISSING_BUCKET"));
        let message = err.to_string();
        assert!(
            message.contains("MISSING_BUCKET") && message.contains("s3://${MISSING_BUCKET}/x"),
            "{message}"
        );

        // A default applies when the variable is unset, not when it is set.
        let store = BlockStore::open_with_env("${MISSING_URL:-s3://fallback}/{key}", &env).unwrap();
        assert_eq!(
            store.describe(&store.block_path(&vars, "b").unwrap()),
            "s3://fallback/k/b"
        );
        let store = BlockStore::open_with_env("s3://${BUCKET:-fallback}/{key}", &env).unwrap();
        assert_eq!(
            store.describe(&store.block_path(&vars, "b").unwrap()),
            "s3://archive/k/b"
        );

        let err = BlockStore::open_with_env("s3://${BUCKET/x", &env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no closing"), "{err}");
        let err = BlockStore::open_with_env("s3://${1X}/x", &env).unwrap_err().to_string();
        assert!(err.contains("not an environment variable name"), "{err}");
    }

    #[test]
    fn credentials_and_retry_settings_come_through_env() {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("id".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("secret".to_owned()),
            "AWS_ENDPOINT_URL" => Some("http://127.0.0.1:9".to_owned()),
            "AWS_ALLOW_HTTP" => Some("true".to_owned()),
            "AWS_TIMEOUT" => Some("5s".to_owned()),
            MAX_RETRIES_ENV => Some("2".to_owned()),
            RETRY_TIMEOUT_ENV => Some("10s".to_owned()),
            _ => None,
        };
        BlockStore::open_with_env("s3://b/x", &env).unwrap();

        let bad = |name: &str| (name == MAX_RETRIES_ENV).then(|| "lots".to_owned());
        let err = BlockStore::open_with_env("s3://b/x", &bad).unwrap_err().to_string();
        assert!(err.contains(MAX_RETRIES_ENV) && err.contains("s3://b/x"), "{err}");
        let bad = |name: &str| (name == RETRY_TIMEOUT_ENV).then(|| "soon".to_owned());
        let err = BlockStore::open_with_env("az://c/x", &bad).unwrap_err().to_string();
        assert!(err.contains(RETRY_TIMEOUT_ENV) && err.contains("az://c/x"), "{err}");

        // Azure outside the emulator needs an account: object_store says so, naming no URL.
        let err = BlockStore::open_with_env("az://c/x", &no_env).unwrap_err().to_string();
        assert!(err.contains("az://c/x") && err.contains("ccount"), "{err}");
        let emulator = |name: &str| (name == "AZURE_STORAGE_USE_EMULATOR").then(|| "true".to_owned());
        BlockStore::open_with_env("az://c/x", &emulator).unwrap();
    }

    #[tokio::test]
    async fn local_put_is_atomic_and_sweeps() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}/{{key}}/", dir.path().display());
        let store = open(&url);
        let key = key(&[("key", "k")]);
        let vars = vars(&key);
        let path = store.block_path(&vars, "b.csv").unwrap();
        store.put(&path, Bytes::from_static(b"one")).await.unwrap();
        store.put(&path, Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("k/b.csv")).unwrap(), b"two");
        let tmp = dir.path().join(TMP_DIR);
        assert_eq!(std::fs::read_dir(&tmp).unwrap().count(), 0);
        std::fs::write(tmp.join("123-0.tmp"), b"partial").unwrap();
        assert_eq!(store.sweep_temporaries().await.unwrap(), 1);
        assert_eq!(store.sweep_temporaries().await.unwrap(), 0);
    }
}
