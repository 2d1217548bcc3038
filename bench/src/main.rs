//! natty against raw async-nats, measured in the same run on the same server.
//!
//! ```text
//! cargo run --release -p natty-bench -- [--rounds 5] [--messages 200000] [--only consume,batch,publish,scale,...]
//!     [--faststream <python of bench/faststream's venv>] [--no-subscriber-too]
//! ```
//!
//! `scripts/bench.sh` installs everything and runs it all.
//!
//! Starts its own nats-server (file storage, loopback), then for each scenario alternates raw
//! and natty rounds on the same workload and prints messages/s for both and the ratio
//! natty/raw, as the median of the rounds, and the CPU time this process spent per message
//! on each side (user + system, from `getrusage` around each side's window).
//!
//! natty is measured as users get it: the binary is set up as `run()` sets it up (its
//! subscriber, `RUST_LOG` or its default, an OTLP exporter when the standard `OTEL_*`
//! variables name one). `BENCH_NO_SUBSCRIBER=1` measures it with no subscriber at all;
//! `--no-subscriber-too` adds that run, in a child process, after the main one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, stream::StorageType};
use futures_util::stream::{FuturesUnordered, StreamExt};
use natty_runtime::prelude::*;
use natty_runtime::testing::NatsServer;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tokio::sync::Notify;

/// A ~128-byte JSON event, like the issue's workload.
#[derive(Debug, Serialize, Deserialize)]
struct Order {
    id: u64,
    region: String,
    customer: String,
    amount: u64,
    note: String,
}

impl Order {
    fn new(id: u64) -> Order {
        Order {
            id,
            region: "eu-west-1".into(),
            customer: format!("customer-{:06}", id % 1_000_000),
            amount: id * 7 % 100_000,
            note: "x".repeat(32),
        }
    }
}

/// Handled-message counter shared by natty's handlers and the measuring loop.
static HANDLED: AtomicU64 = AtomicU64::new(0);
static TARGET: AtomicU64 = AtomicU64::new(u64::MAX);
static DONE: Notify = Notify::const_new();

fn count_one() {
    count(1);
}

fn count(handled: u64) {
    let before = HANDLED.fetch_add(handled, Ordering::Relaxed);
    let target = TARGET.load(Ordering::Relaxed);
    if before < target && before + handled >= target {
        DONE.notify_one();
    }
}

#[stream(name = "bench", subjects = ["bench.>"], storage = "file")]
struct Bench;

/// The capture scenario: NDJSON blocks of up to 10,000 per key (ten keys) into a local folder.
/// The stream is filled before the capture starts, so its 1 s windows (by stream timestamp)
/// are all in the past: each closes as soon as the next window's first message is read.
#[capture(
    stream = "bench",
    durable = "natty-capture",
    format = "ndjson",
    store = "${NATTY_BENCH_CAPTURE}/{key}",
    every = "1s",
    max_messages = 10000,
    max_ack_pending = 100000
)]
fn bench_capture(order: &Order) -> u64 {
    order.id % 10
}

/// The capture scenario again, zstd-compressed.
#[capture(
    stream = "bench",
    durable = "natty-capture-zstd",
    format = "ndjson",
    compression = "zstd",
    store = "${NATTY_BENCH_CAPTURE}/{key}",
    every = "1s",
    max_messages = 10000,
    max_ack_pending = 100000
)]
fn bench_capture_zstd(order: &Order) -> u64 {
    order.id % 10
}

/// The capture scenario again, gzip-compressed.
#[capture(
    stream = "bench",
    durable = "natty-capture-gzip",
    format = "ndjson",
    compression = "gzip",
    store = "${NATTY_BENCH_CAPTURE}/{key}",
    every = "1s",
    max_messages = 10000,
    max_ack_pending = 100000
)]
fn bench_capture_gzip(order: &Order) -> u64 {
    order.id % 10
}

/// The capture scenario again, as Parquet (its own compression).
#[capture(
    stream = "bench",
    durable = "natty-capture-parquet",
    format = "parquet",
    store = "${NATTY_BENCH_CAPTURE}/{key}",
    every = "1s",
    max_messages = 10000,
    max_ack_pending = 100000
)]
fn bench_capture_parquet(order: &Order) -> u64 {
    order.id % 10
}

/// One capture format of the capture scenario: natty's handler and durable for it, and the
/// compression the raw loop applies to the same blocks (`None`: no raw loop writes it).
struct CaptureCase {
    name: &'static str,
    handler: &'static str,
    durable: &'static str,
    raw: Option<RawCompression>,
}

/// How the raw capture loop compresses a block before writing it.
#[derive(Clone, Copy)]
enum RawCompression {
    Plain,
    Zstd,
    Gzip,
}

impl RawCompression {
    fn apply(self, plain: Vec<u8>) -> Vec<u8> {
        use std::io::Write;
        match self {
            RawCompression::Plain => plain,
            // Level 3 and flate2's default: what natty's capture uses.
            RawCompression::Zstd => zstd::stream::encode_all(&plain[..], 3).expect("zstd"),
            RawCompression::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
                encoder.write_all(&plain).expect("gzip");
                encoder.finish().expect("gzip")
            }
        }
    }
}

const CAPTURE_CASES: [CaptureCase; 4] = [
    CaptureCase {
        name: "ndjson",
        handler: "bench_capture",
        durable: "natty-capture",
        raw: Some(RawCompression::Plain),
    },
    CaptureCase {
        name: "ndjson+zstd",
        handler: "bench_capture_zstd",
        durable: "natty-capture-zstd",
        raw: Some(RawCompression::Zstd),
    },
    CaptureCase {
        name: "ndjson+gzip",
        handler: "bench_capture_gzip",
        durable: "natty-capture-gzip",
        raw: Some(RawCompression::Gzip),
    },
    CaptureCase {
        name: "parquet",
        handler: "bench_capture_parquet",
        durable: "natty-capture-parquet",
        raw: None,
    },
];

/// The capture-memory scenario, case (a): ten thousand keys, each with a block open at once
/// (gzip, so each open block has had a compressor of its own).
#[capture(
    stream = "bench",
    durable = "natty-memory-keys",
    format = "ndjson",
    compression = "gzip",
    store = "${NATTY_BENCH_MEMORY}/{key}",
    every = "10s"
)]
fn memory_keys(order: &Order) -> u64 {
    order.id % 10_000
}

/// The capture-memory scenario, case (b): ten keys, zstd, captured through a store outage.
#[capture(
    stream = "bench",
    durable = "natty-memory-outage",
    format = "ndjson",
    compression = "zstd",
    store = "${NATTY_BENCH_MEMORY}/{key}",
    every = "5s"
)]
fn memory_outage(order: &Order) -> u64 {
    order.id % 10
}

/// Case (b) again with a budget of 32 MiB, which the outage reaches before `max_ack_pending`.
#[capture(
    stream = "bench",
    durable = "natty-memory-bounded",
    format = "ndjson",
    compression = "zstd",
    store = "${NATTY_BENCH_MEMORY}/{key}",
    every = "5s",
    max_memory = "32MiB"
)]
fn memory_bounded(order: &Order) -> u64 {
    order.id % 10
}

/// The consume scenario with natty's defaults (concurrency 1, adaptive prefetch).
#[consumer(stream = "bench", durable = "natty-default", max_ack_pending = 20000)]
async fn consume_default(_order: Order) {
    count_one();
}

/// The consume scenario with a prefetch like the raw baseline's batch.
#[consumer(
    stream = "bench",
    durable = "natty-prefetch",
    max_ack_pending = 20000,
    prefetch = 1000
)]
async fn consume_prefetch(_order: Order) {
    count_one();
}

/// The confirmed-ack scenario: the defaults, but each ack waited for until the server confirms it.
#[consumer(
    stream = "bench",
    durable = "natty-confirmed",
    max_ack_pending = 20000,
    ack = "confirmed"
)]
async fn consume_confirmed(_order: Order) {
    count_one();
}

/// The same with 32 handlers at once, so that round trips overlap.
#[consumer(
    stream = "bench",
    durable = "natty-confirmed-32",
    max_ack_pending = 20000,
    ack = "confirmed",
    concurrency = 32
)]
async fn consume_confirmed_32(_order: Order) {
    count_one();
}

