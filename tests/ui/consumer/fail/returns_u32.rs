use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "workers")]
async fn work(job: Job) -> u32 {
    job.id as u32
}

fn main() {}
