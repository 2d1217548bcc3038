//! Versioned events (seed 001): versions of an entity published out of order are applied in
//! order, each once, with `Context::in_version_order`.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::wait_until;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct TicketUpdated {
    id: String,
    version: u64,
}

/// The "database": ticket id → versions applied, in the order they were applied.
static DB: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());

#[stream(name = "tickets", subjects = ["tickets.>"])]
struct Tickets;

#[consumer(stream = "tickets", durable = "orders", concurrency = 4)]
async fn on_ticket_updated(ticket: TicketUpdated, ctx: Context) -> Result<(), Reject> {
    let mut db = DB.lock().unwrap();
    let applied = db.entry(ticket.id.clone()).or_default();
    let current = applied.last().copied().unwrap_or(0);
    if !ctx.in_version_order(current, ticket.version)? {
        return Ok(());
    }
    applied.push(ticket.version);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_published_out_of_order_are_applied_in_order_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::registered(server.url());
    let js = jetstream::new(server.client().await);
    wait_until(Duration::from_secs(10), "provisioning", || async {
        js.get_stream("tickets").await.is_ok()
    })
    .await;

    // Three tickets, versions 1..=12 each, published shuffled, with two duplicates.
    let mut order: Vec<(usize, u64)> = (0..3).flat_map(|t| (1..=12).map(move |v| (t, v))).collect();
    order.reverse();
    order.swap(3, 20);
    order.push((1, 4));
    order.push((2, 12));
    for (ticket, version) in order {
        let event = TicketUpdated {
            id: format!("t{ticket}"),
            version,
        };
        js.publish(format!("tickets.t{ticket}"), serde_json::to_vec(&event).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(30), "every version applied", || async {
        let db = DB.lock().unwrap();
        db.len() == 3 && db.values().all(|versions| versions.len() == 12)
    })
    .await;
    wait_until(Duration::from_secs(10), "every message settled", || async {
        let info = js
            .get_stream("tickets")
            .await
            .unwrap()
            .consumer_info("orders")
            .await
            .unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
    running.stop().await.expect("clean shutdown");
    for (ticket, versions) in DB.lock().unwrap().iter() {
        assert_eq!(*versions, (1..=12).collect::<Vec<_>>(), "ticket {ticket}");
    }
}
