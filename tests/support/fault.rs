//! The fault suite's checker, after Jepsen's: a [`Publisher`] records the outcome of every
//! publish, a [`History`] holds those outcomes with what the consumers and the stream hold,
//! and [`History::classify`] sorts every value into ok, lost and unknown, counting duplicates.
//!
//! A value is published once, with the idempotency key `fault-<value>`, and is read back from
//! the lines the consumers append (one value per line) and from the stream itself.
//!
//! | publish outcome | read | class |
//! | --- | --- | --- |
//! | acked | yes | ok |
//! | acked | no | **lost** |
//! | unconfirmed (timeout) | yes / no | unknown: recovered / not read |
//! | refused (natty: "nothing was stored") | no | failed |
//! | refused | yes, or in the stream | **refused but read**: natty's error said nothing was stored |
//!
//! A value read more than once is a duplicate, which an at-least-once consumer may show; in the
//! stream, where publishes carry a message id, a second copy is an error.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use natty_runtime::{Client, Publish, PublishError};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use crate::Job;

/// How many values an anomaly list quotes in a report or a failure message.
const QUOTED: usize = 20;

/// What a publish of one value came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The stream acked it; `duplicate` when the ack said it already held the message id
    /// (a retry of a publish whose first ack was lost).
    Acked {
        /// The ack's `duplicate` flag.
        duplicate: bool,
    },
    /// No ack came, even after natty's retries ([`PublishError::Unconfirmed`]): it may be stored.
    Unknown(String),
    /// natty reported an error that means nothing was stored (any other [`PublishError`]).
    Refused(String),
}

impl Outcome {
    fn of(result: Result<natty_runtime::PublishAck, PublishError>) -> Outcome {
        match result {
            Ok(ack) => Outcome::Acked {
                duplicate: ack.duplicate,
            },
            Err(error @ PublishError::Unconfirmed { .. }) => Outcome::Unknown(error.to_string()),
            Err(error) => Outcome::Refused(error.to_string()),
        }
    }

    fn is_acked(&self) -> bool {
        matches!(self, Outcome::Acked { .. })
    }
}

/// How many times each value was seen.
pub type Counts = BTreeMap<u64, usize>;

/// Every value published, its outcome, and what was read back.
#[derive(Debug, Default, Clone)]
pub struct History {
    published: BTreeMap<u64, Outcome>,
    reads: Counts,
    stored: Option<Counts>,
}

impl History {
    /// An empty history.
    pub fn new() -> History {
        History::default()
    }

    /// Records the outcome of publishing `value`.
    ///
    /// # Panics
    ///
    /// If `value` was recorded before: each value is published once.
    pub fn record(&mut self, value: u64, outcome: Outcome) {
        let earlier = self.published.insert(value, outcome);
        assert!(earlier.is_none(), "value {value} recorded twice");
    }

    /// The outcome recorded for `value`.
    pub fn outcome(&self, value: u64) -> Option<&Outcome> {
        self.published.get(&value)
    }

    /// How many values were published, whatever the outcome.
    pub fn attempted(&self) -> usize {
        self.published.len()
    }

