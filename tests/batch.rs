//! Batch handlers, through the test kit on a real server: full batches from a burst, a partial
//! one after `batch_wait`, a failed batch redelivered whole, one message of a batch rejected to
//! the dead letters while the rest are acked, an undecodable message dead-lettered on its own,
//! a `Vec<T>` handler beside the `Batch<T>` one, and a batch running past `ack_wait` kept alive.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use natty_runtime::prelude::*;
use natty_runtime::testing::TestApp;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Row {
    id: u64,
    #[serde(default)]
    invalid: bool,
    #[serde(default)]
    fail_first: bool,
}

#[stream(name = "batch-rows", subjects = ["batch.>"])]
struct Rows;

/// What the handlers saw: each batch's size, and how many times each row id was handled.
#[derive(Clone, Default)]
struct Log {
    batches: Arc<Mutex<Vec<usize>>>,
    seen: Arc<Mutex<BTreeMap<u64, u32>>>,
    failed_once: Arc<Mutex<bool>>,
    vec_batches: Arc<Mutex<Vec<usize>>>,
}

#[consumer(
    stream = "batch-rows",
    durable = "loader",
    subject = "batch.rows.>",
    batch = 50,
    batch_wait = "200ms"
)]
async fn load(rows: Batch<Row>, State(log): State<Log>) -> Result<(), std::io::Error> {
    log.batches.lock().unwrap().push(rows.len());
    for (index, row) in rows.iter().enumerate() {
        *log.seen.lock().unwrap().entry(row.id).or_default() += 1;
        if row.invalid {
            rows.reject(index, Reject::terminate(format!("row {} is invalid", row.id)));
        }
    }
    let mut failed_once = log.failed_once.lock().unwrap();
    if rows.iter().any(|row| row.fail_first) && !*failed_once {
        *failed_once = true;
        return Err(std::io::Error::other("the database is down"));
    }
    Ok(())
}

#[consumer(stream = "batch-rows", durable = "summer", subject = "batch.vec.>", batch = 10)]
async fn sum(rows: Vec<Row>, State(log): State<Log>) {
    log.vec_batches.lock().unwrap().push(rows.len());
}

/// A batch that takes longer than `ack_wait`: kept alive, it is not redelivered meanwhile.
#[consumer(
    stream = "batch-rows",
    durable = "slow",
    subject = "batch.slow.>",
    batch = 5,
    ack_wait = "1s"
)]
async fn slow(rows: Vec<Row>, State(log): State<Log>) {
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    for row in rows {
        *log.seen.lock().unwrap().entry(row.id).or_default() += 1;
    }
}

fn row(id: u64) -> Row {
    Row {
        id,
        invalid: false,
        fail_first: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_fill_flush_retry_whole_and_settle_one_by_one() {
    let log = Log::default();
    let app = TestApp::builder()
        .state(log.clone())
        .start()
        .await
        .expect("the app starts");
    let sizes = || log.batches.lock().unwrap().clone();

    // A burst: full batches of 50.
    let rows: Vec<Row> = (1..=200).map(row).collect();
    let sends = rows
        .iter()
        .map(|row| app.publish(format!("batch.rows.{}", row.id), row));
    for sent in futures_util::future::join_all(sends).await {
        sent.expect("published");
    }
    app.settled().await.expect("settled");
    let burst = sizes();
    assert_eq!(burst.iter().sum::<usize>(), 200, "{burst:?}");
    assert!(burst.iter().all(|size| *size <= 50), "{burst:?}");
    assert!(
        burst.iter().filter(|size| **size == 50).count() >= 3,
        "mostly full batches: {burst:?}"
    );

    // Seven more, and nothing after them: one partial batch once `batch_wait` has passed.
    for id in 201..=207 {
        app.publish(format!("batch.rows.{id}"), &row(id))
            .await
            .expect("published");
    }
    app.settled().await.expect("settled");
    assert_eq!(sizes().last(), Some(&7), "{:?}", sizes());

    // One invalid row: it alone is dead-lettered, the rest of its batch acked.
    for id in 301..=310 {
        let row = Row {
            invalid: id == 305,
            ..row(id)
        };
        app.publish(format!("batch.rows.{id}"), &row).await.expect("published");
    }
    app.settled().await.expect("settled");
    let dead = app.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].reason.contains("row 305 is invalid"), "{:?}", dead[0]);
    assert_eq!(dead[0].consumer, "loader");

    // A batch that fails is redelivered whole, then acked.
    for id in 401..=410 {
        let row = Row {
            fail_first: id == 401,
            ..row(id)
        };
        app.publish(format!("batch.rows.{id}"), &row).await.expect("published");
    }
    app.settled().await.expect("settled");
    let seen = log.seen.lock().unwrap().clone();
    let retried: Vec<u64> = seen
        .iter()
        .filter(|(_, times)| **times > 1)
        .map(|(id, _)| *id)
        .collect();
    assert!(retried.contains(&401), "the failed batch came back: {retried:?}");
    assert!(
        retried.iter().all(|id| (401..=410).contains(id)),
        "only that batch: {retried:?}"
    );
    assert!((401..=410).all(|id| seen.contains_key(&id)), "{seen:?}");
    assert!(
        seen.keys().filter(|id| **id <= 310).all(|id| seen[id] == 1),
        "every other row once"
    );

    // An undecodable message is dead-lettered on its own; its batch goes on without it.
    app.client()
        .nats()
        .publish("batch.rows.bad", "{not json".into())
        .await
        .unwrap();
    app.publish("batch.rows.501", &row(501)).await.expect("published");
    app.settled().await.expect("settled");
    let dead = app.dead_letters().await.expect("dead letters");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[1].original_subject, "batch.rows.bad");
    assert_eq!(&dead[1].payload[..], b"{not json");
    assert_eq!(log.seen.lock().unwrap().get(&501), Some(&1));

    // A `Vec<T>` handler.
    for id in 1..=25 {
        app.publish(format!("batch.vec.{id}"), &row(id))
            .await
            .expect("published");
    }
    app.settled().await.expect("settled");
    let vec_batches = log.vec_batches.lock().unwrap().clone();
    assert_eq!(vec_batches.iter().sum::<usize>(), 25, "{vec_batches:?}");
    assert!(vec_batches.iter().all(|size| *size <= 10), "{vec_batches:?}");

    // A batch running past `ack_wait` is kept alive: the server redelivers none of it.
    for id in 901..=905 {
        app.publish(format!("batch.slow.{id}"), &row(id))
            .await
            .expect("published");
    }
    app.settled().await.expect("settled");
    let stream = app.client().jetstream().get_stream("batch-rows").await.unwrap();
    let info = stream.consumer_info("slow").await.unwrap();
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert!((901..=905).all(|id| log.seen.lock().unwrap().get(&id) == Some(&1)));
    app.stop().await.expect("drained");
}

/// The AsyncAPI document describes a batch handler's payload as each message's type, not as
/// the `Vec` (or `Batch`) the handler takes.
#[test]
fn a_batch_handlers_payload_is_its_item_type() {
    let document = natty_runtime::Runtime::builder()
        .handlers(["load", "sum"])
        .build()
        .expect("runtime")
        .asyncapi();
    let messages = document["components"]["messages"].as_object().expect("messages");
    let names: Vec<&String> = messages.keys().collect();
    assert_eq!(names, ["Row"], "{document:#}");
    assert_eq!(messages["Row"]["payload"]["type"], "object", "{document:#}");
    assert_eq!(messages["Row"]["payload"]["title"], "Row", "{document:#}");
}
