//! Messages waiting for the ledger to say whether a visible block already holds them.

use super::*;

/// A decoded message on its way into a block.
pub(super) struct Arrival {
    pub(super) captured: Captured,
    pub(super) original: Original,
    pub(super) reply: Subject,
    /// Its stream timestamp, in nanoseconds since the Unix epoch.
    pub(super) timestamp: u64,
    /// The stream incarnation it was delivered from.
    pub(super) incarnation: u64,
    /// When it was received: a ledger listed since (less a keep-alive period) is fresh enough
    /// to say whether a stored block holds it.
    pub(super) arrived: Instant,
}

impl Arrival {
    pub(super) fn id(&self) -> MessageId {
        (self.incarnation, self.original.stream_sequence)
    }
}

/// Redelivered messages waiting for the ledger to be read (again), held and kept alive
/// meanwhile, and the refresh under way.
#[derive(Default)]
pub(super) struct Unsure {
    pub(super) waiting: Vec<Arrival>,
    /// When the waiting messages were last kept alive.
    pub(super) touched: Option<Instant>,
    pub(super) refresh: Option<tokio::task::JoinHandle<std::result::Result<(), StoreError>>>,
    /// No refresh before this (after a failed one).
    pub(super) not_before: Option<Instant>,
    pub(super) failures: u32,
}

impl Unsure {
    pub(super) fn push(&mut self, arrival: Arrival) {
        if self.waiting.is_empty() {
            self.touched = Some(Instant::now());
        }
        self.waiting.push(arrival);
    }

    /// Starts reading the ledger if messages wait and no read is under way or backing off.
    pub(super) fn refresh_if_due(&mut self, shared: &Arc<Shared>) {
        if self.waiting.is_empty() || self.refresh.is_some() || self.not_before.is_some_and(|at| at > Instant::now()) {
            return;
        }
        let shared = shared.clone();
        self.refresh = Some(tokio::spawn(async move { shared.ledger.refresh().await }));
    }

    /// Resolves when the refresh under way ends; never if none is.
    pub(super) async fn refreshed(&mut self) -> std::result::Result<(), String> {
        match self.refresh.as_mut() {
            Some(refresh) => {
                let outcome = refresh.await;
                self.refresh = None;
                match outcome {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(crate::error::chain(&error).to_string()),
                    Err(panic) => Err(format!("the ledger read failed: {panic}")),
                }
            }
            None => std::future::pending().await,
        }
    }

    /// After a refresh: the waiting messages to admit again, or none (they wait for a retry).
    pub(super) fn settle(&mut self, refreshed: std::result::Result<(), String>, shared: &Shared) -> Vec<Arrival> {
        match refreshed {
            Ok(()) => {
                self.failures = 0;
                self.not_before = None;
                std::mem::take(&mut self.waiting)
            }
            Err(error) => {
                self.failures = self.failures.saturating_add(1);
                let delay = (STORE_RETRY_FIRST * 2u32.pow(self.failures.min(7))).min(STORE_RETRY_MAX);
                self.not_before = Some(Instant::now() + delay);
                tracing::warn!(
                    capture = shared.def.name, %error, waiting = self.waiting.len(), retry_in = ?delay,
                    "cannot read which messages the stored blocks hold; the redelivered ones wait, unacked"
                );
                Vec::new()
            }
        }
    }

    /// Sends in-progress acks for the waiting messages every keep-alive period.
    pub(super) fn keep_alive(&mut self, shared: &Shared) {
        if self.touched.is_some_and(|at| at.elapsed() >= shared.keep_alive) {
            self.touched = Some(Instant::now());
            let replies: Vec<Subject> = self.waiting.iter().map(|arrival| arrival.reply.clone()).collect();
            shared.pings.ask(keep_alive::UNSURE, replies);
        }
    }

    /// On shutdown: the waiting messages go back to the server.
    pub(super) fn hand_back(&mut self, shared: &Shared) {
        let waiting = std::mem::take(&mut self.waiting);
        let mut replies = Vec::with_capacity(waiting.len());
        for arrival in waiting {
            shared.release(arrival.incarnation, &[arrival.original.stream_sequence]);
            replies.push(arrival.reply);
        }
        settle_all(&shared.nats, replies, b"-NAK");
    }
}
