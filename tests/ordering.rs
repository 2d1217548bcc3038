//! Per-key ordering: within a key, strictly in publish order (even across a failure); across
//! keys, in parallel. Keys come from a subject token or from a function of the payload.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::stream::{FuturesUnordered, StreamExt};
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

/// key → job ids in the order they were handled (successfully).
static ORDER: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());
static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MOST_AT_ONCE: AtomicUsize = AtomicUsize::new(0);
static FAILED_ONCE: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[stream(name = "accounts", subjects = ["accounts.>"])]
struct Accounts;

#[consumer(stream = "accounts", durable = "ledger", order_by = "subject[1]", concurrency = 16, backoff = ["20ms"])]
async fn apply(job: Job, ctx: Context) -> Result<(), std::io::Error> {
    let running = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MOST_AT_ONCE.fetch_max(running, Ordering::SeqCst);
    // Uneven work, so that keys overtake one another.
    tokio::time::sleep(Duration::from_micros(job.id % 7 * 150)).await;
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    // Every 97th job fails once: its successors must wait for its retry.
    if job.id.is_multiple_of(97) && !FAILED_ONCE.lock().unwrap().contains(&job.id) {
        FAILED_ONCE.lock().unwrap().push(job.id);
        return Err(std::io::Error::other("a transient failure"));
    }
    let key = ctx.subject().split('.').nth(1).unwrap().to_string();
    ORDER.lock().unwrap().entry(key).or_default().push(job.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn within_a_key_strictly_in_order_across_keys_in_parallel() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "accounts".into(),
        subjects: vec!["accounts.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // 5,000 messages over 50 keys, published in id order (so stream order = id order per key).
    const COUNT: u64 = 5_000;
    let mut acks = FuturesUnordered::new();
    for id in 1..=COUNT {
        let subject = format!("accounts.k{}.entry", id % 50);
        let ack = js
            .publish(subject, serde_json::to_vec(&Job { id }).unwrap().into())
            .await
            .unwrap();
        acks.push(std::future::IntoFuture::into_future(ack));
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }

    let running = only(&server, "apply");
    wait_until(Duration::from_secs(60), "every message applied", || async {
        ORDER.lock().unwrap().values().map(Vec::len).sum::<usize>() == COUNT as usize
    })
    .await;
    running.stop().await.expect("clean shutdown");

    let order = ORDER.lock().unwrap().clone();
    assert_eq!(order.len(), 50);
    for (key, ids) in &order {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "key {key} out of order: {ids:?}");
        assert_eq!(ids.len(), 100, "key {key}");
    }
    assert!(!FAILED_ONCE.lock().unwrap().is_empty());
    assert!(MOST_AT_ONCE.load(Ordering::SeqCst) > 1, "keys never ran in parallel");
}

/// Runs only `handler`: each test here has its own consumer and counters.
fn only(server: &NatsServer, handler: &str) -> RunningRuntime {
    RunningRuntime::spawn(
        natty_runtime::Runtime::builder()
            .url(server.url())
            .handlers([handler])
            .build()
            .expect("a runtime"),
    )
}

/// A ledger entry: every entry shares one subject, so only the payload knows its account.
#[derive(serde::Serialize, serde::Deserialize)]
struct Entry {
    account: String,
    id: u64,
}

fn account_of(entry: &Entry) -> &str {
    &entry.account
}

static BY_ACCOUNT: Mutex<BTreeMap<String, Vec<u64>>> = Mutex::new(BTreeMap::new());
static KEYED_RUNNING: AtomicUsize = AtomicUsize::new(0);
static KEYED_MOST_AT_ONCE: AtomicUsize = AtomicUsize::new(0);
static KEYED_FAILED_ONCE: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[stream(name = "ledger", subjects = ["ledger.>"])]
struct Ledger;

#[consumer(stream = "ledger", durable = "books", order_by = account_of, concurrency = 16, backoff = ["20ms"])]
async fn book(entry: Entry) -> Result<(), std::io::Error> {
    let running = KEYED_RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    KEYED_MOST_AT_ONCE.fetch_max(running, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_micros(entry.id % 5 * 200)).await;
    KEYED_RUNNING.fetch_sub(1, Ordering::SeqCst);
    if entry.id.is_multiple_of(89) && !KEYED_FAILED_ONCE.lock().unwrap().contains(&entry.id) {
        KEYED_FAILED_ONCE.lock().unwrap().push(entry.id);
        return Err(std::io::Error::other("a transient failure"));
    }
    BY_ACCOUNT
        .lock()
        .unwrap()
        .entry(entry.account)
        .or_default()
        .push(entry.id);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_function_orders_by_a_payload_field() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = only(&server, "book");
    let client = Client::new(server.client().await);
    wait_until(Duration::from_secs(10), "the stream to be provisioned", || async {
        client.jetstream().get_stream("ledger").await.is_ok()
    })
    .await;
    const COUNT: u64 = 2_000;
    let mut acks = FuturesUnordered::new();
    for id in 1..=COUNT {
        let entry = Entry {
            account: format!("acct-{}", id % 20),
            id,
        };
        acks.push(client.send("ledger.entries", &entry).await.unwrap());
    }
    while let Some(ack) = acks.next().await {
        ack.unwrap();
    }
    wait_until(Duration::from_secs(60), "every entry booked", || async {
        BY_ACCOUNT.lock().unwrap().values().map(Vec::len).sum::<usize>() == COUNT as usize
    })
    .await;
    running.stop().await.expect("clean shutdown");

    let books = BY_ACCOUNT.lock().unwrap().clone();
    assert_eq!(books.len(), 20);
    for (account, ids) in &books {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{account} out of order: {ids:?}");
        assert_eq!(ids.len(), 100, "{account}");
    }
    assert!(!KEYED_FAILED_ONCE.lock().unwrap().is_empty());
    assert!(
        KEYED_MOST_AT_ONCE.load(Ordering::SeqCst) > 1,
        "accounts never ran in parallel"
    );
}
