//! One-to-many request-reply: `#[service(queue = false)]` has every instance answer, and
//! `Client::request_many` gathers their typed replies as a stream that ends at a count, after a
//! quiet period, or at a deadline, whichever comes first. A service's error or an undecodable
//! reply is one item, not the end; nobody listening is `NoResponders`; the reply inbox is
//! unsubscribed when the stream ends or is dropped.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use natty_runtime::async_nats;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::{Config, EndedBy, Replies, RequestError, Runtime};
use natty_tests::wait_until;
use serde::{Deserialize, Serialize};

const SUBJECT: &str = "gather.quote";

#[derive(Debug, Serialize, Deserialize)]
struct QuoteRequest {
    symbol: String,
    cents: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Quote {
    venue: String,
    cents: u64,
}

/// Who a runtime answers as: each of the three runs the same handler with its own.
#[derive(Clone)]
struct Venue {
    name: &'static str,
    spread_cents: u64,
}

const VENUES: [Venue; 3] = [
    Venue {
        name: "east",
        spread_cents: 1,
    },
    Venue {
        name: "north",
        spread_cents: 2,
    },
    Venue {
        name: "south",
        spread_cents: 3,
    },
];

#[service(subject = "gather.quote", queue = false)]
async fn quote(request: QuoteRequest, State(venue): State<Venue>) -> Result<Quote, std::io::Error> {
    if request.symbol.is_empty() {
        return Err(std::io::Error::other(format!("{} quotes no empty symbol", venue.name)));
    }
    Ok(Quote {
        venue: venue.name.to_owned(),
        cents: request.cents + venue.spread_cents,
    })
}

/// The default: one instance of the group answers.
#[service(subject = "gather.lookup")]
async fn lookup(request: QuoteRequest) -> Result<Quote, std::io::Error> {
    Ok(Quote {
        venue: "any".into(),
        cents: request.cents,
    })
}

fn acme() -> QuoteRequest {
    QuoteRequest {
        symbol: "ACME".into(),
        cents: 100,
    }
}

async fn connect(server: &NatsServer) -> Client {
    Client::connect_with(&Config::default(), &server.url())
        .await
        .expect("connect")
}

/// Three runtimes of the `quote` service, one per venue, each answering as its venue; returns
/// once one gather hears all three.
async fn start_venues(server: &NatsServer, client: &Client) -> Vec<RunningRuntime> {
    let running = VENUES
        .iter()
        .map(|venue| {
            let runtime = Runtime::builder()
                .config(Config::default())
                .url(server.url())
                .handlers(["quote"])
                .state(venue.clone())
                .build()
                .expect("a runtime");
            RunningRuntime::spawn(runtime)
        })
        .collect();
    wait_until(Duration::from_secs(10), "the three venues to answer", || async {
        let replies = client
            .request_many::<Quote>(SUBJECT, &acme())
            .quiet(Duration::from_millis(200))
            .await
            .expect("send");
        gather(replies).await.0.iter().filter(|reply| reply.is_ok()).count() == 3
    })
    .await;
    running
}

async fn stop(running: Vec<RunningRuntime>) {
    for runtime in running {
        runtime.stop().await.expect("clean shutdown");
    }
}

/// Every item of `replies`, and why it ended.
async fn gather(mut replies: Replies<Quote>) -> (Vec<Result<Quote, RequestError>>, Option<EndedBy>) {
    let mut items = Vec::new();
    while let Some(item) = replies.next().await {
        items.push(item);
    }
    (items, replies.ended_by())
}

fn venues(items: &[Result<Quote, RequestError>]) -> Vec<String> {
    let mut venues: Vec<String> = items
        .iter()
        .filter_map(|item| item.as_ref().ok())
        .map(|quote| quote.venue.clone())
        .collect();
    venues.sort();
    venues
}

/// A responder outside natty on `SUBJECT` that answers each request with `reply(n)` for n = 0,
/// 1, ... every `every` until `reply` gives `None`, and records the inbox it answers to. It is
/// subscribed (the server knows) when this returns.
/// A reply for each of the first `limit` ticks: quote `tick-<n>`, then silence.
fn ticks(limit: u32) -> impl Fn(u32) -> Option<Vec<u8>> + Send + 'static {
    move |n| {
        (n < limit).then(|| {
            serde_json::to_vec(&Quote {
                venue: format!("tick-{n}"),
                cents: u64::from(n),
            })
            .unwrap()
        })
    }
}

