use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"], max_age = "a month")]
struct Jobs;

fn main() {}
