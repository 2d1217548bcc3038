//! The cluster fault suite: a replicated stream on a real 3-node cluster, published to
//! through natty's client and consumed by three `natty-test-cluster-worker` processes sharing
//! one durable, while a fault strikes: the stream's leader killed, the durable's leader
//! killed, every node restarted in turn, the stream's leader frozen past an election, a worker
//! killed, instances started together or during an election, the election bucket's leader
//! killed under a `#[leader]`. After each, the checker of `natty_tests::fault` proves that no
//! acked value was lost and that the stream holds each value once; a `#[capture]` riding
//! along must store each acked value exactly once.
//!
//! The tests run one at a time (three servers and three workers per test already keep two
//! cores busy), and each prints its figures; run with `--nocapture` to see them, and with
//! `FAULT_WORKER_LOG=info,natty_runtime=debug` for the workers' debug logs on failure.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use natty_runtime::testing::NatsCluster;
use natty_tests::capture::{files, settled};
use natty_tests::fault::{self, Counts, History, Publisher, Report, Tick};
use natty_tests::{collect_lines, collect_stderr, send_signal, spawn_service, wait_until, Job};

const WORKER: &str = env!("CARGO_BIN_EXE_natty-test-cluster-worker");
/// The worker's replicated stream, its durable consumer and its capture's durable.
const STREAM: &str = "fault";
const DURABLE: &str = "readers";
const ARCHIVE: &str = "archive";
const SUBJECT: &str = "fault.values";
/// Values published per second, and most publishes awaiting their ack at once: a modest
/// load that a debug build on two cores sustains next to three servers and three workers.
const RATE: u64 = 150;
const IN_FLIGHT: usize = 24;
/// The leader worker's lease TTL.
const TTL: Duration = Duration::from_secs(2);
/// How long one phase of a scenario may take: well above what it needs (a stalled pull
/// takes 11 s to be noticed), well below a hang.
const PHASE: Duration = Duration::from_secs(45);
/// SIGSTOP: stopped at least this long, longer than the Raft election timeout.
const FROZEN: Duration = Duration::from_secs(8);
const SIGSTOP: i32 = 19;
const SIGCONT: i32 = 18;

/// Clusters started side by side would fight over two cores and time out: one test at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

type Lines = Arc<Mutex<Vec<String>>>;

/// One worker process, restartable, with its output file and everything it printed.
struct Worker {
    name: &'static str,
    child: tokio::process::Child,
    env: Vec<(String, String)>,
    url: String,
    out: PathBuf,
    /// stdout and stderr of every run, oldest first.
    stdout: Vec<Lines>,
    stderr: Vec<Lines>,
}

