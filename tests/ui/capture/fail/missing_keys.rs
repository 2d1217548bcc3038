use natty_runtime::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order { region: String }

#[capture(stream = "orders", every = "1m", sink = "x")]
fn backup(order: &Order) -> String {
    order.region.clone()
}

fn main() {}
