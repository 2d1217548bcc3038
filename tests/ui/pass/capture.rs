use natty_runtime::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order {
    region: String,
    store: u32,
}

#[capture(stream = "orders", durable = "backup", every = "15m", format = "parquet",
          compression = "zstd", store = "s3://orders-backup/{key}/{date}/")]
fn backup(order: &Order) -> String {
    order.region.clone()
}

#[derive(serde::Serialize)]
struct Where {
    region: String,
    store: u32,
}

#[capture(stream = "orders", durable = "by-store", subject = "orders.>", format = "csv", compression = "gzip",
          store = "file://backup/{region}/{store}/{yyyy}/{mm}/{dd}", max_bytes = "10MiB", max_messages = 5000,
          max_ack_pending = 20000, ack_wait = "1m", store_concurrency = 8, dead_letter = "orders.dead")]
fn by_store(order: &Order) -> Where {
    Where { region: order.region.clone(), store: order.store }
}

#[capture(stream = "orders", durable = "raw", format = "raw", store = "${BACKUP_URL}/raw/{key}")]
fn raw(order: &Order) -> u32 {
    order.store
}

fn main() {}
