//! Scheduled and delayed messages (nats-server 2.12+, ADR-51) on a real nats-server 2.15,
//! through `tests/bin/scheduled.rs`: a delayed message comes no earlier than asked, once, and
//! survives a restart of the service; declared schedules fire as declared, are stored once (a
//! restart does not store them again), and a changed declaration is drift for `--check` and
//! replaces the stored schedule at the next start; handlers never see what the server holds;
//! a stream that takes no schedules refuses a delayed publish clearly; on a 3-node cluster, delayed
//! messages published while the stream's leader is elected again and again each come once, none
//! early.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::prelude::*;
use natty_runtime::testing::NatsServer;
use natty_runtime::{PublishError, Runtime, StreamDef};
use natty_tests::{collect_lines, collect_stderr, run_command, send_signal, spawn_service, wait_until, Elections};

const SCHEDULED: &str = env!("CARGO_BIN_EXE_natty-test-scheduled");
const WAIT: Duration = Duration::from_secs(60);

type Lines = Arc<Mutex<Vec<String>>>;

/// A running instance of the service, with its output.
struct Service {
    child: tokio::process::Child,
    out: Lines,
}

impl Service {
    async fn start(url: &str, env: &[(&str, &str)]) -> Service {
        let mut child = spawn_service(Path::new(SCHEDULED), Some(url), env);
        let (out, err) = (collect_lines(&mut child), collect_stderr(&mut child));
        wait_until(WAIT, "the service running", || async {
            err.lock().unwrap().iter().any(|line| line.contains("natty is running"))
        })
        .await;
        Service { child, out }
    }

    /// `(unix ms, payload)` of every message handled on `subject`.
    fn handled(&self, subject: &str) -> Vec<(u128, String)> {
        let prefix = format!("handled {subject} ");
        self.out
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| line.strip_prefix(&prefix))
            .map(|rest| {
                let (at, body) = rest.split_once(' ').expect("`<ms> <body>`");
                (at.parse().expect("unix ms"), body.to_string())
            })
            .collect()
    }

    fn lines(&self) -> Vec<String> {
        self.out.lock().unwrap().clone()
    }

    async fn stop(mut self) {
        send_signal(self.child.id().unwrap(), "TERM");
        let status = self.child.wait().await.unwrap();
        assert!(status.success(), "{status:?}");
    }
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis()
}

