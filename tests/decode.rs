//! A payload that cannot be decoded is terminated (not retried forever), with a log line
//! naming stream, consumer, sequence and the decode error; good messages keep flowing.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

static HANDLED: AtomicUsize = AtomicUsize::new(0);

#[stream(name = "mixed", subjects = ["mixed.>"])]
struct Mixed;

#[consumer(stream = "mixed", durable = "decoder")]
async fn decode_jobs(_job: Job) {
    HANDLED.fetch_add(1, Ordering::SeqCst);
}

/// Captures formatted log output for assertions.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_payload_is_terminated_and_logged() {
    let logs = Captured::default();
    let writer = logs.clone();
    tracing_subscriber::fmt()
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let server = NatsServer::start().await.expect("nats-server");
    let client = server.client().await;
    let mut terminated = client
        .subscribe("$JS.EVENT.ADVISORY.CONSUMER.MSG_TERMINATED.mixed.decoder")
        .await
        .unwrap();
    let running = RunningRuntime::registered(server.url());

    let js = async_nats::jetstream::new(client.clone());
    wait_until(Duration::from_secs(10), "the stream to be provisioned", || async {
        js.get_stream("mixed").await.is_ok()
    })
    .await;
    js.publish("mixed.bad", "this is not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for id in 1..=5 {
        let payload = serde_json::to_vec(&Job { id }).unwrap();
        js.publish("mixed.good", payload.into()).await.unwrap().await.unwrap();
    }

    let advisory = tokio::time::timeout(Duration::from_secs(10), terminated.next())
        .await
        .expect("a MSG_TERMINATED advisory")
        .expect("subscription open");
    let advisory: serde_json::Value = serde_json::from_slice(&advisory.payload).unwrap();
    assert_eq!(advisory["stream_seq"], 1, "{advisory}");
    assert!(
        advisory["reason"].as_str().unwrap_or("").contains("cannot decode"),
        "{advisory}"
    );

    wait_until(
        Duration::from_secs(10),
        "the good messages to be handled and acked",
        || async {
            let stream = js.get_stream("mixed").await.unwrap();
            let info = stream.consumer_info("decoder").await.unwrap();
            HANDLED.load(Ordering::SeqCst) == 5 && info.num_ack_pending == 0 && info.ack_floor.stream_sequence == 6
        },
    )
    .await;
    let stream = js.get_stream("mixed").await.unwrap();
    let info = stream.consumer_info("decoder").await.unwrap();
    assert_eq!(
        info.delivered.consumer_sequence, 6,
        "the bad message was delivered once: {info:?}"
    );

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = text
        .lines()
        .find(|line| line.contains("cannot be decoded"))
        .unwrap_or_else(|| panic!("no decode error logged:\n{text}"));
    for needle in ["stream mixed", "consumer decoder", "sequence 1", "expected"] {
        assert!(line.contains(needle), "log line lacks {needle:?}: {line}");
    }

    running.stop().await.expect("clean shutdown");
}
