//! Messages the server publishes later (nats-server 2.12, ADR-51): `#[schedule]` declarations
//! (a cron expression or an interval) and one-off delayed publishes
//! ([`Publish::at`](crate::Publish::at), [`Publish::after`](crate::Publish::after)).
//!
//! The server keeps a schedule as a message (the "holder") on a subject of its own in the same
//! stream as its target; it publishes the holder's body and headers to the target when due,
//! and removes a one-off holder once it fired. Being stored, schedules survive restarts of the
//! service and of the server.
//!
//! natty puts holders in a subject space of their own, `natty.schedules.<stream>.>`, which it
//! adds to a stream that takes schedules (`#[stream(schedules = true)]`, or any stream a
//! `#[schedule]` targets), and it gives that stream's unfiltered consumers the stream's own
//! subjects as their filter: handlers see what a schedule publishes, never the holders.

use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;

use crate::config::Provision;
use crate::error::{Declared, Drift, Error, Result};
use crate::payload::Format;
use crate::publish::PublishError;
use crate::stream::Location;

/// The first tokens of every holder subject.
pub(crate) const PREFIX: &str = "natty.schedules";

/// The subjects holding stream `stream`'s schedules.
pub(crate) fn space(stream: &str) -> String {
    format!("{PREFIX}.{stream}.>")
}

/// The holder subject of the declared schedule `name` on `stream`.
pub(crate) fn holder(stream: &str, name: &str) -> String {
    format!("{PREFIX}.{stream}.{name}")
}

/// The holder subject of a one-off delayed message with idempotency key `id`: the same key
/// gives the same holder, so a publish sent again replaces the holder rather than adding a
/// second delayed message.
pub(crate) fn one_off_holder(stream: &str, id: &str) -> String {
    let token = if !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        id.to_string()
    } else {
        // A key that is not one plain token (dots, spaces, very long): its FNV-1a hash.
        let hash = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        format!("{hash:016x}")
    };
    format!("{PREFIX}.{stream}.at.{token}")
}

/// When a schedule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Spec {
    /// A cron expression in the server's six-field syntax (seconds first) or a predefined one
    /// (`@hourly`, `@daily`, …).
    Cron(&'static str),
    /// At this interval (at least a second), from when the schedule was stored.
    Every(Duration),
}

impl Spec {
    /// The `Nats-Schedule` header's value.
    pub(crate) fn header(&self) -> String {
        match self {
            Spec::Cron(expression) => expression.to_string(),
            Spec::Every(every) => format!("@every {}", go_duration(*every)),
        }
    }
}

/// `every` as Go's `time.ParseDuration` reads it (the server's syntax), in the largest whole
/// unit: `5m`, `90s`, `1500ms`.
pub(crate) fn go_duration(every: Duration) -> String {
    let nanos = every.as_nanos();
    match nanos {
        n if n % 3_600_000_000_000 == 0 => format!("{}h", n / 3_600_000_000_000),
        n if n % 60_000_000_000 == 0 => format!("{}m", n / 60_000_000_000),
        n if n % 1_000_000_000 == 0 => format!("{}s", n / 1_000_000_000),
        n if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        n => format!("{n}ns"),
    }
}

/// Encodes a schedule's body: the value its declaring function returns.
pub type BodyFn = fn() -> std::result::Result<(Bytes, Format), PublishError>;

/// Encodes `value` as a schedule's body (what `#[schedule]` calls with its function's value).
///
/// # Errors
///
/// [`PublishError::Encode`] naming the schedule's `subject`.
pub fn body<T: crate::EncodePayload + ?Sized>(
    subject: &str,
    value: &T,
) -> std::result::Result<(Bytes, Format), PublishError> {
    crate::publish::encode(subject, value)
}

/// A declared schedule: `#[schedule]` registers one.
///
/// The server publishes `body` to `subject` (a subject of `stream`) on `spec`. natty stores the
/// schedule at start, and again only when the declaration changed (an interval is not restarted
/// by a deploy); `--check` compares it with what the server holds.
#[derive(Debug, Clone, Copy)]
pub struct ScheduleDef {
    pub(crate) name: &'static str,
    pub(crate) stream: &'static str,
    pub(crate) subject: &'static str,
    pub(crate) spec: Spec,
    pub(crate) time_zone: Option<&'static str>,
    pub(crate) body: BodyFn,
    pub(crate) location: Location,
    /// The body's type, for the AsyncAPI document.
    pub(crate) payload: crate::payload::PayloadSource,
}

