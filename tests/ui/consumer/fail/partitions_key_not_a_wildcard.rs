use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Posting {
    account: String,
}

#[consumer(stream = "accounts", durable = "ledger", subject = "accounts.*.posted", partitions = 8, order_by = "subject[2]")]
async fn post(p: Posting) {
    let _ = p.account;
}

fn main() {}
