//! A natty service used by the capture tests: four captures of the `readings` stream, one per
//! format, each storing where an environment variable says (`CSV_STORE`, `NDJSON_STORE`,
//! `PARQUET_STORE`, `RAW_STORE`: `file://...`, `s3://...` or `az://...`), and `to_drain`, whose
//! hour-long windows close only on shutdown (`DRAIN_STORE`). Run one of them with
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

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
