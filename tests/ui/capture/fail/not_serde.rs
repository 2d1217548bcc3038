use natty_runtime::prelude::*;

#[derive(serde::Deserialize)]
struct Order { region: String }

#[capture(stream = "orders", durable = "backup", store = "file://backup/{key}", format = "csv")]
fn backup(order: &Order) -> String {
    order.region.clone()
}

fn main() {}
