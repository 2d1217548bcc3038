//! `#[capture]` against a real nats-server, run as a real process (`natty-test-capture`):
//! every format read back with its own reader, a SIGKILL mid-block, SIGKILLs right after blocks
//! are stored, a stream deleted and created again, undecodable payloads, a panicking key
//! function and keys the path template cannot take, and a store outage under a memory budget.

use std::time::Duration;

use natty_runtime::testing::NatsServer;
use natty_tests::capture::{create_readings_stream, files, manifests, publish_readings, settled, Tally};
use natty_tests::{collect_stderr, send_signal, spawn_service, wait_until, Reading};

const CAPTURE: &str = env!("CARGO_BIN_EXE_natty-test-capture");
const SENSORS: u64 = 10;

/// Store variables for a worker, all pointing at folders under `root`.
fn folders(root: &std::path::Path) -> Vec<(String, String)> {
    [
        "CSV_STORE",
        "NDJSON_STORE",
        "PARQUET_STORE",
        "RAW_STORE",
        "DRAIN_STORE",
        "FRAGILE_STORE",
    ]
    .iter()
    .map(|var| {
        let folder = root.join(var.trim_end_matches("_STORE").to_lowercase());
        (var.to_string(), format!("file://{}", folder.display()))
    })
    .collect()
}

