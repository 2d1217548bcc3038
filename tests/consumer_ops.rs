//! `--reset-consumer`, `--pause` and `--resume` through a real service (`tests/bin/picky.rs`)
//! and a real nats-server 2.15: a reset to a sequence, then to a time, replays from exactly
//! there while the service runs; a pause holds a message published meanwhile until the resume;
//! an unknown durable or a bad position is a clear error that changes nothing.

use std::path::Path;
use std::time::Duration;

use natty_runtime::testing::NatsServer;
use natty_tests::{collect_lines, collect_stderr, run_command, send_signal, spawn_service, wait_until, Job};

const PICKY: &str = env!("CARGO_BIN_EXE_natty-test-picky");
const WAIT: Duration = Duration::from_secs(30);

/// How many times each job was handled, from the service's output.
fn times(lines: &[String], id: u64) -> usize {
    lines.iter().filter(|line| **line == format!("handled {id}")).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_replays_from_the_asked_position_and_a_pause_holds_messages_until_resumed() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = async_nats::jetstream::new(server.client().await);
    let dir = tempfile::tempdir().unwrap();
    let accept = dir.path().join("accept");
    std::fs::write(&accept, b"yes").unwrap();
    let accept = accept.display().to_string();
    let mut service = spawn_service(Path::new(PICKY), Some(&url), &[("PICKY_ACCEPT", &accept)]);
    let (handled, _logs) = (collect_lines(&mut service), collect_stderr(&mut service));
    natty_tests::wait_for_consumer(&js, "jobs", "picky", WAIT).await;
    let publish = |id: u64| {
        let js = js.clone();
        async move {
            let payload = serde_json::to_vec(&Job { id }).unwrap();
            js.publish(format!("jobs.{id}"), payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    for id in 1..=5 {
        assert_eq!(publish(id).await, id, "job {id} at stream sequence {id}");
    }
    let handled_as = |counts: [usize; 5]| {
        let handled = handled.clone();
        async move {
            let lines = handled.lock().unwrap().clone();
            (1..=5).all(|id| times(&lines, id) == counts[id as usize - 1])
        }
    };
    wait_until(WAIT, "every job handled once", || handled_as([1, 1, 1, 1, 1])).await;
    let cli = |args: Vec<String>| {
        let url = url.clone();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_command(Path::new(PICKY), Some(&url), &args, WAIT).await
        }
    };
    let args = |line: &str| line.split(' ').map(String::from).collect::<Vec<_>>();

    // To a sequence: 3, 4 and 5 again, not 1 or 2.
    let (code, out, err) = cli(args("--reset-consumer picky --to 3")).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("reset consumer `picky` on stream `jobs`: it delivers again from stream sequence 3"),
        "{out}"
    );
    wait_until(WAIT, "jobs 3 to 5 handled again", || handled_as([1, 1, 2, 2, 2])).await;

    // To a time: the first message stored at or after it is job 4's.
    let stored = js
        .get_stream("jobs")
        .await
        .unwrap()
        .get_raw_message(4)
        .await
        .unwrap()
        .time;
    let at = humantime::format_rfc3339_nanos(std::time::SystemTime::from(stored)).to_string();
    let (code, out, err) = cli(vec!["--reset-consumer".into(), "picky".into(), "--to".into(), at]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("from stream sequence 4"), "{out}");
    wait_until(WAIT, "jobs 4 and 5 handled a third time", || {
        handled_as([1, 1, 2, 3, 3])
    })
    .await;

    // Pause: job 6 waits in the stream until the resume.
    let (code, out, err) = cli(args("--pause picky --for 10m")).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("paused consumer `picky` on stream `jobs` until "), "{out}");
    publish(6).await;
    wait_until(WAIT, "job 6 pending on the paused consumer", || async {
        let stream = js.get_stream("jobs").await.unwrap();
        let info = stream
            .get_consumer::<async_nats::jetstream::consumer::pull::Config>("picky")
            .await
            .unwrap()
            .cached_info()
            .clone();
        info.paused && info.num_pending == 1
    })
    .await;
    assert_eq!(times(&handled.lock().unwrap(), 6), 0, "handled while paused");
    let (code, out, err) = cli(args("--resume picky")).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("resumed consumer `picky` on stream `jobs`"), "{out}");
    wait_until(WAIT, "job 6 handled after the resume", || async {
        times(&handled.lock().unwrap(), 6) == 1
    })
    .await;

    // Mistakes: clear, and nothing done.
    let (code, _, err) = cli(args("--reset-consumer nobody --to 1")).await;
    assert_ne!(code, Some(0));
    assert!(
        err.contains("no durable consumer `nobody`") && err.contains("picky (stream jobs)"),
        "{err}"
    );
    let (code, _, err) = cli(args("--reset-consumer picky --to yesterday")).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("neither a stream sequence nor a time"), "{err}");
    let (code, _, err) = cli(args("--pause picky")).await;
    assert_ne!(code, Some(0));
    assert!(err.contains("--pause needs --for or --until"), "{err}");
    let (code, _, err) = cli(args("--reset-consumer picky --to 99")).await;
    assert_ne!(code, Some(0), "past the stream's end: {err}");
    assert!(err.contains("ends at sequence 6"), "{err}");
    let lines = handled.lock().unwrap().clone();
    assert_eq!(
        (1..=6).map(|id| times(&lines, id)).collect::<Vec<_>>(),
        [1, 1, 2, 3, 3, 1]
    );

    send_signal(service.id().unwrap(), "TERM");
    service.wait().await.unwrap();
}
