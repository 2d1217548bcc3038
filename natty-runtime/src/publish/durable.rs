//! Publishing that survives elections and lost acks: one message sent again with the same
//! idempotency key until the stream acks it, for [`Client::publish_with`](super::Client::publish_with)
//! and every [`Kv`](crate::Kv) write.
//!
//! What holds: a message is sent again only while the failure can pass by itself ("no
//! responders" while a stream elects a leader, a lost ack, "duplicate message id is in
//! process"), for at most [`PUBLISH_RETRY_FOR`], always with the `Nats-Msg-Id` of the first
//! attempt, so the stream keeps one copy. An answer is "nothing was stored" only when that is
//! known; otherwise it is [`PublishError::Unconfirmed`].

use async_nats::jetstream;

use super::{classify, Client, PendingAck, PublishAck, PublishError};
use crate::classify::{failure, Failure};

/// How long [`Client::publish_with`](super::Client::publish_with) keeps trying: longer than a stream leader election on a
/// loaded cluster (a few seconds), well inside the default 2-minute duplicate window that
/// makes the retries safe.
pub(crate) const PUBLISH_RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(20);
/// How long "no responders" lasts before natty asks whether any stream takes the subject.
const NO_STREAM_AFTER: std::time::Duration = std::time::Duration::from_secs(2);
/// Pause before the first retry; it doubles, up to 2 s.
const PUBLISH_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(250);

