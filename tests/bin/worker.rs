//! A natty service used by the process-level tests: consumes `jobs.>` through the durable
//! `workers` and records each job in `WORKER_LOG` ("start <id>" before the work, "done <id>"
//! after it), optionally taking `WORKER_DELAY_MS` per job.

use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_tests::Job;

#[stream(name = "jobs", subjects = ["jobs.>"])]
struct Jobs;

#[consumer(
    stream = "jobs",
    durable = "workers",
    subject = "jobs.>",
    concurrency = 8,
    ack_wait = "10s"
)]
async fn work(job: Job) -> Result<(), std::io::Error> {
    record("start", job.id)?;
    let delay = std::env::var("WORKER_DELAY_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .unwrap_or(0);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    record("done", job.id)
}

fn record(what: &str, id: u64) -> std::io::Result<()> {
    static LOG: OnceLock<Option<Mutex<std::fs::File>>> = OnceLock::new();
    let log = LOG.get_or_init(|| {
        let path = std::env::var("WORKER_LOG").ok()?;
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path).ok()?;
        Some(Mutex::new(file))
    });
    if let Some(file) = log {
        // One write per line on an O_APPEND file: lines from concurrent handlers never interleave.
        let mut file = file.lock().expect("log lock");
        file.write_all(format!("{what} {id}\n").as_bytes())?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
