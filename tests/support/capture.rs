//! Helpers of the capture tests: publishing readings, waiting for a capture's consumer to
//! settle, and reading captured blocks back with the formats' own readers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use futures_util::stream::{FuturesUnordered, StreamExt};
use natty_runtime::capture::format::{decompress, read_raw, Compression};
use natty_runtime::capture::store::MANIFEST_DIR;
use object_store::ObjectStoreExt as _;

use crate::Reading;

/// Publishes `readings.<sensor>` for each id, up to 512 acks in flight, and checks every ack.
/// Each carries an idempotency key, so an ack that does not come in time (a loaded machine
/// running every test at once) is asked for again without storing the reading twice.
pub async fn publish_readings(client: &async_nats::Client, ids: impl IntoIterator<Item = u64>, sensors: u64) {
    let js = async_nats::jetstream::new(client.clone());
    let send = |id: u64| {
        let js = js.clone();
        async move {
            let reading = Reading::new(id, sensors);
            let payload = serde_json::to_vec(&reading).expect("encode");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, format!("reading-{id}").as_str());
            let ack = js
                .publish_with_headers(format!("readings.{}", reading.sensor), headers, payload.into())
                .await
                .expect("publish");
            (id, ack.await)
        }
    };
    let mut in_flight = FuturesUnordered::new();
    let settle = |id: u64, ack: Result<_, async_nats::jetstream::context::PublishError>| {
        use async_nats::jetstream::context::PublishErrorKind;
        match ack {
            Ok(_) => None,
            Err(error) if error.kind() == PublishErrorKind::TimedOut => Some(id),
            Err(error) => panic!("publish ack of reading {id}: {error}"),
        }
    };
    let mut late = Vec::new();
    for id in ids {
        in_flight.push(send(id));
        if in_flight.len() >= 512 {
            let (id, ack) = in_flight.next().await.expect("pending ack");
            late.extend(settle(id, ack));
        }
    }
    while let Some((id, ack)) = in_flight.next().await {
        late.extend(settle(id, ack));
    }
    for id in late {
        let mut attempts = 1;
        loop {
            let (_, ack) = send(id).await;
            match ack {
                Ok(_) => break,
                Err(error) if attempts < 5 => {
                    attempts += 1;
                    eprintln!("publish ack of reading {id}: {error}; asking again");
                }
                Err(error) => panic!("publish ack of reading {id} after {attempts} attempts: {error}"),
            }
        }
    }
}

/// Creates the `readings` stream as the capture worker declares it.
pub async fn create_readings_stream(client: &async_nats::Client) {
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "readings".into(),
        subjects: vec!["readings.>".into()],
        ..Default::default()
    })
    .await
    .expect("create the readings stream");
}

/// Whether `durable` on `stream` has been delivered everything up to stream sequence `last`
/// and has nothing unacked: every record is stored.
pub async fn settled(js: &async_nats::jetstream::Context, stream: &str, durable: &str, last: u64) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return false;
    };
    let Ok(info) = stream.consumer_info(durable).await else {
        return false;
    };
    info.num_pending == 0 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence >= last
}

/// The records of one block, read with the reader of its format (by file extension).
pub fn records(name: &str, bytes: &[u8]) -> Vec<Reading> {
    let (base, compression) = if let Some(base) = name.strip_suffix(".gz") {
        (base, Compression::Gzip)
    } else if let Some(base) = name.strip_suffix(".zst") {
        (base, Compression::Zstd)
    } else {
        (name, Compression::None)
    };
    if base.ends_with(".parquet") {
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(
            bytes::Bytes::copy_from_slice(bytes),
        )
        .expect("a Parquet file")
        .build()
        .expect("a Parquet reader");
        let mut all = Vec::new();
        for batch in reader {
            let batch = batch.expect("a record batch");
            let rows: Vec<Reading> = serde_arrow::from_record_batch(&batch).expect("rows as readings");
            all.extend(rows);
        }
        return all;
    }
    let plain = decompress(bytes, compression).unwrap_or_else(|error| panic!("{name}: {error}"));
    if base.ends_with(".csv") {
        let mut reader = csv::Reader::from_reader(plain.as_slice());
        let headers = reader.headers().expect("a header row").clone();
        let column = |name: &str| {
            headers
                .iter()
                .position(|header| header == name)
                .unwrap_or_else(|| panic!("no column `{name}` in {headers:?}"))
        };
        let (id, sensor, value, note, site, floor) = (
            column("id"),
            column("sensor"),
            column("value"),
            column("note"),
            column("place.site"),
            column("place.floor"),
        );
        return reader
            .records()
            .map(|row| {
                let row = row.expect("a CSV row");
                Reading {
                    id: row[id].parse().expect("id"),
                    sensor: row[sensor].to_string(),
                    value: row[value].parse().expect("value"),
                    note: (!row[note].is_empty()).then(|| row[note].to_string()),
                    place: crate::Place {
                        site: row[site].to_string(),
                        floor: row[floor].parse().expect("floor"),
                    },
                }
            })
            .collect();
    }
    if base.ends_with(".ndjson") {
        return plain
            .split(|byte| *byte == b'\n')
            .filter(|line| !line.is_empty())
            .map(|line| serde_json::from_slice(line).expect("an NDJSON line"))
            .collect();
    }
    if base.ends_with(".bin") {
        return read_raw(&plain)
            .expect("raw frames")
            .iter()
            .map(|payload| serde_json::from_slice(payload).expect("a JSON payload"))
            .collect();
    }
    panic!("unexpected block `{name}`");
}

