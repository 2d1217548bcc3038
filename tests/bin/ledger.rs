//! A partitioned group as a service, for `tests/partitions.rs`: `#[consumer(partitions = 8,
//! order_by = "subject[1]")]` on `accounts.*.posted`. Each handler prints
//! `start <key> <n> <unix nanos> <consumer> <sequence> <delivery count>` when it begins and `end <key> <n> <unix nanos>` when it is
//! done (about 0–5 ms later), so the test can see, across every instance, in what order each
//! key's postings ran and whether two instances ever ran one key at once. The test creates the
//! `accounts` stream (with one replica on one server, three on a cluster).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::prelude::*;
use natty_tests::Posting;

#[consumer(
    stream = "accounts",
    durable = "ledger",
    subject = "accounts.*.posted",
    partitions = 8,
    order_by = "subject[1]",
    concurrency = 16,
    ack_wait = "2s"
)]
async fn post(posting: Posting, ctx: Context) -> Result<(), Reject> {
    println!(
        "start {} {} {} {} {} {}",
        posting.key,
        posting.n,
        now(),
        ctx.consumer(),
        ctx.stream_sequence(),
        ctx.delivery_count()
    );
    // I/O-bound work of 0 to 5 ms, different per posting.
    tokio::time::sleep(Duration::from_micros(
        (posting.n * 7919 + posting.key * 104_729) % 5_000,
    ))
    .await;
    println!("end {} {} {}", posting.key, posting.n, now());
    Ok(())
}

fn now() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
