//! What an operator does to a service's durable consumers, from the command line
//! (`--pause`, `--resume`, `--reset-consumer`) or the console: pause until a time (nats-server
//! 2.11), resume, and reset to a stream sequence or time so that it delivers again from there
//! (nats-server 2.14).

use std::time::{Duration, SystemTime};

use async_nats::jetstream;

use crate::error::{Error, Result};
use crate::registry::Declarations;

/// The longest pause set: a week. A consumer paused longer is one nobody remembers.
pub(crate) const MAX_PAUSE: Duration = Duration::from_secs(7 * 24 * 3600);

/// The server consumers run on, as `(stream, consumer)`: a durable's own, or every partition
/// of a partitioned group's.
pub(crate) type Consumers = Vec<(String, String)>;

/// The consumers the durable `durable` (on `stream`, when given) of this service stands for.
///
/// # Errors
///
/// [`Error::Usage`] naming the durables there are, when none or several match.
pub(crate) fn durable(
    declared: &Declarations,
    durable: &str,
    stream: Option<&str>,
) -> Result<(String, Consumers, u32)> {
    use crate::partition::group::Group;
    let mut found = Vec::new();
    let mut known = Vec::new();
    for def in declared.consumers.iter().copied() {
        if def.ephemeral {
            continue;
        }
        known.push(format!("{} (stream {})", def.durable, def.stream));
        if def.durable == durable && stream.is_none_or(|s| s == def.stream) {
            let consumers = server_consumers(&def, || Group::new(def))?;
            found.push((def.stream.to_string(), consumers, def.partitions));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(Error::Usage(format!(
            "this service declares no durable consumer `{durable}`{}; it declares: {}",
            stream.map(|s| format!(" on stream `{s}`")).unwrap_or_default(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        ))),
        _ => Err(Error::Usage(format!(
            "several streams have a durable consumer `{durable}`: name one with --stream"
        ))),
    }
}

/// The consumers on the server a durable runs on: its own, or every partition's when it is a
/// partitioned group (`group` makes that group).
///
/// # Errors
///
/// What `group` fails with.
pub(crate) fn server_consumers(
    def: &crate::consumer::ConsumerDef,
    group: impl FnOnce() -> Result<crate::partition::group::Group>,
) -> Result<Consumers> {
    if def.partitions == 0 {
        return Ok(vec![(def.stream.to_string(), def.durable.to_string())]);
    }
    let group = group()?;
    Ok((0..def.partitions)
        .map(|k| {
            let partition = group.consumer(k);
            (partition.stream.to_string(), partition.durable.to_string())
        })
        .collect())
}

/// Refuses an operation the connected server is too old for, naming the version needed.
///
/// # Errors
///
/// [`Error::Usage`] naming `what`, the version it needs and the server's.
pub(crate) fn needs_server(nats: &async_nats::Client, major: u64, minor: u64, what: &str) -> Result<()> {
    too_old(nats, major, minor, what).map_or(Ok(()), |why| Err(Error::Usage(why)))
}

/// Why the connected server is too old for `what`, or `None` when it is recent enough (or
/// says no version: let the server answer then).
pub(crate) fn too_old(nats: &async_nats::Client, major: u64, minor: u64, what: &str) -> Option<String> {
    let version = nats.server_info().version;
    (!version.is_empty() && !at_least(&version, major, minor))
        .then(|| format!("{what} needs nats-server {major}.{minor} or newer; the server is {version}"))
}

/// Whether the server version `version` (`2.15.1`, `2.14.0-beta.2`) is `major.minor` or newer.
fn at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (major, minor)
}

/// Pauses every one of `consumers` for `how_long` (at most [`MAX_PAUSE`]), or resumes them
/// with `None`; when the pause ends.
///
/// # Errors
///
/// [`Error::Usage`] against a server older than 2.11; [`Error::Stream`] when the server
/// refuses one (those before it stay paused or resumed).
pub(crate) async fn pause(
    client: &crate::Client,
    consumers: &Consumers,
    how_long: Option<Duration>,
) -> Result<Option<SystemTime>> {
    needs_server(client.nats(), 2, 11, "pausing a consumer")?;
    let js = client.jetstream();
    let until = match how_long {
        Some(how_long) => {
            let how_long = how_long.min(MAX_PAUSE);
            let until = async_nats::datetime::add_std_duration(async_nats::datetime::now(), how_long)
                .map_err(|_| Error::Usage(format!("a pause of {how_long:?} ends too far off")))?;
            Some((until, SystemTime::now() + how_long))
        }
        None => None,
    };
    for (stream, durable) in consumers {
        let failed = |source: crate::BoxError| Error::Stream {
            stream: stream.clone(),
            action: if until.is_some() {
                "pausing a consumer"
            } else {
                "resuming a consumer"
            },
            source: format!("consumer `{durable}`: {}", crate::error::chain(&*source)).into(),
        };
        let found = js.get_stream_no_info(stream).await.map_err(|e| failed(e.into()))?;
        match until {
            Some((until, _)) => found.pause_consumer(durable, until).await.map(drop),
            None => found.resume_consumer(durable).await.map(drop),
        }
        .map_err(|e| failed(e.into()))?;
    }
    Ok(until.map(|(_, until)| until))
}

/// Where a reset sends a consumer back to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// This stream sequence is the next delivered.
    Sequence(u64),
    /// The first message stored at or after this time is the next delivered.
    Time(SystemTime),
}

