use natty_runtime::object_store;

#[object_store(name = "reports", ttl = "a fortnight")]
struct Reports;

fn main() {}
