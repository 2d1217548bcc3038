//! A handler error (or panic) naks the message, which is redelivered; the success after it is
//! acked once.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

/// id → the delivery counts the handler saw for it.
static ATTEMPTS: Mutex<BTreeMap<u64, Vec<u64>>> = Mutex::new(BTreeMap::new());

#[stream(name = "flaky", subjects = ["flaky.>"])]
struct Flaky;

#[consumer(stream = "flaky", durable = "flaky-worker", concurrency = 4)]
async fn fails_first_time(job: Job, ctx: Context) -> Result<(), std::io::Error> {
    ATTEMPTS
        .lock()
        .unwrap()
        .entry(job.id)
        .or_default()
        .push(ctx.delivery_count());
    if ctx.delivery_count() == 1 {
        if job.id.is_multiple_of(5) {
            panic!("a handler bug on job {}", job.id);
        }
        return Err(std::io::Error::other("the first attempt always fails"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_handler_is_redelivered_and_the_success_is_acked_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::registered(server.url());

    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    wait_until(Duration::from_secs(10), "the stream to be provisioned", || async {
        js.get_stream("flaky").await.is_ok()
    })
    .await;
    const COUNT: u64 = 20;
    for id in 1..=COUNT {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish(format!("flaky.{id}"), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }

    wait_until(Duration::from_secs(30), "every message acked", || async {
        let stream = js.get_stream("flaky").await.unwrap();
        let info = stream.consumer_info("flaky-worker").await.unwrap();
        info.ack_floor.stream_sequence == COUNT && info.num_ack_pending == 0
    })
    .await;

    let stream = js.get_stream("flaky").await.unwrap();
    let info = stream.consumer_info("flaky-worker").await.unwrap();
    // Exactly two deliveries per message: the failure, then the success that was acked.
    assert_eq!(info.delivered.consumer_sequence, 2 * COUNT, "deliveries: {info:?}");
    let attempts = ATTEMPTS.lock().unwrap().clone();
    assert_eq!(attempts.len() as u64, COUNT);
    for (id, seen) in attempts {
        assert_eq!(seen, vec![1, 2], "delivery counts seen for job {id}");
    }

    running.stop().await.expect("clean shutdown");
}
