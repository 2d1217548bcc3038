use natty_runtime::prelude::*;

#[schedule(stream = "jobs", subject = "jobs.daily", cron = "0 6 * * *")]
fn daily() -> &'static str {
    "daily"
}

fn main() {}
