//! Confirmed acks and exactly-once handling: a `#[consumer(ack = "confirmed")]` on a 3-node
//! cluster whose consumer leader is made to step down again and again handles every message
//! once (a lost fire-and-forget ack would bring its message back after `ack_wait`), and so
//! does a confirmed batch handler while the stream's and the consumer's leaders both step down;
//! `ctx.ack()` reports a refused ack, and settles its message whatever the handler does next;
//! the exactly-once recipe (an effect keyed by `ctx.idempotency_key()`, then a confirmed ack)
//! holds across SIGKILLs between the effect and the ack.
//!
//! Streams are declared per test (not with `#[stream]`): every registered stream is provisioned
//! by every runtime in this binary, and the cluster's stream has three replicas.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsCluster, NatsServer, RunningRuntime};
use natty_runtime::{AckError, Runtime, StreamDef};
use natty_tests::{collect_lines, collect_stderr, spawn_service, wait_until, Elections, Job};

const WAIT: Duration = Duration::from_secs(90);

/// A runtime of `handler` alone on `server`, declaring `stream`, once its consumer `durable`
/// is there to publish to.
async fn start(
    server: &NatsServer,
    js: &async_nats::jetstream::Context,
    handler: &'static str,
    stream: StreamDef,
    durable: &str,
) -> RunningRuntime {
    let name = stream.name();
    let runtime = Runtime::builder()
        .url(server.url())
        .handlers([handler])
        .stream(stream)
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    natty_tests::wait_for_consumer(js, name, durable, WAIT).await;
    running
}

/// Clusters started side by side fight over two cores: one cluster test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Once jobs `1..=jobs` were all handled (`seen`: job id → times handled) and consumer
/// `durable` of `stream` has held nothing unacked for two `ack_wait`s (3 s: a lost ack brings
/// its message back after that), the jobs handled more than once, with how many times.
async fn handled_twice_once_settled(
    js: &async_nats::jetstream::Context,
    stream: &str,
    durable: &str,
    seen: &Mutex<BTreeMap<u64, u32>>,
    jobs: u64,
) -> Vec<(u64, u32)> {
    wait_until(WAIT, "every job handled", || async {
        seen.lock().unwrap().len() as u64 == jobs
    })
    .await;
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(6);
    wait_until(WAIT, "nothing unacked, for two ack_waits", || async {
        // `false` while the cluster cannot say (an election settling).
        let unacked = match js.get_stream(stream).await {
            Ok(stream) => stream.consumer_info(durable).await.map(|info| info.num_ack_pending),
            Err(_) => return false,
        };
        unacked.is_ok_and(|unacked| unacked == 0) && tokio::time::Instant::now() >= quiet_until
    })
    .await;
    let seen = seen.lock().unwrap();
    seen.iter()
        .filter(|(_, &times)| times > 1)
        .map(|(&id, &times)| (id, times))
        .collect()
}

/// job id → how many times the confirmed handler ran for it.
static CONFIRMED: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

