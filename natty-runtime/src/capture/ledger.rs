//! The ledger: which messages each stored block holds, kept in the store itself, so that a
//! message redelivered after a crash between its block's store and its ack is acked instead of
//! written a second time.
//!
//! # Why block names are not enough
//!
//! A block's name carries its first and last stream sequence, but not which sequences between
//! them it holds: other keys' messages, messages of the same key redelivered into a later block,
//! messages held by another instance all fall inside the range. A range says "maybe"; a
//! redelivered message acked on a "maybe" would be lost. So each block gets a manifest listing
//! its exact sequences.
//!
//! # What holds
//!
//! - **Manifest first.** Before a block is written, its manifest is:
//!   `<manifest folder>/<created>-<first>-<last>-<hash of the block path>.seqs`, holding the
//!   block's path, its stream incarnation and its exact sequences (see
//!   [`BlockStore::manifest_folder`]). A manifest counts only while its block exists, so a crash
//!   between the two writes leaves a manifest that is ignored, and a crash after both leaves a
//!   block the ledger knows.
//! - **Looked up only for redeliveries.** A message delivered for the first time cannot be in
//!   any block. One delivered again, not held here and not stored by this process moments ago,
//!   is checked against the ledger: if a visible block holds it, it is acked, else written.
//! - **Fresh enough for several instances.** A redelivered message is looked up in a listing
//!   started no earlier than one keep-alive period (a third of `ack_wait`) before it arrived,
//!   else the ledger is listed again. A block stored by an instance that then died was stored
//!   while that instance still kept its messages alive, so more than two keep-alive periods
//!   before the server redelivers them: such a listing shows it.
//! - **Transient.** A manifest is removed once the consumer's ack floor (in its incarnation) has
//!   passed its last sequence, or its incarnation is gone, and one more sweep period (at least
//!   30 s) has gone by since that was first seen: none of its messages can be redelivered then.
//!   The ledger holds only blocks whose acks may not all have reached the server, so a listing
//!   stays small. A capture that stops waits (briefly) for the floor to pass what it stored and
//!   removes those manifests at once, so a stopped capture leaves only blocks behind, unless it
//!   crashed or could not store everything.
//!
//! Moving or renaming a block without its manifest (or the other way round) makes the ledger
//! forget it: its messages, if redelivered, are written again (at least once, as before).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt as _};
use tokio::time::Instant;

use super::store::{BlockStore, StoreError};

/// First line of every manifest, with its format version.
const HEADER: &str = "natty-capture-manifest 1";
/// Manifests read at once during a refresh.
const READ_CONCURRENCY: usize = 16;

/// One capture's ledger.
pub(crate) struct Ledger {
    store: BlockStore,
    folder: Path,
    snapshot: Mutex<Snapshot>,
    /// Manifests found removable at the previous sweep: removed at the next one.
    removable: Mutex<HashSet<Path>>,
}

/// What the last refresh found.
#[derive(Default)]
struct Snapshot {
    /// When the listing behind it started; none before the first.
    listed: Option<Instant>,
    entries: Vec<Entry>,
}

/// A manifest whose block exists.
struct Entry {
    manifest: Path,
    /// The manifest's modification time and size, to reuse what was read while unchanged.
    modified: Stamp,
    name: ManifestName,
    /// Sorted.
    sequences: Arc<Vec<u64>>,
}

/// A modification time (as text: only equality matters) and size.
type Stamp = (String, u64);

/// What a manifest's name says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ManifestName {
    created: u64,
    first: u64,
    last: u64,
}

impl ManifestName {
    fn parse(file_name: &str) -> Option<ManifestName> {
        let stem = file_name.strip_suffix(".seqs")?;
        let mut parts = stem.split('-');
        let created = parts.next()?.parse().ok()?;
        let first = parts.next()?.parse().ok()?;
        let last = parts.next()?.parse().ok()?;
        let _hash = parts.next()?;
        parts.next().is_none().then_some(ManifestName { created, first, last })
    }
}

