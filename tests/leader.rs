//! Leader election across processes: at no moment do two instances believe they lead (their
//! lease intervals never overlap and terms strictly increase); a successor takes over within
//! 1 s of a SIGTERM and within TTL + 1 s of a SIGKILL; a leader paused past its TTL has
//! stepped down by its own deadline when it resumes, and its late fenced write is refused. A
//! consumer bound to the lease handles messages only in the instance that leads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use natty_runtime::testing::{NatsCluster, NatsServer};
use natty_tests::{collect_lines, collect_stderr, send_signal, spawn_service, wait_until};

const WORKER: &str = env!("CARGO_BIN_EXE_natty-test-leader");
const CLUSTER_WORKER: &str = env!("CARGO_BIN_EXE_natty-test-leader-cluster");
const DRAIN_WORKER: &str = env!("CARGO_BIN_EXE_natty-test-leader-drain");
/// The worker's lease TTL.
const TTL: Duration = Duration::from_secs(2);

struct Instance {
    name: &'static str,
    child: tokio::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Instance {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} logged:\n{}", self.name, self.logs.lock().unwrap().join("\n"));
        }
    }
}

impl Instance {
    fn start(url: &str, name: &'static str) -> Instance {
        Instance::start_binary(WORKER, url, name)
    }

    fn start_binary(binary: &str, url: &str, name: &'static str) -> Instance {
        let mut child = spawn_service(Path::new(binary), Some(url), &[("INSTANCE", name)]);
        let lines = collect_lines(&mut child);
        let logs = collect_stderr(&mut child);
        Instance {
            name,
            child,
            lines,
            logs,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    fn lines_starting(&self, prefix: &str) -> Vec<String> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|line| line.starts_with(prefix))
            .cloned()
            .collect()
    }
}

/// A tick: (instance, term, unix nanos).
fn ticks(instances: &[Instance]) -> Vec<(String, u64, u128)> {
    let mut all = Vec::new();
    for instance in instances {
        for line in instance.lines_starting("tick ") {
            let words: Vec<&str> = line.split(' ').collect();
            all.push((
                words[1].to_string(),
                words[2].parse().unwrap(),
                words[3].parse().unwrap(),
            ));
        }
    }
    all
}

/// The instance leading now: the one with the newest term that has ticked.
fn leader(instances: &[Instance]) -> Option<(String, u64)> {
    ticks(instances)
        .into_iter()
        .max_by_key(|(_, term, _)| *term)
        .map(|(name, term, _)| (name, term))
}

/// Waits until an instance leads a term after `after` (0: any term), and returns it.
async fn next_leader(instances: &[Instance], after: u64, timeout: Duration, what: &str) -> (String, u64) {
    wait_until(timeout, what, || async {
        leader(instances).is_some_and(|(_, term)| term > after)
    })
    .await;
    leader(instances).expect("a leader")
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos()
}

