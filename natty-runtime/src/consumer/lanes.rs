//! Per-key lanes of an ordered consumer (`order_by`), and running one delivery inline.

use super::*;

/// Per-key queues of an ordered consumer: a key with a message in progress gets later messages
/// queued behind it; each busy key has one task working through its queue in order, taking a
/// handler slot for each message. Waiting messages hold no slot, so a busy key never keeps
/// other keys from running; they are held, and so kept alive, while they wait.
#[derive(Default, Clone)]
pub(super) struct Lanes(Arc<LanesInner>);

#[derive(Default)]
pub(super) struct LanesInner {
    queues: std::sync::Mutex<HashMap<u64, VecDeque<Ready>>>,
    /// Messages in the lanes that have not started: they count against the prefetch.
    waiting: AtomicUsize,
    tasks: std::sync::Mutex<tokio::task::JoinSet<()>>,
}

impl Lanes {
    pub(super) fn waiting(&self) -> usize {
        self.0.waiting.load(Ordering::Relaxed)
    }

    /// Queues `ready` in its key's lane, starting a task for the lane when it was idle. A key
    /// function that panics is that message's failure: it is dead-lettered with the reason.
    pub(super) fn dispatch(
        &self,
        consumer: Arc<Consumer>,
        order_by: OrderBy,
        ready: Ready,
        permits: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) {
        let mut tasks = self.0.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while tasks.try_join_next().is_some() {}
        let key = match std::panic::catch_unwind(AssertUnwindSafe(|| order_by.lane(&ready.message))) {
            Ok(key) => key,
            Err(panic) => {
                let reason = format!("the order_by key function panicked: {}", panic_message(&*panic));
                tasks.spawn(async move { consumer.give_up(ready, &reason).await });
                return;
            }
        };
        self.0.waiting.fetch_add(1, Ordering::Relaxed);
        {
            let mut queues = self.0.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(queue) = queues.get_mut(&key) {
                queue.push_back(ready);
                return;
            }
            queues.insert(key, VecDeque::new());
        }
        let (lanes, permits, cancel) = (self.clone(), permits.clone(), cancel.clone());
        tasks.spawn(async move {
            let mut next = Some(ready);
            while let Some(ready) = next.take() {
                // Shutting down: what has not started goes back to the server at once.
                let permit = tokio::select! {
                    biased;
                    _ = cancel.cancelled() => None,
                    permit = permits.clone().acquire_owned() => permit.ok(),
                };
                lanes.0.waiting.fetch_sub(1, Ordering::Relaxed);
                consumer.room.notify_one();
                match permit {
                    Some(permit) => consumer.clone().deliver(ready, permit).await,
                    None => consumer.give_back(ready).await,
                }
                let mut queues = lanes.0.queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                match queues.get_mut(&key).and_then(VecDeque::pop_front) {
                    Some(waiting) => next = Some(waiting),
                    None => {
                        queues.remove(&key);
                    }
                }
            }
        });
    }

    /// Waits for every lane to be worked through (or handed back, on shutdown).
    pub(super) async fn finish(&self) {
        let mut tasks = std::mem::take(&mut *self.0.tasks.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        while tasks.join_next().await.is_some() {}
    }
}

/// Runs `step` while still driving the handler that runs in the consumer's own task.
pub(super) async fn beside<T, F: std::future::Future<Output = ()>>(
    inline: &mut Inline<F>,
    step: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(step);
    loop {
        tokio::select! {
            biased;
            output = &mut step => return output,
            Some(()) = inline.next(), if !inline.is_empty() => {}
        }
    }
}

/// The one delivery a consumer with a single handler slot runs in its own task. Its place is
/// allocated once and reused: a box (and a task of a `FuturesUnordered`) per message cost more
/// than the rest of starting one.
pub(super) struct Inline<F>(std::pin::Pin<Box<Option<F>>>);

impl<F: std::future::Future<Output = ()>> Inline<F> {
    pub(super) fn new() -> Self {
        Inline(Box::pin(None))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    /// Starts `delivery`; the previous one must have ended.
    pub(super) fn start(&mut self, delivery: F) {
        debug_assert!(self.is_empty(), "one delivery at a time");
        self.0.set(Some(delivery));
    }

    /// Runs the delivery until it ends (`Some`), or `None` at once when there is none.
    pub(super) async fn next(&mut self) -> Option<()> {
        std::future::poll_fn(|cx| match self.0.as_mut().as_pin_mut() {
            None => std::task::Poll::Ready(None),
            Some(delivery) => delivery.poll(cx).map(|()| {
                self.0.set(None);
                Some(())
            }),
        })
        .await
    }
}
