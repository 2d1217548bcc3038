//! `#[derive(Payload)]`: a Protobuf event round-trips through a stream and a service; a JSON
//! event goes to the subject its template names (without a `Content-Type`: JSON is the
//! default); a consumer handed the other format terminates the message, dead-letters it with a
//! reason naming both formats, and goes on.

use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::Format;
use natty_tests::{read_all, wait_until};

/// A Protobuf event, as prost-build would generate it, published to `events.opened.<venue>`.
#[derive(Clone, PartialEq, prost::Message, Payload)]
#[payload(subject = "events.opened.{venue}", format = "protobuf")]
struct Opened {
    #[prost(string, tag = "1")]
    venue: String,
    #[prost(uint32, tag = "2")]
    seats: u32,
    #[prost(string, repeated, tag = "3")]
    tags: Vec<String>,
}

/// A JSON event published to `events.noted.<id>`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, Payload)]
#[payload(subject = "events.noted.{id}")]
struct Noted {
    id: u64,
    text: String,
}

static OPENED: Mutex<Vec<(String, Opened)>> = Mutex::new(Vec::new());
static NOTED: Mutex<Vec<(String, Noted)>> = Mutex::new(Vec::new());

#[stream(name = "events", subjects = ["events.>"])]
struct Events;

#[consumer(stream = "events", durable = "opened", subject = "events.opened.>")]
async fn on_opened(event: Opened, ctx: Context) {
    OPENED.lock().unwrap().push((ctx.subject().to_string(), event));
}

#[consumer(stream = "events", durable = "noted", subject = "events.noted.>")]
async fn on_noted(event: Noted, ctx: Context) {
    NOTED.lock().unwrap().push((ctx.subject().to_string(), event));
}

/// Request-reply in Protobuf both ways.
#[service(subject = "venues.grow")]
async fn grow(venue: Opened) -> Result<Opened, std::io::Error> {
    Ok(Opened {
        seats: venue.seats * 2,
        ..venue
    })
}

#[test]
fn the_subject_template_formats_fields() {
    let opened = Opened {
        venue: "arena".into(),
        seats: 1,
        tags: vec![],
    };
    assert_eq!(opened.subject().unwrap(), "events.opened.arena");
    assert_eq!(<Opened as natty_runtime::EncodePayload>::FORMAT, Format::Protobuf);
    assert_eq!(<Noted as natty_runtime::EncodePayload>::FORMAT, Format::Json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protobuf_and_json_payloads_round_trip_and_a_wrong_format_is_terminated() {
    let server = NatsServer::start().await.expect("nats-server");
    let running = RunningRuntime::registered(server.url());
    let client = Client::new(server.client().await);
    let js = client.jetstream().clone();
    wait_until(Duration::from_secs(10), "the streams to be provisioned", || async {
        js.get_stream("events").await.is_ok() && js.get_stream("natty-dead-letters").await.is_ok()
    })
    .await;

    let opened = Opened {
        venue: "arena".into(),
        seats: 1200,
        tags: vec!["indoor".into(), "big".into()],
    };
    let noted = Noted {
        id: 7,
        text: "doors at 7".into(),
    };
    // Each consumer first gets the other's format: terminated, dead-lettered, then passed.
    client.publish("events.opened.wrong", &noted).await.unwrap();
    client.publish("events.noted.wrong", &opened).await.unwrap();
    let ack = client.emit(&opened).await.unwrap();
    assert_eq!(ack.sequence, 3);
    client.emit(&noted).await.unwrap();

    wait_until(Duration::from_secs(10), "both good events handled", || async {
        !OPENED.lock().unwrap().is_empty() && !NOTED.lock().unwrap().is_empty()
    })
    .await;
    assert_eq!(
        *OPENED.lock().unwrap(),
        vec![("events.opened.arena".to_string(), opened.clone())]
    );
    assert_eq!(
        *NOTED.lock().unwrap(),
        vec![("events.noted.7".to_string(), noted.clone())]
    );

    let stored = js.get_stream("events").await.unwrap().get_raw_message(3).await.unwrap();
    assert_eq!(
        stored.headers.get("Content-Type").map(|v| v.as_str()),
        Some("application/protobuf")
    );
    // JSON, the default, goes without the header.
    let stored = js.get_stream("events").await.unwrap().get_raw_message(1).await.unwrap();
    assert_eq!(stored.headers.get("Content-Type"), None, "{:?}", stored.headers);

    wait_until(Duration::from_secs(10), "two dead letters", || async {
        let mut stream = js.get_stream("natty-dead-letters").await.unwrap();
        stream.info().await.unwrap().state.messages == 2
    })
    .await;
    let mut dead = read_all(&js, "natty-dead-letters", 2).await;
    dead.sort_by(|a, b| a.subject.cmp(&b.subject));
    assert_eq!(dead.len(), 2, "each wrong-format message dead-lettered once");
    let reasons: Vec<String> = dead
        .iter()
        .map(|letter| {
            let headers = letter.headers.as_ref().expect("provenance headers");
            headers.get("Natty-Dead-Letter-Reason").unwrap().to_string()
        })
        .collect();
    assert_eq!(dead[0].subject.as_str(), "natty.dead.events.noted");
    assert!(
        reasons[0].contains("`application/protobuf`") && reasons[0].contains("Noted is decoded from JSON"),
        "{}",
        reasons[0]
    );
    assert_eq!(dead[1].subject.as_str(), "natty.dead.events.opened");
    // Sent without a Content-Type, the JSON is recognised by its first byte rather than handed
    // to the Protobuf decoder (which may skip it as an unknown group and yield defaults).
    assert!(
        reasons[1].contains("cannot decode the payload as") && reasons[1].contains("Opened (Protobuf)"),
        "{}",
        reasons[1]
    );
    assert!(
        reasons[1].contains("no Content-Type and begins with `{`") && reasons[1].contains("`application/json`"),
        "{}",
        reasons[1]
    );
    // The dead letter keeps the original bytes and format, so it can be decoded later.
    assert_eq!(
        <Opened as prost::Message>::decode(dead[0].payload.clone()).unwrap(),
        opened
    );

    let reply: Opened = client.request("venues.grow", &opened).await.unwrap();
    assert_eq!(reply.seats, 2400);
    assert_eq!(reply.tags, opened.tags);
    let wrong = client.request::<_, Opened>("venues.grow", &noted).await.unwrap_err();
    assert!(
        wrong.to_string().contains("payload::Opened (Protobuf)") && wrong.to_string().contains("it is JSON"),
        "the service names the format: {wrong}"
    );

    running.stop().await.expect("clean shutdown");
}
