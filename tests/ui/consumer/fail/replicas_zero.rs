use natty_runtime::prelude::*;

#[consumer(stream = "jobs", durable = "workers", replicas = 0)]
async fn work(_job: serde_json::Value) {}

fn main() {}
