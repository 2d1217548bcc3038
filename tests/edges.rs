//! The consumer's promises at the edges, through the runtime against a real nats-server: a
//! message natty holds is kept alive whatever it waits for (its key's turn, a handler slot, a
//! retry, a handler bound to a lease) and never handled twice; a key function that panics is
//! that message's failure; a dead letter is stored per consumer, and even for a message near
//! the server's `max_payload`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_nats::jetstream;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{read_all, wait_until, Job};

/// Runs only `handlers`: each test here has its own consumers and records.
fn only(server: &NatsServer, handlers: &[&str]) -> RunningRuntime {
    RunningRuntime::spawn(
        natty_runtime::Runtime::builder()
            .url(server.url())
            .handlers(handlers.iter().copied())
            .build()
            .expect("a runtime"),
    )
}

/// Waits until `durable` on `stream` has settled everything up to sequence `last`.
async fn settled(js: &jetstream::Context, stream: &str, durable: &str, last: u64, timeout: Duration) {
    let stream = js.get_stream(stream).await.expect("the stream");
    wait_until(timeout, &format!("`{durable}` to settle up to {last}"), || {
        let stream = stream.clone();
        async move {
            let info = stream.consumer_info(durable).await;
            info.is_ok_and(|info| info.ack_floor.stream_sequence == last && info.num_ack_pending == 0)
        }
    })
    .await;
}

/// Waits until the dead-letter stream holds `count` messages, and reads them.
async fn dead_letters(js: &jetstream::Context, count: u64) -> Vec<jetstream::Message> {
    wait_until(Duration::from_secs(20), &format!("{count} dead letters"), || async {
        match js.get_stream("natty-dead-letters").await {
            Ok(mut stream) => stream.info().await.is_ok_and(|info| info.state.messages == count),
            Err(_) => false,
        }
    })
    .await;
    read_all(js, "natty-dead-letters", count as usize).await
}

/// Publishes a `Job` per (subject, id), in order, each acked before the next.
async fn publish(js: &jetstream::Context, jobs: impl IntoIterator<Item = (String, u64)>) {
    for (subject, id) in jobs {
        js.publish(subject, serde_json::to_vec(&Job { id }).unwrap().into())
            .await
            .expect("publish")
            .await
            .expect("publish ack");
    }
}

// --- Ordered lanes: slow handlers, short ack_wait --------------------------------------------

/// (subject, sequence) of each handler start, in the order they started.
static LANES: Mutex<Vec<(String, u64)>> = Mutex::new(Vec::new());

#[stream(name = "lanes", subjects = ["lanes.>"])]
struct LanesStream;

#[consumer(
    stream = "lanes",
    durable = "slow-lanes",
    order_by = "subject",
    concurrency = 4,
    ack_wait = "2s"
)]
async fn slow_lanes(_job: Job, ctx: Context) {
    LANES
        .lock()
        .unwrap()
        .push((ctx.subject().to_string(), ctx.stream_sequence()));
    tokio::time::sleep(Duration::from_millis(1500)).await;
}

/// Messages waiting in their key's lane (and in the prefetch behind it) for far longer than
/// `ack_wait` are kept alive: every sequence is handled once, each key in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ordered_slow_handlers_handle_each_message_once_in_order() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "lanes".into(),
        subjects: vec!["lanes.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    // Six messages on each of two keys, interleaved: each lane takes 9 s, 4.5 ack_waits.
    publish(
        &js,
        (1..=12).map(|id| (format!("lanes.{}", if id % 2 == 0 { "even" } else { "odd" }), id)),
    )
    .await;
    let running = only(&server, &["slow_lanes"]);
    natty_tests::wait_for_consumer(&js, "lanes", "slow-lanes", Duration::from_secs(20)).await;
    settled(&js, "lanes", "slow-lanes", 12, Duration::from_secs(40)).await;
    running.stop().await.expect("clean shutdown");

    let started = LANES.lock().unwrap().clone();
    let mut sequences: Vec<u64> = started.iter().map(|(_, sequence)| *sequence).collect();
    sequences.sort_unstable();
    assert_eq!(
        sequences,
        (1..=12).collect::<Vec<_>>(),
        "each sequence handled once: {started:?}"
    );
    let mut by_key: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (subject, sequence) in &started {
        by_key.entry(subject).or_default().push(*sequence);
    }
    for (key, order) in by_key {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key} out of order: {order:?}");
    }
}

// --- A consumer bound to a lease keeps its own ack_wait --------------------------------------

