use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "workers", deliver = "new", start_time = "2026-11-01T00:00:00Z")]
async fn work(job: Job) {
    let _ = job.id;
}

fn main() {}
