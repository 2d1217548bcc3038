//! Subjects built from data are checked before anything is sent: a `#[derive(Payload)]` field
//! whose value is not exactly one subject token, and a subject given to `publish` that no
//! message can be published to, are refused at once with a typed error, never retried, and
//! nothing reaches the server. So are headers built from data (an idempotency key holding a
//! line break, a header name that is not one): refused, not a panic.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use natty_runtime::prelude::*;
use natty_runtime::testing::NatsServer;
use natty_runtime::{Publish, PublishError};
use serde::Serialize;

#[derive(Debug, Serialize, Payload)]
#[payload(subject = "shop.{store}.created")]
struct OrderCreated {
    store: String,
    total_cents: u64,
}

/// Runs `call` five times and returns its fastest run and its last result. A refusal is pure
/// computation (microseconds); the fastest of several runs keeps a thread preempted by the
/// other tests sharing the machine from passing for a retry, while every single run is still
/// bounded (see [`SLOWEST`]).
async fn timed<F, Fut, T>(mut call: F) -> (Duration, Duration, T)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (mut fastest, mut slowest) = (Duration::MAX, Duration::ZERO);
    let mut last = None;
    for _ in 0..5 {
        let started = Instant::now();
        let result = call().await;
        let took = started.elapsed();
        fastest = fastest.min(took);
        slowest = slowest.max(took);
        last = Some(result);
    }
    (fastest, slowest, last.expect("five runs"))
}

/// The issue asks for a refusal within a millisecond: the fastest run must be.
const FASTEST: Duration = Duration::from_millis(1);
/// Every run, however scheduled: far below the first retry pause (250 ms) and the 20 s a
/// retried "no responders" lasts, so a refusal that was retried cannot pass.
const SLOWEST: Duration = Duration::from_millis(20);

/// Values a user could put in `store` that are not one subject token, with what each would
/// do unchecked: `"a.b"` publishes to `shop.a.b.created`, `"*"` and `">"` are stored as literal
/// wildcard subjects every subscriber reads as patterns, `""` is retried for 20 s and ends as
/// "no stream found".
const BAD_TOKENS: &[(&str, &str)] = &[
    ("", "empty"),
    ("a.b", "`.`"),
    ("*", "wildcard"),
    (">", "wildcard"),
    ("north*", "wildcard"),
    ("a>", "wildcard"),
    ("two words", "whitespace"),
    ("tab\there", "whitespace"),
    ("line\nbreak", "whitespace"),
    ("carriage\rreturn", "whitespace"),
    ("\u{a0}", "whitespace"),
    ("nul\0", "control"),
    ("bell\u{7}", "control"),
    ("del\u{7f}", "control"),
    ("c1\u{9b}", "control"),
];

/// Subjects no message can be published to.
const BAD_SUBJECTS: &[(&str, &str)] = &[
    ("", "empty"),
    ("shop..created", "empty token"),
    (".shop.created", "empty token"),
    ("shop.created.", "empty token"),
    ("shop.*.created", "wildcard"),
    ("shop.>", "wildcard"),
    ("shop.a b.created", "whitespace"),
    ("shop.north.created\r\n", "whitespace"),
    ("shop.\u{7f}.created", "control"),
];

