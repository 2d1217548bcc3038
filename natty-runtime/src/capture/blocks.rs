//! The open blocks of a capture, by stream incarnation, key and window: when each closes.

use super::*;

/// A split key, as (field, value) pairs: a plain key is one pair named `key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) struct BlockKey(pub(super) Vec<(String, String)>);
impl BlockKey {
    pub(super) fn of<K: serde::Serialize + ?Sized>(key: &K) -> std::result::Result<BlockKey, BoxError> {
        use serde_json::Value;
        let scalar = |value: Value| match value {
            Value::String(text) => Some(text),
            Value::Number(number) => Some(number.to_string()),
            Value::Bool(flag) => Some(flag.to_string()),
            Value::Null => Some(String::new()),
            Value::Array(_) | Value::Object(_) => None,
        };
        match serde_json::to_value(key)? {
            Value::Object(fields) => fields
                .into_iter()
                .map(|(name, value)| match scalar(value) {
                    Some(text) => Ok((name, text)),
                    None => Err(format!("key field `{name}` is not a string, number or bool").into()),
                })
                .collect::<std::result::Result<Vec<_>, BoxError>>()
                .map(BlockKey),
            value => scalar(value)
                .map(|text| BlockKey(vec![("key".into(), text)]))
                .ok_or_else(|| "a capture key must be a string, a number, a bool or a struct of those".into()),
        }
    }
}

/// The open blocks of one capture, by stream incarnation, key and window.
pub(super) struct Blocks {
    pub(super) open: HashMap<(u64, BlockKey, u64), OpenBlock, FastHash>,
    /// The latest window any message came from, in nanoseconds since the epoch.
    pub(super) watermark: u64,
    /// Window length in nanoseconds.
    pub(super) every: u64,
    /// What the open blocks hold, in bytes (the sum of their `memory`).
    pub(super) memory: u64,
    /// The number of the next block opened (its keep-alive holder).
    pub(super) next_id: u64,
}

/// A block being filled.
pub(super) struct OpenBlock {
    /// Its number, unique within the capture.
    pub(super) id: u64,
    /// About what it holds, in bytes: its writer's buffers and [`PER_MESSAGE`] a message.
    pub(super) memory: u64,
    /// The stream incarnation its messages come from.
    pub(super) incarnation: u64,
    /// Where it goes: the path template rendered for its key and window.
    pub(super) folder: object_store::path::Path,
    pub(super) writer: Box<dyn BlockWriter>,
    pub(super) replies: Vec<Subject>,
    /// The stream sequence of each reply.
    pub(super) sequences: Vec<u64>,
    pub(super) bytes: u64,
    /// When its messages were last kept alive (or the first arrived).
    pub(super) touched: Instant,
}

