//! Typed KV buckets: provisioning (create, update, verify-only drift), typed values with
//! revisions, compare-and-set conflicts as a typed error, and a watch that sees every change in
//! order across a server restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::stream::StorageType;
use futures_util::StreamExt;
use natty_runtime::kv::{Kv, KvBucketDef, KvError};
use natty_runtime::testing::NatsServer;
use natty_runtime::{Client, Error, KvChange, KvOperation, Provision};
use natty_tests::{wait_until, Job};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    name: String,
    visits: u32,
}

fn profile(name: &str, visits: u32) -> Profile {
    Profile {
        name: name.into(),
        visits,
    }
}

async fn client(server: &NatsServer) -> Client {
    Client::new(server.client().await)
}

/// The config of the stream behind bucket `name`, as the server has it.
async fn stream_config(client: &Client, name: &str) -> async_nats::jetstream::stream::Config {
    client
        .jetstream()
        .get_stream(format!("KV_{name}"))
        .await
        .expect("the bucket's stream")
        .get_info()
        .await
        .expect("stream info")
        .config
}

#[tokio::test]
async fn a_declared_bucket_is_created_updated_and_verified() {
    const PROFILES: KvBucketDef = KvBucketDef::new("profiles")
        .history(5)
        .ttl(Duration::from_secs(3600))
        .max_value_size(256)
        .storage(StorageType::File)
        .description("user profiles");
    const MORE_HISTORY: KvBucketDef = KvBucketDef::new("profiles").history(10);

    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;

    // Verify-only and off never create it.
    let error = PROFILES.provision(&client, Provision::VerifyOnly).await.unwrap_err();
    assert!(matches!(error, Error::StreamNotFound { .. }), "{error:?}");
    assert!(error.to_string().contains("KV bucket `profiles`"), "{error}");
    PROFILES
        .provision(&client, Provision::Off)
        .await
        .expect("off does nothing");
    assert!(matches!(
        client.kv::<Profile>("profiles").await,
        Err(KvError::BucketNotFound { .. })
    ));

    PROFILES
        .provision(&client, Provision::CreateOrUpdate)
        .await
        .expect("create");
    let config = stream_config(&client, "profiles").await;
    assert_eq!(config.max_messages_per_subject, 5);
    assert_eq!(config.max_age, Duration::from_secs(3600));
    assert_eq!(config.max_message_size, 256);
    assert_eq!(config.storage, StorageType::File);
    assert_eq!(config.description.as_deref(), Some("user profiles"));
    PROFILES
        .provision(&client, Provision::VerifyOnly)
        .await
        .expect("what was created verifies");
    PROFILES
        .provision(&client, Provision::CreateOrUpdate)
        .await
        .expect("a second run changes nothing");

    // The server enforces the declared value size.
    let profiles = client.kv::<Profile>("profiles").await.unwrap();
    let revision = profiles.put("ada", &profile("ada", 1)).await.unwrap();
    let error = profiles.put("bob", &profile(&"b".repeat(300), 1)).await.unwrap_err();
    assert!(
        matches!(error, KvError::Request { ref key, .. } if key == "bob"),
        "{error:?}"
    );

    // A declaration that drifted from the server: named in verify-only mode, applied otherwise.
    let error = MORE_HISTORY
        .provision(&client, Provision::VerifyOnly)
        .await
        .unwrap_err();
    match &error {
        Error::Drift(drift) => assert_eq!(
            (drift.field, drift.declared.as_str(), drift.actual.as_str()),
            ("history", "10", "5")
        ),
        other => panic!("expected drift, got {other:?}"),
    }
    assert!(error.to_string().contains("verify-only"), "{error}");
    MORE_HISTORY
        .provision(&client, Provision::CreateOrUpdate)
        .await
        .expect("update");
    let config = stream_config(&client, "profiles").await;
    assert_eq!(config.max_messages_per_subject, 10);
    assert_eq!(
        config.max_age,
        Duration::from_secs(3600),
        "undeclared settings are kept"
    );
    let entry = profiles.get("ada").await.unwrap().expect("entries survive an update");
    assert_eq!((entry.value, entry.revision), (profile("ada", 1), revision));

    // A change the server refuses is an error naming the setting.
    let error = KvBucketDef::new("profiles")
        .storage(StorageType::Memory)
        .provision(&client, Provision::CreateOrUpdate)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, Error::Drift(drift) if drift.field == "storage"),
        "{error:?}"
    );
    assert!(error.to_string().contains("refused"), "{error}");

    let error = KvBucketDef::new("profiles")
        .history(65)
        .provision(&client, Provision::CreateOrUpdate)
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::Config { .. }) && error.to_string().contains("between 1 and 64"),
        "{error:?}"
    );
}

