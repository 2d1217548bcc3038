#[derive(serde::Serialize, natty_runtime::Payload)]
struct Order {
    id: u64,
}

fn main() {}