/// A message that cannot go into a block: its reply, the message, and why.
pub(super) type Refused = (Subject, Original, String);
impl Blocks {
    /// Writes a message (held already) into its block; returns the blocks that this closes:
    /// its own when full, and older windows' once a message from a later window arrives.
    pub(super) fn add(
        &mut self,
        arrival: Arrival,
        writers: &WriterFactory,
        shared: &Shared,
    ) -> std::result::Result<Vec<OpenBlock>, Box<Refused>> {
        let def = &shared.def;
        let Arrival {
            captured,
            original,
            reply,
            timestamp,
            incarnation,
            ..
        } = arrival;
        let window = timestamp - timestamp % self.every;
        let Captured { record, key } = captured;
        let slot = (incarnation, key, window);
        let block = match self.open.get_mut(&slot) {
            Some(block) => block,
            None => {
                // Rendered when the block opens, so that a key the template cannot take is this
                // message's failure, not a failed store of the whole block later.
                let vars = PathVars {
                    stream: def.stream,
                    durable: def.durable,
                    key: &slot.1 .0,
                    window_start: window / 1_000_000_000,
                };
                let folder = match shared.store.block_folder(&vars) {
                    Ok(folder) => folder,
                    Err(error) => {
                        shared.release(incarnation, &[original.stream_sequence]);
                        let reason = format!(
                            "its key cannot fill the store's path template: {}",
                            crate::error::chain(&error)
                        );
                        return Err(Box::new((reply, original, reason)));
                    }
                };
                self.next_id += 1;
                let block = OpenBlock {
                    id: self.next_id,
                    memory: 0,
                    incarnation,
                    folder,
                    writer: writers(),
                    replies: Vec::new(),
                    sequences: Vec::new(),
                    bytes: 0,
                    touched: Instant::now(),
                };
                self.open.entry(slot.clone()).or_insert(block)
            }
        };
        if let Err(error) = block.writer.append(&*record, &original.payload) {
            shared.release(incarnation, &[original.stream_sequence]);
            if def.format == BlockFormat::Parquet {
                // A Parquet writer cannot take back a half-written row: it refuses anything
                // more. Its messages go back to the server, to be written into a fresh block.
                if let Some(broken) = self.remove(&slot) {
                    shared.release(incarnation, &broken.sequences);
                    settle_all(&shared.nats, broken.replies, b"-NAK");
                }
            }
            return Err(Box::new((
                reply,
                original,
                format!(
                    "cannot write the record as {}: {}",
                    def.format,
                    crate::error::chain(&error)
                ),
            )));
        }
        block.replies.push(reply);
        block.sequences.push(original.stream_sequence);
        block.bytes += original.payload.len() as u64;
        let memory = block.writer.memory().map_or(block.bytes, |bytes| bytes as u64)
            + PER_MESSAGE * block.replies.len() as u64
            + (block.replies.capacity() * std::mem::size_of::<Subject>()) as u64;
        self.memory = self.memory - block.memory + memory;
        block.memory = memory;
        let full = block.replies.len() as u64 >= def.max_messages || block.bytes >= def.max_bytes;
        let mut closed = Vec::new();
        if full {
            closed.extend(self.remove(&slot));
        }
        if window > self.watermark {
            self.watermark = window;
            let older: Vec<_> = self.open.keys().filter(|(_, _, w)| *w < window).cloned().collect();
            closed.extend(older.iter().filter_map(|slot| self.remove(slot)));
        }
        Ok(closed)
    }

    /// Blocks whose window ended more than `grace` ago, and either a later window has begun
    /// or the consumer has nothing more to deliver (`quiet`).
    pub(super) fn due(&mut self, now: u64, grace: Duration, quiet: bool) -> Vec<OpenBlock> {
        let grace = grace.as_nanos() as u64;
        let due: Vec<_> = self
            .open
            .keys()
            .filter(|(_, _, window)| {
                let ended = now >= window + self.every + grace;
                ended && (quiet || *window < self.watermark)
            })
            .cloned()
            .collect();
        due.iter().filter_map(|slot| self.remove(slot)).collect()
    }

    /// Takes a block out of the open ones.
    pub(super) fn remove(&mut self, slot: &(u64, BlockKey, u64)) -> Option<OpenBlock> {
        let block = self.open.remove(slot)?;
        self.memory -= block.memory;
        Some(block)
    }

    /// Takes every open block out (on shutdown).
    pub(super) fn drain(&mut self) -> Vec<OpenBlock> {
        self.memory = 0;
        self.open.drain().map(|(_, block)| block).collect()
    }

    /// The block holding the most messages.
    pub(super) fn biggest(&mut self) -> Option<OpenBlock> {
        let slot = self
            .open
            .iter()
            .max_by_key(|(_, block)| block.replies.len())
            .map(|(slot, _)| slot.clone())?;
        self.remove(&slot)
    }

    /// The block holding the most memory.
    pub(super) fn biggest_in_memory(&mut self) -> Option<OpenBlock> {
        let slot = self
            .open
            .iter()
            .max_by_key(|(_, block)| block.memory)
            .map(|(slot, _)| slot.clone())?;
        self.remove(&slot)
    }

    /// Asks for in-progress acks for the messages of blocks not touched for a keep-alive period.
    pub(super) fn keep_alive(&mut self, shared: &Shared) {
        for block in self.open.values_mut() {
            if block.touched.elapsed() >= shared.keep_alive {
                block.touched = Instant::now();
                shared.pings.ask(block.id, block.replies.clone());
            }
        }
    }
}
