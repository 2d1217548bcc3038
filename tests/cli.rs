//! The command line of a binary built on `run()`: `--help`, `--list`, `--check` and
//! `--asyncapi`, run as real processes against a real server.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream;
use natty_runtime::testing::NatsServer;
use natty_tests::run_command;

const WORKER: &str = env!("CARGO_BIN_EXE_natty-test-worker");
const WAIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn help_lists_the_commands_and_an_unknown_argument_is_an_error_naming_it() {
    let (code, stdout, _) = run_command(Path::new(WORKER), None, &["--help"], WAIT).await;
    assert_eq!(code, Some(0));
    for command in ["--list", "--check", "--asyncapi", "NATTY_METRICS_ADDR"] {
        assert!(stdout.contains(command), "--help mentions {command}:\n{stdout}");
    }
    let (code, _, stderr) = run_command(Path::new(WORKER), None, &["--lsit"], WAIT).await;
    assert_ne!(code, Some(0));
    assert!(stderr.contains("unknown argument `--lsit`"), "{stderr}");
    // Without NATS_URL there is no server to compare with: a development server made for the
    // occasion would always match.
    let (code, stdout, stderr) = run_command(Path::new(WORKER), None, &["--check"], WAIT).await;
    assert_ne!(code, Some(0), "--check without NATS_URL must fail:\n{stdout}");
    assert!(stderr.contains("set NATS_URL"), "{stderr}");
}

#[tokio::test]
async fn list_shows_each_handler_with_its_stream_durable_and_source_location() {
    // No server: listing reads only what the binary declares.
    let (code, stdout, stderr) = run_command(Path::new(WORKER), None, &["--list"], WAIT).await;
    assert_eq!(code, Some(0), "{stderr}");
    let consumer = stdout
        .lines()
        .find(|line| line.starts_with("consumer"))
        .unwrap_or_else(|| panic!("a consumer line:\n{stdout}"));
    for part in [
        "work",
        "stream jobs, subjects jobs.>",
        "workers",
        "tests/bin/worker.rs:",
    ] {
        assert!(consumer.contains(part), "{part} in {consumer:?}");
    }
    let stream = stdout
        .lines()
        .find(|line| line.starts_with("stream"))
        .unwrap_or_else(|| panic!("a stream line:\n{stdout}"));
    assert!(
        stream.contains("jobs") && stream.contains("tests/bin/worker.rs:"),
        "{stream}"
    );
}

#[tokio::test]
async fn check_passes_on_a_matching_server_and_fails_naming_the_field_that_drifted() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = jetstream::new(server.client().await);

    // Nothing on the server yet: both declarations are missing.
    let (code, stdout, _) = run_command(Path::new(WORKER), Some(&url), &["--check"], WAIT).await;
    assert_eq!(code, Some(1), "{stdout}");
    assert!(stdout.contains("DRIFT  stream `jobs`"), "{stdout}");
    assert!(
        stdout.contains("DRIFT  consumer `workers` on stream `jobs`"),
        "{stdout}"
    );
    assert!(js.get_stream("jobs").await.is_err(), "--check creates nothing");

    // As declared: the check passes.
    let stream = js
        .create_stream(jetstream::stream::Config {
            name: "jobs".into(),
            subjects: vec!["jobs.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let declared = jetstream::consumer::pull::Config {
        durable_name: Some("workers".into()),
        filter_subject: "jobs.>".into(),
        ack_wait: Duration::from_secs(10),
        ..Default::default()
    };
    stream.create_consumer(declared.clone()).await.unwrap();
    let (code, stdout, stderr) = run_command(Path::new(WORKER), Some(&url), &["--check"], WAIT).await;
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok     stream `jobs`"), "{stdout}");
    assert!(stdout.contains("no drift"), "{stdout}");

    // The stream's subjects and the consumer's ack_wait changed on the server.
    js.update_stream(jetstream::stream::Config {
        name: "jobs".into(),
        subjects: vec!["jobs.>".into(), "chores.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    stream
        .update_consumer(jetstream::consumer::pull::Config {
            ack_wait: Duration::from_secs(45),
            ..declared
        })
        .await
        .unwrap();
    let (code, stdout, stderr) = run_command(Path::new(WORKER), Some(&url), &["--check"], WAIT).await;
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    let stream_line = stdout
        .lines()
        .find(|line| line.contains("stream `jobs`") && !line.contains("consumer"))
        .unwrap();
    assert!(
        stream_line.starts_with("DRIFT") && stream_line.contains("subjects"),
        "{stream_line}"
    );
    let consumer_line = stdout.lines().find(|line| line.contains("consumer `workers`")).unwrap();
    assert!(
        consumer_line.starts_with("DRIFT") && consumer_line.contains("ack_wait"),
        "{consumer_line}"
    );
    assert!(stderr.contains("2 declaration(s) differ"), "{stderr}");
    // Still nothing changed.
    let info = js
        .get_stream("jobs")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .config
        .clone();
    assert_eq!(info.subjects.len(), 2);
}

#[tokio::test]
async fn asyncapi_prints_a_json_document_with_every_channel_and_its_payload_schema() {
    let (code, stdout, stderr) = run_command(Path::new(WORKER), None, &["--asyncapi"], WAIT).await;
    assert_eq!(code, Some(0), "{stderr}");
    let document: serde_json::Value = serde_json::from_str(&stdout).expect("--asyncapi prints JSON");
    assert_eq!(document["asyncapi"], "3.0.0");
    let channels = document["channels"].as_object().expect("channels");
    assert_eq!(channels.len(), 1, "{channels:#?}");
    let channel = channels.values().next().unwrap();
    assert_eq!(channel["address"], "jobs.>");
    let message = channel["messages"]
        .as_object()
        .and_then(|messages| messages.values().next())
        .and_then(|reference| reference["$ref"].as_str())
        .and_then(|path| path.strip_prefix("#/components/messages/"))
        .map(|name| &document["components"]["messages"][name])
        .expect("the channel's message is in components");
    assert_eq!(message["contentType"], "application/json");
    let payload = &message["payload"];
    assert_eq!(payload["type"], "object", "{payload:#}");
    assert_eq!(payload["properties"]["id"]["type"], "integer", "{payload:#}");
    assert_eq!(payload["required"], serde_json::json!(["id"]), "{payload:#}");
}
