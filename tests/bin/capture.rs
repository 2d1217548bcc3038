//! A natty service used by the capture tests: four captures of the `readings` stream, one per
//! format, each storing where an environment variable says (`CSV_STORE`, `NDJSON_STORE`,
//! `PARQUET_STORE`, `RAW_STORE`: `file://...`, `s3://...` or `az://...`), and `to_drain`, whose
//! hour-long windows close only on shutdown (`DRAIN_STORE`), and `to_fragile`, whose key
//! function panics on some readings and whose path template other readings' keys cannot fill
//! (`FRAGILE_STORE`), and `to_bounded`, whose memory budget is small (`BOUNDED_STORE`), and
//! `to_group`, a partitioned capture for several instances (`GROUP_STORE`). Run one of them with
//! `NATTY_HANDLERS=to_csv` and so on.

use natty_runtime::prelude::*;
use natty_tests::Reading;

#[stream(name = "readings", subjects = ["readings.>"])]
struct Readings;

#[capture(
    stream = "readings",
    durable = "csv",
    format = "csv",
    compression = "gzip",
    store = "${CSV_STORE}/{stream}/{key}/{date}",
    every = "2s",
    max_messages = 20000,
    ack_wait = "4s"
)]
fn to_csv(reading: &Reading) -> String {
    reading.sensor.clone()
}

#[capture(
    stream = "readings",
    durable = "ndjson",
    format = "ndjson",
    compression = "zstd",
    store = "${NDJSON_STORE}/{key}",
    every = "2s",
    max_messages = 20000,
    ack_wait = "4s"
)]
fn to_ndjson(reading: &Reading) -> String {
    reading.sensor.clone()
}

#[capture(
    stream = "readings",
    durable = "parquet",
    format = "parquet",
    compression = "zstd",
    store = "${PARQUET_STORE}/{key}",
    every = "2s",
    max_messages = 20000,
    ack_wait = "4s"
)]
fn to_parquet(reading: &Reading) -> String {
    reading.sensor.clone()
}

#[capture(
    stream = "readings",
    durable = "raw",
    format = "raw",
    store = "${RAW_STORE}/{key}",
    every = "2s",
    max_messages = 20000,
    ack_wait = "4s"
)]
fn to_raw(reading: &Reading) -> String {
    reading.sensor.clone()
}

/// Windows of an hour: its blocks close only when the capture drains.
#[capture(
    stream = "readings",
    durable = "drain",
    format = "ndjson",
    store = "${DRAIN_STORE}/{key}",
    every = "1h",
    ack_wait = "4s"
)]
fn to_drain(reading: &Reading) -> String {
    reading.sensor.clone()
}

/// The key of `to_fragile`: a struct whose `site` field is left out for some readings.
#[derive(serde::Serialize)]
struct Spot {
    sensor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    site: Option<String>,
}

/// Panics on a reading noted `panic`; a reading noted `nowhere` has no `site` for its
/// template's `{site}`.
#[capture(
    stream = "readings",
    durable = "fragile",
    format = "ndjson",
    store = "${FRAGILE_STORE}/{sensor}/{site}",
    every = "2s",
    ack_wait = "4s"
)]
fn to_fragile(reading: &Reading) -> Spot {
    if reading.note.as_deref() == Some("panic") {
        panic!("no key for reading {}", reading.id);
    }
    Spot {
        sensor: reading.sensor.clone(),
        site: (reading.note.as_deref() != Some("nowhere")).then(|| reading.place.site.clone()),
    }
}

/// A partitioned group of four partitions: run by several instances, each partition captured
/// by one of them at a time (`GROUP_STORE`).
#[capture(
    stream = "readings",
    durable = "group",
    format = "ndjson",
    partitions = 4,
    store = "${GROUP_STORE}/{key}",
    every = "2s",
    max_messages = 20000,
    ack_wait = "4s"
)]
fn to_group(reading: &Reading) -> String {
    reading.sensor.clone()
}

/// A memory budget of 256 KiB: about a thousand held readings.
#[capture(
    stream = "readings",
    durable = "bounded",
    format = "ndjson",
    store = "${BOUNDED_STORE}/{key}",
    every = "2s",
    ack_wait = "4s",
    max_memory = "256KiB"
)]
fn to_bounded(reading: &Reading) -> String {
    reading.sensor.clone()
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
