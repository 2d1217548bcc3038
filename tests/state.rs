//! Application state: one value given to the runtime reaches a handler of every kind that takes
//! it as `State<T>` (a consumer, a subscription, a service, a KV watch, a leader task), found by
//! type beside a second state; and a handler taking a state nobody gave stops the service at
//! startup, naming the handler and the type, before anything connects.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_runtime::{Config, Error, Runtime};
use natty_tests::{wait_until, Job};

/// What the handlers record: which kinds got the state, and with which greeting.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<String>>>);

impl Seen {
    fn record(&self, kind: &str, greeting: &Greeting) {
        self.0.lock().unwrap().push(format!("{kind}:{}", greeting.0));
    }

    fn kinds(&self) -> Vec<String> {
        let mut kinds = self.0.lock().unwrap().clone();
        kinds.sort();
        kinds.dedup();
        kinds
    }
}

/// A second state type, to show each is found by its type.
#[derive(Clone)]
struct Greeting(&'static str);

/// A third, which nobody gives.
#[derive(Clone)]
struct Database;

#[stream(name = "state-jobs", subjects = ["state.jobs.>"])]
struct Jobs;

#[consumer(stream = "state-jobs", durable = "stateful")]
async fn consume(_job: Job, State(seen): State<Seen>, greeting: State<Greeting>) {
    seen.record("consumer", &greeting);
}

#[subscribe(subject = "state.events")]
async fn subscribe(_job: Job, State(seen): State<Seen>, State(greeting): State<Greeting>) {
    seen.record("subscribe", &greeting);
}

#[service(subject = "state.ask")]
async fn answer(job: Job, State(seen): State<Seen>, State(greeting): State<Greeting>) -> Result<Job, std::io::Error> {
    seen.record("service", &greeting);
    Ok(job)
}

#[kv_bucket(name = "state-settings")]
struct Settings;

#[kv_watch(bucket = "state-settings", key = "limits")]
async fn watch(_change: KvChange<Job>, State(seen): State<Seen>, State(greeting): State<Greeting>) {
    seen.record("kv_watch", &greeting);
}

#[leader(bucket = "state-election", key = "leader", ttl = "2s")]
async fn lead(lease: Lease, State(seen): State<Seen>, State(greeting): State<Greeting>) -> Result<(), std::io::Error> {
    seen.record("leader", &greeting);
    lease.lost().await;
    Ok(())
}

#[consumer(stream = "state-jobs", durable = "needs-a-database")]
async fn store(_job: Job, State(_db): State<Database>) {}

const WITH_STATE: [&str; 5] = ["consume", "subscribe", "answer", "watch", "lead"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_handler_kind_takes_the_state_by_type() {
    let server = NatsServer::start().await.expect("nats-server");
    let seen = Seen::default();
    let runtime = Runtime::builder()
        .url(server.url())
        .handlers(WITH_STATE)
        .state(seen.clone())
        .state(Greeting("hello"))
        .build()
        .expect("runtime");
    let running = RunningRuntime::spawn(runtime);
    let config = Config::from_lookup(|_| None).unwrap();
    let client = Client::connect_with(&config, &server.url()).await.expect("connect");

    // Each kind is poked until it has recorded: the subscription and the watch may not be
    // listening yet when the first message goes out.
    wait_until(Duration::from_secs(20), "every handler kind to record", || async {
        let job = Job { id: 1 };
        let _ = client.publish("state.jobs.1", &job).await;
        let _ = client
            .nats()
            .publish("state.events", serde_json::to_vec(&job).unwrap().into())
            .await;
        let _ = client.request::<_, Job>("state.ask", &job).await;
        if let Ok(kv) = client.kv::<Job>("state-settings").await {
            let _ = kv.put("limits", &job).await;
        }
        seen.kinds().len() == WITH_STATE.len()
    })
    .await;
    assert_eq!(
        seen.kinds(),
        [
            "consumer:hello",
            "kv_watch:hello",
            "leader:hello",
            "service:hello",
            "subscribe:hello"
        ]
    );
    running.stop().await.expect("drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_never_given_is_a_startup_error_naming_the_handler_and_the_type() {
    // No server at this address: the check comes before connecting.
    let runtime = Runtime::builder()
        .url("nats://127.0.0.1:1")
        .handlers(["store"])
        .state(Seen::default())
        .build()
        .expect("runtime");
    let error = RunningRuntime::spawn(runtime).stop().await.unwrap_err();
    let text = error.to_string();
    assert!(
        matches!(&error, Error::MissingState { handler, .. } if handler == "store"),
        "{text}"
    );
    assert!(
        text.contains("State<state::Database>") && text.contains("tests/state.rs"),
        "{text}"
    );
    assert!(text.contains(".state(value)") && text.contains("run_with"), "{text}");
}
