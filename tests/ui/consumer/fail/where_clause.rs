use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(stream = "jobs", durable = "workers")]
async fn work(job: Job)
where
    Job: Sized,
{
    let _ = job.id;
}

fn main() {}
