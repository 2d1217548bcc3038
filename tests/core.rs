//! Core NATS: request-reply services with the typed request client (and its timeout), and a
//! queue group splitting published messages between two instances.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::{Config, RequestError};
use natty_tests::{wait_until, Job};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Number {
    value: i64,
}

#[service(subject = "math.double")]
async fn double(n: Number) -> Result<Number, std::io::Error> {
    if n.value < 0 {
        return Err(std::io::Error::other(format!("{} is negative", n.value)));
    }
    Ok(Number { value: n.value * 2 })
}

#[service(subject = "math.slow")]
async fn slow(n: Number) -> Result<Number, std::io::Error> {
    tokio::time::sleep(Duration::from_secs(2)).await;
    Ok(n)
}

/// Replies with `n.value` numbers: past the server's `max_payload` (1 MiB) for large ones.
#[service(subject = "math.count")]
async fn count(n: Number) -> Result<Vec<Number>, std::io::Error> {
    Ok((0..n.value).map(|value| Number { value }).collect())
}

/// Fails with an error of `n.value` bytes.
#[service(subject = "math.rant")]
async fn rant(n: Number) -> Result<Number, std::io::Error> {
    Err(std::io::Error::other("x".repeat(n.value as usize)))
}

/// job id → the connection (instance) that handled it.
static HANDLED_BY: Mutex<BTreeMap<u64, Vec<u64>>> = Mutex::new(BTreeMap::new());

#[subscribe(subject = "work.>", queue = "workers")]
async fn worker(job: Job, envelope: Envelope) {
    let instance = envelope.client().nats().server_info().client_id;
    HANDLED_BY.lock().unwrap().entry(job.id).or_default().push(instance);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_reply_and_queue_groups() {
    let server = NatsServer::start().await.expect("nats-server");
    let first = RunningRuntime::registered(server.url());
    let second = RunningRuntime::registered(server.url());
    let config = Config::from_lookup(|_| None).unwrap();
    let client = Client::connect_with(&config, &server.url()).await.expect("connect");

    // The services are up once a request gets through.
    wait_until(Duration::from_secs(10), "the service to answer", || async {
        client
            .request::<_, Number>("math.double", &Number { value: 1 })
            .await
            .is_ok()
    })
    .await;
    let reply: Number = client
        .request("math.double", &Number { value: 21 })
        .await
        .expect("reply");
    assert_eq!(reply, Number { value: 42 });

    // The handler's error reaches the caller, typed.
    let error = client
        .request::<_, Number>("math.double", &Number { value: -1 })
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RequestError::Remote { message, .. } if message.contains("-1 is negative")),
        "{error}"
    );

    // A reply larger than the server takes, and an error of 2 MB: the requester is told at
    // once (well inside the request's 5 s timeout), not left to time out.
    let started = std::time::Instant::now();
    let error = client
        .request::<_, Vec<Number>>("math.count", &Number { value: 200_000 })
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RequestError::Remote { message, .. } if message.contains("cannot send the reply")),
        "{error}"
    );
    let error = client
        .request::<_, Number>("math.rant", &Number { value: 2_000_000 })
        .await
        .unwrap_err();
    assert!(
        matches!(&error, RequestError::Remote { message, .. } if message.starts_with("xxx") && message.len() <= 4096),
        "{}",
        &error.to_string()[..200]
    );
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    let small: Vec<Number> = client.request("math.count", &Number { value: 3 }).await.expect("reply");
    assert_eq!(small.len(), 3);

    // A slow service and a short timeout: a timeout error, not a hang.
    let error = client
        .request_with_timeout::<_, Number>("math.slow", &Number { value: 1 }, Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(matches!(error, RequestError::Timeout { .. }), "{error}");
    let error = client
        .request::<_, Number>("math.nobody", &Number { value: 1 })
        .await
        .unwrap_err();
    assert!(matches!(error, RequestError::NoResponders { .. }), "{error}");

    // The queue group: two instances, each message handled by exactly one of them.
    for id in 1..=200 {
        client
            .nats()
            .publish(format!("work.{id}"), serde_json::to_vec(&Job { id }).unwrap().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    wait_until(Duration::from_secs(10), "every message handled", || async {
        HANDLED_BY.lock().unwrap().len() == 200
    })
    .await;
    let handled = HANDLED_BY.lock().unwrap().clone();
    assert!(handled.values().all(|by| by.len() == 1), "a message was handled twice");
    let instances: std::collections::BTreeSet<u64> = handled.values().map(|by| by[0]).collect();
    assert_eq!(instances.len(), 2, "both members of the queue group took work");

    first.stop().await.expect("clean shutdown");
    second.stop().await.expect("clean shutdown");
}
