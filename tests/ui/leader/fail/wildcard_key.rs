use natty_runtime::prelude::*;

#[leader(bucket = "election", key = "jobs.*")]
async fn schedule(lease: Lease) {
    let _ = lease;
}

fn main() {}
