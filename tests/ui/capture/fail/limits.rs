use natty_runtime::prelude::*;

#[derive(serde::Serialize, serde::Deserialize)]
struct Order { region: String }

#[capture(stream = "orders", durable = "backup", store = "file://backup/{key}", max_messages = 5000,
          max_ack_pending = 1000, max_bytes = "12 parsecs", every = "10ms", ack_wait = "500ms")]
fn backup(order: &Order) -> String {
    order.region.clone()
}

fn main() {}