#[natty_runtime::kv_bucket(name = "sessions", history = 3, ttl = "10m", storage = "memory", max_bytes = 1048576)]
struct Sessions;

#[tokio::test]
async fn the_macro_registers_the_declaration() {
    let def = natty_runtime::__private::inventory::iter::<KvBucketDef>
        .into_iter()
        .find(|def| def.name() == "sessions")
        .expect("#[kv_bucket] registered `sessions`");
    assert!(def.location().file.ends_with("kv.rs"), "{}", def.location());

    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    def.provision(&client, Provision::CreateOrUpdate).await.expect("create");
    let config = stream_config(&client, "sessions").await;
    assert_eq!(config.max_messages_per_subject, 3);
    assert_eq!(config.max_age, Duration::from_secs(600));
    assert_eq!(config.storage, StorageType::Memory);
    assert_eq!(config.max_bytes, 1_048_576);
}

async fn bucket<T>(client: &Client, name: &'static str, storage: StorageType) -> Kv<T> {
    KvBucketDef::new(name)
        .history(64)
        .storage(storage)
        .provision(client, Provision::CreateOrUpdate)
        .await
        .expect("create the bucket");
    client.kv(name).await.expect("open the bucket")
}

#[tokio::test]
async fn typed_values_round_trip_with_their_revisions() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    let kv: Kv<Profile> = bucket(&client, "users", StorageType::Memory).await;

    assert_eq!(kv.get("ada").await.unwrap(), None);
    let first = kv.put("ada", &profile("ada", 1)).await.unwrap();
    let entry = kv.get("ada").await.unwrap().unwrap();
    assert_eq!(
        (entry.key.as_str(), &entry.value, entry.revision),
        ("ada", &profile("ada", 1), first)
    );
    let second = kv.put("ada", &profile("ada", 2)).await.unwrap();
    assert!(second > first);

    // create: only where there is no value.
    let error = kv.create("ada", &profile("ada", 9)).await.unwrap_err();
    assert!(
        matches!(error, KvError::Exists { ref bucket, ref key } if bucket == "users" && key == "ada"),
        "{error:?}"
    );
    assert!(error.to_string().contains("`ada` already exists"), "{error}");
    kv.create("bob", &profile("bob", 1)).await.expect("a new key");

    // update: compare-and-set on the revision.
    let third = kv.update("ada", &profile("ada", 3), second).await.unwrap();
    let error = kv.update("ada", &profile("ada", 4), second).await.unwrap_err();
    match &error {
        KvError::Conflict { key, expected, .. } => assert_eq!((key.as_str(), *expected), ("ada", second)),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(kv.get("ada").await.unwrap().unwrap().value, profile("ada", 3));
    let error = kv.delete_expect("ada", second).await.unwrap_err();
    assert!(matches!(error, KvError::Conflict { .. }), "{error:?}");

    // delete, then create again; purge.
    kv.put("cy", &profile("cy", 1)).await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    keys.sort();
    assert_eq!(keys, ["ada", "bob", "cy"]);
    kv.delete_expect("ada", third)
        .await
        .expect("delete at the current revision");
    assert_eq!(kv.get("ada").await.unwrap(), None);
    kv.create("ada", &profile("ada", 10))
        .await
        .expect("a deleted key can be created again");
    kv.delete("bob").await.unwrap();
    kv.purge("cy").await.unwrap();
    assert_eq!(kv.get("bob").await.unwrap(), None);
    assert_eq!(kv.get("cy").await.unwrap(), None);
    assert_eq!(kv.keys().await.unwrap(), ["ada"]);

    // Errors name bucket and key.
    let error = kv.put(".bad", &profile("x", 0)).await.unwrap_err();
    assert!(matches!(error, KvError::InvalidKey { .. }), "{error:?}");
    kv.raw().put("junk", "not json".into()).await.unwrap();
    let error = kv.get("junk").await.unwrap_err();
    assert!(
        matches!(error, KvError::Decode { ref key, .. } if key == "junk"),
        "{error:?}"
    );
    assert!(
        error.to_string().starts_with("KV bucket `users`: key `junk`"),
        "{error}"
    );
    let error = client.kv::<Profile>("nope").await.unwrap_err();
    assert!(matches!(error, KvError::BucketNotFound { .. }), "{error:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_writers_get_exactly_one_win_per_revision() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = client(&server).await;
    let kv: Kv<u64> = bucket(&client, "counters", StorageType::Memory).await;

    // Two writers replacing the same revision: one wins, the other gets a typed conflict.
    let mut revision = kv.put("pair", &0).await.unwrap();
    for round in 1..=20u64 {
        let (a, b) = tokio::join!(kv.update("pair", &round, revision), kv.update("pair", &round, revision));
        let (won, lost) = match (a, b) {
            (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won, lost),
            other => panic!("round {round}: expected exactly one winner, got {other:?}"),
        };
        assert!(
            matches!(lost, KvError::Conflict { expected, .. } if expected == revision),
            "{lost:?}"
        );
        revision = won;
    }

    // Eight writers incrementing one counter by read-modify-write: no increment is lost.
    kv.put("hits", &0).await.unwrap();
    let conflicts = Arc::new(Mutex::new(0u32));
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let (kv, conflicts) = (kv.clone(), conflicts.clone());
            tokio::spawn(async move {
                for _ in 0..25 {
                    loop {
                        let current = kv.get("hits").await.unwrap().unwrap();
                        match kv.update("hits", &(current.value + 1), current.revision).await {
                            Ok(_) => break,
                            Err(KvError::Conflict { .. }) => *conflicts.lock().unwrap() += 1,
                            Err(other) => panic!("{other}"),
                        }
                    }
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(kv.get("hits").await.unwrap().unwrap().value, 200);
    println!(
        "200 increments by 8 writers, {} conflicts retried",
        conflicts.lock().unwrap()
    );
}

/// What a watcher saw: key, revision, operation, value.
type Seen = (String, u64, KvOperation, Option<u64>);

fn collect(mut changes: natty_runtime::kv::KvChanges<Job>) -> (Arc<Mutex<Vec<Seen>>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let task = tokio::spawn(async move {
        while let Some(change) = changes.next().await {
            let KvChange {
                key,
                revision,
                operation,
                value,
            } = change.expect("a decodable change");
            sink.lock()
                .unwrap()
                .push((key, revision, operation, value.map(|job: Job| job.id)));
        }
    });
    (seen, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_every_change_in_order_across_a_restart() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let writer = client(&server).await;
    let kv: Kv<Job> = bucket(&writer, "settings", StorageType::File).await;
    // Before the watches: not changes they report.
    kv.put("limits.a", &Job { id: 0 }).await.unwrap();
    kv.put("limits.c", &Job { id: 0 }).await.unwrap();
    kv.put("other.x", &Job { id: 0 }).await.unwrap();

    // The watcher has a connection of its own, as another service would.
    let watcher = client(&server).await.kv::<Job>("settings").await.unwrap();
    let (seen, task) = collect(watcher.watch("limits.>").await.unwrap());
    let (current, current_task) = collect(watcher.watch_with_history("limits.>").await.unwrap());
    // Sees nothing before the restart: resuming must not fall back to replaying the history.
    let (quiet, quiet_task) = collect(watcher.watch("limits.c").await.unwrap());

    let mut expected: Vec<(String, Option<u64>)> = Vec::new();
    let mut revisions = Vec::new();
    for id in 1..=30 {
        let key = if id % 2 == 0 { "limits.a" } else { "limits.b" };
        revisions.push(kv.put(key, &Job { id }).await.unwrap());
        expected.push((key.into(), Some(id)));
        kv.put("other.x", &Job { id }).await.unwrap(); // not watched
    }
    kv.delete("limits.a").await.unwrap();
    expected.push(("limits.a".into(), None));
    wait_until(Duration::from_secs(10), "the changes before the restart", || async {
        seen.lock().unwrap().len() == expected.len()
    })
    .await;

    server.restart().await.expect("restart");
    // Writes resume once the client has reconnected and the bucket's stream has recovered.
    wait_until(Duration::from_secs(20), "the bucket after the restart", || async {
        kv.get("limits.b").await.is_ok()
    })
    .await;
    for id in 31..=60 {
        revisions.push(kv.put("limits.c", &Job { id }).await.unwrap());
        expected.push(("limits.c".into(), Some(id)));
    }
    kv.purge("limits.b").await.unwrap();
    expected.push(("limits.b".into(), None));
    wait_until(Duration::from_secs(30), "every change", || async {
        seen.lock().unwrap().len() >= expected.len()
    })
    .await;
    task.abort();

    let seen = seen.lock().unwrap().clone();
    let changes: Vec<(String, Option<u64>)> = seen.iter().map(|(key, _, _, value)| (key.clone(), *value)).collect();
    assert_eq!(
        changes, expected,
        "every change once, in order, none from before the watch"
    );
    assert!(
        seen.windows(2).all(|pair| pair[0].1 < pair[1].1),
        "revisions strictly increase"
    );
    let put_revisions: Vec<u64> = seen
        .iter()
        .filter(|(_, _, operation, _)| *operation == KvOperation::Put)
        .map(|(_, revision, _, _)| *revision)
        .collect();
    assert_eq!(put_revisions, revisions, "each put under the revision it was stored as");
    assert_eq!(seen[30].2, KvOperation::Delete);
    assert_eq!(seen.last().unwrap().2, KvOperation::Purge);

    // The history watch started with the current values, then saw the same changes.
    wait_until(Duration::from_secs(30), "every change (history watch)", || async {
        current.lock().unwrap().len() >= expected.len() + 2
    })
    .await;
    current_task.abort();
    let current = current.lock().unwrap().clone();
    let first: Vec<(&str, Option<u64>)> = current[..2]
        .iter()
        .map(|(key, _, _, value)| (key.as_str(), *value))
        .collect();
    assert_eq!(first, [("limits.a", Some(0)), ("limits.c", Some(0))]);
    assert_eq!(current[2..], seen[..]);

    wait_until(Duration::from_secs(30), "the changes of limits.c", || async {
        quiet.lock().unwrap().len() >= 30
    })
    .await;
    quiet_task.abort();
    let quiet = quiet.lock().unwrap().clone();
    assert_eq!(quiet[..], seen[31..61], "only the changes made after the watch began");

    // Resuming from a revision replays exactly the changes from there on.
    let from = seen[40].1;
    let (resumed, resumed_task) = collect(watcher.watch_from("limits.>", from).await.unwrap());
    wait_until(Duration::from_secs(10), "the changes from a revision", || async {
        resumed.lock().unwrap().len() == seen.len() - 40
    })
    .await;
    resumed_task.abort();
    assert_eq!(resumed.lock().unwrap()[..], seen[40..]);
}

/// A watched bucket created anew (here a memory bucket, gone with a server restart, then
/// declared again; or an operator's delete and create) numbers its revisions from 1 again: the
/// watch goes on with the new bucket's changes instead of waiting for its revisions to pass
/// the old ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_goes_on_when_its_bucket_is_created_anew() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let writer = client(&server).await;
    let kv: Kv<Job> = bucket(&writer, "scratchpad", StorageType::Memory).await;
    let watcher = client(&server).await.kv::<Job>("scratchpad").await.unwrap();
    let (seen, task) = collect(watcher.watch(">").await.unwrap());
    for id in 1..=5 {
        kv.put(&format!("old.{id}"), &Job { id }).await.unwrap();
    }
    wait_until(Duration::from_secs(10), "the first bucket's changes", || async {
        seen.lock().unwrap().len() == 5
    })
    .await;

    server.restart().await.expect("restart");
    // The memory bucket went with the server: declared again once the writer is back.
    wait_until(Duration::from_secs(20), "the bucket declared again", || async {
        KvBucketDef::new("scratchpad")
            .history(64)
            .storage(StorageType::Memory)
            .provision(&writer, Provision::CreateOrUpdate)
            .await
            .is_ok()
    })
    .await;
    for id in 1..=3 {
        kv.put(&format!("new.{id}"), &Job { id: 100 + id }).await.unwrap();
    }
    wait_until(Duration::from_secs(30), "the new bucket's changes", || async {
        seen.lock().unwrap().len() >= 8
    })
    .await;
    task.abort();
    let seen = seen.lock().unwrap().clone();
    let new: Vec<(String, u64, Option<u64>)> = seen[5..]
        .iter()
        .map(|(key, revision, _, value)| (key.clone(), *revision, *value))
        .collect();
    assert_eq!(
        new,
        [
            ("new.1".to_string(), 1, Some(101)),
            ("new.2".to_string(), 2, Some(102)),
            ("new.3".to_string(), 3, Some(103)),
        ],
        "the new bucket's changes, once each, from its first revision"
    );
}