impl Worker {
    fn start(url: &str, name: &'static str, dir: &Path, handlers: &str, extra: &[(&str, &str)]) -> Worker {
        let out = dir.join(format!("{name}.log"));
        let capture = format!("file://{}", dir.join("capture").display());
        let mut env = vec![
            ("INSTANCE".to_string(), name.to_string()),
            ("NATTY_HANDLERS".to_string(), handlers.to_string()),
            ("FAULT_OUT".to_string(), out.display().to_string()),
            ("FAULT_CAPTURE".to_string(), capture),
        ];
        // FAULT_WORKER_LOG (e.g. "info,natty_runtime=debug") turns up the workers' logs.
        if let Ok(filter) = std::env::var("FAULT_WORKER_LOG") {
            env.push(("RUST_LOG".to_string(), filter));
        }
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut worker = Worker {
            name,
            child: Self::spawn(url, &env),
            env,
            url: url.to_string(),
            out,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        worker.collect();
        worker
    }

    fn spawn(url: &str, env: &[(String, String)]) -> tokio::process::Child {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        spawn_service(Path::new(WORKER), Some(url), &env)
    }

    fn collect(&mut self) {
        self.stdout.push(collect_lines(&mut self.child));
        self.stderr.push(collect_stderr(&mut self.child));
    }

    /// SIGKILL, and wait for the process to be gone.
    async fn kill(&mut self) {
        send_signal(self.child.id().expect("a running worker"), "KILL");
        self.child.wait().await.expect("wait for the killed worker");
    }

    fn restart(&mut self) {
        self.child = Self::spawn(&self.url, &self.env);
        self.collect();
    }

    /// How many values this instance has written so far.
    fn read_count(&self) -> usize {
        fault::read_lines(&[&self.out]).values().sum()
    }

    /// The values its current run has started (`start <value>`, printed with `FAULT_DELAY_MS`).
    fn started(&self) -> Vec<u64> {
        let lines = self.stdout.last().expect("a run").lock().unwrap();
        lines
            .iter()
            .filter_map(|line| line.strip_prefix("start ")?.parse().ok())
            .collect()
    }

    /// Its leader ticks (`tick <instance> <term> <unix nanos>`), over every run.
    fn ticks(&self) -> Vec<Tick> {
        let mut ticks = Vec::new();
        for lines in &self.stdout {
            for line in lines.lock().unwrap().iter() {
                let words: Vec<&str> = line.split(' ').collect();
                if let ["tick", name, term, at] = words[..] {
                    ticks.push((name.to_string(), term.parse().unwrap(), at.parse().unwrap()));
                }
            }
        }
        ticks
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (run, logs) in self.stderr.iter().enumerate() {
                // Stored blocks are routine and many: the rest says what went wrong.
                let logs = logs.lock().unwrap();
                let telling: Vec<&String> = logs.iter().filter(|line| !line.contains("block stored")).collect();
                let tail: Vec<&str> = telling[telling.len().saturating_sub(60)..]
                    .iter()
                    .map(|line| line.as_str())
                    .collect();
                eprintln!(
                    "--- worker {} (run {}) logged ({} blocks stored), last lines:\n{}",
                    self.name,
                    run + 1,
                    logs.len() - telling.len(),
                    tail.join("\n")
                );
            }
        }
    }
}

/// A scenario's world: the cluster, three workers and their folder.
struct Fault {
    scenario: &'static str,
    started: Instant,
    cluster: NatsCluster,
    workers: Vec<Worker>,
    /// Knows every node, for queries when no node is frozen.
    control: async_nats::Client,
    dir: tempfile::TempDir,
    url: String,
    handlers: &'static str,
}

impl Drop for Fault {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in self.cluster.nodes() {
                // Elections and errors; not the routes retried while a peer is down, nor the
                // health checks polled during a restart.
                let log = std::fs::read_to_string(node.server().log_file()).unwrap_or_default();
                let lines: Vec<&str> = log
                    .lines()
                    .filter(|line| line.contains("leader") || line.contains("[ERR]") || line.contains("[WRN]"))
                    .filter(|line| !line.contains("connect to route") && !line.contains("Healthcheck failed"))
                    .collect();
                let tail = &lines[lines.len().saturating_sub(40)..];
                eprintln!(
                    "--- node {} logged (elections, errors, warnings):\n{}",
                    node.name(),
                    tail.join("\n")
                );
            }
        }
    }
}

impl Fault {
    /// Starts a 3-node cluster and three workers running `handlers`: `a` first, then `b` and
    /// `c` once `a` has provisioned the stream and its consumers. (Three instances starting
    /// together on a fresh cluster trip a startup bug of natty's, which
    /// `instances_starting_together_or_during_an_election_all_run` keeps in view; it is not
    /// the fault the other scenarios are about.)
    async fn start(scenario: &'static str, handlers: &'static str) -> Fault {
        let mut fault = Fault::empty(scenario, handlers).await;
        fault.add_worker("a", &[]);
        fault.provisioned().await;
        // The capture runs in instance a only: capture output is exactly once with one
        // capturing instance. With several sharing its durable, a consumer leader that dies
        // before replicating what it delivered hands those messages to another instance, and
        // both store them (the guide's known limits). The consumer runs in all three.
        let consumers: String = handlers
            .split(',')
            .filter(|handler| *handler != ARCHIVE)
            .collect::<Vec<_>>()
            .join(",");
        fault.add_worker_running("b", &consumers, &[]);
        fault.add_worker_running("c", &consumers, &[]);
        fault
    }