    /// The values the stream acked, in order.
    pub fn acked(&self) -> impl Iterator<Item = u64> + '_ {
        self.published
            .iter()
            .filter(|(_, outcome)| outcome.is_acked())
            .map(|(value, _)| *value)
    }

    /// The acked values missing from `reads`: what a consumer has yet to read.
    pub fn acked_unread(&self, reads: &Counts) -> Vec<u64> {
        self.acked().filter(|value| !reads.contains_key(value)).collect()
    }

    /// Replaces the consumers' reads.
    pub fn set_reads(&mut self, reads: Counts) {
        self.reads = reads;
    }

    /// Replaces the consumers' reads with the values in the files at `paths` (see [`read_lines`]).
    pub fn load_reads<P: AsRef<Path>>(&mut self, paths: &[P]) {
        self.reads = read_lines(paths);
    }

    /// Sets what the stream holds, value by value (see [`read_stream`]).
    pub fn set_stored(&mut self, stored: Counts) {
        self.stored = Some(stored);
    }

    /// Sorts every value into its class and counts duplicates.
    pub fn classify(&self) -> Report {
        let mut report = Report {
            attempted: self.published.len(),
            ..Report::default()
        };
        for (value, outcome) in &self.published {
            let read = self.reads.get(value).copied().unwrap_or(0);
            match (outcome, read > 0) {
                (Outcome::Acked { duplicate }, true) => {
                    report.ok += 1;
                    report.acked_as_duplicate += usize::from(*duplicate);
                }
                (Outcome::Acked { .. }, false) => report.lost.push(*value),
                (Outcome::Unknown(_), true) => report.unknown_read += 1,
                (Outcome::Unknown(_), false) => report.unknown_unread += 1,
                (Outcome::Refused(_), _) if read > 0 || self.stored.as_ref().is_some_and(|s| s.contains_key(value)) => {
                    report.refused_read.push(*value)
                }
                (Outcome::Refused(_), _) => report.failed += 1,
            }
            if read > 1 {
                report.duplicates += 1;
                report.extra_reads += read - 1;
            }
        }
        report.unexpected = self
            .reads
            .keys()
            .filter(|value| !self.published.contains_key(value))
            .copied()
            .collect();
        if let Some(stored) = &self.stored {
            report.stream_checked = true;
            report.stream_duplicates = stored.iter().filter(|(_, n)| **n > 1).map(|(v, _)| *v).collect();
            report.stream_missing = self.acked().filter(|value| !stored.contains_key(value)).collect();
            report.unexpected.extend(
                stored
                    .keys()
                    .filter(|value| !self.published.contains_key(value))
                    .copied(),
            );
            report.unexpected.sort_unstable();
            report.unexpected.dedup();
        }
        for outcome in self.published.values() {
            match outcome {
                Outcome::Unknown(error) => *report.errors.entry(format!("unknown: {error}")).or_default() += 1,
                Outcome::Refused(error) => *report.errors.entry(format!("refused: {error}")).or_default() += 1,
                Outcome::Acked { .. } => {}
            }
        }
        report
    }

    /// Checks captured records against the publish outcomes: every acked value exactly once,
    /// an unknown one at most once, nothing else.
    pub fn check_exactly_once(&self, captured: &Counts) -> CaptureReport {
        let mut report = CaptureReport::default();
        for (value, outcome) in &self.published {
            let count = captured.get(value).copied().unwrap_or(0);
            match outcome {
                Outcome::Acked { .. } if count == 0 => report.missing.push(*value),
                Outcome::Acked { .. } => report.once += usize::from(count == 1),
                Outcome::Unknown(_) | Outcome::Refused(_) => report.unknown_captured += usize::from(count > 0),
            }
            if count > 1 {
                report.repeated.push((*value, count));
            }
        }
        report.unexpected = captured
            .keys()
            .filter(|value| !self.published.contains_key(value))
            .copied()
            .collect();
        report
    }
}

/// How a [`History`] classifies: counts of each class and the values behind every anomaly.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Values published, whatever the outcome.
    pub attempted: usize,
    /// Acked and read.
    pub ok: usize,
    /// Acked and never read: what the suite exists to catch.
    pub lost: Vec<u64>,
    /// Outcome unknown, and read: the value made it after all.
    pub unknown_read: usize,
    /// Outcome unknown, and not read: it was most likely never stored.
    pub unknown_unread: usize,
    /// Refused (natty said nothing was stored) and indeed not read.
    pub failed: usize,
    /// Refused, yet read or found in the stream: natty's error said nothing was stored, and
    /// something was.
    pub refused_read: Vec<u64>,
    /// Values read more than once (at-least-once allows it).
    pub duplicates: usize,
    /// Reads beyond the first, over all values.
    pub extra_reads: usize,
    /// Acked values whose ack said `duplicate`: a retried publish, deduplicated by the stream.
    pub acked_as_duplicate: usize,
    /// Whether the stream's content was read (the three fields below are empty otherwise).
    pub stream_checked: bool,
    /// Values the stream holds more than once, in spite of their message id.
    pub stream_duplicates: Vec<u64>,
    /// Acked values the stream does not hold.
    pub stream_missing: Vec<u64>,
    /// Values read or stored that were never published.
    pub unexpected: Vec<u64>,
    /// Each publish error (prefixed "unknown: " or "refused: "), with how many values got it.
    pub errors: BTreeMap<String, usize>,
}

