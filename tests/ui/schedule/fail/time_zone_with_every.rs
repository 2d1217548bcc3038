use natty_runtime::prelude::*;

#[schedule(stream = "jobs", subject = "jobs.tick", every = "5s", time_zone = "Europe/Prague")]
fn tick() -> &'static str {
    "tick"
}

fn main() {}
