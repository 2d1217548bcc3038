use natty_runtime::prelude::*;

#[leader(bucket = "election", key = "scheduler", ttl = "10s")]
async fn schedule(lease: Lease) -> Result<(), natty_runtime::FencedError> {
    lease.fenced_put("last-run", &lease.token()).await?;
    Ok(())
}

#[leader(bucket = "election", key = "janitor")]
async fn janitor() {}

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "scheduled", while_leading = "election/scheduler")]
async fn run_job(job: Job) {
    let _ = job.id;
}

fn main() {}
