//! Helpers shared by the integration tests: the job type, publishing, waiting on a
//! condition with a deadline, and running the test services as real processes.

pub mod capture;
pub mod fault;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde::{Deserialize, Serialize};

/// The payload of the `jobs` stream used by the process-level tests.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Job {
    /// Unique id, also the order of publication.
    pub id: u64,
}

/// The payload of the `accounts` stream of the partitioned-group tests: posting `n` (1, 2, ...)
/// of account `key`, published to `accounts.<key>.posted`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Posting {
    /// The account, also the subject's key token.
    pub key: u64,
    /// The posting's number within its account: the order they must be handled in.
    pub n: u64,
}

/// The payload of the `readings` stream used by the capture tests: flat but for `place`,
/// which CSV flattens into `place.site` and `place.floor` columns.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Reading {
    /// Unique id, also the order of publication.
    pub id: u64,
    /// The split key.
    pub sensor: String,
    /// A measurement.
    pub value: f64,
    /// Present on some readings only.
    pub note: Option<String>,
    /// Where the sensor is.
    pub place: Place,
}

/// Where a sensor is.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Place {
    /// Site name.
    pub site: String,
    /// Floor number.
    pub floor: i32,
}

impl Reading {
    /// The reading with `id`, spread over `sensors` keys.
    pub fn new(id: u64, sensors: u64) -> Reading {
        Reading {
            id,
            sensor: format!("sensor-{}", id % sensors),
            value: id as f64 / 8.0,
            note: id.is_multiple_of(3).then(|| format!("note, \"quoted\" {id}")),
            place: Place {
                site: format!("site-{}", id % 7),
                floor: (id % 5) as i32 - 1,
            },
        }
    }
}

/// A stream's or a consumer's leader stepped down again and again, on a cluster, until
/// [`Elections::stop`].
pub struct Elections {
    won: std::sync::Arc<std::sync::atomic::AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl Elections {
    /// Asks the leader of `stream` to step down every `every`. A step-down asked while the
    /// previous election settles is refused, and asked again next time.
    pub fn start(nats: async_nats::Client, stream: &str, every: Duration) -> Elections {
        Elections::asking(nats, format!("$JS.API.STREAM.LEADER.STEPDOWN.{stream}"), every)
    }

    /// Asks the leader of consumer `consumer` of `stream` to step down every `every`.
    pub fn of_consumer(nats: async_nats::Client, stream: &str, consumer: &str, every: Duration) -> Elections {
        Elections::asking(
            nats,
            format!("$JS.API.CONSUMER.LEADER.STEPDOWN.{stream}.{consumer}"),
            every,
        )
    }

    fn asking(nats: async_nats::Client, subject: String, every: Duration) -> Elections {
        let won = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let task = tokio::spawn({
            let won = won.clone();
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    let answer = nats.request(subject.clone(), "".into()).await;
                    if answer.is_ok_and(|reply| String::from_utf8_lossy(&reply.payload).contains("\"success\":true")) {
                        won.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
            }
        });
        Elections { won, task }
    }

    /// The step-downs the server accepted so far.
    pub fn won(&self) -> u32 {
        self.won.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops asking; the step-downs the server accepted.
    pub async fn stop(self) -> u32 {
        let won = self.won();
        self.task.abort();
        let _ = self.task.await;
        won
    }
}

/// Creates the stream `name`, taking `<name>.>`, with counters on and `replicas` replicas.
pub async fn counter_stream(js: &async_nats::jetstream::Context, name: &str, replicas: usize) {
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.>")],
        num_replicas: replicas,
        allow_message_counter: true,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|error| panic!("the counter stream {name}: {error}"));
}

/// Polls `condition` every 25 ms until it holds; panics with `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until consumer `durable` exists on `stream`: a service under test has provisioned it.
pub async fn wait_for_consumer(js: &async_nats::jetstream::Context, stream: &str, durable: &str, timeout: Duration) {
    wait_until(
        timeout,
        &format!("consumer `{durable}` on stream `{stream}`"),
        || async {
            match js.get_stream(stream).await {
                Ok(stream) => stream.consumer_info(durable).await.is_ok(),
                Err(_) => false,
            }
        },
    )
    .await;
}

/// Publishes `jobs.<id>` for each id, up to 256 acks in flight, and checks every ack.
pub async fn publish_jobs(client: &async_nats::Client, ids: impl IntoIterator<Item = u64>) {
    let js = async_nats::jetstream::new(client.clone());
    let mut in_flight = FuturesUnordered::new();
    for id in ids {
        let payload = serde_json::to_vec(&Job { id }).expect("encode");
        let ack = js.publish(format!("jobs.{id}"), payload.into()).await.expect("publish");
        in_flight.push(std::future::IntoFuture::into_future(ack));
        if in_flight.len() >= 256 {
            in_flight.next().await.expect("pending ack").expect("publish ack");
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack.expect("publish ack");
    }
}

/// Creates the `jobs` stream as the worker declares it, so tests can publish before a worker runs.
pub async fn create_jobs_stream(client: &async_nats::Client) {
    let js = async_nats::jetstream::new(client.clone());
    js.get_or_create_stream(async_nats::jetstream::stream::Config {
        name: "jobs".into(),
        subjects: vec!["jobs.>".into()],
        ..Default::default()
    })
    .await
    .expect("create the jobs stream");
}

/// What a worker's log says: how many times each id was started and finished.
#[derive(Debug, Default)]
pub struct WorkLog {
    /// id → number of "start" lines.
    pub started: BTreeMap<u64, usize>,
    /// id → number of "done" lines.
    pub done: BTreeMap<u64, usize>,
}

impl WorkLog {
    /// Reads and merges the logs at `paths` (missing files count as empty).
    pub fn read(paths: &[&Path]) -> WorkLog {
        let mut log = WorkLog::default();
        for path in paths {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            for line in text.lines() {
                let mut parts = line.split(' ');
                let (Some(kind), Some(id)) = (parts.next(), parts.next().and_then(|id| id.parse().ok())) else {
                    continue;
                };
                let map = if kind == "start" {
                    &mut log.started
                } else {
                    &mut log.done
                };
                *map.entry(id).or_default() += 1;
            }
        }
        log
    }
}

/// Starts a test service process with `NATS_URL` = `url` plus `env`, output captured.
pub fn spawn_service(binary: &Path, url: Option<&str>, env: &[(&str, &str)]) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(binary);
    command.env_remove("NATS_URL").env("RUST_LOG", "info,async_nats=warn");
    if let Some(url) = url {
        command.env("NATS_URL", url);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()))
}

