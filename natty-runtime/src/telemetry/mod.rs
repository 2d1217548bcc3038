//! Observability: Prometheus metrics and health on an HTTP endpoint, W3C trace context in
//! message headers (with or without an OpenTelemetry SDK), and the logging set-up
//! [`crate::run`] installs.

pub(crate) mod context;
mod format;
pub(crate) mod http;
pub(crate) mod latency;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod trace;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;

pub(crate) use context::{light, DeliveryScope};
#[cfg(feature = "capture")]
pub(crate) use metrics::CaptureMetrics;
pub(crate) use metrics::{ConsumerMetrics, Metrics};

/// What a connection's handlers report: metrics and the readiness checks. One per
/// [`Client`](crate::Client) and its clones.
#[derive(Debug, Default)]
pub(crate) struct Telemetry {
    pub(crate) metrics: Metrics,
    pub(crate) health: Health,
    pub(crate) instance: Instance,
}

/// This running service: how the console, leader leases and partitioned groups name it.
#[derive(Debug)]
pub(crate) struct Instance {
    /// `<host>-<pid>-<random>`: unique across restarts and hosts, and a valid KV key token.
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) pid: u32,
    pub(crate) started: std::time::SystemTime,
}

impl Default for Instance {
    fn default() -> Self {
        let host = hostname();
        let pid = std::process::id();
        // 48 random bits tell apart two services with one pid (containers: pid 1) and restarts.
        let suffix = crate::consumer::unique_suffix();
        Instance {
            id: instance_id(&host, pid, &suffix),
            host,
            pid,
            started: std::time::SystemTime::now(),
        }
    }
}

/// `<host>-<pid>-<suffix>`, the host made a token and cut to its last 40 characters: a pod's
/// name ends with what tells it apart.
fn instance_id(host: &str, pid: u32, suffix: &str) -> String {
    let host = token(host);
    let host = &host[host.len().saturating_sub(40)..];
    format!("{host}-{pid}-{suffix}")
}

/// `text` as one NATS subject token and KV key token: letters, digits, `-` and `_` kept, any
/// other character made `_`.
pub(crate) fn token(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The machine's name as the kernel has it (a pod's name under Kubernetes).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "host".to_string())
}

/// The readiness checks: connected, provisioned, every handler running, not draining.
#[derive(Debug, Default)]
pub(crate) struct Health {
    provisioned: AtomicBool,
    draining: AtomicBool,
    tasks: Mutex<Vec<(String, Arc<AtomicBool>)>>,
}

/// What `/readyz` answers.
#[derive(Debug, Serialize)]
pub(crate) struct Readiness {
    pub(crate) ready: bool,
    pub(crate) connected: bool,
    provisioned: bool,
    pub(crate) draining: bool,
    /// Handlers that are not running (stopped, or not started yet).
    pub(crate) not_running: Vec<String>,
    handlers: usize,
}

impl Health {
    pub(crate) fn set_provisioned(&self) {
        self.provisioned.store(true, Ordering::Relaxed);
    }

    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Registers a supervised task; it counts as running while the returned guard lives.
    pub(crate) fn task(&self, name: String) -> Running {
        let running = Arc::new(AtomicBool::new(true));
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.push((name, running.clone()));
        }
        Running(running)
    }

    /// The checks, against `client` once there is a connection.
    pub(crate) fn report(&self, client: Option<&async_nats::Client>) -> Readiness {
        let connected =
            client.is_some_and(|client| client.connection_state() == async_nats::connection::State::Connected);
        let provisioned = self.provisioned.load(Ordering::Relaxed);
        let draining = self.draining.load(Ordering::Relaxed);
        let (handlers, not_running) = match self.tasks.lock() {
            Ok(tasks) => (
                tasks.len(),
                tasks
                    .iter()
                    .filter(|(_, running)| !running.load(Ordering::Relaxed))
                    .map(|(name, _)| name.clone())
                    .collect(),
            ),
            Err(_) => (0, vec!["<unknown: a task panicked while registering>".to_string()]),
        };
        Readiness {
            ready: connected && provisioned && !draining && handlers > 0 && not_running.is_empty(),
            connected,
            provisioned,
            draining,
            not_running,
            handlers,
        }
    }
}

/// Marks its task as running until dropped (when the task ends, panics included).
pub(crate) struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_instance_is_named_by_the_end_of_its_host_its_pid_and_a_random_suffix() {
        assert_eq!(instance_id("web.example.com", 7, "abc"), "web_example_com-7-abc");
        let pod = "orders-service-deployment-with-a-long-name-7d9f8c6b5-x2v4q";
        assert!(instance_id(pod, 1, "s").ends_with("7d9f8c6b5-x2v4q-1-s"));
        assert_eq!(instance_id(pod, 1, "s").len(), 40 + "-1-s".len());
        assert_eq!(crate::consumer::unique_suffix().len(), 12, "48 bits");
    }
}