/// Per term, the interval from its first to its last tick; checks that terms follow one
/// another without overlap and with strictly increasing tokens.
fn check_no_overlap(instances: &[Instance]) -> BTreeMap<u64, (String, u128, u128)> {
    let mut terms: BTreeMap<u64, (String, u128, u128)> = BTreeMap::new();
    for (name, term, at) in ticks(instances) {
        let entry = terms.entry(term).or_insert((name.clone(), at, at));
        assert_eq!(entry.0, name, "term {term} held by two instances");
        entry.1 = entry.1.min(at);
        entry.2 = entry.2.max(at);
    }
    let mut by_start: Vec<(u64, &(String, u128, u128))> = terms.iter().map(|(t, i)| (*t, i)).collect();
    by_start.sort_by_key(|(_, (_, start, _))| *start);
    for pair in by_start.windows(2) {
        let ((t1, (n1, _, end1)), (t2, (n2, start2, _))) = (pair[0], pair[1]);
        assert!(
            t1 < t2,
            "terms must increase over time: {t1} ({n1}) came before {t2} ({n2})"
        );
        assert!(
            end1 < start2,
            "{n1} (term {t1}) still led {} ms after {n2} (term {t2}) began",
            (end1 - start2) / 1_000_000
        );
    }
    terms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_with_fast_takeover_after_sigterm_and_sigkill() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut instances = vec![
        Instance::start(&url, "a"),
        Instance::start(&url, "b"),
        Instance::start(&url, "c"),
    ];
    let (first, first_term) = next_leader(&instances, 0, Duration::from_secs(20), "a first leader").await;
    // Work for the consumer bound to the lease, all along.
    let publishing = tokio::spawn({
        let client = server.client().await;
        async move {
            for id in 1.. {
                let job = serde_json::to_vec(&natty_tests::Job { id }).unwrap();
                if client.publish("work.job", job.into()).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // SIGTERM: the leader releases on its way out; a successor leads within 1 s.
    let stopped_at = unix_nanos();
    let index = instances.iter().position(|i| i.name == first).unwrap();
    send_signal(instances[index].pid(), "TERM");
    let (second, second_term) = next_leader(
        &instances,
        first_term,
        Duration::from_secs(10),
        "a leader after SIGTERM",
    )
    .await;
    let took = first_tick(&instances, second_term) - stopped_at;
    assert!(
        took < 1_000_000_000,
        "{second} took {} ms to lead after {first} got SIGTERM",
        took / 1_000_000
    );
    let status = instances[index].child.wait().await.unwrap();
    assert!(status.success(), "{first} exits cleanly: {status:?}");
    assert_eq!(
        instances[index].lines_starting("fenced-write ").len(),
        1,
        "while leading, its fenced write was taken"
    );

    // SIGKILL: nothing is released; the lease runs out on the server; a successor leads
    // within TTL + 1 s.
    let killed_at = unix_nanos();
    let index = instances.iter().position(|i| i.name == second).unwrap();
    send_signal(instances[index].pid(), "KILL");
    let (third, third_term) = next_leader(
        &instances,
        second_term,
        Duration::from_secs(10),
        "a leader after SIGKILL",
    )
    .await;
    let took = first_tick(&instances, third_term) - killed_at;
    assert!(
        took < (TTL + Duration::from_secs(1)).as_nanos(),
        "{third} took {} ms to lead after {second} got SIGKILL",
        took / 1_000_000
    );
    // The last instance standing: it goes on leading while it stays up.
    wait_until(
        Duration::from_secs(5),
        "the third leader to keep its lease past one TTL",
        || async {
            ticks(&instances)
                .iter()
                .filter(|(_, term, _)| *term >= third_term)
                .map(|(_, _, at)| *at)
                .max()
                .is_some_and(|last| last - first_tick(&instances, third_term) > TTL.as_nanos())
        },
    )
    .await;

    publishing.abort();
    for instance in &mut instances {
        instance.child.start_kill().ok();
    }
    let terms = check_no_overlap(&instances);
    assert!(terms.len() >= 3, "{terms:?}");

    // The bound consumer handled messages only where and while its instance led.
    let mut handlers = std::collections::BTreeSet::new();
    for instance in &instances {
        for line in instance.lines_starting("handled ") {
            let at: u128 = line.split(' ').nth(3).unwrap().parse().unwrap();
            handlers.insert(instance.name);
            for (term, (holder, start, end)) in &terms {
                assert!(
                    holder == instance.name || at < *start || at > *end,
                    "{} handled a message at {at} while {holder} led (term {term})",
                    instance.name
                );
            }
        }
    }
    assert!(handlers.len() >= 2, "the consumer followed the lease: {handlers:?}");
}

fn first_tick(instances: &[Instance], term: u64) -> u128 {
    ticks(instances)
        .into_iter()
        .filter(|(_, t, _)| *t == term)
        .map(|(_, _, at)| at)
        .min()
        .expect("the term ticked")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_ttl_has_stepped_down_when_it_resumes() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut instances = vec![Instance::start(&url, "a"), Instance::start(&url, "b")];
    let (paused, paused_term) = next_leader(&instances, 0, Duration::from_secs(20), "a first leader").await;
    let index = instances.iter().position(|i| i.name == paused).unwrap();

    send_signal(instances[index].pid(), "STOP");
    let stopped_at = unix_nanos();
    let (successor, successor_term) = next_leader(
        &instances,
        paused_term,
        Duration::from_secs(10),
        "the other instance to lead",
    )
    .await;
    assert_ne!(successor, paused);
    assert!(
        first_tick(&instances, successor_term) - stopped_at >= TTL.as_nanos() - 200_000_000,
        "the successor waited for the paused leader's lease to run out"
    );
    send_signal(instances[index].pid(), "CONT");

    // Awake again, it knows its lease is over without asking anyone; its write is refused.
    wait_until(Duration::from_secs(10), "the resumed leader's late write", || async {
        !instances[index].lines_starting("late-write ").is_empty()
    })
    .await;
    assert_eq!(
        instances[index].lines_starting("late-write "),
        vec![format!("late-write {paused} {paused_term} refused")]
    );
    let resumed_ticks: Vec<_> = ticks(&instances)
        .into_iter()
        .filter(|(name, _, at)| *name == paused && *at > stopped_at)
        .collect();
    assert!(
        resumed_ticks.is_empty(),
        "the paused leader worked after resuming: {resumed_ticks:?}"
    );
    // The successor keeps leading.
    let successor_ticks = |instances: &[Instance]| {
        ticks(instances)
            .into_iter()
            .filter(|(_, term, _)| *term == successor_term)
            .count()
    };
    let before = successor_ticks(&instances);
    wait_until(Duration::from_secs(5), "the successor to go on", || async {
        successor_ticks(&instances) > before + 10
    })
    .await;

    for instance in &mut instances {
        instance.child.start_kill().ok();
    }
    check_no_overlap(&instances);
}

/// The time of every action an instance printed (ticks and its bound consumer's job steps).
fn activity(instance: &Instance) -> Vec<u128> {
    instance
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|line| {
            ["tick ", "start ", "busy ", "done "]
                .iter()
                .any(|p| line.starts_with(p))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse().ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_mid_job_hands_over_only_after_its_bound_job_ends() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut instances = vec![
        Instance::start_binary(DRAIN_WORKER, &url, "a"),
        Instance::start_binary(DRAIN_WORKER, &url, "b"),
    ];
    let (first, first_term) = next_leader(&instances, 0, Duration::from_secs(20), "a first leader").await;
    let js = async_nats::jetstream::new(server.client().await);
    wait_until(Duration::from_secs(10), "the chores stream", || async {
        js.get_stream("chores").await.is_ok()
    })
    .await;
    let job = serde_json::to_vec(&natty_tests::Job { id: 1 }).unwrap();
    js.publish("chores.one", job.into()).await.unwrap().await.unwrap();
    let index = instances.iter().position(|i| i.name == first).unwrap();
    wait_until(Duration::from_secs(10), "the leader to start the job", || async {
        !instances[index].lines_starting("start ").is_empty()
    })
    .await;

    // SIGTERM mid-job (8 s, with a 3 s ack_wait): the job finishes while the lease is kept,
    // and only then does the successor lead.
    send_signal(instances[index].pid(), "TERM");
    let status = tokio::time::timeout(Duration::from_secs(40), instances[index].child.wait())
        .await
        .expect("the stopped leader exits")
        .unwrap();
    assert!(status.success(), "{first} exits cleanly: {status:?}");
    let (second, second_term) = next_leader(&instances, first_term, Duration::from_secs(10), "a successor").await;
    let last_old = activity(&instances[index])
        .into_iter()
        .max()
        .expect("the old leader acted");
    let first_new = first_tick(&instances, second_term);
    assert!(
        last_old < first_new,
        "{first} still acted {} ms after {second} (term {second_term}) began",
        (last_old - first_new) / 1_000_000
    );
    let starts: usize = instances.iter().map(|i| i.lines_starting("start ").len()).sum();
    assert_eq!(starts, 1, "the job ran once: never redelivered while it ran");
    assert_eq!(
        instances[index].lines_starting("done ").len(),
        1,
        "{first} finished the job"
    );

    for instance in &mut instances {
        instance.child.start_kill().ok();
    }
    check_no_overlap(&instances);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_waits_out_a_lease_whose_key_vanished_early() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut instances = vec![Instance::start(&url, "a"), Instance::start(&url, "b")];
    let (first, first_term) = next_leader(&instances, 0, Duration::from_secs(20), "a first leader").await;

    // The key disappears under a live leader (an operator's purge, a lost bucket): the other
    // instance may take the key at once, but must not act before the old lease could be over.
    let js = async_nats::jetstream::new(server.client().await);
    let kv = js.get_key_value("election").await.unwrap();
    let purged_at = unix_nanos();
    kv.purge("worker").await.unwrap();
    let (second, second_term) = next_leader(&instances, first_term, Duration::from_secs(10), "a new term").await;
    let waited = first_tick(&instances, second_term) - purged_at;
    assert!(
        waited >= (TTL / 2).as_nanos(),
        "{second} acted {} ms after the purge, while {first}'s lease could still run",
        waited / 1_000_000
    );

    for instance in &mut instances {
        instance.child.start_kill().ok();
    }
    check_no_overlap(&instances);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_that_finds_the_key_purged_waits_out_the_lease_it_never_saw() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut instances = vec![Instance::start(&url, "a")];
    let (_, first_term) = next_leader(&instances, 0, Duration::from_secs(20), "a first leader").await;

    // Purged under the live leader; a newcomer that never saw the lease finds only the purge
    // marker (no release): whoever takes the key must not act before that lease could be over.
    let js = async_nats::jetstream::new(server.client().await);
    let kv = js.get_key_value("election").await.unwrap();
    let purged_at = unix_nanos();
    kv.purge("worker").await.unwrap();
    instances.push(Instance::start(&url, "b"));
    let (second, second_term) = next_leader(&instances, first_term, Duration::from_secs(10), "a new term").await;
    let waited = first_tick(&instances, second_term) - purged_at;
    assert!(
        waited >= (TTL / 2).as_nanos(),
        "{second} acted {} ms after the purge, while the old lease could still run",
        waited / 1_000_000
    );

    for instance in &mut instances {
        instance.child.start_kill().ok();
    }
    check_no_overlap(&instances);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_node_that_leads_the_election_stream_never_yields_two_leaders() {
    let mut cluster = NatsCluster::start(3).await.expect("a 3-node cluster");
    let url = cluster.urls().join(",");
    let mut instances = vec![
        Instance::start_binary(CLUSTER_WORKER, &url, "a"),
        Instance::start_binary(CLUSTER_WORKER, &url, "b"),
        Instance::start_binary(CLUSTER_WORKER, &url, "c"),
    ];
    let (_, first_term) = next_leader(&instances, 0, Duration::from_secs(30), "a first leader").await;

    let js = async_nats::jetstream::new(cluster.client().await);
    let mut stream = js.get_stream("KV_election").await.unwrap();
    let info = stream.info().await.unwrap().clone();
    assert_eq!(info.config.num_replicas, 3, "the election bucket is replicated");
    let node = info.cluster.and_then(|c| c.leader).expect("the stream has a leader");
    let killed_at = unix_nanos();
    cluster.node_named(&node).expect("a node of the cluster").kill().await;

    // Leadership goes on (renewed through the new stream leader, or won again after the lease
    // runs out), and at no moment do two instances lead.
    let ticking_after_kill = |instances: &[Instance]| {
        ticks(instances)
            .into_iter()
            .filter(|(_, _, at)| *at > killed_at + (TTL * 2).as_nanos())
            .count()
    };
    wait_until(
        Duration::from_secs(30),
        "a leader after the node was killed",
        || async { ticking_after_kill(&instances) > 20 },
    )
    .await;
    for instance in &mut instances {
        instance.child.start_kill().ok();
    }
    let terms = check_no_overlap(&instances);
    assert!(terms.keys().any(|term| *term >= first_term), "{terms:?}");
}
