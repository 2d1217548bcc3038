use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = [])]
struct Jobs;

fn main() {}
