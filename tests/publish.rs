//! Typed publish: from `main` through `connect`-style clients and from handlers through the
//! context, each awaiting the stream's ack; a subject no stream captures is a clear error.

use std::time::Duration;

use futures_util::StreamExt;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::{Config, PublishError};
use natty_tests::{wait_until, Job};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Receipt {
    job: u64,
    handled_by: String,
    sequence: u64,
}

#[stream(name = "work", subjects = ["work.>"])]
struct Work;

#[stream(name = "receipts", subjects = ["receipts.>"])]
struct Receipts;

#[consumer(stream = "work", durable = "relay")]
async fn relay(job: Job, ctx: Context) -> Result<(), PublishError> {
    let receipt = Receipt {
        job: job.id,
        handled_by: ctx.consumer().to_string(),
        sequence: ctx.stream_sequence(),
    };
    let ack = ctx.publish(format!("receipts.{}", job.id), &receipt).await?;
    assert_eq!(ack.stream, "receipts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_and_main_publish_typed_values_and_await_the_ack() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::registered(server.url());

    let config = Config::from_lookup(|_| None).unwrap();
    let client = Client::connect_with(&config, &server.url()).await.expect("connect");
    let js = client.jetstream().clone();
    wait_until(Duration::from_secs(10), "the streams to be provisioned", || async {
        js.get_stream("work").await.is_ok() && js.get_stream("receipts").await.is_ok()
    })
    .await;

    for id in 1..=3 {
        let ack = client
            .publish(format!("work.{id}"), &Job { id })
            .await
            .expect("publish");
        assert_eq!((ack.stream.as_str(), ack.sequence), ("work", id));
    }

    // The handler publishes each receipt after its job is acked by the stream: wait for all
    // three before reading (a fetch takes what is there, and returns).
    wait_until(Duration::from_secs(10), "three receipts", || async {
        js.get_stream("receipts")
            .await
            .is_ok_and(|stream| stream.cached_info().state.messages == 3)
    })
    .await;
    let receipts = js.get_stream("receipts").await.unwrap();
    let reader = receipts
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut messages = reader
        .fetch()
        .max_messages(3)
        .expires(Duration::from_secs(10))
        .messages()
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(message) = messages.next().await {
        let receipt: Receipt = serde_json::from_slice(&message.unwrap().payload).unwrap();
        seen.push(receipt);
    }
    seen.sort_by_key(|receipt| receipt.job);
    let expected: Vec<Receipt> = (1..=3)
        .map(|id| Receipt {
            job: id,
            handled_by: "relay".into(),
            sequence: id,
        })
        .collect();
    assert_eq!(seen, expected);

    // Windowed: many sends in flight, each ack awaited afterwards, in order of sequence.
    let mut pending = Vec::new();
    for id in 100..200 {
        pending.push(client.send("receipts.windowed", &Job { id }).await.expect("send"));
    }
    let mut sequences = Vec::new();
    for ack in pending {
        sequences.push(ack.await.expect("ack").sequence);
    }
    assert!(
        sequences.windows(2).all(|w| w[0] < w[1]),
        "acks in publish order: {sequences:?}"
    );
    assert_eq!(sequences.len(), 100);

    // No stream captures this subject: the publish fails, naming it, instead of vanishing.
    let error = client.publish("nowhere.1", &Job { id: 9 }).await.unwrap_err();
    assert!(matches!(error, PublishError::NoStream { .. }), "{error}");
    assert!(error.to_string().contains("nowhere.1"), "{error}");

    running.stop().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_stores_once_and_racing_writers_get_a_typed_conflict() {
    use natty_runtime::Publish;
    let server = NatsServer::start().await.expect("nats-server");
    let config = Config::from_lookup(|_| None).unwrap();
    let client = Client::connect_with(&config, &server.url()).await.expect("connect");
    let js = client.jetstream().clone();
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "ledger".into(),
        subjects: vec!["ledger.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();

    // The same publish five times with one key: stored once, the repeats acked as duplicates.
    let mut duplicates = 0;
    for _ in 0..5 {
        let ack = client
            .publish_with("ledger.deposits", &Job { id: 1 }, Publish::new().id("deposit-1"))
            .await
            .expect("publish");
        assert_eq!(ack.sequence, 1);
        duplicates += usize::from(ack.duplicate);
    }
    assert_eq!(duplicates, 4);
    let mut stream = js.get_stream("ledger").await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);

    // Two writers race on one subject, each expecting the last sequence it saw: every
    // sequence is won by exactly one of them, and the loser gets PublishError::Conflict.
    async fn writer(client: Client, name: &'static str, rounds: usize) -> (Vec<u64>, usize) {
        let (mut won, mut conflicts) = (Vec::new(), 0);
        let js = client.jetstream().clone();
        for round in 0..rounds {
            let last = match js
                .get_stream("ledger")
                .await
                .unwrap()
                .get_last_raw_message_by_subject("ledger.account")
                .await
            {
                Ok(message) => message.sequence,
                Err(_) => 0,
            };
            let options = Publish::new()
                .expected_last_subject_sequence(last)
                .with_header("Writer", name);
            match client
                .publish_with("ledger.account", &Job { id: round as u64 }, options)
                .await
            {
                Ok(ack) => won.push(ack.sequence),
                Err(PublishError::Conflict { .. }) => conflicts += 1,
                Err(other) => panic!("unexpected error: {other}"),
            }
        }
        (won, conflicts)
    }
    let (a, b) = tokio::join!(
        tokio::spawn(writer(client.clone(), "a", 100)),
        tokio::spawn(writer(client.clone(), "b", 100))
    );
    let ((won_a, conflicts_a), (won_b, conflicts_b)) = (a.unwrap(), b.unwrap());
    let mut all: Vec<u64> = won_a.iter().chain(&won_b).copied().collect();
    all.sort_unstable();
    let before = all.len();
    all.dedup();
    assert_eq!(all.len(), before, "a sequence was won twice");
    assert_eq!(won_a.len() + conflicts_a, 100);
    assert_eq!(won_b.len() + conflicts_b, 100);
    assert!(
        conflicts_a + conflicts_b > 0,
        "the writers never raced; the test proves nothing"
    );
    // Every message on the subject was written by exactly one winning publish.
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages as usize, 1 + all.len());
}

/// "No responders" (no stream leader yet, as during an election or before provisioning) is
/// retried, bounded: a stream that appears meanwhile stores the message, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_is_retried_while_no_stream_answers() {
    use std::sync::atomic::Ordering::Relaxed;
    let server = NatsServer::start().await.expect("nats-server");
    let nats = server.client().await;
    let stats = nats.statistics();
    let client = Client::new(nats);
    let (sent, received) = (stats.out_messages.load(Relaxed), stats.in_messages.load(Relaxed));
    let publish = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .publish_with("late.1", &Job { id: 1 }, natty_runtime::Publish::new().id("late-1"))
                .await
        }
    });
    // The first attempt went out and its "no responders" status came back.
    wait_until(Duration::from_secs(5), "the first attempt to be refused", || async {
        stats.out_messages.load(Relaxed) > sent && stats.in_messages.load(Relaxed) > received
    })
    .await;
    assert!(!publish.is_finished(), "the publish gave up after one attempt");
    let js = async_nats::jetstream::new(server.client().await);
    let mut stream = js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "late".into(),
            subjects: vec!["late.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let ack = publish.await.unwrap().expect("stored once the stream exists");
    assert_eq!((ack.stream.as_str(), ack.sequence), ("late", 1));
    assert!(stats.out_messages.load(Relaxed) >= sent + 2, "it was sent again");
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}
