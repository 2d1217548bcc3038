//! The Protobuf orders example end to end: orders placed as Protobuf events are billed once
//! each, in order per customer; invoices are Protobuf events too; an order without items is
//! rejected for good and dead-lettered; placing the same orders again stores nothing new.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use natty_examples::orders::{OrderInvoiced, OrderPlaced};
use natty_runtime::testing::{NatsServer, TestApp};
use natty_tests::{collect_lines, read_all, spawn_service, wait_until};

/// The billing service's handlers, compiled into this test too: `TestApp` runs them in-process.
#[allow(dead_code)]
#[path = "../src/bin/order_billing.rs"]
mod billing;

const BILLING: &str = env!("CARGO_BIN_EXE_order-billing");
const PLACER: &str = env!("CARGO_BIN_EXE_order-placer");

async fn place(url: &str, args: &[&str]) {
    let output = tokio::process::Command::new(PLACER)
        .args(args)
        .env("NATS_URL", url)
        .output()
        .await
        .expect("run the placer");
    assert!(
        output.status.success(),
        "the placer failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_orders_are_billed_once_each_in_order_per_customer() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = async_nats::jetstream::new(server.client().await);
    let mut billing = spawn_service(Path::new(BILLING), Some(&url), &[]);
    let lines = collect_lines(&mut billing);
    wait_until(Duration::from_secs(20), "the billing service to provision", || async {
        js.get_stream("orders").await.is_ok() && js.get_stream("natty-dead-letters").await.is_ok()
    })
    .await;

    const COUNT: usize = 30;
    place(&url, &[&COUNT.to_string(), "--with-empty"]).await;
    let invoiced = || {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.starts_with("invoiced "))
            .cloned()
            .collect::<Vec<_>>()
    };
    wait_until(Duration::from_secs(30), "every order invoiced", || async {
        invoiced().len() == COUNT
    })
    .await;

    // Per customer, invoiced in the order placed.
    let mut per_customer: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for line in invoiced() {
        let words: Vec<&str> = line.split(' ').collect();
        let number: u32 = words[1].trim_start_matches("o-").parse().unwrap();
        per_customer.entry(words[3].to_string()).or_default().push(number);
    }
    assert_eq!(per_customer.len(), 3, "{per_customer:?}");
    for (customer, numbers) in &per_customer {
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{customer}: {numbers:?}");
    }

    // The invoices are Protobuf events on their own subjects, with the right totals.
    let stream = js.get_stream("orders").await.unwrap();
    let mut invoices = Vec::new();
    let mut placed = BTreeMap::new();
    for sequence in 1..=stream.get_info().await.unwrap().state.last_sequence {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let content_type = message.headers.get("Content-Type").map(|v| v.to_string());
        assert_eq!(content_type.as_deref(), Some("application/protobuf"));
        let bytes = message.payload.as_ref();
        if message.subject.starts_with("orders.placed.") {
            let order: OrderPlaced = prost::Message::decode(bytes).unwrap();
            assert_eq!(message.subject.as_str(), format!("orders.placed.{}", order.customer));
            placed.insert(order.order_id.clone(), order);
        } else {
            let invoice: OrderInvoiced = prost::Message::decode(bytes).unwrap();
            assert_eq!(
                message.subject.as_str(),
                format!("orders.invoiced.{}", invoice.customer)
            );
            invoices.push(invoice);
        }
    }
    assert_eq!(placed.len(), COUNT + 1);
    assert_eq!(invoices.len(), COUNT, "one invoice per order with items");
    for invoice in &invoices {
        assert_eq!(invoice.total_cents, placed[&invoice.order_id].total_cents());
    }

    // The empty order was rejected once, for good, with its reason.
    wait_until(Duration::from_secs(10), "the empty order dead-lettered", || async {
        let mut dead = js.get_stream("natty-dead-letters").await.unwrap();
        dead.info().await.unwrap().state.messages == 1
    })
    .await;
    let dead = read_all(&js, "natty-dead-letters", 1).await;
    let reason = dead[0]
        .headers
        .as_ref()
        .unwrap()
        .get("Natty-Dead-Letter-Reason")
        .unwrap();
    assert_eq!(reason.as_str(), "order o-empty has no items");

    // Placing the same orders again stores nothing: each carries its idempotency key.
    let before = stream.get_info().await.unwrap().state.messages;
    place(&url, &[&COUNT.to_string(), "--with-empty"]).await;
    assert_eq!(stream.get_info().await.unwrap().state.messages, before);

    billing.kill().await.ok();
}

/// The same service through the test kit, in-process: each order is invoiced once, the empty
/// one is dead-lettered with its reason, and `settled` means all of it is done.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn billing_in_process_with_the_test_kit() {
    use natty_examples::orders::LineItem;
    let app = TestApp::builder()
        .handlers(["bill"])
        .start()
        .await
        .expect("the billing service starts");
    let order = |id: &str, customer: &str, items: u32| OrderPlaced {
        order_id: id.into(),
        customer: customer.into(),
        items: (1..=items)
            .map(|line| LineItem {
                sku: format!("sku-{line}"),
                quantity: line,
                unit_price_cents: 100,
            })
            .collect(),
    };
    app.emit(&order("o-1", "ada", 2)).await.expect("placed");
    app.emit(&order("o-2", "grace", 1)).await.expect("placed");
    app.emit(&order("o-3", "ada", 0)).await.expect("placed");
    app.settled().await.expect("settled");

    let dead = app.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("order o-3 has no items"), "{:?}", dead[0]);
    assert_eq!(dead[0].original_subject, "orders.placed.ada");

    // Two invoices, each published once, beside the three orders.
    let js = app.client().jetstream();
    let mut orders = js.get_stream("orders").await.expect("the orders stream");
    let info = orders.info().await.expect("stream info");
    assert_eq!(info.state.messages, 5, "3 orders and 2 invoices");
    let invoice = orders
        .get_last_raw_message_by_subject("orders.invoiced.ada")
        .await
        .expect("ada's invoice");
    let invoice =
        <OrderInvoiced as natty_runtime::DecodePayload>::from_bytes(&invoice.payload).expect("a Protobuf invoice");
    assert_eq!((invoice.order_id.as_str(), invoice.total_cents), ("o-1", 300));
    app.stop().await.expect("drained");
}
