//! A leader test service on one server: see `leader_worker.rs`.

mod leader_worker;

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
