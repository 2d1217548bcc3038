use natty_runtime::prelude::*;

#[schedule(stream = "jobs", subject = "jobs.tick", every = "500ms")]
fn tick() -> &'static str {
    "tick"
}

fn main() {}