impl ScheduleDef {
    /// A schedule named `name` publishing what `body` encodes to `subject` of `stream`, on
    /// `spec`.
    pub const fn new(
        name: &'static str,
        stream: &'static str,
        subject: &'static str,
        spec: Spec,
        body: BodyFn,
    ) -> Self {
        ScheduleDef {
            name,
            stream,
            subject,
            spec,
            time_zone: None,
            body,
            location: Location::UNKNOWN,
            payload: crate::payload::PayloadSource::Unknown,
        }
    }

    /// The IANA time zone a cron expression is read in (UTC without one; nats-server 2.14).
    pub const fn time_zone(mut self, zone: &'static str) -> Self {
        self.time_zone = Some(zone);
        self
    }

    crate::payload::handler_definition_setters!("the type of the body it publishes", "ReportRequest");

    /// The schedule's name (its declaring function's).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The stream it is stored in.
    pub fn stream(&self) -> &'static str {
        self.stream
    }

    /// Where it publishes.
    pub fn subject(&self) -> &'static str {
        self.subject
    }

    /// When it fires.
    pub fn spec(&self) -> Spec {
        self.spec
    }

    /// Where it was declared.
    pub fn location(&self) -> Location {
        self.location
    }

    /// The holder message's headers.
    fn headers(&self, format: Format) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_SCHEDULE, self.spec.header().as_str());
        headers.insert(async_nats::header::NATS_SCHEDULE_TARGET, self.subject);
        if let Some(zone) = self.time_zone {
            headers.insert(async_nats::header::NATS_SCHEDULE_TIME_ZONE, zone);
        }
        format.write_content_type(&mut headers);
        headers
    }

    /// The first part of the stored holder that differs from this declaration: (field,
    /// declared, stored).
    fn drift(
        &self,
        stored: &HeaderMap,
        payload: &[u8],
        body: &[u8],
        format: Format,
    ) -> Option<(&'static str, String, String)> {
        let read = |name: &str| {
            stored
                .get(name)
                .map(|value| value.as_str().to_string())
                .unwrap_or_default()
        };
        // The format as the stored body's `Content-Type` names it: none is JSON (natty writes
        // none for JSON; holders stored before it stopped say `application/json`).
        let stored_format = match stored.get(crate::payload::CONTENT_TYPE) {
            None => Format::Json.to_string(),
            Some(value) => Format::from_content_type(value.as_str())
                .map_or_else(|| value.as_str().to_string(), |format| format.to_string()),
        };
        let compared = [
            ("schedule", self.spec.header(), read("Nats-Schedule")),
            ("subject", self.subject.to_string(), read("Nats-Schedule-Target")),
            (
                "time_zone",
                self.time_zone.unwrap_or_default().to_string(),
                read("Nats-Schedule-Time-Zone"),
            ),
            ("format", format.to_string(), stored_format),
        ];
        for (field, declared, actual) in compared {
            if declared != actual {
                return Some((field, format!("{declared:?}"), format!("{actual:?}")));
            }
        }
        (payload != body).then(|| {
            let show = |bytes: &[u8]| format!("{:?}", String::from_utf8_lossy(&bytes[..bytes.len().min(80)]));
            ("body", show(body), show(payload))
        })
    }

    /// Stores the schedule when the server's holder is missing or differs (create-or-update),
    /// or checks it (verify-only).
    pub(crate) async fn provision(&self, client: &crate::Client, mode: Provision) -> Result<()> {
        if mode == Provision::Off {
            return Ok(());
        }
        let what = format!("schedule `{}` (declared at {})", self.name, self.location);
        let (major, minor) = if self.time_zone.is_some() { (2, 14) } else { (2, 12) };
        crate::operate::needs_server(client.nats(), major, minor, &what)?;
        let failed = |action: &'static str, source: crate::error::BoxError| Error::Stream {
            stream: self.stream.to_string(),
            action,
            source,
        };
        let (body, format) = (self.body)().map_err(|error| failed("encoding a schedule's body", Box::new(error)))?;
        let js = client.jetstream();
        let mut stream = js
            .get_stream(self.stream)
            .await
            .map_err(|error| failed("looking up the stream of a schedule", Box::new(error)))?;
        let config = stream
            .info()
            .await
            .map_err(|error| failed("reading its info", Box::new(error)))?
            .config
            .clone();
        let space = space(self.stream);
        if !config.allow_message_schedules || !config.subjects.contains(&space) {
            return Err(Error::config(
                format!("#[schedule] `{}` at {}", self.name, self.location),
                self.stream,
                format!(
                    "the stream takes no natty schedules (needs allow_msg_schedules and the subjects `{space}`): \
                     declare it with #[stream(name = \"{}\", ..., schedules = true)], or let natty provision it",
                    self.stream
                ),
            ));
        }
        let refused = |why: String| {
            Error::config(
                format!("#[schedule] `{}` at {}", self.name, self.location),
                self.stream,
                why,
            )
        };
        if let Some(why) = unkept(self.stream, &config) {
            return Err(refused(why));
        }
        if !config.max_age.is_zero() {
            return Err(refused(format!(
                "the stream removes messages after {} (max_age), this schedule among them, and it would stop firing: \
                 keep schedules in a stream without max_age",
                humantime::format_duration(config.max_age)
            )));
        }
        let holder = holder(self.stream, self.name);
        // Another instance starting at the same time may store it first: the expected last
        // subject sequence makes one of the two writes fail, and the loser reads again.
        for _ in 0..3 {
            let stored = match stream.get_last_raw_message_by_subject(&holder).await {
                Ok(message) => Some(message),
                Err(error) if error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => None,
                Err(error) => return Err(failed("reading a schedule", Box::new(error))),
            };
            let (last, difference) = match &stored {
                Some(message) => {
                    let headers = message.headers.clone();
                    (message.sequence, self.drift(&headers, &message.payload, &body, format))
                }
                None => (
                    0,
                    Some((
                        "schedule",
                        format!("{:?}", self.spec.header()),
                        "none stored".to_string(),
                    )),
                ),
            };
            let Some((field, declared, actual)) = difference else {
                return Ok(());
            };
            if mode == Provision::VerifyOnly {
                return Err(Drift {
                    declared_on: Declared::Schedule {
                        stream: self.stream.to_string(),
                        name: self.name.to_string(),
                    },
                    field,
                    declared,
                    actual,
                    hint: " (provisioning is verify-only, so natty does not store it)".to_string(),
                }
                .into());
            }
            let mut headers = self.headers(format);
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                last.to_string().as_str(),
            );
            let stored = async {
                js.publish_with_headers(holder.clone(), headers, body.clone())
                    .await?
                    .await
            }
            .await;
            match stored {
                Ok(_) => {
                    tracing::info!(schedule = self.name, stream = self.stream, subject = self.subject,
                        schedule_spec = %self.spec.header(), "stored the schedule");
                    return Ok(());
                }
                Err(error) if error.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => continue,
                Err(error) => return Err(failed("storing a schedule", Box::new(error))),
            }
        }
        Err(failed(
            "storing a schedule",
            format!("`{holder}` kept changing while natty stored it").into(),
        ))
    }
}