/// The stream sequence of the last message on `subject` of `jobs`, if any.
async fn last_sequence(js: &async_nats::jetstream::Context, subject: &str) -> Option<u64> {
    let stream = js.get_stream("jobs").await.unwrap();
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .ok()
        .map(|m| m.sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_message_comes_once_no_earlier_than_asked_and_survives_a_restart() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let first = Service::start(&url, &[]).await;

    // Asked from outside the service, which then stops before the message is due.
    let client = natty_runtime::Client::new(nats.clone());
    let asked = now_ms();
    let delay = Duration::from_secs(4);
    let ack = client
        .publish_with("jobs.later", &"later", Publish::new().id("later-1").after(delay))
        .await
        .expect("a delayed publish to a stream with schedules");
    assert_eq!(ack.stream, "jobs");
    // Sent again with the same key: it replaces itself rather than coming twice.
    client
        .publish_with("jobs.later", &"later", Publish::new().id("later-1").after(delay))
        .await
        .unwrap();
    assert!(
        last_sequence(&js, "natty.schedules.jobs.at.later-1").await.is_some(),
        "the server holds it on its own subject"
    );
    first.stop().await;

    let second = Service::start(&url, &[]).await;
    wait_until(WAIT, "the delayed message handled", || async {
        !second.handled("jobs.later").is_empty()
    })
    .await;
    let (handled_at, body) = second.handled("jobs.later")[0].clone();
    assert_eq!(body, "\"later\"");
    assert!(
        handled_at >= asked + delay.as_millis(),
        "handled {} ms after it was asked, before the {} ms asked for",
        handled_at - asked,
        delay.as_millis()
    );
    // Once: the holder is gone once it fired, and later ticks show the consumer went on.
    wait_until(WAIT, "the holder removed", || async {
        last_sequence(&js, "natty.schedules.jobs.at.later-1").await.is_none()
    })
    .await;
    let ticks = second.handled("jobs.tick").len();
    wait_until(WAIT, "two more ticks", || async {
        second.handled("jobs.tick").len() >= ticks + 2
    })
    .await;
    assert_eq!(second.handled("jobs.later").len(), 1, "{:?}", second.lines());
    // No handler ever saw what the server holds for later.
    assert!(
        !second.lines().iter().any(|line| line.contains("natty.schedules")),
        "{:?}",
        second.lines()
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_schedules_fire_as_declared_and_are_stored_once() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let service = Service::start(&url, &[]).await;

    // The stream was given what schedules need; the consumer reads only the declared subjects.
    let mut stream = js.get_stream("jobs").await.unwrap();
    let config = stream.info().await.unwrap().config.clone();
    assert!(config.allow_message_schedules);
    assert!(
        config.subjects.contains(&"natty.schedules.jobs.>".to_string()),
        "{:?}",
        config.subjects
    );
    let consumer = stream.consumer_info("jobs").await.unwrap();
    let filters = [
        consumer.config.filter_subjects.clone(),
        vec![consumer.config.filter_subject.clone()],
    ]
    .concat();
    assert!(filters.contains(&"jobs.>".to_string()), "{filters:?}");

    // Every second, by interval and by a cron expression in a named time zone.
    wait_until(WAIT, "four ticks and three crons", || async {
        service.handled("jobs.tick").len() >= 4 && service.handled("jobs.cron").len() >= 3
    })
    .await;
    let ticks = service.handled("jobs.tick");
    assert!(ticks.iter().all(|(_, body)| body == "\"tick\""), "{ticks:?}");
    let span = ticks.last().unwrap().0 - ticks[0].0;
    assert!(
        span >= 900 * (ticks.len() as u128 - 1),
        "{} ticks within {span} ms: more often than every second",
        ticks.len()
    );

    // A restart with the same declaration stores nothing again (an interval is not restarted).
    let stored = last_sequence(&js, "natty.schedules.jobs.tick")
        .await
        .expect("the tick schedule");
    service.stop().await;
    let service = Service::start(&url, &[]).await;
    assert_eq!(last_sequence(&js, "natty.schedules.jobs.tick").await, Some(stored));
    let (code, out, err) = run_command(Path::new(SCHEDULED), Some(&url), &["--check"], WAIT).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("schedule `tick` on stream `jobs`"), "{out}");
    let (code, out, err) = run_command(Path::new(SCHEDULED), None, &["--list"], WAIT).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("stream jobs, subject jobs.tick, @every 1s"), "{out}");
    assert!(out.contains("stream jobs, subject jobs.cron, * * * * * *"), "{out}");

    // A changed declaration: drift for --check, stored anew at the next start.
    let changed = [("TICK_BODY", "tock")];
    let mut check = tokio::process::Command::new(SCHEDULED);
    check
        .arg("--check")
        .env("NATS_URL", &url)
        .env("TICK_BODY", "tock")
        .kill_on_drop(true);
    let output = tokio::time::timeout(WAIT, check.output()).await.unwrap().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("schedule `tick` on stream `jobs`") && text.contains("body"),
        "{text}"
    );
    service.stop().await;
    let service = Service::start(&url, &changed).await;
    assert_ne!(last_sequence(&js, "natty.schedules.jobs.tick").await, Some(stored));
    wait_until(WAIT, "a tock", || async {
        service.handled("jobs.tick").iter().any(|(_, body)| body == "\"tock\"")
    })
    .await;
    assert!(!service.lines().iter().any(|line| line.contains("natty.schedules")));
    service.stop().await;
}

