//! Dead letters as an operator handles them: listed with why and where from, replayed to the
//! subject they were first published to, or deleted. What `--dead-letters list|replay|delete`
//! runs, and what a console would.
//!
//! Dead letters are read from the stream natty provisions for the default dead-letter subjects
//! ([`DEAD_LETTER_STREAM`]); a consumer with a `dead_letter` subject of its own sends them
//! wherever that subject is stored, which this does not look into.

use std::fmt::Write as _;

use async_nats::jetstream::{self, stream::RawMessageErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;

use crate::consumer::DEAD_LETTER_STREAM;
use crate::error::{Error, Result};

/// The headers natty adds to a dead letter (and a replay leaves out).
const REASON: &str = "Natty-Dead-Letter-Reason";
const ORIGINAL_SUBJECT: &str = "Natty-Original-Subject";
const ORIGINAL_STREAM: &str = "Natty-Original-Stream";
const ORIGINAL_CONSUMER: &str = "Natty-Original-Consumer";
const ORIGINAL_SEQUENCE: &str = "Natty-Original-Sequence";
const DELIVERY_COUNT: &str = "Natty-Delivery-Count";

/// A message a consumer gave up on, as it was dead-lettered.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its sequence in the dead-letter stream: what replay and delete name it by.
    pub sequence: u64,
    /// The subject it was dead-lettered to.
    pub subject: String,
    /// Why natty gave up on it (`Natty-Dead-Letter-Reason`).
    pub reason: String,
    /// The subject it was first published to.
    pub original_subject: String,
    /// The stream it came from.
    pub original_stream: String,
    /// The durable consumer that gave up on it.
    pub consumer: String,
    /// Its sequence in the stream it came from.
    pub original_sequence: u64,
    /// How many times it was delivered.
    pub delivery_count: u64,
    /// Every header: the original's and natty's.
    pub headers: HeaderMap,
    /// The original payload.
    pub payload: Bytes,
    /// When it was dead-lettered (stored in the dead-letter stream).
    pub time: Option<std::time::SystemTime>,
}

impl DeadLetter {
    pub(crate) fn from_parts(sequence: u64, subject: String, headers: HeaderMap, payload: Bytes) -> DeadLetter {
        let text = |name: &str| {
            headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .unwrap_or_default()
        };
        let number = |name: &str| text(name).parse().unwrap_or_default();
        DeadLetter {
            sequence,
            subject,
            reason: text(REASON),
            original_subject: text(ORIGINAL_SUBJECT),
            original_stream: text(ORIGINAL_STREAM),
            consumer: text(ORIGINAL_CONSUMER),
            original_sequence: number(ORIGINAL_SEQUENCE),
            delivery_count: number(DELIVERY_COUNT),
            headers,
            payload,
            time: None,
        }
    }

    /// The first bytes of the payload as text, for a listing (invalid UTF-8 replaced, control
    /// characters as spaces).
    pub fn preview(&self, chars: usize) -> String {
        let text = String::from_utf8_lossy(&self.payload[..self.payload.len().min(chars * 4)]);
        let mut preview: String = text
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(chars)
            .collect();
        if text.chars().count() > chars || self.payload.len() > chars * 4 {
            preview.push('…');
        }
        preview
    }
}

/// Which dead letters an operation takes. Every field left `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Filter {
    /// Only those the durable consumer with this name gave up on.
    pub consumer: Option<String>,
    /// Only those first published to a subject matching this pattern (`*` and `>` wildcards).
    pub subject: Option<String>,
    /// Only those whose reason contains this text.
    pub reason: Option<String>,
    /// Only the one at this sequence of the dead-letter stream.
    pub sequence: Option<u64>,
}

impl Filter {
    /// Whether it selects anything less than every dead letter.
    pub fn is_narrowed(&self) -> bool {
        self.consumer.is_some() || self.subject.is_some() || self.reason.is_some() || self.sequence.is_some()
    }

    /// Whether `letter` is selected.
    pub fn matches(&self, letter: &DeadLetter) -> bool {
        self.consumer.as_ref().is_none_or(|c| *c == letter.consumer)
            && self
                .subject
                .as_ref()
                .is_none_or(|pattern| subject_matches(pattern, &letter.original_subject))
            && self
                .reason
                .as_ref()
                .is_none_or(|text| letter.reason.contains(text.as_str()))
            && self.sequence.is_none_or(|sequence| sequence == letter.sequence)
    }
}

/// Whether `subject` matches the NATS subject `pattern` (`*`: one token, `>`: the rest).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in pattern.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (part, Some(token)) if part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

fn failed(action: &'static str) -> impl Fn(Box<dyn std::error::Error + Send + Sync>) -> Error {
    move |source| Error::Stream {
        stream: DEAD_LETTER_STREAM.into(),
        action,
        source,
    }
}

