//! Partitioned consumer groups through real processes (`tests/bin/ledger.rs`: 8 partitions,
//! `order_by = "subject[1]"`, handlers of 0–5 ms). Three instances consume 30 accounts' postings
//! while a fourth joins, one is SIGKILLed and one gets SIGTERM; from what every instance printed:
//! every posting handled, each account's postings in order (a repeat only as a replay after the
//! SIGKILL), never two handlers of one account at once, anywhere; every instance alive at the
//! end owns partitions; the handover times measured. And a partitioned capture through the same
//! faults: every record stored exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::testing::{NatsCluster, NatsServer};
use natty_tests::{collect_lines, collect_stderr, send_signal, spawn_service, wait_until, Posting};

const LEDGER: &str = env!("CARGO_BIN_EXE_natty-test-ledger");
const KEYS: u64 = 30;
const MESSAGES: u64 = 10_000;
const PARTITIONS: u32 = 8;
const WAIT: Duration = Duration::from_secs(60);

/// One instance of the ledger service, its output collected.
struct Instance {
    name: &'static str,
    child: tokio::process::Child,
    pid: u32,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    /// An instance of the ledger service.
    fn start(name: &'static str, url: &str) -> Instance {
        let log = std::env::var("NATTY_TEST_LEDGER_LOG").unwrap_or_else(|_| "info,async_nats=warn".into());
        Instance::spawn(name, LEDGER, url, &[("RUST_LOG", &log)])
    }

    fn spawn(name: &'static str, binary: &str, url: &str, env: &[(&str, &str)]) -> Instance {
        let mut child = spawn_service(Path::new(binary), Some(url), env);
        let (out, err) = (collect_lines(&mut child), collect_stderr(&mut child));
        Instance {
            name,
            pid: child.id().expect("a pid"),
            child,
            out,
            err,
        }
    }

    /// Sends SIGTERM and checks that the instance exits cleanly.
    async fn stop(&mut self) {
        send_signal(self.pid, "TERM");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("instance {} exits after SIGTERM", self.name))
            .unwrap();
        assert!(
            status.success(),
            "SIGTERM ends instance {} cleanly: {status:?}\n{}",
            self.name,
            self.err.lock().unwrap().join("\n")
        );
    }
}

/// A handler run seen in an instance's output.
#[derive(Debug, Clone, Copy)]
struct Run {
    instance: usize,
    n: u64,
    start: u128,
    /// `None`: the instance was killed before it ended.
    end: Option<u128>,
}

