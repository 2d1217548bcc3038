//! Provisioning: declared streams are created, drift is corrected (create-or-update) or
//! reported (verify-only), a change the server refuses is a clear startup error, and the
//! consumer is created with every declared setting.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::AckPolicy, stream::StorageType};
use natty_runtime::prelude::*;
use natty_runtime::testing::NatsServer;
use natty_runtime::{Error, Provision, Runtime};
use natty_tests::Job;

#[stream(name = "orders", subjects = ["orders.>"], max_age = "1h", storage = "file", duplicate_window = "2m", max_messages = 100000)]
struct Orders;

#[consumer(
    stream = "orders",
    durable = "billing",
    subject = ["orders.created", "orders.paid"],
    ack_wait = "45s",
    max_deliver = 7,
    max_ack_pending = 500,
    concurrency = 4
)]
async fn bill(_job: Job) {}

async fn start_and_stop(url: &str, provision: Provision) -> natty_runtime::Result<()> {
    // The shutdown future is ready at once: run_until provisions and binds, then drains.
    Runtime::builder()
        .url(url)
        .provision(provision)
        .build()?
        .run_until(async {})
        .await
}

async fn stream_config(js: &jetstream::Context) -> jetstream::stream::Config {
    js.get_stream("orders")
        .await
        .expect("orders stream")
        .cached_info()
        .config
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_and_consumers_are_provisioned_verified_and_refusals_reported() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = jetstream::new(server.client().await);

    // Verify-only on an empty server: the stream is missing.
    let error = start_and_stop(&url, Provision::VerifyOnly).await.unwrap_err();
    assert!(matches!(error, Error::StreamNotFound { .. }), "{error}");

    // Create-or-update creates the stream and the consumer as declared.
    start_and_stop(&url, Provision::CreateOrUpdate)
        .await
        .expect("provision");
    let config = stream_config(&js).await;
    assert_eq!(config.subjects, vec!["orders.>".to_string()]);
    assert_eq!(config.max_age, Duration::from_secs(3600));
    assert_eq!(config.max_messages, 100_000);
    assert_eq!(config.duplicate_window, Duration::from_secs(120));
    let consumer = js
        .get_stream("orders")
        .await
        .unwrap()
        .consumer_info("billing")
        .await
        .unwrap()
        .config;
    assert_eq!(consumer.durable_name.as_deref(), Some("billing"));
    assert_eq!(consumer.ack_policy, AckPolicy::Explicit);
    assert_eq!(
        consumer.filter_subjects,
        vec!["orders.created".to_string(), "orders.paid".to_string()]
    );
    assert_eq!(consumer.ack_wait, Duration::from_secs(45));
    assert_eq!(consumer.max_deliver, 7);
    assert_eq!(consumer.max_ack_pending, 500);

    // Someone changes max_age on the server.
    let mut drifted = config.clone();
    drifted.max_age = Duration::from_secs(7200);
    js.update_stream(&drifted).await.expect("update");

    // Verify-only reports the drift, naming the field, and changes nothing.
    let error = start_and_stop(&url, Provision::VerifyOnly).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, Error::Drift(drift) if drift.field == "max_age"),
        "{text}"
    );
    assert!(text.contains("orders") && text.contains("verify-only"), "{text}");
    assert_eq!(stream_config(&js).await.max_age, Duration::from_secs(7200));

    // Create-or-update puts the declared value back, and keeps what was not declared.
    start_and_stop(&url, Provision::CreateOrUpdate).await.expect("update");
    assert_eq!(stream_config(&js).await.max_age, Duration::from_secs(3600));

    // A stream whose storage type differs cannot be changed in place: a clear startup error.
    js.delete_stream("orders").await.unwrap();
    js.create_stream(jetstream::stream::Config {
        name: "orders".into(),
        subjects: vec!["orders.>".into()],
        storage: StorageType::Memory,
        ..Default::default()
    })
    .await
    .unwrap();
    let error = start_and_stop(&url, Provision::CreateOrUpdate).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, Error::Drift(drift) if drift.field == "storage"),
        "{text}"
    );
    assert!(text.contains("refused"), "{text}");

    // Off touches nothing: the consumer must exist already (it does not on this stream).
    let error = start_and_stop(&url, Provision::Off).await.unwrap_err();
    assert!(matches!(error, Error::ConsumerNotFound { .. }), "{error}");
}

/// An existing consumer that differs from the declaration stops a verify-only start, and is
/// updated only where it differs otherwise: what an
/// operator set besides (a description, `max_waiting`, which the server refuses to change at
/// all, an inactive threshold...) stays as it was; and one that matches is bound untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_update_changes_only_the_declared_settings() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = jetstream::new(server.client().await);
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "orders".into(),
            subjects: vec!["orders.>".into()],
            max_age: Duration::from_secs(3600),
            max_messages: 100_000,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    // The operator's consumer: the declared subjects, another ack_wait, and settings of its own.
    stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("billing".into()),
            description: Some("set by the operator".into()),
            filter_subjects: vec!["orders.created".into(), "orders.paid".into()],
            ack_wait: Duration::from_secs(10),
            max_deliver: 7,
            max_ack_pending: 500,
            max_waiting: 16,
            max_batch: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let consumer = || async {
        js.get_stream("orders")
            .await
            .unwrap()
            .consumer_info("billing")
            .await
            .unwrap()
            .config
    };

    // Verify-only refuses to start with it, naming the consumer and the setting, and changes
    // nothing.
    let error = start_and_stop(&url, Provision::VerifyOnly).await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, natty_runtime::Error::Drift(drift) if drift.field == "ack_wait"
            && drift.declared_on == natty_runtime::Declared::Consumer { stream: "orders".into(), consumer: "billing".into() }),
        "{text}"
    );
    assert!(
        text.contains("consumer `billing`") && text.contains("verify-only"),
        "{text}"
    );
    assert_eq!(consumer().await.ack_wait, Duration::from_secs(10));

    start_and_stop(&url, Provision::CreateOrUpdate)
        .await
        .expect("the drifted ack_wait is updated, the rest kept");
    let config = consumer().await;
    assert_eq!(config.ack_wait, Duration::from_secs(45), "the declared ack_wait");
    assert_eq!(config.description.as_deref(), Some("set by the operator"));
    assert_eq!(config.max_waiting, 16);
    assert_eq!(config.max_batch, 100);

    // Bound again as it is: nothing changes.
    start_and_stop(&url, Provision::CreateOrUpdate).await.expect("bound");
    assert_eq!(consumer().await, config);
}