/// Every file under `root`, hidden ones included (temporaries in `.natty-tmp` too), but for
/// the capture's manifests in `.natty-manifests` (see [`manifests`]): they are natty's record
/// of what each block holds, not blocks or leftovers.
pub fn files(root: &Path) -> Vec<PathBuf> {
    walk(root, false)
}

/// The capture's manifests under `root`: one per block whose acks may not all have reached the
/// server yet.
pub fn manifests(root: &Path) -> Vec<PathBuf> {
    walk(root, true)
        .into_iter()
        .filter(|path| path.components().any(|part| part.as_os_str() == MANIFEST_DIR))
        .collect()
}

fn walk(root: &Path, with_manifests: bool) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if with_manifests || path.file_name().is_none_or(|name| name != MANIFEST_DIR) {
                    dirs.push(path);
                }
            } else {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// How many times each id appears across the blocks, checking each record against the
/// reading published with its id, and that each block sits in its sensor's folder.
#[derive(Debug, Default)]
pub struct Tally {
    /// id → occurrences.
    pub seen: BTreeMap<u64, usize>,
    /// Blocks read.
    pub blocks: usize,
}

impl Tally {
    /// Adds one block's records; `path` is where it was stored.
    pub fn add(&mut self, path: &str, records: Vec<Reading>, sensors: u64) {
        self.blocks += 1;
        for record in records {
            assert_eq!(
                record,
                Reading::new(record.id, sensors),
                "record {} in {path}",
                record.id
            );
            assert!(
                path.contains(&format!("/{}/", record.sensor)),
                "record {} of {} is in {path}",
                record.id,
                record.sensor
            );
            *self.seen.entry(record.id).or_default() += 1;
        }
    }

    /// Reads every block under a local folder.
    pub fn of_folder(root: &Path, sensors: u64) -> Tally {
        let mut tally = Tally::default();
        for path in files(root) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&path).expect("read a block");
            tally.add(&path.to_string_lossy(), records(&name, &bytes), sensors);
        }
        tally
    }

    /// Reads every block in an object store.
    pub async fn of_store(store: &dyn object_store::ObjectStore, sensors: u64) -> Tally {
        let mut tally = Tally::default();
        let listed: Vec<_> = store.list(None).collect().await;
        for meta in listed {
            let meta = meta.expect("list the store");
            if meta.location.parts().any(|part| part.as_ref() == MANIFEST_DIR) {
                continue;
            }
            let bytes = store
                .get(&meta.location)
                .await
                .expect("get a block")
                .bytes()
                .await
                .expect("read a block");
            let name = meta.location.filename().expect("a file name").to_string();
            tally.add(&format!("/{}", meta.location), records(&name, &bytes), sensors);
        }
        tally
    }

    /// Merges another tally (blocks read from the same capture at another time).
    pub fn merge(&mut self, other: Tally) {
        self.blocks += other.blocks;
        for (id, count) in other.seen {
            *self.seen.entry(id).or_default() += count;
        }
    }

    /// Panics unless every id in `ids` appears exactly once and no other does.
    pub fn assert_exactly_once(&self, ids: std::ops::Range<u64>, what: &str) {
        let missing: Vec<u64> = ids.clone().filter(|id| !self.seen.contains_key(id)).take(10).collect();
        let repeated: Vec<(u64, usize)> = self
            .seen
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(id, n)| (*id, *n))
            .take(10)
            .collect();
        let repeated_total = self.seen.values().filter(|n| **n > 1).count();
        let strangers: Vec<u64> = self
            .seen
            .keys()
            .filter(|id| !ids.contains(id))
            .copied()
            .take(10)
            .collect();
        assert!(
            missing.is_empty() && repeated.is_empty() && strangers.is_empty(),
            "{what}: {} records in {} blocks; missing (first 10) {missing:?}, repeated ({repeated_total} in all, first 10) \
             {repeated:?}, unexpected {strangers:?}",
            self.seen.len(),
            self.blocks
        );
    }
}
