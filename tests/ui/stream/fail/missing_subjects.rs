use natty_runtime::prelude::*;

#[stream(name = "jobs")]
struct Jobs;

fn main() {}
