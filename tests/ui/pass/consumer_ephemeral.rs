// No durable: an ephemeral consumer per instance.
use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", inactive_threshold = "30s", deliver = "new")]
async fn work(job: Job) {
    let _ = job.id;
}

fn main() {}
