//! A leader test service for `tests/leader.rs`: a `#[leader]` that ticks every 100 ms and a
//! consumer bound to the same lease whose job runs 8 s (its `ack_wait` is 3 s). Every action
//! prints a line with the instance, what it did and the time, so the test can tell whether an
//! instance acted after its successor began.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::prelude::*;

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn me() -> String {
    std::env::var("INSTANCE").unwrap_or_default()
}

#[leader(bucket = "election", key = "boss", ttl = "2s")]
async fn boss(lease: Lease) {
    loop {
        println!("tick {} {} {}", me(), lease.term(), now_nanos());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[stream(name = "chores", subjects = ["chores.>"])]
struct Chores;

#[consumer(
    stream = "chores",
    durable = "chores",
    while_leading = "election/boss",
    ack_wait = "3s"
)]
async fn chore(job: natty_tests::Job) {
    println!("start {} {} {}", me(), job.id, now_nanos());
    for _ in 0..80 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        println!("busy {} {} {}", me(), job.id, now_nanos());
    }
    println!("done {} {} {}", me(), job.id, now_nanos());
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
