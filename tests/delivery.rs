//! Delivery control: rejecting with a delay or for good, backoff between retries, dead
//! letters after `max_deliver`, and in-progress pings that keep a long handler's message.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{read_all, wait_until, Job};

/// (consumer, job id) → when each delivery reached the handler.
static SEEN: Mutex<BTreeMap<(&'static str, u64), Vec<Instant>>> = Mutex::new(BTreeMap::new());
static GOOD: AtomicUsize = AtomicUsize::new(0);

fn seen(consumer: &'static str, id: u64) -> usize {
    let mut seen = SEEN.lock().unwrap();
    let times = seen.entry((consumer, id)).or_default();
    times.push(Instant::now());
    times.len()
}

fn times(consumer: &'static str, id: u64) -> Vec<Instant> {
    SEEN.lock().unwrap().get(&(consumer, id)).cloned().unwrap_or_default()
}

#[stream(name = "poison", subjects = ["poison.>"])]
struct Poison;

#[consumer(stream = "poison", durable = "poison-worker", max_deliver = 3, backoff = ["50ms"], concurrency = 8)]
async fn poison_worker(job: Job) -> Result<(), std::io::Error> {
    seen("poison", job.id);
    if job.id == 0 {
        return Err(std::io::Error::other("job 0 is poison"));
    }
    GOOD.fetch_add(1, Ordering::SeqCst);
    Ok(())
}

#[stream(name = "delayed", subjects = ["delayed.>"])]
struct Delayed;

#[consumer(stream = "delayed", durable = "delayed-worker")]
async fn delayed_worker(job: Job, ctx: Context) -> Result<(), Reject> {
    seen("delayed", job.id);
    if ctx.delivery_count() == 1 {
        return Err(Reject::retry_after(Duration::from_secs(1)));
    }
    Ok(())
}

#[stream(name = "terminal", subjects = ["terminal.>"])]
struct Terminal;

#[consumer(stream = "terminal", durable = "terminal-worker", dead_letter = "rejected.terminal")]
async fn terminal_worker(job: Job) -> Result<(), Reject> {
    seen("terminal", job.id);
    Err(Reject::terminate("not for us"))
}

#[stream(name = "rejected", subjects = ["rejected.>"])]
struct Rejected;

#[stream(name = "slow", subjects = ["slow.>"])]
struct Slow;

#[consumer(stream = "slow", durable = "slow-worker", ack_wait = "1s")]
async fn slow_worker(job: Job) {
    seen("slow", job.id);
    tokio::time::sleep(Duration::from_secs(3)).await;
}

#[stream(name = "retrying", subjects = ["retrying.>"])]
struct Retrying;

#[consumer(stream = "retrying", durable = "backoff-worker", backoff = ["300ms", "900ms"])]
async fn backoff_worker(job: Job, ctx: Context) -> Result<(), std::io::Error> {
    seen("backoff", job.id);
    if ctx.delivery_count() <= 3 {
        return Err(std::io::Error::other("not yet"));
    }
    Ok(())
}

async fn publish(js: &jetstream::Context, subject: &str, id: u64) {
    let payload = serde_json::to_vec(&Job { id }).unwrap();
    js.publish(subject.to_string(), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

async fn consumer_info(js: &jetstream::Context, stream: &str, durable: &str) -> jetstream::consumer::Info {
    js.get_stream(stream)
        .await
        .unwrap()
        .consumer_info(durable)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejects_backoff_dead_letters_and_in_progress() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::registered(server.url());
    let js = jetstream::new(server.client().await);
    wait_until(Duration::from_secs(10), "provisioning", || async {
        js.get_stream("natty-dead-letters").await.is_ok() && js.get_stream("retrying").await.is_ok()
    })
    .await;

    // A poison message ahead of 1,000 good ones.
    publish(&js, "poison.0", 0).await;
    for id in 1..=1000 {
        publish(&js, &format!("poison.{id}"), id).await;
    }
    publish(&js, "delayed.1", 1).await;
    publish(&js, "terminal.1", 1).await;
    publish(&js, "slow.1", 1).await;
    publish(&js, "retrying.1", 1).await;

    // Poison: three attempts, then exactly one dead letter with its provenance; the rest flows.
    wait_until(
        Duration::from_secs(30),
        "the poison message dead-lettered and the good ones handled",
        || async {
            let info = consumer_info(&js, "poison", "poison-worker").await;
            GOOD.load(Ordering::SeqCst) == 1000 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence == 1001
        },
    )
    .await;
    assert_eq!(times("poison", 0).len(), 3, "max_deliver = 3 attempts");
    let dead = read_all(&js, "natty-dead-letters", 1).await;
    assert_eq!(dead.len(), 1, "dead-lettered exactly once");
    let letter = &dead[0];
    assert_eq!(letter.subject.as_str(), "natty.dead.poison.poison-worker");
    assert_eq!(serde_json::from_slice::<Job>(&letter.payload).unwrap(), Job { id: 0 });
    let header = |name: &str| {
        letter
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .map(|value| value.as_str().to_string())
            .unwrap_or_default()
    };
    assert_eq!(header("Natty-Original-Subject"), "poison.0");
    assert_eq!(header("Natty-Original-Stream"), "poison");
    assert_eq!(header("Natty-Original-Sequence"), "1");
    assert_eq!(header("Natty-Delivery-Count"), "3");
    assert!(
        header("Natty-Dead-Letter-Reason").contains("job 0 is poison"),
        "{}",
        header("Natty-Dead-Letter-Reason")
    );

    // Nak with a delay: not redelivered before it.
    wait_until(Duration::from_secs(10), "the delayed redelivery", || async {
        times("delayed", 1).len() == 2
    })
    .await;
    let delayed = times("delayed", 1);
    assert!(
        delayed[1] - delayed[0] >= Duration::from_secs(1),
        "redelivered after {:?}",
        delayed[1] - delayed[0]
    );

    // Terminate: delivered once, settled, and dead-lettered to the consumer's own subject.
    wait_until(Duration::from_secs(10), "the terminated message settled", || async {
        let info = consumer_info(&js, "terminal", "terminal-worker").await;
        info.ack_floor.stream_sequence == 1 && info.num_ack_pending == 0
    })
    .await;
    let rejected = read_all(&js, "rejected", 1).await;
    assert_eq!(rejected.len(), 1);
    let reason = rejected[0]
        .headers
        .as_ref()
        .and_then(|h| h.get("Natty-Dead-Letter-Reason"))
        .unwrap()
        .to_string();
    assert_eq!(reason, "not for us");
    assert_eq!(
        consumer_info(&js, "terminal", "terminal-worker")
            .await
            .delivered
            .consumer_sequence,
        1
    );
    assert_eq!(times("terminal", 1).len(), 1);

    // Backoff: 300 ms, then 900 ms, then 900 ms again (the last step repeats).
    wait_until(Duration::from_secs(15), "the fourth delivery", || async {
        times("backoff", 1).len() == 4
    })
    .await;
    let attempts = times("backoff", 1);
    for (gap, step) in attempts.windows(2).map(|w| w[1] - w[0]).zip([300u64, 900, 900]) {
        let step = Duration::from_millis(step);
        assert!(
            gap >= step && gap < step + Duration::from_secs(1),
            "gap {gap:?} for a {step:?} step"
        );
    }

    // A handler running 3 x ack_wait completes once: in-progress pings kept its message.
    wait_until(Duration::from_secs(15), "the slow handler acked", || async {
        consumer_info(&js, "slow", "slow-worker")
            .await
            .ack_floor
            .stream_sequence
            == 1
    })
    .await;
    let info = consumer_info(&js, "slow", "slow-worker").await;
    assert_eq!(info.delivered.consumer_sequence, 1, "no redelivery: {info:?}");
    assert_eq!(times("slow", 1).len(), 1);

    running.stop().await.expect("clean shutdown");
}
