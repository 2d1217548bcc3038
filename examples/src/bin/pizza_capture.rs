//! jetcapture's pizza example in natty: JSON pizza orders, grouped by store, written as gzipped
//! CSV every 5 seconds into a local folder per store, and as Parquet to S3.
//!
//! The stores come from the environment, with defaults: `PIZZA_CSV_STORE` (default
//! `file://pizza-backup`) and `PIZZA_PARQUET_STORE` (default `file://pizza-parquet`; set it to
//! `s3://<bucket>` with the usual `AWS_*` variables for S3). Each message is acked only after
//! the block holding it is stored; stop the service with Ctrl-C and open blocks are stored first.

use natty_examples::pizza::PizzaOrder;
use natty_runtime::prelude::*;

#[stream(name = "pizza", subjects = ["pizza.orders.>"])]
struct Pizza;

/// CSV, gzipped, one folder per store and day: `pizza-backup/<store>/<date>/pizza-<first>-<last>.csv.gz`.
#[capture(
    stream = "pizza",
    durable = "pizza-csv",
    format = "csv",
    compression = "gzip",
    every = "5s",
    store = "${PIZZA_CSV_STORE:-file://pizza-backup}/{key}/{date}"
)]
fn csv_by_store(order: &PizzaOrder) -> String {
    order.store_id.clone()
}

/// Parquet (zstd inside), partitioned by store and date for a query engine.
#[capture(
    stream = "pizza",
    durable = "pizza-parquet",
    format = "parquet",
    compression = "zstd",
    every = "5s",
    store = "${PIZZA_PARQUET_STORE:-file://pizza-parquet}/store={key}/{yyyy}/{mm}/{dd}"
)]
fn parquet_by_store(order: &PizzaOrder) -> String {
    order.store_id.clone()
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::init_logging();
    natty_runtime::run().await
}
