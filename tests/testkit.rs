//! `TestApp`, the test kit, with JetStream's real semantics: `settled` waits out a handler's
//! retries (`max_deliver`, backoff) and a slow handler; `dead_letters` returns what the service
//! gave up on, with its reason and headers; a subscription is listening once `start` returns;
//! the server restarts under the running service; state and a handler selection come through
//! the builder; a startup error is returned, not hidden behind a timeout; without a nats-server
//! binary the error says how to install one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use natty_runtime::prelude::*;
use natty_runtime::testing::TestApp;
use natty_runtime::Error;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, Payload)]
#[payload(subject = "kit.orders.{id}")]
struct Order {
    id: u64,
    total_cents: u64,
}

#[stream(name = "kit-orders", subjects = ["kit.orders.>"])]
struct Orders;

/// Counts what the handlers did.
#[derive(Clone, Default)]
struct Counts {
    billed: Arc<AtomicU64>,
    billed_ids: Arc<std::sync::Mutex<Vec<u64>>>,
    attempts: Arc<AtomicU64>,
    heard: Arc<AtomicU64>,
}

/// Bills orders; an order for nothing is rejected for good, an order for 1 cent fails twice
/// before it goes through, and each takes a while.
/// A short `ack_wait`: acks the server had not written to disk when it restarted come back
/// (redelivered) within it.
#[consumer(stream = "kit-orders", durable = "kit-billing", backoff = ["50ms"], ack_wait = "2s")]
async fn bill(order: Order, State(counts): State<Counts>) -> Result<(), Reject> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    if order.total_cents == 0 {
        return Err(Reject::terminate(format!("order {} is for nothing", order.id)));
    }
    if order.total_cents == 1 && counts.attempts.fetch_add(1, Ordering::SeqCst) < 2 {
        return Err(Reject::retry());
    }
    counts.billed.fetch_add(1, Ordering::SeqCst);
    counts.billed_ids.lock().unwrap().push(order.id);
    Ok(())
}

#[subscribe(subject = "kit.pings")]
async fn hear(_order: Order, State(counts): State<Counts>) {
    counts.heard.fetch_add(1, Ordering::SeqCst);
}

/// Takes a state the startup test does not give.
#[derive(Clone)]
struct Unused;

#[consumer(stream = "kit-orders", durable = "kit-unused")]
async fn unused(_order: Order, State(_unused): State<Unused>) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settled_waits_out_retries_and_dead_letters_are_read_back() {
    let counts = Counts::default();
    let started = Instant::now();
    let mut app = TestApp::builder()
        .handlers(["bill", "hear"])
        .state(counts.clone())
        .start()
        .await
        .expect("the app starts");
    let startup = started.elapsed();
    assert!(startup < Duration::from_secs(5), "started in {startup:?}");

    // Listening as soon as start returns: a core message is not lost.
    let ping = serde_json::to_vec(&Order { id: 0, total_cents: 0 }).unwrap();
    app.client().nats().publish("kit.pings", ping.into()).await.unwrap();
    app.client().nats().flush().await.unwrap();

    for id in 1..=10 {
        app.emit(&Order {
            id,
            total_cents: 100 * id,
        })
        .await
        .expect("emit");
    }
    app.emit(&Order { id: 11, total_cents: 1 }).await.expect("emit");
    app.emit(&Order { id: 12, total_cents: 0 }).await.expect("emit");
    app.settled().await.expect("settled");
    // Settled means done: every billing happened, including the one retried twice.
    assert_eq!(counts.billed.load(Ordering::SeqCst), 11);
    assert_eq!(counts.attempts.load(Ordering::SeqCst), 3);

    let dead = app.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("order 12 is for nothing"), "{:?}", dead[0]);
    assert_eq!(dead[0].original_subject, "kit.orders.12");
    assert_eq!(dead[0].consumer, "kit-billing");
    let order: Order = serde_json::from_slice(&dead[0].payload).unwrap();
    assert_eq!(order.id, 12);
    assert_eq!(counts.heard.load(Ordering::SeqCst), 1, "the ping was heard");

    // The server restarts under the running service, which carries on. (A message acked just
    // before the restart may come again: the server may not have written its ack to disk.)
    app.restart_server().await.expect("restart");
    app.emit(&Order {
        id: 13,
        total_cents: 1300,
    })
    .await
    .expect("emit after the restart");
    // Within 8 s: the consumer re-asks as soon as it sees the reconnect, rather than after
    // the 11 s its pull requests' silence would take (and what the server lost acks for comes
    // back after the 2 s ack_wait).
    app.settled_within(Duration::from_secs(8))
        .await
        .expect("settled after the restart");
    assert!(
        counts.billed_ids.lock().unwrap().contains(&13),
        "billed after the restart"
    );
    app.stop().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_error_is_returned_at_once() {
    let started = Instant::now();
    let error = TestApp::builder()
        .handlers(["unused"])
        .start()
        .await
        .expect_err("a state is missing");
    assert!(
        matches!(&error, Error::MissingState { handler, .. } if handler == "unused"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
}

/// Run as a child process by the test below, with no nats-server to be found (an environment
/// variable of its own, so the other tests are not affected).
#[tokio::test]
#[ignore = "run by without_a_nats_server_the_error_says_how_to_install_one"]
async fn start_without_a_nats_server() {
    let error = TestApp::start().await.expect_err("no nats-server binary");
    println!("TESTAPP ERROR {error:?}");
}

#[test]
fn without_a_nats_server_the_error_says_how_to_install_one() {
    let output = std::process::Command::new(std::env::current_exe().expect("this test binary"))
        .args(["--ignored", "--exact", "start_without_a_nats_server", "--nocapture"])
        .env("NATTY_NATS_SERVER", "/nonexistent/nats-server")
        .output()
        .expect("run the child test");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The error's Debug: what failed, then each cause on a line of its own.
    let error = stdout
        .split_once("TESTAPP ERROR")
        .map(|(_, error)| error)
        .unwrap_or_else(|| panic!("no error printed: {stdout}"));
    assert!(
        error.contains("cannot start a nats-server") && error.contains("/nonexistent/nats-server does not exist"),
        "{error}"
    );
    assert!(error.contains("scripts/install-nats-server.sh"), "{error}");
}
