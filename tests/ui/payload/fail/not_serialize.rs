#[derive(natty_runtime::Payload)]
#[payload(subject = "orders.created")]
struct Order {
    id: u64,
}

fn main() {}