/// Waits for `condition`; on timeout, fails with the capture's logs.
async fn wait_logged<F, Fut>(
    timeout: Duration,
    what: &str,
    logs: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    mut condition: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; capture logs:\n{}",
            logs.lock().unwrap().join("\n")
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Stops a worker with SIGTERM and checks that it exits 0 within the drain time.
async fn stop(mut child: tokio::process::Child, logs: &std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    send_signal(child.id().expect("pid"), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the capture exits after SIGTERM")
        .expect("wait");
    assert!(
        status.success(),
        "capture exited with {status}; logs:\n{}",
        logs.lock().unwrap().join("\n")
    );
}

/// A free loopback address for a capture's metrics endpoint.
fn metrics_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Whether the capture serving metrics at `metrics` holds `count` messages: in open blocks, or
/// redelivered and waiting for the ledger. Delivered is not enough: what reached the process but
/// none of these yet is handed back to the server on the drain.
async fn holds(metrics: std::net::SocketAddr, count: u64) -> bool {
    let Ok((200, body)) = natty_tests::http_get(metrics, "/metrics").await else {
        return false;
    };
    let held: f64 = body
        .lines()
        .filter(|line| line.starts_with("natty_capture_held_messages{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    held == count as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_reads_back_exactly_the_published_records() {
    const COUNT: u64 = 100_000;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let env = folders(dir.path());

    create_readings_stream(&client).await;
    publish_readings(&client, 1..COUNT + 1, SENSORS).await;
    // The four formats; not `to_drain`, which would hold all 100,000 for an hour, pinging them.
    let env = [
        env_refs(&env),
        vec![("NATTY_HANDLERS", "to_csv,to_ndjson,to_parquet,to_raw")],
    ]
    .concat();
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    for durable in ["csv", "ndjson", "parquet", "raw"] {
        wait_logged(
            Duration::from_secs(120),
            &format!("capture `{durable}` to store everything"),
            &logs,
            || settled(&js, "readings", durable, COUNT),
        )
        .await;
    }
    stop(child, &logs).await;

    for format in ["csv", "ndjson", "parquet", "raw"] {
        let tally = Tally::of_folder(&dir.path().join(format), SENSORS);
        // Ids are 1-based: stream sequence n carries id n.
        tally.assert_exactly_once(1..COUNT + 1, format);
        assert!(
            tally.blocks >= SENSORS as usize,
            "{format}: at least one block per sensor"
        );
    }
    // No temporary file is left anywhere, and every block is named <stream>-<first>-<last>.
    for path in files(dir.path()) {
        let name = path.file_name().unwrap().to_string_lossy();
        assert!(
            name.starts_with("readings-") && !path.to_string_lossy().contains(".natty-tmp"),
            "unexpected file {}",
            path.display()
        );
    }
    // The CSV path template put each block under {stream}/{key}/{date}.
    let csv = files(&dir.path().join("csv"));
    assert!(csv
        .iter()
        .all(|path| path.to_string_lossy().contains("/csv/readings/sensor-")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capture_killed_mid_block_stores_every_record_exactly_once_after_restart() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let env = folders(dir.path());
    let env = [env_refs(&env), vec![("NATTY_HANDLERS", "to_ndjson")]].concat();
    create_readings_stream(&client).await;

    // A steady flow: 10 sensors, about 1,500 readings a second, for about 10 s.
    let publisher = {
        let client = client.clone();
        tokio::spawn(async move {
            for batch in 0..100u64 {
                publish_readings(&client, batch * 150 + 1..(batch + 1) * 150 + 1, SENSORS).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut first = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let first_logs = collect_stderr(&mut first);
    // Wait for stored blocks, then kill in the middle of a 2 s window: blocks are open (their
    // messages delivered, unacked), none is being stored.
    wait_until(Duration::from_secs(30), "blocks stored before the kill", || {
        let stored = first_logs
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("block stored"))
            .count();
        async move { stored >= 2 * SENSORS as usize }
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into_window = (now.as_nanos() % 2_000_000_000) as u64;
    let until_mid_window = (3_000_000_000 - into_window) % 2_000_000_000;
    tokio::time::sleep(Duration::from_nanos(until_mid_window)).await;
    send_signal(first.id().expect("pid"), "KILL");
    first.wait().await.expect("wait for the killed capture");
    let info = js
        .get_stream("readings")
        .await
        .unwrap()
        .consumer_info("ndjson")
        .await
        .unwrap();
    assert!(info.num_ack_pending > 0, "the kill left open blocks behind: {info:?}");

    // A crash mid-write leaves a temporary behind; the restarted capture removes it.
    let temporaries = dir.path().join("ndjson/.natty-tmp");
    std::fs::create_dir_all(&temporaries).unwrap();
    std::fs::write(temporaries.join("left-by-a-crash"), b"partial").unwrap();

    let mut second = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let second_logs = collect_stderr(&mut second);
    publisher.await.expect("publisher");
    let last = 100 * 150;
    wait_logged(
        Duration::from_secs(60),
        "everything stored after the restart",
        &second_logs,
        || settled(&js, "readings", "ndjson", last),
    )
    .await;
    stop(second, &second_logs).await;

    let tally = Tally::of_folder(&dir.path().join("ndjson"), SENSORS);
    tally.assert_exactly_once(1..last + 1, "ndjson after SIGKILL and restart");
    let leftovers: Vec<_> = files(dir.path())
        .into_iter()
        .filter(|path| !path.file_name().unwrap().to_string_lossy().ends_with(".ndjson.zst"))
        .collect();
    assert!(leftovers.is_empty(), "partial or temporary files remain: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_payload_is_dead_lettered_and_does_not_hold_up_its_block() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let env = folders(dir.path());
    let env = [env_refs(&env), vec![("NATTY_HANDLERS", "to_csv")]].concat();
    create_readings_stream(&client).await;

    publish_readings(&client, 1..51, SENSORS).await;
    js.publish("readings.sensor-3", "{not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    publish_readings(&client, 52..101, SENSORS).await;

    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    // Every valid record is stored and acked within a window and its grace, not held back.
    wait_logged(Duration::from_secs(20), "the valid records stored", &logs, || {
        settled(&js, "readings", "csv", 100)
    })
    .await;
    let tally = Tally::of_folder(&dir.path().join("csv"), SENSORS);
    let ids: Vec<u64> = tally.seen.keys().copied().collect();
    assert_eq!(ids, (1..51).chain(52..101).collect::<Vec<_>>());

    let dead = natty_tests::read_all(&js, "natty-dead-letters", 1).await;
    assert_eq!(dead.len(), 1, "one dead letter");
    let headers = dead[0].headers.as_ref().expect("dead-letter headers");
    assert_eq!(headers.get("Natty-Original-Sequence").unwrap().as_str(), "51");
    assert_eq!(headers.get("Natty-Original-Consumer").unwrap().as_str(), "csv");
    let reason = headers.get("Natty-Dead-Letter-Reason").unwrap().as_str().to_string();
    assert!(reason.contains("decode"), "reason: {reason}");
    assert_eq!(&dead[0].payload[..], b"{not json");
    stop(child, &logs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stores_the_open_blocks_before_exiting() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let env = folders(dir.path());
    let metrics = metrics_addr();
    let metrics_addr = metrics.to_string();
    let env = [
        env_refs(&env),
        vec![("NATTY_HANDLERS", "to_drain"), ("NATTY_METRICS_ADDR", &metrics_addr)],
    ]
    .concat();
    create_readings_stream(&client).await;
    publish_readings(&client, 1..1001, SENSORS).await;
    let info = || async {
        let stream = js.get_stream("readings").await.ok()?;
        stream.consumer_info("drain").await.ok()
    };

    // Each run is stopped once everything left is delivered to it. Its windows last an hour,
    // so it stores nothing while running; on SIGTERM it stores the blocks it holds and hands
    // back what it had received but not yet taken in (how much that is depends on timing).
    // The third run waits until it holds everything left, redeliveries included: its drain
    // must store it all.
    const LAST_RUN: usize = 3;
    let mut runs = 0;
    while !settled(&js, "readings", "drain", 1000).await {
        runs += 1;
        assert!(
            runs <= LAST_RUN,
            "the run that held everything left did not store it all"
        );
        let stored_before = files(dir.path()).len();
        let left = 1000 - Tally::of_folder(&dir.path().join("drain"), SENSORS).seen.len() as u64;
        let delivered_before = info().await.map_or(0, |info| info.delivered.consumer_sequence);
        let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
        let logs = collect_stderr(&mut child);
        wait_logged(
            Duration::from_secs(20),
            "everything left delivered to this run",
            &logs,
            || async {
                info()
                    .await
                    .is_some_and(|info| info.delivered.consumer_sequence >= delivered_before + left)
            },
        )
        .await;
        if runs == LAST_RUN {
            wait_logged(Duration::from_secs(20), "everything left held", &logs, || {
                holds(metrics, left)
            })
            .await;
        }
        assert_eq!(
            files(dir.path()).len(),
            stored_before,
            "run {runs} stored a block before its drain"
        );
        let logs_after = logs.clone();
        stop(child, &logs).await;
        // What the run stored, it acked; the rest it handed back, still to be done. (The server
        // applies acks from a queue of its own, a moment after receiving them.)
        let stored = Tally::of_folder(&dir.path().join("drain"), SENSORS).seen.len() as u64;
        wait_logged(
            Duration::from_secs(5),
            "exactly the stored records acked",
            &logs_after,
            || async {
                info()
                    .await
                    .is_some_and(|info| info.num_ack_pending as u64 + info.num_pending == 1000 - stored)
            },
        )
        .await;
        assert!(
            logs_after
                .lock()
                .unwrap()
                .iter()
                .any(|line| line.contains("capture draining")),
            "run {runs} drained its capture"
        );
    }
    Tally::of_folder(&dir.path().join("drain"), SENSORS).assert_exactly_once(1..1001, "drained blocks");
}

/// The NDJSON blocks under `root`, by path.
fn ndjson_blocks(root: &std::path::Path) -> std::collections::BTreeSet<std::path::PathBuf> {
    files(root)
        .into_iter()
        .filter(|path| path.to_string_lossy().ends_with(".ndjson.zst"))
        .collect()
}

/// Waits, polling every millisecond off the runtime, until a block not in `known` appears
/// under `root`; returns it.
async fn new_block(
    root: &std::path::Path,
    known: &std::collections::BTreeSet<std::path::PathBuf>,
) -> std::path::PathBuf {
    let (root, known) = (root.to_path_buf(), known.clone());
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(path) = ndjson_blocks(&root).into_iter().find(|path| !known.contains(path)) {
                return path;
            }
            assert!(std::time::Instant::now() < deadline, "no new block within 60 s");
            std::thread::sleep(Duration::from_millis(1));
        }
    })
    .await
    .expect("watch for a new block")
}

/// The crash issue 14 names: a block stored, the process killed before all of its acks reach
/// the server. The redelivered messages, joined by new ones of their window, would form a block
/// with other boundaries: both files, the records twice. Twelve times in a row, while readings
/// keep flowing, the capture is killed the moment a new block file appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_as_soon_as_a_block_appears_stores_every_record_exactly_once() {
    const KILLS: usize = 12;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ndjson");
    let env = folders(dir.path());
    // Debug lines of the capture say when the ledger recognised a stored message.
    let env = [
        env_refs(&env),
        vec![
            ("NATTY_HANDLERS", "to_ndjson"),
            ("RUST_LOG", "info,async_nats=warn,natty_runtime::capture=debug"),
        ],
    ]
    .concat();
    create_readings_stream(&client).await;

    // About 1,500 readings a second over 10 sensors until told to stop.
    let stop_publishing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (client, stop) = (client.clone(), stop_publishing.clone());
        tokio::spawn(async move {
            let mut next = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                publish_readings(&client, next..next + 150, SENSORS).await;
                next += 150;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            next - 1
        })
    };
    let mut recognised = 0;
    for kill in 0..KILLS {
        let known = ndjson_blocks(&root);
        let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
        let logs = collect_stderr(&mut child);
        let block = new_block(&root, &known).await;
        send_signal(child.id().expect("pid"), "KILL");
        child.wait().await.expect("wait for the killed capture");
        recognised += logs
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.contains("a stored block holds it"))
            .count();
        eprintln!("kill {kill}: killed as {} appeared", block.display());
    }
    stop_publishing.store(true, std::sync::atomic::Ordering::Relaxed);
    let last = publisher.await.expect("publisher");

    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    wait_logged(
        Duration::from_secs(60),
        "everything stored after the last restart",
        &logs,
        || settled(&js, "readings", "ndjson", last),
    )
    .await;
    recognised += logs
        .lock()
        .unwrap()
        .iter()
        .filter(|line| line.contains("a stored block holds it"))
        .count();
    stop(child, &logs).await;

    let tally = Tally::of_folder(&root, SENSORS);
    eprintln!(
        "{last} readings in {} blocks after {KILLS} kills; {recognised} redelivered messages acked because a stored block held them",
        tally.blocks
    );
    tally.assert_exactly_once(1..last + 1, "ndjson after a SIGKILL right after each of 12 stores");
    // Otherwise no kill fell between a store and its acks, and the run proved nothing.
    assert!(recognised > 0, "no redelivered message was found in a stored block");
    // Once everything is acked, a stopped capture leaves only blocks behind.
    assert_eq!(
        manifests(&root),
        Vec::<std::path::PathBuf>::new(),
        "manifests left after the stop"
    );
}

/// Sleeps until 100 ms into the next 2 s window (the test captures' `every`), so that a burst
/// published then falls in one window and each sensor's block spans the same sequences in
/// both incarnations: without the incarnation in their names, the second would overwrite the
/// first. (Timing to make the collision likely, not synchronisation.)
async fn at_the_start_of_a_window() {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let into_window = (now.as_nanos() % 2_000_000_000) as u64;
    tokio::time::sleep(Duration::from_nanos(2_100_000_000 - into_window)).await;
}

/// A stream deleted and created again numbers its messages from 1 again. Every reading of
/// both incarnations is stored once, and no block of the first is overwritten by the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_created_anew_is_captured_whole_without_overwriting_old_blocks() {
    const HALF: u64 = 500;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ndjson");
    let env = folders(dir.path());
    let env = [env_refs(&env), vec![("NATTY_HANDLERS", "to_ndjson")]].concat();
    create_readings_stream(&client).await;
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    natty_tests::wait_for_consumer(&js, "readings", "ndjson", Duration::from_secs(20)).await;

    at_the_start_of_a_window().await;
    publish_readings(&client, 1..HALF + 1, SENSORS).await;
    wait_logged(Duration::from_secs(30), "the first incarnation stored", &logs, || {
        settled(&js, "readings", "ndjson", HALF)
    })
    .await;
    let first: Vec<(std::path::PathBuf, Vec<u8>)> = ndjson_blocks(&root)
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).unwrap();
            (path, bytes)
        })
        .collect();

    js.delete_stream("readings").await.expect("delete the stream");
    create_readings_stream(&client).await;
    at_the_start_of_a_window().await;
    // Sequences 1 to 500 again: the same sequences, the same sensors as the first time.
    publish_readings(&client, HALF + 1..2 * HALF + 1, SENSORS).await;
    let info = js.get_stream("readings").await.unwrap().cached_info().state.clone();
    assert_eq!((info.first_sequence, info.last_sequence), (1, HALF), "{info:?}");
    wait_logged(Duration::from_secs(60), "the second incarnation stored", &logs, || {
        settled(&js, "readings", "ndjson", HALF)
    })
    .await;
    stop(child, &logs).await;

    for (path, bytes) in &first {
        let now = std::fs::read(path).unwrap_or_default();
        assert!(&now == bytes, "{} was overwritten by the new stream", path.display());
    }
    let tally = Tally::of_folder(&root, SENSORS);
    tally.assert_exactly_once(1..2 * HALF + 1, "both incarnations");
    assert!(
        tally.blocks >= 2 * SENSORS as usize,
        "blocks of each incarnation: {}",
        tally.blocks
    );
}

/// A key function that panics, and a key the path template cannot take (its `{site}` field is
/// left out), are each their message's failure: dead-lettered with the reason, while the
/// capture goes on storing the rest. Before, either crashed the service into a restart loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_key_or_a_key_the_template_cannot_take_is_dead_lettered() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("fragile");
    let env = folders(dir.path());
    let env = [env_refs(&env), vec![("NATTY_HANDLERS", "to_fragile")]].concat();
    create_readings_stream(&client).await;

    publish_readings(&client, 1..51, SENSORS).await;
    for (id, note) in [(51, "panic"), (52, "nowhere")] {
        let reading = Reading {
            note: Some(note.to_owned()),
            ..Reading::new(id, SENSORS)
        };
        let subject = format!("readings.{}", reading.sensor);
        js.publish(subject, serde_json::to_vec(&reading).unwrap().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    publish_readings(&client, 53..101, SENSORS).await;

    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    wait_logged(Duration::from_secs(30), "the good readings stored", &logs, || {
        settled(&js, "readings", "fragile", 100)
    })
    .await;
    let dead = natty_tests::read_all(&js, "natty-dead-letters", 2).await;
    assert_eq!(dead.len(), 2, "two dead letters");
    let reason = |sequence: &str| {
        let letter = dead
            .iter()
            .find(|m| {
                m.headers
                    .as_ref()
                    .unwrap()
                    .get("Natty-Original-Sequence")
                    .unwrap()
                    .as_str()
                    == sequence
            })
            .unwrap_or_else(|| panic!("no dead letter of sequence {sequence}"));
        let headers = letter.headers.as_ref().unwrap();
        assert_eq!(headers.get("Natty-Original-Consumer").unwrap().as_str(), "fragile");
        headers.get("Natty-Dead-Letter-Reason").unwrap().as_str().to_owned()
    };
    let panicked = reason("51");
    assert!(
        panicked.contains("panicked") && panicked.contains("no key for reading 51"),
        "{panicked}"
    );
    let unfilled = reason("52");
    assert!(
        unfilled.contains("path template") && unfilled.contains("{site}"),
        "{unfilled}"
    );

    // Still capturing after both.
    assert!(
        child.try_wait().unwrap().is_none(),
        "the capture process is still running"
    );
    publish_readings(&client, 101..151, SENSORS).await;
    wait_logged(Duration::from_secs(30), "later readings stored", &logs, || {
        settled(&js, "readings", "fragile", 150)
    })
    .await;
    stop(child, &logs).await;
    let tally = Tally::of_folder(&root, SENSORS);
    let ids: Vec<u64> = tally.seen.keys().copied().collect();
    assert_eq!(ids, (1..51).chain(53..151).collect::<Vec<_>>());
    assert!(tally.seen.values().all(|n| *n == 1), "each once");
    assert!(manifests(&root).is_empty(), "manifests left after the stop");
}

/// The other half of a stream created anew: messages of the old stream still held in open
/// blocks when the new one delivers the same sequences. Neither is taken for the other: one
/// drain stores both incarnations' readings, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_held_from_a_deleted_stream_do_not_hide_the_new_streams_same_sequences() {
    const HALF: u64 = 100;
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("drain");
    let env = folders(dir.path());
    // Its metrics tell when readings are in blocks.
    let metrics = metrics_addr();
    let metrics_addr = metrics.to_string();
    let env = [
        env_refs(&env),
        vec![("NATTY_HANDLERS", "to_drain"), ("NATTY_METRICS_ADDR", &metrics_addr)],
    ]
    .concat();
    create_readings_stream(&client).await;
    let delivered = |last: u64| {
        let js = js.clone();
        async move {
            let Ok(stream) = js.get_stream("readings").await else {
                return false;
            };
            stream
                .consumer_info("drain")
                .await
                .is_ok_and(|info| info.delivered.stream_sequence >= last && info.num_pending == 0)
        }
    };

    // Hour-long windows: everything delivered stays held in open blocks until the drain.
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    publish_readings(&client, 1..HALF + 1, SENSORS).await;
    wait_logged(Duration::from_secs(20), "the first stream delivered", &logs, || {
        delivered(HALF)
    })
    .await;
    wait_logged(
        Duration::from_secs(20),
        "the first stream's readings in blocks",
        &logs,
        || holds(metrics, HALF),
    )
    .await;
    js.delete_stream("readings").await.expect("delete the stream");
    create_readings_stream(&client).await;
    publish_readings(&client, HALF + 1..2 * HALF + 1, SENSORS).await;
    wait_logged(Duration::from_secs(30), "the new stream delivered", &logs, || {
        delivered(HALF)
    })
    .await;
    wait_logged(
        Duration::from_secs(30),
        "both streams' readings in blocks",
        &logs,
        || holds(metrics, 2 * HALF),
    )
    .await;
    assert!(files(&root).is_empty(), "nothing stored before the drain");
    stop(child, &logs).await;

    let tally = Tally::of_folder(&root, SENSORS);
    tally.assert_exactly_once(1..2 * HALF + 1, "both streams' readings after one drain");
    wait_logged(Duration::from_secs(5), "the new stream's readings acked", &logs, || {
        settled(&js, "readings", "drain", HALF)
    })
    .await;
}

/// A capture with a memory budget of 256 KiB (`to_bounded`, about a thousand held readings)
/// whose store fails: it stops pulling instead of holding more. While the store is down the
/// server keeps the readings (`num_pending` stays up), the capture holds a bounded number
/// (`num_ack_pending`), and nothing it holds is redelivered; once the store is back, every
/// reading is stored exactly once. Without the budget the capture pulls all 20,000.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_under_a_memory_budget_leaves_messages_on_the_server() {
    const BEFORE: u64 = 1_000;
    const LAST: u64 = 21_000;
    /// The budget's share of readings, plus a pull's worth already asked for (1000) and slack.
    const MOST_HELD: i64 = 3_000;
    const ACK_WAIT: Duration = Duration::from_secs(4);
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bounded");
    std::fs::create_dir_all(&root).unwrap();
    let store = format!("file://{}", root.display());
    let env = [("NATTY_HANDLERS", "to_bounded"), ("BOUNDED_STORE", store.as_str())];

    create_readings_stream(&client).await;
    let mut child = spawn_service(CAPTURE.as_ref(), Some(&server.url()), &env);
    let logs = collect_stderr(&mut child);
    publish_readings(&client, 1..BEFORE + 1, SENSORS).await;
    wait_logged(Duration::from_secs(60), "the first readings stored", &logs, || {
        settled(&js, "readings", "bounded", BEFORE)
    })
    .await;

    // The store's folder replaced by a file: every write under it fails, even as root.
    let away = dir.path().join("bounded.away");
    std::fs::rename(&root, &away).unwrap();
    std::fs::write(&root, b"not a folder").unwrap();
    publish_readings(&client, BEFORE + 1..LAST + 1, SENSORS).await;
    let stream = js.get_stream("readings").await.expect("stream");
    // Three ack_waits: long enough for held messages that missed their pings to come back.
    let observed = tokio::time::Instant::now();
    let mut most_held = 0;
    let mut last = None;
    while observed.elapsed() < 3 * ACK_WAIT {
        let info = stream.consumer_info("bounded").await.expect("consumer info");
        let context = || format!("{info:?}\ncapture logs:\n{}", logs.lock().unwrap().join("\n"));
        assert!(
            (info.num_ack_pending as i64) <= MOST_HELD,
            "the capture held more than its memory budget allows: {}",
            context()
        );
        assert_eq!(
            info.ack_floor.stream_sequence,
            BEFORE,
            "acked during the outage: {}",
            context()
        );
        assert_eq!(info.num_redelivered, 0, "a held message was redelivered: {}", context());
        most_held = most_held.max(info.num_ack_pending as i64);
        last = Some(info);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let last = last.expect("a sample");
    assert!(
        most_held > 0 && last.num_pending > 0,
        "the capture held some readings and left the rest on the server: {last:?}"
    );
    assert!(
        child.try_wait().expect("poll the capture").is_none(),
        "the capture exited during the outage; logs:\n{}",
        logs.lock().unwrap().join("\n")
    );

    std::fs::remove_file(&root).unwrap();
    std::fs::rename(&away, &root).unwrap();
    wait_logged(
        Duration::from_secs(120),
        "every reading stored after the outage",
        &logs,
        || settled(&js, "readings", "bounded", LAST),
    )
    .await;
    stop(child, &logs).await;
    Tally::of_folder(&root, SENSORS).assert_exactly_once(1..LAST + 1, "ndjson across the outage");
}
