//! Counters (`#[stream(counters = true)]`, `Client::counter`) on a real nats-server 2.15:
//! three processes adding at once sum exactly; a total reads back, goes down with a negative
//! addition, and is 0 where nothing was added; a stream that keeps no counters refuses with a
//! clear error; the declaration is provisioned and checked for drift.

use std::path::Path;
use std::time::Duration;

use natty_runtime::testing::NatsServer;
use natty_runtime::{CounterError, StreamDef};
use natty_tests::{collect_lines, collect_stderr, run_command, send_signal, spawn_service, wait_until};

const COUNTER: &str = env!("CARGO_BIN_EXE_natty-test-counter");
const WAIT: Duration = Duration::from_secs(60);
const TIMES: u64 = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additions_from_three_processes_at_once_sum_exactly() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let nats = server.client().await;
    let times = TIMES.to_string();
    let mut adders = Vec::new();
    for _ in 0..3 {
        let mut adder = spawn_service(Path::new(COUNTER), Some(&url), &[("COUNTER_TIMES", &times)]);
        let (out, err) = (collect_lines(&mut adder), collect_stderr(&mut adder));
        wait_until(WAIT, "the adder running", || async {
            err.lock().unwrap().iter().any(|line| line.contains("natty is running"))
        })
        .await;
        adders.push((adder, out, err));
    }
    // Declared with counters = true, and so provisioned.
    let js = async_nats::jetstream::new(nats.clone());
    let mut hits = js.get_stream("hits").await.expect("the hits stream");
    assert!(hits.info().await.unwrap().config.allow_message_counter);

    // One request reaches all three (no queue group): they add at once.
    nats.publish("counter.go", "{}".into()).await.unwrap();
    nats.flush().await.unwrap();
    wait_until(WAIT, "every adder done", || async {
        adders
            .iter()
            .all(|(_, out, _)| out.lock().unwrap().iter().any(|line| line.starts_with("done ")))
    })
    .await;
    for (_, out, _) in &adders {
        let lines = out.lock().unwrap();
        assert!(!lines.iter().any(|line| line.starts_with("failed")), "{lines:?}");
    }
    let client = natty_runtime::Client::new(nats.clone());
    let total = client.counter("hits.total");
    assert_eq!(
        total.get().await.unwrap(),
        i128::from(3 * TIMES),
        "every addition counted once"
    );
    // The largest total an adder saw last is the final one.
    let finals: Vec<i128> = adders
        .iter()
        .map(|(_, out, _)| {
            let lines = out.lock().unwrap();
            let done = lines.iter().find(|line| line.starts_with("done ")).unwrap();
            done["done ".len()..].parse().unwrap()
        })
        .collect();
    assert_eq!(finals.iter().max(), Some(&i128::from(3 * TIMES)), "{finals:?}");

    // Down, and nothing where nothing was added.
    assert_eq!(total.add(-(TIMES as i64)).await.unwrap(), i128::from(2 * TIMES));
    assert_eq!(total.get().await.unwrap(), i128::from(2 * TIMES));
    assert_eq!(client.counter("hits.never").get().await.unwrap(), 0);

    // The server's stream is as declared.
    let (code, out, err) = run_command(Path::new(COUNTER), Some(&url), &["--check"], WAIT).await;
    assert_eq!(code, Some(0), "{out}{err}");
    for (mut adder, _, _) in adders {
        send_signal(adder.id().unwrap(), "TERM");
        adder.wait().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_counters_refuses_an_addition_and_is_drift() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    // The service's stream, made by hand without counters.
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "hits".into(),
        subjects: vec!["hits.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let client = natty_runtime::Client::new(nats);
    let error = client.counter("hits.total").add(1).await.unwrap_err();
    assert!(matches!(error, CounterError::Add { .. }), "{error:?}");
    let text = format!("{error}");
    assert!(text.contains("hits.total"), "{text}");
    let error = client.counter("nowhere.total").get().await.unwrap_err();
    assert!(matches!(error, CounterError::Read { .. }), "{error:?}");
    // The declaration says counters: `--check` names the difference.
    let (code, out, err) = run_command(Path::new(COUNTER), Some(&url), &["--check"], WAIT).await;
    assert_ne!(code, Some(0), "{out}{err}");
    assert!(out.contains("counters"), "{out}{err}");
    let _ = StreamDef::new("hits", &["hits.>"]).counters(true);
}
