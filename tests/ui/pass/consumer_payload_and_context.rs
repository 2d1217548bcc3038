use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    #[allow(dead_code)]
    id: u64,
}

#[consumer(stream = "jobs", durable = "workers", subject = "jobs.>", concurrency = 8, ack_wait = "10s")]
async fn work(job: Job, ctx: Context) -> Result<(), std::io::Error> {
    let _ = (job.id, ctx.stream_sequence());
    Ok(())
}

fn main() {}
