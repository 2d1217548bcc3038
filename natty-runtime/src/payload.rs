//! How values become message bytes and back: JSON through serde for any `Serialize` /
//! `Deserialize` type, Protobuf through prost for types deriving [`Payload`]
//! with `format = "protobuf"`. The format travels in a `Content-Type` header, so a consumer
//! handed the other format reports exactly that instead of a confusing parse error.

use std::borrow::Cow;

use async_nats::HeaderMap;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::BoxError;
use crate::error::PublishError;
pub use crate::format::Format;

/// The header carrying a message's [`Format`].
pub const CONTENT_TYPE: &str = "Content-Type";

/// A value that can be published: every `serde::Serialize` type as JSON, and Protobuf
/// messages that derive [`Payload`] with `format = "protobuf"`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be published",
    label = "not encodable",
    note = "derive `serde::Serialize` for it (JSON), or `prost::Message` plus `natty_runtime::Payload` \
            with `#[payload(format = \"protobuf\")]`"
)]
pub trait EncodePayload {
    /// The format [`to_bytes`](EncodePayload::to_bytes) writes.
    const FORMAT: Format;

    /// Encodes the value.
    ///
    /// # Errors
    ///
    /// When the value cannot be represented (e.g. a map with non-string keys in JSON).
    fn to_bytes(&self) -> Result<bytes::Bytes, BoxError>;
}

impl<T: Serialize + ?Sized> EncodePayload for T {
    const FORMAT: Format = Format::Json;

    fn to_bytes(&self) -> Result<bytes::Bytes, BoxError> {
        Ok(serde_json::to_vec(self)?.into())
    }
}

/// A value a handler can take as its payload: every `serde::Deserialize` type as JSON, and
/// Protobuf messages that derive [`Payload`] with `format = "protobuf"`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a message payload",
    label = "not decodable",
    note = "derive `serde::Deserialize` for it (JSON), or `prost::Message` plus `natty_runtime::Payload` \
            with `#[payload(format = \"protobuf\")]`; for metadata take `natty_runtime::Context`"
)]
pub trait DecodePayload: Sized + Send + 'static {
    /// The format [`from_bytes`](DecodePayload::from_bytes) reads.
    const FORMAT: Format;

    /// Decodes the value.
    ///
    /// # Errors
    ///
    /// When the bytes are not a valid encoding of `Self`.
    fn from_bytes(bytes: &[u8]) -> Result<Self, BoxError>;

    /// A JSON Schema (draft-07, AsyncAPI 3's default schema format) of the payload, for the
    /// document [`Runtime::asyncapi`](crate::Runtime::asyncapi) prints.
    ///
    /// Named types it refers to are under `definitions`, referenced as `#/definitions/<name>`.
    /// For serde types it is traced from the `Deserialize` impl; a derived Protobuf
    /// [`Payload`] gives a schema titled with its name (see
    /// [`Runtime::asyncapi`](crate::Runtime::asyncapi)). The default, for other impls, is an
    /// empty schema (any value) whose `description` says why there is nothing more.
    fn json_schema() -> serde_json::Value {
        serde_json::json!({
            "description": format!(
                "no schema: `{}` implements DecodePayload by hand without `json_schema`",
                std::any::type_name::<Self>()
            )
        })
    }
}

impl<T: DeserializeOwned + Send + 'static> DecodePayload for T {
    const FORMAT: Format = Format::Json;

    fn from_bytes(bytes: &[u8]) -> Result<Self, BoxError> {
        Ok(serde_json::from_slice(bytes)?)
    }

    fn json_schema() -> serde_json::Value {
        crate::schema::traced::<T>()
    }
}

/// What the AsyncAPI document says about one payload type: its Rust name, wire format and
/// schema. The macros record a `fn() -> PayloadDescription` in each handler's definition (a
/// function, since [`std::any::type_name`] is not `const`). Not part of the API.
#[doc(hidden)]
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadDescription {
    /// The Rust type, as [`std::any::type_name`] spells it.
    pub type_name: &'static str,
    /// The format it travels in.
    pub format: Format,
    /// Its JSON Schema, as [`DecodePayload::json_schema`] gives it.
    pub schema: serde_json::Value,
}

/// How a handler's definition describes its payload for the AsyncAPI document: given by hand
/// (`.payload(describe_payload::<T>)`), or probed from the handler's arguments by generated
/// code, which cannot tell which argument is the payload.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum PayloadSource {
    /// Not described.
    #[default]
    Unknown,
    /// Described by this function.
    Given(fn() -> PayloadDescription),
    /// Described by this function when the handler takes a payload.
    Probed(fn() -> Option<PayloadDescription>),
}

