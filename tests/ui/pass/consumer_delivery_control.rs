use natty_runtime::prelude::*;
use std::time::Duration;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(
    stream = "jobs",
    durable = "workers",
    max_deliver = 5,
    backoff = ["1s", "10s", "1m"],
    dead_letter = "jobs.dead",
    order_by = "subject[1]",
    concurrency = 8,
    replicas = 3
)]
async fn work(job: Job, ctx: Context) -> Result<(), Reject> {
    match job.id {
        0 => Err(Reject::terminate("job 0 is never valid")),
        1 => Err(Reject::retry_after(Duration::from_secs(5))),
        2 => Err(Reject::retry_with(&ctx, |attempt, _headers| Duration::from_secs(attempt))),
        3 => Err(Reject::retry()),
        _ => Ok(()),
    }
}

fn main() {}
