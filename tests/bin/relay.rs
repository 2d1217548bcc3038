//! A natty service used by the trace-context tests, run with `run()`'s default subscriber:
//! consumes `relay.in`, logs, and publishes the job to `relay.out` from inside the delivery;
//! a core message on `relay.kick` makes it publish to `relay.fresh`, outside any delivery; a
//! request to the `#[service]` on `questions.ask` logs, asks `questions.probe` (answered by the test)
//! and publishes the job to `relay.asked`, all in the trace the request carried.

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

#[service(subject = "questions.ask")]
async fn ask(job: Job, envelope: Envelope) -> Result<Job, natty_runtime::BoxError> {
    tracing::info!(job = job.id, "answering a question");
    let _: Job = envelope.client().request("questions.probe", &job).await?;
    envelope.client().publish("relay.asked", &job).await?;
    Ok(job)
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
