//! A service that dead-letters, for `tests/dead_letters.rs`: its consumer `picky` terminates
//! every job (to the dead letters, with the reason) until the file `PICKY_ACCEPT` names exists,
//! then handles them, printing `handled <id>`.

use natty_runtime::prelude::*;
use natty_tests::Job;

#[stream(name = "jobs", subjects = ["jobs.>"])]
struct Jobs;

#[consumer(stream = "jobs", durable = "picky", subject = "jobs.>")]
async fn picky(job: Job) -> Result<(), Reject> {
    let accepting = std::env::var("PICKY_ACCEPT").is_ok_and(|path| std::path::Path::new(&path).exists());
    if !accepting {
        return Err(Reject::terminate(format!("job {} is not accepted yet", job.id)));
    }
    println!("handled {}", job.id);
    Ok(())
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
