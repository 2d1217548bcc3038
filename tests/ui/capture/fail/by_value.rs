use natty_runtime::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order { region: String }

#[capture(stream = "orders", durable = "backup", store = "file://backup/{key}")]
fn backup(order: Order) -> String {
    order.region
}

fn main() {}
