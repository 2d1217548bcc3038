//! What a capture's tasks share: its definition, store, metrics, and the messages it holds.

use super::*;

/// What store tasks share with the capture's loop.
pub(super) struct Shared {
    pub(super) def: CaptureDef,
    pub(super) consumer: Consumer,
    pub(super) nats: async_nats::Client,
    pub(super) store: BlockStore,
    pub(super) stats: Arc<CaptureStats>,
    /// The same figures for the metrics endpoint, plus the store latency histogram.
    pub(super) metrics: CaptureMetrics,
    /// A third of the consumer's `ack_wait`: how often held messages are kept alive, leaving
    /// room for a busy process to send the pings late.
    pub(super) keep_alive: Duration,
    /// Sends the in-progress acks of every held message: one task for the whole capture.
    pub(super) pings: Arc<KeepAlive>,
    /// Bytes of sealed and remembered blocks, counted against `def.max_memory`.
    pub(super) usage: Arc<Usage>,
    /// The messages in open and storing blocks, and those waiting for the ledger. A message
    /// redelivered while its first delivery is still held (a keep-alive came too late) is not
    /// written twice: the first delivery's ack, after its block is stored, settles it.
    pub(super) held_sequences: Mutex<std::collections::HashSet<MessageId, FastHash>>,
    /// Stored blocks whose acks the server has not yet been seen to take, with their stream
    /// incarnation and sorted sequences: a redelivery of one of them (the server sent it before
    /// it saw the ack, or the ack was lost in a leader election) is acked again instead of
    /// stored twice. A block is forgotten once the consumer's ack floor has passed its last
    /// sequence, or its incarnation is gone, and the oldest regardless past an eighth of the
    /// memory budget.
    pub(super) recently_stored: Mutex<Remembered>,
    /// The consumer's ack floor (stream sequence) as last read from the server, in the current
    /// incarnation.
    pub(super) ack_floor: AtomicU64,
    /// The current incarnation of the stream: its creation time in nanoseconds since the Unix
    /// epoch. A stream deleted and created again, or a memory stream lost in a server restart,
    /// numbers its messages from 1 again; everything keyed by sequence is keyed by this too.
    pub(super) incarnation: AtomicU64,
    /// Which messages the stored blocks hold, in the store beside them: a message redelivered
    /// after a crash between its block's store and its ack is acked, not written again.
    pub(super) ledger: Ledger,
    /// Limits how many blocks are being stored at once.
    pub(super) storing: Semaphore,
    /// Cancelled when the drain deadline passes: stores give up, leaving their messages unacked.
    pub(super) abandon: CancellationToken,
}

impl Shared {
    /// Marks a message held; false if it already is. The `held` stat follows the set.
    pub(super) fn hold(&self, id: MessageId) -> bool {
        self.held_sequences
            .lock()
            .map(|mut held| {
                let new = held.insert(id);
                self.stats.held.store(held.len() as u64, Ordering::Relaxed);
                self.metrics.held.set(held.len() as i64);
                new
            })
            .unwrap_or(true)
    }

    /// Remembers a stored block's sequences until the server has taken their acks (see
    /// `recently_stored`).
    pub(super) fn stored(&self, incarnation: u64, sorted: Vec<u64>) {
        if let Ok(mut recent) = self.recently_stored.lock() {
            recent.push(Instant::now(), incarnation, sorted);
        }
        self.forget_acked();
    }

    /// How long a stored block is remembered after the ack floor passed it (see
    /// `forget_acked`), and how far apart ledger sweeps are.
    pub(super) fn keep(&self) -> Duration {
        (self.keep_alive * 12).max(Duration::from_secs(30))
    }

    /// Starts a new stream incarnation: the ack floor read so far was the old one's.
    pub(super) fn set_incarnation(&self, incarnation: u64) {
        let old = self.incarnation.swap(incarnation, Ordering::Relaxed);
        if old != incarnation {
            self.ack_floor.store(0, Ordering::Relaxed);
            if old != 0 {
                tracing::warn!(
                    capture = self.def.name,
                    stream = self.def.stream,
                    old,
                    new = incarnation,
                    "the stream was created anew (its sequences start again): blocks of the new stream get names of their own"
                );
            }
        }
    }

