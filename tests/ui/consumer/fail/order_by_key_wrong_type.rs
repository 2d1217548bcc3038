use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

fn key_of(id: &u64) -> u64 {
    *id
}

#[consumer(stream = "jobs", durable = "workers", order_by = key_of)]
async fn work(job: Job) {
    let _ = job.id;
}

fn main() {}
