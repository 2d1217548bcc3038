//! `#[kv_watch]`: every change of the watched keys, in revision order, across a server restart.

use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::KvOperation;
use natty_tests::{wait_until, Job};

/// One change as the handler saw it: key, revision, operation, value.
type Seen = (String, u64, KvOperation, Option<u64>);

static SEEN: Mutex<Vec<Seen>> = Mutex::new(Vec::new());

#[kv_watch(bucket = "settings", key = "limits.>", history = true)]
async fn on_limit(change: KvChange<Job>) {
    let value = change.value.map(|job| job.id);
    SEEN.lock()
        .unwrap()
        .push((change.key, change.revision, change.operation, value));
}

async fn put(js: &jetstream::Context, key: &str, id: u64) -> u64 {
    // Retried: right after a restart the bucket's stream may still be recovering.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(store) = js.get_key_value("settings").await {
            if let Ok(revision) = store.put(key, serde_json::to_vec(&Job { id }).unwrap().into()).await {
                return revision;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a KV put did not succeed within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_watch_sees_every_change_in_order_across_a_restart() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    js.create_key_value(kv::Config {
        bucket: "settings".into(),
        history: 10,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut expected = vec![put(&js, "limits.a", 0).await];
    put(&js, "other.x", 99).await; // not watched

    let running = RunningRuntime::registered(server.url());
    wait_until(
        Duration::from_secs(10),
        "the current value (history = true)",
        || async { SEEN.lock().unwrap().len() == 1 },
    )
    .await;
    for id in 1..=50 {
        expected.push(put(&js, if id % 2 == 0 { "limits.a" } else { "limits.b" }, id).await);
    }
    server.restart().await.expect("restart");
    let js = jetstream::new(server.client().await);
    for id in 51..=100 {
        expected.push(put(&js, "limits.b", id).await);
    }
    let store = js.get_key_value("settings").await.unwrap();
    store.delete("limits.a").await.expect("delete");
    // The delete marker's revision, read fresh from the bucket's stream.
    let last = js
        .get_stream("KV_settings")
        .await
        .unwrap()
        .get_info()
        .await
        .unwrap()
        .state
        .last_sequence;
    expected.push(last);

    wait_until(Duration::from_secs(30), "every change", || async {
        SEEN.lock()
            .unwrap()
            .last()
            .is_some_and(|(_, revision, _, _)| *revision == last)
    })
    .await;
    running.stop().await.expect("clean shutdown");

    let seen = SEEN.lock().unwrap().clone();
    let revisions: Vec<u64> = seen.iter().map(|(_, revision, _, _)| *revision).collect();
    assert_eq!(revisions, expected, "every change once, in revision order");
    assert!(seen.iter().all(|(key, ..)| key.starts_with("limits.")));
    assert_eq!(seen[0].3, Some(0), "the value current at start");
    let (key, _, operation, value) = seen.last().unwrap();
    assert_eq!(
        (key.as_str(), *operation, *value),
        ("limits.a", KvOperation::Delete, None)
    );
}