/// Publishes and waits for the stream's ack, asking again while a cluster elects a stream
/// leader (no responders, or no ack in time). The message id makes a retry of a publish that
/// was stored after all one message, not two postings.
async fn publish_patiently(js: &async_nats::jetstream::Context, subject: String, payload: bytes::Bytes) {
    use async_nats::jetstream::context::PublishErrorKind;
    let id = format!("{subject}-{}", String::from_utf8_lossy(&payload));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
        let sent = match js.publish_with_headers(subject.clone(), headers, payload.clone()).await {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match sent {
            Ok(_) => return,
            Err(error)
                if matches!(
                    error.kind(),
                    PublishErrorKind::StreamNotFound | PublishErrorKind::TimedOut
                ) && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(error) => panic!("publishing to {subject}: {error}"),
        }
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Every handler run, by account, in start order.
fn runs(outputs: &[Vec<String>]) -> BTreeMap<u64, Vec<Run>> {
    let mut runs: BTreeMap<u64, Vec<Run>> = BTreeMap::new();
    for (instance, lines) in outputs.iter().enumerate() {
        // Per instance and account, a run's end follows its start (one at a time per account).
        let mut open: BTreeMap<u64, usize> = BTreeMap::new();
        for line in lines {
            let parts: Vec<&str> = line.split(' ').collect();
            let (word, key, n, at) = match parts[..] {
                [word, key, n, at, ..] => (word, key, n, at),
                _ => continue,
            };
            let (Ok(key), Ok(n), Ok(at)) = (key.parse::<u64>(), n.parse::<u64>(), at.parse::<u128>()) else {
                continue;
            };
            let list = runs.entry(key).or_default();
            match word {
                "start" => {
                    open.insert(key, list.len());
                    list.push(Run {
                        instance,
                        n,
                        start: at,
                        end: None,
                    });
                }
                "end" => {
                    let at_index = open.remove(&key).expect("an end after its start");
                    assert_eq!(
                        list[at_index].n, n,
                        "instance {instance} ended another posting than it started"
                    );
                    list[at_index].end = Some(at);
                }
                _ => {}
            }
        }
    }
    for list in runs.values_mut() {
        list.sort_by_key(|run| run.start);
    }
    runs
}

/// Who holds each of the `partitions` leases of `group` now: the holders' process ids.
async fn holders(js: &async_nats::jetstream::Context, group: &str, partitions: u32) -> Vec<Option<u32>> {
    let Ok(store) = js.get_key_value("natty_groups").await else {
        return vec![None; partitions as usize];
    };
    let mut holders = Vec::new();
    for k in 0..partitions {
        let holder = match store.get(format!("{group}.p.{k}")).await {
            Ok(Some(value)) => serde_json::from_slice::<serde_json::Value>(&value).ok().and_then(|v| {
                // `<host>-<pid>-<random>`, the host perhaps with dashes of its own.
                v["holder"]
                    .as_str()
                    .and_then(|h| h.rsplit('-').nth(1))
                    .and_then(|pid| pid.parse().ok())
            }),
            _ => None,
        };
        holders.push(holder);
    }
    holders
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_keeps_every_key_in_order_through_a_join_a_sigkill_and_a_sigterm() {
    let server = NatsServer::start().await.expect("nats-server");
    scenario(&server.url(), server.client().await, 1).await;
}

/// The same on a 3-node cluster, every stream, consumer and the groups bucket with 3 replicas;
/// the instances connect to different nodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_on_a_cluster_keeps_every_key_in_order_through_a_join_a_sigkill_and_a_sigterm() {
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    scenario(&cluster.urls().join(","), cluster.client().await, 3).await;
}

async fn scenario(url: &str, nats: async_nats::Client, replicas: usize) {
    let js = async_nats::jetstream::new(nats.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "accounts".into(),
        subjects: vec!["accounts.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .expect("the accounts stream");
    let url = url.to_string();

    let mut instances = vec![
        Instance::start("a", &url),
        Instance::start("b", &url),
        Instance::start("c", &url),
    ];
    wait_until(WAIT, "every partition owned by one of the first three", || async {
        let pids: BTreeSet<u32> = instances.iter().map(|i| i.pid).collect();
        holders(&js, "accounts_ledger", PARTITIONS)
            .await
            .iter()
            .all(|h| h.is_some_and(|pid| pids.contains(&pid)))
    })
    .await;

    // 30 accounts, postings numbered per account, about 500 a second.
    let publisher = tokio::spawn({
        let js = js.clone();
        async move {
            for i in 0..MESSAGES {
                let posting = Posting {
                    key: i % KEYS,
                    n: i / KEYS + 1,
                };
                let payload: bytes::Bytes = serde_json::to_vec(&posting).unwrap().into();
                publish_patiently(&js, format!("accounts.{}.posted", posting.key), payload).await;
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    });

    tokio::time::sleep(Duration::from_secs(2)).await;
    instances.push(Instance::start("d", &url));
    wait_until(WAIT, "the newcomer owning partitions", || async {
        let d = instances[3].pid;
        holders(&js, "accounts_ledger", PARTITIONS).await.contains(&Some(d))
    })
    .await;

    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed_at = unix_nanos();
    send_signal(instances[1].pid, "KILL");
    let _ = instances[1].child.wait().await;
    let killed_seen = unix_nanos();

    // Once the killed instance's partitions have moved, stop another one cleanly.
    wait_until(WAIT, "the killed instance's partitions owned again", || async {
        let b = instances[1].pid;
        let now = holders(&js, "accounts_ledger", PARTITIONS).await;
        now.iter().all(|h| h.is_some() && *h != Some(b))
    })
    .await;
    let stopped_at = unix_nanos();
    instances[2].stop().await;

    tokio::time::timeout(WAIT, publisher).await.expect("published").unwrap();
    let every_posting_ended = |outputs: &[Vec<String>]| {
        let runs = runs(outputs);
        (0..KEYS).all(|key| {
            let ended: BTreeSet<u64> = runs
                .get(&key)
                .map(|list| list.iter().filter(|run| run.end.is_some()).map(|run| run.n).collect())
                .unwrap_or_default();
            ended.len() as u64 == MESSAGES / KEYS + u64::from(key < MESSAGES % KEYS)
        })
    };
    let sinks: Vec<Arc<Mutex<Vec<String>>>> = instances.iter().map(|i| i.out.clone()).collect();
    let outputs = || -> Vec<Vec<String>> { sinks.iter().map(|out| out.lock().unwrap().clone()).collect() };
    wait_until(Duration::from_secs(120), "every posting handled", || async {
        every_posting_ended(&outputs())
    })
    .await;

    // Every instance alive at the end owns partitions, and every partition has an owner.
    let alive = [instances[0].pid, instances[3].pid];
    wait_until(
        WAIT,
        "the live instances owning every partition between them",
        || async {
            let now = holders(&js, "accounts_ledger", PARTITIONS).await;
            now.iter().all(|h| h.is_some_and(|pid| alive.contains(&pid)))
                && alive.iter().all(|pid| now.contains(&Some(*pid)))
        },
    )
    .await;
    for index in [0, 3] {
        instances[index].stop().await;
    }

    let outputs = outputs();
    if let Ok(folder) = std::env::var("NATTY_TEST_LOGS") {
        for (instance, out) in instances.iter().zip(&outputs) {
            let _ = std::fs::write(
                Path::new(&folder).join(format!("ledger-{}.log", instance.name)),
                instance.err.lock().unwrap().join("\n"),
            );
            let _ = std::fs::write(
                Path::new(&folder).join(format!("ledger-{}.out", instance.name)),
                out.join("\n"),
            );
        }
    }
    let runs = runs(&outputs);
    let describe = |run: &Run| format!("{}#{}@{}", instances[run.instance].name, run.n, run.start);
    let mut repeats = 0;
    for (key, list) in &runs {
        // In order: a posting starts only after its predecessor ended somewhere.
        for run in list.iter().filter(|run| run.n > 1) {
            assert!(
                list.iter()
                    .any(|before| before.n == run.n - 1 && before.end.is_some_and(|end| end <= run.start)),
                "account {key}: posting {} started before posting {} had ended: {:?}",
                run.n,
                run.n - 1,
                list.iter()
                    .filter(|other| other.n + 5 >= run.n && other.n <= run.n + 5)
                    .map(describe)
                    .collect::<Vec<_>>()
            );
        }
        // Never two at once: each run ends before the next begins (a killed run ends at the kill).
        for pair in list.windows(2) {
            let end = pair[0].end.unwrap_or(killed_seen);
            assert!(
                end <= pair[1].start,
                "account {key}: {} and {} ran at once",
                describe(&pair[0]),
                describe(&pair[1])
            );
        }
        // A repeat is a replay of what the killed instance had started or not acked.
        let mut seen: BTreeMap<u64, &Run> = BTreeMap::new();
        for run in list {
            if let Some(first) = seen.get(&run.n) {
                repeats += 1;
                assert!(
                    first.instance == 1 && first.start <= killed_seen,
                    "account {key}: posting {} handled again ({} then {}) without the SIGKILL explaining it",
                    run.n,
                    describe(first),
                    describe(run)
                );
            } else {
                seen.insert(run.n, run);
            }
        }
    }

    // Handover times: from the signal to the first run elsewhere of each account the instance
    // was the last to handle; the slowest of them is the partitions' handover.
    let handover = |victim: usize, at: u128| -> (Duration, Duration) {
        let taken_over: Vec<u128> = runs
            .values()
            .filter(|list| {
                list.iter()
                    .rfind(|run| run.start <= at)
                    .is_some_and(|run| run.instance == victim)
            })
            .filter_map(|list| list.iter().find(|run| run.start > at && run.instance != victim))
            .map(|run| run.start - at)
            .collect();
        let first = taken_over.iter().min().expect("the victim's accounts handled again");
        let last = taken_over.iter().max().expect("the victim's accounts handled again");
        (Duration::from_nanos(*first as u64), Duration::from_nanos(*last as u64))
    };
    let (first_after_kill, after_kill) = handover(1, killed_at);
    let (first_after_term, after_term) = handover(2, stopped_at);
    println!(
        "handover after SIGKILL: {first_after_kill:?} to {after_kill:?}; after SIGTERM: {first_after_term:?} to {after_term:?}; repeats after the SIGKILL: {repeats}"
    );
    assert!(
        after_term <= Duration::from_secs(2),
        "SIGTERM hands partitions over within 2 s: {after_term:?}"
    );
    // Lease (5 s) + ack_wait (2 s) + the margin of the successor's wait (1 s) + a poll or two.
    assert!(
        after_kill <= Duration::from_secs(10),
        "SIGKILL loses partitions for the lease and ack_wait: {after_kill:?}"
    );
}

const CAPTURE: &str = env!("CARGO_BIN_EXE_natty-test-capture");
const SENSORS: u64 = 10;

/// A capture with `partitions = 4` run by 3 instances while a 4th joins, one is SIGKILLed and
/// one gets SIGTERM: reading every block back gives each reading exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_capture_stores_every_record_exactly_once_through_a_join_a_sigkill_and_a_sigterm() {
    let server = NatsServer::start().await.expect("nats-server");
    capture_scenario(&server.url(), server.client().await, 1).await;
}

/// The same on a 3-node cluster with 3 replicas: the case a capture shared by several instances
/// (without partitions) does not cover, a consumer leader handing a message to a second instance
/// while the first still holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_capture_on_a_cluster_stores_every_record_exactly_once() {
    let cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    capture_scenario(&cluster.urls().join(","), cluster.client().await, 3).await;
}

async fn capture_scenario(url: &str, client: async_nats::Client, replicas: usize) {
    use natty_tests::capture::{publish_readings, Tally};
    let url = url.to_string();
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "readings".into(),
        subjects: vec!["readings.>".into()],
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .expect("the readings stream");
    let dir = tempfile::tempdir().unwrap();
    let store = format!("file://{}", dir.path().join("group").display());
    let env = [("NATTY_HANDLERS", "to_group"), ("GROUP_STORE", store.as_str())];
    let start = |url: &str| Instance::spawn("capture", CAPTURE, url, &env);
    let mut instances = vec![start(&url), start(&url), start(&url)];
    wait_until(WAIT, "every partition captured by one of the first three", || async {
        holders(&js, "readings_group", 4).await.iter().all(Option::is_some)
    })
    .await;

    // 10 sensors, about 1,500 readings a second, for about 10 s.
    const BATCHES: u64 = 70;
    let publisher = tokio::spawn({
        let client = client.clone();
        async move {
            for batch in 0..BATCHES {
                publish_readings(&client, batch * 150 + 1..(batch + 1) * 150 + 1, SENSORS).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    instances.push(start(&url));
    let newcomer = instances[3].pid;
    wait_until(WAIT, "the newcomer capturing a partition", || async {
        holders(&js, "readings_group", 4).await.contains(&Some(newcomer))
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Killed with blocks open (every 2 s, the kill lands inside a window).
    send_signal(instances[1].pid, "KILL");
    let _ = instances[1].child.wait().await;
    let killed = instances[1].pid;
    wait_until(WAIT, "the killed instance's partitions captured again", || async {
        holders(&js, "readings_group", 4)
            .await
            .iter()
            .all(|h| h.is_some() && *h != Some(killed))
    })
    .await;
    instances[2].stop().await;
    tokio::time::timeout(WAIT, publisher).await.expect("published").unwrap();

    // Everything sourced into the group's work-queue stream and captured (acked, so removed).
    let last = BATCHES * 150;
    wait_until(Duration::from_secs(120), "every reading captured", || async {
        let Ok(mut stream) = js.get_stream("readings_group").await else {
            return false;
        };
        let Ok(info) = stream.info().await else { return false };
        info.state.last_sequence >= last && info.state.messages == 0
    })
    .await;
    for index in [0, 3] {
        instances[index].stop().await;
    }
    let tally = Tally::of_folder(&dir.path().join("group"), SENSORS);
    tally.assert_exactly_once(
        1..last + 1,
        "a partitioned capture through a join, a SIGKILL and a SIGTERM",
    );
}

/// `--list` and `--asyncapi` show the group and its partitions; no server needed.
#[tokio::test]
async fn the_command_line_shows_the_group() {
    let (code, out, err) = natty_tests::run_command(Path::new(LEDGER), None, &["--list"], WAIT).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("ledger (8 partitions)"), "{out}");
    let (code, out, err) = natty_tests::run_command(Path::new(LEDGER), None, &["--asyncapi"], WAIT).await;
    assert_eq!(code, Some(0), "{err}");
    let document: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let found = document.to_string();
    assert!(found.contains(r#""partitions":8"#), "{found}");
    assert!(found.contains("in 8 partitions (one instance owns each)"), "{found}");
}
