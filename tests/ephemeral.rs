//! Ephemeral consumers: each instance has its own, sees every message, and removes it on a
//! clean shutdown.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use futures_util::StreamExt;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

/// job id → consumer names that handled it.
static HANDLED: Mutex<BTreeMap<u64, Vec<String>>> = Mutex::new(BTreeMap::new());

#[stream(name = "broadcast", subjects = ["broadcast.>"])]
struct Broadcast;

#[consumer(stream = "broadcast", inactive_threshold = "1m")]
async fn every_instance(job: Job, ctx: Context) {
    HANDLED
        .lock()
        .unwrap()
        .entry(job.id)
        .or_default()
        .push(ctx.consumer().to_string());
}

async fn consumer_names(js: &jetstream::Context) -> Vec<String> {
    let stream = js.get_stream("broadcast").await.unwrap();
    stream
        .consumer_names()
        .filter_map(|name| async { name.ok() })
        .collect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_instance_gets_every_message_and_cleans_up() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let first = RunningRuntime::registered(server.url());
    let second = RunningRuntime::registered(server.url());
    wait_until(Duration::from_secs(10), "two ephemeral consumers", || async {
        js.get_stream("broadcast").await.is_ok() && consumer_names(&js).await.len() == 2
    })
    .await;
    let names = consumer_names(&js).await;
    assert!(
        names.iter().all(|name| name.starts_with("every_instance-")),
        "{names:?}"
    );
    let info = js
        .get_stream("broadcast")
        .await
        .unwrap()
        .consumer_info(&names[0])
        .await
        .unwrap();
    assert_eq!(info.config.durable_name, None, "ephemeral on the server");
    assert_eq!(info.config.inactive_threshold, Duration::from_secs(60));

    for id in 1..=20 {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish(format!("broadcast.{id}"), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(Duration::from_secs(10), "every message at both instances", || async {
        let handled = HANDLED.lock().unwrap();
        handled.len() == 20 && handled.values().all(|by| by.len() == 2)
    })
    .await;
    for (id, by) in HANDLED.lock().unwrap().iter() {
        assert_ne!(by[0], by[1], "job {id} handled twice by one instance");
    }

    first.stop().await.expect("clean shutdown");
    second.stop().await.expect("clean shutdown");
    assert!(
        consumer_names(&js).await.is_empty(),
        "ephemeral consumers removed on shutdown"
    );
}
