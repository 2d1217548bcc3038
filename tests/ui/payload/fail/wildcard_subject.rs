#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(subject = "orders.>")]
struct Order {
    id: u64,
}

fn main() {}
