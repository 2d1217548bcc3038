use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Job {
    id: u64,
}

struct Worker;

impl Worker {
    #[consumer(stream = "jobs", durable = "workers")]
    async fn work(&self, job: Job) {
        let _ = job.id;
    }
}

fn main() {}