async fn raw_responder(
    server: &NatsServer,
    every: Duration,
    reply: impl Fn(u32) -> Option<Vec<u8>> + Send + 'static,
) -> (tokio::task::JoinHandle<()>, Arc<Mutex<Option<String>>>) {
    let nats = server.client().await;
    let mut requests = nats.subscribe(SUBJECT).await.expect("subscribe");
    // Listening once the server says so: it handles a connection's operations in order, so
    // when a message this connection publishes comes back to it, the subscription above is
    // in place (a flush only writes to the socket; a request racing it got "no responders").
    let ready = nats.new_inbox();
    let mut echo = nats.subscribe(ready.clone()).await.expect("subscribe");
    nats.publish(ready, bytes::Bytes::new()).await.expect("publish");
    tokio::time::timeout(Duration::from_secs(10), echo.next())
        .await
        .expect("the server echoes within 10 s")
        .expect("the echo");
    let inbox = Arc::new(Mutex::new(None));
    let seen = inbox.clone();
    let task = tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let Some(to) = request.reply else { continue };
            *seen.lock().unwrap() = Some(to.to_string());
            let mut ticks = tokio::time::interval(every);
            for n in 0.. {
                ticks.tick().await;
                let Some(body) = reply(n) else { break };
                if nats.publish(to.clone(), body.into()).await.is_err() {
                    break;
                }
            }
        }
    });
    (task, inbox)
}

/// Waits (at most 5 s) until nobody listens on `inbox`.
async fn until_unsubscribed(nats: &async_nats::Client, inbox: &str) {
    wait_until(Duration::from_secs(5), "the reply inbox to be unsubscribed", || {
        unsubscribed(nats, inbox)
    })
    .await;
}