#[consumer(
    stream = "acks",
    durable = "confirmed",
    ack = "confirmed",
    replicas = 3,
    ack_wait = "3s",
    max_ack_pending = 64
)]
async fn confirmed(job: Job) {
    *CONFIRMED.lock().unwrap().entry(job.id).or_default() += 1;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_acks_survive_consumer_leader_elections() {
    const JOBS: u64 = 1000;
    let _serial = SERIAL.lock().await;
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let runtime = Runtime::builder()
        .url(cluster.urls().join(","))
        .handlers(["confirmed"])
        .stream(StreamDef::new("acks", &["acks.>"]).replicas(3))
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    let nats = cluster.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    natty_tests::wait_for_consumer(&js, "acks", "confirmed", WAIT).await;

    // Published at a steady pace while the consumer's leader steps down ten times, so acks are
    // in flight at every election.
    let publisher = tokio::spawn({
        let js = js.clone();
        async move {
            for id in 1..=JOBS {
                let payload = serde_json::to_vec(&Job { id }).unwrap();
                js.publish(format!("acks.{id}"), payload.into())
                    .await
                    .expect("publish")
                    .await
                    .expect("publish ack");
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }
    });
    let elections = Elections::of_consumer(nats.clone(), "acks", "confirmed", Duration::from_millis(700));
    wait_until(WAIT, "ten consumer leader elections", || async {
        elections.won() >= 10
    })
    .await;
    elections.stop().await;
    publisher.await.unwrap();
    let twice = handled_twice_once_settled(&js, "acks", "confirmed", &CONFIRMED, JOBS).await;
    assert!(twice.is_empty(), "jobs handled more than once (job, times): {twice:?}");
    running.stop().await.unwrap();
}

/// job id → how many times the confirmed batch handler saw it.
static BULK: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

#[consumer(
    stream = "bulk",
    durable = "bulk",
    ack = "confirmed",
    replicas = 3,
    batch = 20,
    batch_wait = "50ms",
    ack_wait = "3s",
    max_ack_pending = 200
)]
async fn bulk(jobs: Vec<Job>) {
    let mut seen = BULK.lock().unwrap();
    for job in jobs {
        *seen.entry(job.id).or_default() += 1;
    }
}

/// A batch handler with confirmed acks on a replicated stream, while the stream's leader and
/// the consumer's leader are each made to step down again and again and messages keep coming
/// (published through natty, which rides through the stream's elections): every message is in
/// exactly one handled batch, and nothing is left unacked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_batches_survive_stream_and_consumer_leader_elections() {
    const JOBS: u64 = 1000;
    const ELECTIONS: u32 = 5;
    let _serial = SERIAL.lock().await;
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let runtime = Runtime::builder()
        .url(cluster.urls().join(","))
        .handlers(["bulk"])
        .stream(StreamDef::new("bulk", &["bulk.>"]).replicas(3))
        .build()
        .unwrap();
    let running = RunningRuntime::spawn(runtime);
    let nats = cluster.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    natty_tests::wait_for_consumer(&js, "bulk", "bulk", WAIT).await;

    let publisher = tokio::spawn({
        let client = natty_runtime::Client::new(nats.clone());
        async move {
            for id in 1..=JOBS {
                client
                    .publish(format!("bulk.{id}"), &Job { id })
                    .await
                    .expect("publish");
                tokio::time::sleep(Duration::from_millis(8)).await;
            }
        }
    });
    let stream_elections = Elections::start(nats.clone(), "bulk", Duration::from_millis(900));
    let consumer_elections = Elections::of_consumer(nats.clone(), "bulk", "bulk", Duration::from_millis(700));
    wait_until(WAIT, "elections of both leaders", || async {
        stream_elections.won() >= ELECTIONS && consumer_elections.won() >= ELECTIONS
    })
    .await;
    let (stream_won, consumer_won) = (stream_elections.stop().await, consumer_elections.stop().await);
    publisher.await.unwrap();
    let twice = handled_twice_once_settled(&js, "bulk", "bulk", &BULK, JOBS).await;
    assert!(
        twice.is_empty(),
        "jobs handled more than once through {stream_won} stream and {consumer_won} consumer elections (job, times): {twice:?}"
    );
    eprintln!(
        "{JOBS} jobs in batches, each once, through {stream_won} stream and {consumer_won} consumer leader elections"
    );
    running.stop().await.unwrap();
}

/// Set by the test once the stream is gone; the handler waits for it.
static STREAM_DELETED: AtomicBool = AtomicBool::new(false);
static REFUSED: Mutex<Vec<Result<(), AckError>>> = Mutex::new(Vec::new());
static REFUSED_STARTED: AtomicBool = AtomicBool::new(false);