inventory::collect!(ScheduleDef);

/// Why a stream cannot keep schedules whatever the settings of one of them: with interest
/// retention the server stores nothing no consumer reads, and the stream's consumers do not
/// read the holders (ADR-51: keep schedules in a limits or work-queue stream); with a message
/// or byte limit it removes its oldest messages to make room (a stream that takes schedules
/// cannot discard new ones instead), waiting ones included: a delayed message never comes, a
/// schedule stops firing, and nothing says so (seen on nats-server 2.15).
pub(crate) fn unkept(stream: &str, config: &jetstream::stream::Config) -> Option<String> {
    if config.retention == jetstream::stream::RetentionPolicy::Interest {
        return Some(format!(
            "its stream `{stream}` has interest retention: the server keeps no message that no consumer reads, \
             so it would drop what waits (keep scheduled messages in a limits or work-queue stream)"
        ));
    }
    let limit = if config.max_messages > 0 {
        format!("{} messages (max_messages)", config.max_messages)
    } else if config.max_bytes > 0 {
        format!("{} bytes (max_bytes)", config.max_bytes)
    } else {
        return None;
    };
    Some(format!(
        "its stream `{stream}` removes its oldest messages once it holds {limit}, and what waits there is \
         among them: it would be lost without a word (bound a stream that keeps scheduled messages by \
         max_age only, which natty checks each delay against)"
    ))
}

/// Refuses to bring `stream` in line when the server's stream (`actual`) holds natty's
/// schedules but the declaration no longer says so (its last `#[schedule]` removed,
/// `schedules = true` dropped): the update would take the holders' subjects away while they
/// keep firing, its unfiltered consumers would get them, and its delayed publishes would be
/// refused. Checked on the config provisioning reads anyway, before it changes anything.
pub(crate) fn still_declared(stream: &crate::StreamDef, actual: &jetstream::stream::Config) -> Result<()> {
    let space = space(stream.name);
    if stream.schedules.is_none() && actual.allow_message_schedules && actual.subjects.contains(&space) {
        return Err(Error::config(
            format!("#[stream] `{}` at {}", stream.name, stream.location),
            "schedules unset",
            format!(
                "the stream holds natty's schedules on the server (`{space}`), which keep firing: keep \
                 `schedules = true` on it, or purge `{space}` and remove that subject from the stream first"
            ),
        ));
    }
    Ok(())
}