/// The dead letters `filter` selects, oldest first. No dead-letter stream means none.
///
/// # Errors
///
/// [`Error::Stream`] when the stream cannot be read.
pub async fn list(js: &jetstream::Context, filter: &Filter) -> Result<Vec<DeadLetter>> {
    let mut letters = Vec::new();
    let mut scan = Scan::start(js, filter).await?;
    while let Some(letter) = scan.next(filter).await? {
        letters.push(letter);
    }
    Ok(letters)
}

/// What [`newest`] found.
#[derive(Clone, Debug, Default)]
pub(crate) struct Newest {
    /// Newest first.
    pub(crate) letters: Vec<DeadLetter>,
    /// How many the filter selects: exact when `more` is false, else at least this many.
    pub(crate) total: u64,
    pub(crate) more: bool,
}

/// The last [`newest`] answer, reused while the stream and the filter are the same (a console
/// asks every few seconds, and dead letters change rarely).
#[derive(Default)]
pub(crate) struct NewestCache(std::sync::Mutex<Option<(NewestKey, Newest)>>);

/// What a [`newest`] answer was for: the stream's first and last sequence and message count,
/// the filter, the limit.
type NewestKey = (u64, u64, u64, Filter, usize);

/// The newest `limit` dead letters `filter` selects, newest first, looking at no more than the
/// last `scan` messages of the stream: a console refreshing every few seconds must not read a
/// stream of a million dead letters each time. An unchanged stream is not read again.
///
/// # Errors
///
/// [`Error::Stream`] when the stream cannot be read.
pub(crate) async fn newest(
    js: &jetstream::Context,
    filter: &Filter,
    limit: usize,
    scan: u64,
    cache: &NewestCache,
) -> Result<Newest> {
    let Some((stream, state)) = open(js).await? else {
        return Ok(Newest::default());
    };
    let key = (
        state.first_sequence,
        state.last_sequence,
        state.messages,
        filter.clone(),
        limit,
    );
    if let Some((_, known)) = cache.0.lock().ok().and_then(|c| c.clone()).filter(|(k, _)| *k == key) {
        return Ok(known);
    }
    let oldest = state
        .first_sequence
        .max(state.last_sequence.saturating_sub(scan.saturating_sub(1)));
    let mut found = Newest::default();
    let mut sequence = state.last_sequence;
    while sequence >= oldest && sequence > 0 {
        if found.letters.len() >= limit {
            found.more = true;
            break;
        }
        if let Some(letter) = read(&stream, sequence).await? {
            if filter.matches(&letter) {
                found.letters.push(letter);
            }
        }
        sequence -= 1;
    }
    found.more |= oldest > state.first_sequence;
    found.total = if filter.is_narrowed() {
        found.letters.len() as u64
    } else {
        // Every message of the stream is a dead letter: the count is the stream's.
        found.more = false;
        state.messages
    };
    if let Ok(mut cached) = cache.0.lock() {
        *cached = Some((key, found.clone()));
    }
    Ok(found)
}

/// The dead letters a filter selects, read one at a time, oldest first: an operation on many
/// holds one payload in memory at a time.
pub(crate) struct Scan {
    stream: Option<jetstream::stream::Stream>,
    next: u64,
    last: u64,
}

impl Scan {
    /// From the oldest dead letter to the newest as of now.
    pub(crate) async fn start(js: &jetstream::Context, filter: &Filter) -> Result<Scan> {
        Ok(match open(js).await? {
            Some((stream, state)) => {
                let (next, last) = match filter.sequence {
                    Some(sequence) => (sequence, sequence),
                    None => (state.first_sequence, state.last_sequence),
                };
                Scan {
                    stream: Some(stream),
                    next,
                    last,
                }
            }
            None => Scan {
                stream: None,
                next: 1,
                last: 0,
            },
        })
    }

    /// The next dead letter `filter` selects; `None` at the end.
    pub(crate) async fn next(&mut self, filter: &Filter) -> Result<Option<DeadLetter>> {
        let Some(stream) = &self.stream else {
            return Ok(None);
        };
        while self.next <= self.last {
            let sequence = self.next;
            self.next += 1;
            if let Some(letter) = read(stream, sequence).await? {
                if filter.matches(&letter) {
                    return Ok(Some(letter));
                }
            }
        }
        Ok(None)
    }
}

/// The dead-letter stream and its state; `None` when it does not exist or is empty.
async fn open(js: &jetstream::Context) -> Result<Option<(jetstream::stream::Stream, jetstream::stream::State)>> {
    let mut stream = match js.get_stream(DEAD_LETTER_STREAM).await {
        Ok(stream) => stream,
        Err(error) if crate::stream::is_stream_not_found(&error) => return Ok(None),
        Err(error) => return Err(failed("looking it up")(Box::new(error))),
    };
    let state = stream
        .info()
        .await
        .map_err(|error| failed("reading its state")(Box::new(error)))?
        .state
        .clone();
    Ok((state.messages > 0).then_some((stream, state)))
}