    /// A 3-node cluster and no worker yet.
    async fn empty(scenario: &'static str, handlers: &'static str) -> Fault {
        let started = Instant::now();
        let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
        let url = cluster.urls().join(",");
        let control = cluster.client().await;
        Fault {
            scenario,
            started,
            cluster,
            workers: Vec::new(),
            control,
            dir: tempfile::tempdir().expect("a temporary folder"),
            url,
            handlers,
        }
    }

    fn add_worker(&mut self, name: &'static str, extra: &[(&str, &str)]) {
        self.add_worker_running(name, self.handlers, extra);
    }

    /// Starts a worker running only `handlers`.
    fn add_worker_running(&mut self, name: &'static str, handlers: &str, extra: &[(&str, &str)]) {
        let worker = Worker::start(&self.url, name, self.dir.path(), handlers, extra);
        self.workers.push(worker);
    }

    /// Waits until the stream and the consumers exist, replicated, and answer.
    async fn provisioned(&self) {
        let mut durables = vec![DURABLE];
        if self.handlers.contains(ARCHIVE) {
            durables.push(ARCHIVE);
        }
        let js = self.js();
        wait_until(PHASE, "the workers to provision the stream and consumers", || async {
            let Ok(stream) = js.get_stream(STREAM).await else {
                return false;
            };
            let mut all = true;
            for durable in &durables {
                all &= stream.consumer_info(*durable).await.is_ok();
            }
            all && stream.cached_info().config.num_replicas == 3
        })
        .await;
    }

    /// Polls `condition` until it holds, failing after `PHASE` or as soon as a worker exits.
    async fn until(&mut self, what: &str, condition: impl Fn(&Fault) -> bool) {
        let held = self.within_phase(what, condition).await;
        assert!(held, "timed out after {PHASE:?} waiting for {what}");
    }