impl Ledger {
    /// The ledger of the capture reading `stream` through `durable`, in `store`.
    pub(crate) fn new(store: BlockStore, stream: &str, durable: &str) -> Ledger {
        let folder = store.manifest_folder(stream, durable);
        Ledger {
            store,
            folder,
            snapshot: Mutex::new(Snapshot::default()),
            removable: Mutex::new(HashSet::new()),
        }
    }

    /// Where the manifest of `block` goes.
    fn manifest_path(&self, block: &Path, created: u64, first: u64, last: u64) -> Path {
        self.folder
            .clone()
            .join(format!("{created}-{first}-{last}-{:016x}.seqs", fnv1a(block.as_ref())))
    }

    /// Writes the manifest of a block about to be written at `block`, holding `sequences`
    /// (sorted) of the incarnation `created`.
    pub(crate) async fn record(&self, block: &Path, created: u64, sequences: &[u64]) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (sequences.first(), sequences.last()) else {
            return Ok(());
        };
        let path = self.manifest_path(block, created, *first, *last);
        self.store.put(&path, encode(block, created, sequences)).await
    }

    /// Whether the last refresh started at or after `since`.
    pub(crate) fn listed_since(&self, since: Instant) -> bool {
        self.snapshot
            .lock()
            .is_ok_and(|snapshot| snapshot.listed.is_some_and(|at| at >= since))
    }

    /// Whether a block that exists holds `sequence` of the incarnation `created`, as of the
    /// last refresh.
    pub(crate) fn holds(&self, created: u64, sequence: u64) -> bool {
        self.snapshot.lock().is_ok_and(|snapshot| {
            snapshot.entries.iter().any(|entry| {
                entry.name.created == created
                    && (entry.name.first..=entry.name.last).contains(&sequence)
                    && entry.sequences.binary_search(&sequence).is_ok()
            })
        })
    }

    /// Lists the manifests again and reads those not read before, keeping the ones whose block
    /// exists.
    pub(crate) async fn refresh(&self) -> Result<(), StoreError> {
        let started = Instant::now();
        let listed = self.list().await?;
        let known: Vec<(Path, Stamp, ManifestName, Arc<Vec<u64>>)> = self
            .snapshot
            .lock()
            .map(|snapshot| {
                snapshot
                    .entries
                    .iter()
                    .map(|e| (e.manifest.clone(), e.modified.clone(), e.name, e.sequences.clone()))
                    .collect()
            })
            .unwrap_or_default();
        let entries: Vec<Option<Entry>> = stream::iter(listed)
            .map(|(meta, name)| {
                let reused = known
                    .iter()
                    .find(|(path, modified, ..)| *path == meta.location && *modified == stamp(&meta))
                    .map(|(_, _, _, sequences)| sequences.clone());
                async move {
                    let modified = stamp(&meta);
                    // A block once seen stays: blocks are replaced, never removed, by captures.
                    if let Some(sequences) = reused {
                        return Ok(Some(Entry {
                            manifest: meta.location,
                            modified,
                            name,
                            sequences,
                        }));
                    }
                    let Some((block, sequences)) = self.read(&meta.location).await? else {
                        return Ok(None);
                    };
                    if !self.exists(&block).await? {
                        return Ok(None);
                    }
                    Ok::<_, StoreError>(Some(Entry {
                        manifest: meta.location,
                        modified,
                        name,
                        sequences: Arc::new(sequences),
                    }))
                }
            })
            .buffer_unordered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        if let Ok(mut snapshot) = self.snapshot.lock() {
            *snapshot = Snapshot {
                listed: Some(started),
                entries: entries.into_iter().flatten().collect(),
            };
        }
        Ok(())
    }

    /// Removes the manifests that were already removable at the previous sweep: older
    /// incarnations than `created`, and those of `created` at or below the ack floor `floor`.
    /// Called every sweep period (at least 30 s apart); returns how many went.
    pub(crate) async fn sweep(&self, created: u64, floor: u64) -> Result<usize, StoreError> {
        let listed = self.list().await?;
        let removable: HashSet<Path> = listed
            .into_iter()
            .filter(|(_, name)| name.created < created || (name.created == created && name.last <= floor))
            .map(|(meta, _)| meta.location)
            .collect();
        let due: Vec<Path> = match self.removable.lock() {
            Ok(previous) => removable.intersection(&previous).cloned().collect(),
            Err(_) => Vec::new(),
        };
        let store = self.store.object_store();
        let mut removed = 0;
        for path in &due {
            match store.delete(path).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                Err(error) => return Err(self.io_error("removing manifest", path, error)),
            }
        }
        if let Ok(mut previous) = self.removable.lock() {
            *previous = removable.into_iter().filter(|path| !due.contains(path)).collect();
        }
        Ok(removed)
    }

    /// Removes at once the manifests of older incarnations than `created` and those of
    /// `created` at or below the ack floor `floor`: what a capture that stops does, so that a
    /// stopped capture leaves only its blocks behind. Returns how many went.
    pub(crate) async fn remove_acked(&self, created: u64, floor: u64) -> Result<usize, StoreError> {
        let store = self.store.object_store();
        let mut removed = 0;
        for (meta, name) in self.list().await? {
            if name.created < created || (name.created == created && name.last <= floor) {
                match store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => removed += 1,
                    Err(error) => return Err(self.io_error("removing manifest", &meta.location, error)),
                }
            }
        }
        Ok(removed)
    }

    /// The manifests in the folder, with what their names say; other files are left alone.
    async fn list(&self) -> Result<Vec<(object_store::ObjectMeta, ManifestName)>, StoreError> {
        let store = self.store.object_store();
        let mut listing = store.list(Some(&self.folder));
        let mut found = Vec::new();
        while let Some(meta) = listing.next().await {
            let meta = match meta {
                Ok(meta) => meta,
                // A folder never written to does not exist on a local disk.
                Err(object_store::Error::NotFound { .. }) => break,
                Err(error) => return Err(self.io_error("listing manifests in", &self.folder, error)),
            };
            if let Some(name) = meta.location.filename().and_then(ManifestName::parse) {
                found.push((meta, name));
            }
        }
        Ok(found)
    }

    /// A manifest's block and sequences; none if it is gone or unreadable (a manifest written
    /// by something else is not a reason to stop capturing).
    async fn read(&self, manifest: &Path) -> Result<Option<(Path, Vec<u64>)>, StoreError> {
        let store = self.store.object_store();
        let bytes = match store.get(manifest).await {
            Ok(got) => got
                .bytes()
                .await
                .map_err(|error| self.io_error("reading manifest", manifest, error))?,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(self.io_error("reading manifest", manifest, error)),
        };
        let decoded = decode(&bytes);
        if decoded.is_none() {
            tracing::warn!(manifest = %self.store.describe(manifest), "ignoring a manifest that cannot be read");
        }
        Ok(decoded.map(|(block, _, sequences)| (block, sequences)))
    }

    /// Whether a block exists.
    async fn exists(&self, block: &Path) -> Result<bool, StoreError> {
        match self.store.object_store().head(block).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(self.io_error("looking for block", block, error)),
        }
    }

    fn io_error(&self, action: &'static str, path: &Path, error: object_store::Error) -> StoreError {
        StoreError::Io {
            url: self.store.describe(&self.folder),
            action,
            location: self.store.describe(path),
            source: Box::new(error),
        }
    }
}

