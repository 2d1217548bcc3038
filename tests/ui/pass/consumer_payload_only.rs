use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "audit", subject = ["jobs.created", "jobs.*.done"])]
async fn audit(job: Job) {
    let _ = job.id;
}

fn main() {}
