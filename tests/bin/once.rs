//! The exactly-once recipe as a service, for `tests/acks.rs`: each payment's effect is a KV
//! `create` keyed by `ctx.idempotency_key()`, then a confirmed `ctx.ack()`. Prints
//! `attempt <id>` when the handler starts, `effect <id>` when its write made the effect,
//! `again <id>` when the effect was already made (a redelivery after a crash), `acked <id>`
//! once the server confirmed the ack. With `ONCE_DIE_AFTER=<id>` it SIGKILLs itself right
//! after the effect of job `<id>` and before its ack: the worst moment.

use natty_runtime::prelude::*;
use natty_runtime::{Kv, KvError};
use natty_tests::Job;
use tokio::sync::OnceCell;

#[stream(name = "payments", subjects = ["payments.>"])]
struct Payments;

#[kv_bucket(name = "charges")]
struct Charges;

static CHARGES: OnceCell<Kv<Job>> = OnceCell::const_new();

#[consumer(stream = "payments", durable = "charger", ack = "confirmed", ack_wait = "2s")]
async fn charge(job: Job, ctx: Context) -> Result<(), natty_runtime::BoxError> {
    println!("attempt {}", job.id);
    let charges = CHARGES.get_or_try_init(|| ctx.client().kv::<Job>("charges")).await?;
    match charges.create(&ctx.idempotency_key(), &job).await {
        Ok(_) => println!("effect {}", job.id),
        Err(KvError::Exists { .. }) => println!("again {}", job.id),
        Err(error) => return Err(error.into()),
    }
    let die_after = std::env::var("ONCE_DIE_AFTER")
        .ok()
        .and_then(|id| id.parse::<u64>().ok());
    if die_after == Some(job.id) {
        natty_tests::send_signal(std::process::id(), "KILL");
        std::future::pending::<()>().await;
    }
    ctx.ack().await?;
    println!("acked {}", job.id);
    Ok(())
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
