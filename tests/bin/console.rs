//! A service with something of every kind on its console, for `tests/console.rs`: `picky`
//! dead-letters every job (with its reason) until the file `PICKY_ACCEPT` names exists, then
//! handles it and prints `handled <id>`; `reaper` leads through `console_leases`/`reaper` and
//! holds its lease until shutdown; `ping` answers core requests; `archive` captures readings
//! into `${ARCHIVE_STORE}` (a `file://` URL); `tally` is a group of 4 partitions.

use natty_runtime::prelude::*;
use natty_tests::{Job, Reading};

#[stream(name = "jobs", subjects = ["jobs.>"])]
struct Jobs;

#[stream(name = "readings", subjects = ["readings.>"])]
struct Readings;

#[stream(name = "tallies", subjects = ["tallies.>"])]
struct Tallies;

#[consumer(
    stream = "tallies",
    durable = "tally",
    subject = "tallies.*.x",
    partitions = 4,
    order_by = "subject[1]"
)]
async fn tally(job: Job) {
    println!("tallied {}", job.id);
}

#[consumer(stream = "jobs", durable = "picky", subject = "jobs.>")]
async fn picky(job: Job) -> Result<(), Reject> {
    let accepting = std::env::var("PICKY_ACCEPT").is_ok_and(|path| std::path::Path::new(&path).exists());
    if !accepting {
        return Err(Reject::terminate(format!("job {} is not accepted yet", job.id)));
    }
    println!("handled {}", job.id);
    Ok(())
}

#[leader(bucket = "console_leases", key = "reaper", ttl = "3s")]
async fn reaper(lease: Lease) -> Result<(), natty_runtime::FencedError> {
    println!("leading {}", lease.term());
    lease.lost().await;
    Ok(())
}

#[service(subject = "console.ping")]
async fn ping(job: Job) -> Result<Job, natty_runtime::BoxError> {
    Ok(job)
}

#[capture(
    stream = "readings",
    durable = "archive",
    format = "ndjson",
    compression = "zstd",
    store = "${ARCHIVE_STORE}/{key}",
    every = "1s"
)]
fn archive(reading: &Reading) -> String {
    reading.sensor.clone()
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
