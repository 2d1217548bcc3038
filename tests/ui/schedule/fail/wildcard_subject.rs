use natty_runtime::prelude::*;

#[schedule(stream = "jobs", subject = "jobs.*", every = "5s")]
fn tick() -> &'static str {
    "tick"
}

fn main() {}
