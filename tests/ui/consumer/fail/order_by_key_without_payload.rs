use natty_runtime::prelude::*;

fn key_of(job: &u64) -> u64 {
    *job
}

#[consumer(stream = "jobs", durable = "workers", order_by = key_of)]
async fn work(ctx: Context) {
    let _ = ctx;
}

fn main() {}
