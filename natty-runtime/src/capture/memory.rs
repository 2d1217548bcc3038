//! A capture's memory: what its budget counts, and the bounded memory of recently stored blocks.
//!
//! # What holds
//!
//! - **Blocks count against the budget** ([`CaptureDef::max_memory`](super::CaptureDef::max_memory)):
//!   an open block as its writer's buffers and compressor state plus [`PER_MESSAGE`] for each of
//!   its messages; a sealed block, until it is stored or given up, the same, then its finished
//!   bytes instead of its writer; and the recently stored blocks, as [`REMEMBERED_PER_MESSAGE`]
//!   for each of their messages.
//! - **Near the budget, the biggest open block closes early**; at the budget the capture stops
//!   pulling, leaving messages on the server, until stores make room. Messages already asked
//!   for (at most one pull's worth) still arrive: the budget is a bound give or take one pull.
//! - **Recently stored blocks** are remembered for a bounded number of messages (an eighth of the
//!   budget), each lookup O(1).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::time::Instant;

use super::MessageId;

/// Default memory budget of one capture.
pub const DEFAULT_MAX_MEMORY: u64 = 256 << 20;

/// What a held message costs beside its payload: its reply subject (shared bytes, about 60 to
/// 100 long), its sequence, and its entry in the held set.
pub(crate) const PER_MESSAGE: u64 = 160;

/// What a recently stored message costs: its sequence in its block's list and its entry in the
/// index (key, block number, hash table slack).
pub(crate) const REMEMBERED_PER_MESSAGE: u64 = 48;

/// Bytes counted against a capture's budget, shared between its loop and its store tasks.
#[derive(Debug, Default)]
pub(crate) struct Usage {
    /// Sealed blocks not yet stored or given up.
    pub(crate) sealed: AtomicU64,
    /// Recently stored blocks (see [`Remembered`]).
    pub(crate) remembered: AtomicU64,
}

/// A sealed block's share of [`Usage::sealed`], returned when dropped: whichever way its store
/// task ends (stored, abandoned, failed, panicked), the bytes are given back.
pub(crate) struct Charge {
    usage: Arc<Usage>,
    bytes: u64,
}

impl Charge {
    /// Counts `bytes` as sealed.
    pub(crate) fn new(usage: Arc<Usage>, bytes: u64) -> Self {
        usage.sealed.fetch_add(bytes, Ordering::Relaxed);
        Charge { usage, bytes }
    }

