use natty_runtime::prelude::*;

#[leader(bucket = "election", key = "scheduler", ttl = "500ms")]
async fn schedule(lease: Lease) {
    let _ = lease;
}

fn main() {}
