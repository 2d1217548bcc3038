use natty_runtime::prelude::*;

#[leader(bucket = "election")]
async fn schedule(lease: Lease) {
    let _ = lease;
}

fn main() {}
