//! The billing service of the orders example, in windshift's style: Protobuf events in and
//! out, idempotent publishing, rejection for good, per-customer ordering, and an ephemeral
//! consumer per instance for a live feed.
//!
//! Every instance shares the durable `billing`, so each order is billed by one of them.

use std::time::SystemTime;

use natty_examples::orders::{OrderInvoiced, OrderPlaced};
use natty_runtime::prelude::*;
use natty_runtime::{BoxError, Publish};

#[stream(name = "orders", subjects = ["orders.>"], duplicate_window = "2m")]
struct Orders;

/// Orders of one customer are billed in the order they were placed; customers in parallel.
fn customer_of(order: &OrderPlaced) -> &str {
    &order.customer
}

#[consumer(
    stream = "orders",
    durable = "billing",
    subject = "orders.placed.>",
    order_by = customer_of,
    concurrency = 8,
    max_deliver = 5,
    backoff = ["500ms", "2s"]
)]
async fn bill(order: OrderPlaced, ctx: Context) -> Result<(), BoxError> {
    if order.items.is_empty() {
        // Retrying cannot fix this: terminate it, so it goes to the dead letters.
        return Err(Reject::terminate(format!("order {} has no items", order.order_id)).into());
    }
    let invoice = OrderInvoiced {
        order_id: order.order_id.clone(),
        customer: order.customer.clone(),
        total_cents: order.total_cents(),
    };
    // The order id is the idempotency key: an order redelivered after a crash between this
    // publish and the ack is invoiced once, not twice.
    let options = Publish::new()
        .id(format!("invoice-{}", order.order_id))
        .event_time(SystemTime::now());
    let ack = ctx.client().emit_with(&invoice, options).await?;
    println!(
        "invoiced {} to {} for {} cents (seq {}{})",
        invoice.order_id,
        invoice.customer,
        invoice.total_cents,
        ack.sequence,
        if ack.duplicate { ", already invoiced" } else { "" }
    );
    Ok(())
}

/// Each instance's own live feed of invoices, from now on (an ephemeral consumer: no
/// `durable`, removed when the instance stops).
#[consumer(stream = "orders", subject = "orders.invoiced.>", deliver = "new")]
async fn feed(invoice: OrderInvoiced, ctx: Context) {
    tracing::info!(order = invoice.order_id, subject = ctx.subject(), "invoice seen");
}

#[tokio::main]
async fn main() -> natty_runtime::Result<()> {
    natty_runtime::run().await
}
