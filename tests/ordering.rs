//! Per-key ordering: within a key, strictly in publish order (even across a failure); across
//! keys, in parallel.

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

    let running = RunningRuntime::registered(server.url());
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