/// Sends one message through `js`, as it is.
pub(super) async fn send_once(
    client: &Client,
    subject: &async_nats::Subject,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> std::result::Result<PendingAck, PublishError> {
    match client.acks.send(subject.clone(), headers, payload).await {
        Ok(ack) => Ok(PendingAck {
            subject: subject.clone(),
            ack,
        }),
        Err(source) => Err(PublishError::Publish {
            subject: subject.to_string(),
            source,
        }),
    }
}

/// Sends until the stream acks, retrying "no responders" and answers that may hide a stored
/// message with the same headers for up to [`PUBLISH_RETRY_FOR`] (see [`Client::publish_with`](super::Client::publish_with)).
/// The headers must carry a `Nats-Msg-Id`: it is what makes sending again safe. KV writes go
/// through here too.
pub(crate) async fn publish_durably(
    client: &Client,
    subject: &async_nats::Subject,
    headers: async_nats::HeaderMap,
    payload: bytes::Bytes,
) -> std::result::Result<PublishAck, PublishError> {
    debug_assert!(headers.get(async_nats::header::NATS_MESSAGE_ID).is_some());
    let js = client.jetstream();
    let started = tokio::time::Instant::now();
    let mut pause = PUBLISH_RETRY_DELAY;
    let mut attempt = 0u32;
    // "No responders" means an election, or that no stream takes the subject at all; the
    // second is asked about once it has lasted a while, so a stream being created right
    // now still gets the message.
    let mut stream_checked = false;
    // Whether an attempt went unanswered, so it may have been stored.
    let mut unconfirmed = false;
    loop {
        attempt += 1;
        let result = match send_once(client, subject, headers.clone(), payload.clone()).await {
            Ok(pending) => pending.await,
            Err(error) => Err(error),
        };
        let Err(error) = result else {
            return result;
        };
        let retry = match &error {
            // "No responders": the stream has no leader to take it right now.
            PublishError::Publish { source, .. } if failure(source) == Failure::NoResponders => {
                if !stream_checked && !unconfirmed && started.elapsed() >= NO_STREAM_AFTER {
                    stream_checked = true;
                    if no_stream_takes(js, subject).await {
                        return Err(PublishError::NoStream {
                            subject: subject.to_string(),
                        });
                    }
                }
                true
            }
            // The ack was lost: the retry carries the same key, so it is stored at most once.
            PublishError::Unconfirmed { .. } => true,
            _ => false,
        };
        if matches!(error, PublishError::Unconfirmed { .. }) {
            unconfirmed = true;
        }
        if !retry || started.elapsed() + pause > PUBLISH_RETRY_FOR {
            if unconfirmed {
                if let PublishError::Conflict { source, .. } = error {
                    // An expectation that fails after an attempt that may have been stored can
                    // be that attempt's own doing: a clustered stream answers a repeated
                    // `Nats-Msg-Id` as a duplicate first, a single server checks the
                    // expectation first and refuses it.
                    return match earlier_attempt(js, subject, &headers).await {
                        Earlier::Stored(ack) => Ok(ack),
                        Earlier::NotStored => Err(classify(subject, source)),
                        Earlier::Unknown => Err(PublishError::Unconfirmed {
                            subject: subject.to_string(),
                            attempts: attempt,
                            source,
                        }),
                    };
                }
            }
            return Err(match error {
                PublishError::Unconfirmed { subject, source, .. } => PublishError::Unconfirmed {
                    subject,
                    attempts: attempt,
                    source,
                },
                // An earlier attempt may have been stored: whatever the last one says,
                // "nothing was stored" is not known.
                PublishError::Publish { subject, source } if unconfirmed => PublishError::Unconfirmed {
                    subject,
                    attempts: attempt,
                    source,
                },
                other => other,
            });
        }
        tracing::debug!(%subject, attempt, error = %crate::error::chain(&error), "publish not confirmed; retrying");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// What became of an earlier attempt of a publish whose later attempt failed an expectation.
enum Earlier {
    /// It is stored: this is its ack.
    Stored(PublishAck),
    /// Another message is where it would be: it was not stored, the conflict is real.
    NotStored,
    /// The stream could not be asked.
    Unknown,
}

/// Looks for an earlier attempt of the publish with `headers` where its expectation says it
/// would be: right after the expected last sequence of its subject or of the stream, or else
/// as the subject's last message. It is found by its `Nats-Msg-Id`, through the stream
/// leader (not a replica that may lag).
///
/// One case cannot be told apart: on a subject that keeps one message (a KV bucket with
/// history 1), an attempt that was stored and then replaced by another writer's message
/// before this look is reported as not stored. The key has moved on either way, which is
/// what a conflict tells the caller.
async fn earlier_attempt(js: &jetstream::Context, subject: &str, headers: &async_nats::HeaderMap) -> Earlier {
    use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};
    use jetstream::stream::LastRawMessageErrorKind;
    let Some(id) = headers.get(NATS_MESSAGE_ID) else {
        return Earlier::Unknown;
    };
    let expected = |name| headers.get(name).and_then(|value| value.as_str().parse::<u64>().ok());
    let Ok(name) = js.stream_by_subject(subject).await else {
        return Earlier::Unknown;
    };
    let Ok(stream) = js.get_stream_no_info(&name).await else {
        return Earlier::Unknown;
    };
    let found = if let Some(last) = expected(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE) {
        stream.get_first_raw_message_by_subject(subject, last + 1).await
    } else if let Some(last) = expected(NATS_EXPECTED_LAST_SEQUENCE) {
        stream.get_raw_message(last + 1).await
    } else {
        stream.get_last_raw_message_by_subject(subject).await
    };
    match found {
        Ok(message) if message.headers.get(NATS_MESSAGE_ID) == Some(id) => Earlier::Stored(PublishAck {
            stream: name,
            sequence: message.sequence,
            duplicate: true,
            ..PublishAck::default()
        }),
        Ok(_) => Earlier::NotStored,
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => Earlier::NotStored,
        Err(_) => Earlier::Unknown,
    }
}

/// Whether the server says that no stream captures `subject` (not merely that it could
/// not answer).
async fn no_stream_takes(js: &jetstream::Context, subject: &str) -> bool {
    use jetstream::context::GetStreamByNameErrorKind as Kind;
    matches!(
        js.stream_by_subject(subject).await,
        Err(error) if error.kind() == Kind::NotFound
    )
}

#[cfg(all(test, feature = "testing"))]
mod tests {
    use super::*;
    use async_nats::header::{NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, NATS_MESSAGE_ID};

    fn compare_and_set(id: &str, last: u64) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(NATS_MESSAGE_ID, id);
        headers.insert(NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, last.to_string());
        headers
    }

    /// A single server checks a publish's expectation before its `Nats-Msg-Id`: the retry of a
    /// compare-and-set whose first attempt was stored (and whose ack was lost) is refused as a
    /// conflict. natty then finds that attempt where the expectation says it would be.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_caused_by_the_writes_own_earlier_attempt_is_found() {
        let server = crate::testing::NatsServer::start().await.expect("nats-server");
        let js = jetstream::new(server.client().await);
        js.create_stream(jetstream::stream::Config {
            name: "cas".into(),
            subjects: vec!["cas.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
        let send = |headers: async_nats::HeaderMap| {
            let js = js.clone();
            async move {
                js.publish_with_headers("cas.k", headers, "v".into())
                    .await
                    .unwrap()
                    .await
            }
        };
        assert_eq!(send(compare_and_set("first", 0)).await.unwrap().sequence, 1);
        // Stored at 2, as if its ack were lost; the retry is refused.
        assert_eq!(send(compare_and_set("mine", 1)).await.unwrap().sequence, 2);
        let retry = send(compare_and_set("mine", 1)).await.unwrap_err();
        assert_eq!(failure(&retry), Failure::WrongLast, "{retry}");

        match earlier_attempt(&js, "cas.k", &compare_and_set("mine", 1)).await {
            Earlier::Stored(ack) => assert_eq!((ack.stream.as_str(), ack.sequence, ack.duplicate), ("cas", 2, true)),
            _ => panic!("the earlier attempt is stored at 2"),
        }
        // Another writer's message follows revision 1: that conflict is real.
        assert!(matches!(
            earlier_attempt(&js, "cas.k", &compare_and_set("theirs", 1)).await,
            Earlier::NotStored
        ));
        // Nothing after revision 2 yet: not stored either.
        assert!(matches!(
            earlier_attempt(&js, "cas.k", &compare_and_set("later", 2)).await,
            Earlier::NotStored
        ));
    }
}
