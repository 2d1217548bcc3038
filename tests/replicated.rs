//! Replicated declarations on a 3-node cluster: streams, consumers and buckets declared with
//! replicas and a placement are created that way; a placement no server satisfies is a startup
//! error naming the stream; startup waits for a consumed stream to have a leader, and fails
//! clearly when it never gets one; KV writes, and KV and counter reads, ride through elections.
//!
//! Streams are declared by hand (not with `#[stream]`): every registered stream is provisioned by
//! every runtime in this binary, and some of these must fail.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsCluster, RunningRuntime};
use natty_runtime::{Error, KvBucketDef, Placement, Runtime, StreamDef};
use natty_tests::{wait_until, Job};

const WAIT: Duration = Duration::from_secs(60);
/// Lame duck mode, on Linux.
const SIGUSR2: i32 = 12;

/// Clusters on two cores fight over them: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static PLACED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());
static PATIENT: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

#[consumer(stream = "placed", durable = "placed-worker", replicas = 3, ack_wait = "2s")]
async fn placed_worker(job: Job) {
    PLACED.lock().unwrap().insert(job.id);
}

#[consumer(stream = "leaderless", durable = "patient", ack_wait = "2s")]
async fn patient(job: Job) {
    PATIENT.lock().unwrap().insert(job.id);
}

async fn publish(js: &async_nats::jetstream::Context, subject: &str, id: u64) {
    let payload: bytes::Bytes = serde_json::to_vec(&Job { id }).unwrap().into();
    js.publish(subject.to_string(), payload)
        .await
        .expect("publish")
        .await
        .expect("publish ack");
}

/// A runtime with the `placed` worker reading the three-replica stream `placed`, placed on
/// servers with `tags`.
fn placed(cluster: &NatsCluster, tags: &'static [&'static str]) -> natty_runtime::RuntimeBuilder {
    Runtime::builder()
        .url(cluster.urls().join(","))
        .handlers(["placed_worker"])
        .stream(
            StreamDef::new("placed", &["placed.>"])
                .replicas(3)
                .placement(Placement::new().tags(tags)),
        )
}

