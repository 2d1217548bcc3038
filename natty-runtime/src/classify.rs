//! What a failed NATS or JetStream request means for trying again. Every retry decision in
//! natty (provisioning, binding, publishing, KV writes, reads) asks this module, and it answers from
//! async-nats error kinds and the server's JetStream error codes, never from message text: a
//! reworded message in a new async-nats or nats-server release must not turn a transient
//! failure into a fatal one, or the other way round.
//!
//! An error is examined along its chain of [`source`](std::error::Error::source)s, so natty's
//! own wrappers ([`crate::Error::Stream`], [`crate::kv::KvError::Request`], ...) are seen
//! through. Some async-nats kinds carry the server's error inside the kind
//! (`JetStream(jetstream::Error)`) rather than as a source: those are unpacked too.

use std::error::Error as StdError;
use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, context, kv, stream, ErrorCode};

/// What a failure says about the request that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// No answer came in time: the request may or may not have taken effect.
    TimedOut,
    /// The connection went away while the answer was awaited: the request may or may not
    /// have taken effect.
    ConnectionLost,
    /// Nobody listens on the subject. For a JetStream publish: no stream leader right now (an
    /// election, a restart), or no stream captures the subject at all.
    NoResponders,
    /// Nobody answers the JetStream API: JetStream is not enabled for this account or server.
    /// An election does not cause this (every JetStream server answers the API), so it is not
    /// transient.
    NoJetStream,
    /// The server's "JetStream system temporarily unavailable" (10008): leaders are being
    /// elected, or a server is catching up.
    Unavailable,
    /// "Duplicate message id is in process" (10158): an earlier publish with the same
    /// `Nats-Msg-Id` is still being replicated (a leader paused or replaced mid-write). It may
    /// well be stored; asking again later gets its ack.
    DuplicateInProcess,
    /// An optimistic-concurrency expectation (`Nats-Expected-Last-*`) did not hold.
    WrongLast,
    /// Anything else: the request was refused or failed for a reason that does not pass by
    /// itself (an invalid name, a size limit, a permission).
    Other,
}

impl Failure {
    /// Whether the failure passes on its own while a cluster elects leaders or a server
    /// rejoins, so that the same request may be sent again.
    pub(crate) fn is_transient(self) -> bool {
        matches!(self, Failure::TimedOut | Failure::NoResponders | Failure::Unavailable)
    }

    /// Whether a write that failed this way may nevertheless have been stored.
    pub(crate) fn may_have_landed(self) -> bool {
        matches!(
            self,
            Failure::TimedOut | Failure::ConnectionLost | Failure::DuplicateInProcess
        )
    }
}

