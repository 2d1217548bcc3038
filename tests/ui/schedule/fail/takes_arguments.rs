use natty_runtime::prelude::*;

#[schedule(stream = "jobs", subject = "jobs.tick", every = "5s")]
async fn tick(count: u32) -> u32 {
    count
}

fn main() {}