    /// Drops the remembered blocks that are both below the ack floor (their acks were taken)
    /// and old enough: on a cluster, a consumer leader can report acks it had not yet
    /// replicated, and the leader elected when it dies redelivers them an `ack_wait` after the
    /// election. Twelve keep-alives (four `ack_wait`s), and at least 30 s, cover that. Past an
    /// eighth of the memory budget, the oldest go regardless: memory must not grow while the
    /// ack floor cannot be read, or while messages arrive faster than that memory lasts.
    pub(super) fn forget_acked(&self) {
        let most = (self.def.max_memory / 8 / REMEMBERED_PER_MESSAGE).max(1);
        let keep = self.keep();
        let floor = self.ack_floor.load(Ordering::Relaxed);
        let current = self.incarnation.load(Ordering::Relaxed);
        if let Ok(mut recent) = self.recently_stored.lock() {
            recent.forget_while(most, |at, incarnation, last| {
                at.elapsed() > keep && (incarnation != current || last.is_none_or(|last| last <= floor))
            });
            self.usage
                .remembered
                .store(recent.messages() * REMEMBERED_PER_MESSAGE, Ordering::Relaxed);
        }
    }

    /// Reads the consumer's ack floor from the server every `keep_alive`, until `stop`, and
    /// sweeps the ledger of manifests no redelivery can need any more every `keep`.
    pub(super) async fn follow_ack_floor(self: Arc<Self>, stop: CancellationToken) {
        let (stream, durable) = (self.def.stream, self.def.durable);
        let js = async_nats::jetstream::new(self.nats.clone());
        let every = self.keep_alive.max(Duration::from_secs(1));
        let mut last_sweep = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let incarnation = self.incarnation.load(Ordering::Relaxed);
            let info = js.get_consumer_from_stream::<pull::Config, _, _>(durable, stream);
            let Ok(Ok(consumer)) = tokio::time::timeout(every, info).await else {
                continue;
            };
            // A floor read across a change of incarnation belongs to neither.
            if self.incarnation.load(Ordering::Relaxed) != incarnation {
                continue;
            }
            let floor = consumer.cached_info().ack_floor.stream_sequence;
            self.ack_floor.fetch_max(floor, Ordering::Relaxed);
            self.forget_acked();
            if last_sweep.elapsed() >= self.keep() {
                last_sweep = Instant::now();
                match tokio::time::timeout(self.keep(), self.ledger.sweep(incarnation, floor)).await {
                    Ok(Ok(0)) | Err(_) => {}
                    Ok(Ok(removed)) => {
                        tracing::debug!(
                            capture = self.def.name,
                            removed,
                            "removed manifests of fully acked blocks"
                        )
                    }
                    Ok(Err(error)) => {
                        tracing::warn!(capture = self.def.name, error = %crate::error::chain(&error), "cannot sweep the manifests of acked blocks")
                    }
                }
            }
        }
    }

    /// On stop: waits up to two seconds for the ack floor to pass the blocks stored here (the
    /// server applies acks a moment after taking them), then removes the manifests the floor
    /// has passed, so that a stopped capture leaves only blocks behind. Unlike the sweep, it
    /// does not wait out `keep`: a consumer leader that fails over right after a capture
    /// stops, with acks it had not replicated, can then have them stored twice.
    pub(super) async fn remove_acked_manifests(&self) {
        const WAIT: Duration = Duration::from_secs(2);
        let incarnation = self.incarnation.load(Ordering::Relaxed);
        let target = self
            .recently_stored
            .lock()
            .map_or(0, |recent| recent.last_in(incarnation));
        let js = async_nats::jetstream::new(self.nats.clone());
        let deadline = Instant::now() + WAIT;
        let mut floor = None;
        loop {
            let info = js.get_consumer_from_stream::<pull::Config, _, _>(self.def.durable, self.def.stream);
            if let Ok(Ok(consumer)) = tokio::time::timeout(WAIT, info).await {
                floor = Some(consumer.cached_info().ack_floor.stream_sequence);
            }
            if floor.is_some_and(|floor| floor >= target) || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let Some(floor) = floor else { return };
        match tokio::time::timeout(WAIT, self.ledger.remove_acked(incarnation, floor)).await {
            Ok(Ok(removed)) => tracing::debug!(
                capture = self.def.name,
                removed,
                floor,
                "removed the manifests of acked blocks"
            ),
            Ok(Err(error)) => {
                tracing::warn!(capture = self.def.name, error = %crate::error::chain(&error), "cannot remove the manifests of acked blocks")
            }
            Err(_) => tracing::warn!(
                capture = self.def.name,
                "removing the manifests of acked blocks took too long; left for the next run"
            ),
        }
    }

    /// Whether a message is in a block stored moments ago.
    pub(super) fn was_stored(&self, id: MessageId) -> bool {
        self.recently_stored.lock().is_ok_and(|mut recent| recent.contains(id))
    }

    /// Forgets messages whose block was stored or given up.
    pub(super) fn release(&self, incarnation: u64, sequences: &[u64]) {
        if let Ok(mut held) = self.held_sequences.lock() {
            for sequence in sequences {
                held.remove(&(incarnation, *sequence));
            }
            self.stats.held.store(held.len() as u64, Ordering::Relaxed);
            self.metrics.held.set(held.len() as i64);
        }
    }
}