/// The [`Failure`] `error` reports: the first cause along its chain whose kind or JetStream
/// error code says something more specific than [`Failure::Other`].
pub(crate) fn failure(error: &(dyn StdError + 'static)) -> Failure {
    let mut current = Some(error);
    while let Some(error) = current {
        match level(error) {
            Failure::Other => current = error.source(),
            known => return known,
        }
    }
    Failure::Other
}

/// Whether a request failed for a reason that passes on its own while a cluster elects leaders
/// or a server rejoins: no answer in time, no responders, or the server's "JetStream system
/// temporarily unavailable" (10008).
pub(crate) fn transient(error: &(dyn StdError + 'static)) -> bool {
    failure(error).is_transient()
}

/// Runs `step` again while it fails for a transient reason (see [`transient`]), with growing
/// pauses (250 ms, doubling up to 2 s), for up to `timeout`; any other error, or the last one,
/// is returned as it is. For what is safe to send again: provisioning (a replicated bucket
/// created by several instances at once on a busy cluster, a stream looked up while its
/// servers elect a leader) and reads, which a stream answers only while it has a leader.
/// `what` names it in the log line of each retry.
pub(crate) async fn patiently<T, E, F, Fut>(what: &str, timeout: Duration, mut step: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StdError + 'static,
{
    let started = tokio::time::Instant::now();
    let mut pause = Duration::from_millis(250);
    let mut attempt = 1;
    loop {
        match step().await {
            Err(error) if transient(&error) && started.elapsed() + pause < timeout => {
                tracing::warn!(error = %crate::error::chain(&error), attempt, "{what} did not go through (the cluster may be electing leaders); trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The JetStream error codes natty acts on.
fn server(error: &jetstream::Error) -> Failure {
    match error.error_code() {
        ErrorCode::CLUSTER_NOT_AVAILABLE => Failure::Unavailable,
        ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT => Failure::DuplicateInProcess,
        ErrorCode::STREAM_WRONG_LAST_SEQUENCE | ErrorCode::STREAM_WRONG_LAST_MESSAGE_ID => Failure::WrongLast,
        _ => Failure::Other,
    }
}

/// Tries each async-nats error type in turn: the first one `$error` is decides, through the
/// closure given for it, what its kind means.
macro_rules! kinds {
    ($error:expr; $($ty:ty => $map:expr),* $(,)?) => {
        $(
            if let Some(error) = $error.downcast_ref::<$ty>() {
                let map: fn(&$ty) -> Failure = $map;
                return map(error);
            }
        )*
    };
}

/// What this one error (not its causes) says.
fn level(error: &(dyn StdError + 'static)) -> Failure {
    use Failure::*;
    if let Some(error) = error.downcast_ref::<jetstream::Error>() {
        return server(error);
    }
    if let Some(error) = error.downcast_ref::<std::io::Error>() {
        return match error.kind() {
            std::io::ErrorKind::TimedOut => TimedOut,
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset => ConnectionLost,
            _ => Other,
        };
    }
    kinds! { error;
        context::PublishError => |e| match e.kind() {
            context::PublishErrorKind::TimedOut => TimedOut,
            context::PublishErrorKind::BrokenPipe => ConnectionLost,
            // async-nats names the 503 "no responders" status of a publish this way.
            context::PublishErrorKind::StreamNotFound => NoResponders,
            context::PublishErrorKind::WrongLastSequence | context::PublishErrorKind::WrongLastMessageId => WrongLast,
            _ => Other,
        },
        async_nats::RequestError => |e| match e.kind() {
            async_nats::RequestErrorKind::TimedOut => TimedOut,
            async_nats::RequestErrorKind::NoResponders => NoResponders,
            _ => Other,
        },
        context::RequestError => |e| match e.kind() {
            context::RequestErrorKind::TimedOut => TimedOut,
            context::RequestErrorKind::NoResponders => NoJetStream,
            _ => Other,
        },
        context::CreateStreamError => |e| match e.kind() {
            context::CreateStreamErrorKind::TimedOut => TimedOut,
            context::CreateStreamErrorKind::JetStreamUnavailable => NoJetStream,
            context::CreateStreamErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        context::GetStreamError => |e| match e.kind() {
            context::GetStreamErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        context::GetStreamByNameError => |e| match e.kind() {
            context::GetStreamByNameErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        context::ConsumerInfoError => |e| match e.kind() {
            context::ConsumerInfoErrorKind::TimedOut => TimedOut,
            context::ConsumerInfoErrorKind::NoResponders => NoResponders,
            context::ConsumerInfoErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        context::AccountError => |e| match e.kind() {
            context::AccountErrorKind::TimedOut => TimedOut,
            context::AccountErrorKind::JetStreamUnavailable => NoJetStream,
            context::AccountErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        context::CreateKeyValueError => |e| match e.kind() {
            context::CreateKeyValueErrorKind::TimedOut => TimedOut,
            _ => Other,
        },
        context::UpdateKeyValueError => |e| match e.kind() {
            context::UpdateKeyValueErrorKind::TimedOut => TimedOut,
            _ => Other,
        },
        stream::ConsumerError => |e| match e.kind() {
            stream::ConsumerErrorKind::TimedOut => TimedOut,
            stream::ConsumerErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        stream::ConsumerCreateStrictError => |e| match e.kind() {
            stream::ConsumerCreateStrictErrorKind::TimedOut => TimedOut,
            stream::ConsumerCreateStrictErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        stream::ConsumerUpdateError => |e| match e.kind() {
            stream::ConsumerUpdateErrorKind::TimedOut => TimedOut,
            stream::ConsumerUpdateErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        stream::DirectGetError => |e| match e.kind() {
            stream::DirectGetErrorKind::TimedOut => TimedOut,
            stream::DirectGetErrorKind::ErrorResponse(status, _)
                if status == async_nats::StatusCode::NO_RESPONDERS => NoResponders,
            _ => Other,
        },
        stream::DeleteMessageError => |e| match e.kind() {
            stream::DeleteMessageErrorKind::TimedOut => TimedOut,
            stream::DeleteMessageErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        stream::PurgeError => |e| match e.kind() {
            stream::PurgeErrorKind::TimedOut => TimedOut,
            stream::PurgeErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        stream::LastRawMessageError => |e| match e.kind() {
            stream::LastRawMessageErrorKind::JetStream(e) => server(&e),
            _ => Other,
        },
        jetstream::consumer::StreamError => |e| match e.kind() {
            jetstream::consumer::StreamErrorKind::TimedOut => TimedOut,
            _ => Other,
        },
        jetstream::consumer::pull::MessagesError => |e| match e.kind() {
            jetstream::consumer::pull::MessagesErrorKind::NoResponders => NoResponders,
            _ => Other,
        },
        jetstream::consumer::pull::OrderedError => |e| match e.kind() {
            jetstream::consumer::pull::OrderedErrorKind::NoResponders => NoResponders,
            _ => Other,
        },
        kv::StatusError => |e| match e.kind() {
            kv::StatusErrorKind::TimedOut => TimedOut,
            kv::StatusErrorKind::JetStream(e) => server(&e),
        },
        kv::UpdateError => |e| match e.kind() {
            kv::UpdateErrorKind::TimedOut => TimedOut,
            kv::UpdateErrorKind::WrongLastRevision => WrongLast,
            _ => Other,
        },
        kv::EntryError => |e| match e.kind() {
            kv::EntryErrorKind::TimedOut => TimedOut,
            _ => Other,
        },
        kv::WatchError => |e| match e.kind() {
            kv::WatchErrorKind::TimedOut => TimedOut,
            _ => Other,
        },
    }
    Other
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server error as the server sends it: async-nats only builds them by deserializing.
    fn server_error(err_code: u64, description: &str) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 503,
            "err_code": err_code,
            "description": description,
        }))
        .expect("a JetStream error")
    }

    /// natty's own wrapper around a lower error, as provisioning reports it.
    fn wrapped(source: impl StdError + Send + Sync + 'static) -> crate::Error {
        crate::Error::Stream {
            stream: "orders".into(),
            action: "creating it",
            source: Box::new(source),
        }
    }

    #[test]
    fn publish_ack_failures_are_classified_by_kind() {
        use context::{PublishError, PublishErrorKind as Kind};
        let cases = [
            (Kind::TimedOut, Failure::TimedOut),
            (Kind::BrokenPipe, Failure::ConnectionLost),
            (Kind::StreamNotFound, Failure::NoResponders),
            (Kind::WrongLastSequence, Failure::WrongLast),
            (Kind::WrongLastMessageId, Failure::WrongLast),
            (Kind::MaxPayloadExceeded, Failure::Other),
            (Kind::Other, Failure::Other),
        ];
        for (kind, expected) in cases {
            assert_eq!(failure(&PublishError::new(kind)), expected, "{kind:?}");
        }
    }

    #[test]
    fn server_error_codes_are_read_from_the_source_whatever_the_text_says() {
        use context::{PublishError, PublishErrorKind as Kind};
        // The description is deliberately unlike the server's: only the code counts.
        let in_process = PublishError::with_source(Kind::Other, server_error(10158, "reworded"));
        assert_eq!(failure(&in_process), Failure::DuplicateInProcess);
        assert!(failure(&in_process).may_have_landed());
        let unavailable = PublishError::with_source(Kind::Other, server_error(10008, "reworded"));
        assert_eq!(failure(&unavailable), Failure::Unavailable);
        let refused = PublishError::with_source(Kind::Other, server_error(10054, "timed out, no responders"));
        assert_eq!(
            failure(&refused),
            Failure::Other,
            "text that merely says 'timed out' is not a timeout"
        );
    }

    #[test]
    fn errors_inside_natty_wrappers_and_kinds_are_found() {
        use context::{CreateStreamError, CreateStreamErrorKind as Kind};
        let unavailable = wrapped(CreateStreamError::new(Kind::JetStream(server_error(10008, "x"))));
        assert!(transient(&unavailable));
        assert!(transient(&wrapped(CreateStreamError::new(Kind::TimedOut))));
        let refused = wrapped(CreateStreamError::new(Kind::JetStream(server_error(10058, "x"))));
        assert!(!transient(&refused), "a refused setting is not retried");
        // No JetStream at all does not pass by waiting.
        assert!(!transient(&wrapped(CreateStreamError::new(Kind::JetStreamUnavailable))));
        // A timeout deep in a chain: a stream lookup whose request timed out.
        let lookup = context::GetStreamError::with_source(
            context::GetStreamErrorKind::Request,
            context::RequestError::new(context::RequestErrorKind::TimedOut),
        );
        assert!(transient(&wrapped(lookup)));
        let no_stream = context::GetStreamError::new(context::GetStreamErrorKind::JetStream(server_error(10059, "x")));
        assert!(!transient(&wrapped(no_stream)));
    }

    #[test]
    fn consumer_and_core_request_failures() {
        assert!(transient(&context::ConsumerInfoError::new(
            context::ConsumerInfoErrorKind::NoResponders
        )));
        assert!(transient(&stream::ConsumerError::new(
            stream::ConsumerErrorKind::TimedOut
        )));
        assert!(transient(&async_nats::RequestError::new(
            async_nats::RequestErrorKind::NoResponders
        )));
        assert!(!transient(&stream::ConsumerError::new(
            stream::ConsumerErrorKind::InvalidName
        )));
        assert!(!transient(&std::io::Error::other("timed out")));
    }

    #[test]
    fn kv_write_failures() {
        // async-nats' KV put wraps the publish error as the source of its own kind.
        let put = kv::PutError::with_source(
            kv::PutErrorKind::Ack,
            context::PublishError::new(context::PublishErrorKind::StreamNotFound),
        );
        assert_eq!(failure(&put), Failure::NoResponders);
        let update = kv::UpdateError::new(kv::UpdateErrorKind::TimedOut);
        assert_eq!(failure(&update), Failure::TimedOut);
        let conflict = kv::UpdateError::new(kv::UpdateErrorKind::WrongLastRevision);
        assert_eq!(failure(&conflict), Failure::WrongLast);
        assert!(!failure(&conflict).is_transient());
    }
}
