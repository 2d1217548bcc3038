//! The web-orders example end to end, as a real process: orders posted over HTTP are stored,
//! prepared by the natty consumer in the same process and read back over HTTP from the state
//! both share; a body that is not an order is refused without harm; and one SIGTERM drains
//! both sides: a request still being received is answered, a handler still running finishes
//! and acks, and only then does the process exit 0.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use natty_runtime::testing::NatsServer;
use natty_tests::{
    collect_lines, collect_stderr, http_get, http_post, parse_http_response, send_signal, spawn_service,
    wait_for_consumer, wait_until,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WEB: &str = env!("CARGO_BIN_EXE_web-orders");

type Lines = Arc<Mutex<Vec<String>>>;

/// A running `web-orders`, its output as it comes and the address it printed.
struct Service {
    child: tokio::process::Child,
    stdout: Lines,
    stderr: Lines,
    addr: SocketAddr,
}

impl Service {
    /// Starts `web-orders` on a free port and waits until its consumer is provisioned.
    async fn start(url: &str, js: &jetstream::Context, env: &[(&str, &str)]) -> Service {
        let mut env = env.to_vec();
        env.push(("WEB_ADDR", "127.0.0.1:0"));
        let mut child = spawn_service(Path::new(WEB), Some(url), &env);
        let stdout = collect_lines(&mut child);
        let stderr = collect_stderr(&mut child);
        let printed = || {
            stdout
                .lock()
                .unwrap()
                .iter()
                .find_map(|line| line.strip_prefix("listening on http://").map(str::to_string))
        };
        wait_until(Duration::from_secs(20), "the service to print its address", || async {
            printed().is_some()
        })
        .await;
        let addr = printed().unwrap().parse().expect("a socket address");
        wait_for_consumer(js, "shop", "kitchen", Duration::from_secs(20)).await;
        Service {
            child,
            stdout,
            stderr,
            addr,
        }
    }

    fn printed(&self, text: &str) -> bool {
        self.stdout.lock().unwrap().iter().any(|line| line.contains(text))
    }

    fn logged(&self, text: &str) -> bool {
        self.stderr.lock().unwrap().iter().any(|line| line.contains(text))
    }

    fn logs(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// `GET /orders/{id}`: the status code and, on 200, the order as JSON.
    async fn order(&self, id: &str) -> (u16, Option<Value>) {
        let (status, body) = answered(http_get(self.addr, &format!("/orders/{id}"))).await;
        let json = (status == 200).then(|| serde_json::from_str(&body).expect("a JSON order"));
        (status, json)
    }

    /// `POST /orders` with `body`: the status code and the body.
    async fn post(&self, body: &str) -> (u16, String) {
        answered(http_post(self.addr, "/orders", body)).await
    }

    /// Posts order `id` and checks it was accepted; returns its stream sequence.
    async fn place(&self, id: &str) -> u64 {
        let (status, body) = self.post(&order(id)).await;
        assert_eq!(status, 202, "{body}");
        let accepted: Value = serde_json::from_str(&body).expect("a JSON answer");
        assert_eq!(accepted["id"], id);
        assert_eq!(accepted["stream"], "shop");
        accepted["sequence"].as_u64().expect("a sequence")
    }

    /// Waits until the consumer has recorded order `id` as `status`; returns the record.
    async fn wait_for(&self, id: &str, status: &str) -> Value {
        let seen = Mutex::new(None);
        wait_until(Duration::from_secs(20), &format!("order {id} {status}"), || async {
            let (_, order) = self.order(id).await;
            let matched = order.as_ref().is_some_and(|order| order["status"] == status);
            *seen.lock().unwrap() = order;
            matched
        })
        .await;
        seen.into_inner().unwrap().unwrap()
    }

    fn assert_running(&mut self) {
        let exited = self.child.try_wait().expect("poll the child");
        assert!(exited.is_none(), "web-orders exited: {exited:?}\n{}", self.logs());
    }
}

/// The answer to an HTTP request, which must come within 10 s.
async fn answered(request: impl std::future::Future<Output = std::io::Result<(u16, String)>>) -> (u16, String) {
    tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("an HTTP answer within 10 s")
        .expect("an HTTP answer")
}

fn order(id: &str) -> String {
    serde_json::json!({ "id": id, "item": "margherita", "quantity": 2 }).to_string()
}

async fn kitchen(js: &jetstream::Context) -> jetstream::consumer::Info {
    let stream = js.get_stream("shop").await.expect("the shop stream");
    stream.consumer_info("kitchen").await.expect("the kitchen consumer")
}

async fn stored(js: &jetstream::Context) -> u64 {
    let stream = js.get_stream("shop").await.expect("the shop stream");
    stream.get_info().await.expect("stream info").state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_posted_over_http_are_prepared_by_the_consumer_and_read_back() {
    let server = NatsServer::start().await.expect("nats-server");
    let js = jetstream::new(server.client().await);
    let mut web = Service::start(&server.url(), &js, &[]).await;

    // Unknown until posted and prepared.
    assert_eq!(web.order("o-1").await.0, 404);
    let sequence = web.place("o-1").await;
    let prepared = web.wait_for("o-1", "ready").await;
    assert_eq!(prepared["item"], "margherita");
    assert_eq!(prepared["quantity"], 2);
    assert_eq!(
        prepared["sequence"], sequence,
        "the consumer recorded the stored message"
    );
    assert!(web.printed(&format!("order o-1 ready (seq {sequence})")));

    // Posting it again (a client retrying) stores nothing new: the id is the idempotency key.
    let (status, body) = web.post(&order("o-1")).await;
    assert_eq!(status, 202, "{body}");
    let again: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["sequence"], sequence);

    // Bodies that are not orders are refused by the HTTP side, and nothing is stored.
    let (status, body) = web.post(r#"{"id": "o-2", "item": "#).await;
    assert_eq!(status, 400, "broken JSON: {body}");
    let (status, body) = web
        .post(r#"{"id": "o-2", "item": "margherita", "quantity": "many"}"#)
        .await;
    assert_eq!(status, 422, "a field of the wrong type: {body}");
    let (status, body) = web.post(&order("o.2")).await;
    assert_eq!(status, 400, "an id that is not one subject token: {body}");
    assert!(body.contains("cannot fill `{id}`"), "{body}");
    assert_eq!(stored(&js).await, 1);

    // And the service goes on serving both sides.
    web.assert_running();
    let next = web.place("o-3").await;
    assert_eq!(next, sequence + 1);
    web.wait_for("o-3", "ready").await;
    assert_eq!(web.order("o-2").await.0, 404);
    web.child.kill().await.ok();
}

/// An HTTP request whose body has not been sent yet: the handler is running (the server asked
/// for the body with `100 Continue`), waiting for it.
struct OpenRequest {
    stream: tokio::net::TcpStream,
    body: String,
}

impl OpenRequest {
    async fn start(addr: SocketAddr, body: String) -> OpenRequest {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "POST /orders HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.expect("send the head");
        // hyper answers `100 Continue` when the handler first reads the body.
        let mut interim = Vec::new();
        while !interim.ends_with(b"\r\n\r\n") {
            let mut byte = [0];
            let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut byte))
                .await
                .expect("100 Continue in time")
                .expect("read");
            assert_eq!(read, 1, "the connection closed before 100 Continue: {interim:?}");
            interim.push(byte[0]);
        }
        assert!(interim.starts_with(b"HTTP/1.1 100 Continue"), "{interim:?}");
        OpenRequest { stream, body }
    }

    /// Sends the body and reads the answer.
    async fn finish(mut self) -> (u16, String) {
        self.stream
            .write_all(self.body.as_bytes())
            .await
            .expect("send the body");
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), self.stream.read_to_end(&mut response))
            .await
            .expect("the answer in time")
            .expect("read the answer");
        parse_http_response(&response).expect("an HTTP response")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sigterm_drains_the_http_server_and_the_handlers_then_exits_0() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = jetstream::new(server.client().await);
    // Preparing takes 3 s, so the handler is mid-way when the signal comes.
    let mut web = Service::start(&url, &js, &[("PREP_MS", "3000")]).await;

    // In flight on both sides: a handler preparing o-slow, and a request for o-late whose
    // body the HTTP handler is waiting for.
    let slow = web.place("o-slow").await;
    web.wait_for("o-slow", "preparing").await;
    let open = OpenRequest::start(web.addr, order("o-late")).await;

    send_signal(web.child.id().expect("pid"), "TERM");
    wait_until(Duration::from_secs(10), "natty to start draining", || async {
        web.logged("shutting down: draining in-flight handlers")
    })
    .await;
    // The HTTP server stopped accepting: a new connection is refused, not left waiting.
    let refused = tokio::time::timeout(Duration::from_secs(5), http_get(web.addr, "/orders/o-slow")).await;
    assert!(matches!(refused, Ok(Err(_))), "{refused:?}");

    // natty drains: the handler finishes o-slow and acks it, then the runtime stops...
    wait_until(Duration::from_secs(15), "natty to stop", || async {
        web.logged("natty_runtime::runtime: stopped")
    })
    .await;
    assert!(
        web.printed(&format!("order o-slow ready (seq {slow})")),
        "{}",
        web.logs()
    );
    // ...while the process waits for the HTTP request still open.
    web.assert_running();
    assert!(!web.logged("HTTP server stopped"), "{}", web.logs());

    // That request is served to its end: the order is stored though natty has stopped.
    let (status, body) = open.finish().await;
    assert_eq!(status, 202, "{body}");
    let accepted: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(accepted["sequence"], slow + 1);

    let exit = tokio::time::timeout(Duration::from_secs(15), web.child.wait())
        .await
        .expect("web-orders exits after SIGTERM")
        .expect("wait for web-orders");
    assert_eq!(exit.code(), Some(0), "{}", web.logs());
    assert!(web.logged("HTTP server stopped"), "{}", web.logs());

    // Nothing was left unacked: o-slow is acked, o-late waits for the next instance.
    let info = kitchen(&js).await;
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_redelivered, 0, "{info:?}");
    assert_eq!(info.ack_floor.stream_sequence, slow, "{info:?}");
    assert_eq!(info.num_pending, 1, "{info:?}");

    // The next instance prepares o-late, and o-slow is not delivered again.
    let web = Service::start(&url, &js, &[]).await;
    web.wait_for("o-late", "ready").await;
    assert_eq!(web.order("o-slow").await.0, 404);
    assert!(!web.printed("o-slow"));
    wait_until(Duration::from_secs(10), "o-late acked", || async {
        kitchen(&js).await.ack_floor.stream_sequence == slow + 1
    })
    .await;
    let info = kitchen(&js).await;
    assert_eq!((info.num_ack_pending, info.num_redelivered), (0, 0), "{info:?}");
}
