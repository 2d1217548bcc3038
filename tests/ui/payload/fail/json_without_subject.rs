#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(format = "json")]
struct Order {
    id: u64,
}

fn main() {}
