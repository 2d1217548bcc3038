#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(subject = "orders.created", stream = "orders")]
struct Order {
    id: u64,
}

fn main() {}
