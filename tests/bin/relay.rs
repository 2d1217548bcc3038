//! A natty service used by the trace-context tests, run with `run()`'s default subscriber:
//! consumes `relay.in`, logs, and publishes the job to `relay.out` from inside the delivery;
//! a core message on `relay.kick` makes it publish to `relay.fresh`, outside any delivery.

use natty_runtime::prelude::*;
use natty_runtime::{Envelope, PublishError};
use natty_tests::Job;

#[stream(name = "relay", subjects = ["relay.>"])]
struct Relay;

#[consumer(stream = "relay", durable = "relay", subject = "relay.in")]
async fn relay(job: Job, ctx: Context) -> Result<(), PublishError> {
    tracing::info!(job = job.id, "relaying a job");
    ctx.publish("relay.out", &job).await?;
    Ok(())
}

#[subscribe(subject = "relay.kick")]
async fn kick(job: Job, envelope: Envelope) {
    if let Err(error) = envelope.client().publish("relay.fresh", &job).await {
        tracing::error!(%error, "cannot publish relay.fresh");
    }
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
