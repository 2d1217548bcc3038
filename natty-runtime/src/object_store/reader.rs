//! Reading an object: an [`AsyncRead`] over its chunks, fetched a few at a time from an
//! ordered pull consumer, with the digest checked at the end.

use std::fmt;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};

use async_nats::jetstream::{self, consumer, object_store};
use bytes::{Buf, Bytes};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, ReadBuf};

use super::{decode_metadata, ObjectInfo, ObjectStoreError};

/// async-nats' chunk size, for objects whose info does not say.
const DEFAULT_CHUNK_SIZE: usize = 128 * 1024;

/// How much of an object is fetched ahead of the reader: this, not the object's size, bounds
/// the memory a read takes.
const READ_AHEAD_BYTES: usize = 1024 * 1024;

/// An object being read: an [`AsyncRead`] over its bytes, fetched chunk by chunk.
pub struct ObjectReader {
    bucket: String,
    info: ObjectInfo,
    content: Content,
}

enum Content {
    Chunks {
        chunks: BoxStream<'static, std::io::Result<Bytes>>,
        /// What is left of the chunk being read.
        current: Bytes,
        read: usize,
        digest: Sha256,
        done: bool,
    },
    Linked(Box<object_store::Object>),
}

impl fmt::Debug for ObjectReader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ObjectReader")
            .field("bucket", &self.bucket)
            .field("object", &self.info.name)
            .field("size", &self.info.size)
            .finish()
    }
}

impl ObjectReader {
    /// Reads the chunks of `info`'s object from the store `bucket`, a few at a time.
    pub(super) fn chunked(js: &jetstream::Context, bucket: &str, info: ObjectInfo) -> ObjectReader {
        let chunk_size = info
            .options
            .as_ref()
            .and_then(|options| options.max_chunk_size)
            .unwrap_or(DEFAULT_CHUNK_SIZE)
            .max(1);
        let chunks = Chunks {
            js: js.clone(),
            stream: format!("OBJ_{bucket}"),
            subject: format!("$O.{bucket}.C.{}", info.nuid),
            batch: (READ_AHEAD_BYTES / chunk_size).clamp(1, 64) as i64,
            messages: None,
            left: info.chunks,
        };
        ObjectReader {
            bucket: bucket.to_owned(),
            content: Content::Chunks {
                chunks: chunks.into_stream(),
                current: Bytes::new(),
                read: 0,
                digest: Sha256::new(),
                done: false,
            },
            info,
        }
    }

    /// Reads a linked object through async-nats, which follows the link.
    pub(super) fn linked(bucket: &str, object: object_store::Object) -> ObjectReader {
        ObjectReader {
            bucket: bucket.to_owned(),
            info: object.info.clone(),
            content: Content::Linked(Box::new(object)),
        }
    }

    /// What the store knows of the object.
    pub fn info(&self) -> &ObjectInfo {
        &self.info
    }

    /// The object's size in bytes.
    pub fn size(&self) -> usize {
        self.info.size
    }

    /// The typed metadata stored with it, as [`ObjectStore::metadata`](super::ObjectStore::metadata).
    ///
    /// # Errors
    ///
    /// [`ObjectStoreError::Metadata`] when it is not an `M`.
    pub fn metadata<M: DeserializeOwned>(&self) -> std::result::Result<Option<M>, ObjectStoreError> {
        decode_metadata(&self.bucket, &self.info)
    }
}

impl AsyncRead for ObjectReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        let (chunks, current, read, digest, done) = match &mut this.content {
            Content::Linked(object) => return Pin::new(object.as_mut()).poll_read(cx, buf),
            Content::Chunks {
                chunks,
                current,
                read,
                digest,
                done,
            } => (chunks, current, read, digest, done),
        };
        loop {
            if !current.is_empty() {
                let n = current.len().min(buf.remaining());
                buf.put_slice(&current[..n]);
                current.advance(n);
                return Poll::Ready(Ok(()));
            }
            if *done {
                return Poll::Ready(Ok(()));
            }
            match std::task::ready!(chunks.poll_next_unpin(cx)) {
                Some(Ok(chunk)) => {
                    digest.update(&chunk);
                    *read += chunk.len();
                    *current = chunk;
                }
                Some(Err(error)) => return Poll::Ready(Err(error)),
                None => {
                    *done = true;
                    let invalid = |what: String| {
                        Poll::Ready(Err(std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("object store `{}`: object `{}`: {what}", this.bucket, this.info.name),
                        )))
                    };
                    if *read != this.info.size {
                        return invalid(format!("read {} bytes, but its size is {}", read, this.info.size));
                    }
                    let actual = format!("SHA-256={}", base64_url(&std::mem::take(digest).finish()));
                    match &this.info.digest {
                        Some(expected) if *expected != actual => {
                            return invalid(format!("its digest is {expected}, but the bytes read hash to {actual}"))
                        }
                        _ => return Poll::Ready(Ok(())),
                    }
                }
            }
        }
    }
}

