//! natty's partition function agrees with the server's: a stream whose subject transform adds
//! `{{partition(n, ...)}}` stores each message under the partition
//! `natty_runtime::partition::partition_of` computes, for 500 keys, one and two key tokens.

use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use natty_runtime::partition::partition_of;
use natty_runtime::testing::NatsServer;
use std::time::Duration;

/// Publishes `subjects` to a stream transforming `source` into `destination`, reads the stored
/// subjects back in order.
async fn stored(
    js: &jetstream::Context,
    name: &str,
    source: &str,
    destination: &str,
    subjects: &[String],
) -> Vec<String> {
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![source.into()],
            subject_transform: Some(stream::SubjectTransform {
                source: source.into(),
                destination: destination.into(),
            }),
            ..Default::default()
        })
        .await
        .expect("a stream with a partition transform");
    for subject in subjects {
        js.publish(subject.clone(), "x".into()).await.unwrap().await.unwrap();
    }
    let reader = stream.create_consumer(consumer::pull::Config::default()).await.unwrap();
    let mut messages = reader.fetch().max_messages(subjects.len()).messages().await.unwrap();
    let mut stored = Vec::new();
    while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await {
        stored.push(message.unwrap().subject.to_string());
    }
    stored
}

#[tokio::test]
async fn partition_of_is_the_servers_partition() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    // Keys of every shape a subject token takes: short, long, digits, dashes, mixed case.
    let keys: Vec<String> = (0..500u64)
        .map(|i| match i % 4 {
            0 => format!("k{i}"),
            1 => format!("customer-{}", i * 7919),
            2 => format!("{}", i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            _ => format!("Region_{}_{}", i % 13, "x".repeat((i % 40) as usize)),
        })
        .collect();

    let subjects: Vec<String> = keys.iter().map(|key| format!("orders.{key}")).collect();
    let got = stored(
        &js,
        "one",
        "orders.*",
        "orders.{{wildcard(1)}}.{{partition(8,1)}}",
        &subjects,
    )
    .await;
    assert_eq!(got.len(), keys.len());
    for (key, subject) in keys.iter().zip(&got) {
        assert_eq!(
            *subject,
            format!("orders.{key}.{}", partition_of(&[key], 8)),
            "key {key}"
        );
    }

    // Two key tokens, concatenated as the server does, and a partition count that is not a power of two.
    let subjects: Vec<String> = keys.iter().map(|key| format!("ledger.{key}.eu")).collect();
    let got = stored(
        &js,
        "two",
        "ledger.*.*",
        "{{partition(13,1,2)}}.ledger.{{wildcard(1)}}.{{wildcard(2)}}",
        &subjects,
    )
    .await;
    assert_eq!(got.len(), keys.len());
    for (key, subject) in keys.iter().zip(&got) {
        assert_eq!(
            *subject,
            format!("{}.ledger.{key}.eu", partition_of(&[key, "eu"], 13)),
            "key {key}"
        );
    }
}
