#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(subject = "orders.store-{id}")]
struct Order {
    id: u64,
}

fn main() {}