/// Whether nobody listens on `inbox` any more: a request to it gets "no responders" from the
/// server, where a listening inbox lets it time out.
async fn unsubscribed(nats: &async_nats::Client, inbox: &str) -> bool {
    let probe = async_nats::Request::new()
        .payload("probe".into())
        .timeout(Some(Duration::from_millis(200)));
    matches!(
        nats.send_request(inbox.to_owned(), probe).await,
        Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_instance_answers_and_a_service_error_is_one_item() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;
    let running = start_venues(&server, &client).await;

    // A quiet period well above what a loaded machine needs between replies.
    let replies = client
        .request_many::<Quote>(SUBJECT, &acme())
        .quiet(Duration::from_secs(3))
        .deadline(Duration::from_secs(20))
        .await
        .expect("send");
    assert_eq!(replies.subject(), SUBJECT);
    let (items, ended_by) = gather(replies).await;
    assert_eq!(items.len(), 3, "{items:?}");
    assert_eq!(venues(&items), ["east", "north", "south"]);
    // Each answered with its own state: the request's price plus its spread.
    for quote in items.iter().flatten() {
        let venue = VENUES.iter().find(|venue| venue.name == quote.venue).unwrap();
        assert_eq!(quote.cents, 100 + venue.spread_cents);
    }
    assert_eq!(ended_by, Some(EndedBy::Quiet), "no count, a deadline far off");

    // Each service's error is an item of its own, naming the subject; the stream goes on.
    let empty = QuoteRequest {
        symbol: String::new(),
        cents: 1,
    };
    let replies = client
        .request_many::<Quote>(SUBJECT, &empty)
        .max_replies(3)
        .quiet(Duration::from_secs(5))
        .await
        .expect("send");
    let (items, _) = gather(replies).await;
    let mut failed: Vec<String> = items
        .iter()
        .map(|item| match item {
            Err(RequestError::Remote { subject, message }) => {
                assert_eq!(subject, SUBJECT);
                assert!(item.as_ref().unwrap_err().to_string().contains(SUBJECT));
                message.split(' ').next().unwrap_or_default().to_owned()
            }
            other => panic!("expected a service's error, got {other:?}"),
        })
        .collect();
    failed.sort();
    assert_eq!(failed, ["east", "north", "south"]);

    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_at_the_count() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;
    let running = start_venues(&server, &client).await;

    let quiet = Duration::from_secs(3);
    let started = Instant::now();
    let replies = client
        .request_many::<Quote>(SUBJECT, &acme())
        .max_replies(2)
        .quiet(quiet)
        .deadline(Duration::from_secs(10))
        .await
        .expect("send");
    let (items, ended_by) = gather(replies).await;
    let took = started.elapsed();
    assert_eq!(items.len(), 2, "{items:?}");
    assert!(items.iter().all(Result::is_ok), "{items:?}");
    assert_eq!(ended_by, Some(EndedBy::MaxReplies));
    assert!(
        took < quiet,
        "ended at the second reply, not the quiet period: {took:?}"
    );

    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_after_the_quiet_period() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;
    let running = start_venues(&server, &client).await;

    let (quiet, deadline) = (Duration::from_millis(300), Duration::from_secs(10));
    let started = Instant::now();
    let replies = client
        .request_many::<Quote>(SUBJECT, &acme())
        .quiet(quiet)
        .deadline(deadline)
        .await
        .expect("send");
    let (items, ended_by) = gather(replies).await;
    let took = started.elapsed();
    assert_eq!(venues(&items), ["east", "north", "south"]);
    assert_eq!(ended_by, Some(EndedBy::Quiet));
    assert!(took >= quiet, "the quiet period runs after the last reply: {took:?}");
    assert!(took < deadline / 2, "ended well before the deadline: {took:?}");

    stop(running).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ends_at_the_deadline_with_what_came_and_unsubscribes() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;
    // Replies every 100 ms, for a minute: each comes within the quiet period.
    let (responder, inbox) = raw_responder(&server, Duration::from_millis(100), ticks(600)).await;

    let deadline = Duration::from_millis(800);
    let started = Instant::now();
    let replies = client
        .request_many::<Quote>(SUBJECT, &acme())
        .quiet(Duration::from_secs(2))
        .deadline(deadline)
        .await
        .expect("send");
    let (items, ended_by) = gather(replies).await;
    let took = started.elapsed();
    assert_eq!(ended_by, Some(EndedBy::Deadline));
    assert!(took >= deadline, "{took:?}");
    assert!(took < deadline + Duration::from_millis(1500), "{took:?}");
    assert!(items.len() >= 2, "the replies before the deadline are kept: {items:?}");
    assert!(items.iter().all(Result::is_ok), "{items:?}");

    // The responder goes on; the inbox it answers to is gone.
    let inbox = inbox.lock().unwrap().clone().expect("the responder saw the request");
    until_unsubscribed(client.nats(), &inbox).await;
    responder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_unsubscribes() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;
    let (responder, inbox) = raw_responder(&server, Duration::from_millis(50), ticks(1200)).await;

    let mut replies = client
        .request_many::<Quote>(SUBJECT, &acme())
        .quiet(Duration::from_secs(30))
        .deadline(Duration::from_secs(60))
        .await
        .expect("send");
    let first = replies.next().await.expect("a reply").expect("a quote");
    assert_eq!(first.venue, "tick-0");
    let inbox = inbox.lock().unwrap().clone().expect("the responder saw the request");
    // Still listening while the stream is held: the probe is answered by nobody, not refused.
    assert!(!unsubscribed(client.nats(), &inbox).await, "unsubscribed too early");
    drop(replies);
    until_unsubscribed(client.nats(), &inbox).await;
    responder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_responders_is_the_error() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;

    let quiet = Duration::from_secs(5);
    let started = Instant::now();
    let replies = client
        .request_many::<Quote>("gather.nobody", &acme())
        .quiet(quiet)
        .deadline(Duration::from_secs(10))
        .await
        .expect("send");
    let (items, ended_by) = gather(replies).await;
    let took = started.elapsed();
    assert_eq!(items.len(), 1, "{items:?}");
    let error = items.into_iter().next().unwrap().unwrap_err();
    assert!(
        matches!(&error, RequestError::NoResponders { subject } if subject == "gather.nobody"),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "no service answers on `gather.nobody`");
    assert_eq!(ended_by, Some(EndedBy::NoResponders));
    assert!(
        took < quiet,
        "ended on the server's answer, not the quiet period: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_reply_is_an_item_error_and_the_others_still_come() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = connect(&server).await;
    let running = start_venues(&server, &client).await;
    let (responder, _) = raw_responder(&server, Duration::from_millis(1), |n| {
        (n == 0).then(|| b"\xff{not a quote".to_vec())
    })
    .await;

    // Ends at the count, not on a quiet period a loaded machine could outlast.
    let replies = client
        .request_many::<Quote>(SUBJECT, &acme())
        .max_replies(4)
        .quiet(Duration::from_secs(5))
        .await
        .expect("send");
    let (items, ended_by) = gather(replies).await;
    assert_eq!(items.len(), 4, "{items:?}");
    assert_eq!(venues(&items), ["east", "north", "south"]);
    let errors: Vec<&RequestError> = items.iter().filter_map(|item| item.as_ref().err()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(errors[0], RequestError::Decode { subject, .. } if subject == SUBJECT),
        "{:?}",
        errors[0]
    );
    assert!(errors[0].to_string().contains(SUBJECT), "{}", errors[0]);
    assert_eq!(ended_by, Some(EndedBy::MaxReplies));

    responder.abort();
    stop(running).await;
}

/// `--list` and the AsyncAPI document tell a service every instance answers (no queue group)
/// from one answered once (its group).
#[test]
fn the_list_and_asyncapi_show_no_queue_group() {
    let runtime = Runtime::builder()
        .config(Config::default())
        .handlers(["quote", "lookup"])
        .build()
        .expect("a runtime");
    let list = runtime.list();
    let row = |name: &str| {
        list.lines()
            .find(|line| line.split_whitespace().nth(1) == Some(name))
            .unwrap_or_else(|| panic!("no row for `{name}` in\n{list}"))
            .to_owned()
    };
    assert!(!row("quote").contains("queue"), "{list}");
    assert!(row("lookup").contains("queue gather.lookup"), "{list}");

    // Operations are named after their handlers.
    let document = runtime.asyncapi();
    assert_eq!(
        document["operations"]["quote"]["x-natty"]["queue"],
        serde_json::Value::Null
    );
    assert_eq!(document["operations"]["lookup"]["x-natty"]["queue"], "gather.lookup");
}
