use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"], retention = "forever")]
struct Jobs;

fn main() {}
