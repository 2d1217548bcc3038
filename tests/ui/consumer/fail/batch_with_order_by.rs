use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Row {
    id: u64,
}

#[consumer(stream = "rows", durable = "loader", batch = 100, order_by = "subject")]
async fn load(rows: Vec<Row>) {
    let _ = rows.len();
}

fn main() {}
