use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Query {
    id: u64,
}

#[service(subject = "orders.lookup")]
async fn lookup(query: Query) {
    let _ = query.id;
}

fn main() {}
