use natty_runtime::prelude::*;

#[stream(
    name = "jobs",
    subjects = ["jobs.>", "retries.*"],
    retention = "workqueue",
    max_age = "30d",
    max_bytes = 1073741824,
    max_messages = 1000000,
    storage = "memory",
    replicas = 3,
    cluster = "east",
    tags = ["ssd", "fast"],
    duplicate_window = "2m",
    description = "work to be done"
)]
struct Jobs;

fn main() {}

#[kv_bucket(name = "placed", replicas = 3, cluster = "east", tags = "ssd")]
struct Placed;

#[object_store(name = "placed-files", replicas = 3, tags = ["ssd"])]
struct PlacedFiles;
