//! The operator console: a page on the service's HTTP endpoint showing every handler, leader,
//! partitioned group, capture and dead letter of the whole fleet, with the actions an operator
//! takes (replay or delete dead letters, pause or resume a consumer).
//!
//! Every instance answers a status request on `natty.console.<service>.status` (core NATS, no
//! queue group), so the instance whose page is open asks them all and shows them together.
//! Nothing here runs per message: counts are the metrics' atomics, read when asked and every
//! [`SAMPLE_EVERY`] for the plots; the server's counts (pending, ack pending) are read only
//! while somebody looks.

pub(crate) mod api;
mod status;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::registry::Declarations;

pub(crate) use status::Status;
use status::{Catalog, Sample};

/// How often the plots get a point.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Points kept: ten minutes.
const SAMPLES: usize = 120;
/// How long after the page last asked the sampler keeps reading the server's counts.
const WATCHED_FOR: Duration = Duration::from_secs(60);
/// How long a fleet request waits for instances that have not answered yet, after the last
/// answer; and at most.
const FLEET_QUIET: Duration = Duration::from_millis(300);
const FLEET_DEADLINE: Duration = Duration::from_millis(1500);
/// Instances shown at most: past that, answers are someone else's flood.
const MAX_INSTANCES: usize = 256;
/// Status requests an instance answers in a second at most.
const MAX_ANSWERS_PER_SECOND: u32 = 20;

/// One instance's console: what it declared, the history of its counts, and the fleet's
/// status subject.
pub(crate) struct Console {
    service: String,
    version: Option<String>,
    subject: String,
    client: Client,
    catalog: Catalog,
    history: Mutex<VecDeque<Sample>>,
    /// Unix seconds when the page last asked this instance for the fleet.
    watched_at: AtomicU64,
    /// The dead letters last listed.
    dead_letters: crate::dead_letters::NewestCache,
    /// Each leader's lease holder, as last sampled.
    leases: Mutex<HashMap<&'static str, Option<String>>>,
}

/// The status subject of a service: its name made one subject token.
fn status_subject(service: &str) -> String {
    let token = crate::telemetry::token(service);
    format!("natty.console.{token}.status")
}

/// What a fleet request says: who asks, so that it does not answer itself.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ask {
    from: String,
}

/// The whole fleet as `/api/fleet` answers.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct Fleet {
    pub(crate) service: String,
    #[serde(rename = "self")]
    pub(crate) this: String,
    pub(crate) asked_at: String,
    pub(crate) instances: Vec<Status>,
}

impl Console {
    /// The console of the service `config` names, declaring `declared`, on `client`'s connection.
    pub(crate) fn new(config: &crate::Config, declared: &Declarations, client: &Client) -> Arc<Console> {
        let service = &config.name;
        Arc::new(Console {
            service: service.to_string(),
            version: config.service_version.clone(),
            subject: status_subject(service),
            client: client.clone(),
            catalog: Catalog::new(declared),
            history: Mutex::new(VecDeque::with_capacity(SAMPLES + 1)),
            watched_at: AtomicU64::new(0),
            dead_letters: crate::dead_letters::NewestCache::default(),
            leases: Mutex::default(),
        })
    }

    /// Answers the fleet's status requests and samples the plots until `stop`.
    pub(crate) fn start(self: &Arc<Console>, stop: CancellationToken) {
        let console = self.clone();
        let answering = stop.clone();
        tokio::spawn(async move { console.answer(answering).await });
        let console = self.clone();
        tokio::spawn(async move { console.sample(stop).await });
    }

