//! Atomic batches (`client.atomic_batch()`, `#[stream(atomic_publish = true)]`) on a real
//! nats-server 2.15: a batch to several subjects is stored whole, in order; a batch with one
//! failing expectation stores nothing; a stream that takes no batches refuses clearly; an empty
//! or oversized batch is refused before anything is sent.

use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::{AtomicBatchError, Publish, Runtime};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);

#[stream(name = "orders", subjects = ["orders.>"], atomic_publish = true)]
struct Orders;

/// A handler, so that the runtime has something to run while it provisions `orders`.
#[subscribe(subject = "atomic.noop")]
async fn noop(_: serde_json::Value) {}

/// The stream's message count.
async fn stored(js: &async_nats::jetstream::Context, stream: &str) -> u64 {
    js.get_stream(stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_whole_in_order_or_not_at_all() {
    let server = NatsServer::start().await.expect("nats-server");
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let runtime = Runtime::builder().url(server.url()).build().unwrap();
    let running = RunningRuntime::spawn(runtime);
    natty_tests::wait_until(WAIT, "the orders stream provisioned", || async {
        match js.get_stream("orders").await {
            Ok(mut stream) => stream.info().await.is_ok_and(|info| info.config.allow_atomic_publish),
            Err(_) => false,
        }
    })
    .await;
    let client = natty_runtime::Client::new(nats.clone());

    // Whole, in order, across subjects.
    let ack = client
        .atomic_batch()
        .add("orders.state.42", &json!({"status": "paid"}))
        .add("orders.events.paid", &json!({"order": 42}))
        .add("orders.events.receipt", &json!({"order": 42}))
        .commit()
        .await
        .expect("committed");
    assert_eq!(
        (ack.stream.as_str(), ack.sequence, ack.count),
        ("orders", 3, 3),
        "{ack:?}"
    );
    let stream = js.get_stream("orders").await.unwrap();
    for (sequence, subject) in [
        (1, "orders.state.42"),
        (2, "orders.events.paid"),
        (3, "orders.events.receipt"),
    ] {
        assert_eq!(
            stream.get_raw_message(sequence).await.unwrap().subject.as_str(),
            subject
        );
    }

    // One failing expectation: nothing of it stored.
    let error = client
        .atomic_batch()
        .add_with(
            "orders.state.42",
            &json!({"status": "shipped"}),
            Publish::new().expected_last_subject_sequence(99),
        )
        .add("orders.events.shipped", &json!({"order": 42}))
        .commit()
        .await
        .unwrap_err();
    assert!(matches!(error, AtomicBatchError::Refused { count: 2, .. }), "{error:?}");
    assert_eq!(stored(&js, "orders").await, 3, "nothing of the refused batch stored");
    // The right expectation: stored.
    let ack = client
        .atomic_batch()
        .add_with(
            "orders.state.42",
            &json!({"status": "shipped"}),
            Publish::new().expected_last_subject_sequence(1),
        )
        .add("orders.events.shipped", &json!({"order": 42}))
        .commit()
        .await
        .expect("committed");
    assert_eq!((ack.sequence, ack.count), (5, 2));

    // Refused before anything is sent.
    assert!(matches!(
        client.atomic_batch().commit().await,
        Err(AtomicBatchError::Empty)
    ));
    let mut big = client.atomic_batch();
    for i in 0..=natty_runtime::MAX_BATCH {
        big = big.add(format!("orders.bulk.{i}"), &json!(i));
    }
    assert!(matches!(
        big.commit().await,
        Err(AtomicBatchError::TooLarge { count: 1001 })
    ));
    let error = client
        .atomic_batch()
        .add("orders.bad..subject", &json!(1))
        .commit()
        .await
        .unwrap_err();
    assert!(matches!(error, AtomicBatchError::Message(_)), "{error:?}");
    assert_eq!(stored(&js, "orders").await, 5);

    // A stream that takes no batches says so.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "plain".into(),
        subjects: vec!["plain.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let error = client
        .atomic_batch()
        .add("plain.a", &json!(1))
        .add("plain.b", &json!(2))
        .commit()
        .await
        .unwrap_err();
    let text = error.to_string();
    assert!(text.contains("atomic_publish = true"), "{text}");
    assert_eq!(stored(&js, "plain").await, 0);
    running.stop().await.unwrap();
}
