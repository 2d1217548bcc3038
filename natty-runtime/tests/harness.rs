//! The test harness itself, against a real nats-server: what every other integration test
//! relies on it for (JetStream works, a restart keeps the store and the URL, a cluster keeps
//! taking publishes with a node down, config files and signals reach the server).

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};
use natty_runtime::testing::{NatsCluster, NatsServer};
use tokio::time::Instant;

/// Linux signal numbers (the harness takes raw numbers and the crate has no libc).
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

fn file_stream(name: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        subjects: vec![format!("{}.>", name.to_lowercase())],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Publishes with a message id until the ack arrives or the deadline passes. The id makes a
/// retry after a lost ack a duplicate rather than a second message.
async fn publish_until_acked(js: &jetstream::Context, subject: &str, id: &str, deadline: Instant) {
    loop {
        let attempt = async {
            js.send_publish(
                subject.to_owned(),
                PublishMessage::build().message_id(id).payload(id.to_owned().into()),
            )
            .await?
            .await
            .map_err(Into::into)
        };
        let outcome: Result<_, Box<dyn std::error::Error + Send + Sync>> = attempt.await;
        match outcome {
            Ok(_) => return,
            Err(err) if Instant::now() < deadline => {
                eprintln!("publish {id} failed, retrying: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => panic!("publish {id} never acked: {err}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_server_runs_jetstream() {
    let server = NatsServer::start().await.expect("start nats-server");
    assert_eq!(server.url(), format!("nats://127.0.0.1:{}", server.port()));
    assert!(server.store_dir().is_dir());

    let js = jetstream::new(server.client().await);
    js.create_stream(file_stream("ORDERS", 1)).await.expect("create stream");
    let ack = js
        .publish("orders.created", "one".into())
        .await
        .expect("publish")
        .await
        .expect("publish ack");
    assert_eq!(ack.stream, "ORDERS");
    assert_eq!(ack.sequence, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_file_stream_and_url() {
    let mut server = NatsServer::start().await.expect("start nats-server");
    let url = server.url();
    let pid = server.pid();
    {
        let js = jetstream::new(server.client().await);
        js.create_stream(file_stream("EVENTS", 1)).await.expect("create stream");
        for i in 1..=3 {
            js.publish(format!("events.{i}"), format!("event {i}").into())
                .await
                .expect("publish")
                .await
                .expect("publish ack");
        }
    }

    server.restart().await.expect("restart nats-server");
    assert_eq!(server.url(), url, "a restart must keep the URL");
    assert_ne!(server.pid(), pid, "a restart must be a new process");

    let js = jetstream::new(server.client().await);
    let mut events = js.get_stream("EVENTS").await.expect("stream after restart");
    let info = events.info().await.expect("stream info");
    assert_eq!(info.state.messages, 3, "acked messages lost by a restart");
    let third = events.get_raw_message(3).await.expect("message 3");
    assert_eq!(third.payload.as_ref(), b"event 3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_then_restart_brings_the_server_back() {
    let mut server = NatsServer::start().await.expect("start nats-server");
    server.stop().await;
    assert!(!server.is_running());
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", server.port()))
            .await
            .is_err(),
        "a stopped server must not accept connections"
    );
    server.restart().await.expect("start again");
    assert!(server.is_running());
    server.client().await.flush().await.expect("flush");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_file_reaches_the_server() {
    let server = NatsServer::builder()
        .config(r#"authorization { token: "s3cret" }"#)
        .ready_check(false)
        .start()
        .await
        .expect("start nats-server with a token");

    let refused = async_nats::ConnectOptions::new().connect(server.url()).await;
    assert!(refused.is_err(), "a client without the token got in");

    let client = async_nats::ConnectOptions::with_token("s3cret".into())
        .connect(server.url())
        .await
        .expect("connect with the token");
    jetstream::new(client)
        .query_account()
        .await
        .expect("JetStream on alongside the config file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_freezes_and_thaws_the_server() {
    let server = NatsServer::start().await.expect("start nats-server");
    let client = server.client().await;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_millis(300));

    server.signal(SIGSTOP);
    assert!(js.query_account().await.is_err(), "a SIGSTOPped server answered");
    server.signal(SIGCONT);
    js.set_timeout(Duration::from_secs(5));
    js.query_account().await.expect("answer after SIGCONT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_r3_stream_survives_losing_its_leader() {
    let mut cluster = NatsCluster::start(3).await.expect("start 3-node cluster");
    assert_eq!(cluster.urls().len(), 3);

    let js = jetstream::new(cluster.client().await);
    js.create_stream(file_stream("TRADES", 3))
        .await
        .expect("create R3 stream");
    let deadline = Instant::now() + Duration::from_secs(20);
    publish_until_acked(&js, "trades.1", "t1", deadline).await;

    let mut trades = js.get_stream("TRADES").await.expect("get stream");
    let leader = trades
        .info()
        .await
        .expect("stream info")
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("an R3 stream has a leader");
    let node = cluster.node_named(&leader).expect("leader is a node");
    let (killed_port, killed_pid) = (node.port(), node.pid());
    node.kill().await;

    let deadline = Instant::now() + Duration::from_secs(20);
    publish_until_acked(&js, "trades.2", "t2", deadline).await;
    let info = trades.info().await.expect("stream info with a node down");
    assert_eq!(info.state.messages, 2);

    let node = cluster.node_named(&leader).expect("leader is a node");
    node.restart().await.expect("restart the killed node");
    assert_eq!(node.port(), killed_port, "a restart must keep the port");
    assert_ne!(node.pid(), killed_pid);
    // `restart` returned, so the node's /healthz says its replica is current; a client that
    // knows only this node must see the whole stream.
    let direct = jetstream::new(node.client().await);
    let mut trades = direct.get_stream("TRADES").await.expect("get stream");
    assert_eq!(trades.info().await.expect("stream info").state.messages, 2);
}
