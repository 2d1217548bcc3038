//! The handlers of the leader test services (`natty-test-leader`, and
//! `natty-test-leader-cluster` which replicates the election bucket), for `tests/leader.rs`:
//! a leader task and a consumer bound to the same lease: while it leads it prints a tick every 20 ms and handles `work.>`
//! messages; once leadership is gone it tries one late fenced write and prints whether the
//! server took it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::prelude::*;
use natty_runtime::FencedError;

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

#[leader(bucket = "election", key = "worker", ttl = "2s")]
pub async fn work(lease: Lease) -> Result<(), FencedError> {
    let me = std::env::var("INSTANCE").unwrap_or_default();
    let term = lease.term();
    // Outlives the task, which is cancelled when leadership ends: a stale leader's write.
    let stale = lease.clone();
    let writer = me.clone();
    tokio::spawn(async move {
        stale.lost().await;
        match stale.fenced_put("work.state", &format!("late write by {writer}")).await {
            Ok(revision) => println!("late-write {writer} {term} accepted {revision}"),
            Err(FencedError::Fenced { .. }) => println!("late-write {writer} {term} refused"),
            Err(other) => println!("late-write {writer} {term} error {other}"),
        }
    });
    let revision = lease.fenced_put("work.state", &format!("{me} leads")).await?;
    println!("fenced-write {me} {term} {revision}");
    loop {
        // The time is read before the check: a pause between the two cannot stretch the interval.
        let at = now_nanos();
        if !lease.is_valid() {
            std::future::pending::<()>().await;
        }
        println!("tick {me} {term} {at}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[stream(name = "work", subjects = ["work.>"])]
pub struct Work;

/// Runs only while this instance leads the `worker` key.
#[consumer(stream = "work", durable = "follower", while_leading = "election/worker")]
pub async fn follow(job: natty_tests::Job) {
    let me = std::env::var("INSTANCE").unwrap_or_default();
    println!("handled {me} {} {}", job.id, now_nanos());
}