    /// Answers every status request with this instance's status.
    async fn answer(self: Arc<Console>, stop: CancellationToken) {
        let mut requests = loop {
            match self.client.nats().subscribe(self.subject.clone()).await {
                Ok(requests) => break requests,
                Err(error) => {
                    tracing::warn!(subject = %self.subject, error = %crate::error::chain(&error), "console: cannot subscribe to status requests; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                    }
                }
            }
        };
        let me = &self.client.telemetry().instance.id;
        let mut window = (tokio::time::Instant::now(), 0u32);
        loop {
            let request = tokio::select! {
                _ = stop.cancelled() => return,
                request = requests.next() => match request {
                    Some(request) => request,
                    None => return,
                },
            };
            // Answered only to a requester's inbox: anything else would make every instance
            // publish its status wherever a request said, with the service's permissions.
            let Some(reply) = request.reply.filter(|reply| reply.starts_with("_INBOX.")) else {
                continue;
            };
            if serde_json::from_slice::<Ask>(&request.payload).is_ok_and(|ask| &ask.from == me) {
                continue;
            }
            // A few pages asking every 2 s is the use; a flood is not answered.
            if window.0.elapsed() >= Duration::from_secs(1) {
                window = (tokio::time::Instant::now(), 0);
            }
            window.1 += 1;
            if window.1 > MAX_ANSWERS_PER_SECOND {
                continue;
            }
            let status = self.status(false).await;
            let body = match self.encode(status) {
                Some(body) => body,
                None => continue,
            };
            if let Err(error) = self.client.nats().publish(reply, body.into()).await {
                tracing::debug!(error = %crate::error::chain(&error), "console: cannot answer a status request");
            }
        }
    }

    /// A status as sent over NATS: without its plots when they would not fit in a message.
    fn encode(&self, mut status: Status) -> Option<Vec<u8>> {
        let limit = self.client.nats().server_info().max_payload / 2;
        let body = serde_json::to_vec(&status).ok()?;
        if body.len() <= limit {
            return Some(body);
        }
        tracing::warn!(
            bytes = body.len(),
            max_payload = limit * 2,
            "console: this instance's status is too big for a message with its plots; sent without them"
        );
        for handler in &mut status.handlers {
            handler.history.clear();
        }
        serde_json::to_vec(&status).ok()
    }

    /// Adds a point to the plots every [`SAMPLE_EVERY`].
    async fn sample(self: Arc<Console>, stop: CancellationToken) {
        let mut every = tokio::time::interval(SAMPLE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let watched = unix_now().saturating_sub(self.watched_at.load(Ordering::Relaxed)) <= WATCHED_FOR.as_secs();
            let server = if watched {
                Some(self.catalog.server_counts(&self.client).await)
            } else {
                None
            };
            let leases = self.catalog.leases(&self.client).await;
            if let Ok(mut known) = self.leases.lock() {
                *known = leases;
            }
            let sample = self.catalog.sample(self.client.telemetry(), server.as_ref());
            if let Ok(mut history) = self.history.lock() {
                history.push_back(sample);
                while history.len() > SAMPLES {
                    history.pop_front();
                }
            }
        }
    }

    /// This instance's status; with the server's counts of its consumers when `server`.
    pub(crate) async fn status(&self, server: bool) -> Status {
        let counts = if server {
            Some(self.catalog.server_counts(&self.client).await)
        } else {
            None
        };
        let history: Vec<Sample> = self
            .history
            .lock()
            .map(|history| history.iter().cloned().collect())
            .unwrap_or_default();
        // Read now for the page's own instance; as last sampled for an answer over NATS, which
        // does no I/O (a slow JetStream must not keep an instance out of the fleet).
        let leases = if server {
            self.catalog.leases(&self.client).await
        } else {
            self.leases.lock().map(|leases| leases.clone()).unwrap_or_default()
        };
        self.catalog.status(
            &self.client,
            counts.as_ref(),
            &history,
            &leases,
            self.version.as_deref(),
        )
    }

    /// Every instance's status: this one's (with the server's counts), and those that answer
    /// the status request in time.
    pub(crate) async fn fleet(&self) -> Fleet {
        self.watched_at.store(unix_now(), Ordering::Relaxed);
        let me = self.client.telemetry().instance.id.clone();
        let ask = Ask { from: me.clone() };
        let (mine, others) = tokio::join!(self.status(true), async {
            let mut others = Vec::new();
            let request = self
                .client
                .request_many::<Status>(self.subject.clone(), &ask)
                .quiet(FLEET_QUIET)
                .deadline(FLEET_DEADLINE)
                .max_replies(MAX_INSTANCES);
            match request.await {
                Ok(mut replies) => {
                    while let Some(reply) = replies.next().await {
                        match reply {
                            Ok(status) if status.instance != me => others.push(status),
                            Ok(_) | Err(crate::service::RequestError::NoResponders { .. }) => {}
                            Err(error) => {
                                tracing::debug!(error = %crate::error::chain(&error), "console: an instance's status is unreadable")
                            }
                        }
                    }
                }
                Err(error) => {
                    tracing::debug!(error = %crate::error::chain(&error), "console: cannot ask the fleet")
                }
            }
            others
        });
        let mut instances = vec![mine];
        let mut others = others;
        others.sort_by(|a, b| a.instance.cmp(&b.instance));
        instances.extend(others);
        Fleet {
            service: self.service.clone(),
            this: me,
            asked_at: rfc3339(SystemTime::now()),
            instances,
        }
    }

    /// The dead letters last listed, reused while nothing changed.
    pub(crate) fn dead_letters(&self) -> &crate::dead_letters::NewestCache {
        &self.dead_letters
    }

    /// The client the actions use.
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// The consumers `stream`/`durable` stands for: a partitioned group's partitions, or itself.
    pub(crate) fn consumers_of(&self, stream: &str, durable: &str) -> Option<Vec<(String, String)>> {
        self.catalog.consumers_of(stream, durable)
    }
}

/// Seconds since the epoch.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// `time` as RFC 3339, UTC, to the millisecond.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_name_becomes_one_subject_token() {
        assert_eq!(status_subject("orders-svc"), "natty.console.orders-svc.status");
        assert_eq!(status_subject("a.b *>c"), "natty.console.a_b___c.status");
    }

    #[test]
    fn times_are_rfc3339_to_the_millisecond() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_796_493_600_123_456_789);
        assert_eq!(rfc3339(at), "2026-12-05T18:00:00.123Z");
    }
}