/// A stream that takes schedules but removes its oldest messages past a limit would drop what
/// waits there (a delayed message, a schedule) without a word: startup refuses it, whether the
/// declaration sets the limit (before the stream is made) or the server's stream has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_would_drop_waiting_schedules_is_refused_at_startup() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(server.client().await);
    let refused = |stream: StreamDef| {
        let url = server.url();
        async move {
            let runtime = Runtime::builder().url(url).stream(stream).build().unwrap();
            tokio::time::timeout(WAIT, runtime.run_until(std::future::pending()))
                .await
                .expect("startup ends")
                .unwrap_err()
                .to_string()
        }
    };
    let declared = refused(
        StreamDef::new("bounded", &["bounded.>"])
            .schedules(true)
            .max_messages(1000),
    )
    .await;
    assert!(
        declared.contains("bounded") && declared.contains("schedules = true") && declared.contains("max_messages"),
        "{declared}"
    );
    assert!(js.get_stream("bounded").await.is_err(), "refused before it was made");

    js.create_stream(async_nats::jetstream::stream::Config {
        name: "sized".into(),
        subjects: vec!["sized.>".into(), "natty.schedules.sized.>".into()],
        max_bytes: 1 << 20,
        allow_message_schedules: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let on_server = refused(StreamDef::new("sized", &["sized.>"]).schedules(true)).await;
    assert!(
        on_server.contains("sized") && on_server.contains("max_bytes"),
        "{on_server}"
    );
    let mut sized = js.get_stream("sized").await.unwrap();
    assert_eq!(sized.info().await.unwrap().config.max_bytes, 1 << 20, "left as it was");
}

/// A handler, so that a runtime built here has something to run.
#[subscribe(subject = "schedules.noop")]
async fn noop(_: serde_json::Value) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_still_holds_schedules_must_keep_declaring_them() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    // The service stores its schedules in `jobs`, then goes.
    Service::start(&url, &[]).await.stop().await;
    // The same stream declared without schedules: its consumers would read the holders, which
    // keep firing. Startup stops, naming the stream and what to do.
    let runtime = Runtime::builder()
        .url(url.clone())
        .stream(StreamDef::new("jobs", &["jobs.>"]))
        .build()
        .unwrap();
    let refused = tokio::time::timeout(WAIT, runtime.run_until(std::future::pending()))
        .await
        .expect("startup ends")
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("jobs") && refused.contains("schedules = true") && refused.contains("natty.schedules.jobs.>"),
        "{refused}"
    );
    // Refused before anything was changed: the holders' subjects are still the stream's.
    let js = async_nats::jetstream::new(server.client().await);
    let mut jobs = js.get_stream("jobs").await.unwrap();
    let subjects = jobs.info().await.unwrap().config.subjects.clone();
    assert!(subjects.contains(&"natty.schedules.jobs.>".to_string()), "{subjects:?}");
}

#[tokio::test]
async fn delayed_publishes_that_cannot_be_kept_are_refused_clearly() {
    use async_nats::jetstream::stream::{Config, RetentionPolicy};
    let server = NatsServer::start().await.expect("nats-server");
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    let streams = [
        // No schedules at all.
        Config {
            name: "plain".into(),
            subjects: vec!["plain.>".into()],
            ..Default::default()
        },
        // Interest retention: the server would drop the waiting copy no consumer reads.
        Config {
            name: "interest".into(),
            subjects: vec!["interest.>".into(), "natty.schedules.interest.>".into()],
            retention: RetentionPolicy::Interest,
            allow_message_schedules: true,
            ..Default::default()
        },
        // Messages removed after 2 s: a delay of 5 s would never come.
        Config {
            name: "brief".into(),
            subjects: vec!["brief.>".into(), "natty.schedules.brief.>".into()],
            max_age: Duration::from_secs(2),
            allow_message_schedules: true,
            ..Default::default()
        },
        // The oldest messages removed past 100 (or 1 MiB), what waits among them: the server
        // drops a waiting delayed message there without a word (nats-server 2.15).
        Config {
            name: "counted".into(),
            subjects: vec!["counted.>".into(), "natty.schedules.counted.>".into()],
            max_messages: 100,
            allow_message_schedules: true,
            ..Default::default()
        },
        Config {
            name: "sized".into(),
            subjects: vec!["sized.>".into(), "natty.schedules.sized.>".into()],
            max_bytes: 1 << 20,
            allow_message_schedules: true,
            ..Default::default()
        },
        Config {
            name: "kept".into(),
            subjects: vec!["kept.>".into(), "natty.schedules.kept.>".into()],
            allow_message_schedules: true,
            ..Default::default()
        },
    ];
    for config in streams {
        js.create_stream(config).await.unwrap();
    }
    let client = natty_runtime::Client::new(nats);
    let later = || Publish::new().after(Duration::from_secs(5));
    let cases = [
        ("plain.one", later(), "schedules = true"),
        ("interest.one", later(), "interest retention"),
        ("brief.one", later(), "max_age"),
        ("counted.one", later(), "max_messages"),
        ("sized.one", later(), "max_bytes"),
        // An expectation would be checked against the waiting copy's subject.
        (
            "kept.one",
            later().expected_last_subject_sequence(3),
            "Nats-Expected-Last-Subject-Sequence",
        ),
        ("kept.one", later().with_header("Nats-TTL", "1s"), "Nats-TTL"),
    ];
    for (subject, options, named) in cases {
        let refused = client.publish_with(subject, &1, options).await.unwrap_err();
        assert!(
            matches!(refused, PublishError::CannotDelay { .. }),
            "{subject}: {refused:?}"
        );
        let message = refused.to_string();
        assert!(message.contains(subject) && message.contains(named), "{message}");
    }
    for stream in ["plain", "interest", "brief", "counted", "sized", "kept"] {
        let mut stream = js.get_stream(stream).await.unwrap();
        assert_eq!(stream.info().await.unwrap().state.messages, 0, "nothing was stored");
    }
    // The same message without what was refused waits, on a stream that keeps it.
    client.publish_with("kept.one", &1, later()).await.expect("kept");
}

