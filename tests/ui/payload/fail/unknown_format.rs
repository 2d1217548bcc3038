#[derive(serde::Serialize, natty_runtime::Payload)]
#[payload(subject = "orders.created", format = "avro")]
struct Order {
    id: u64,
}

fn main() {}