    /// Polls `condition` until it holds (true) or `PHASE` has passed (false, logged), failing
    /// as soon as a worker exits: for a claim to check after the figures are printed.
    async fn within_phase(&mut self, what: &str, condition: impl Fn(&Fault) -> bool) -> bool {
        let deadline = Instant::now() + PHASE;
        loop {
            for worker in &mut self.workers {
                if let Ok(Some(status)) = worker.child.try_wait() {
                    panic!("worker {} exited ({status}) while waiting for {what}", worker.name);
                }
            }
            if condition(self) {
                return true;
            }
            if Instant::now() >= deadline {
                self.print(&format!("timed out after {PHASE:?} waiting for {what}"));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn js(&self) -> async_nats::jetstream::Context {
        let mut js = async_nats::jetstream::new(self.control.clone());
        js.set_timeout(Duration::from_secs(2));
        js
    }

    /// Publishes through natty's client, connected to every node.
    async fn publish(&self) -> Publisher {
        let client = natty_runtime::Client::new(self.cluster.client().await);
        Publisher::start(client, SUBJECT, RATE as u32, IN_FLIGHT)
    }

    fn reads(&self) -> Counts {
        let outputs: Vec<&PathBuf> = self.workers.iter().map(|w| &w.out).collect();
        fault::read_lines(&outputs)
    }

    /// Waits until values flow: two seconds' worth read, and every worker running and
    /// having read some.
    async fn steady(&mut self, publisher: &Publisher) {
        self.until("values read by every worker", |fault| {
            publisher.acked() >= 2 * RATE
                && fault.reads().len() as u64 >= 2 * RATE
                && fault.workers.iter().all(|w| w.read_count() > 0)
        })
        .await;
    }

    /// Waits until `more` further values are acked.
    async fn progress(&self, publisher: &Publisher, more: u64, what: &str) {
        let target = publisher.acked() + more;
        wait_until(PHASE, what, || async { publisher.acked() >= target }).await;
    }

    /// The node leading `stream`, asked through `client`; `None` while it cannot say.
    async fn leader_of(client: &async_nats::Client, stream: &str) -> Option<String> {
        let mut js = async_nats::jetstream::new(client.clone());
        js.set_timeout(Duration::from_secs(1));
        let stream = js.get_stream(stream).await.ok()?;
        let leader = stream.cached_info().cluster.as_ref()?.leader.clone()?;
        (!leader.is_empty()).then_some(leader)
    }

    async fn stream_leader(&self, stream: &str) -> String {
        let deadline = Instant::now() + PHASE;
        loop {
            if let Some(leader) = Self::leader_of(&self.control, stream).await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no leader of stream {stream} within {PHASE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The node leading durable `durable` of the stream.
    async fn consumer_leader(&self, durable: &str) -> String {
        let deadline = Instant::now() + PHASE;
        loop {
            if let Ok(stream) = self.js().get_stream(STREAM).await {
                if let Ok(info) = stream.consumer_info(durable).await {
                    if let Some(leader) = info.cluster.and_then(|c| c.leader).filter(|l| !l.is_empty()) {
                        return leader;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no leader of consumer {durable} within {PHASE:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Who leads the stream and its consumers, for the log.
    async fn placement(&self) -> String {
        let js = self.js();
        let mut placement = format!("stream {STREAM} led by {}", self.stream_leader(STREAM).await);
        if let Ok(stream) = js.get_stream(STREAM).await {
            for durable in [DURABLE, ARCHIVE] {
                if let Ok(info) = stream.consumer_info(durable).await {
                    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone()).unwrap_or_default();
                    placement += &format!(", {durable} by {leader}");
                }
            }
        }
        // natty's own dead-letter stream has one replica: while its node is down, no instance
        // can provision it.
        if let Some(leader) = Self::leader_of(&self.control, "natty-dead-letters").await {
            placement += &format!(", natty-dead-letters on {leader}");
        }
        placement
    }

    fn node_index(&self, name: &str) -> usize {
        self.cluster
            .nodes()
            .iter()
            .position(|node| node.name() == name)
            .unwrap_or_else(|| panic!("no node named {name}"))
    }

    /// [`settle`](Self::settle)s, then asserts the report is safe.
    /// SIGKILLs the node named `name` (a leader, as stream or consumer info reports it).
    async fn kill_node(&mut self, name: &str) {
        self.cluster
            .node_named(name)
            .expect("a node of the cluster")
            .kill()
            .await;
    }

    /// Starts the node named `name` again and waits until it is healthy: caught up with its
    /// streams and consumers.
    async fn restart_node(&mut self, name: &str) {
        self.cluster
            .node_named(name)
            .expect("a node of the cluster")
            .restart()
            .await
            .expect("the node comes back");
    }

    /// As [`finish`](Self::finish), and checks the capture output too; every figure is printed
    /// before either check can fail.
    async fn finish_with_capture(&self, publisher: Publisher) {
        let (history, report) = self.settle(publisher).await;
        let capture_exactly_once = self.check_capture(&history).await;
        report.assert_safe();
        capture_exactly_once();
    }

    async fn finish(&self, publisher: Publisher) -> History {
        let (history, report) = self.settle(publisher).await;
        report.assert_safe();
        history
    }

    /// Stops publishing, waits until every acked value is read (or the deadline passes),
    /// reads the stream, classifies and prints the report.
    async fn settle(&self, publisher: Publisher) -> (History, Report) {
        let mut history = publisher.stop().await;
        let deadline = Instant::now() + PHASE;
        let mut unread = history.acked_unread(&self.reads());
        while !unread.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
            unread = history.acked_unread(&self.reads());
        }
        if !unread.is_empty() {
            eprintln!(
                "[{}] {} acked values still unread after {PHASE:?}; {}",
                self.scenario,
                unread.len(),
                self.consumer_state(DURABLE).await
            );
        }
        history.set_reads(self.reads());
        history.set_stored(fault::read_stream(&self.js(), STREAM, PHASE).await);
        let report = history.classify();
        self.print(&format!("{report}; {}", self.consumer_state(DURABLE).await));
        assert!(report.attempted > 0, "nothing was published");
        (history, report)
    }

    /// A durable's counters, for the log.
    async fn consumer_state(&self, durable: &str) -> String {
        let js = self.js();
        let info = match js.get_stream(STREAM).await {
            Ok(stream) => stream.consumer_info(durable).await,
            Err(error) => return format!("{durable}: no stream info: {error}"),
        };
        match info {
            Ok(info) => format!(
                "{durable}: delivered {} ack floor {} pending {} ack pending {} redelivered {}",
                info.delivered.stream_sequence,
                info.ack_floor.stream_sequence,
                info.num_pending,
                info.num_ack_pending,
                info.num_redelivered
            ),
            Err(error) => format!("{durable}: no consumer info: {error}"),
        }
    }

    /// Waits until the capture has stored everything, then checks that the blocks hold every
    /// acked value exactly once and that no temporary or partial file is left; prints the
    /// figures, and returns a check to assert once every figure of the scenario is printed.
    async fn check_capture(&self, history: &History) -> impl FnOnce() {
        let js = self.js();
        let last = js
            .get_stream(STREAM)
            .await
            .expect("the stream")
            .cached_info()
            .state
            .last_sequence;
        let stored = tokio::time::timeout(PHASE, async {
            while !settled(&js, STREAM, ARCHIVE, last).await {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        if stored.is_err() {
            eprintln!(
                "[{}] the capture did not settle within {PHASE:?}: {}",
                self.scenario,
                self.consumer_state(ARCHIVE).await
            );
        }
        let root = self.dir.path().join("capture");
        let mut captured = Counts::new();
        let mut holders: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        let mut strays = Vec::new();
        let mut blocks = 0;
        for path in files(&root) {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".ndjson") || path.to_string_lossy().contains(".natty-tmp") {
                strays.push(path);
                continue;
            }
            blocks += 1;
            let text = std::fs::read_to_string(&path).expect("read a block");
            for line in text.lines().filter(|line| !line.is_empty()) {
                let job: Job =
                    serde_json::from_str(line).unwrap_or_else(|error| panic!("{}: {error}: {line:?}", path.display()));
                *captured.entry(job.id).or_default() += 1;
                holders.entry(job.id).or_default().push(name.clone());
            }
        }
        let report = history.check_exactly_once(&captured);
        self.print(&format!(
            "{report} in {blocks} blocks; {}",
            self.consumer_state(ARCHIVE).await
        ));
        // Which blocks hold a repeated value, and which instance stored each, say how it was
        // stored twice.
        for (value, _) in report.repeated.iter().take(3) {
            let blocks: Vec<String> = holders[value]
                .iter()
                .map(|block| format!("{block} stored by {}", self.stored_by(block).join("+")))
                .collect();
            self.print(&format!("value {value} is in {blocks:?}"));
        }
        move || {
            assert!(strays.is_empty(), "temporary or partial files remain: {strays:?}");
            assert!(stored.is_ok(), "the capture did not store everything");
            report.assert_exactly_once();
        }
    }

    /// The workers that logged storing `block`.
    fn stored_by(&self, block: &str) -> Vec<&'static str> {
        self.workers
            .iter()
            .filter(|worker| {
                worker.stderr.iter().any(|lines| {
                    lines
                        .lock()
                        .unwrap()
                        .iter()
                        .any(|line| line.contains("block stored") && line.contains(block))
                })
            })
            .map(|worker| worker.name)
            .collect()
    }

    fn print(&self, what: &str) {
        println!(
            "[{}] {what} ({:.1} s)",
            self.scenario,
            self.started.elapsed().as_secs_f64()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_stream_leader_loses_no_acked_value() {
    let _serial = SERIAL.lock().await;
    let mut fault = Fault::start("leader-kill", "consume,archive").await;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    let leader = fault.stream_leader(STREAM).await;
    fault.print(&format!("SIGKILL {leader}: {}", fault.placement().await));
    fault.kill_node(&leader).await;
    // Publishing goes on through a new leader while the node is down.
    fault
        .progress(&publisher, 2 * RATE, "acks while the old leader is down")
        .await;
    fault.restart_node(&leader).await;
    fault.print(&format!("{leader} is back: {}", fault.placement().await));
    fault.progress(&publisher, RATE, "acks after the restart").await;

    fault.finish_with_capture(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_consumers_leader_loses_no_acked_value() {
    let _serial = SERIAL.lock().await;
    let mut fault = Fault::start("consumer-leader-kill", "consume").await;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    // The durable's leader holds its delivery state and serves the pulls: the workers must
    // find the consumer's new leader and pull from it.
    let leader = fault.consumer_leader(DURABLE).await;
    fault.print(&format!("SIGKILL {leader}: {}", fault.placement().await));
    fault.kill_node(&leader).await;
    let read_at_kill = fault.reads().len();
    let resumed = fault
        .within_phase("values read again with the consumer's leader down", |fault| {
            fault.reads().len() > read_at_kill + RATE as usize
        })
        .await;
    fault.restart_node(&leader).await;
    fault.print(&format!("{leader} is back: {}", fault.placement().await));
    fault.progress(&publisher, RATE, "acks after the restart").await;

    fault.finish(publisher).await;
    assert!(
        resumed,
        "the consumer did not resume within {PHASE:?} while its leader's node was down"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_node_loses_no_acked_value() {
    let _serial = SERIAL.lock().await;
    let mut fault = Fault::start("rolling-restart", "consume,archive").await;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    for index in 0..3 {
        let name = fault.cluster.node(index).name().to_string();
        fault.print(&format!("restarting {name}: {}", fault.placement().await));
        // `restart` waits until the node is healthy: caught up with its streams and consumers.
        fault
            .cluster
            .node_mut(index)
            .restart()
            .await
            .expect("the node comes back");
        fault
            .progress(&publisher, RATE, &format!("acks after restarting {name}"))
            .await;
    }

    fault.finish_with_capture(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_the_stream_leader_past_an_election_loses_no_acked_value() {
    let _serial = SERIAL.lock().await;
    let mut fault = Fault::start("leader-freeze", "consume").await;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    let leader = fault.stream_leader(STREAM).await;
    let index = fault.node_index(&leader);
    fault.print(&format!("SIGSTOP {leader}: {}", fault.placement().await));
    let acked_before = publisher.acked();
    fault.cluster.node(index).signal(SIGSTOP);
    let frozen_at = Instant::now();
    // Asked of a node that is not frozen, since a frozen one never answers.
    let witness = fault.cluster.node((index + 1) % 3).client().await;
    let mut successor = None;
    let elected = tokio::time::timeout(PHASE, async {
        loop {
            successor = Fault::leader_of(&witness, STREAM).await.filter(|node| *node != leader);
            if successor.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // The fault lasts a fixed time, whatever the election took.
    tokio::time::sleep(FROZEN.saturating_sub(frozen_at.elapsed())).await;
    let acked_while_frozen = publisher.acked() - acked_before;
    fault.cluster.node(index).signal(SIGCONT);
    fault.print(&format!(
        "SIGCONT {leader} after {:.1} s; {} led meanwhile; {acked_while_frozen} acks while frozen",
        frozen_at.elapsed().as_secs_f64(),
        successor.as_deref().unwrap_or("no other node")
    ));
    assert!(
        elected.is_ok(),
        "no other node took over stream {STREAM} from the frozen {leader}"
    );
    fault.progress(&publisher, 2 * RATE, "acks after SIGCONT").await;

    fault.finish(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_consumer_instance_loses_nothing_and_resumes_after_restart() {
    let _serial = SERIAL.lock().await;
    let mut fault = Fault::empty("worker-kill", "consume").await;
    fault.add_worker("a", &[]);
    fault.provisioned().await;
    // The victim takes its time over each value, so that it is killed holding some.
    fault.add_worker("b", &[("FAULT_DELAY_MS", "300")]);
    fault.add_worker("c", &[]);
    let victim = 1;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    fault.workers[victim].kill().await;
    let written: Counts = fault::read_lines(&[&fault.workers[victim].out]);
    let held: Vec<u64> = fault.workers[victim]
        .started()
        .into_iter()
        .filter(|value| !written.contains_key(value))
        .collect();
    fault.print(&format!(
        "SIGKILL worker {} holding {} started, unwritten values {held:?}",
        fault.workers[victim].name,
        held.len()
    ));
    assert!(!held.is_empty(), "the victim held no value when it was killed");
    // The other two take over, including what the victim held (after ack_wait).
    fault.progress(&publisher, 2 * RATE, "acks with a worker down").await;
    fault.workers[victim].restart();
    fault
        .until("the restarted worker to read again", |fault| {
            fault.workers[victim].read_count() > written.values().sum()
        })
        .await;
    fault.progress(&publisher, RATE, "acks after the restart").await;

    // Among the values checked: those the victim held when it died.
    fault.finish(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_starting_together_or_during_an_election_all_run() {
    let _serial = SERIAL.lock().await;
    // Three instances of a service deployed at once on a fresh cluster: all three provision
    // the same replicated stream and consumer at the same moment.
    let mut fault = Fault::empty("startup", "consume").await;
    for name in ["a", "b", "c"] {
        fault.add_worker(name, &[]);
    }
    fault.provisioned().await;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    // A fourth, started as the node leading the stream dies: it starts during the election.
    let leader = fault.stream_leader(STREAM).await;
    fault.print(&format!(
        "SIGKILL {leader} and start worker d: {}",
        fault.placement().await
    ));
    fault.kill_node(&leader).await;
    fault.add_worker("d", &[]);
    fault
        .until("the worker started during the election to read", |fault| {
            fault.workers[3].read_count() > 0
        })
        .await;
    fault.restart_node(&leader).await;
    fault.progress(&publisher, RATE, "acks after the restart").await;

    fault.finish(publisher).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_election_streams_leader_keeps_one_leader_and_loses_no_acked_value() {
    let _serial = SERIAL.lock().await;
    let mut fault = Fault::start("election-kill", "work,consume").await;
    let ticks = |fault: &Fault| -> Vec<Tick> { fault.workers.iter().flat_map(Worker::ticks).collect() };
    wait_until(PHASE, "a first leader", || async { !ticks(&fault).is_empty() }).await;
    let publisher = fault.publish().await;
    fault.steady(&publisher).await;

    let node = fault.stream_leader("KV_election").await;
    fault.print(&format!(
        "SIGKILL {node}, leader of KV_election; {}",
        fault.placement().await
    ));
    let killed_at = unix_nanos();
    fault.kill_node(&node).await;
    // Leadership goes on: renewed through the bucket's new leader, or won again once the
    // lease ran out; and meanwhile values flow.
    wait_until(PHASE, "a leader ticking after the kill", || async {
        ticks(&fault)
            .iter()
            .filter(|(_, _, at)| *at > killed_at + (TTL * 2).as_nanos())
            .count()
            > 20
    })
    .await;
    fault.progress(&publisher, RATE, "acks with the node down").await;
    fault.restart_node(&node).await;
    fault.progress(&publisher, RATE, "acks after the restart").await;

    let (_, report) = fault.settle(publisher).await;
    for worker in &mut fault.workers {
        worker.child.start_kill().ok();
    }
    let all = ticks(&fault);
    let leases = fault::check_leases(&all);
    match &leases {
        Ok(terms) => fault.print(&format!(
            "{} ticks in {} terms, never two leaders",
            all.len(),
            terms.len()
        )),
        Err(overlap) => fault.print(&format!("two leaders at once: {overlap}")),
    }
    report.assert_safe();
    if let Err(overlap) = leases {
        panic!("two leaders at once: {overlap}");
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}
