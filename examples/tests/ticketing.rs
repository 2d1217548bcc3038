//! The ticketing example end to end: with `NATS_URL` unset the listener starts its own
//! development server and handles a ticket; two listeners split the tickets between them.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use natty_runtime::testing::{nats_server_binary, NatsServer, TestApp};
use natty_tests::{collect_lines, send_signal, spawn_service, wait_until};

/// The pricing service's handler, compiled into this test too: `TestApp` runs it in-process.
#[allow(dead_code)]
#[path = "../src/bin/ticket_pricing.rs"]
mod pricing;

const LISTENER: &str = env!("CARGO_BIN_EXE_ticket-listener");
const PUBLISHER: &str = env!("CARGO_BIN_EXE_ticket-publisher");
const PRICING: &str = env!("CARGO_BIN_EXE_ticket-pricing");

fn handled_ids(lines: &Mutex<Vec<String>>) -> BTreeSet<String> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|line| line.split("handled ticket ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .map(str::to_string)
        .collect()
}

async fn publish(url: &str, count: u32) {
    let status = tokio::process::Command::new(PUBLISHER)
        .arg(count.to_string())
        .env("NATS_URL", url)
        .stdout(Stdio::null())
        .status()
        .await
        .expect("run the publisher");
    assert!(status.success(), "the publisher failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_url_the_listener_starts_a_dev_server_and_handles_a_ticket() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let binary = nats_server_binary().expect("a nats-server binary (run scripts/install-nats-server.sh)");
    let mut listener = tokio::process::Command::new(LISTENER)
        .env_remove("NATS_URL")
        .env("NATTY_DEV_PORT", port.to_string())
        .env("NATTY_NATS_SERVER", &binary)
        .env("INSTANCE", "solo")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the listener");
    let lines = collect_lines(&mut listener);
    let url = format!("nats://127.0.0.1:{port}");

    // The listener provisions the stream on the server it started; then a ticket goes through.
    wait_until(
        Duration::from_secs(30),
        "the dev server and the tickets stream",
        || async {
            match async_nats::connect(&url).await {
                Ok(client) => async_nats::jetstream::new(client).get_stream("tickets").await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
    publish(&url, 1).await;
    wait_until(Duration::from_secs(20), "the ticket to be handled", || async {
        handled_ids(&lines).contains("t-1")
    })
    .await;
    assert!(
        dir.path().join(".natty/dev/jetstream").is_dir(),
        "dev data lives in the local folder"
    );

    send_signal(listener.id().expect("pid"), "TERM");
    let output = tokio::time::timeout(Duration::from_secs(20), listener.wait_with_output())
        .await
        .expect("exits")
        .expect("wait");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains(&format!("started a development nats-server at {url}")),
        "stderr:\n{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_listeners_split_the_tickets() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut a = spawn_service(Path::new(LISTENER), Some(&url), &[("INSTANCE", "a")]);
    let mut b = spawn_service(Path::new(LISTENER), Some(&url), &[("INSTANCE", "b")]);
    let (a_lines, b_lines) = (collect_lines(&mut a), collect_lines(&mut b));
    wait_until(
        Duration::from_secs(20),
        "both listeners to bind the durable",
        || async {
            let js = async_nats::jetstream::new(server.client().await);
            match js.get_stream("tickets").await {
                Ok(stream) => stream.consumer_info("ticket-listener").await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;

    publish(&url, 200).await;
    wait_until(Duration::from_secs(30), "every ticket to be handled", || async {
        handled_ids(&a_lines).len() + handled_ids(&b_lines).len() >= 200
    })
    .await;
    let (by_a, by_b) = (handled_ids(&a_lines), handled_ids(&b_lines));
    assert!(by_a.is_disjoint(&by_b), "a ticket was handled by both listeners");
    assert_eq!(by_a.len() + by_b.len(), 200);
    assert!(
        !by_a.is_empty() && !by_b.is_empty(),
        "both took work: a={} b={}",
        by_a.len(),
        by_b.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pricing_instances_quote_and_report_errors() {
    use natty_examples::{PriceQuery, PriceQuote};
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let _a = spawn_service(Path::new(PRICING), Some(&url), &[]);
    let _b = spawn_service(Path::new(PRICING), Some(&url), &[]);
    let config = natty_runtime::Config::from_lookup(|_| None).unwrap();
    let client = natty_runtime::Client::connect_with(&config, &url)
        .await
        .expect("connect");
    let ask = |seats| {
        let client = client.clone();
        async move {
            client
                .request::<_, PriceQuote>(
                    "tickets.price",
                    &PriceQuery {
                        seats,
                        unit_price: 2000,
                    },
                )
                .await
        }
    };
    wait_until(Duration::from_secs(20), "the service to answer", || async {
        ask(1).await.is_ok()
    })
    .await;
    assert_eq!(ask(2).await.unwrap(), PriceQuote { seats: 2, total: 4000 });
    assert_eq!(ask(5).await.unwrap(), PriceQuote { seats: 5, total: 9000 });
    let error = ask(0).await.unwrap_err();
    assert!(error.to_string().contains("at least one seat"), "{error}");
}

/// The pricing service through the test kit, in-process: quotes, the group discount, and the
/// service's own error reaching the caller. A core service is listening once `start` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pricing_in_process_with_the_test_kit() {
    use natty_examples::{PriceQuery, PriceQuote};
    let app = TestApp::builder()
        .handlers(["quote"])
        .start()
        .await
        .expect("the pricing service starts");
    let client = app.client().clone();
    let ask = |seats| {
        let client = client.clone();
        async move {
            let query = PriceQuery {
                seats,
                unit_price: 2000,
            };
            client.request::<_, PriceQuote>("tickets.price", &query).await
        }
    };
    assert_eq!(ask(2).await.unwrap(), PriceQuote { seats: 2, total: 4000 });
    assert_eq!(ask(5).await.unwrap(), PriceQuote { seats: 5, total: 9000 });
    let error = ask(0).await.unwrap_err();
    assert!(error.to_string().contains("at least one seat"), "{error}");
    app.stop().await.expect("drained");
}
