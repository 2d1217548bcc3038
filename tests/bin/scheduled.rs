//! A service with schedules, for `tests/schedules.rs`. The stream `jobs` takes them (a
//! `#[schedule]` targets it); its one consumer, unfiltered, prints `handled <subject>
//! <unix ms> <payload>` for every message, so that a test sees what the server published and
//! when, and would see a schedule's holder if one reached a handler. `tick` fires every
//! second with the body in `TICK_BODY` (default `tick`); `cron` every second by a cron
//! expression read in Europe/Prague time.

use std::time::{SystemTime, UNIX_EPOCH};

use natty_runtime::prelude::*;

#[stream(name = "jobs", subjects = ["jobs.>"])]
struct Jobs;

#[schedule(stream = "jobs", subject = "jobs.tick", every = "1s")]
fn tick() -> String {
    std::env::var("TICK_BODY").unwrap_or_else(|_| "tick".to_string())
}

#[schedule(
    stream = "jobs",
    subject = "jobs.cron",
    cron = "* * * * * *",
    time_zone = "Europe/Prague"
)]
fn cron() -> &'static str {
    "cron"
}

#[consumer(stream = "jobs", durable = "jobs")]
async fn handle(body: serde_json::Value, ctx: Context) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    println!("handled {} {now} {body}", ctx.subject());
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
