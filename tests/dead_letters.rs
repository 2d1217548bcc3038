//! `--dead-letters list|replay|delete` through a real service (`tests/bin/picky.rs`) and a real
//! nats-server: listed with their reason, origin and payload; replay and delete refused without a
//! filter or `--all`; a deleted one gone; a replayed one handled by the service and gone from
//! the dead letters.

use std::path::Path;
use std::time::Duration;

use natty_runtime::dead_letters::{self, Filter};
use natty_runtime::testing::NatsServer;
use natty_tests::{collect_lines, collect_stderr, run_command, send_signal, spawn_service, wait_until, Job};

const PICKY: &str = env!("CARGO_BIN_EXE_natty-test-picky");
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_listed_deleted_and_replayed_from_the_command_line() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = async_nats::jetstream::new(server.client().await);
    let dir = tempfile::tempdir().unwrap();
    let accept = dir.path().join("accept");
    let accept_env = accept.display().to_string();
    let mut service = spawn_service(Path::new(PICKY), Some(&url), &[("PICKY_ACCEPT", &accept_env)]);
    let (handled, logs) = (collect_lines(&mut service), collect_stderr(&mut service));
    natty_tests::wait_for_consumer(&js, "jobs", "picky", WAIT).await;
    for id in 1..=5u64 {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish(format!("jobs.{id}"), payload.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let count = || async {
        dead_letters::list(&js, &Filter::default())
            .await
            .expect("dead letters")
            .len()
    };
    wait_until(WAIT, "five dead letters", || async { count().await == 5 }).await;

    let cli = |args: &'static [&'static str]| {
        let url = url.clone();
        async move { run_command(Path::new(PICKY), Some(&url), args, WAIT).await }
    };
    let (code, out, err) = cli(&["--dead-letters", "list"]).await;
    assert_eq!(code, Some(0), "{err}");
    for id in 1..=5 {
        assert!(out.contains(&format!("jobs.{id} ")), "job {id} listed:\n{out}");
        assert!(out.contains(&format!("{{\"id\":{id}}}")), "its payload shown:\n{out}");
    }
    assert!(
        out.contains("picky") && out.contains("is not accepted yet"),
        "consumer and reason:\n{out}"
    );
    assert!(out.contains("5 dead letter(s)"), "{out}");

    // Taking every dead letter needs saying so.
    let (code, _, err) = cli(&["--dead-letters", "replay"]).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("--all"), "{err}");
    assert_eq!(count().await, 5, "nothing replayed");

    let (code, out, err) = cli(&["--dead-letters", "delete", "--subject", "jobs.5"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("1 dead letter(s) deleted"), "{out}");
    assert_eq!(count().await, 4);

    // Accepted from now on: a replayed job is handled, and leaves the dead letters.
    std::fs::write(&accept, b"yes").unwrap();
    let (code, out, err) = cli(&["--dead-letters", "replay", "--consumer", "picky", "--subject", "jobs.1"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("1 dead letter(s) replayed"), "{out}");
    wait_until(WAIT, "job 1 handled after its replay", || async {
        handled.lock().unwrap().iter().any(|line| line == "handled 1")
    })
    .await;
    assert_eq!(count().await, 3);

    let (code, out, err) = cli(&["--dead-letters", "replay", "--all"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("3 dead letter(s) replayed"), "{out}");
    wait_until(WAIT, "jobs 2 to 4 handled after their replay", || async {
        let lines = handled.lock().unwrap().clone();
        (2..=4).all(|id| lines.contains(&format!("handled {id}")))
    })
    .await;
    assert_eq!(count().await, 0);
    let lines = handled.lock().unwrap().clone();
    assert!(
        !lines.contains(&"handled 5".to_string()),
        "a deleted dead letter is not replayed"
    );
    assert_eq!(lines.len(), 4, "each replayed job handled once: {lines:?}");

    send_signal(service.id().unwrap(), "TERM");
    let status = tokio::time::timeout(WAIT, service.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(status.success(), "{}", logs.lock().unwrap().join("\n"));
}

/// Without a server to read from, the command says so instead of starting a development one.
#[tokio::test]
async fn dead_letters_need_a_server() {
    let (code, _, err) = run_command(Path::new(PICKY), None, &["--dead-letters", "list"], WAIT).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("NATS_URL"), "{err}");
}
