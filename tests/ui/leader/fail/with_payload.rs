use natty_runtime::prelude::*;

#[leader(bucket = "election", key = "scheduler")]
async fn schedule(lease: Lease, job: u64) {
    let _ = (lease, job);
}

fn main() {}