/// The dead letter at `sequence`; `None` for a hole (replayed, or deleted by hand).
async fn read(stream: &jetstream::stream::Stream, sequence: u64) -> Result<Option<DeadLetter>> {
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(error) if error.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
        Err(error) => return Err(failed("reading a message")(Box::new(error))),
    };
    let mut letter = DeadLetter::from_parts(sequence, message.subject.to_string(), message.headers, message.payload);
    letter.time = Some(message.time.into());
    Ok(Some(letter))
}

/// Publishes `letter` again to the subject it was first published to, with its original
/// headers (natty's dead-letter headers left out), waits for the stream's ack, then deletes it
/// from the dead-letter stream. The republished copy carries a message id derived from the
/// dead letter, so a replay retried after a lost ack is stored once.
///
/// # Errors
///
/// [`Error::Stream`] when the original subject takes nothing (no stream stores it), or the
/// dead letter cannot be deleted afterwards (then it is replayed but still listed);
/// [`Error::Config`] for a dead letter that names no original subject.
pub async fn replay(js: &jetstream::Context, letter: &DeadLetter) -> Result<()> {
    if letter.original_subject.is_empty() {
        return Err(Error::config(
            format!("dead letter {}", letter.sequence),
            "",
            "it names no original subject to replay to",
        ));
    }
    let mut headers = HeaderMap::new();
    for (name, values) in letter.headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with("Natty-") || name.eq_ignore_ascii_case(async_nats::header::NATS_MESSAGE_ID.as_ref()) {
            continue;
        }
        for value in values {
            headers.append(name, value.as_str());
        }
    }
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("natty-replay:{}:{}", letter.original_stream, letter.sequence).as_str(),
    );
    let replay_failed = |source: Box<dyn std::error::Error + Send + Sync>| Error::Stream {
        stream: letter.original_stream.clone(),
        action: "replaying a dead letter into it",
        source,
    };
    js.publish_with_headers(letter.original_subject.clone(), headers, letter.payload.clone())
        .await
        .map_err(|e| replay_failed(Box::new(e)))?
        .await
        .map_err(|e| replay_failed(Box::new(e)))?;
    delete(js, letter).await
}

/// Deletes `letter` from the dead-letter stream.
///
/// # Errors
///
/// [`Error::Stream`] when the stream refuses.
pub async fn delete(js: &jetstream::Context, letter: &DeadLetter) -> Result<()> {
    let stream = js
        .get_stream(DEAD_LETTER_STREAM)
        .await
        .map_err(|error| failed("looking it up")(Box::new(error)))?;
    stream
        .delete_message(letter.sequence)
        .await
        .map_err(|error| failed("deleting a dead letter")(Box::new(error)))?;
    Ok(())
}

/// What `--dead-letters list` prints: one line per dead letter.
pub(crate) fn table(letters: &[DeadLetter]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<8} {:<20} {:<28} {:<30} {:>9}  {:<40} PAYLOAD",
        "SEQ", "CONSUMER", "FROM (STREAM:SEQ)", "SUBJECT", "DELIVERED", "REASON"
    );
    for letter in letters {
        let from = format!("{}:{}", letter.original_stream, letter.original_sequence);
        let reason: String = letter.reason.chars().take(40).collect();
        let _ = writeln!(
            out,
            "{:<8} {:<20} {:<28} {:<30} {:>9}  {:<40} {}",
            letter.sequence,
            letter.consumer,
            from,
            letter.original_subject,
            letter.delivery_count,
            reason,
            letter.preview(40)
        );
    }
    let _ = writeln!(out, "{} dead letter(s)", letters.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns_match_as_nats_does() {
        assert!(subject_matches("orders.*", "orders.1"));
        assert!(subject_matches("orders.>", "orders.1.created"));
        assert!(!subject_matches("orders.*", "orders.1.created"));
        assert!(!subject_matches("orders.>", "orders"));
        assert!(subject_matches("orders.1", "orders.1"));
        assert!(!subject_matches("orders.2", "orders.1"));
    }

    #[test]
    fn a_preview_is_one_line_and_bounded() {
        let letter = DeadLetter::from_parts(1, "s".into(), HeaderMap::new(), Bytes::from_static(b"{\"a\":\n1}"));
        assert_eq!(letter.preview(40), "{\"a\": 1}");
        let long = DeadLetter::from_parts(1, "s".into(), HeaderMap::new(), Bytes::from(vec![b'x'; 100]));
        assert_eq!(long.preview(5), "xxxxx…");
    }
}
