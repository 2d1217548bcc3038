//! The runtime's error types: each variant says what failed, where, and what to do about it.

use std::fmt;

use crate::format::Format;

/// A boxed error from a lower layer (async-nats, I/O, serde).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with natty's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can stop a natty service from starting or running, in three kinds:
///
/// - **startup**: the configuration, the connection, provisioning and the declarations
///   themselves ([`Config`](Error::Config), [`Connect`](Error::Connect),
///   [`Stream`](Error::Stream), [`Duplicate`](Error::Duplicate),
///   [`MissingState`](Error::MissingState), …);
/// - **drift**: a declaration the server does not match ([`Drift`](Error::Drift), with the
///   [`Drift`] it found), and the summary of `--check` ([`CheckFailed`](Error::CheckFailed));
/// - **usage**: a command line the service does not understand ([`Usage`](Error::Usage)).
///
/// Publishing has its own error, [`PublishError`], which converts into this one for `?`.
///
/// `Display` says what failed; why is in [`source`](std::error::Error::source), as the Rust
/// API guidelines ask (so `anyhow`'s `{:#}` and error reporters print each cause once).
/// `Debug` prints the message and every cause, so that `fn main() -> natty_runtime::Result<()>`
/// exits with the whole story.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An environment variable or builder setting has a value natty cannot use.
    #[error("invalid configuration: {setting} = {value:?}: {reason}")]
    Config {
        /// The environment variable or setting at fault.
        setting: String,
        /// The value given.
        value: String,
        /// Why it was refused.
        reason: String,
    },

    /// Could not connect to the NATS server(s).
    #[error("cannot connect to NATS at {url}")]
    Connect {
        /// The server URL(s) tried.
        url: String,
        /// What the client reported.
        #[source]
        source: BoxError,
    },

    /// The local development server could not be started.
    #[error("cannot start the development nats-server: {reason}")]
    DevServer {
        /// What went wrong and how to fix it.
        reason: String,
    },

    /// Nothing was registered, so the service would sit idle.
    #[error(
        "nothing to run: no #[consumer] or other handler is registered in this binary. \
         Likely causes: the handlers live in a module or crate that is never linked \
         (reference it from main, e.g. `use my_handlers as _;`), or this binary is not the one that declares them"
    )]
    NothingRegistered,

    /// A JetStream API request failed while provisioning or checking a stream.
    #[error("stream `{stream}`: {action} failed")]
    Stream {
        /// The stream's name.
        stream: String,
        /// What was attempted.
        action: &'static str,
        /// The server's or client's error.
        #[source]
        source: BoxError,
    },

    /// A stream that a consumer needs does not exist and natty may not create it.
    #[error("stream `{stream}` does not exist{hint}")]
    StreamNotFound {
        /// The stream's name.
        stream: String,
        /// What to do about it.
        hint: String,
    },

    /// A stream that handlers consume has no leader: on a cluster, fewer than a quorum of its
    /// replicas' servers are up, so nothing can be stored or delivered.
    #[error(
        "stream `{stream}` has no leader after {waited:?} ({detail}); a majority of its replicas' servers must be up \
         and connected to each other (NATTY_STREAM_LEADER_TIMEOUT sets the wait)"
    )]
    NoStreamLeader {
        /// The stream's name.
        stream: String,
        /// How long startup waited.
        waited: std::time::Duration,
        /// What the server last said: its replicas and which are offline, or the error.
        detail: String,
    },

    /// A JetStream API request failed while provisioning or binding a consumer.
    #[error("consumer `{consumer}` on stream `{stream}`: {action} failed")]
    Consumer {
        /// The stream's name.
        stream: String,
        /// The durable name.
        consumer: String,
        /// What was attempted.
        action: &'static str,
        /// The server's or client's error.
        #[source]
        source: BoxError,
    },

    /// A declared consumer does not exist and natty may not create it.
    #[error("consumer `{consumer}` on stream `{stream}` does not exist (provisioning is {mode}); create it or set NATTY_PROVISION=create-or-update")]
    ConsumerNotFound {
        /// The stream's name.
        stream: String,
        /// The durable name.
        consumer: String,
        /// The provisioning mode in force.
        mode: &'static str,
    },

    /// Two handlers declare the same durable consumer with different settings.
    #[error("{what} is declared twice: at {first} and at {second}")]
    Duplicate {
        /// What is declared twice.
        what: String,
        /// Where the first declaration is.
        first: String,
        /// Where the second one is.
        second: String,
    },

    /// A handler takes a `State<T>` no value of which was given to the runtime.
    #[error(
        "handler `{handler}` (declared at {location}) takes `State<{type_name}>`, but no `{type_name}` was given: \
         pass one with Runtime::builder().state(value), or natty_runtime::run_with(value)"
    )]
    MissingState {
        /// The handler's name.
        handler: String,
        /// Where it was declared.
        location: String,
        /// The state type it takes.
        type_name: &'static str,
    },

    /// A `#[capture]` cannot start: its store, format or consumer limits are unusable.
    #[error("capture `{capture}` (declared at {location}): {reason}")]
    Capture {
        /// The capture's name (its function's name).
        capture: String,
        /// Where it was declared.
        location: String,
        /// What is wrong and what to do about it.
        reason: String,
    },

    /// Publishing failed.
    #[error(transparent)]
    Publish(#[from] PublishError),

    /// A declared stream, KV bucket, object store or consumer differs from the server's: in
    /// verify-only mode, where natty changes nothing, or where the server refused the change.
    #[error(transparent)]
    Drift(Box<Drift>),

    /// `--check` found declarations the server does not match; each was printed.
    #[error("--check: {differences} declaration(s) differ from the server or are missing there (listed above)")]
    CheckFailed {
        /// How many declarations differ.
        differences: usize,
    },

    /// The command line was not understood.
    #[error("{0}")]
    Usage(String),

    /// An I/O error outside the NATS connection (signals, files).
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// A declared setting the server does not have (see [`Error::Drift`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{declared_on}: declared {field} = {declared}, but the server has {actual}{hint}")]
#[non_exhaustive]
pub struct Drift {
    /// What differs.
    pub declared_on: Declared,
    /// The first differing setting, as declared (`max_age`, `ack_wait`, …).
    pub field: &'static str,
    /// The declared value.
    pub declared: String,
    /// The server's value.
    pub actual: String,
    /// Context: the provisioning mode, or the server's refusal to change it.
    pub hint: String,
}

/// What a [`Drift`] is about.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Declared {
    /// A stream (`KV_<name>` behind a KV bucket, `OBJ_<name>` behind an object store).
    Stream(String),
    /// A durable consumer.
    Consumer {
        /// Its stream.
        stream: String,
        /// Its durable name.
        consumer: String,
    },
    /// A `#[schedule]`.
    Schedule {
        /// The stream holding it.
        stream: String,
        /// Its name.
        name: String,
    },
}

