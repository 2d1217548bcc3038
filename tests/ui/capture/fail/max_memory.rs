use natty_runtime::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order { region: String }

#[capture(stream = "orders", durable = "backup", store = "file://backup/{key}", max_memory = "lots")]
fn backup(order: &Order) -> String {
    order.region.clone()
}

fn main() {}
