//! `#[capture]` storing blocks in object stores, run as a real process (`natty-test-capture`)
//! against a real nats-server and real store servers: moto for S3, Azurite for Azure Blob
//! storage. Blocks read back exactly once from each, and an S3 outage acks nothing, keeps every
//! held message alive, and loses nothing once the store is back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::Info;
use natty_runtime::testing::stores::{Azurite, MotoServer};
use natty_runtime::testing::NatsServer;
use natty_tests::capture::{create_readings_stream, publish_readings, settled, Tally};
use natty_tests::{collect_stderr, send_signal, spawn_service};
use tokio::time::Instant;

const CAPTURE: &str = env!("CARGO_BIN_EXE_natty-test-capture");
const SENSORS: u64 = 10;
/// The bucket or container the blocks go to.
const ARCHIVE: &str = "readings-archive";
/// The window length (`every`) of the worker's captures.
const EVERY: Duration = Duration::from_secs(2);
/// The `ack_wait` of the worker's captures.
const ACK_WAIT: Duration = Duration::from_secs(4);

type Logs = Arc<Mutex<Vec<String>>>;

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A store server's variables plus the capture to run and where it stores.
fn worker_env(store_env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    store_env
        .into_iter()
        .chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

fn dump(logs: &Logs) -> String {
    logs.lock().unwrap().join("\n")
}

/// How many lines of the logs contain `text`.
fn count_logged(logs: &Logs, text: &str) -> usize {
    logs.lock().unwrap().iter().filter(|line| line.contains(text)).count()
}

/// Waits for `condition`; on timeout, fails with the capture's logs.
async fn wait_logged<F, Fut>(timeout: Duration, what: &str, logs: &Logs, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; capture logs:\n{}",
            dump(logs)
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Stops a worker with SIGTERM and checks that it exits 0 within the drain time.
async fn stop(mut child: tokio::process::Child, logs: &Logs) {
    send_signal(child.id().expect("pid"), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the capture exits after SIGTERM")
        .expect("wait");
    assert!(status.success(), "capture exited with {status}; logs:\n{}", dump(logs));
}

/// How long until `phase` into a window of the worker's captures (`every = "2s"`, aligned to
/// the Unix epoch).
fn until_window_phase(phase: Duration) -> Duration {
    let every = EVERY.as_nanos();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_nanos();
    Duration::from_nanos(((phase.as_nanos() + every - now % every) % every) as u64)
}

async fn consumer_info(js: &async_nats::jetstream::Context, durable: &str) -> Info {
    js.get_stream("readings")
        .await
        .expect("the readings stream")
        .consumer_info(durable)
        .await
        .unwrap_or_else(|error| panic!("info of consumer `{durable}`: {error}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parquet_blocks_go_to_s3_and_read_back_exactly_once() {
    const COUNT: u64 = 20_000;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let moto = MotoServer::start().await.expect("moto");
    moto.create_bucket(ARCHIVE).await.expect("create the bucket");
    let store_url = format!("s3://{ARCHIVE}");
    let env = worker_env(
        moto.env(),
        &[("NATTY_HANDLERS", "to_parquet"), ("PARQUET_STORE", &store_url)],
    );

    create_readings_stream(&client).await;
    publish_readings(&client, 1..COUNT + 1, SENSORS).await;
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env_refs(&env));
    let logs = collect_stderr(&mut child);
    wait_logged(Duration::from_secs(120), "every reading stored in S3", &logs, || {
        settled(&js, "readings", "parquet", COUNT)
    })
    .await;
    stop(child, &logs).await;

    let tally = Tally::of_store(&*moto.store(ARCHIVE), SENSORS).await;
    tally.assert_exactly_once(1..COUNT + 1, "parquet in S3");
    assert!(tally.blocks >= SENSORS as usize, "at least one block per sensor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_blocks_go_to_azure_blob_storage() {
    const COUNT: u64 = 10_000;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let azurite = Azurite::start().await.expect("azurite");
    azurite.create_container(ARCHIVE).await.expect("create the container");
    let store_url = format!("az://{ARCHIVE}");
    let env = worker_env(
        azurite.env(),
        &[("NATTY_HANDLERS", "to_ndjson"), ("NDJSON_STORE", &store_url)],
    );

    create_readings_stream(&client).await;
    publish_readings(&client, 1..COUNT + 1, SENSORS).await;
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env_refs(&env));
    let logs = collect_stderr(&mut child);
    wait_logged(
        Duration::from_secs(120),
        "every reading stored in Azure Blob storage",
        &logs,
        || settled(&js, "readings", "ndjson", COUNT),
    )
    .await;
    stop(child, &logs).await;

    let tally = Tally::of_store(&*azurite.store(ARCHIVE), SENSORS).await;
    tally.assert_exactly_once(1..COUNT + 1, "ndjson in Azure Blob storage");
    assert!(tally.blocks >= SENSORS as usize, "at least one block per sensor");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_acks_nothing_and_loses_nothing() {
    const BEFORE: u64 = 2_000;
    const LAST: u64 = 4_000;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let mut moto = MotoServer::start().await.expect("moto");
    moto.create_bucket(ARCHIVE).await.expect("create the bucket");
    let store_url = format!("s3://{ARCHIVE}");
    // One quick retry per request inside object_store, so each attempt of the engine fails fast
    // while moto is down and the engine's own backoff (at most 15 s) paces the retries.
    let env = worker_env(
        moto.env(),
        &[
            ("NATTY_HANDLERS", "to_parquet"),
            ("PARQUET_STORE", &store_url),
            ("NATTY_STORE_MAX_RETRIES", "1"),
            ("NATTY_STORE_RETRY_TIMEOUT", "1s"),
        ],
    );

    create_readings_stream(&client).await;
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env_refs(&env));
    let logs = collect_stderr(&mut child);
    publish_readings(&client, 1..BEFORE + 1, SENSORS).await;
    wait_logged(Duration::from_secs(60), "the first readings stored", &logs, || {
        settled(&js, "readings", "parquet", BEFORE)
    })
    .await;
    // moto keeps its objects in memory: what it holds now is gone after the restart.
    let mut stored = Tally::of_store(&*moto.store(ARCHIVE), SENSORS).await;
    stored.assert_exactly_once(1..BEFORE + 1, "parquet in S3 before the outage");
    let floor = consumer_info(&js, "parquet").await.ack_floor.stream_sequence;
    assert_eq!(floor, BEFORE, "every reading published so far is acked");
    let stored_before = count_logged(&logs, "block stored");

    moto.stop().await;
    // The new blocks open one second into their window: they are then due (window over, plus
    // its grace of 1 s) just as their first keep-alive is, so their messages' in-progress acks
    // must pass from the open block to its store task without a gap of an ack_wait.
    tokio::time::sleep(until_window_phase(Duration::from_millis(990))).await;
    publish_readings(&client, BEFORE + 1..LAST + 1, SENSORS).await;
    // Three ack_waits: a held message that missed its in-progress ack would be redelivered.
    let observed = Instant::now();
    let mut last = None;
    while observed.elapsed() < 3 * ACK_WAIT {
        let info = consumer_info(&js, "parquet").await;
        let context = || format!("{info:?}\ncapture logs:\n{}", dump(&logs));
        assert_eq!(
            info.ack_floor.stream_sequence,
            floor,
            "the ack floor moved during the outage: {}",
            context()
        );
        assert_eq!(
            info.num_redelivered,
            0,
            "a held message was redelivered: its in-progress acks lapsed: {}",
            context()
        );
        // Delivered in order and never redelivered: every message delivered since is unacked.
        assert_eq!(
            info.num_ack_pending as u64,
            info.delivered.stream_sequence - floor,
            "a message was acked (or nacked) during the outage: {}",
            context()
        );
        assert!(
            child.try_wait().expect("poll the capture").is_none(),
            "the capture exited during the outage; logs:\n{}",
            dump(&logs)
        );
        last = Some(info);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last = last.expect("at least one sample");
    assert_eq!(
        (last.num_pending, last.num_ack_pending as u64),
        (0, LAST - BEFORE),
        "every new reading delivered and held, none acked: {last:?}"
    );
    assert!(
        count_logged(&logs, "cannot store a block") > 0,
        "store failures are logged; logs:\n{}",
        dump(&logs)
    );
    assert_eq!(
        count_logged(&logs, "block stored"),
        stored_before,
        "a block was reported stored while the store was down; logs:\n{}",
        dump(&logs)
    );

    moto.restart().await.expect("restart moto");
    moto.create_bucket(ARCHIVE).await.expect("create the bucket again");
    wait_logged(
        Duration::from_secs(90),
        "the held readings stored after the outage",
        &logs,
        || settled(&js, "readings", "parquet", LAST),
    )
    .await;
    stop(child, &logs).await;

    let restored = Tally::of_store(&*moto.store(ARCHIVE), SENSORS).await;
    restored.assert_exactly_once(BEFORE + 1..LAST + 1, "parquet in S3 after the outage");
    stored.merge(restored);
    stored.assert_exactly_once(1..LAST + 1, "parquet in S3 across the outage");
}
