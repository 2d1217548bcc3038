use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Posting {
    account: String,
}

fn account(p: &Posting) -> String {
    p.account.clone()
}

#[consumer(stream = "accounts", durable = "ledger", subject = "accounts.*.posted", partitions = 8, order_by = account)]
async fn post(p: Posting) {
    let _ = p.account;
}

fn main() {}
