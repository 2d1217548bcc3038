use natty_runtime::prelude::*;

#[leader(bucket = "my.election", key = "scheduler", ttl = "10s")]
async fn schedule(lease: Lease) {
    let _ = lease;
}

fn main() {}
