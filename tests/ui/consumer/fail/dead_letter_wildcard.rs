use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "workers", dead_letter = "dead.>")]
async fn work(job: Job) {
    let _ = job.id;
}

fn main() {}
