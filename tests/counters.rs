//! Counters (`#[stream(counters = true)]`, `Client::counter`) on a real nats-server 2.15:
//! three processes adding at once sum exactly; a total reads back, goes down with a negative
//! addition, and is 0 where nothing was added; a stream that keeps no counters refuses with a
//! clear error; the declaration is provisioned and checked for drift; an addition repeated with
//! its key counts once; on a 3-node cluster, additions made while the stream's leader is elected
//! again and again all count, each once.

use std::path::Path;
use std::time::Duration;

use natty_runtime::testing::NatsServer;
use natty_runtime::{CounterError, StreamDef};
use natty_tests::{collect_lines, collect_stderr, run_command, send_signal, spawn_service, wait_until, Elections};

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

#[tokio::test]
async fn an_addition_repeated_with_its_key_counts_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let nats = server.client().await;
    natty_tests::counter_stream(&async_nats::jetstream::new(nats.clone()), "tally", 1).await;
    let client = natty_runtime::Client::new(nats);
    let seen = client.counter("tally.seen");
    assert_eq!(seen.add_with_key("order-1", 5).await.unwrap(), 5);
    assert_eq!(seen.add(2).await.unwrap(), 7);
    // A redelivered message counted again with its key: not counted, and the answer is the
    // total right after its first addition.
    assert_eq!(seen.add_with_key("order-1", 5).await.unwrap(), 5);
    assert_eq!(seen.get().await.unwrap(), 7);
    assert_eq!(seen.add_with_key("order-2", 1).await.unwrap(), 8);
}

/// Additions on a replicated stream while its leader is elected again every 400 ms (3-node
/// cluster, R3): every addition returns a total, and the final total counts each one once — an
/// addition whose answer was lost is sent again with its key, never counted twice or dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn additions_through_stream_leader_elections_each_count_once() {
    const ADDERS: u64 = 4;
    /// Each adder adds at least this many times, and goes on until this many elections won.
    const EACH: u64 = 60;
    const ELECTIONS: u32 = 4;
    let cluster = natty_runtime::testing::NatsCluster::start(3).await.expect("cluster");
    let nats = cluster.client().await;
    natty_tests::counter_stream(&async_nats::jetstream::new(nats.clone()), "tally", 3).await;
    let client = natty_runtime::Client::new(nats.clone());
    let elections = std::sync::Arc::new(Elections::start(nats.clone(), "tally", Duration::from_millis(400)));
    let adders: Vec<_> = (0..ADDERS)
        .map(|adder| {
            let (counter, elections) = (client.counter("tally.hits"), elections.clone());
            tokio::spawn(async move {
                let mut added = 0u64;
                while added < EACH || elections.won() < ELECTIONS {
                    counter
                        .add(1)
                        .await
                        .unwrap_or_else(|error| panic!("adder {adder}, addition {added}: {error}"));
                    added += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                added
            })
        })
        .collect();
    let mut added = 0;
    for adder in adders {
        added += adder.await.unwrap();
    }
    let won = std::sync::Arc::into_inner(elections)
        .expect("the adders are done")
        .stop()
        .await;
    // Read right after the last step-down: the read rides through that election.
    let total = client.counter("tally.hits").get().await.expect("the total");
    assert_eq!(total, i128::from(added), "each addition counted once");
    eprintln!("{added} additions through {won} stream leader elections, each counted once");
}
