use natty_runtime::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order { region: String }

#[capture(stream = "orders", durable = "backup", store = "gs://bucket/{key}")]
fn backup(order: &Order) -> String {
    order.region.clone()
}

#[capture(stream = "orders", durable = "backup2", store = "file://backup/{key")]
fn backup2(order: &Order) -> String {
    order.region.clone()
}

fn main() {}