/// The batch scenario: batches of 500 into a handler that does nothing.
#[consumer(stream = "bench", durable = "natty-batch", max_ack_pending = 20000, batch = 500)]
async fn consume_batch(orders: Vec<Order>) {
    count(orders.len() as u64);
}

/// The concurrency scenario: 5 ms of simulated I/O per message, 64 at a time.
#[consumer(stream = "bench", durable = "natty-io", max_ack_pending = 20000, concurrency = 64)]
async fn consume_io(_order: Order) {
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    SLEPT_NANOS.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    count_one();
}

/// Total time the concurrency scenario's handlers actually slept: tokio's timer has 1 ms
/// granularity, so a 5 ms sleep lasts longer, and the achievable rate is 64 / the real mean.
static SLEPT_NANOS: AtomicU64 = AtomicU64::new(0);

#[stream(name = "idle", subjects = ["idle.>"], storage = "file")]
struct Idle;

/// The scale-out scenario's work per message: 5 ms of simulated I/O (a database write, say),
/// so that more instances can do more, as they would in a real service.
const SCALE_WORK: Duration = Duration::from_millis(5);
/// Messages one instance works on at once, on both sides.
const SCALE_CONCURRENCY: usize = 16;

/// The scale-out scenario's natty worker: one instance of a service sharing the durable.
#[consumer(stream = "scale", durable = "scale", concurrency = 16, max_ack_pending = 10000)]
async fn scale_work(_order: Order) {
    tokio::time::sleep(SCALE_WORK).await;
}

/// How many keys the scale-out scenario's messages have (`scale.k<n>`).
const SCALE_KEYS: u64 = 64;

/// The scale-out scenario's ordered worker: a partitioned group keeping each key's order across
/// the instances, the same work and concurrency per instance.
#[consumer(
    stream = "scale",
    durable = "ordered",
    subject = "scale.*",
    partitions = 8,
    order_by = "subject[1]",
    concurrency = 16,
    max_ack_pending = 10000
)]
async fn scale_ordered(_order: Order) {
    tokio::time::sleep(SCALE_WORK).await;
}

/// The scale-out scenario's raw worker: async-nats' pull stream, the same work and concurrency,
/// an ack after each.
async fn raw_scale_worker() {
    let url = std::env::var("NATS_URL").expect("NATS_URL");
    let urls: Vec<&str> = url.split(',').collect();
    let client = async_nats::ConnectOptions::new()
        .connect(&urls[..])
        .await
        .expect("connect");
    let js = jetstream::new(client);
    let consumer: jetstream::consumer::PullConsumer = js
        .get_stream("scale")
        .await
        .expect("stream")
        .get_consumer("scale")
        .await
        .expect("consumer");
    let messages = consumer
        .stream()
        .max_messages_per_batch(SCALE_CONCURRENCY * 4)
        .messages()
        .await
        .expect("messages");
    messages
        .for_each_concurrent(SCALE_CONCURRENCY, |message| async move {
            let message = message.expect("message");
            let _order: Order = serde_json::from_slice(&message.payload).expect("decode");
            tokio::time::sleep(SCALE_WORK).await;
            message.ack().await.expect("ack");
        })
        .await;
}

/// How many consumers the footprint scenario's service (`bench/idle`, `natty-bench-idle`) runs.
const IDLE_CONSUMERS: usize = 10;

struct Args {
    rounds: usize,
    messages: u64,
    only: Option<Vec<String>>,
    faststream: Option<String>,
    no_subscriber_too: bool,
}

fn args() -> Args {
    let mut args = Args {
        rounds: 5,
        messages: 200_000,
        only: None,
        faststream: None,
        no_subscriber_too: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rounds" => args.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--messages" => args.messages = it.next().and_then(|v| v.parse().ok()).expect("--messages N"),
            "--only" => args.only = it.next().map(|v| v.split(',').map(String::from).collect()),
            "--faststream" => args.faststream = it.next(),
            "--no-subscriber-too" => args.no_subscriber_too = true,
            other => panic!(
                "unknown argument {other}; use --rounds N, --messages N, --only a,b, --faststream PYTHON, --no-subscriber-too"
            ),
        }
    }
    args
}

async fn purge(js: &jetstream::Context, stream: &str) {
    js.get_stream(stream)
        .await
        .expect("stream")
        .purge()
        .await
        .expect("purge");
    quiet_server().await;
}

/// Waits (at most 5 s) until the server is idle: a purge leaves it removing the stream's files
/// for a while, and a side measured meanwhile shares the machine with that work (its rate moved
/// by up to 1.7x with its place in the round before this wait).
async fn quiet_server() {
    let deadline = Instant::now() + Duration::from_secs(5);
    let Some(mut before) = server_cpu_time() else {
        return;
    };
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(now) = server_cpu_time() else {
            return;
        };
        // The clock ticks are 10 ms: one tick or none in a quarter second is idle.
        if now.saturating_sub(before) <= Duration::from_millis(10) {
            return;
        }
        before = now;
    }
}

/// The median; runs measured by wall time only have NaN for CPU, which sorts last.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// What one side's measured window took: wall time and, when the work ran in this process,
/// this process's CPU time (user + system).
#[derive(Clone, Copy)]
struct Measured {
    wall: Duration,
    cpu: Option<Duration>,
    /// The nats-server's CPU time across the window: on this machine most of the cost of a
    /// message is the server's, and what a client sends (headers, acks) changes it.
    server: Option<Duration>,
}

impl Measured {
    /// A window whose work ran in other processes (the scale-out workers): wall time only.
    fn wall(wall: Duration) -> Measured {
        Measured {
            wall,
            cpu: None,
            server: None,
        }
    }
}

/// The benchmark's nats-server, whose CPU time each window also reads.
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// The CPU time (user + system) the benchmark's nats-server has used so far, from
/// `/proc/<pid>/stat` (in clock ticks of 10 ms: fine over windows of a second or more).
fn server_cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", SERVER_PID.get()?)).ok()?;
    // Fields after the command name (which may hold spaces, so split after its `)`):
    // state is the 3rd field of the line, utime the 14th and stime the 15th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    #[allow(unsafe_code)] // sysconf has no safe wrapper in std
    // SAFETY: sysconf reads a constant of the system and has no memory effects.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Some(Duration::from_secs_f64(ticks as f64 / per_second as f64))
}

/// A measured window in progress. Raw and natty run in this one process, one after the
/// other, so the CPU time each side used is the process's CPU time across its own window.
struct Window {
    wall: Instant,
    cpu: Duration,
    server: Option<Duration>,
}

impl Window {
    fn start() -> Window {
        Window {
            cpu: cpu_time(),
            server: server_cpu_time(),
            wall: Instant::now(),
        }
    }

    fn stop(&self) -> Measured {
        let wall = self.wall.elapsed();
        Measured {
            wall,
            cpu: Some(cpu_time().saturating_sub(self.cpu)),
            server: self
                .server
                .zip(server_cpu_time())
                .map(|(start, end)| end.saturating_sub(start)),
        }
    }
}

/// The CPU time (user + system, all threads) this process has used so far.
#[allow(unsafe_code)] // getrusage has no safe wrapper in std
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is valid for writes of a `rusage`, which getrusage fills in; it is
    // zero-initialised, so it is a valid `rusage` even if the call failed.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// User time, system time and context switches (voluntary + involuntary) of this process so
/// far, for `--only consume-raw` / `consume-natty`, which print them per message.
#[allow(unsafe_code)] // getrusage has no safe wrapper in std
fn usage() -> (Duration, Duration, i64) {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: as in `cpu_time`.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (
        time(usage.ru_utime),
        time(usage.ru_stime),
        usage.ru_nvcsw + usage.ru_nivcsw,
    )
}

/// One side's round: messages/s and CPU microseconds per message of this process and of the
/// server (NaN where not measured).
#[derive(Clone, Copy)]
struct Run {
    rate: f64,
    cpu_us: f64,
    server_us: f64,
}

fn rate(count: u64, measured: Measured) -> Run {
    let per_message = |cpu: Option<Duration>| cpu.map_or(f64::NAN, |cpu| cpu.as_secs_f64() * 1e6 / count as f64);
    Run {
        rate: count as f64 / measured.wall.as_secs_f64(),
        cpu_us: per_message(measured.cpu),
        server_us: per_message(measured.server),
    }
}