/// Where and when a delayed publish goes: its holder's subject and headers.
pub(crate) async fn delay(
    client: &crate::Client,
    subject: &async_nats::Subject,
    id: &str,
    at: SystemTime,
    headers: &mut HeaderMap,
) -> std::result::Result<async_nats::Subject, PublishError> {
    let cannot = |reason: String| PublishError::CannotDelay {
        subject: subject.to_string(),
        reason,
    };
    if let Some(why) = crate::operate::too_old(client.nats(), 2, 12, "a delayed publish") {
        return Err(cannot(why));
    }
    let js = client.jetstream();
    let stream = js
        .stream_by_subject(subject.as_str())
        .await
        .map_err(|_| PublishError::NoStream {
            subject: subject.to_string(),
        })?;
    let config = js
        .get_stream(&stream)
        .await
        .map_err(|_| PublishError::NoStream {
            subject: subject.to_string(),
        })?
        .cached_info()
        .config
        .clone();
    if !config.allow_message_schedules || !config.subjects.contains(&space(&stream)) {
        return Err(cannot(format!(
            "its stream `{stream}` takes no scheduled messages (declare it with #[stream(name = \"{stream}\", ..., schedules = true)])"
        )));
    }
    if let Some(why) = unkept(&stream, &config) {
        return Err(cannot(why));
    }
    let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
    if !config.max_age.is_zero() && wait >= config.max_age {
        return Err(cannot(format!(
            "its stream `{stream}` removes messages after {} (max_age), before this one is due in {}",
            humantime::format_duration(config.max_age),
            humantime::format_duration(Duration::from_secs(wait.as_secs()))
        )));
    }
    // They would apply to the copy that waits, not to the message when it is published (and
    // the server drops them from it): an expectation checked now, a TTL that may remove the
    // waiting copy before it is due.
    if let Some((name, _)) = headers.iter().find(|(name, _)| {
        let name: &str = name.as_ref();
        name.starts_with("Nats-Expected") || name.eq_ignore_ascii_case("Nats-TTL")
    }) {
        let name: &str = name.as_ref();
        return Err(cannot(format!(
            "`{name}` cannot be set on a delayed message: it would apply to the copy that waits, not to the message when it is published"
        )));
    }
    // Whole seconds, rounded up: the message never comes earlier than asked.
    let since = at.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let rounded = if since.subsec_nanos() > 0 {
        Duration::from_secs(since.as_secs() + 1)
    } else {
        since
    };
    let when = humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + rounded);
    headers.insert(async_nats::header::NATS_SCHEDULE, format!("@at {when}").as_str());
    headers.insert(async_nats::header::NATS_SCHEDULE_TARGET, subject.as_str());
    Ok(one_off_holder(&stream, id).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_read_as_go_durations() {
        assert_eq!(go_duration(Duration::from_secs(300)), "5m");
        assert_eq!(go_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(go_duration(Duration::from_secs(90)), "90s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(Spec::Every(Duration::from_secs(5)).header(), "@every 5s");
        assert_eq!(Spec::Cron("0 0 6 * * *").header(), "0 0 6 * * *");
    }

    #[test]
    fn a_holder_stored_as_application_json_is_the_json_declared() {
        fn body() -> std::result::Result<(Bytes, Format), PublishError> {
            unreachable!("not encoded here")
        }
        let def = ScheduleDef::new("tick", "s", "s.tick", Spec::Every(Duration::from_secs(5)), body);
        let stored = |content_type: Option<&str>| {
            let mut headers = def.headers(Format::Json);
            if let Some(value) = content_type {
                headers.insert(crate::payload::CONTENT_TYPE, value);
            }
            headers
        };
        // Stored before JSON went without the header, or after: the same declaration.
        assert_eq!(def.drift(&stored(None), b"{}", b"{}", Format::Json), None);
        assert_eq!(
            def.drift(&stored(Some("application/json")), b"{}", b"{}", Format::Json),
            None
        );
        assert_eq!(
            def.drift(&stored(Some("application/protobuf")), b"{}", b"{}", Format::Json),
            Some(("format", "\"JSON\"".to_string(), "\"Protobuf\"".to_string()))
        );
    }

    #[test]
    fn one_off_holders_are_one_token_per_key() {
        assert_eq!(
            one_off_holder("orders", "order-42"),
            "natty.schedules.orders.at.order-42"
        );
        let odd = one_off_holder("orders", "order.42 created");
        assert!(odd.starts_with("natty.schedules.orders.at."));
        assert_eq!(odd.split('.').count(), 5, "{odd}");
        assert_eq!(
            odd,
            one_off_holder("orders", "order.42 created"),
            "the same key, the same holder"
        );
    }
}