impl Report {
    /// Panics, listing the values at fault, if any acked value was lost or missing from the
    /// stream, the stream holds a value twice, a refused value was read, or an unknown value
    /// turned up.
    pub fn assert_safe(&self) {
        let mut problems = Vec::new();
        let mut list = |what: &str, values: &[u64]| {
            if !values.is_empty() {
                problems.push(format!(
                    "{} {what}: {:?}{}",
                    values.len(),
                    &values[..values.len().min(QUOTED)],
                    if values.len() > QUOTED { " ..." } else { "" }
                ));
            }
        };
        list("lost (acked, never read)", &self.lost);
        list("missing from the stream though acked", &self.stream_missing);
        list("stored twice in the stream", &self.stream_duplicates);
        list(
            "read or stored though natty said nothing was stored",
            &self.refused_read,
        );
        list("read or stored but never published", &self.unexpected);
        assert!(problems.is_empty(), "unsafe: {}\n{self}", problems.join("; "));
        assert!(self.stream_checked, "the stream's content was not checked\n{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempted={} ok={} lost={} unknown_read={} unknown_unread={} failed={} refused_read={} \
             duplicates={} (extra reads {}) acked_as_duplicate={}",
            self.attempted,
            self.ok,
            self.lost.len(),
            self.unknown_read,
            self.unknown_unread,
            self.failed,
            self.refused_read.len(),
            self.duplicates,
            self.extra_reads,
            self.acked_as_duplicate,
        )?;
        if self.stream_checked {
            write!(
                f,
                " stream_duplicates={} stream_missing={}",
                self.stream_duplicates.len(),
                self.stream_missing.len()
            )?;
        } else {
            write!(f, " stream_duplicates=? stream_missing=? (stream not read)")?;
        }
        write!(f, " unexpected={}", self.unexpected.len())?;
        for (error, count) in &self.errors {
            write!(f, "\n  {count} x {error}")?;
        }
        Ok(())
    }
}

/// How captured records compare with the publish outcomes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CaptureReport {
    /// Acked values captured exactly once.
    pub once: usize,
    /// Acked values not captured.
    pub missing: Vec<u64>,
    /// Values captured more than once, with their count.
    pub repeated: Vec<(u64, usize)>,
    /// Values of unknown or refused publishes that were captured (once or more).
    pub unknown_captured: usize,
    /// Captured values that were never published.
    pub unexpected: Vec<u64>,
}

impl CaptureReport {
    /// Panics unless every acked value was captured exactly once and nothing else twice.
    pub fn assert_exactly_once(&self) {
        assert!(
            self.missing.is_empty() && self.repeated.is_empty() && self.unexpected.is_empty(),
            "capture not exactly once: missing {:?}, repeated (value, times) {:?}, unexpected {:?}\n{self}",
            &self.missing[..self.missing.len().min(QUOTED)],
            &self.repeated[..self.repeated.len().min(QUOTED)],
            &self.unexpected[..self.unexpected.len().min(QUOTED)],
        );
    }
}

impl fmt::Display for CaptureReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "captured once={} missing={} repeated={} unknown_captured={} unexpected={}",
            self.once,
            self.missing.len(),
            self.repeated.len(),
            self.unknown_captured,
            self.unexpected.len()
        )
    }
}

/// Counts the values in the files at `paths`, one decimal value per line; a missing file
/// counts as empty.
///
/// # Panics
///
/// On a line that is not a value: each line is written whole by one `write`, so a torn line
/// means the consumer's output cannot be trusted.
pub fn read_lines<P: AsRef<Path>>(paths: &[P]) -> Counts {
    let mut counts = Counts::new();
    for path in paths {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            let value = line
                .trim()
                .parse()
                .unwrap_or_else(|_| panic!("{}: not a value: {line:?}", path.display()));
            *counts.entry(value).or_default() += 1;
        }
    }
    counts
}

/// Counts the values in stream `stream`, read from its first message to its last with an
/// ephemeral consumer, each payload a [`Job`].
///
/// # Panics
///
/// When the stream cannot be read whole within `timeout`, or holds a payload that is not a job.
pub async fn read_stream(js: &async_nats::jetstream::Context, stream: &str, timeout: Duration) -> Counts {
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let read = async {
        let mut handle = js.get_stream(stream).await.expect("the stream");
        let expected = handle.info().await.expect("stream info").state.messages;
        let consumer = handle
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                // Replicated on one node only: nothing to elect while reading.
                num_replicas: 1,
                memory_storage: true,
                ..Default::default()
            })
            .await
            .expect("an ephemeral consumer");
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(1000)
            .messages()
            .await
            .expect("pull messages");
        let mut counts = Counts::new();
        for _ in 0..expected {
            let message = messages.next().await.expect("a message").expect("a message");
            let job: Job = serde_json::from_slice(&message.payload).expect("a job payload");
            *counts.entry(job.id).or_default() += 1;
        }
        counts
    };
    tokio::time::timeout(timeout, read)
        .await
        .unwrap_or_else(|_| panic!("stream `{stream}` not read within {timeout:?}"))
}