#[consumer(stream = "refusals", durable = "refused", ack_wait = "20s")]
async fn refused(_job: Job, ctx: Context) {
    REFUSED_STARTED.store(true, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !STREAM_DELETED.load(Ordering::SeqCst) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let acked = ctx.ack().await;
    REFUSED.lock().unwrap().push(acked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctx_ack_reports_a_refused_ack() {
    let server = NatsServer::start().await.expect("nats-server");
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    // Created here and not declared, so natty cannot create it again once it is deleted.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "refusals".into(),
        subjects: vec!["refusals.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let running = RunningRuntime::spawn(
        Runtime::builder()
            .url(server.url())
            .handlers(["refused"])
            .build()
            .unwrap(),
    );
    natty_tests::wait_for_consumer(&js, "refusals", "refused", WAIT).await;
    let payload = serde_json::to_vec(&Job { id: 1 }).unwrap();
    js.publish("refusals.1", payload.into()).await.unwrap().await.unwrap();
    wait_until(WAIT, "the handler started", || async {
        REFUSED_STARTED.load(Ordering::SeqCst)
    })
    .await;
    js.delete_stream("refusals").await.unwrap();
    STREAM_DELETED.store(true, Ordering::SeqCst);
    // Refused at once, not after ack_wait (20 s) of retries.
    let asked = tokio::time::Instant::now();
    wait_until(Duration::from_secs(15), "the handler's ack answered", || async {
        !REFUSED.lock().unwrap().is_empty()
    })
    .await;
    assert!(asked.elapsed() < Duration::from_secs(15));
    let answer = REFUSED.lock().unwrap()[0].clone();
    match &answer {
        Err(
            error @ AckError::Refused {
                stream,
                consumer,
                sequence,
                ..
            },
        ) => {
            assert_eq!(
                (stream.as_str(), consumer.as_str(), *sequence),
                ("refusals", "refused", 1)
            );
            let text = error.to_string();
            assert!(text.contains("refused") && text.contains("no longer exists"), "{text}");
        }
        other => panic!("expected a refused ack, got {other:?}"),
    }
    running.stop().await.unwrap();
}

static SETTLED_FIRST: Mutex<Vec<(u64, bool)>> = Mutex::new(Vec::new());

#[consumer(stream = "early", durable = "early", ack_wait = "1s", backoff = ["10ms"])]
async fn acks_then_fails(job: Job, ctx: Context) -> Result<(), std::io::Error> {
    let acked = ctx.ack().await.is_ok();
    SETTLED_FIRST.lock().unwrap().push((job.id, acked));
    Err(std::io::Error::other("failed after acking"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_acked_by_its_handler_is_not_retried_when_the_handler_then_fails() {
    let server = NatsServer::start().await.expect("nats-server");
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let running = start(
        &server,
        &js,
        "acks_then_fails",
        StreamDef::new("early", &["early.>"]),
        "early",
    )
    .await;
    for id in 1..=3 {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish(format!("early.{id}"), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(WAIT, "three jobs handled", || async {
        SETTLED_FIRST.lock().unwrap().len() >= 3
    })
    .await;
    // A nak (the handler's error) or a lost ack would bring them back within a second (the
    // backoff, or ack_wait): watch three ack_waits.
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(3);
    wait_until(WAIT, "nothing unacked, for three ack_waits", || async {
        let stream = js.get_stream("early").await.unwrap();
        let info = stream.consumer_info("early").await.unwrap();
        info.num_ack_pending == 0 && tokio::time::Instant::now() >= quiet_until
    })
    .await;
    let settled = SETTLED_FIRST.lock().unwrap().clone();
    assert_eq!(
        settled,
        [(1, true), (2, true), (3, true)],
        "each handled once, its ack confirmed"
    );
    running.stop().await.unwrap();
}

const ONCE: &str = env!("CARGO_BIN_EXE_natty-test-once");

/// What a run of the `once` worker printed, by word: `attempt`, `effect`, `again`, `acked`.
fn words(lines: &[String]) -> BTreeMap<String, Vec<u64>> {
    let mut words: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in lines {
        if let Some((word, id)) = line.split_once(' ') {
            if let Ok(id) = id.parse() {
                words.entry(word.to_string()).or_default().push(id);
            }
        }
    }
    words
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_holds_across_sigkills_between_the_effect_and_the_ack() {
    const JOBS: u64 = 20;
    /// Three workers in turn, each dying right after its third effect, before acking it.
    const WORKERS: usize = 3;
    const DIE_AFTER: &str = "3";
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let nats = server.client().await;
    let mut all: Vec<String> = Vec::new();
    let mut died_at = Vec::new();
    let mut published = false;
    for _ in 0..WORKERS {
        let mut worker = spawn_service(Path::new(ONCE), Some(&url), &[("ONCE_DIE_AFTER", DIE_AFTER)]);
        let (out, err) = (collect_lines(&mut worker), collect_stderr(&mut worker));
        if !published {
            // The worker declares the stream and the bucket: publish once it is up.
            let js = async_nats::jetstream::new(nats.clone());
            natty_tests::wait_for_consumer(&js, "payments", "charger", WAIT).await;
            for id in 1..=JOBS {
                let payload = serde_json::to_vec(&Job { id }).unwrap();
                js.publish(format!("payments.{id}"), payload.into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            published = true;
        }
        let status = tokio::time::timeout(WAIT, worker.wait()).await.unwrap_or_else(|_| {
            panic!(
                "the worker did not die after its third effect: {:?} {:?}",
                out.lock().unwrap(),
                err.lock().unwrap()
            )
        });
        assert!(!status.unwrap().success(), "killed, not exited");
        // Its last lines may still be in the pipe when it is reaped.
        wait_until(Duration::from_secs(5), "the worker's third effect read", || async {
            words(&out.lock().unwrap())
                .get("effect")
                .is_some_and(|ids| ids.len() >= 3)
        })
        .await;
        let lines = out.lock().unwrap().clone();
        let effects = words(&lines).remove("effect").unwrap_or_default();
        assert_eq!(effects.len(), 3, "died right after its third effect: {lines:?}");
        died_at.push(effects[2]);
        all.extend(lines);
    }
    // A last run, left alone, finishes the rest.
    let mut worker = spawn_service(Path::new(ONCE), Some(&url), &[]);
    let out = collect_lines(&mut worker);
    let _err = collect_stderr(&mut worker);
    wait_until(WAIT, "every job acked", || async {
        let mut seen = words(&all).remove("acked").unwrap_or_default();
        seen.extend(words(&out.lock().unwrap()).remove("acked").unwrap_or_default());
        (1..=JOBS).all(|id| seen.contains(&id))
    })
    .await;
    natty_tests::send_signal(worker.id().unwrap(), "TERM");
    worker.wait().await.unwrap();
    all.extend(out.lock().unwrap().clone());

    let words = words(&all);
    let mut effects = words.get("effect").cloned().unwrap_or_default();
    effects.sort_unstable();
    assert_eq!(
        effects,
        (1..=JOBS).collect::<Vec<_>>(),
        "each job's effect exactly once"
    );
    let again = words.get("again").cloned().unwrap_or_default();
    for die in died_at {
        assert!(
            again.contains(&die),
            "job {die} came again after the kill and found its effect made: {again:?}"
        );
    }
    // The bucket agrees: one entry per job.
    let js = async_nats::jetstream::new(nats);
    let charges = js.get_key_value("charges").await.unwrap();
    let mut keys = futures_util::StreamExt::collect::<Vec<_>>(charges.keys().await.unwrap()).await;
    keys.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(keys.len() as u64, JOBS, "{keys:?}");
}

static AGAIN: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

#[consumer(stream = "again", durable = "again", ack = "confirmed", ack_wait = "10s")]
async fn again(job: Job, ctx: Context) {
    AGAIN.lock().unwrap().push((job.id, ctx.delivery_count()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_made_anew_delivers_a_confirmed_sequence_again_and_it_is_handled() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(server.client().await);
    let running = start(&server, &js, "again", StreamDef::new("again", &["again.>"]), "again").await;
    let payload = serde_json::to_vec(&Job { id: 1 }).unwrap();
    js.publish("again.1", payload.into()).await.unwrap().await.unwrap();
    wait_until(WAIT, "job 1 handled and its ack confirmed", || async {
        let stream = js.get_stream("again").await.unwrap();
        !AGAIN.lock().unwrap().is_empty() && stream.consumer_info("again").await.unwrap().num_ack_pending == 0
    })
    .await;
    // Deleted and made anew (natty binds it again): the new consumer delivers sequence 1 as its
    // first delivery. It is a new message to this consumer, not a late copy of the acked one:
    // handled at once, not dropped until the confirmation is forgotten (2 × ack_wait = 20 s).
    js.get_stream("again")
        .await
        .unwrap()
        .delete_consumer("again")
        .await
        .unwrap();
    wait_until(
        Duration::from_secs(15),
        "job 1 handled again by the new consumer",
        || async { AGAIN.lock().unwrap().len() >= 2 },
    )
    .await;
    assert_eq!(AGAIN.lock().unwrap()[1], (1, 1));
    running.stop().await.unwrap();
}

/// job id → times the handler started.
static SPAWNED_ACK: Mutex<BTreeMap<u64, u32>> = Mutex::new(BTreeMap::new());

#[consumer(stream = "spawned", durable = "spawned", order_by = "subject", backoff = ["10ms"], ack_wait = "2s")]
async fn acks_from_a_task(job: Job, ctx: Context) -> Result<(), std::io::Error> {
    *SPAWNED_ACK.lock().unwrap().entry(job.id).or_default() += 1;
    // Acked from a task of its own, then the handler fails: the message is settled all the
    // same, so the ordered consumer does not run it again in place.
    let acked = tokio::spawn(async move { ctx.ack().await }).await.expect("the task");
    assert!(acked.is_ok(), "{acked:?}");
    Err(std::io::Error::other("failed after acking"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_from_a_spawned_task_settles_the_message_for_an_ordered_consumer() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(server.client().await);
    let running = start(
        &server,
        &js,
        "acks_from_a_task",
        StreamDef::new("spawned", &["spawned.>"]),
        "spawned",
    )
    .await;
    for id in 1..=3 {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish(format!("spawned.{id}"), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(WAIT, "three jobs handled", || async {
        SPAWNED_ACK.lock().unwrap().len() == 3
    })
    .await;
    // A retry in place would come within the 10 ms backoff; a lost ack after ack_wait (2 s).
    let quiet_until = tokio::time::Instant::now() + Duration::from_secs(3);
    wait_until(WAIT, "nothing unacked, for an ack_wait and more", || async {
        let stream = js.get_stream("spawned").await.unwrap();
        let info = stream.consumer_info("spawned").await.unwrap();
        info.num_ack_pending == 0 && tokio::time::Instant::now() >= quiet_until
    })
    .await;
    let runs = SPAWNED_ACK.lock().unwrap().clone();
    assert!(runs.values().all(|&times| times == 1), "each handled once: {runs:?}");
    running.stop().await.unwrap();
}

static BATCHED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[consumer(
    stream = "batched",
    durable = "batched",
    ack = "confirmed",
    batch = 10,
    batch_wait = "50ms"
)]
async fn batched(jobs: Vec<Job>) {
    BATCHED.lock().unwrap().extend(jobs.iter().map(|job| job.id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_handlers_acks_are_confirmed_together() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(server.client().await);
    let running = start(
        &server,
        &js,
        "batched",
        StreamDef::new("batched", &["batched.>"]),
        "batched",
    )
    .await;
    for id in 1..=25 {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish(format!("batched.{id}"), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    wait_until(WAIT, "every job handled and acked", || async {
        let stream = js.get_stream("batched").await.unwrap();
        let info = stream.consumer_info("batched").await.unwrap();
        BATCHED.lock().unwrap().len() >= 25 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence == 25
    })
    .await;
    let mut handled = BATCHED.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, (1..=25).collect::<Vec<_>>(), "each once");
    running.stop().await.unwrap();
}
