//! Places pizza orders for the capture example: `pizza-orders [COUNT]` (default 400).

use natty_examples::pizza::PizzaOrder;
use natty_runtime::Publish;

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::init_logging();
    let count: u64 = std::env::args().nth(1).and_then(|arg| arg.parse().ok()).unwrap_or(400);
    let client = natty_runtime::connect().await?;
    for n in 1..=count {
        let order = PizzaOrder::example(n);
        // A rerun places the same orders again; their ids make the stream store each once.
        client
            .emit_with(&order, Publish::new().id(format!("pizza-{n}")))
            .await?;
    }
    println!("placed {count} pizza orders");
    Ok(())
}
