use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"])]
fn jobs() {}

fn main() {}
