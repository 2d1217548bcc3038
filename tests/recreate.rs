//! A consumer whose server-side state disappears is recreated and resumes: deleted by an
//! operator, or lost with its memory stream when the server restarts. A consumer left idle
//! until its pull requests expire asks again.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

static HANDLED: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

#[stream(name = "volatile", subjects = ["volatile.>"], storage = "memory")]
struct Volatile;

#[consumer(stream = "volatile", durable = "survivor")]
async fn survive(job: Job) {
    HANDLED.lock().unwrap().insert(job.id);
}

static WOKEN: Mutex<BTreeSet<u64>> = Mutex::new(BTreeSet::new());

#[stream(name = "sleepy", subjects = ["sleepy.>"])]
struct Sleepy;

#[consumer(stream = "sleepy", durable = "sleeper")]
async fn sleeper(job: Job) {
    WOKEN.lock().unwrap().insert(job.id);
}

async fn publish(js: &async_nats::jetstream::Context, id: u64) {
    let payload: bytes::Bytes = serde_json::to_vec(&Job { id }).unwrap().into();
    // Retried: right after a restart the stream is being recreated by the runtime.
    wait_until(Duration::from_secs(30), "a publish to be acked", || {
        let payload = payload.clone();
        async move {
            match js.publish(format!("volatile.{id}"), payload).await {
                Ok(ack) => ack.await.is_ok(),
                Err(_) => false,
            }
        }
    })
    .await;
}

fn handled(id: u64) -> bool {
    HANDLED.lock().unwrap().contains(&id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_consumer_is_recreated_and_resumes() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::registered(server.url());

    let js = async_nats::jetstream::new(server.client().await);
    publish(&js, 1).await;
    wait_until(Duration::from_secs(10), "job 1", || async { handled(1) }).await;

    // An operator deletes the consumer.
    js.get_stream("volatile")
        .await
        .unwrap()
        .delete_consumer("survivor")
        .await
        .unwrap();
    publish(&js, 2).await;
    wait_until(
        Duration::from_secs(30),
        "job 2 after the consumer was deleted",
        || async { handled(2) },
    )
    .await;

    // The server restarts: a memory stream and its consumer are gone.
    server.restart().await.expect("restart");
    let js = async_nats::jetstream::new(server.client().await);
    wait_until(
        Duration::from_secs(30),
        "the runtime to recreate the stream",
        || async { js.get_stream("volatile").await.is_ok() },
    )
    .await;
    publish(&js, 3).await;
    wait_until(Duration::from_secs(30), "job 3 after the restart", || async {
        handled(3)
    })
    .await;

    running.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_asks_again_when_its_pull_requests_expire() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::spawn(
        natty_runtime::Runtime::builder()
            .url(server.url())
            .handlers(["sleeper"])
            .build()
            .unwrap(),
    );
    let js = async_nats::jetstream::new(server.client().await);
    let send = |id: u64| {
        let js = js.clone();
        async move {
            let payload: bytes::Bytes = serde_json::to_vec(&Job { id }).unwrap().into();
            js.publish(format!("sleepy.{id}"), payload)
                .await
                .unwrap()
                .await
                .unwrap();
        }
    };
    natty_tests::wait_for_consumer(&js, "sleepy", "sleeper", Duration::from_secs(30)).await;
    send(1).await;
    wait_until(Duration::from_secs(10), "job 1", || async {
        WOKEN.lock().unwrap().contains(&1)
    })
    .await;
    // The fault: idle past the 30 s expiry of natty's pull requests. The server ends them
    // with a 408 that returns every unused credit; a consumer that does not ask again then
    // waits forever (no request, so no heartbeat to miss either).
    tokio::time::sleep(Duration::from_secs(33)).await;
    send(2).await;
    wait_until(Duration::from_secs(10), "job 2 after the requests expired", || async {
        WOKEN.lock().unwrap().contains(&2)
    })
    .await;
    running.stop().await.expect("clean shutdown");
}
