//! The service of the cluster fault suite (`tests/cluster.rs`), run three times against a
//! 3-node cluster: `consume` reads the replicated `fault` stream through the shared durable
//! `readers` and appends each value as a line to the file `FAULT_OUT`; `archive` captures the
//! same stream as NDJSON blocks under `FAULT_CAPTURE` (a `file://` folder); and the leader
//! `work` prints `tick <instance> <term> <unix nanos>` every 20 ms while it holds the
//! `election/worker` lease. Pick them with `NATTY_HANDLERS`. With `FAULT_DELAY_MS`, `consume`
//! prints `start <value>` and works that long before it writes, so that a killed instance is
//! caught holding values.
//!
//! Everything it declares is replicated on the three nodes (unlike the leader test service's
//! `work` stream), so that any one node may be down while an instance starts.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::prelude::*;
use natty_runtime::FencedError;
use natty_tests::Job;

/// Replicated on every node, so that losing one loses no lease.
#[kv_bucket(name = "election", history = 1, replicas = 3)]
struct Election;

#[stream(name = "fault", subjects = ["fault.>"], replicas = 3)]
struct FaultStream;

/// A short `ack_wait`, so that a message held by a killed instance comes back within seconds.
#[consumer(stream = "fault", durable = "readers", ack_wait = "2s", concurrency = 4)]
async fn consume(job: Job) -> Result<(), std::io::Error> {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        let ms = std::env::var("FAULT_DELAY_MS").ok()?.parse().ok()?;
        Some(Duration::from_millis(ms))
    });
    if let Some(delay) = delay {
        println!("start {}", job.id);
        tokio::time::sleep(*delay).await;
    }
    static OUT: OnceLock<Mutex<std::fs::File>> = OnceLock::new();
    let out = OUT.get_or_init(|| {
        let path = std::env::var("FAULT_OUT").expect("FAULT_OUT names the output file");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|error| panic!("cannot open {path}: {error}"));
        Mutex::new(file)
    });
    // One `write` per line on an O_APPEND file: lines never interleave, and once it returns the
    // line is in the page cache, where it survives a SIGKILL of this process. No fsync: the
    // suite kills processes, not the machine.
    let mut file = out.lock().expect("the output lock");
    file.write_all(format!("{}\n", job.id).as_bytes())
}

/// Windows of 2 s, four keys: blocks close and are stored all through a fault.
#[capture(
    stream = "fault",
    durable = "archive",
    format = "ndjson",
    store = "${FAULT_CAPTURE}/{key}",
    every = "2s",
    ack_wait = "4s"
)]
fn archive(job: &Job) -> String {
    format!("k{}", job.id % 4)
}

/// Ticks while it leads, as the leader test service does: the suite checks that no two
/// instances' ticks interleave.
#[leader(bucket = "election", key = "worker", ttl = "2s")]
async fn work(lease: Lease) -> Result<(), FencedError> {
    let me = std::env::var("INSTANCE").unwrap_or_default();
    let term = lease.term();
    loop {
        // The time is read before the check: a pause between the two cannot stretch the interval.
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        if !lease.is_valid() {
            std::future::pending::<()>().await;
        }
        println!("tick {me} {term} {at}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
