//! A message the client cannot read never reaches natty: a header from a raw protocol writer
//! that async-nats cannot parse drops the connection instead (see the guide's known limits).
//! With `max_deliver`, the server gives up on it, and natty reads it from the stream through
//! the JSON message-get API and dead-letters it, so it is not dropped unrecorded; so is a
//! message delivered behind it on the connection it cut; the consumer goes on.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::dead_letters::{self, Filter};
use natty_runtime::prelude::*;
use natty_runtime::testing::{NatsServer, RunningRuntime};
use natty_tests::{wait_until, Job};

const WAIT: Duration = Duration::from_secs(60);

#[stream(name = "foreign", subjects = ["foreign.>"])]
struct Foreign;

static HANDLED: Mutex<Vec<u64>> = Mutex::new(Vec::new());

#[consumer(stream = "foreign", durable = "reader", max_deliver = 2, ack_wait = "1s")]
async fn read(job: Job) {
    HANDLED.lock().unwrap().push(job.id);
}

/// Publishes `payload` to `subject` with `header` as its raw header block, as a client that
/// writes the protocol itself would.
fn publish_raw(url: &str, subject: &str, header: &[u8], payload: &[u8]) {
    let address = url.trim_start_matches("nats://");
    let mut connection = std::net::TcpStream::connect(address).expect("connect");
    let mut frame = format!(
        "CONNECT {{\"headers\":true,\"verbose\":false,\"pedantic\":false}}\r\nHPUB {subject} {} {}\r\n",
        header.len(),
        header.len() + payload.len()
    )
    .into_bytes();
    frame.extend_from_slice(header);
    frame.extend_from_slice(payload);
    frame.extend_from_slice(b"\r\nPING\r\n");
    connection.write_all(&frame).expect("write");
    // The server answers the PING once it has taken the message.
    let mut answer = [0u8; 512];
    let _ = std::io::Read::read(&mut connection, &mut answer);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_client_cannot_read_is_dead_lettered_past_max_deliver() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = async_nats::jetstream::new(server.client().await);
    let running = RunningRuntime::registered(server.url());
    natty_tests::wait_for_consumer(&js, "foreign", "reader", WAIT).await;

    let publish = |id: u64| {
        let js = js.clone();
        async move {
            let payload = serde_json::to_vec(&Job { id }).unwrap();
            js.publish(format!("foreign.{id}"), payload.into())
                .await
                .unwrap()
                .await
                .unwrap()
        }
    };
    publish(1).await;
    // Sequence 2: a header value that is not UTF-8; sequence 3, readable, right behind it.
    publish_raw(
        &server.url(),
        "foreign.2",
        b"NATS/1.0\r\nX-Origin: \xff\r\n\r\n",
        b"{\"id\":2}",
    );
    publish(3).await;

    // Every message is handled or dead-lettered: none is dropped unrecorded. The one behind the
    // unreadable message was delivered on the connection it cut, each time: it may go to the
    // dead letters with it (and can be replayed from there).
    let dead = || async {
        dead_letters::list(&js, &Filter::default())
            .await
            .expect("the dead letters")
    };
    wait_until(
        WAIT,
        "messages 1 and 3 handled or dead-lettered, 2 dead-lettered",
        || async {
            let dead: Vec<u64> = dead().await.iter().map(|letter| letter.original_sequence).collect();
            let handled = HANDLED.lock().unwrap().clone();
            handled.contains(&1) && dead.contains(&2) && (handled.contains(&3) || dead.contains(&3))
        },
    )
    .await;
    let letters = dead().await;
    let unreadable = letters.iter().find(|letter| letter.original_sequence == 2).unwrap();
    assert_eq!(unreadable.original_subject, "foreign.2");
    assert_eq!(unreadable.consumer, "reader");
    assert_eq!(&unreadable.payload[..], b"{\"id\":2}");
    assert!(unreadable.reason.contains("max_deliver"), "{}", unreadable.reason);
    assert!(
        unreadable.reason.contains("headers cannot be read"),
        "{}",
        unreadable.reason
    );
    if let Some(behind) = letters.iter().find(|letter| letter.original_sequence == 3) {
        assert_eq!(&behind.payload[..], &serde_json::to_vec(&Job { id: 3 }).unwrap()[..]);
        assert!(!behind.reason.contains("headers cannot be read"), "{}", behind.reason);
    }
    assert!(!HANDLED.lock().unwrap().contains(&2), "it never reached the handler");

    // The consumer goes on.
    publish(4).await;
    wait_until(WAIT, "a message after them handled", || async {
        HANDLED.lock().unwrap().contains(&4)
    })
    .await;
    running.stop().await.expect("clean shutdown");
}
