use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"], max_msgs = 1000)]
struct Jobs;

fn main() {}