    /// Counts `bytes` instead (the block's finished bytes replacing its writer).
    pub(crate) fn set(&mut self, bytes: u64) {
        if bytes >= self.bytes {
            self.usage.sealed.fetch_add(bytes - self.bytes, Ordering::Relaxed);
        } else {
            self.usage.sealed.fetch_sub(self.bytes - bytes, Ordering::Relaxed);
        }
        self.bytes = bytes;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.usage.sealed.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One remembered block.
struct Block {
    /// When it was stored.
    at: Instant,
    incarnation: u64,
    /// Its sequences, sorted.
    sequences: Vec<u64>,
    /// Its number in [`Remembered::index`].
    number: u64,
}

/// Stored blocks whose acks the server has not yet been seen to take, oldest first, with an
/// index from message to block so that a lookup does not scan them.
#[derive(Default)]
pub(crate) struct Remembered {
    blocks: VecDeque<Block>,
    /// Made at a lookup and kept up to date from then on, until every block remembered at the
    /// last lookup is forgotten. Only a redelivery is looked up: a capture whose messages come
    /// once (almost always) does not pay for an entry per message (two hash-table writes per
    /// captured message, in a table of up to `max_ack_pending` entries, most of them cache
    /// misses), and one that had a burst of redeliveries stops paying once it is long over.
    index: Option<HashMap<MessageId, u64, super::FastHash>>,
    /// `next` at the last lookup: the blocks numbered below it were remembered then.
    looked_up: u64,
    next: u64,
    messages: u64,
}

impl Remembered {
    /// Remembers a stored block's sorted sequences.
    pub(crate) fn push(&mut self, at: Instant, incarnation: u64, sequences: Vec<u64>) {
        let number = self.next;
        self.next += 1;
        if let Some(index) = &mut self.index {
            for sequence in &sequences {
                index.insert((incarnation, *sequence), number);
            }
        }
        self.messages += sequences.len() as u64;
        self.blocks.push_back(Block {
            at,
            incarnation,
            sequences,
            number,
        });
    }

    /// Whether a remembered block holds the message.
    pub(crate) fn contains(&mut self, id: MessageId) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        self.looked_up = self.next;
        let blocks = &self.blocks;
        self.index
            .get_or_insert_with(|| {
                // Oldest first: a message stored again in a later block maps to that block.
                let mut index = HashMap::with_capacity_and_hasher(self.messages as usize, Default::default());
                for block in blocks {
                    for sequence in &block.sequences {
                        index.insert((block.incarnation, *sequence), block.number);
                    }
                }
                index
            })
            .contains_key(&id)
    }

    /// Forgets the oldest blocks while `forget(stored at, incarnation, last sequence)` says so,
    /// and, whatever it says, while more than `max_messages` are remembered.
    pub(crate) fn forget_while(&mut self, max_messages: u64, forget: impl Fn(Instant, u64, Option<u64>) -> bool) {
        while let Some(front) = self.blocks.front() {
            let due = forget(front.at, front.incarnation, front.sequences.last().copied());
            if !due && self.messages <= max_messages {
                break;
            }
            let Some(block) = self.blocks.pop_front() else { break };
            if let Some(index) = &mut self.index {
                for sequence in &block.sequences {
                    // A message stored again in a later block keeps that block's entry.
                    let id = (block.incarnation, *sequence);
                    if index.get(&id) == Some(&block.number) {
                        index.remove(&id);
                    }
                }
            }
            self.messages -= block.sequences.len() as u64;
        }
        if self.blocks.front().is_none_or(|oldest| oldest.number >= self.looked_up) {
            self.index = None;
        }
    }

    /// The highest sequence remembered in `incarnation`.
    pub(crate) fn last_in(&self, incarnation: u64) -> u64 {
        self.blocks
            .iter()
            .filter(|block| block.incarnation == incarnation)
            .filter_map(|block| block.sequences.last().copied())
            .max()
            .unwrap_or(0)
    }

    /// Messages remembered.
    pub(crate) fn messages(&self) -> u64 {
        self.messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_blocks_are_found_and_bounded() {
        let mut remembered = Remembered::default();
        let now = Instant::now();
        for block in 0..100u64 {
            remembered.push(now, 1, (block * 10..block * 10 + 10).collect());
        }
        assert!(remembered.contains((1, 0)));
        assert!(remembered.contains((1, 999)));
        assert!(!remembered.contains((2, 5)));
        assert!(!remembered.contains((1, 1000)));
        // Nothing is due, but only 500 messages may stay: the oldest go.
        remembered.forget_while(500, |_, _, _| false);
        assert_eq!(remembered.messages(), 500);
        assert!(!remembered.contains((1, 499)));
        assert!(remembered.contains((1, 500)));
        assert_eq!(remembered.index.as_ref().map(HashMap::len), Some(500));
        // Due blocks go, in order.
        remembered.forget_while(u64::MAX, |_, _, last| last.is_some_and(|last| last < 700));
        assert!(!remembered.contains((1, 699)));
        assert!(remembered.contains((1, 700)));
        assert_eq!(remembered.last_in(1), 999);
    }

    #[test]
    fn a_message_stored_twice_stays_known_until_its_last_block_goes() {
        let mut remembered = Remembered::default();
        let now = Instant::now();
        remembered.push(now, 1, vec![1, 2]);
        remembered.push(now, 1, vec![2, 3]);
        remembered.forget_while(2, |_, _, _| false);
        assert!(!remembered.contains((1, 1)));
        assert!(remembered.contains((1, 2)));
        // The same with the index made before the blocks came, and kept up to date since.
        let mut remembered = Remembered::default();
        remembered.push(now, 1, vec![0]);
        assert!(!remembered.contains((1, 1)));
        remembered.push(now, 1, vec![1, 2]);
        remembered.push(now, 1, vec![2, 3]);
        remembered.forget_while(3, |_, _, _| false);
        assert!(!remembered.contains((1, 0)));
        assert!(!remembered.contains((1, 1)));
        assert!(remembered.contains((1, 2)));
        // Once the blocks remembered at the last lookup are gone, so is the index; a later
        // lookup makes it again.
        remembered.push(now, 1, vec![4]);
        remembered.forget_while(u64::MAX, |_, _, _| false);
        assert!(remembered.index.is_some(), "block [2, 3] was there at the last lookup");
        remembered.forget_while(1, |_, _, _| false);
        assert!(remembered.index.is_none(), "block [2, 3] is gone");
        assert!(remembered.contains((1, 4)));
        assert!(!remembered.contains((1, 2)));
    }

    #[test]
    fn a_charge_is_given_back_when_dropped() {
        let usage = Arc::new(Usage::default());
        {
            let mut charge = Charge::new(usage.clone(), 1000);
            assert_eq!(usage.sealed.load(Ordering::Relaxed), 1000);
            charge.set(300);
            assert_eq!(usage.sealed.load(Ordering::Relaxed), 300);
            let _other = Charge::new(usage.clone(), 50);
            assert_eq!(usage.sealed.load(Ordering::Relaxed), 350);
        }
        assert_eq!(usage.sealed.load(Ordering::Relaxed), 0);
    }
}