impl fmt::Display for Declared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Declared::Stream(stream) => write!(f, "stream `{stream}`"),
            Declared::Consumer { stream, consumer } => write!(f, "consumer `{consumer}` on stream `{stream}`"),
            Declared::Schedule { stream, name } => write!(f, "schedule `{name}` on stream `{stream}`"),
        }
    }
}

impl From<Drift> for Error {
    fn from(drift: Drift) -> Error {
        Error::Drift(Box::new(drift))
    }
}

/// Publishing failed. Except for [`PublishError::Unconfirmed`], nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// An optimistic-concurrency expectation did not hold (`expected_last_*`): another writer
    /// got there first. Nothing was stored; re-read and decide.
    #[error("publish to `{subject}` rejected: {expectation} does not hold")]
    Conflict {
        /// The target subject.
        subject: String,
        /// Which expectation failed, e.g. "expected last subject sequence 41".
        expectation: String,
        /// The server's answer.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// No ack came in time, even after retries: the message may or may not be stored.
    /// Publishing again with the same [`Publish::id`](crate::Publish::id) is safe: the stream keeps one copy.
    #[error("publish to `{subject}` unconfirmed after {attempts} attempts (it may be stored)")]
    Unconfirmed {
        /// The target subject.
        subject: String,
        /// How many times it was sent.
        attempts: u32,
        /// The last error.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
    /// No stream captures the subject: nothing was stored, and retrying would not help.
    #[error(
        "no stream captures `{subject}`: nothing was stored (declare a #[stream] whose subjects include it, \
         or publish with core NATS if no stream should keep it)"
    )]
    NoStream {
        /// The target subject.
        subject: String,
    },
    /// The subject is not one a message can be published to: an empty token (`a..b`, a
    /// leading or trailing `.`), a wildcard token (`*`, `>`), whitespace or a control
    /// character. Refused before anything is sent, and never retried: it cannot heal.
    #[error("cannot publish to {subject:?}: {problem}; nothing was sent")]
    InvalidSubject {
        /// The subject given.
        subject: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A header set on [`Publish`](crate::Publish) cannot be sent: a name that is not
    /// printable ASCII without `:`, or a value (an idempotency key, say) holding a line break.
    /// Refused before anything is sent.
    #[error("cannot publish to {subject:?}: header `{header}`: {problem}; nothing was sent")]
    InvalidHeader {
        /// The subject given.
        subject: String,
        /// The header's name.
        header: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A field of a [`Payload`](crate::Payload) fills a placeholder of its subject template with a value that
    /// is not exactly one subject token (empty, or holding `.`, `*`, `>`, whitespace or a control
    /// character): published, it would land on another subject than the template says.
    /// Refused before anything is sent, and never retried.
    #[error(
        "{type_name}.{field} = {value:?} cannot fill `{{{field}}}` in the subject `{template}`: {problem}; nothing was sent"
    )]
    InvalidSubjectField {
        /// The payload's Rust type.
        type_name: &'static str,
        /// The field at fault.
        field: &'static str,
        /// Its value, as `Display` wrote it.
        value: String,
        /// The subject template the type declares.
        template: &'static str,
        /// What is wrong with the value.
        problem: &'static str,
    },
    /// The value could not be encoded.
    #[error("cannot encode the message for `{subject}` as {format}")]
    Encode {
        /// The target subject.
        subject: String,
        /// The format it was encoded in.
        format: Format,
        /// What the encoder reported.
        #[source]
        source: BoxError,
    },
    /// A delayed publish ([`Publish::at`](crate::Publish::at), [`Publish::after`](crate::Publish::after))
    /// that cannot be kept: the subject's stream takes no scheduled messages, would remove the
    /// message before it is due (`max_age`), or drops what no consumer reads (interest
    /// retention); an expectation or `Nats-TTL` was set (they would apply to the waiting copy,
    /// not to the message when published); or the server is older than 2.12. Nothing was sent.
    #[error("cannot delay a message to `{subject}`: {reason}; nothing was sent")]
    CannotDelay {
        /// The target subject.
        subject: String,
        /// Why: the stream that captures it takes no schedules, or the server is too old.
        reason: String,
    },
    /// The server did not ack the message (no stream for the subject, timeout, refused).
    #[error("publish to `{subject}` was not acknowledged")]
    Publish {
        /// The target subject.
        subject: String,
        /// What the client reported.
        #[source]
        source: async_nats::jetstream::context::PublishError,
    },
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")?;
        causes(self, |cause| write!(f, "\n  caused by: {cause}"))
    }
}