/// Publishes values 1, 2, 3... as [`Job`]s to one subject through natty's client, each with
/// the message id `fault-<value>`, at a steady pace with several publishes in flight, and
/// records every outcome in a [`History`] handed back by [`Publisher::stop`].
#[derive(Debug)]
pub struct Publisher {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<History>,
    acked: Arc<AtomicU64>,
    settled: Arc<AtomicU64>,
}

impl Publisher {
    /// Starts publishing to `subject`: one value every `1 / rate` seconds, up to `in_flight`
    /// awaiting their acks (a stall pauses the pace rather than piling up publishes).
    pub fn start(client: Client, subject: impl Into<String>, rate: u32, in_flight: usize) -> Publisher {
        let subject: Arc<str> = subject.into().into();
        let (stop, mut stopped) = oneshot::channel::<()>();
        let acked = Arc::new(AtomicU64::new(0));
        let settled = Arc::new(AtomicU64::new(0));
        let counters = (acked.clone(), settled.clone());
        let task = tokio::spawn(async move {
            let (acked, settled) = counters;
            let mut history = History::new();
            let record = |history: &mut History, done: Result<(u64, Outcome), tokio::task::JoinError>| {
                let (value, outcome) = done.expect("a publish task panicked");
                if outcome.is_acked() {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
                settled.fetch_add(1, Ordering::Relaxed);
                history.record(value, outcome);
            };
            let mut pace = tokio::time::interval(Duration::from_secs(1) / rate.max(1));
            pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pending = JoinSet::new();
            let mut next = 1u64;
            loop {
                while let Some(done) = pending.try_join_next() {
                    record(&mut history, done);
                }
                if pending.len() >= in_flight {
                    tokio::select! {
                        biased;
                        _ = &mut stopped => break,
                        Some(done) = pending.join_next() => record(&mut history, done),
                    }
                    continue;
                }
                tokio::select! {
                    biased;
                    _ = &mut stopped => break,
                    _ = pace.tick() => {}
                }
                let value = next;
                next += 1;
                let client = client.clone();
                let subject = subject.clone();
                pending.spawn(async move {
                    let options = Publish::new().id(format!("fault-{value}"));
                    let result = client
                        .publish_with(subject.to_string(), &Job { id: value }, options)
                        .await;
                    (value, Outcome::of(result))
                });
            }
            // Every publish sent gets its outcome: natty's retries bound how long that takes.
            while let Some(done) = pending.join_next().await {
                record(&mut history, done);
            }
            history
        });
        Publisher {
            stop: Some(stop),
            task,
            acked,
            settled,
        }
    }

    /// How many values have been acked so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// How many publishes have an outcome so far.
    pub fn settled(&self) -> u64 {
        self.settled.load(Ordering::Relaxed)
    }

    /// Stops publishing, waits for the outcome of every publish in flight, and returns the history.
    ///
    /// # Panics
    ///
    /// If the publishing task panicked.
    pub async fn stop(mut self) -> History {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("the publisher panicked")
    }
}

/// One lease tick of a leader: which instance, in which term, at what wall-clock time (ns).
pub type Tick = (String, u64, u128);

/// Per term, its holder and the interval from its first to its last tick.
pub type Terms = BTreeMap<u64, (String, u128, u128)>;

/// Checks that leases never overlap: each term has one holder, and ordered by their first
/// tick, terms strictly increase and each ends before the next begins.
///
/// # Errors
///
/// What overlapped, naming both instances and terms.
pub fn check_leases(ticks: &[Tick]) -> Result<Terms, String> {
    let mut terms = Terms::new();
    for (name, term, at) in ticks {
        let entry = terms.entry(*term).or_insert((name.clone(), *at, *at));
        if &entry.0 != name {
            return Err(format!("term {term} held by both {} and {name}", entry.0));
        }
        entry.1 = entry.1.min(*at);
        entry.2 = entry.2.max(*at);
    }
    let mut by_start: Vec<(&u64, &(String, u128, u128))> = terms.iter().collect();
    by_start.sort_by_key(|(_, (_, start, _))| *start);
    for pair in by_start.windows(2) {
        let ((t1, (n1, _, end1)), (t2, (n2, start2, _))) = (pair[0], pair[1]);
        if t1 >= t2 {
            return Err(format!("term {t1} ({n1}) began before term {t2} ({n2})"));
        }
        if end1 >= start2 {
            return Err(format!(
                "{n1} (term {t1}) still led {} ms after {n2} (term {t2}) began",
                (end1 - start2) / 1_000_000
            ));
        }
    }
    Ok(terms)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(outcomes: &[(u64, Outcome)], reads: &[u64], stored: &[u64]) -> History {
        let mut history = History::new();
        for (value, outcome) in outcomes {
            history.record(*value, outcome.clone());
        }
        let mut counts = Counts::new();
        for value in reads {
            *counts.entry(*value).or_default() += 1;
        }
        history.set_reads(counts);
        let mut counts = Counts::new();
        for value in stored {
            *counts.entry(*value).or_default() += 1;
        }
        history.set_stored(counts);
        history
    }

    const ACKED: Outcome = Outcome::Acked { duplicate: false };

    #[test]
    fn classifies_every_value() {
        let unknown = Outcome::Unknown("timed out".into());
        let refused = Outcome::Refused("no stream".into());
        let report = history(
            &[
                (1, ACKED),
                (2, ACKED),
                (3, unknown.clone()),
                (4, unknown),
                (5, refused.clone()),
                (6, refused),
            ],
            &[1, 1, 1, 3, 6, 9],
            &[1, 2, 2, 3, 6],
        )
        .classify();
        assert_eq!(report.ok, 1);
        assert_eq!(report.lost, vec![2]);
        assert_eq!((report.unknown_read, report.unknown_unread), (1, 1));
        assert_eq!((report.failed, report.refused_read.clone()), (1, vec![6]));
        assert_eq!((report.duplicates, report.extra_reads), (1, 2));
        assert_eq!(report.stream_duplicates, vec![2]);
        assert!(report.stream_missing.is_empty());
        assert_eq!(report.unexpected, vec![9]);
        assert_eq!(report.errors.get("refused: no stream"), Some(&2));
        let shown = report.to_string();
        assert!(
            shown.contains("lost=1") && shown.contains("stream_duplicates=1"),
            "{shown}"
        );
    }

    #[test]
    #[should_panic(expected = "1 lost (acked, never read): [2]")]
    fn a_lost_value_is_unsafe() {
        history(&[(1, ACKED), (2, ACKED)], &[1], &[1, 2])
            .classify()
            .assert_safe();
    }

    #[test]
    #[should_panic(expected = "stored twice in the stream: [1]")]
    fn a_second_copy_in_the_stream_is_unsafe() {
        history(&[(1, ACKED)], &[1, 1], &[1, 1]).classify().assert_safe();
    }

    #[test]
    fn duplicate_reads_and_unknowns_are_safe() {
        let report = history(
            &[(1, ACKED), (2, Outcome::Unknown("timed out".into()))],
            &[1, 1, 1],
            &[1],
        )
        .classify();
        report.assert_safe();
        assert_eq!(report.duplicates, 1);
    }

    #[test]
    fn capture_must_hold_each_acked_value_once() {
        let history = history(&[(1, ACKED), (2, ACKED), (3, Outcome::Unknown("x".into()))], &[], &[]);
        let captured: Counts = [(1, 1), (2, 2), (3, 1)].into_iter().collect();
        let report = history.check_exactly_once(&captured);
        assert_eq!(report.repeated, vec![(2, 2)]);
        assert_eq!((report.once, report.unknown_captured), (1, 1));
        let captured: Counts = [(1, 1), (2, 1)].into_iter().collect();
        history.check_exactly_once(&captured).assert_exactly_once();
    }

    #[test]
    fn overlapping_leases_are_found() {
        let tick = |name: &str, term, at| (name.to_string(), term, at);
        assert!(check_leases(&[tick("a", 1, 10), tick("a", 1, 20), tick("b", 2, 30)]).is_ok());
        let overlap = check_leases(&[tick("a", 1, 10), tick("b", 2, 15), tick("a", 1, 20)]).unwrap_err();
        assert!(overlap.contains("still led"), "{overlap}");
        assert!(check_leases(&[tick("a", 1, 10), tick("b", 1, 20)]).is_err());
    }
}
