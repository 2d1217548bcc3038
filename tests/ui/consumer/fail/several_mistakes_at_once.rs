use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

#[consumer(durable = "a.b", stream = "x y", concurrency = 0)]
async fn work(job: Job) {
    let _ = job.id;
}

fn main() {}
