use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Posting {
    account: String,
}

#[consumer(stream = "accounts", durable = "ledger", subject = ["accounts.*.posted", "accounts.*.closed"], partitions = 8, order_by = "subject[1]")]
async fn post(p: Posting) {
    let _ = p.account;
}

fn main() {}
