//! Process-level guarantees: real service binaries against a real nats-server — sharing a
//! durable, crash recovery, graceful drain, and clear startup errors.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use natty_runtime::testing::NatsServer;
use natty_tests::{create_jobs_stream, publish_jobs, run_to_exit, send_signal, spawn_service, wait_until, WorkLog};

const WORKER: &str = env!("CARGO_BIN_EXE_natty-test-worker");
const EMPTY: &str = env!("CARGO_BIN_EXE_natty-test-empty");

async fn ack_pending(server: &NatsServer) -> (u64, usize) {
    let js = async_nats::jetstream::new(server.client().await);
    let stream = js.get_stream("jobs").await.expect("jobs stream");
    let info = stream.consumer_info("workers").await.expect("consumer info");
    (info.ack_floor.stream_sequence, info.num_ack_pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_a_durable_and_handle_each_message_exactly_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    create_jobs_stream(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let logs = [dir.path().join("a.log"), dir.path().join("b.log")];
    let _a = spawn_service(
        Path::new(WORKER),
        Some(&server.url()),
        &[("WORKER_LOG", logs[0].to_str().unwrap())],
    );
    let _b = spawn_service(
        Path::new(WORKER),
        Some(&server.url()),
        &[("WORKER_LOG", logs[1].to_str().unwrap())],
    );

    const COUNT: u64 = 10_000;
    publish_jobs(&client, 1..=COUNT).await;
    wait_until(Duration::from_secs(60), "every job to be acked", || async {
        ack_pending(&server).await == (COUNT, 0)
    })
    .await;

    let a = WorkLog::read(&[&logs[0]]);
    let b = WorkLog::read(&[&logs[1]]);
    assert!(
        !a.done.is_empty() && !b.done.is_empty(),
        "both instances took work: a={} b={}",
        a.done.len(),
        b.done.len()
    );
    for log in [&a, &b] {
        assert!(
            log.done.values().all(|&n| n == 1),
            "a message was handled twice by one instance"
        );
    }
    let overlap: Vec<_> = a.done.keys().filter(|id| b.done.contains_key(id)).collect();
    assert!(overlap.is_empty(), "handled by both instances: {overlap:?}");
    let all: BTreeSet<u64> = a.done.keys().chain(b.done.keys()).copied().collect();
    assert_eq!(all, (1..=COUNT).collect(), "every published job handled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_killed_mid_stream_loses_nothing_after_restart() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    create_jobs_stream(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("work.log");
    let env = [("WORKER_LOG", log.to_str().unwrap()), ("WORKER_DELAY_MS", "2")];

    const COUNT: u64 = 2_000;
    publish_jobs(&client, 1..=COUNT).await;
    let worker = spawn_service(Path::new(WORKER), Some(&server.url()), &env);
    wait_until(Duration::from_secs(30), "the worker to be mid-stream", || async {
        WorkLog::read(&[&log]).done.len() >= 200
    })
    .await;
    send_signal(worker.id().expect("pid"), "KILL");
    let handled_before = WorkLog::read(&[&log]).done.len();
    assert!((handled_before as u64) < COUNT, "the kill must land mid-stream");

    // The killed instance's unacked messages come back after ack_wait (10 s) to the new one.
    let _restarted = spawn_service(Path::new(WORKER), Some(&server.url()), &env);
    wait_until(
        Duration::from_secs(60),
        "every job to be acked after the restart",
        || async { ack_pending(&server).await == (COUNT, 0) },
    )
    .await;
    let handled: BTreeSet<u64> = WorkLog::read(&[&log]).done.keys().copied().collect();
    assert_eq!(handled, (1..=COUNT).collect(), "distinct handled ids = published ids");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_handlers_finish_and_exits_zero() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    create_jobs_stream(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("work.log");
    // 300 ms per job, 8 at a time: a SIGTERM always lands with handlers in flight.
    let env = [("WORKER_LOG", log.to_str().unwrap()), ("WORKER_DELAY_MS", "300")];

    const COUNT: u64 = 200;
    publish_jobs(&client, 1..=COUNT).await;
    let worker = spawn_service(Path::new(WORKER), Some(&server.url()), &env);
    wait_until(Duration::from_secs(30), "handlers to be in flight", || async {
        let log = WorkLog::read(&[&log]);
        log.done.len() >= 16 && log.started.len() > log.done.len()
    })
    .await;
    send_signal(worker.id().expect("pid"), "TERM");
    let output = tokio::time::timeout(Duration::from_secs(20), worker.wait_with_output())
        .await
        .expect("the worker exits within the drain timeout")
        .expect("wait");
    assert_eq!(
        output.status.code(),
        Some(0),
        "exit code; stderr:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );

    let after_term = WorkLog::read(&[&log]);
    let unfinished: Vec<_> = after_term
        .started
        .keys()
        .filter(|id| !after_term.done.contains_key(id))
        .collect();
    assert!(unfinished.is_empty(), "handlers cut off by SIGTERM: {unfinished:?}");
    assert!(
        (after_term.done.len() as u64) < COUNT,
        "the SIGTERM must land mid-stream"
    );

    // Nothing lost: a new instance handles the rest, and what was done before is not redone.
    let _next = spawn_service(Path::new(WORKER), Some(&server.url()), &env);
    wait_until(Duration::from_secs(60), "the rest to be handled", || async {
        ack_pending(&server).await == (COUNT, 0)
    })
    .await;
    let all = WorkLog::read(&[&log]);
    assert_eq!(all.done.keys().copied().collect::<BTreeSet<_>>(), (1..=COUNT).collect());
    let redone: Vec<_> = after_term.done.keys().filter(|id| all.done[id] > 1).collect();
    assert!(
        redone.is_empty(),
        "acked before the SIGTERM, yet redelivered: {redone:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_registered_is_a_startup_error_naming_the_cause() {
    let server = NatsServer::start().await.expect("nats-server");
    let (code, stderr) = run_to_exit(Path::new(EMPTY), Some(&server.url()), &[], Duration::from_secs(20)).await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("no #[consumer]") && stderr.contains("never linked"),
        "stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_is_a_clear_error_not_a_hang() {
    // A port nothing listens on: bind one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let (code, stderr) = run_to_exit(
        Path::new(WORKER),
        Some(&url),
        &[("NATTY_CONNECT_TIMEOUT", "2s")],
        Duration::from_secs(20),
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("cannot connect to NATS") && stderr.contains(&url),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_stream_in_verify_only_mode_is_a_clear_error() {
    let server = NatsServer::start().await.expect("nats-server");
    let (code, stderr) = run_to_exit(
        Path::new(WORKER),
        Some(&server.url()),
        &[("NATTY_PROVISION", "verify-only")],
        Duration::from_secs(20),
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("stream `jobs` does not exist") && stderr.contains("verify-only"),
        "stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_a_clear_error() {
    let server = NatsServer::builder()
        .config("authorization { user: svc, password: pw-right-7f3a }")
        .ready_check(false)
        .start()
        .await
        .expect("nats-server");
    let (code, stderr) = run_to_exit(
        Path::new(WORKER),
        Some(&server.url()),
        &[("NATS_USER", "svc"), ("NATS_PASSWORD", "pw-wrong-9c1d")],
        Duration::from_secs(20),
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("cannot connect to NATS"), "stderr:\n{stderr}");
    assert!(
        stderr.to_lowercase().contains("authorization"),
        "the error names the cause; stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("pw-right-7f3a") && !stderr.contains("pw-wrong-9c1d"),
        "no secret in logs; stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_handler_name_in_natty_handlers_is_a_clear_error() {
    let server = NatsServer::start().await.expect("nats-server");
    let (code, stderr) = run_to_exit(
        Path::new(WORKER),
        Some(&server.url()),
        &[("NATTY_HANDLERS", "wrok")],
        Duration::from_secs(20),
    )
    .await;
    assert_ne!(code, Some(0));
    assert!(
        stderr.contains("NATTY_HANDLERS") && stderr.contains("`wrok`") && stderr.contains("registered: work"),
        "stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_still_running_at_the_drain_timeout_are_naked_for_prompt_redelivery() {
    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    create_jobs_stream(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("work.log");
    // Jobs take 30 s; the drain allows 300 ms: every handler in flight is cut off.
    let slow = [
        ("WORKER_LOG", log.to_str().unwrap()),
        ("WORKER_DELAY_MS", "30000"),
        ("NATTY_DRAIN_TIMEOUT", "300ms"),
    ];
    publish_jobs(&client, 1..=16).await;
    let worker = spawn_service(Path::new(WORKER), Some(&server.url()), &slow);
    wait_until(Duration::from_secs(20), "8 handlers in flight", || async {
        WorkLog::read(&[&log]).started.len() == 8
    })
    .await;
    send_signal(worker.id().expect("pid"), "TERM");
    let output = tokio::time::timeout(Duration::from_secs(10), worker.wait_with_output())
        .await
        .expect("exits soon after the drain timeout")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("drain timeout"), "stderr:\n{stderr}");
    assert!(WorkLog::read(&[&log]).done.is_empty());

    // The cut-off messages were naked, so they come back at once rather than after the
    // worker's 10 s ack_wait: a fast worker finishes all 16 well before that.
    let fast = [("WORKER_LOG", log.to_str().unwrap())];
    let _next = spawn_service(Path::new(WORKER), Some(&server.url()), &fast);
    wait_until(
        Duration::from_secs(6),
        "all jobs, sooner than ack_wait would allow",
        || async { WorkLog::read(&[&log]).done.len() == 16 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_the_server_gone_exits_within_the_drain_timeout() {
    let mut server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    create_jobs_stream(&client).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("work.log");
    let env = [
        ("WORKER_LOG", log.to_str().unwrap()),
        ("WORKER_DELAY_MS", "60000"),
        ("NATTY_DRAIN_TIMEOUT", "5s"),
    ];
    publish_jobs(&client, 1..=16).await;
    let worker = spawn_service(Path::new(WORKER), Some(&server.url()), &env);
    wait_until(Duration::from_secs(20), "8 handlers in flight", || async {
        WorkLog::read(&[&log]).started.len() == 8
    })
    .await;
    // The server is gone for good: every flush, ack and nak would wait for a reconnect.
    server.stop().await;
    let signalled = std::time::Instant::now();
    send_signal(worker.id().expect("pid"), "TERM");
    let output = tokio::time::timeout(Duration::from_secs(60), worker.wait_with_output())
        .await
        .expect("the worker exits")
        .expect("wait");
    let took = signalled.elapsed();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        took < Duration::from_secs(5 + 5),
        "exited {took:?} after SIGTERM, past the 5 s drain timeout + 5 s; stderr:\n{stderr}"
    );
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(stderr.contains("drain timeout"), "stderr:\n{stderr}");
}