static BOUND: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[stream(name = "bound", subjects = ["bound.>"])]
struct BoundStream;

#[consumer(
    stream = "bound",
    durable = "bound-slow",
    while_leading = "edges/bound",
    ack_wait = "1s",
    concurrency = 2
)]
async fn bound_slow(job: Job) {
    BOUND.lock().unwrap().push(job.id);
    tokio::time::sleep(Duration::from_millis(2500)).await;
}

/// A `while_leading` consumer's handlers run 2.5 ack_waits and are kept alive by its declared
/// `ack_wait`, not the server's 30 s default: none is redelivered while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_bound_to_a_lease_is_kept_alive_by_its_own_ack_wait() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let running = only(&server, &["bound_slow"]);
    natty_tests::wait_for_consumer(&js, "bound", "bound-slow", Duration::from_secs(20)).await;
    publish(&js, (1..=4).map(|id| ("bound.job".to_string(), id))).await;
    settled(&js, "bound", "bound-slow", 4, Duration::from_secs(30)).await;
    running.stop().await.expect("clean shutdown");
    let mut handled = BOUND.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, vec![1, 2, 3, 4], "each message handled once");
}

// --- A key function that panics --------------------------------------------------------------

static KEYED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

fn fragile_key(job: &Job) -> u64 {
    assert!(job.id != 3, "no key for job 3");
    job.id % 2
}

#[stream(name = "fragile", subjects = ["fragile.>"])]
struct FragileStream;

#[consumer(stream = "fragile", durable = "fragile", order_by = fragile_key, concurrency = 2)]
async fn fragile(job: Job) {
    KEYED.lock().unwrap().push(job.id);
}

/// A panic in an `order_by` key function dead-letters that message with the reason; the
/// consumer keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_function_that_panics_dead_letters_its_message() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let running = only(&server, &["fragile"]);
    natty_tests::wait_for_consumer(&js, "fragile", "fragile", Duration::from_secs(20)).await;
    publish(&js, (1..=6).map(|id| ("fragile.job".to_string(), id))).await;
    wait_until(Duration::from_secs(20), "the other messages handled", || async {
        KEYED.lock().unwrap().len() == 5
    })
    .await;
    let dead = dead_letters(&js, 1).await;
    running.stop().await.expect("clean shutdown");
    assert_eq!(dead.len(), 1, "one dead letter");
    let headers = dead[0].headers.as_ref().expect("headers");
    let reason = headers.get("Natty-Dead-Letter-Reason").expect("a reason").as_str();
    assert!(
        reason.contains("key function panicked") && reason.contains("no key for job 3"),
        "{reason}"
    );
    assert_eq!(headers.get("Natty-Original-Sequence").unwrap().as_str(), "3");
    let mut handled = KEYED.lock().unwrap().clone();
    handled.sort_unstable();
    assert_eq!(handled, vec![1, 2, 4, 5, 6]);
}

// --- One message dead-lettered by two consumers ----------------------------------------------

#[stream(name = "twice", subjects = ["twice.>"])]
struct TwiceStream;

#[consumer(stream = "twice", durable = "first")]
async fn refuse_first(_job: Job) -> Result<(), Reject> {
    Err(Reject::terminate("the first consumer refuses it"))
}

#[consumer(stream = "twice", durable = "second")]
async fn refuse_second(_job: Job) -> Result<(), Reject> {
    Err(Reject::terminate("the second consumer refuses it"))
}

/// Two consumers that dead-letter the same message store two dead letters, one per consumer,
/// within the dead-letter stream's duplicate window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_dead_lettering_one_message_store_two_dead_letters() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let running = only(&server, &["refuse_first", "refuse_second"]);
    natty_tests::wait_for_consumer(&js, "twice", "first", Duration::from_secs(20)).await;
    natty_tests::wait_for_consumer(&js, "twice", "second", Duration::from_secs(20)).await;
    publish(&js, [("twice.job".to_string(), 1)]).await;
    settled(&js, "twice", "first", 1, Duration::from_secs(20)).await;
    settled(&js, "twice", "second", 1, Duration::from_secs(20)).await;
    let dead = dead_letters(&js, 2).await;
    running.stop().await.expect("clean shutdown");
    let mut consumers: Vec<String> = dead
        .iter()
        .map(|m| {
            m.headers
                .as_ref()
                .unwrap()
                .get("Natty-Original-Consumer")
                .unwrap()
                .to_string()
        })
        .collect();
    consumers.sort();
    assert_eq!(consumers, ["first", "second"], "a dead letter per consumer");
}

