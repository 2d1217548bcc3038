use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"], replicas = 3, tags = ["ssd", "fast disk"])]
struct Jobs;

fn main() {}
