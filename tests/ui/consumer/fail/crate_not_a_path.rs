use natty_runtime::prelude::*;

#[consumer(crate = "not a path", stream = "jobs", durable = "workers")]
async fn work(job: u64) {
    let _ = job;
}

fn main() {}
