//! Where a consumer starts: only new messages, or from a given stream sequence.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

static FROM_NEW: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
static FROM_THREE: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

#[consumer(stream = "history", durable = "only-new", deliver = "new")]
async fn only_new(job: Job) {
    FROM_NEW.lock().unwrap().insert(job.id);
}

#[consumer(stream = "history", durable = "from-three", start_sequence = 3)]
async fn from_three(job: Job) {
    FROM_THREE.lock().unwrap().insert(job.id);
}

async fn publish(js: &jetstream::Context, id: u64) {
    let payload = serde_json::to_vec(&Job { id }).unwrap();
    js.publish(format!("history.{id}"), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_start_where_declared() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "history".into(),
        subjects: vec!["history.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for id in 1..=4 {
        publish(&js, id).await;
    }
    let running = RunningRuntime::registered(server.url());
    wait_until(Duration::from_secs(10), "both consumers to exist", || async {
        let stream = js.get_stream("history").await.unwrap();
        stream.consumer_info("only-new").await.is_ok() && stream.consumer_info("from-three").await.is_ok()
    })
    .await;
    for id in 5..=6 {
        publish(&js, id).await;
    }
    wait_until(Duration::from_secs(10), "both consumers to reach the end", || async {
        let stream = js.get_stream("history").await.unwrap();
        let new = stream.consumer_info("only-new").await.unwrap();
        let three = stream.consumer_info("from-three").await.unwrap();
        new.ack_floor.stream_sequence == 6 && three.ack_floor.stream_sequence == 6
    })
    .await;
    assert_eq!(*FROM_NEW.lock().unwrap(), BTreeSet::from([5, 6]));
    assert_eq!(*FROM_THREE.lock().unwrap(), BTreeSet::from([3, 4, 5, 6]));
    let stream = js.get_stream("history").await.unwrap();
    assert_eq!(
        stream.consumer_info("only-new").await.unwrap().config.deliver_policy,
        DeliverPolicy::New
    );
    assert_eq!(
        stream.consumer_info("from-three").await.unwrap().config.deliver_policy,
        DeliverPolicy::ByStartSequence { start_sequence: 3 }
    );
    running.stop().await.expect("clean shutdown");
}