// --- A poison message near max_payload -------------------------------------------------------

const MAX_PAYLOAD: usize = 4096;

static BIG_SEEN: AtomicBool = AtomicBool::new(false);

#[stream(name = "big", subjects = ["big.>"])]
struct BigStream;

#[consumer(stream = "big", durable = "big")]
async fn refuse_big(_payload: serde_json::Value) -> Result<(), Reject> {
    BIG_SEEN.store(true, Ordering::SeqCst);
    Err(Reject::terminate("too big to handle"))
}

/// A message whose dead-letter copy would exceed the server's `max_payload` (the copy adds
/// headers) is still dead-lettered: without its payload, saying so and where the original is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_near_max_payload_is_dead_lettered_without_its_payload() {
    let server = NatsServer::builder()
        .config(format!("max_payload: {MAX_PAYLOAD}\n"))
        .start()
        .await
        .expect("nats-server");
    let js = jetstream::new(server.client().await);
    let running = only(&server, &["refuse_big"]);
    natty_tests::wait_for_consumer(&js, "big", "big", Duration::from_secs(20)).await;
    // As large as the server takes with the few headers a publish carries.
    let filler = "x".repeat(MAX_PAYLOAD - 200);
    let body = serde_json::to_vec(&serde_json::json!({ "filler": filler })).unwrap();
    js.publish("big.one", body.into())
        .await
        .expect("publish")
        .await
        .expect("the original fits");
    let dead = dead_letters(&js, 1).await;
    let stream = js.get_stream("big").await.unwrap();
    let info = stream.consumer_info("big").await.unwrap();
    running.stop().await.expect("clean shutdown");
    assert!(BIG_SEEN.load(Ordering::SeqCst));
    assert_eq!(dead.len(), 1);
    let headers = dead[0].headers.as_ref().expect("headers");
    assert!(dead[0].payload.is_empty(), "the payload is left out");
    let omitted = headers
        .get("Natty-Payload-Omitted")
        .expect("says the payload was left out")
        .as_str();
    assert!(omitted.contains("max_payload"), "{omitted}");
    assert_eq!(headers.get("Natty-Original-Stream").unwrap().as_str(), "big");
    assert_eq!(headers.get("Natty-Original-Sequence").unwrap().as_str(), "1");
    assert_eq!(info.num_ack_pending, 0, "the original was terminated, not naked");
    assert_eq!(info.num_redelivered, 0);
}

// --- A message published with optimistic concurrency, dead-lettered ---------------------------

#[stream(name = "guarded", subjects = ["guarded.>"])]
struct GuardedStream;

#[consumer(stream = "guarded", durable = "guarded")]
async fn refuse_guarded(_job: Job) -> Result<(), Reject> {
    Err(Reject::terminate("refused"))
}

/// The dead-letter copy of a message published with expectations (`expected_stream`,
/// `expected_last_subject_sequence`) does not carry them to the dead-letter stream, which
/// would refuse the copy forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_published_with_an_expectation_is_dead_lettered() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let running = only(&server, &["refuse_guarded"]);
    natty_tests::wait_for_consumer(&js, "guarded", "guarded", Duration::from_secs(20)).await;
    let client = Client::new(server.client().await);
    client
        .publish_with(
            "guarded.one",
            &Job { id: 1 },
            natty_runtime::Publish::new()
                .expected_stream("guarded")
                .expected_last_subject_sequence(0),
        )
        .await
        .expect("published");
    let dead = dead_letters(&js, 1).await;
    running.stop().await.expect("clean shutdown");
    let headers = dead[0].headers.as_ref().expect("headers");
    assert_eq!(headers.get("Natty-Original-Stream").unwrap().as_str(), "guarded");
    assert!(headers.get("Nats-Expected-Last-Subject-Sequence").is_none());
    assert!(headers.get("Nats-Expected-Stream").is_none());
}

// --- Pull requests nobody answers ---------------------------------------------------------

static UNANSWERED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[stream(name = "unanswered", subjects = ["unanswered.>"])]
struct UnansweredStream;

#[consumer(stream = "unanswered", durable = "unanswered")]
async fn unanswered(job: Job) {
    UNANSWERED.lock().unwrap().push(job.id);
}

