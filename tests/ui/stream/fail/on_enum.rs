use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"])]
enum Jobs {}

fn main() {}
