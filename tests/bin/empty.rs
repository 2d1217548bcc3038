//! A service that registers nothing: `run()` must refuse to start and say why.

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
