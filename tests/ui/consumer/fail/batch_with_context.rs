use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Row {
    id: u64,
}

#[consumer(stream = "rows", durable = "loader", batch = 100)]
async fn load(rows: Vec<Row>, ctx: Context) {
    let _ = (rows.len(), ctx.subject());
}

fn main() {}
