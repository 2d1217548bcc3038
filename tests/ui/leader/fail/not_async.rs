use natty_runtime::prelude::*;

#[leader(bucket = "election", key = "scheduler")]
fn schedule(lease: Lease) {
    let _ = lease;
}

fn main() {}