impl PayloadSource {
    /// The description, if there is one.
    pub(crate) fn describe(self) -> Option<PayloadDescription> {
        match self {
            PayloadSource::Unknown => None,
            PayloadSource::Given(describe) => Some(describe()),
            PayloadSource::Probed(probe) => probe(),
        }
    }
}

/// The setters every handler definition shares, written once: `at` (where it was declared),
/// `payload` (its payload's description, by hand) and `payload_probe` (what generated code
/// registers). `$what` says what the payload is, `$example` names an example type. The
/// definition needs `location: Location` and `payload: PayloadSource` fields.
macro_rules! handler_definition_setters {
    ($what:literal, $example:literal) => {
        /// Records where the declaration was written (the macros set this).
        pub const fn at(mut self, location: $crate::stream::Location) -> Self {
            self.location = location;
            self
        }

        #[doc = concat!("Records ", $what, ", for the AsyncAPI document")]
        /// ([`Runtime::asyncapi`](crate::Runtime::asyncapi)); the macros set it. By hand:
        #[doc = concat!("`.payload(natty_runtime::__private::describe_payload::<", $example, ">)`.")]
        pub const fn payload(mut self, describe: fn() -> $crate::payload::PayloadDescription) -> Self {
            self.payload = $crate::payload::PayloadSource::Given(describe);
            self
        }

        /// What generated code registers: a function describing whichever argument is the
        /// payload, when natty can decode it.
        #[doc(hidden)]
        pub const fn payload_probe(mut self, describe: fn() -> Option<$crate::payload::PayloadDescription>) -> Self {
            self.payload = $crate::payload::PayloadSource::Probed(describe);
            self
        }
    };
}
pub(crate) use handler_definition_setters;

/// The [`PayloadDescription`] of a payload type `T`.
#[doc(hidden)]
pub fn describe_payload<T: DecodePayload>() -> PayloadDescription {
    PayloadDescription {
        type_name: std::any::type_name::<T>(),
        format: T::FORMAT,
        schema: T::json_schema(),
    }
}

/// A message type that knows its subject and format: derive it.
///
/// ```ignore
/// #[derive(Serialize, Deserialize, Payload)]
/// #[payload(subject = "orders.{store}.created")]
/// struct OrderCreated { store: String, total_cents: u64 }
///
/// #[derive(Clone, PartialEq, prost::Message, Payload)]
/// #[payload(subject = "billing.invoiced", format = "protobuf")]
/// struct Invoiced { #[prost(string, tag = "1")] order_id: String }
/// ```
///
/// `subject` may name fields in braces; each is formatted with `Display`, and its text must be
/// exactly one subject token (see [`subject_token`]): a field value comes from users' data,
/// and a value such as `"a.b"`, `"*"` or `">"` would otherwise publish to another subject than
/// the template says. The default format is JSON through serde; `format = "protobuf"` encodes
/// and decodes with prost instead (the type must then not also implement serde's traits).
/// Publish one with [`Client::emit`](crate::Client::emit), no subject needed.
pub trait Payload: EncodePayload {
    /// The subject this value is published to.
    ///
    /// # Errors
    ///
    /// [`PublishError::InvalidSubjectField`] when a field named in the subject template holds
    /// a value that is not exactly one subject token: then the value has no subject.
    fn subject(&self) -> Result<Cow<'_, str>, PublishError>;
}

/// Why `token` cannot be one subject token, or `None` when it can: it must be non-empty and
/// hold no `.` (which would split it into several tokens), no `*` or `>` (wildcards, which the
/// server stores literally but every subscriber reads as patterns), no whitespace and no control
/// character (`DEL` and the C0/C1 ranges: they break the protocol line or are invisible in logs).
///
/// This is stricter than the server, which takes `*` and `>` inside a longer token literally:
/// a value from users' data has no business carrying them.
pub fn token_problem(token: &str) -> Option<&'static str> {
    if token.is_empty() {
        return Some("it is empty");
    }
    token.chars().find_map(|c| match c {
        '.' => Some("it contains `.`, which would split it into several subject tokens"),
        '*' | '>' => Some("it contains a wildcard character (`*` or `>`)"),
        c if c.is_whitespace() => Some("it contains whitespace"),
        c if c.is_control() => Some("it contains a control character"),
        _ => None,
    })
}

