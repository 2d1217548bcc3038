//! The wire formats of payloads: what a `Content-Type` header names.

/// A wire format natty encodes and decodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Format {
    /// JSON through serde: `application/json`.
    Json,
    /// Protocol Buffers through prost: `application/protobuf`.
    Protobuf,
}

impl Format {
    /// The media type written to the `Content-Type` header.
    pub const fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Protobuf => "application/protobuf",
        }
    }

    /// Writes the `Content-Type` header naming this format into `headers`, for every format
    /// but JSON: JSON is the default, what a message without the header is read as (as most
    /// NATS publishers send it). The header is 32 bytes that the server scans for each of the
    /// `Nats-*` headers it looks up in every JetStream publish: sent with every JSON message,
    /// it cost 6% of the publish rate where the server bounds it (see `bench/RESULTS.md`).
    ///
    /// The name is a static [`HeaderName`](async_nats::HeaderName): a name given as `&str` is
    /// validated and copied on every insert, and this runs once per message.
    pub(crate) fn write_content_type(self, headers: &mut async_nats::HeaderMap) {
        if self == Format::Json {
            return;
        }
        headers.insert(
            const { async_nats::HeaderName::from_static(crate::payload::CONTENT_TYPE) },
            self.content_type(),
        );
    }

    /// The format a `Content-Type` value names, ignoring parameters such as `charset`;
    /// `None` for a media type natty does not know.
    pub fn from_content_type(value: &str) -> Option<Format> {
        let media = value.split(';').next().unwrap_or_default().trim();
        if media.eq_ignore_ascii_case("application/json") {
            Some(Format::Json)
        } else if [
            "application/protobuf",
            "application/x-protobuf",
            "application/vnd.google.protobuf",
        ]
        .iter()
        .any(|known| media.eq_ignore_ascii_case(known))
        {
            Some(Format::Protobuf)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Json => "JSON",
            Format::Protobuf => "Protobuf",
        })
    }
}
