//! A scheduler that must run in one instance only (seed 000's `AsLeader`, made safe under
//! pauses). Run three; kill the leader; watch another take over within the lease TTL:
//!
//! ```sh
//! for i in a b c; do INSTANCE=$i cargo run --bin scheduler & done
//! ```
//!
//! Every second the leader publishes the next job to `jobs.report` and records the run with a
//! fenced write, which the server refuses once this instance is no longer the leader.

use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::{BoxError, Publish};

#[stream(name = "jobs", subjects = ["jobs.>"], duplicate_window = "1m")]
struct Jobs;

/// What a scheduled run publishes.
#[derive(serde::Serialize, serde::Deserialize)]
struct Job {
    /// Which run of the schedule: the term and a counter within it.
    run: String,
    /// The instance that scheduled it.
    scheduled_by: String,
}

#[leader(bucket = "scheduler", key = "leader", ttl = "3s")]
async fn schedule(lease: Lease) -> Result<(), BoxError> {
    let me = std::env::var("INSTANCE").unwrap_or_else(|_| std::process::id().to_string());
    println!("[{me}] leading (term {})", lease.term());
    let mut every = tokio::time::interval(Duration::from_secs(1));
    for count in 1u64.. {
        every.tick().await;
        if !lease.is_valid() {
            // The runtime cancels this task when leadership ends; never act meanwhile.
            lease.lost().await;
        }
        let run = format!("{}-{count}", lease.term());
        let job = Job {
            run: run.clone(),
            scheduled_by: me.clone(),
        };
        // The run id is the idempotency key: a retried publish schedules the job once.
        lease
            .client()
            .publish_with("jobs.report", &job, Publish::new().id(&run))
            .await?;
        lease.fenced_put("last-run", &run).await?;
        println!("[{me}] scheduled run {run}");
    }
    Ok(())
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
