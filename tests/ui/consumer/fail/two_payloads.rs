use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[derive(serde::Deserialize)]
struct Other {
    name: String,
}

#[consumer(stream = "jobs", durable = "workers")]
async fn work(job: Job, other: Other) {
    let _ = (job.id, other.name);
}

fn main() {}