fn stamp(meta: &object_store::ObjectMeta) -> Stamp {
    (meta.last_modified.to_rfc3339(), meta.size)
}

/// 64-bit FNV-1a: a stable hash (std's is seeded per process) that tells apart manifests of
/// blocks with the same sequence range in different folders.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The manifest's text: a header, the block, the incarnation, then the sorted sequences as
/// the first one and the gaps between them, a run of equal gaps written `gap*count` (one key of
/// several interleaved ones takes every n-th sequence: a long run).
fn encode(block: &Path, created: u64, sequences: &[u64]) -> Bytes {
    use std::fmt::Write as _;
    let mut text = format!(
        "{HEADER}\nblock {block}\ncreated {created}\nsequences {}",
        sequences.len()
    );
    let mut previous = None;
    let mut run: Option<(u64, u64)> = None;
    let flush = |text: &mut String, run: Option<(u64, u64)>| match run {
        Some((gap, 1)) => {
            let _ = write!(text, " {gap}");
        }
        Some((gap, count)) => {
            let _ = write!(text, " {gap}*{count}");
        }
        None => {}
    };
    for &sequence in sequences {
        match previous {
            None => {
                let _ = write!(text, " {sequence}");
            }
            Some(previous) => {
                let gap = sequence - previous;
                run = match run {
                    Some((same, count)) if same == gap => Some((gap, count + 1)),
                    other => {
                        flush(&mut text, other);
                        Some((gap, 1))
                    }
                };
            }
        }
        previous = Some(sequence);
    }
    flush(&mut text, run);
    text.push('\n');
    Bytes::from(text)
}