impl Position {
    /// `SEQUENCE` or an RFC 3339 time (`2026-12-05T18:00:00Z`; no `Z` means UTC).
    pub(crate) fn parse(text: &str) -> std::result::Result<Position, String> {
        if let Ok(sequence) = text.parse::<u64>() {
            return match sequence {
                0 => Err("stream sequences start at 1".into()),
                sequence => Ok(Position::Sequence(sequence)),
            };
        }
        humantime::parse_rfc3339_weak(text)
            .map(Position::Time)
            .map_err(|_| format!("`{text}` is neither a stream sequence nor a time like 2026-12-05T18:00:00Z"))
    }
}

/// Resets the durable `consumer` of `stream` so that it delivers again from `to`: the server
/// forgets what it had delivered and acked past there. The stream sequence it delivers next.
///
/// # Errors
///
/// [`Error::Usage`] against a server older than 2.14, or for a time after the last message;
/// [`Error::Stream`] when the server refuses (a consumer whose deliver policy starts later).
pub(crate) async fn reset(client: &crate::Client, stream: &str, consumer: &str, to: Position) -> Result<u64> {
    needs_server(client.nats(), 2, 14, "resetting a consumer")?;
    let js = client.jetstream();
    let failed = |action: &'static str| {
        move |source: crate::BoxError| Error::Stream {
            stream: stream.to_string(),
            action,
            source: format!("consumer `{consumer}`: {}", crate::error::chain(&*source)).into(),
        }
    };
    let sequence = match to {
        Position::Sequence(sequence) => sequence,
        Position::Time(time) => first_at(js, stream, time).await?,
    };
    let mut found = js
        .get_stream(stream)
        .await
        .map_err(|e| failed("finding the stream")(e.into()))?;
    // Past the end, the consumer would skip every message published until then.
    let last = found
        .info()
        .await
        .map_err(|e| failed("reading the stream's state")(e.into()))?
        .state
        .last_sequence;
    if sequence > last + 1 {
        return Err(Error::Usage(format!(
            "stream `{stream}` ends at sequence {last}: a reset to {sequence} would skip what comes next"
        )));
    }
    found
        .reset_consumer(consumer, Some(sequence))
        .await
        .map_err(|e| failed("resetting a consumer")(e.into()))?;
    Ok(sequence)
}

/// The sequence of the first message `stream` stored at or after `time` (the server's message
/// get by start time).
async fn first_at(js: &jetstream::Context, stream: &str, time: SystemTime) -> Result<u64> {
    /// The server's answer: the message, or (any other answer) none at or after the time.
    #[derive(serde::Deserialize)]
    struct Found {
        message: Option<FoundMessage>,
    }
    #[derive(serde::Deserialize)]
    struct FoundMessage {
        seq: u64,
    }
    let when = humantime::format_rfc3339_nanos(time).to_string();
    let request = serde_json::json!({ "start_time": when });
    let found: Found = js
        .request(format!("STREAM.MSG.GET.{stream}"), &request)
        .await
        .map_err(|e| Error::Stream {
            stream: stream.to_string(),
            action: "finding the first message at a time",
            source: e.into(),
        })?;
    match found.message {
        Some(message) => Ok(message.seq),
        None => Err(Error::Usage(format!(
            "stream `{stream}` holds no message stored at or after {when}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_compare_by_major_and_minor() {
        assert!(at_least("2.15.1", 2, 14));
        assert!(at_least("2.14.0-beta.2", 2, 14));
        assert!(!at_least("2.12.3", 2, 14));
        assert!(!at_least("2.10.29", 2, 11));
        assert!(at_least("3.0.0", 2, 14));
        assert!(!at_least("", 2, 11));
    }

    #[test]
    fn a_position_is_a_sequence_or_a_time() {
        assert_eq!(Position::parse("42"), Ok(Position::Sequence(42)));
        assert!(Position::parse("0").is_err());
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_493_600);
        assert_eq!(Position::parse("2026-12-05T18:00:00Z"), Ok(Position::Time(time)));
        assert_eq!(Position::parse("2026-12-05 18:00:00"), Ok(Position::Time(time)));
        assert!(Position::parse("yesterday").unwrap_err().contains("neither"));
    }
}