/// A delayed message on a replicated stream, published while its leader is elected again and
/// again (3-node cluster, R3): each comes once, on its target subject, no earlier than asked,
/// and a publish repeated with its key after an unclear answer does not make it come twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_messages_come_once_through_stream_leader_elections() {
    use async_nats::jetstream::{consumer::pull, stream::Config};
    use futures_util::StreamExt;
    const MESSAGES: u64 = 40;
    let cluster = natty_runtime::testing::NatsCluster::start(3).await.expect("cluster");
    let nats = cluster.client().await;
    let js = async_nats::jetstream::new(nats.clone());
    js.create_stream(Config {
        name: "later".into(),
        subjects: vec!["later.>".into(), "natty.schedules.later.>".into()],
        num_replicas: 3,
        allow_message_schedules: true,
        ..Default::default()
    })
    .await
    .expect("an R3 stream that takes schedules");
    let client = natty_runtime::Client::new(nats.clone());

    // Elections every 400 ms while the messages are published and while they come due.
    let elections = Elections::start(nats.clone(), "later", Duration::from_millis(400));
    let mut due: std::collections::BTreeMap<u64, u128> = Default::default();
    for n in 0..MESSAGES {
        let delay = Duration::from_secs(2 + n % 3);
        let asked = now_ms();
        let options = || Publish::new().id(format!("job-{n}")).after(delay);
        // Through an election a publish may end unconfirmed; the same key again replaces it.
        let mut attempts = 0;
        loop {
            attempts += 1;
            match client.publish_with("later.due", &n, options()).await {
                Ok(_) => break,
                Err(error) if attempts < 20 => {
                    eprintln!("job {n}, attempt {attempts}: {error}; again");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                Err(error) => panic!("job {n} not published after {attempts} attempts: {error}"),
            }
        }
        due.insert(n, asked + delay.as_millis());
    }

    // Every message on its target subject, read from the stream with the time it was stored.
    let stream = js.get_stream("later").await.unwrap();
    let reader = stream
        .create_consumer(pull::Config {
            durable_name: Some("reader".into()),
            filter_subject: "later.due".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = reader.messages().await.unwrap();
    let mut came: std::collections::BTreeMap<u64, Vec<u128>> = Default::default();
    let deadline = tokio::time::Instant::now() + WAIT;
    while came.len() < MESSAGES as usize {
        let message = tokio::time::timeout_at(deadline, messages.next())
            .await
            .unwrap_or_else(|_| {
                let missing: Vec<_> = (0..MESSAGES).filter(|n| !came.contains_key(n)).collect();
                panic!("not every delayed message came within {WAIT:?}: missing {missing:?}")
            })
            .expect("the consumer's messages")
            .expect("a message");
        let n: u64 = serde_json::from_slice(&message.payload).expect("the number published");
        let stored = message.info().expect("JetStream metadata").published;
        came.entry(n)
            .or_default()
            .push((stored.unix_timestamp_nanos() / 1_000_000) as u128);
        message.ack().await.unwrap();
    }
    let won = elections.stop().await;
    assert!(won >= 3, "only {won} elections took place");
    // Anything doubled would have come by now: the longest delay is 4 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let info = stream.consumer_info("reader").await.unwrap();
    assert_eq!(info.num_pending, 0, "a delayed message came twice: {came:?}");
    for (n, times) in &came {
        assert_eq!(times.len(), 1, "job {n} came {} times", times.len());
        // Whole seconds, rounded up: the server fires at a second, never before it.
        assert!(
            times[0] + 1 >= due[n],
            "job {n} stored {} ms before it was due",
            due[n] - times[0]
        );
    }
    // The server holds nothing for later any more.
    for n in 0..MESSAGES {
        assert!(
            stream
                .get_last_raw_message_by_subject(&format!("natty.schedules.later.at.job-{n}"))
                .await
                .is_err(),
            "job {n}'s holder is still there"
        );
    }
    eprintln!("{MESSAGES} delayed messages through {won} stream leader elections: each came once, none early");
}
