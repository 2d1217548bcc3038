//! A leader test service for a 3-node cluster: the handlers of `leader_worker.rs`, with the
//! election bucket replicated on every node so that losing one node loses no lease.

mod leader_worker;

#[natty_runtime::kv_bucket(name = "election", history = 1, replicas = 3)]
struct Election;

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
