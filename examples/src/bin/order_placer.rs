//! Places orders for the billing service: `order-placer [COUNT] [--with-empty]`. Orders go to
//! three customers; `--with-empty` adds one order without items, which billing rejects.

use natty_examples::orders::{LineItem, OrderPlaced};
use natty_runtime::Publish;

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::init_logging();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: u32 = args.iter().find_map(|arg| arg.parse().ok()).unwrap_or(10);
    let with_empty = args.iter().any(|arg| arg == "--with-empty");
    let client = natty_runtime::connect().await?;
    let mut orders: Vec<OrderPlaced> = (1..=count)
        .map(|n| OrderPlaced {
            order_id: format!("o-{n}"),
            customer: ["ada", "grace", "linus"][n as usize % 3].to_string(),
            items: (1..=n % 3 + 1)
                .map(|line| LineItem {
                    sku: format!("sku-{line}"),
                    quantity: line,
                    unit_price_cents: 250 * u64::from(n),
                })
                .collect(),
        })
        .collect();
    if with_empty {
        orders.push(OrderPlaced {
            order_id: "o-empty".into(),
            customer: "ada".into(),
            items: Vec::new(),
        });
    }
    for order in &orders {
        // Placing the same order twice (a rerun) stores it once.
        let options = Publish::new().id(format!("placed-{}", order.order_id));
        let ack = client.emit_with(order, options).await?;
        println!(
            "placed {} for {} ({} cents) as {} #{}",
            order.order_id,
            order.customer,
            order.total_cents(),
            ack.stream,
            ack.sequence
        );
    }
    client.flush().await.ok();
    Ok(())
}
