#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(subject = "orders.{store}.created")]
struct Order {
    id: u64,
    shop: String,
}

fn main() {}