/// Runs a service binary with command-line `args` to completion (at most `timeout`) and
/// returns its exit code, stdout and stderr.
pub async fn run_command(
    binary: &Path,
    url: Option<&str>,
    args: &[&str],
    timeout: Duration,
) -> (Option<i32>, String, String) {
    let mut command = tokio::process::Command::new(binary);
    command
        .env_remove("NATS_URL")
        .env("RUST_LOG", "info,async_nats=warn")
        .args(args);
    if let Some(url) = url {
        command.env("NATS_URL", url);
    }
    command.stdin(Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(timeout, command.output())
        .await
        .unwrap_or_else(|_| panic!("{} {args:?} did not exit within {timeout:?}", binary.display()))
        .expect("run the service");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `GET path` over plain HTTP/1.1 on `addr`: the status code and the body. Written out by
/// hand so the tests depend on no HTTP client, and see exactly what a scraper would.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[], None).await
}

/// `POST path` of `body` as JSON over plain HTTP/1.1 on `addr`: the status code and the body.
pub async fn http_post(addr: std::net::SocketAddr, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "POST", path, &[], Some(body)).await
}

/// `method path` over plain HTTP/1.1 on `addr` with `headers` (a `Host` naming `addr` unless
/// given) and a JSON `body`: the status code and the body.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {addr}\r\n"));
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body.unwrap_or_default());
    http_exchange(addr, request.as_bytes()).await
}

/// Sends `request` on a new connection to `addr` and reads the response to its end.
async fn http_exchange(addr: std::net::SocketAddr, request: &[u8]) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request).await?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await?;
    parse_http_response(&response)
}

/// The status code and body of one whole HTTP/1.1 response, as read to the end of its
/// connection; a chunked body is joined.
pub fn parse_http_response(response: &[u8]) -> std::io::Result<(u16, String)> {
    let response = String::from_utf8_lossy(response).into_owned();
    let invalid = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{what}: {response:?}"));
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| invalid("no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| invalid("no status code"))?;
    let chunked = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    if !chunked {
        return Ok((status, body.to_string()));
    }
    // HTTP/1.1 servers send a body of unknown length in chunks: `<hex size>\r\n<data>\r\n`,
    // ended by a chunk of size 0 (nats-server's monitoring does, for anything over 2 KiB).
    let mut rest = body;
    let mut joined = String::new();
    loop {
        let (size, after) = rest.split_once("\r\n").ok_or_else(|| invalid("no chunk size"))?;
        let size = usize::from_str_radix(size.trim(), 16).map_err(|_| invalid("a bad chunk size"))?;
        if size == 0 {
            return Ok((status, joined));
        }
        let chunk = after.get(..size).ok_or_else(|| invalid("a short chunk"))?;
        joined.push_str(chunk);
        rest = after[size..]
            .strip_prefix("\r\n")
            .ok_or_else(|| invalid("no end of chunk"))?;
    }
}

/// Runs a service to completion (at most `timeout`) and returns its exit code and stderr.
pub async fn run_to_exit(
    binary: &Path,
    url: Option<&str>,
    env: &[(&str, &str)],
    timeout: Duration,
) -> (Option<i32>, String) {
    let child = spawn_service(binary, url, env);
    let output = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{} did not exit within {timeout:?}", binary.display()))
        .expect("wait for the service");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Sends `signal` (e.g. "TERM", "KILL") to a process.
pub fn send_signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// The first `expected` messages of `stream` (read with an ephemeral consumer); fewer if no
/// more arrive within two seconds.
pub async fn read_all(
    js: &async_nats::jetstream::Context,
    stream: &str,
    expected: usize,
) -> Vec<async_nats::jetstream::Message> {
    let consumer = js
        .get_stream(stream)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(expected + 1)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut all = Vec::new();
    while let Some(message) = messages.next().await {
        all.push(message.unwrap());
    }
    all
}

/// Collects a child's stdout lines as they come.
pub fn collect_lines(child: &mut tokio::process::Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    collect(child.stdout.take().expect("piped stdout"))
}

/// Collects a child's stderr lines as they come, so that a chatty child never blocks on a
/// full pipe, and its logs can be shown when a test fails.
pub fn collect_stderr(child: &mut tokio::process::Child) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    collect(child.stderr.take().expect("piped stderr"))
}

fn collect(pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static) -> std::sync::Arc<std::sync::Mutex<Vec<String>>> {
    use tokio::io::AsyncBufReadExt;
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut reader = tokio::io::BufReader::new(pipe).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}
