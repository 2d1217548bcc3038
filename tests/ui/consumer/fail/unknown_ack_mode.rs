use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "workers", ack = "sync")]
async fn work(job: Job) {
    let _ = job.id;
}

fn main() {}
