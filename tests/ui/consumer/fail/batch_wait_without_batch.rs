use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Row {
    id: u64,
}

#[consumer(stream = "rows", durable = "loader", batch_wait = "1s")]
async fn load(row: Row) {
    let _ = row.id;
}

fn main() {}