impl Error {
    pub(crate) fn config(setting: impl Into<String>, value: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Config {
            setting: setting.into(),
            value: value.into(),
            reason: reason.into(),
        }
    }
}

/// `error` with its causes, `what failed: why: deeper why`, as one line (what `anyhow`'s
/// `{:#}` prints): for logs, dead-letter reasons and error replies, where `Display` alone
/// would say what failed but not why.
pub(crate) fn chain<'a>(error: &'a (dyn std::error::Error + 'a)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
pub(crate) struct Chain<'a>(&'a (dyn std::error::Error + 'a));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        causes(self.0, |cause| write!(f, ": {cause}"))
    }
}

/// Calls `each` with every cause of `error`, outermost first, leaving out a cause whose text
/// the one above it already holds: some lower layers print their source in their own message.
fn causes<'a>(error: &'a (dyn std::error::Error + 'a), mut each: impl FnMut(&str) -> fmt::Result) -> fmt::Result {
    let mut said = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !said.contains(&text) {
            each(&text)?;
        }
        said = text;
        source = cause.source();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Says(&'static str, #[source] Option<Box<Says>>);

    #[test]
    fn display_says_what_failed_and_chain_and_debug_say_why_once_each() {
        let root = Says("connection refused", None);
        let embeds = Says("i/o error: connection refused", Some(Box::new(root)));
        let error = Error::Connect {
            url: "nats://127.0.0.1:4222".into(),
            source: Box::new(embeds),
        };
        assert_eq!(error.to_string(), "cannot connect to NATS at nats://127.0.0.1:4222");
        assert_eq!(
            chain(&error).to_string(),
            "cannot connect to NATS at nats://127.0.0.1:4222: i/o error: connection refused"
        );
        assert_eq!(
            format!("{error:?}"),
            "cannot connect to NATS at nats://127.0.0.1:4222\n  caused by: i/o error: connection refused"
        );
    }
}
