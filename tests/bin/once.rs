//! The exactly-once recipe as a service, for `tests/acks.rs`: each payment's effect is a KV
//! `create` keyed by `ctx.idempotency_key()`, then a confirmed `ctx.ack()`. Prints
//! `attempt <id>` when the handler starts, `effect <id>` when its write made the effect,
//! `again <id>` when the effect was already made (a redelivery after a crash), `acked <id>`
//! once the server confirmed the ack. With `ONCE_DIE_AFTER=<n>` it SIGKILLs itself right
//! after the `n`-th effect it made, before that job's ack: the worst moment. Counted per
//! process rather than named by job id: which jobs a worker gets first depends on what its
//! predecessor had prefetched (new messages come before the ack wait of the dead one's), so a
//! named job may already have been acked by then and the worker would never die.

use natty_runtime::prelude::*;
use natty_runtime::{Kv, KvError};
use natty_tests::Job;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::OnceCell;

#[stream(name = "payments", subjects = ["payments.>"])]
struct Payments;

#[kv_bucket(name = "charges")]
struct Charges;

static CHARGES: OnceCell<Kv<Job>> = OnceCell::const_new();
/// Effects this process made.
static EFFECTS: AtomicU64 = AtomicU64::new(0);

#[consumer(stream = "payments", durable = "charger", ack = "confirmed", ack_wait = "2s")]
async fn charge(job: Job, ctx: Context) -> Result<(), natty_runtime::BoxError> {
    println!("attempt {}", job.id);
    let charges = CHARGES.get_or_try_init(|| ctx.client().kv::<Job>("charges")).await?;
    let made = match charges.create(&ctx.idempotency_key(), &job).await {
        Ok(_) => {
            println!("effect {}", job.id);
            EFFECTS.fetch_add(1, Ordering::SeqCst) + 1
        }
        Err(KvError::Exists { .. }) => {
            println!("again {}", job.id);
            0
        }
        Err(error) => return Err(error.into()),
    };
    let die_after = std::env::var("ONCE_DIE_AFTER").ok().and_then(|n| n.parse::<u64>().ok());
    if made > 0 && die_after == Some(made) {
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
