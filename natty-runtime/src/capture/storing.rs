//! Storing a closed block (manifest first, then the block, then the acks), with retries.

use super::*;

/// Publishes `body` to each reply from a task of its own.
pub(super) fn settle_all(nats: &async_nats::Client, replies: Vec<Subject>, body: &'static [u8]) {
    let nats = nats.clone();
    tokio::spawn(async move {
        for reply in replies {
            let _ = nats.publish(reply, Bytes::from_static(body)).await;
        }
    });
}

/// Stores one block: waits for a store slot, serializes the block, writes it (retrying with
/// backoff and keeping its messages alive while it fails), then acks its messages.
pub(super) async fn store_block(
    shared: Arc<Shared>,
    block: OpenBlock,
    charge: Charge,
    extension: &'static str,
) -> std::result::Result<(), Error> {
    let span = tracing::info_span!(
        "natty.capture.block",
        capture = shared.def.name,
        stream = shared.def.stream,
        messages = block.replies.len(),
        first = block.sequences.iter().copied().min().unwrap_or_default(),
        last = block.sequences.iter().copied().max().unwrap_or_default(),
        bytes = tracing::field::Empty,
        path = tracing::field::Empty,
        attempts = tracing::field::Empty,
    );
    // Its messages are kept alive by the capture's one keep-alive task until this ends, however
    // it ends.
    let id = block.id;
    let pings = shared.pings.clone();
    let _forget = Forget(&pings, id);
    store_block_in_span(shared, block, charge, extension)
        .instrument(span)
        .await
}

/// Stops keeping a block's messages alive when dropped.
pub(super) struct Forget<'a>(pub(super) &'a KeepAlive, keep_alive::Holder);
impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.forget(self.1);
    }
}

pub(super) async fn store_block_in_span(
    shared: Arc<Shared>,
    block: OpenBlock,
    mut charge: Charge,
    extension: &'static str,
) -> std::result::Result<(), Error> {
    let def = shared.def;
    let count = block.replies.len() as u64;
    let OpenBlock {
        id,
        incarnation,
        folder,
        writer,
        replies,
        sequences,
        touched,
        ..
    } = block;
    let replies: Arc<[Subject]> = replies.into();
    // The messages were last kept alive (or delivered) at `touched`, not when the block was
    // sealed: counted from the seal, a block sealed just before its keep-alive was due would go
    // a whole ack_wait without one, and the server would redeliver its messages.
    shared.pings.hold(id, touched, replies.clone());
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    // Sealed blocks hold at least one message (see `Capture::seal`).
    let first = sorted.first().copied().unwrap_or_default();
    let last = sorted.last().copied().unwrap_or_default();
    let release = || shared.release(incarnation, &sequences);

    let permit = tokio::select! {
        permit = shared.storing.acquire() => permit.expect("the semaphore is never closed"),
        _ = shared.abandon.cancelled() => { release(); return Ok(()) }
    };
    let finished = tokio::task::spawn_blocking(move || writer.finish()).await;
    let bytes = match finished {
        Ok(Ok(bytes)) => {
            // The writer's buffers are gone; the finished bytes and the replies stay.
            charge.set(bytes.len() as u64 + PER_MESSAGE * count);
            Bytes::from(bytes)
        }
        Ok(Err(error)) => {
            release();
            return Err(def.error(format!(
                "cannot finish a {} block: {}",
                def.format,
                crate::error::chain(&error)
            )));
        }
        Err(panic) => {
            release();
            return Err(def.error(format!("finishing a block panicked: {panic}")));
        }
    };
    let file_name = store::incarnation_block_file_name(def.stream, incarnation, first, last, extension);
    let path = match shared.store.in_folder(&folder, &file_name) {
        Ok(path) => path,
        Err(error) => {
            release();
            return Err(def.error(crate::error::chain(&error).to_string()));
        }
    };
    let location = shared.store.describe(&path);
    let mut delay = STORE_RETRY_FIRST;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let started = std::time::Instant::now();
        // The manifest goes first: a block is never visible without the ledger knowing which
        // messages it holds, so that a crash before their acks does not store them twice.
        let put = async {
            shared.ledger.record(&path, incarnation, &sorted).await?;
            shared.store.put(&path, bytes.clone()).await
        };
        tokio::pin!(put);
        let outcome = tokio::select! {
            outcome = &mut put => Some(outcome),
            _ = shared.abandon.cancelled() => None,
        };
        match outcome {
            None => {
                release();
                return Ok(());
            }
            Some(Ok(())) => {
                let took = started.elapsed();
                drop(permit);
                for reply in replies.iter() {
                    Settle {
                        client: &shared.nats,
                        reply: reply.clone(),
                    }
                    .send(Bytes::from_static(b"+ACK"))
                    .await;
                }
                // A round trip after the acks: once it returns, the server has them all, which
                // narrows the window in which a crash loses some acks of a stored block.
                if let Err(error) = shared.nats.flush().await {
                    tracing::warn!(capture = def.name, error = %crate::error::chain(&error), "cannot flush the acks of a stored block");
                }
                shared.stored(incarnation, sorted.clone());
                release();
                let stats = &shared.stats;
                stats.blocks.fetch_add(1, Ordering::Relaxed);
                stats.messages.fetch_add(count, Ordering::Relaxed);
                stats.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                stats.store_micros.fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                let metrics = &shared.metrics;
                metrics.blocks.inc();
                metrics.messages.inc_by(count);
                metrics.bytes.inc_by(bytes.len() as u64);
                metrics.store_seconds.observe(took);
                if let Ok(mut last) = metrics.last_block.lock() {
                    *last = Some(crate::telemetry::metrics::StoredBlock {
                        path: location.to_string(),
                        bytes: bytes.len() as u64,
                        at: std::time::SystemTime::now(),
                    });
                }
                let span = tracing::Span::current();
                span.record("bytes", bytes.len());
                span.record("path", tracing::field::display(&location));
                span.record("attempts", attempts);
                tracing::info!(
                    capture = def.name, block = %location, messages = count, bytes = bytes.len(), first, last,
                    took_ms = took.as_millis() as u64, attempts, "block stored"
                );
                return Ok(());
            }
            Some(Err(error)) => {
                shared.stats.store_failures.fetch_add(1, Ordering::Relaxed);
                shared.metrics.store_failures.inc();
                tracing::warn!(
                    capture = def.name, block = %location, messages = count, attempts, retry_in = ?delay, error = %crate::error::chain(&error),
                    "cannot store a block; retrying, its messages stay unacked"
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shared.abandon.cancelled() => { release(); return Ok(()) }
                }
                delay = (delay * 2).min(STORE_RETRY_MAX);
            }
        }
    }
}
