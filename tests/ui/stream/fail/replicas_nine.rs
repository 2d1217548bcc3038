use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"], replicas = 9)]
struct Jobs;

fn main() {}