/// Publishes `count` orders to `subject` with up to 2000 acks in flight (setup, not measured).
async fn fill(js: &jetstream::Context, subject: &str, count: u64) {
    publish_orders(js, count, |_| subject.to_string()).await;
}

/// Publishes orders 0..`count`, each to `subject_of(id)`, up to 2000 acks in flight.
async fn publish_orders(js: &jetstream::Context, count: u64, subject_of: impl Fn(u64) -> String) {
    let mut in_flight = FuturesUnordered::new();
    for id in 0..count {
        let payload = serde_json::to_vec(&Order::new(id)).expect("encode");
        let ack = js.publish(subject_of(id), payload.into()).await.expect("publish");
        in_flight.push(std::future::IntoFuture::into_future(ack));
        if in_flight.len() >= 2000 {
            in_flight.next().await.expect("ack").expect("publish ack");
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack.expect("publish ack");
    }
}

/// A new durable on `bench` that starts from the first message (the raw side's rounds).
async fn fresh_consumer(js: &jetstream::Context, durable: &str) -> jetstream::consumer::PullConsumer {
    let stream = js.get_stream("bench").await.expect("stream");
    let _ = stream.delete_consumer(durable).await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(durable.into()),
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .expect("consumer")
}

/// Raw async-nats: a well-tuned pull loop (batch 1000), serde decode, explicit ack each.
async fn raw_consume(js: &jetstream::Context, count: u64) -> Measured {
    raw_pull_loop(js, "raw", count, false).await
}

/// The raw pull loop on a fresh durable `durable`, acking each message with `ack()`, or with
/// `double_ack()` (an ack the server confirms) when `confirmed`.
async fn raw_pull_loop(js: &jetstream::Context, durable: &str, count: u64, confirmed: bool) -> Measured {
    let consumer = fresh_consumer(js, durable).await;
    quiet_server().await;
    let window = Window::start();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("messages");
    let mut seen = 0;
    while let Some(message) = messages.next().await {
        let message = message.expect("message");
        let _order: Order = serde_json::from_slice(&message.payload).expect("decode");
        if confirmed {
            message.double_ack().await.expect("confirmed ack");
        } else {
            message.ack().await.expect("ack");
        }
        seen += 1;
        if seen == count {
            break;
        }
    }
    let measured = window.stop();
    drop(messages);
    measured
}

/// natty: runs only `handler` until it has handled `count` messages, from a fresh durable.
async fn natty_consume(
    server: &NatsServer,
    js: &jetstream::Context,
    handler: &str,
    durable: &str,
    count: u64,
) -> Measured {
    natty_consume_watched(server, js, handler, durable, count, false).await
}

/// [`natty_consume`], with the console served and, when `watched`, looked at the whole time
/// eight times as often as its page does (the fleet every 250 ms, the dead letters every
/// 1.25 s), so that a run of a second or two sees several requests.
async fn natty_consume_watched(
    server: &NatsServer,
    js: &jetstream::Context,
    handler: &str,
    durable: &str,
    count: u64,
    watched: bool,
) -> Measured {
    let stream = js.get_stream("bench").await.expect("stream");
    let _ = stream.delete_consumer(durable).await;
    quiet_server().await;
    HANDLED.store(0, Ordering::SeqCst);
    TARGET.store(count, Ordering::SeqCst);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut builder = natty_runtime::Runtime::builder().url(server.url()).handlers([handler]);
    let mut page = None;
    if watched {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port for the console");
        page = Some(listener.local_addr().expect("its address"));
        builder = builder.metrics_listener(listener);
    }
    let runtime = builder.build().expect("runtime");
    let done = DONE.notified();
    let window = Window::start();
    let running = tokio::spawn(runtime.run_until(async {
        let _ = stopped.await;
    }));
    let looking = page.map(|addr| tokio::spawn(look_at_console(addr)));
    done.await;
    let measured = window.stop();
    if let Some(looking) = looking {
        looking.abort();
    }
    let _ = stop.send(());
    running.await.expect("join").expect("natty run");
    measured
}

/// Asks the console at `addr` what its page asks, as often, until aborted.
async fn look_at_console(addr: std::net::SocketAddr) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let get = |path: &'static str| async move {
        let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
            return;
        };
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).await.is_ok() {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer).await;
        }
    };
    for tick in 0u64.. {
        get("/api/fleet").await;
        if tick % 5 == 0 {
            get("/api/dead-letters").await;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// What the console costs a consumer while its page is open: natty's default consume with no
/// console served, then with the console served and asked eight times as often as its page
/// does, alternating.
async fn scenario_console(server: &NatsServer, js: &jetstream::Context, args: &Args) {
    purge(js, "bench").await;
    fill(js, "bench.orders", args.messages).await;
    let (mut closed, mut open) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let open_first = round % 2 == 1;
        for watched in [open_first, !open_first] {
            let measured =
                natty_consume_watched(server, js, "consume_default", "natty-default", args.messages, watched).await;
            let runs = if watched { &mut open } else { &mut closed };
            runs.push(rate(args.messages, measured));
        }
        eprintln!(
            "  console round {round}: closed {:.0} ({:.2} us cpu/msg), open {:.0} ({:.2})",
            closed[round].rate, closed[round].cpu_us, open[round].rate, open[round].cpu_us
        );
    }
    let ratio = |of: fn(&Run) -> f64| median(open.iter().zip(&closed).map(|(o, c)| of(o) / of(c)).collect());
    let middle = |runs: &[Run], of: fn(&Run) -> f64| median(runs.iter().map(of).collect());
    println!(
        "{:<28} closed {:>10.0} msg/s   open {:>10.0} msg/s   open/closed {:>5.2}x   (goal: no measurable cost)",
        "consume, console open",
        middle(&closed, |run| run.rate),
        middle(&open, |run| run.rate),
        ratio(|run| run.rate)
    );
    println!(
        "{:<28} cpu/msg closed {:>5.2} us  open {:>7.2} us       open/closed {:>5.2}",
        "",
        middle(&closed, |run| run.cpu_us),
        middle(&open, |run| run.cpu_us),
        ratio(|run| run.cpu_us)
    );
}

/// The median rates of one comparison, raw async-nats and natty (NaN when not run).
#[derive(Clone, Copy)]
struct Rates {
    raw: f64,
    natty: f64,
}

impl Rates {
    const NOT_RUN: Rates = Rates {
        raw: f64::NAN,
        natty: f64::NAN,
    };
}

/// Prints one comparison line, and the CPU time per message when this process did the work;
/// returns the median rates. Each ratio is the median of the per-round ratios: each round
/// runs both sides back to back, so a round's ratio compares them under the same conditions,
/// while the machine drifts between rounds.
fn report(name: &str, raw: &[Run], natty: &[Run], goal: &str) -> Rates {
    let ratio = |of: fn(&Run) -> f64| median(natty.iter().zip(raw).map(|(n, r)| of(n) / of(r)).collect());
    let middle = |runs: &[Run], of: fn(&Run) -> f64| median(runs.iter().map(of).collect());
    let rates = ratio(|run| run.rate);
    let (raw_rate, natty_rate) = (middle(raw, |run| run.rate), middle(natty, |run| run.rate));
    println!(
        "{name:<28} raw {raw_rate:>10.0} msg/s   natty {natty_rate:>10.0} msg/s   natty/raw {rates:>5.2}x   (goal {goal})"
    );
    let (raw_cpu, natty_cpu) = (middle(raw, |run| run.cpu_us), middle(natty, |run| run.cpu_us));
    if raw_cpu.is_finite() && natty_cpu.is_finite() {
        println!(
            "{:<28} cpu/msg raw {raw_cpu:>7.2} us       natty {natty_cpu:>7.2} us       natty/raw {:>5.2}",
            "",
            ratio(|run| run.cpu_us)
        );
    }
    let (raw_server, natty_server) = (middle(raw, |run| run.server_us), middle(natty, |run| run.server_us));
    if raw_server.is_finite() && natty_server.is_finite() {
        println!(
            "{:<28} server cpu/msg raw {raw_server:>5.2} us  natty {natty_server:>7.2} us       natty/raw {:>5.2}",
            "",
            ratio(|run| run.server_us)
        );
    }
    Rates {
        raw: raw_rate,
        natty: natty_rate,
    }
}

async fn scenario_consume(server: &NatsServer, js: &jetstream::Context, args: &Args) -> Rates {
    purge(js, "bench").await;
    fill(js, "bench.orders", args.messages).await;
    let (mut raw, mut default, mut tuned) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Alternate which side goes first, so neither always runs on a warmer server.
        let natty_first = round % 2 == 1;
        if natty_first {
            default.push(rate(
                args.messages,
                natty_consume(server, js, "consume_default", "natty-default", args.messages).await,
            ));
            tuned.push(rate(
                args.messages,
                natty_consume(server, js, "consume_prefetch", "natty-prefetch", args.messages).await,
            ));
        }
        raw.push(rate(args.messages, raw_consume(js, args.messages).await));
        if !natty_first {
            default.push(rate(
                args.messages,
                natty_consume(server, js, "consume_default", "natty-default", args.messages).await,
            ));
            tuned.push(rate(
                args.messages,
                natty_consume(server, js, "consume_prefetch", "natty-prefetch", args.messages).await,
            ));
        }
        eprintln!(
            "  consume round {round}: raw {:.0} ({:.2} us cpu/msg), natty default {:.0} ({:.2}), natty prefetch 1000 {:.0} ({:.2})",
            raw[round].rate,
            raw[round].cpu_us,
            default[round].rate,
            default[round].cpu_us,
            tuned[round].rate,
            tuned[round].cpu_us
        );
    }
    let natty = report("consume (defaults)", &raw, &default, ">= 1.00x");
    report("consume (prefetch 1000)", &raw, &tuned, ">= 1.00x");
    natty
}

