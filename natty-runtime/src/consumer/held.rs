//! The messages a consumer holds, for keep-alive pings and to recognise redeliveries.

use super::*;

/// The messages a consumer holds — read from the server and not yet settled — with when each
/// was last pinged, for [`Consumer::keep_alive`] and to recognise redeliveries of them.
///
/// "When" is counted in keep-alive ticks, not read from the clock: holding a message is on
/// every delivery's path, and a clock read cost more than the rest of it.
#[derive(Default)]
pub(crate) struct Held {
    messages: std::sync::Mutex<HashMap<u64, HeldMessage, SequenceHash>>,
    /// Keep-alive ticks so far.
    tick: AtomicU64,
}

/// Hashes stream sequences for [`Held`]: they are unique integers chosen by the server, not
/// by an adversary, so one multiplication spreads them well; SipHash would cost more than the
/// rest of holding a message.
pub(super) type SequenceHash = std::hash::BuildHasherDefault<SequenceHasher>;

#[derive(Default)]
pub(crate) struct SequenceHasher(u64);

impl std::hash::Hasher for SequenceHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(super) struct HeldMessage {
    reply: Subject,
    /// The tick it was held or last pinged in.
    pinged: u64,
}

impl Held {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, HeldMessage, SequenceHash>> {
        self.messages.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds the message at `sequence`; false when it is held already.
    pub(super) fn hold(&self, sequence: u64, reply: &Subject) -> bool {
        let tick = self.tick.load(Ordering::Relaxed);
        match self.lock().entry(sequence) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(HeldMessage {
                    reply: reply.clone(),
                    pinged: tick,
                });
                true
            }
        }
    }

    pub(super) fn release(&self, sequence: u64) {
        self.lock().remove(&sequence);
    }

    pub(super) fn contains(&self, sequence: u64) -> bool {
        self.lock().contains_key(&sequence)
    }

    /// Starts the next tick and returns the reply subjects of messages last pinged (or held)
    /// before the tick that just ended — at least one whole tick ago —, marked pinged now.
    pub(super) fn tick(&self) -> Vec<Subject> {
        let now = self.tick.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock()
            .values_mut()
            .filter(|held| held.pinged + 2 <= now)
            .map(|held| {
                held.pinged = now;
                held.reply.clone()
            })
            .collect()
    }

    /// The sequences held, in order.
    pub(super) fn sequences(&self) -> Vec<u64> {
        let mut sequences: Vec<u64> = self.lock().keys().copied().collect();
        sequences.sort_unstable();
        sequences
    }
}
