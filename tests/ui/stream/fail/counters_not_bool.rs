use natty_runtime::prelude::*;

#[stream(name = "hits", subjects = ["hits.>"], counters = "yes")]
struct Hits;

fn main() {}
