#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(subject = "orders..{id}")]
struct Order {
    id: u64,
}

fn main() {}
