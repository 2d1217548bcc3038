//! The scheduler example: three instances, one schedules; kill it and another takes over
//! within the lease TTL (3 s) plus a second; the jobs keep coming.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use natty_runtime::testing::NatsServer;
use natty_tests::{collect_lines, send_signal, spawn_service, wait_until};

const SCHEDULER: &str = env!("CARGO_BIN_EXE_scheduler");

type Instance = (&'static str, tokio::process::Child, Arc<Mutex<Vec<String>>>);

/// The instances that have scheduled a run so far.
fn scheduling(instances: &[Instance]) -> Vec<&'static str> {
    instances
        .iter()
        .filter(|(_, _, lines)| lines.lock().unwrap().iter().any(|l| l.contains("scheduled run")))
        .map(|(name, _, _)| *name)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_hands_the_schedule_to_another_instance() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let mut instances: Vec<Instance> = ["a", "b", "c"]
        .into_iter()
        .map(|name| {
            let mut child = spawn_service(Path::new(SCHEDULER), Some(&url), &[("INSTANCE", name)]);
            let lines = collect_lines(&mut child);
            (name, child, lines)
        })
        .collect();
    wait_until(Duration::from_secs(20), "one instance scheduling", || async {
        !scheduling(&instances).is_empty()
    })
    .await;
    let first = scheduling(&instances);
    assert_eq!(first.len(), 1, "only the leader schedules: {first:?}");
    let leader = first[0];

    let index = instances.iter().position(|(name, _, _)| *name == leader).unwrap();
    send_signal(instances[index].1.id().unwrap(), "KILL");
    let killed = Instant::now();
    wait_until(Duration::from_secs(10), "another instance scheduling", || async {
        scheduling(&instances).len() == 2
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(4) + Duration::from_millis(500),
        "takeover took {:?}",
        killed.elapsed()
    );
    for (_, child, _) in &mut instances {
        child.start_kill().ok();
    }
}