/// The chunks of one object, in order, from an ordered pull consumer that asks for `batch`
/// chunks at a time: unlike a push consumer (which the server lets run up to 64 MiB ahead of
/// a slow reader), it never holds more than about [`READ_AHEAD_BYTES`].
struct Chunks {
    js: jetstream::Context,
    stream: String,
    subject: String,
    batch: i64,
    messages: Option<consumer::pull::Ordered>,
    left: usize,
}

impl Chunks {
    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        if self.left == 0 {
            return None;
        }
        let messages = match &mut self.messages {
            Some(messages) => messages,
            None => {
                let config = consumer::pull::OrderedConfig {
                    filter_subject: self.subject.clone(),
                    max_batch: self.batch,
                    ..Default::default()
                };
                let opened = match self.js.create_consumer_on_stream(config, &self.stream).await {
                    Ok(consumer) => consumer.messages().await.map_err(std::io::Error::other),
                    Err(error) => Err(std::io::Error::other(error)),
                };
                match opened {
                    Ok(messages) => self.messages.insert(messages),
                    Err(error) => return Some(Err(error)),
                }
            }
        };
        // An object replaced or deleted while it is read loses its chunks (the new object's
        // are under another subject): the consumer would wait for the rest forever. A chunk
        // slow to come is a reason to look whether they are still there.
        let next = loop {
            match tokio::time::timeout(CHUNK_WAIT, messages.next()).await {
                Ok(next) => break next,
                Err(_) if chunks_gone(&self.js, &self.stream, &self.subject).await => {
                    return Some(Err(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!(
                            "the object was replaced or deleted while being read: its chunks ({}) are gone, {} not read",
                            self.subject, self.left
                        ),
                    )))
                }
                Err(_) => continue,
            }
        };
        Some(match next {
            Some(Ok(message)) => {
                self.left -= 1;
                Ok(message.message.payload)
            }
            Some(Err(error)) => Err(std::io::Error::other(error)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("the chunks of {} ended early, {} missing", self.subject, self.left),
            )),
        })
    }

    fn into_stream(self) -> BoxStream<'static, std::io::Result<Bytes>> {
        futures_util::stream::unfold(self, |mut chunks| async move {
            let chunk = chunks.next().await?;
            // An error ends the object: what follows could not be trusted to line up.
            if chunk.is_err() {
                chunks.left = 0;
            }
            Some((chunk, chunks))
        })
        .boxed()
    }
}

/// How long a chunk may take before the reader looks whether the object's chunks are still
/// there.
const CHUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether the stream holds no message on `subject` any more (a failed request says nothing).
async fn chunks_gone(js: &jetstream::Context, stream: &str, subject: &str) -> bool {
    let Ok(stream) = js.get_stream_no_info(stream).await else {
        return false;
    };
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .is_err_and(|error| error.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound)
}

/// SHA-256, for the digest async-nats and the other NATS clients record with each object.
/// Boxed: the context is large, and it lives in an enum variant beside small ones.
struct Sha256(Box<ring::digest::Context>);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

impl Sha256 {
    fn new() -> Self {
        Sha256(Box::new(ring::digest::Context::new(&ring::digest::SHA256)))
    }

    fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    fn finish(self) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
}

/// Base64 with the URL-safe alphabet and padding, as the object digests are written.
fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_written_like_async_nats_writes_them() {
        // RFC 4648 test vectors, and the URL-safe characters.
        assert_eq!(base64_url(b""), "");
        assert_eq!(base64_url(b"f"), "Zg==");
        assert_eq!(base64_url(b"fo"), "Zm8=");
        assert_eq!(base64_url(b"foo"), "Zm9v");
        assert_eq!(base64_url(b"foob"), "Zm9vYg==");
        assert_eq!(base64_url(&[0xfb, 0xff]), "-_8=");
        let mut digest = Sha256::new();
        digest.update(b"ab");
        digest.update(b"c");
        assert_eq!(
            base64_url(&digest.finish()),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0="
        );
    }
}
