//! Keeps a capture's held messages alive: one task and one timer per capture, however many
//! blocks it holds.
//!
//! # What holds
//!
//! - **Sealed blocks** are registered with when their messages were last kept alive; the task
//!   sends their in-progress acks every keep-alive period, checking four times a period.
//! - **The capture's loop asks** for open blocks and for messages waiting for the ledger; a
//!   request not yet sent is replaced by a newer one for the same holder, never queued beside it.
//! - **Pings are sent one after another by the one task.** While the connection is down, the
//!   task waits on it and the requests collapse: the work waiting never grows with time or with
//!   the number of blocks, only with the messages held (which the budget bounds).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Who holds messages to keep alive: a block's number, or [`UNSURE`].
pub(crate) type Holder = u64;

/// The messages waiting for the ledger.
pub(crate) const UNSURE: Holder = u64::MAX;

/// A sealed block's messages and when they were last kept alive.
struct Sealed {
    touched: Instant,
    replies: Arc<[Subject]>,
}

/// The keep-alive work of one capture.
pub(crate) struct KeepAlive {
    /// How often each held message gets an in-progress ack.
    period: Duration,
    sealed: Mutex<HashMap<Holder, Sealed>>,
    /// Pings asked for now, by holder.
    asked: Mutex<HashMap<Holder, Vec<Subject>>>,
    wake: Notify,
}

impl KeepAlive {
    /// Keep-alive work with in-progress acks every `period`.
    pub(crate) fn new(period: Duration) -> Self {
        KeepAlive {
            period,
            sealed: Mutex::new(HashMap::new()),
            asked: Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    /// Keeps a sealed block's messages alive from `touched` (when they last were) on, until
    /// [`KeepAlive::forget`].
    pub(crate) fn hold(&self, holder: Holder, touched: Instant, replies: Arc<[Subject]>) {
        if let Ok(mut sealed) = self.sealed.lock() {
            sealed.insert(holder, Sealed { touched, replies });
        }
    }

    /// Stops keeping a sealed block's messages alive (stored, or given up).
    pub(crate) fn forget(&self, holder: Holder) {
        if let Ok(mut sealed) = self.sealed.lock() {
            sealed.remove(&holder);
        }
    }

    /// Asks for in-progress acks of `replies` now, replacing an earlier request of `holder` not
    /// yet sent.
    pub(crate) fn ask(&self, holder: Holder, replies: Vec<Subject>) {
        if let Ok(mut asked) = self.asked.lock() {
            asked.insert(holder, replies);
        }
        self.wake.notify_one();
    }

    /// How many sealed blocks are kept alive (for tests).
    #[cfg(all(test, feature = "testing"))]
    pub(crate) fn sealed(&self) -> usize {
        self.sealed.lock().map_or(0, |sealed| sealed.len())
    }

    /// Sends the pings due until `stop`.
    pub(crate) async fn run(self: Arc<Self>, nats: async_nats::Client, stop: CancellationToken) {
        let check = (self.period / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(check);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
                _ = self.wake.notified() => {}
            }
            let mut due: Vec<Arc<[Subject]>> = Vec::new();
            if let Ok(mut sealed) = self.sealed.lock() {
                let now = Instant::now();
                for block in sealed.values_mut() {
                    if now >= block.touched + self.period {
                        block.touched = now;
                        due.push(block.replies.clone());
                    }
                }
            }
            let asked = self
                .asked
                .lock()
                .map(|mut asked| std::mem::take(&mut *asked))
                .unwrap_or_default();
            let replies = due
                .iter()
                .flat_map(|replies| replies.iter())
                .chain(asked.values().flatten());
            for reply in replies {
                // A lost ping is sent again next period, well before ack_wait runs out.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = nats.publish(reply.clone(), Bytes::from_static(b"+WPI")) => {}
                }
            }
        }
    }
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::collections::HashMap;

    /// However many blocks are held and however often the loop asks, one task sends the pings,
    /// each held message once a period, and a request repeated before it was sent goes once.
    #[tokio::test]
    async fn one_task_keeps_every_block_alive() {
        const BLOCKS: u64 = 1000;
        const PER_BLOCK: u64 = 5;
        let server = crate::testing::NatsServer::start().await.expect("nats-server");
        let client = server.client().await;
        let mut received = client.subscribe("ping.>").await.expect("subscribe");
        client.flush().await.expect("flush");
        let period = Duration::from_secs(2);
        let keep_alive = Arc::new(KeepAlive::new(period));
        let stop = CancellationToken::new();
        tokio::spawn(keep_alive.clone().run(client.clone(), stop.clone()));
        tokio::task::yield_now().await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let tasks = metrics.num_alive_tasks();

        let due = Instant::now() - period;
        for block in 0..BLOCKS {
            let replies: Vec<Subject> = (0..PER_BLOCK).map(|n| format!("ping.{block}.{n}").into()).collect();
            keep_alive.hold(block, due, replies.into());
        }
        for _ in 0..100 {
            keep_alive.ask(BLOCKS, vec!["ping.open.0".into()]);
        }
        assert_eq!(keep_alive.sealed(), BLOCKS as usize);

        let mut seen: HashMap<String, u32> = HashMap::new();
        let expected = (BLOCKS * PER_BLOCK + 1) as usize;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen.values().map(|n| *n as usize).sum::<usize>() < expected {
            let ping = tokio::time::timeout_at(deadline, received.next())
                .await
                .expect("every held message pinged within 10 s")
                .expect("subscription open");
            assert_eq!(&ping.payload[..], b"+WPI");
            *seen.entry(ping.subject.to_string()).or_default() += 1;
            // No task was spawned for any block or request.
            assert_eq!(metrics.num_alive_tasks(), tasks);
        }
        assert_eq!(seen.len(), expected, "each held message once");
        assert!(seen.values().all(|n| *n == 1), "each held message once");

        for block in 0..BLOCKS {
            keep_alive.forget(block);
        }
        assert_eq!(keep_alive.sealed(), 0);
        stop.cancel();
    }
}