fn tags(placement: Option<&async_nats::jetstream::stream::Placement>) -> Vec<String> {
    placement.map(|p| p.tags.clone()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_streams_consumers_and_buckets_are_placed_as_declared() {
    let _serial = SERIAL.lock().await;
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let runtime = placed(&cluster, &["natty-test"])
        .kv_bucket(
            KvBucketDef::new("placed-kv")
                .replicas(3)
                .placement(Placement::new().cluster("natty-test").tags(&["natty-test"])),
        )
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    let js = async_nats::jetstream::new(cluster.client().await);
    natty_tests::wait_for_consumer(&js, "placed", "placed-worker", WAIT).await;
    publish(&js, "placed.1", 1).await;
    wait_until(WAIT, "job 1 handled", || async { PLACED.lock().unwrap().contains(&1) }).await;

    let mut stream = js.get_stream("placed").await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(tags(info.config.placement.as_ref()), ["natty-test"]);
    let peers = info.cluster.expect("cluster info").replicas;
    assert_eq!(peers.len(), 2, "a leader and two followers: {peers:?}");
    let consumer = stream.consumer_info("placed-worker").await.unwrap();
    assert_eq!(consumer.config.num_replicas, 3, "the consumer's state is replicated");
    let kv = js.get_stream("KV_placed-kv").await.unwrap().cached_info().clone();
    assert_eq!(kv.config.num_replicas, 3);
    let placement = kv.config.placement.expect("the bucket's placement");
    assert_eq!(placement.cluster.as_deref(), Some("natty-test"));
    assert_eq!(placement.tags, ["natty-test"]);
    running.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_placement_no_server_satisfies_is_a_startup_error_naming_the_stream() {
    let _serial = SERIAL.lock().await;
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let runtime = placed(&cluster, &["gpu"]).build().unwrap();
    let error = tokio::time::timeout(WAIT, runtime.run_until(std::future::pending()))
        .await
        .expect("startup ends")
        .expect_err("no server has the tag `gpu`");
    let text = error.to_string();
    assert!(
        matches!(error, Error::Stream { ref stream, .. } if stream == "placed"),
        "{text}"
    );
    assert!(text.contains("placed") && text.contains("creating it"), "{text}");
    // The server's reason is passed on, as the error's source: what `main` prints after it.
    let shown = format!("{error:?}");
    assert!(
        shown.starts_with(&text) && shown.to_lowercase().contains("peers"),
        "{shown}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_waits_for_a_stream_leader_and_fails_clearly_when_none_comes() {
    let _serial = SERIAL.lock().await;
    let mut cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let js = async_nats::jetstream::new(cluster.client().await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "leaderless".into(),
        subjects: vec!["leaderless.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .unwrap()
    // Created here, as an operator would: startup runs verify-only, which needs no quorum for
    // anything but the stream itself.
    .create_consumer(async_nats::jetstream::consumer::pull::Config {
        durable_name: Some("patient".into()),
        ack_wait: Duration::from_secs(2),
        ..Default::default()
    })
    .await
    .unwrap();
    publish(&js, "leaderless.1", 1).await;
    // Two of three servers down: no quorum, so no leader for the stream.
    cluster.node_mut(1).kill().await;
    cluster.node_mut(2).kill().await;
    // Until the survivor notices it lost its quorum, it may still call itself the stream's
    // leader and answer for it: a runtime started then binds and runs (as it should). The
    // subject of this test starts once the survivor has stepped down.
    let survivor = async_nats::jetstream::new(cluster.node(0).client().await);
    wait_until(WAIT, "the survivor to report no leader for the stream", || async {
        match survivor.get_stream("leaderless").await {
            Ok(stream) => stream
                .cached_info()
                .cluster
                .as_ref()
                .is_some_and(|cluster| cluster.leader.as_deref().unwrap_or_default().is_empty()),
            Err(_) => true,
        }
    })
    .await;
    let builder = || {
        Runtime::builder()
            .url(cluster.urls().join(","))
            .handlers(["patient"])
            .provision(natty_runtime::Provision::VerifyOnly)
    };

    let runtime = builder().stream_leader_timeout(Duration::from_secs(3)).build().unwrap();
    let error = tokio::time::timeout(WAIT, runtime.run_until(std::future::pending()))
        .await
        .expect("startup gives up after its leader timeout")
        .expect_err("no leader can be elected");
    assert!(
        matches!(error, Error::NoStreamLeader { ref stream, .. } if stream == "leaderless"),
        "{error}"
    );
    assert!(error.to_string().contains("NATTY_STREAM_LEADER_TIMEOUT"), "{error}");
    assert!(PATIENT.lock().unwrap().is_empty());

    // Started while the stream has no leader, a runtime waits, and consumes once a quorum is back.
    let running = RunningRuntime::spawn(builder().stream_leader_timeout(WAIT).build().unwrap());
    cluster.node_mut(1).restart().await.expect("node 2 back");
    wait_until(WAIT, "job 1 handled after the stream elected a leader", || async {
        PATIENT.lock().unwrap().contains(&1)
    })
    .await;
    running.stop().await.unwrap();
}

static STAYED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

#[consumer(stream = "drained", durable = "stayer", ack_wait = "2s")]
async fn stayer(job: Job) {
    STAYED.lock().unwrap().insert(job.id);
}

/// Whether node `monitor_port`'s `/connz` lists a client connection named `name`.
async fn connected_to(monitor_port: u16, name: &str) -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], monitor_port));
    match natty_tests::http_get(addr, "/connz").await {
        Ok((200, body)) => body.contains(&format!("\"name\": \"{name}\"")),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_entering_lame_duck_mode_is_left_at_once_and_nothing_is_lost() {
    let _serial = SERIAL.lock().await;
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    // Connected to n1 only: it learns the other nodes from the cluster's INFO.
    let runtime = Runtime::builder()
        .url(cluster.node(0).url())
        .name("lame-duck-test")
        .handlers(["stayer"])
        .stream(StreamDef::new("drained", &["drained.>"]).replicas(3))
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    let publisher = natty_runtime::Client::new(
        async_nats::ConnectOptions::new()
            .connect(&[cluster.node(1).url(), cluster.node(2).url()][..])
            .await
            .unwrap(),
    );
    natty_tests::wait_for_consumer(publisher.jetstream(), "drained", "stayer", WAIT).await;
    assert!(connected_to(cluster.node(0).monitor_port(), "lame-duck-test").await);
    for id in 0..50 {
        publisher.publish(&format!("drained.{id}"), &Job { id }).await.unwrap();
    }
    wait_until(WAIT, "the first jobs handled", || async {
        STAYED.lock().unwrap().len() == 50
    })
    .await;

    // SIGUSR2: lame duck mode. The server stops accepting connections and, after a 10 s grace
    // period, closes its clients over two minutes. natty leaves on the notice instead.
    cluster.node(0).signal(SIGUSR2);
    wait_until(
        Duration::from_secs(8),
        "the service reconnected to another node",
        || async {
            connected_to(cluster.node(1).monitor_port(), "lame-duck-test").await
                || connected_to(cluster.node(2).monitor_port(), "lame-duck-test").await
        },
    )
    .await;
    for id in 50..100 {
        publisher.publish(&format!("drained.{id}"), &Job { id }).await.unwrap();
    }
    wait_until(WAIT, "every job handled", || async {
        STAYED.lock().unwrap().len() == 100
    })
    .await;
    running.stop().await.unwrap();
}

/// The node leading `stream`, once it has one.
async fn leader_of(js: &async_nats::jetstream::Context, stream: &str) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(stream) = js.get_stream(stream).await {
            let leader = stream.cached_info().cluster.as_ref().and_then(|c| c.leader.clone());
            if let Some(leader) = leader.filter(|leader| !leader.is_empty()) {
                return leader;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no leader of {stream} within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the writer did: every value it wrote, and the failures.
#[derive(Default)]
struct Writes {
    /// Keys `k<i>` put with value `i`; every fifth then deleted.
    put: Vec<u64>,
    /// Keys `c<i>` created with value `i`.
    created: Vec<u64>,
    /// The last value and revision of `counter`, updated by compare-and-set each round.
    counter: Option<(u64, u64)>,
    /// Every write that failed, with what it was.
    failures: Vec<String>,
}

/// Writes to `kv` round after round (put, create, compare-and-set, and a delete every fifth
/// round) until `stop` is set, recording every outcome.
async fn write_until(
    kv: natty_runtime::Kv<u64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    rounds: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Writes {
    use std::sync::atomic::Ordering::Relaxed;
    let mut writes = Writes::default();
    let mut revision = match kv.put("counter", &0).await {
        Ok(revision) => revision,
        Err(error) => panic!("the first write failed: {error}"),
    };
    writes.counter = Some((0, revision));
    let mut i = 1;
    while !stop.load(Relaxed) {
        match kv.put(&format!("k{i}"), &i).await {
            Ok(_) => writes.put.push(i),
            Err(error) => writes.failures.push(format!("put k{i}: {error}")),
        }
        if i % 5 == 0 {
            if let Err(error) = kv.delete(&format!("k{i}")).await {
                writes.failures.push(format!("delete k{i}: {error}"));
            }
        }
        match kv.create(&format!("c{i}"), &i).await {
            Ok(_) => writes.created.push(i),
            Err(error) => writes.failures.push(format!("create c{i}: {error}")),
        }
        // One writer: any conflict here is a false one, from an attempt that landed.
        match kv.update("counter", &i, revision).await {
            Ok(new) => {
                revision = new;
                writes.counter = Some((i, new));
            }
            Err(error) => writes.failures.push(format!("update counter to {i}: {error}")),
        }
        rounds.store(i, Relaxed);
        i += 1;
    }
    writes
}

/// KV writes ride through an election of the bucket's stream leader as publishes do: a
/// writer keeps putting, creating, updating and deleting while the leader's node is killed,
/// and no write fails; every value is there afterwards, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_ride_through_the_death_of_the_buckets_leader() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
    use std::sync::Arc;
    let _serial = SERIAL.lock().await;
    let mut cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let client = natty_runtime::Client::new(cluster.client().await);
    KvBucketDef::new("ledger")
        .replicas(3)
        .provision(&client, natty_runtime::Provision::CreateOrUpdate)
        .await
        .expect("the replicated bucket");
    let kv = client.kv::<u64>("ledger").await.expect("the bucket");
    let leader = leader_of(client.jetstream(), "KV_ledger").await;

    let (stop, rounds) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let writer = tokio::spawn(write_until(kv.clone(), stop.clone(), rounds.clone()));
    wait_until(WAIT, "20 rounds before the kill", || async {
        rounds.load(Relaxed) >= 20
    })
    .await;
    let killed_at = rounds.load(Relaxed);
    cluster.node_named(&leader).expect("the leader's node").kill().await;
    // Writing goes on through a new leader.
    let new_leader = leader_of(client.jetstream(), "KV_ledger").await;
    assert_ne!(new_leader, leader, "the bucket has a new leader");
    wait_until(WAIT, "20 rounds after the kill", || async {
        rounds.load(Relaxed) >= killed_at + 20
    })
    .await;
    stop.store(true, Relaxed);
    let writes = writer.await.expect("the writer");
    assert!(
        writes.failures.is_empty(),
        "{} of the writes failed while the leader {leader} died:\n{}",
        writes.failures.len(),
        writes.failures.join("\n")
    );

    // Every value is there, once the replicas that answer reads have caught up.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let missing = missing(&kv, &writes).await;
        if missing.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "values not read back after {WAIT:?}:\n{}",
            missing.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(writes.put.len() as u64 >= killed_at + 20);
}

/// The values of `writes` that `kv` does not hold as written.
async fn missing(kv: &natty_runtime::Kv<u64>, writes: &Writes) -> Vec<String> {
    let mut missing = Vec::new();
    let read = |key: String| async move {
        kv.get(&key)
            .await
            .ok()
            .flatten()
            .map(|entry| (entry.value, entry.revision))
    };
    for &i in &writes.put {
        let value = read(format!("k{i}")).await.map(|(value, _)| value);
        let expected = (i % 5 != 0).then_some(i);
        if value != expected {
            missing.push(format!("k{i} = {value:?}, expected {expected:?}"));
        }
    }
    for &i in &writes.created {
        let value = read(format!("c{i}")).await.map(|(value, _)| value);
        if value != Some(i) {
            missing.push(format!("c{i} = {value:?}, expected {i}"));
        }
    }
    let counter = read("counter".into()).await;
    if counter != writes.counter {
        missing.push(format!("counter = {counter:?}, expected {:?}", writes.counter));
    }
    missing
}

/// Reads ride through elections as writes do: while the leaders of a replicated bucket's
/// stream and of a counter's stream are stepped down every 400 ms, a reader keeps reading a
/// KV value, listing the bucket's keys and reading the counter, and no read fails or answers
/// wrong. (A counter is read from its stream's leader: before, a read during an election ran
/// out of time and failed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_counter_reads_ride_through_leader_elections() {
    /// Reads go on until each stream saw this many elections, and at least this many rounds.
    const ELECTIONS: u32 = 4;
    const ROUNDS: u32 = 40;
    let _serial = SERIAL.lock().await;
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let nats = cluster.client().await;
    let client = natty_runtime::Client::new(nats.clone());
    KvBucketDef::new("shelf")
        .replicas(3)
        .provision(&client, natty_runtime::Provision::CreateOrUpdate)
        .await
        .expect("the replicated bucket");
    natty_tests::counter_stream(client.jetstream(), "tally", 3).await;
    let kv = client.kv::<u64>("shelf").await.expect("the bucket");
    kv.put("apples", &7).await.expect("a value");
    kv.put("pears", &3).await.expect("a value");
    let counter = client.counter("tally.hits");
    counter.add(42).await.expect("an addition");

    let kv_elections = natty_tests::Elections::start(nats.clone(), "KV_shelf", Duration::from_millis(400));
    let counter_elections = natty_tests::Elections::start(nats.clone(), "tally", Duration::from_millis(400));
    let mut failures = Vec::new();
    let mut rounds = 0;
    while rounds < ROUNDS || kv_elections.won() < ELECTIONS || counter_elections.won() < ELECTIONS {
        rounds += 1;
        match kv.get("apples").await {
            Ok(Some(entry)) if entry.value == 7 => {}
            other => failures.push(format!("round {rounds}, get: {:?}", other.map(|e| e.map(|e| e.value)))),
        }
        match kv.keys().await {
            Ok(keys) if keys == ["apples", "pears"] => {}
            other => failures.push(format!("round {rounds}, keys: {other:?}")),
        }
        match counter.get().await {
            Ok(42) => {}
            other => failures.push(format!("round {rounds}, counter: {other:?}")),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (kv_won, counter_won) = (kv_elections.stop().await, counter_elections.stop().await);
    assert!(
        failures.is_empty(),
        "{} of {rounds} rounds of reads failed through {kv_won} bucket and {counter_won} counter stream elections:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{rounds} rounds of reads through {kv_won} bucket and {counter_won} counter stream elections");
}