async fn shop(server: &NatsServer) -> (Client, async_nats::jetstream::stream::Stream, async_nats::Client) {
    let nats = server.client().await;
    let client = Client::new(nats.clone());
    let stream = client
        .jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: "shop".into(),
            subjects: vec!["shop.>".into()],
            ..Default::default()
        })
        .await
        .expect("the shop stream");
    (client, stream, nats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_field_that_is_not_one_subject_token_is_refused_at_once_and_nothing_is_stored() {
    let server = NatsServer::start().await.expect("nats-server");
    let (client, mut stream, nats) = shop(&server).await;

    // Good values are published as the template says, Unicode letters included.
    for store in ["north", "zürich"] {
        let order = OrderCreated {
            store: store.into(),
            total_cents: 1,
        };
        let ack = client.emit(&order).await.expect("a valid store is published");
        assert_eq!(ack.stream, "shop");
    }
    assert_eq!(stream.info().await.unwrap().state.messages, 2);
    let sent = nats.statistics().out_messages.load(Relaxed);

    for &(store, kind) in BAD_TOKENS {
        let order = OrderCreated {
            store: store.into(),
            total_cents: 1250,
        };
        let (fastest, slowest, result) = timed(|| client.emit(&order)).await;
        let error = result.expect_err(&format!("store = {store:?} ({kind}) must be refused"));
        match &error {
            PublishError::InvalidSubjectField {
                type_name,
                field,
                value,
                template,
                problem,
            } => {
                assert!(type_name.ends_with("OrderCreated"), "{type_name}");
                assert_eq!((*field, value.as_str()), ("store", store));
                assert_eq!(*template, "shop.{store}.created");
                assert!(problem.contains(kind), "{store:?}: {problem}");
            }
            other => panic!("store = {store:?}: expected InvalidSubjectField, got {other:?}"),
        }
        let text = error.to_string();
        assert!(
            text.contains("OrderCreated.store") && text.contains(&format!("{store:?}")),
            "the message names the type, the field and the value: {text}"
        );
        // The same through `emit_with`, which takes options.
        let error = client.emit_with(&order, Publish::new().id("x")).await.unwrap_err();
        assert!(matches!(error, PublishError::InvalidSubjectField { .. }), "{error}");
        assert!(fastest < FASTEST, "store = {store:?}: fastest refusal took {fastest:?}");
        assert!(slowest < SLOWEST, "store = {store:?}: a refusal took {slowest:?}");
    }

    // Nothing was sent, so nothing was stored.
    assert_eq!(nats.statistics().out_messages.load(Relaxed), sent, "nothing was sent");
    assert_eq!(stream.info().await.unwrap().state.messages, 2, "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_message_can_be_published_to_is_refused_at_once_and_nothing_is_stored() {
    let server = NatsServer::start().await.expect("nats-server");
    let (client, mut stream, nats) = shop(&server).await;
    let value = serde_json::json!({"total_cents": 1});
    // `*` and `>` inside a longer token are literal to the server: allowed.
    client
        .publish("shop.a*b.created", &value)
        .await
        .expect("a literal `*` inside a token");
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let sent = nats.statistics().out_messages.load(Relaxed);

    for &(subject, kind) in BAD_SUBJECTS {
        let check = |error: &PublishError| matches!(error, PublishError::InvalidSubject { subject: s, problem } if s == subject && problem.contains(kind));
        let (fastest, slowest, result) = timed(|| client.publish(subject, &value)).await;
        let error = result.expect_err(&format!("{subject:?} ({kind}) must be refused"));
        assert!(check(&error), "publish {subject:?}: {error:?}");
        assert!(
            fastest < FASTEST,
            "publish {subject:?}: fastest refusal took {fastest:?}"
        );
        assert!(slowest < SLOWEST, "publish {subject:?}: a refusal took {slowest:?}");

        let (fastest, slowest, result) =
            timed(|| client.publish_with(subject, &value, Publish::new().id("order-1"))).await;
        assert!(check(&result.unwrap_err()), "publish_with {subject:?}");
        assert!(
            fastest < FASTEST && slowest < SLOWEST,
            "publish_with {subject:?}: {fastest:?} / {slowest:?}"
        );

        // `send` does not retry, but sends nothing to a bad subject either.
        let error = client.send(subject, &value).await.err().expect("send refuses it");
        assert!(check(&error), "send {subject:?}: {error:?}");
    }

    assert_eq!(nats.statistics().out_messages.load(Relaxed), sent, "nothing was sent");
    assert_eq!(stream.info().await.unwrap().state.messages, 1, "nothing was stored");
}

/// A header taken from data that cannot go on the wire: async-nats panics on it; natty refuses
/// it at publish time, for every way of publishing, and sends nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_that_cannot_be_sent_is_refused_and_nothing_is_stored() {
    let server = NatsServer::start().await.expect("nats-server");
    let (client, mut stream, nats) = shop(&server).await;
    let value = serde_json::json!({"total_cents": 1});
    let sent = nats.statistics().out_messages.load(Relaxed);
    let cases = [
        (
            Publish::new().id("order-1\r\nNats-Expected-Last-Sequence: 9"),
            "Nats-Msg-Id",
            "line break",
        ),
        (
            Publish::new().with_header("X-Note", "two\nlines"),
            "X-Note",
            "line break",
        ),
        (
            Publish::new().with_header("bad name", "v"),
            "bad name",
            "printable ASCII",
        ),
        (Publish::new().with_header("X:Y", "v"), "X:Y", "printable ASCII"),
    ];
    for (options, header, problem) in cases {
        let check = |error: &PublishError| matches!(error, PublishError::InvalidHeader { header: h, problem: p, .. } if h == header && p.contains(problem));
        let error = client
            .publish_with("shop.s1.created", &value, options.clone())
            .await
            .unwrap_err();
        assert!(check(&error), "publish_with, {header}: {error:?}");
        let error = client
            .send_with("shop.s1.created", &value, options.clone())
            .await
            .err()
            .expect("send_with refuses it");
        assert!(check(&error), "send_with, {header}: {error:?}");
        let batch = client
            .atomic_batch()
            .add_with("shop.s1.created", &value, options)
            .commit()
            .await;
        let error = batch.expect_err("an atomic batch refuses it");
        assert!(
            matches!(&error, natty_runtime::AtomicBatchError::Message(inner) if check(inner)),
            "atomic batch, {header}: {error:?}"
        );
    }
    // A counter's key too.
    let error = client.counter("shop.hits").add_with_key("a\nb", 1).await.unwrap_err();
    assert!(
        matches!(error, natty_runtime::CounterError::Add { .. }) && error.to_string().contains("line break"),
        "{error}"
    );
    assert_eq!(nats.statistics().out_messages.load(Relaxed), sent, "nothing was sent");
    assert_eq!(stream.info().await.unwrap().state.messages, 0, "nothing was stored");
}
