//! Handler arguments are told apart by trait, not by the name of their type: an alias of
//! `Context` is the context, and a payload struct that happens to be called `Envelope` is a
//! payload.

use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::{consumer, service, stream, Client, Config};
use natty_tests::wait_until;
use serde::{Deserialize, Serialize};

/// natty's `Context`, under another name.
use natty_runtime::Context as Ctx;

/// A user's payload that shares its name with natty's `Envelope` extractor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Envelope {
    to: String,
    weight_grams: u32,
}

#[service(subject = "post.weigh")]
async fn weigh(envelope: Envelope) -> Result<Envelope, std::io::Error> {
    Ok(Envelope {
        weight_grams: envelope.weight_grams + 1,
        ..envelope
    })
}

#[derive(Debug, Deserialize)]
struct Parcel {
    id: u64,
}

/// (parcel id, subject, stream sequence) as the handler saw them.
static SEEN: Mutex<Vec<(u64, String, u64)>> = Mutex::new(Vec::new());

#[stream(name = "parcels", subjects = ["parcels.>"])]
struct Parcels;

#[consumer(stream = "parcels", durable = "sorter")]
async fn sort(ctx: Ctx, parcel: Parcel) {
    SEEN.lock()
        .unwrap()
        .push((parcel.id, ctx.subject().to_string(), ctx.stream_sequence()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aliased_context_and_a_payload_named_envelope_are_what_they_are() {
    let server = NatsServer::start().await.expect("nats-server");
    let _runtime = RunningRuntime::registered(server.url());
    let config = Config::from_lookup(|_| None).unwrap();
    let client = Client::connect_with(&config, &server.url()).await.expect("connect");

    // The service decodes its `Envelope` from the request: a payload, not the extractor.
    let sent = Envelope {
        to: "Lisbon".into(),
        weight_grams: 20,
    };
    wait_until(Duration::from_secs(10), "the service to answer", || async {
        client.request::<_, Envelope>("post.weigh", &sent).await.is_ok()
    })
    .await;
    let reply: Envelope = client.request("post.weigh", &sent).await.expect("reply");
    assert_eq!(
        reply,
        Envelope {
            to: "Lisbon".into(),
            weight_grams: 21
        }
    );

    // The consumer's `Ctx` is the delivery's context.
    wait_until(Duration::from_secs(10), "the stream to exist", || async {
        client.jetstream().get_stream("parcels").await.is_ok()
    })
    .await;
    client
        .publish("parcels.north", &serde_json::json!({ "id": 7 }))
        .await
        .expect("publish");
    wait_until(Duration::from_secs(10), "the parcel to be sorted", || async {
        !SEEN.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(*SEEN.lock().unwrap(), vec![(7, "parcels.north".to_string(), 1)]);
}