/// The text of `value`, a field of `type_name` filling the placeholder `{field}` of the subject
/// template `template`, checked to be exactly one subject token (see [`token_problem`]).
/// Generated `Payload::subject` impls call it for each placeholder. Not part of the API.
///
/// # Errors
///
/// [`PublishError::InvalidSubjectField`] naming the type, the field and the value.
#[doc(hidden)]
pub fn subject_token(
    type_name: &'static str,
    field: &'static str,
    template: &'static str,
    value: &dyn std::fmt::Display,
) -> Result<String, PublishError> {
    let value = value.to_string();
    match token_problem(&value) {
        None => Ok(value),
        Some(problem) => Err(PublishError::InvalidSubjectField {
            type_name,
            field,
            value,
            template,
            problem,
        }),
    }
}

/// A payload that could not be decoded: the message is terminated, never retried.
#[derive(Debug, thiserror::Error)]
#[error("{}", describe(self))]
pub struct DecodeError {
    /// The Rust type the handler expected.
    pub type_name: &'static str,
    /// The format that type is decoded from.
    pub expected: Format,
    /// The message's `Content-Type`, when it named a different format (or one natty does not know).
    pub content_type: Option<String>,
    /// What the decoder reported; `None` when the content type alone ruled the message out.
    #[source]
    pub source: Option<BoxError>,
}

fn describe(error: &DecodeError) -> String {
    match (&error.content_type, &error.source) {
        (Some(found), _) => format!(
            "the payload is `{found}` but {} is decoded from {} (`{}`)",
            error.type_name,
            error.expected,
            error.expected.content_type()
        ),
        (None, Some(_)) => format!("cannot decode the payload as {} ({})", error.type_name, error.expected),
        (None, None) => format!("cannot decode the payload as {}", error.type_name),
    }
}

/// Decodes `payload` as `T`, first checking the `Content-Type` header when there is one: a
/// message without it is tried in `T`'s format (natty sends JSON without it, and publishers
/// other than natty rarely set it). One exception: a Protobuf type is not tried on a payload
/// without the header that begins with `{` or `[`, as JSON does. Those bytes would begin a
/// group (field 15 or 11), which proto3 does not have, and a decoder skipping an unknown group
/// may well accept JSON text and hand the handler a message of defaults.
///
/// # Errors
///
/// [`DecodeError`] naming the type, the formats and the decoder's complaint.
pub fn decode<T: DecodePayload>(headers: Option<&HeaderMap>, payload: &[u8]) -> Result<T, DecodeError> {
    let refused = |content_type: Option<&str>, source: Option<BoxError>| DecodeError {
        type_name: std::any::type_name::<T>(),
        expected: T::FORMAT,
        content_type: content_type.map(str::to_owned),
        source,
    };
    match headers.and_then(|headers| headers.get(CONTENT_TYPE)) {
        Some(found) if Format::from_content_type(found.as_str()) != Some(T::FORMAT) => {
            return Err(refused(Some(found.as_str()), None));
        }
        None if T::FORMAT == Format::Protobuf && matches!(payload.first(), Some(b'{' | b'[')) => {
            return Err(refused(None, Some(Box::new(LooksLikeJson(payload[0] as char)))));
        }
        _ => {}
    }
    T::from_bytes(payload).map_err(|source| refused(None, Some(source)))
}

/// Why a Protobuf type was not tried on a payload without a `Content-Type` (see [`decode`]).
#[derive(Debug, thiserror::Error)]
#[error("the payload has no Content-Type and begins with `{0}`: it is JSON (`application/json`, which natty sends without the header), not Protobuf")]
struct LooksLikeJson(char);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_round_trip_and_ignore_parameters() {
        for format in [Format::Json, Format::Protobuf] {
            assert_eq!(Format::from_content_type(format.content_type()), Some(format));
        }
        assert_eq!(
            Format::from_content_type("Application/JSON; charset=utf-8"),
            Some(Format::Json)
        );
        assert_eq!(
            Format::from_content_type("application/x-protobuf"),
            Some(Format::Protobuf)
        );
        assert_eq!(Format::from_content_type("text/plain"), None);
    }

    #[test]
    fn a_mismatched_content_type_is_named_in_the_error() {
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, Format::Protobuf.content_type());
        let error = decode::<u32>(Some(&headers), b"1").unwrap_err();
        assert_eq!(error.content_type.as_deref(), Some("application/protobuf"));
        assert!(
            error
                .to_string()
                .contains("`application/protobuf` but u32 is decoded from JSON"),
            "{error}"
        );
    }

    #[test]
    fn without_a_content_type_the_decoder_decides() {
        assert_eq!(decode::<u32>(None, b"7").unwrap(), 7);
        let error = decode::<u32>(None, b"{").unwrap_err();
        assert!(
            error.to_string().starts_with("cannot decode the payload as u32 (JSON)"),
            "{error}"
        );
    }
}