/// The messages the server has received from clients so far (`/varz` `in_msgs`).
async fn messages_in(monitor: u16) -> u64 {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], monitor));
    let (status, body) = natty_tests::http_get(addr, "/varz")
        .await
        .expect("an answer from /varz");
    assert_eq!(status, 200, "/varz: {body}");
    let varz: serde_json::Value = serde_json::from_str(&body).expect("/varz is JSON");
    varz["in_msgs"].as_u64().expect("in_msgs")
}

/// While the consumer exists but nothing answers its pull requests (a consumer between
/// leaders: the server answers each pull with 503 at once), natty asks again with a growing
/// pause, not in a tight loop; and it goes on consuming once pulls are answered again.
///
/// The leaderless consumer is made on one server by mapping the consumer's pull subject to a
/// subject nobody listens on: its info requests are answered, its pulls get "no responders".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_nobody_answers_are_repeated_with_a_pause() {
    let monitor = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let monitoring = format!("http: \"127.0.0.1:{monitor}\"\n");
    let unmapped = format!("{monitoring}mappings {{ \"unanswered.nothing\": \"nowhere.nothing\" }}\n");
    let mapped =
        format!("{monitoring}mappings {{ \"$JS.API.CONSUMER.MSG.NEXT.unanswered.unanswered\": \"nowhere.next\" }}\n");
    let server = NatsServer::builder().config(mapped).start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let running = only(&server, &["unanswered"]);
    natty_tests::wait_for_consumer(&js, "unanswered", "unanswered", Duration::from_secs(20)).await;

    // Every pull is answered "no responders" within a millisecond: a loop without a pause
    // sends hundreds a second (each with its consumer info requests).
    let before = messages_in(monitor).await;
    let window = Duration::from_secs(6);
    tokio::time::sleep(window).await;
    let sent = messages_in(monitor).await - before;
    assert!(
        sent < 40,
        "{sent} messages from clients in {window:?} while pulls go unanswered: no pause between them"
    );

    // Pulls are answered again (the mapping goes away on a config reload): consuming resumes
    // within the longest pause.
    std::fs::write(server.store_dir().join("server.conf"), unmapped).expect("the new config");
    server.signal(1); // SIGHUP: reload
    js.publish("unanswered.one", serde_json::to_vec(&Job { id: 1 }).unwrap().into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    wait_until(Duration::from_secs(20), "the message to be handled", || async {
        UNANSWERED.lock().unwrap().contains(&1)
    })
    .await;
    running.stop().await.expect("clean shutdown");
}

// --- Pull requests the server turns away (max_waiting) ---------------------------------------

static CROWDED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[stream(name = "crowded", subjects = ["crowded.>"])]
struct CrowdedStream;

#[consumer(stream = "crowded", durable = "crowded")]
async fn crowded(job: Job) {
    CROWDED.lock().unwrap().push(job.id);
}

/// A consumer that allows one waiting pull request, held by another client: nats-server
/// (2.15) drops natty's request without a word, since it asks for heartbeats (it answers
/// `409 Exceeded MaxWaiting` only to requests without). natty sees no heartbeat, asks again,
/// and consumes once the slot is free: no message is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_turned_away_by_max_waiting_is_asked_again() {
    use futures_util::StreamExt;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = jetstream::new(client.clone());
    js.create_stream(jetstream::stream::Config {
        name: "crowded".into(),
        subjects: vec!["crowded.>".into()],
        ..Default::default()
    })
    .await
    .unwrap()
    .create_consumer(jetstream::consumer::pull::Config {
        durable_name: Some("crowded".into()),
        max_waiting: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    // Another client holds the only waiting request, for one message, for 15 s.
    let inbox = client.new_inbox();
    let mut other = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            "$JS.API.CONSUMER.MSG.NEXT.crowded.crowded",
            inbox,
            r#"{"batch":1,"expires":15000000000}"#.into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    let running = only(&server, &["crowded"]);
    // The first message goes to the request that holds the slot; the rest to natty, once it
    // asks again after the slot frees.
    publish(&js, (1..=5).map(|id| ("crowded.job".to_owned(), id))).await;
    let taken = tokio::time::timeout(Duration::from_secs(5), other.next())
        .await
        .expect("the other request is answered")
        .expect("a message");
    assert_eq!(serde_json::from_slice::<Job>(&taken.payload).unwrap().id, 1);
    wait_until(Duration::from_secs(40), "natty to handle the others", || async {
        let handled = CROWDED.lock().unwrap();
        (2..=5).all(|id| handled.contains(&id))
    })
    .await;
    running.stop().await.expect("clean shutdown");
}