/// The consume scenario's raw loop or natty's defaults alone (`--only consume-raw` or
/// `consume-natty`), to profile one side: `perf record -p` on this process then sees only it.
async fn scenario_consume_alone(server: &NatsServer, js: &jetstream::Context, args: &Args, side: &str) {
    purge(js, "bench").await;
    fill(js, "bench.orders", args.messages).await;
    for round in 0..args.rounds {
        let before = usage();
        let measured = match side {
            "raw" => raw_consume(js, args.messages).await,
            _ => natty_consume(server, js, "consume_default", "natty-default", args.messages).await,
        };
        let after = usage();
        let run = rate(args.messages, measured);
        let per = |d: Duration| d.as_secs_f64() * 1e6 / args.messages as f64;
        eprintln!(
            "  consume {side} alone, round {round}: {:.0} msg/s, {:.2} us cpu/msg ({:.2} user, {:.2} system), {:.3} context switches/msg",
            run.rate,
            run.cpu_us,
            per(after.0 - before.0),
            per(after.1 - before.1),
            (after.2 - before.2) as f64 / args.messages as f64
        );
    }
}

/// Raw async-nats fetching batches of 500 (`fetch`), decoding each message and acking each, as
/// natty's batch consumer does.
async fn raw_batches(js: &jetstream::Context, count: u64) -> Measured {
    let consumer = fresh_consumer(js, "raw-batch").await;
    let window = Window::start();
    let mut seen = 0;
    while seen < count {
        let mut batch = consumer
            .fetch()
            .max_messages(500)
            .expires(Duration::from_millis(100))
            .messages()
            .await
            .expect("fetch");
        let mut messages = Vec::with_capacity(500);
        while let Some(message) = batch.next().await {
            messages.push(message.expect("message"));
        }
        let _orders: Vec<Order> = messages
            .iter()
            .map(|message| serde_json::from_slice(&message.payload).expect("decode"))
            .collect();
        for message in &messages {
            message.ack().await.expect("ack");
        }
        seen += messages.len() as u64;
    }
    window.stop()
}

/// Raw async-nats acking each message with `double_ack` (an ack the server confirms), one at a
/// time: what natty's `ack = "confirmed"` does with one handler slot.
async fn raw_confirmed(js: &jetstream::Context, count: u64) -> Measured {
    raw_pull_loop(js, "raw-confirmed", count, true).await
}

/// Confirmed acks against natty's default (sent, not waited for), on a tenth of the messages
/// (a round trip per message makes the one-slot side slow; its rate does not depend on the
/// count): natty's defaults, `ack = "confirmed"` with one handler slot and with 32, and raw
/// async-nats acking with `double_ack`, their order rotating.
async fn scenario_confirmed(server: &NatsServer, js: &jetstream::Context, args: &Args) {
    let count = (args.messages / 10).max(1000);
    purge(js, "bench").await;
    fill(js, "bench.orders", count).await;
    let (mut sent, mut one, mut many, mut raw) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        for side in (0..4).map(|place| (place + round) % 4) {
            match side {
                0 => sent.push(rate(
                    count,
                    natty_consume(server, js, "consume_default", "natty-default", count).await,
                )),
                1 => one.push(rate(
                    count,
                    natty_consume(server, js, "consume_confirmed", "natty-confirmed", count).await,
                )),
                2 => many.push(rate(
                    count,
                    natty_consume(server, js, "consume_confirmed_32", "natty-confirmed-32", count).await,
                )),
                _ => raw.push(rate(count, raw_confirmed(js, count).await)),
            }
        }
        eprintln!(
            "  confirmed round {round}: natty sent {:.0}, confirmed {:.0}, confirmed x32 {:.0}, raw double_ack {:.0}",
            sent[round].rate, one[round].rate, many[round].rate, raw[round].rate
        );
    }
    println!("confirmed acks, {count} messages (\"raw\" below is the side compared against):");
    report("  confirmed vs natty sent", &sent, &one, "-");
    report("  confirmed x32 vs sent", &sent, &many, "-");
    report("  confirmed vs raw double_ack", &raw, &one, "-");
}

async fn scenario_batch(server: &NatsServer, js: &jetstream::Context, args: &Args) {
    purge(js, "bench").await;
    fill(js, "bench.orders", args.messages).await;
    let (mut raw, mut natty) = (Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let natty_first = round % 2 == 1;
        if natty_first {
            natty.push(rate(
                args.messages,
                natty_consume(server, js, "consume_batch", "natty-batch", args.messages).await,
            ));
        }
        raw.push(rate(args.messages, raw_batches(js, args.messages).await));
        if !natty_first {
            natty.push(rate(
                args.messages,
                natty_consume(server, js, "consume_batch", "natty-batch", args.messages).await,
            ));
        }
        eprintln!(
            "  batch round {round}: raw {:.0} ({:.2} us cpu/msg), natty {:.0} ({:.2})",
            raw[round].rate, raw[round].cpu_us, natty[round].rate, natty[round].cpu_us
        );
    }
    report("batch of 500 (no-op)", &raw, &natty, "report");
}