/// The block, incarnation and sequences of a manifest; none if it is not one.
fn decode(bytes: &[u8]) -> Option<(Path, u64, Vec<u64>)> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut lines = text.lines();
    if lines.next()? != HEADER {
        return None;
    }
    let block = Path::parse(lines.next()?.strip_prefix("block ")?).ok()?;
    let created = lines.next()?.strip_prefix("created ")?.parse().ok()?;
    let mut tokens = lines.next()?.strip_prefix("sequences ")?.split(' ');
    let count: usize = tokens.next()?.parse().ok()?;
    let mut sequences = Vec::with_capacity(count.min(1 << 20));
    if let Some(first) = tokens.next() {
        sequences.push(first.parse::<u64>().ok()?);
    }
    for token in tokens {
        let (gap, times) = match token.split_once('*') {
            Some((gap, times)) => (gap.parse::<u64>().ok()?, times.parse::<u64>().ok()?),
            None => (token.parse::<u64>().ok()?, 1),
        };
        for _ in 0..times {
            let next = sequences.last()?.checked_add(gap)?;
            sequences.push(next);
            if sequences.len() > count {
                return None;
            }
        }
    }
    (sequences.len() == count).then_some((block, created, sequences))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn manifests_round_trip() {
        let block = Path::from("a/b/S-x-1-9.ndjson");
        for sequences in [
            vec![],
            vec![7],
            vec![1, 2],
            (1..1000).step_by(10).collect::<Vec<u64>>(),
            vec![1, 2, 3, 10, 20, 30, 31, 100, u64::MAX],
        ] {
            let text = encode(&block, 42, &sequences);
            assert_eq!(decode(&text), Some((block.clone(), 42, sequences.clone())), "{text:?}");
        }
        // Every tenth sequence is one run.
        let every_tenth: Vec<u64> = (1..100_000).step_by(10).collect();
        assert!(encode(&block, 1, &every_tenth).len() < 100);
        assert_eq!(decode(b"something else"), None);
        assert_eq!(
            decode(b"natty-capture-manifest 1\nblock a\ncreated 1\nsequences 3 1 1\n"),
            None
        );
        assert_eq!(
            decode(b"natty-capture-manifest 1\nblock a\ncreated 1\nsequences 1 1 1*5\n"),
            None
        );
    }

    #[test]
    fn manifest_names() {
        assert_eq!(
            ManifestName::parse("17-1-9-00ff.seqs"),
            Some(ManifestName {
                created: 17,
                first: 1,
                last: 9
            })
        );
        assert_eq!(ManifestName::parse("17-1-9.seqs"), None);
        assert_eq!(ManifestName::parse("17-1-9-ff.tmp"), None);
    }

    /// What a ledger must do on any store: a manifest counts only once its block exists, only
    /// for the sequences it lists, in its incarnation; a sweep removes it one sweep after the
    /// floor passed it.
    async fn exercise(store: BlockStore) {
        let ledger = Ledger::new(store.clone(), "S", "d");
        let key = [("key".to_owned(), "k".to_owned())];
        let vars = super::super::store::PathVars {
            stream: "S",
            durable: "d",
            key: &key,
            window_start: 0,
        };
        ledger.refresh().await.expect("an empty ledger");
        let block = store.block_path(&vars, "S-1-21.ndjson").unwrap();
        ledger.record(&block, 5, &[1, 11, 21]).await.unwrap();
        ledger.refresh().await.unwrap();
        assert!(!ledger.holds(5, 11), "no block yet: the manifest does not count");
        store.put(&block, Bytes::from_static(b"{}\n")).await.unwrap();
        assert!(!ledger.holds(5, 11), "not before a refresh");
        ledger.refresh().await.unwrap();
        assert!(ledger.listed_since(Instant::now() - Duration::from_secs(5)));
        assert!(ledger.holds(5, 11) && ledger.holds(5, 21));
        assert!(!ledger.holds(5, 12), "inside the range, not in the block");
        assert!(!ledger.holds(6, 11), "another incarnation");

        // Below the floor: removable at the first sweep, removed at the second.
        assert_eq!(ledger.sweep(5, 20).await.unwrap(), 0);
        assert_eq!(ledger.sweep(5, 21).await.unwrap(), 0);
        assert_eq!(ledger.sweep(5, 21).await.unwrap(), 1);
        ledger.refresh().await.unwrap();
        assert!(!ledger.holds(5, 11));
        assert!(store.object_store().head(&block).await.is_ok(), "the block stays");
    }

    #[tokio::test]
    async fn a_local_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlockStore::open(&format!("file://{}/{{key}}", dir.path().display())).unwrap();
        exercise(store).await;
        // The manifests sit under the template's literal start, the block where it was.
        assert!(dir.path().join("k/S-1-21.ndjson").exists());
        assert!(dir.path().join(".natty-manifests/S/d").exists());
    }

    /// Runs the ledger checks on a cloud store opened from `url` with the emulator's `env`,
    /// then lists `raw` (the same bucket seen directly): only the block is left.
    #[cfg(feature = "testing")]
    async fn a_cloud_ledger(url: &str, env: Vec<(String, String)>, raw: std::sync::Arc<dyn object_store::ObjectStore>) {
        let lookup = |name: &str| env.iter().find(|(key, _)| key == name).map(|(_, value)| value.clone());
        let store = BlockStore::open_with_env(url, &lookup).unwrap();
        exercise(store).await;
        let listed: Vec<_> = raw
            .list(None)
            .map(|meta| meta.unwrap().location.to_string())
            .collect()
            .await;
        assert_eq!(listed, ["blocks/k/S-1-21.ndjson"], "the manifest was removed");
    }

    /// S3 through moto: listing, reading, `head` of a missing block and deleting behave as on a
    /// local disk.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn an_s3_ledger() {
        let moto = crate::testing::stores::MotoServer::start()
            .await
            .expect("moto (scripts/install-moto.sh)");
        moto.create_bucket("ledger").await.unwrap();
        a_cloud_ledger("s3://ledger/blocks/{key}", moto.env(), moto.store("ledger")).await;
    }

    /// Azure Blob storage through Azurite, likewise.
    #[cfg(feature = "testing")]
    #[tokio::test]
    async fn an_azure_ledger() {
        let azurite = crate::testing::stores::Azurite::start()
            .await
            .expect("Azurite (scripts/install-azurite.sh)");
        azurite.create_container("ledger").await.unwrap();
        a_cloud_ledger("az://ledger/blocks/{key}", azurite.env(), azurite.store("ledger")).await;
    }
}