/// Waits until `durable` on `bench` has acked every message in it: everything captured and stored.
async fn acked(js: &jetstream::Context, durable: &str) {
    let mut stream = js.get_stream("bench").await.expect("stream");
    // The stream's messages are numbered on from before its purges: the work is done when the
    // ack floor reaches its last sequence (not the message count, which a fresh consumer's
    // floor already passes after a purge: rounds "done" at once, at absurd rates).
    let last = stream.info().await.expect("stream info").state.last_sequence;
    loop {
        if let Ok(info) = stream.consumer_info(durable).await {
            if info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0 {
                return;
            }
            // BENCH_DEBUG=1 shows how the ack floor moves: where a capture spends its time.
            if std::env::var("BENCH_DEBUG").is_ok() {
                eprintln!(
                    "{durable}: floor {:?} pending {} ack pending {}",
                    info.ack_floor, info.num_pending, info.num_ack_pending
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Raw async-nats doing a capture by hand: pull (batch 1000), decode, append NDJSON to the
/// block of its key, and every 10,000 messages of a key compress the block, write it to a
/// temporary file, fsync it, rename it into place, fsync the folder and ack its messages one
/// by one. Timed until the server has every ack.
async fn raw_capture(
    js: &jetstream::Context,
    count: u64,
    dir: &std::path::Path,
    compression: RawCompression,
) -> Measured {
    let stream = js.get_stream("bench").await.expect("stream");
    let _ = stream.delete_consumer("raw-capture").await;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("raw-capture".into()),
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .expect("consumer");
    // As every other side: the previous side's leftovers (a deleted consumer's state, the
    // store's flushes) are the server's work before the window, not in it.
    quiet_server().await;
    let window = Window::start();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("messages");
    let mut blocks: std::collections::HashMap<u64, (Vec<u8>, Vec<jetstream::Message>)> = Default::default();
    let mut written = 0u64;
    let store = |key: u64, bytes: Vec<u8>, n: u64| {
        let folder = dir.join(key.to_string());
        async move {
            tokio::fs::create_dir_all(&folder).await.expect("folder");
            // What a capture must do before it acks: the block on disk (fsync), then its name
            // (rename, fsync of the folder), so a power cut after the acks loses nothing.
            let temporary = folder.join(format!(".tmp-{n}"));
            let mut file = tokio::fs::File::create(&temporary).await.expect("create");
            tokio::io::AsyncWriteExt::write_all(&mut file, &bytes)
                .await
                .expect("write");
            file.sync_all().await.expect("fsync");
            tokio::fs::rename(&temporary, folder.join(format!("block-{n}.ndjson")))
                .await
                .expect("rename");
            tokio::fs::File::open(&folder)
                .await
                .expect("folder")
                .sync_all()
                .await
                .expect("fsync the folder");
        }
    };
    let mut seen = 0;
    while let Some(message) = messages.next().await {
        let message = message.expect("message");
        let order: Order = serde_json::from_slice(&message.payload).expect("decode");
        let block = blocks.entry(order.id % 10).or_default();
        serde_json::to_writer(&mut block.0, &order).expect("encode");
        block.0.push(b'\n');
        block.1.push(message);
        if block.1.len() == 10_000 {
            let (bytes, held) = std::mem::take(block);
            written += 1;
            store(order.id % 10, compression.apply(bytes), written).await;
            for message in held {
                message.ack().await.expect("ack");
            }
        }
        seen += 1;
        if seen == count {
            break;
        }
    }
    for (key, (bytes, held)) in blocks.drain() {
        if held.is_empty() {
            continue;
        }
        written += 1;
        store(key, compression.apply(bytes), written).await;
        for message in held {
            message.ack().await.expect("ack");
        }
    }
    acked(js, "raw-capture").await;
    window.stop()
}

/// natty's `#[capture]` on the same workload, timed until the server has every ack.
async fn natty_capture(server: &NatsServer, js: &jetstream::Context, case: &CaptureCase) -> Measured {
    let stream = js.get_stream("bench").await.expect("stream");
    let _ = stream.delete_consumer(case.durable).await;
    quiet_server().await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let runtime = natty_runtime::Runtime::builder()
        .url(server.url())
        .handlers([case.handler])
        .build()
        .expect("runtime");
    let window = Window::start();
    let running = tokio::spawn(runtime.run_until(async {
        let _ = stopped.await;
    }));
    acked(js, case.durable).await;
    let measured = window.stop();
    let _ = stop.send(());
    running.await.expect("join").expect("natty run");
    measured
}

/// Each capture format against the raw capture loop writing the same blocks (where it has
/// one) and against raw explicit-ack consume of the same messages (the ceiling of any
/// capture): all three back to back in each round, their order rotating.
async fn scenario_capture(server: &NatsServer, js: &jetstream::Context, args: &Args) {
    purge(js, "bench").await;
    fill(js, "bench.orders", args.messages).await;
    for case in &CAPTURE_CASES {
        let (mut raw, mut consume, mut natty) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds {
            let dir = tempfile::tempdir().expect("temp dir");
            // Read by the store template of the capture handlers when their runtime starts.
            std::env::set_var(
                "NATTY_BENCH_CAPTURE",
                format!("file://{}", dir.path().join("natty").display()),
            );
            for side in (0..3).map(|place| (place + round) % 3) {
                match (side, case.raw) {
                    (0, Some(compression)) => raw.push(rate(
                        args.messages,
                        raw_capture(js, args.messages, &dir.path().join("raw"), compression).await,
                    )),
                    (0, None) => {}
                    (1, _) => consume.push(rate(args.messages, raw_consume(js, args.messages).await)),
                    _ => natty.push(rate(args.messages, natty_capture(server, js, case).await)),
                }
            }
            eprintln!(
                "  capture {} round {round}: raw capture {}, raw consume {:.0}, natty {:.0}",
                case.name,
                raw.get(round)
                    .map_or("-".to_string(), |run: &Run| format!("{:.0}", run.rate)),
                consume[round].rate,
                natty[round].rate
            );
        }
        if !raw.is_empty() {
            report(&format!("capture ({}, local)", case.name), &raw, &natty, ">= 0.95x");
        }
        report(&format!("  {} against raw consume", case.name), &consume, &natty, "-");
    }
}

async fn scenario_publish(server: &NatsServer, js: &jetstream::Context, args: &Args) -> Rates {
    const WINDOW: usize = 2000;
    let config = natty_runtime::Config::from_lookup(|_| None).expect("config");
    let client = natty_runtime::Client::connect_with(&config, &server.url())
        .await
        .expect("connect");
    let payloads: Vec<Order> = (0..args.messages).map(Order::new).collect();
    // Every publish carries an idempotency key (Nats-Msg-Id), unique per round. Subjects and
    // keys have the same length on both sides: the server's work grows with the bytes.
    let (payloads, client) = (&payloads, &client);
    // `same_headers`: the raw side also sends what every natty publish carries besides the
    // key (a `traceparent`, 70 bytes; JSON goes without a `Content-Type`), to tell natty's code
    // from the bytes it adds.
    let raw_round = |round: usize, same_headers: bool| async move {
        fresh_publish_stream(js).await;
        let window = Window::start();
        let mut in_flight = FuturesUnordered::new();
        let mut ids = 1u128..;
        for order in payloads {
            let payload = serde_json::to_vec(order).expect("encode");
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("{}-{round}-{}", if same_headers { "hdr" } else { "raw" }, order.id).as_str(),
            );
            if same_headers {
                let id = ids.next().expect("ids");
                // Not sampled, as natty marks a trace it starts with no exporter.
                headers.insert("traceparent", format!("00-{id:032x}-{:016x}-00", id as u64).as_str());
            }
            let ack = js
                .publish_with_headers("published.raw", headers, payload.into())
                .await
                .expect("publish");
            in_flight.push(std::future::IntoFuture::into_future(ack));
            if in_flight.len() >= WINDOW {
                in_flight.next().await.expect("ack").expect("publish ack");
            }
        }
        while let Some(ack) = in_flight.next().await {
            ack.expect("publish ack");
        }
        rate(args.messages, window.stop())
    };
    let natty_round = |round: usize| async move {
        fresh_publish_stream(js).await;
        let window = Window::start();
        let mut in_flight = FuturesUnordered::new();
        for order in payloads {
            let options = natty_runtime::Publish::new().id(format!("nty-{round}-{}", order.id));
            let pending = client.send_with("published.nty", order, options).await.expect("send");
            in_flight.push(pending);
            if in_flight.len() >= WINDOW {
                in_flight.next().await.expect("ack").expect("publish ack");
            }
        }
        while let Some(ack) = in_flight.next().await {
            ack.expect("publish ack");
        }
        rate(args.messages, window.stop())
    };
    let (mut raw, mut same, mut natty) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        // Rotate the order, each side taking each place once every three rounds, so that
        // whatever the server still does for the side before (collecting its garbage) weighs
        // on each side alike.
        for side in (0..3).map(|place| (place + round) % 3) {
            match side {
                0 => raw.push(raw_round(round, false).await),
                1 => natty.push(natty_round(round).await),
                _ => same.push(raw_round(round, true).await),
            }
        }
        eprintln!(
            "  publish round {round}: raw {:.0} ({:.2} us cpu/msg, server {:.2}), natty {:.0} ({:.2}, {:.2}), raw with natty's headers {:.0} ({:.2}, {:.2})",
            raw[round].rate, raw[round].cpu_us, raw[round].server_us, natty[round].rate, natty[round].cpu_us, natty[round].server_us,
            same[round].rate, same[round].cpu_us, same[round].server_us
        );
    }
    let rate = report("publish, id each (2000 in flight)", &raw, &natty, ">= 0.97x");
    report("  the same, raw with natty's headers", &same, &natty, "-");
    rate
}

/// Deletes and creates the stream `published` (subjects `published.>`, file storage, the
/// default 2-minute duplicate window) and waits for the server to be idle. A fresh stream per
/// publish side, not a purge: a purge keeps the message ids of the duplicate window, so each
/// side would find the ids of every side before it (up to a million within two minutes), and
/// the server's work per message grew with them round after round (its CPU per message
/// doubled over eight rounds, whichever side ran).
async fn fresh_publish_stream(js: &jetstream::Context) {
    let _ = js.delete_stream("published").await;
    js.create_stream(jetstream::stream::Config {
        name: "published".into(),
        subjects: vec!["published.>".into()],
        storage: StorageType::File,
        ..Default::default()
    })
    .await
    .expect("the publish scenario's stream");
    quiet_server().await;
}

/// The peer framework: bench/faststream/bench.py on the same server. Consume with per-message
/// handlers (the shape of natty's) and batch handlers (FastStream's fastest) on a tenth of the
/// messages (its rate does not depend on the count); publish on the full count, since the
/// server's deduplication work grows with the ids it holds.
async fn scenario_faststream(server: &NatsServer, python: &str, args: &Args, consumed: Rates, published: Rates) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/faststream/bench.py");
    let rounds = args.rounds.min(3).to_string();
    let run = |only: &'static str, handler: &'static str, messages: u64| {
        let rounds = rounds.clone();
        async move {
            let output = tokio::process::Command::new(python)
                .args([
                    script,
                    "--url",
                    &server.url(),
                    "--messages",
                    &messages.to_string(),
                    "--rounds",
                    &rounds,
                ])
                .args(["--only", only, "--handler", handler])
                .stdout(std::process::Stdio::piped())
                // Its per-round figures and any failure reach the terminal (`output()` would capture them).
                .stderr(std::process::Stdio::inherit())
                .spawn()
                .expect("run the FastStream bench")
                .wait_with_output()
                .await
                .expect("wait for the FastStream bench");
            assert!(output.status.success(), "the FastStream bench failed");
            let text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.lines()
                .find_map(|line| line.strip_prefix(&format!("faststream {only} ")))
                .and_then(|value| value.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        }
    };
    let few = (args.messages / 10).max(1000);
    for handler in ["message", "batch"] {
        let consume = run("consume", handler, few).await;
        println!(
            "faststream consume ({handler:<7} handler) {consume:>8.0} msg/s   natty {:>5.1}x   raw {:>5.1}x   (goal: natty >= 0.97 x raw)",
            consumed.natty / consume,
            consumed.raw / consume
        );
    }
    let publish = run("publish", "message", args.messages).await;
    println!(
        "faststream publish, id each         {publish:>8.0} msg/s   natty {:>5.1}x   raw {:>5.1}x",
        published.natty / publish,
        published.raw / publish
    );
}

/// Raw async-nats with the same concurrency: a pull loop (batch 1000) spawning each message
/// under a 64-permit semaphore, sleeping 5 ms, then acking: what this machine's timers allow.
async fn raw_concurrency(js: &jetstream::Context, count: u64) -> Measured {
    let consumer = fresh_consumer(js, "raw-io").await;
    let window = Window::start();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("messages");
    let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
    let done = std::sync::Arc::new(AtomicU64::new(0));
    let finished = std::sync::Arc::new(Notify::new());
    let all_done = finished.notified();
    for _ in 0..count {
        let permit = permits.clone().acquire_owned().await.expect("permit");
        let message = messages.next().await.expect("open").expect("message");
        let (done, finished) = (done.clone(), finished.clone());
        tokio::spawn(async move {
            let _order: Order = serde_json::from_slice(&message.payload).expect("decode");
            tokio::time::sleep(Duration::from_millis(5)).await;
            message.ack().await.expect("ack");
            drop(permit);
            if done.fetch_add(1, Ordering::Relaxed) + 1 == count {
                finished.notify_one();
            }
        });
    }
    all_done.await;
    window.stop()
}

async fn scenario_concurrency(server: &NatsServer, js: &jetstream::Context, args: &Args) {
    // 5 ms per message, 64 at a time: at most 12,800 msg/s.
    let count = (args.messages / 10).max(1000);
    purge(js, "bench").await;
    fill(js, "bench.orders", count).await;
    let (mut raw, mut natty, mut slept) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        raw.push(rate(count, raw_concurrency(js, count).await));
        SLEPT_NANOS.store(0, Ordering::SeqCst);
        natty.push(rate(
            count,
            natty_consume(server, js, "consume_io", "natty-io", count).await,
        ));
        slept.push(SLEPT_NANOS.load(Ordering::SeqCst) as f64 / count as f64 / 1e9);
        eprintln!(
            "  concurrency round {round}: raw {:.0}, natty {:.0}, mean real sleep {:.2} ms",
            raw[round].rate,
            natty[round].rate,
            slept[round] * 1e3
        );
    }
    let ideal = 64.0 / 0.005;
    let achievable = 64.0 / median(slept.clone());
    let natty = report("concurrency (64 x 5 ms)", &raw, &natty, ">= 1.00x").natty;
    println!(
        "{:<28} natty/ideal {:.2}x of 64 / 5 ms = {ideal:.0} msg/s; {:.2}x of 64 / measured sleep = {achievable:.0} msg/s   (goal >= 0.90x)",
        "",
        natty / ideal,
        natty / achievable,
    );
}

/// Scale-out on a 3-node cluster: 1, 2 and 3 worker processes sharing one durable on an R3
/// stream, natty against raw async-nats with the same per-message work and concurrency.
/// Each run drains the same messages from a fresh durable; the clock runs from the first
/// delivery to the last ack, as the server reports them.
async fn scenario_scale(args: &Args) {
    use natty_runtime::testing::NatsCluster;
    let count = (args.messages / 10).max(1000);
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let url = cluster.urls().join(",");
    let js = jetstream::new(cluster.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "scale".into(),
        subjects: vec!["scale.>".into()],
        storage: StorageType::File,
        num_replicas: 3,
        ..Default::default()
    })
    .await
    .expect("create the R3 stream");
    fill_keyed(&js, "scale", SCALE_KEYS, count).await;
    println!(
        "scale-out: {count} messages on an R3 stream ({SCALE_KEYS} keys), 3 nodes on loopback; {} ms of work per message, {SCALE_CONCURRENCY} at a time per instance",
        SCALE_WORK.as_millis()
    );
    println!("  ordered: natty's partitioned group (8 partitions, order_by the key), against natty's shared durable (no order across instances)");
    for instances in 1..=3 {
        let (mut raw, mut natty, mut ordered) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds.min(3) {
            for side in ["raw", "natty", "ordered"] {
                let took = scale_run(&js, &url, side, instances, count).await;
                let rate = rate(count, Measured::wall(took));
                match side {
                    "raw" => raw.push(rate),
                    "natty" => natty.push(rate),
                    _ => ordered.push(rate),
                }
            }
            eprintln!(
                "  scale {instances} instance(s) round {round}: raw {:.0}, natty {:.0}, ordered {:.0}",
                raw[round].rate, natty[round].rate, ordered[round].rate
            );
        }
        report(&format!("scale-out, {instances} instance(s)"), &raw, &natty, ">= 1.00x");
        let ratio = median(ordered.iter().zip(&natty).map(|(o, n)| o.rate / n.rate).collect());
        let middle = |runs: &[Run]| median(runs.iter().map(|run| run.rate).collect());
        println!(
            "{:<28} shared {:>7.0} msg/s   ordered {:>8.0} msg/s   ordered/shared {ratio:>5.2}x",
            format!("  ordered, {instances} instance(s)"),
            middle(&natty),
            middle(&ordered)
        );
    }
}

/// Publishes `count` orders to `<prefix>.k<id % keys>`.
async fn fill_keyed(js: &jetstream::Context, prefix: &str, keys: u64, count: u64) {
    publish_orders(js, count, |id| format!("{prefix}.k{}", id % keys)).await;
}

/// One scale-out run: a fresh durable, `instances` worker processes of `side`, until all
/// `count` messages are acked.
async fn scale_run(js: &jetstream::Context, url: &str, side: &str, instances: usize, count: u64) -> Duration {
    if side == "ordered" {
        return scale_run_ordered(js, url, instances, count).await;
    }
    let stream = js.get_stream("scale").await.expect("stream");
    let _ = stream.delete_consumer("scale").await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some("scale".into()),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .expect("consumer");
    let children = scale_workers(url, side, "scale_work", instances);
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let info = stream.consumer_info("scale").await.expect("consumer info");
        if started.is_none() && info.delivered.stream_sequence > 0 {
            started = Some(Instant::now());
        }
        if info.ack_floor.stream_sequence >= count {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "scale-out run ({side}, {instances}) did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.expect("a first delivery").elapsed();
    for mut child in children {
        let _ = child.kill().await;
    }
    took
}

/// Starts `instances` scale workers running `handler` (natty, set up as `run()` does).
fn scale_workers(url: &str, side: &str, handler: &str, instances: usize) -> Vec<tokio::process::Child> {
    let exe = std::env::current_exe().expect("current exe");
    (0..instances)
        .map(|_| {
            tokio::process::Command::new(&exe)
                .arg("--scale-worker")
                .arg(side)
                .env("NATS_URL", url)
                .env("NATTY_HANDLERS", handler)
                // Set up as run() does (its log level included); their log lines are not shown.
                .stderr(std::process::Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("spawn a scale worker")
        })
        .collect()
}

/// One ordered scale-out run: a fresh group (its stream sources all `count` messages anew),
/// `instances` workers, from the first ack until the group's work queue is empty.
async fn scale_run_ordered(js: &jetstream::Context, url: &str, instances: usize, count: u64) -> Duration {
    // A fresh group, and no members or leases left by the last run's killed workers.
    let _ = js.delete_stream("scale_ordered").await;
    let _ = js.delete_stream("KV_natty_groups").await;
    let children = scale_workers(url, "natty", "scale_ordered", instances);
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(mut stream) = js.get_stream("scale_ordered").await {
            if let Ok(info) = stream.info().await {
                let state = &info.state;
                // A work queue removes what is acked.
                if started.is_none() && state.last_sequence > state.messages {
                    started = Some(Instant::now());
                }
                if state.last_sequence >= count && state.messages == 0 {
                    break;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "ordered scale-out run ({instances}) did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.expect("a first ack").elapsed();
    for mut child in children {
        let _ = child.kill().await;
    }
    took
}

async fn scenario_footprint(server: &NatsServer, js: &jetstream::Context) {
    purge(js, "idle").await;
    // A service of its own (bench/idle), built beside this program with natty-runtime's default
    // features: its memory is a user's service's, not this program's. Built twice by
    // scripts/bench.sh: with cargo's release profile, and for size (`release-small`: fat LTO, one
    // codegen unit), as a service whose footprint matters would be.
    let exe = std::env::current_exe().expect("current exe");
    let small = exe
        .parent()
        .and_then(|dir| dir.parent())
        .map(|target| target.join("release-small").join("natty-bench-idle"));
    let builds = [
        ("footprint", Some(exe.with_file_name("natty-bench-idle"))),
        ("footprint, built for size", small),
    ];
    for (label, exe) in builds {
        let Some(exe) = exe.filter(|exe| exe.exists()) else {
            println!(
                "{label}: skipped (the service is missing; scripts/bench.sh builds it with `cargo build --release -p natty-bench-idle` and `--profile release-small`)"
            );
            continue;
        };
        // Three starts, the median of each figure: one start's time to its first message
        // moved by 10 ms from run to run.
        let mut starts = Vec::new();
        for _ in 0..3 {
            // One message for the ten durables to handle at start (the last run's are acked).
            js.publish("idle.go", serde_json::to_vec(&Order::new(1)).expect("encode").into())
                .await
                .expect("publish")
                .await
                .expect("ack");
            starts.push(footprint(server, &exe).await);
        }
        let middle = |of: fn(&Footprint) -> f64| median(starts.iter().map(of).collect());
        println!(
            "{label:<28} idle RSS with 10 consumers {:.0} kB (anonymous {:.0} kB); process start to first handled message {:.0} ms (medians of 3 starts)",
            middle(|start| start.rss_kb),
            middle(|start| start.anonymous_kb),
            middle(|start| start.to_first.as_secs_f64() * 1000.0),
        );
    }
}

/// What one start of the footprint service measured.
struct Footprint {
    rss_kb: f64,
    anonymous_kb: f64,
    to_first: Duration,
}

/// Starts the footprint service at `exe`, waits until its ten consumers handled the waiting
/// message, lets it sit idle, then reads its resident memory; and its time to the first message.
async fn footprint(server: &NatsServer, exe: &std::path::Path) -> Footprint {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(exe)
        .env("NATS_URL", server.url())
        // Set up as run() does (its log level included); its log lines are not shown.
        .stderr(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the idle service");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("a handled message within 30 s")
        .expect("read");
    let to_first = started.elapsed();
    assert_eq!(first.as_deref(), Some("handled"));
    // Let the other nine handle their copy too, then let it sit idle before reading its memory.
    let mut handled = 1;
    while handled < IDLE_CONSUMERS {
        if tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .is_err()
        {
            break;
        }
        handled += 1;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = child.id().expect("pid");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    // In kB; NaN when the line is missing.
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    // RSS counts the pages of the service's code that were touched, shared with any other
    // process running it. What the service itself allocated is the anonymous part.
    let measured = Footprint {
        rss_kb: field("VmRSS:"),
        anonymous_kb: field("RssAnon:"),
        to_first,
    };
    let _ = child.kill().await;
    measured
}

/// The resident set's high-water mark and current size of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Resets the resident set's high-water mark to the current size (Linux 4.0+), so that each
/// case's peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Waits until `durable` has acked the whole of `bench` and nothing waits for it; returns the
/// largest `num_ack_pending` seen meanwhile.
async fn all_acked(js: &jetstream::Context, durable: &str, timeout: Duration) -> i64 {
    let mut stream = js.get_stream("bench").await.expect("stream");
    let last = stream.info().await.expect("stream info").state.last_sequence;
    let deadline = Instant::now() + timeout;
    let mut most = 0;
    while Instant::now() < deadline {
        if let Ok(info) = stream.consumer_info(durable).await {
            most = most.max(info.num_ack_pending as i64);
            if info.ack_floor.stream_sequence >= last && info.num_ack_pending == 0 && info.num_pending == 0 {
                return most;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{durable} did not ack the whole stream within {timeout:?}");
}

/// Peak memory of a capture (`--only capture-memory`, not run by default): (a) 10,000 keys with
/// a block open each, (b) 20,000 msg/s through a 30 s store outage, with the default budget and with 32 MiB (the local store's folder
/// replaced by a file, so every write fails, then put back). Each case runs in a process of its
/// own (this program again, with `NATTY_BENCH_MEMORY_CASE` set), since the allocator keeps
/// what one case freed; its peak RSS is that process's high-water mark from just before the
/// capture starts, and includes the publisher in (b).
async fn scenario_capture_memory(server: &NatsServer, js: &jetstream::Context, args: &Args) {
    let case = std::env::var("NATTY_BENCH_MEMORY_CASE").unwrap_or_default();
    if case.is_empty() {
        for case in ["keys", "outage", "bounded"] {
            let status = tokio::process::Command::new(std::env::current_exe().expect("current exe"))
                .args(["--only", "capture-memory", "--messages", &args.messages.to_string()])
                .env("NATTY_BENCH_MEMORY_CASE", case)
                .status()
                .await
                .expect("run a capture-memory case");
            assert!(status.success(), "capture-memory case {case}: {status}");
        }
        println!(
            "{:<28} budget per capture: {} MiB (the default)",
            "capture-memory",
            natty_runtime::capture::DEFAULT_MAX_MEMORY >> 20
        );
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).expect("store folder");
    std::env::set_var("NATTY_BENCH_MEMORY", format!("file://{}", root.display()));
    let run = |handler: &'static str| {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let runtime = natty_runtime::Runtime::builder()
            .url(server.url())
            .handlers([handler])
            .build()
            .expect("runtime");
        let running = tokio::spawn(runtime.run_until(async {
            let _ = stopped.await;
        }));
        (stop, running)
    };
    let stream = js.get_stream("bench").await.expect("stream");

    // (a) Ten thousand keys.
    if case == "keys" {
        purge(js, "bench").await;
        let _ = stream.delete_consumer("natty-memory-keys").await;
        let count = args.messages;
        fill(js, "bench.orders", count).await;
        reset_peak_rss();
        let (_, before) = rss();
        let started = Instant::now();
        let (stop, running) = run("memory_keys");
        let most_pending = all_acked(js, "natty-memory-keys", Duration::from_secs(300)).await;
        let took = started.elapsed();
        let (peak, _) = rss();
        let _ = stop.send(());
        running.await.expect("join").expect("natty run");
        println!(
            "{:<28} 10,000 keys, {count} messages (gzip NDJSON): peak RSS {:.1} MiB ({:.1} MiB before), \
         most unacked {most_pending}, {:.0} msg/s",
            "capture-memory",
            peak as f64 / 1048576.0,
            before as f64 / 1048576.0,
            count as f64 / took.as_secs_f64()
        );
        return;
    }

    // (b) A 30 s store outage at ~20,000 msg/s: 5 s before, 30 s down, 5 s after.
    let (handler, durable, budget) = match case.as_str() {
        "bounded" => ("memory_bounded", "natty-memory-bounded", "budget 32 MiB"),
        _ => ("memory_outage", "natty-memory-outage", "default budget"),
    };
    const RATE: u64 = 20_000;
    const TICK: Duration = Duration::from_millis(10);
    purge(js, "bench").await;
    let _ = stream.delete_consumer(durable).await;
    reset_peak_rss();
    let (_, before) = rss();
    let (stop, running) = run(handler);
    let publisher = {
        let js = js.clone();
        tokio::spawn(async move {
            let per_tick = RATE * TICK.as_millis() as u64 / 1000;
            let mut tick = tokio::time::interval(TICK);
            let mut in_flight = FuturesUnordered::new();
            let started = Instant::now();
            let mut id = 0;
            while started.elapsed() < Duration::from_secs(40) {
                tick.tick().await;
                for _ in 0..per_tick {
                    let payload = serde_json::to_vec(&Order::new(id)).expect("encode");
                    id += 1;
                    let ack = js.publish("bench.orders", payload.into()).await.expect("publish");
                    in_flight.push(std::future::IntoFuture::into_future(ack));
                }
                while in_flight.len() > 2000 {
                    in_flight.next().await.expect("ack").expect("publish ack");
                }
            }
            while let Some(ack) = in_flight.next().await {
                ack.expect("publish ack");
            }
            (id, started.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    let away = dir.path().join("store.away");
    std::fs::rename(&root, &away).expect("take the store away");
    std::fs::write(&root, b"not a folder").expect("block the store");
    let outage = Instant::now();
    let mut most_during = 0i64;
    while outage.elapsed() < Duration::from_secs(30) {
        if let Ok(info) = stream.consumer_info(durable).await {
            most_during = most_during.max(info.num_ack_pending as i64);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (peak_outage, rss_outage) = rss();
    std::fs::remove_file(&root).expect("unblock the store");
    std::fs::rename(&away, &root).expect("put the store back");
    let (published, publishing) = publisher.await.expect("publisher");
    let most_pending = all_acked(js, durable, Duration::from_secs(300)).await;
    let (peak, _) = rss();
    let _ = stop.send(());
    running.await.expect("join").expect("natty run");
    println!(
        "{:<28} {budget}, 30 s store outage at {:.0} msg/s ({published} messages): peak RSS {:.1} MiB \
         (at the outage's end {:.1} MiB, peak during it {:.1} MiB, {:.1} MiB before), most unacked during the outage {most_during}, overall {most_pending}",
        "capture-memory",
        published as f64 / publishing.as_secs_f64(),
        peak as f64 / 1048576.0,
        rss_outage as f64 / 1048576.0,
        peak_outage as f64 / 1048576.0,
        before as f64 / 1048576.0,
    );
}

#[tokio::main]
async fn main() {
    if std::env::args().nth(1).as_deref() == Some("--scale-worker") {
        // The scale-out scenario's children: `raw` or `natty`.
        if std::env::args().nth(2).as_deref() == Some("raw") {
            raw_scale_worker().await;
        } else {
            set_up_as_run();
            let service = async { natty_runtime::Runtime::builder().build()?.run().await };
            if let Err(error) = service.await {
                eprintln!("{error:?}");
                std::process::exit(1);
            }
        }
        return;
    }
    let subscriber = set_up_as_run();
    let args = args();
    let wants = |name: &str| args.only.as_ref().is_none_or(|only| only.iter().any(|o| o == name));
    let server = NatsServer::start().await.expect("nats-server");
    let _ = SERVER_PID.set(server.pid());
    let js = jetstream::new(server.client().await);
    for (name, subjects) in [("bench", "bench.>"), ("idle", "idle.>")] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .expect("create stream");
    }
    println!(
        "natty-bench: {} messages, {} rounds, nats-server at {} (file storage), {} cores; natty with {subscriber}",
        args.messages,
        args.rounds,
        server.url(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
    );
    let consume = if wants("consume") {
        scenario_consume(&server, &js, &args).await
    } else {
        Rates::NOT_RUN
    };
    for side in ["raw", "natty"] {
        // One side alone, only when named: for `perf record`, where the other side's samples
        // would mix with it.
        if args
            .only
            .as_ref()
            .is_some_and(|only| only.iter().any(|o| *o == format!("consume-{side}")))
        {
            scenario_consume_alone(&server, &js, &args, side).await;
        }
    }
    if wants("confirmed") {
        scenario_confirmed(&server, &js, &args).await;
    }
    if wants("console") {
        scenario_console(&server, &js, &args).await;
    }
    if wants("batch") {
        scenario_batch(&server, &js, &args).await;
    }
    let publish = if wants("publish") {
        scenario_publish(&server, &js, &args).await
    } else {
        Rates::NOT_RUN
    };
    if wants("capture") {
        scenario_capture(&server, &js, &args).await;
    }
    if args
        .only
        .as_ref()
        .is_some_and(|only| only.iter().any(|o| o == "capture-memory"))
    {
        scenario_capture_memory(&server, &js, &args).await;
    }
    if wants("concurrency") {
        scenario_concurrency(&server, &js, &args).await;
    }
    if wants("footprint") {
        scenario_footprint(&server, &js).await;
    }
    if wants("scale") {
        scenario_scale(&args).await;
    }
    match &args.faststream {
        Some(python) if wants("faststream") => scenario_faststream(&server, python, &args, consume, publish).await,
        Some(_) => {}
        None => println!("faststream: skipped (pass --faststream PYTHON, as scripts/bench.sh does)"),
    }
    if args.no_subscriber_too {
        drop(server);
        without_subscriber(&args).await;
    }
}

/// Sets natty up as `run()` does (`init_logging`: its subscriber, `RUST_LOG` or its default
/// `info,async_nats=warn`, and an OTLP exporter when the `OTEL_*` variables name one), unless
/// `BENCH_NO_SUBSCRIBER` is set; says which.
fn set_up_as_run() -> String {
    if std::env::var_os("BENCH_NO_SUBSCRIBER").is_some() {
        return "no subscriber (BENCH_NO_SUBSCRIBER)".into();
    }
    natty_runtime::init_logging();
    let exporter = ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"]
        .iter()
        .find_map(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
    format!(
        "run()'s subscriber (RUST_LOG={}, exporter: {}, sampler: {})",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "unset: info,async_nats=warn".into()),
        exporter.as_deref().unwrap_or("none"),
        std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_else(|_| "default".into()),
    )
}

/// `--no-subscriber-too`: the same scenarios again in a child process with no subscriber (a
/// process cannot take its subscriber back), as a secondary figure.
async fn without_subscriber(args: &Args) {
    println!("--- the same without a subscriber (a child process, its own server and raw baseline) ---");
    let mut command = tokio::process::Command::new(std::env::current_exe().expect("current exe"));
    command
        .env("BENCH_NO_SUBSCRIBER", "1")
        .args(["--rounds", &args.rounds.to_string()])
        .args(["--messages", &args.messages.to_string()]);
    if let Some(only) = &args.only {
        command.args(["--only", &only.join(",")]);
    }
    let status = command.status().await.expect("run the bench without a subscriber");
    assert!(status.success(), "the bench without a subscriber failed");
}
