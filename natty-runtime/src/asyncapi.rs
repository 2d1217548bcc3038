//! The AsyncAPI 3 document of a service: what it receives, on which subjects, in which
//! format and shape, built from a service's declarations. Also the glue the macros
//! use to record each handler's payload type without adding compile errors of their own.

use std::collections::BTreeMap;

use serde_json::{json, Map, Value};

use crate::args::Probe;
use crate::config::Config;
use crate::kv_watch::KvChange;
use crate::payload::{describe_payload as describe, DecodePayload, EncodePayload, PayloadDescription};
use crate::registry::Declarations;
use crate::schedule::{go_duration, Spec};
use crate::schema::sanitize_key;
use crate::stream::Location;
use crate::subscribe::CoreKind;

/// `info.version` when [`Config::service_version`] is unset: natty cannot see the application's own
/// crate version, only its own.
const DEFAULT_VERSION: &str = "0.0.0";

/// A service as its AsyncAPI document sees it: its settings and its declarations.
pub(crate) struct Service<'a> {
    pub(crate) config: &'a Config,
    pub(crate) declared: &'a Declarations,
}

impl Service<'_> {
    /// The document [`Runtime::asyncapi`](crate::Runtime::asyncapi) returns.
    pub(crate) fn document(&self) -> Value {
        let mut document = Document::default();
        for def in &self.declared.consumers {
            let durable = def.durable();
            let summary = match durable {
                Some(durable) if def.partitions > 0 => format!(
                    "consumer `{}` on stream `{}`, durable `{durable}` in {} partitions (one instance owns each), declared at {}",
                    def.name, def.stream, def.partitions, def.location
                ),
                Some(durable) => format!(
                    "consumer `{}` on stream `{}`, durable `{durable}`, declared at {}",
                    def.name, def.stream, def.location
                ),
                None => format!(
                    "ephemeral consumer `{}` on stream `{}`, declared at {}",
                    def.name, def.stream, def.location
                ),
            };
            let mut natty = json!({
                "kind": "consumer",
                "stream": def.stream,
                "durable": durable,
                "location": location(def.location),
            });
            if def.partitions > 0 {
                natty["partitions"] = json!(def.partitions);
            }
            document.add(Operation {
                action: "receive",
                name: def.name,
                summary,
                addresses: self.stream_addresses(def.stream, def.subjects),
                payload: def.payload.describe(),
                reply: None,
                natty,
            });
        }
        #[cfg(feature = "capture")]
        for def in &self.declared.captures {
            let mut natty = json!({
                "kind": "capture",
                "stream": def.stream,
                "durable": def.durable,
                "location": location(def.location),
            });
            let mut grouped = String::new();
            if def.partitions > 0 {
                natty["partitions"] = json!(def.partitions);
                grouped = format!(" in {} partitions (one instance captures each)", def.partitions);
            }
            document.add(Operation {
                action: "receive",
                name: def.name,
                summary: format!(
                    "capture `{}` on stream `{}`, durable `{}`{grouped}, declared at {}",
                    def.name, def.stream, def.durable, def.location
                ),
                addresses: self.stream_addresses(def.stream, def.subjects),
                payload: def.payload.describe(),
                reply: None,
                natty,
            });
        }
        for def in &self.declared.subscriptions {
            let (kind, reply) = match def.kind {
                CoreKind::Subscribe => ("subscription", None),
                CoreKind::Service => ("service", def.reply),
            };
            let queue = def
                .queue
                .map(|queue| format!(" in queue group `{queue}`"))
                .unwrap_or_default();
            document.add(Operation {
                action: "receive",
                name: def.name,
                summary: format!("{kind} `{}`{queue}, declared at {}", def.name, def.location),
                addresses: vec![Address::subject(def.subject)],
                payload: def.payload.describe(),
                reply,
                natty: json!({
                    "kind": kind,
                    "queue": def.queue,
                    "location": location(def.location),
                }),
            });
        }
        for def in &self.declared.kv_watches {
            document.add(Operation {
                action: "receive",
                name: def.name,
                summary: format!(
                    "KV watch `{}` on bucket `{}`, key `{}`, declared at {}",
                    def.name, def.bucket, def.key, def.location
                ),
                addresses: vec![Address::subject(&format!("$KV.{}.{}", def.bucket, def.key))],
                payload: def.payload.describe(),
                reply: None,
                natty: json!({
                    "kind": "kv_watch",
                    "bucket": def.bucket,
                    "key": def.key,
                    "location": location(def.location),
                }),
            });
        }
        for def in &self.declared.schedules {
            let zone = def.time_zone.map(|zone| format!(" ({zone})")).unwrap_or_default();
            let when = match def.spec {
                Spec::Cron(expression) => format!("on `{expression}`{zone}"),
                Spec::Every(every) => format!("every {}", go_duration(every)),
            };
            document.add(Operation {
                action: "send",
                name: def.name,
                summary: format!(
                    "schedule `{}` on stream `{}`: the server publishes its body {when}, declared at {}",
                    def.name, def.stream, def.location
                ),
                addresses: vec![Address::subject(def.subject)],
                payload: def.payload.describe(),
                reply: None,
                natty: json!({
                    "kind": "schedule",
                    "stream": def.stream,
                    "schedule": def.spec.header(),
                    "time_zone": def.time_zone,
                    "location": location(def.location),
                }),
            });
        }

        let version = self.config.service_version.as_deref().unwrap_or(DEFAULT_VERSION);
        let streams: Vec<Value> = self
            .declared
            .streams
            .iter()
            .map(|stream| {
                json!({
                    "name": stream.name,
                    "subjects": stream.subjects,
                    "description": stream.description,
                    "location": location(stream.location),
                })
            })
            .collect();
        let leaders: Vec<Value> = self
            .declared
            .leaders
            .iter()
            .map(|leader| {
                json!({
                    "name": leader.name,
                    "bucket": leader.bucket,
                    "key": leader.key,
                    "location": location(leader.location),
                })
            })
            .collect();
        json!({
            "asyncapi": "3.0.0",
            "info": {
                "title": self.config.name,
                "version": version,
                "description": "What this service receives, and what it has the server publish on a schedule, generated by natty from its registered handlers and schedules.",
            },
            "defaultContentType": "application/json",
            "servers": self.servers(),
            "channels": document.channels,
            "operations": document.operations,
            "components": {
                "messages": document.messages,
                "schemas": document.schemas,
            },
            "x-natty": { "streams": streams, "leaders": leaders },
        })
    }

    /// A consumer's or capture's subjects: its filters, else every subject of its stream.
    fn stream_addresses(&self, stream: &str, filters: &[&str]) -> Vec<Address> {
        if !filters.is_empty() {
            return filters.iter().map(|subject| Address::subject(subject)).collect();
        }
        let mut subjects: Vec<&str> = Vec::new();
        for declared in self.declared.streams.iter().filter(|declared| declared.name == stream) {
            for subject in declared.subjects {
                if !subjects.contains(subject) {
                    subjects.push(subject);
                }
            }
        }
        if subjects.is_empty() {
            // A stream provisioned elsewhere: its subjects are only known to the server.
            return vec![Address {
                address: None,
                key: format!("stream_{stream}"),
                description: Some(format!(
                    "every subject of stream `{stream}`, which this service does not declare"
                )),
            }];
        }
        subjects.into_iter().map(Address::subject).collect()
    }

    fn servers(&self) -> Value {
        let mut servers = Map::new();
        let Some(urls) = &self.config.url else {
            servers.insert(
                "development".into(),
                json!({
                    "host": format!("127.0.0.1:{}", self.config.dev_port),
                    "protocol": "nats",
                    "description": "the development server natty starts when NATS_URL is unset",
                }),
            );
            return Value::Object(servers);
        };
        for url in urls.split(',').map(str::trim).filter(|url| !url.is_empty()) {
            let (scheme, rest) = url.split_once("://").unwrap_or(("nats", url));
            let authority = rest.split('/').next().unwrap_or_default();
            // User and password may sit in the URL; a published document must not show them.
            let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
            let protocol = match scheme.to_ascii_lowercase().as_str() {
                "ws" => "ws",
                "wss" => "wss",
                _ => "nats",
            };
            let mut server = json!({ "host": host, "protocol": protocol });
            if scheme.eq_ignore_ascii_case("tls") || scheme.eq_ignore_ascii_case("wss") {
                server["description"] = json!("TLS");
            }
            let key = unique_key(&servers, "nats");
            servers.insert(key, server);
        }
        Value::Object(servers)
    }
}

fn location(location: Location) -> Value {
    json!({ "file": location.file, "line": location.line, "module": location.module })
}

/// Where a handler receives from.
struct Address {
    /// The subject; `None` when it is not known here.
    address: Option<String>,
    /// What the channel's key is derived from.
    key: String,
    description: Option<String>,
}

impl Address {
    fn subject(subject: &str) -> Address {
        // NATS wildcards are not valid in a key: `orders.*.created` -> `orders_any_created`.
        let key = subject
            .split('.')
            .map(|token| match token {
                "*" => "any",
                ">" => "all",
                other => other,
            })
            .collect::<Vec<_>>()
            .join("_");
        Address {
            address: Some(subject.to_owned()),
            key,
            description: None,
        }
    }
}

/// One handler or schedule, as the document sees it.
struct Operation {
    /// `receive` (a handler) or `send` (a schedule).
    action: &'static str,
    name: &'static str,
    summary: String,
    addresses: Vec<Address>,
    payload: Option<PayloadDescription>,
    reply: Option<fn() -> PayloadDescription>,
    natty: Value,
}

#[derive(Default)]
struct Document {
    channels: Map<String, Value>,
    /// Channel key by subject, so handlers on one subject share a channel.
    channel_keys: BTreeMap<String, String>,
    operations: Map<String, Value>,
    messages: Map<String, Value>,
    /// Message key by Rust type, so handlers of one type share a message.
    message_keys: BTreeMap<&'static str, String>,
    schemas: Map<String, Value>,
}

impl Document {
    fn add(&mut self, declared: Operation) {
        let message = declared.payload.map(|payload| self.message(payload));
        let reply = declared.reply.map(|describe| self.message(describe()));
        let several = declared.addresses.len() > 1;
        for address in &declared.addresses {
            let channel = self.channel(address);
            let base = if several {
                format!("{}_{channel}", declared.name)
            } else {
                declared.name.to_owned()
            };
            let id = unique_key(&self.operations, &sanitize_key(&base));
            let mut operation = json!({
                "action": declared.action,
                "channel": { "$ref": format!("#/channels/{channel}") },
                "summary": declared.summary,
                "x-natty": declared.natty,
            });
            if let Some(message) = &message {
                self.channels[&channel]["messages"][message] =
                    json!({ "$ref": format!("#/components/messages/{message}") });
                operation["messages"] = json!([{ "$ref": format!("#/channels/{channel}/messages/{message}") }]);
            }
            if let Some(reply) = &reply {
                // A NATS reply goes to the subject the requester named in the request, not to a
                // subject known ahead: AsyncAPI's dynamic channel, with a null address.
                let reply_channel = unique_key(&self.channels, &format!("{id}_reply"));
                self.channels.insert(
                    reply_channel.clone(),
                    json!({
                        "address": null,
                        "description": "the requester's inbox: the reply subject of each request",
                        "messages": { reply: { "$ref": format!("#/components/messages/{reply}") } },
                    }),
                );
                operation["reply"] = json!({
                    "channel": { "$ref": format!("#/channels/{reply_channel}") },
                    "messages": [{ "$ref": format!("#/channels/{reply_channel}/messages/{reply}") }],
                });
            }
            self.operations.insert(id, operation);
        }
    }

    /// The key of the channel for `address`, adding it when new.
    fn channel(&mut self, address: &Address) -> String {
        let lookup = match &address.address {
            Some(subject) => subject.clone(),
            None => format!("\0{}", address.key),
        };
        if let Some(key) = self.channel_keys.get(&lookup) {
            return key.clone();
        }
        let key = unique_key(&self.channels, &sanitize_key(&address.key));
        let mut channel = json!({ "address": address.address, "messages": {} });
        if let Some(description) = &address.description {
            channel["description"] = json!(description);
        }
        self.channels.insert(key.clone(), channel);
        self.channel_keys.insert(lookup, key.clone());
        key
    }

    /// The key of the message for a payload type, adding it (and its schemas) when new.
    fn message(&mut self, description: PayloadDescription) -> String {
        if let Some(key) = self.message_keys.get(description.type_name) {
            return key.clone();
        }
        let short = short_type_name(description.type_name);
        let key = unique_key(&self.messages, &sanitize_key(&short));
        let mut payload = description.schema;
        self.hoist(&mut payload);
        self.messages.insert(
            key.clone(),
            json!({
                "name": key,
                "title": short,
                "summary": format!("`{}`, as {}", description.type_name, description.format),
                "contentType": description.format.content_type(),
                "payload": payload,
            }),
        );
        self.message_keys.insert(description.type_name, key.clone());
        key
    }

    /// Moves a schema's `definitions` into `components.schemas` and points its `$ref`s there.
    /// A definition equal to one already there is shared; a different one of the same name
    /// (two types named alike in different modules) gets a key of its own.
    fn hoist(&mut self, schema: &mut Value) {
        let Some(Value::Object(definitions)) = schema.as_object_mut().and_then(|object| object.remove("definitions"))
        else {
            rewrite_refs(schema, &BTreeMap::new());
            return;
        };
        let mut targets: BTreeMap<String, String> = definitions.keys().map(|k| (k.clone(), k.clone())).collect();
        // A renamed definition changes the ones referring to it, which may then clash too:
        // repeat until the choice of keys is stable (each round renames at least one more).
        let mut rewritten;
        loop {
            rewritten = Map::new();
            let mut renamed = false;
            for (name, definition) in &definitions {
                let mut definition = definition.clone();
                rewrite_refs(&mut definition, &targets);
                let target = &targets[name];
                if self.schemas.get(target).is_some_and(|existing| *existing != definition) {
                    let fresh = (2..)
                        .map(|n| format!("{name}_{n}"))
                        .find(|key| !self.schemas.contains_key(key) && !targets.values().any(|t| t == key))
                        .unwrap_or_else(|| name.clone());
                    targets.insert(name.clone(), fresh);
                    renamed = true;
                }
                rewritten.insert(targets[name].clone(), definition);
            }
            if !renamed {
                break;
            }
        }
        for (key, definition) in rewritten {
            self.schemas.entry(key).or_insert(definition);
        }
        rewrite_refs(schema, &targets);
    }
}

/// Points `#/definitions/<name>` at `#/components/schemas/<target>`.
fn rewrite_refs(value: &mut Value, targets: &BTreeMap<String, String>) {
    match value {
        Value::Object(object) => {
            if let Some(Value::String(reference)) = object.get_mut("$ref") {
                if let Some(name) = reference.strip_prefix("#/definitions/") {
                    let target = targets.get(name).map_or(name, String::as_str);
                    *reference = format!("#/components/schemas/{target}");
                }
            }
            object.values_mut().for_each(|value| rewrite_refs(value, targets));
        }
        Value::Array(items) => items.iter_mut().for_each(|value| rewrite_refs(value, targets)),
        _ => {}
    }
}

/// `key`, or `key_2`, `key_3`... whichever `map` does not have yet.
fn unique_key(map: &Map<String, Value>, key: &str) -> String {
    if !map.contains_key(key) {
        return key.to_owned();
    }
    (2..)
        .map(|n| format!("{key}_{n}"))
        .find(|candidate| !map.contains_key(candidate))
        .unwrap_or_else(|| key.to_owned())
}

/// `alloc::vec::Vec<shop::Order>` -> `Vec<Order>`: each path cut to its last segment.
fn short_type_name(type_name: &str) -> String {
    let mut short = String::new();
    let mut path = String::new();
    for c in type_name.chars().chain(std::iter::once('\0')) {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            path.push(c);
            continue;
        }
        short.push_str(path.rsplit("::").next().unwrap_or_default());
        path.clear();
        if c != '\0' {
            short.push(c);
        }
    }
    short
}

/// A handler argument that is a KV watch's change: its value's payload. Not part of the API.
pub trait ArgKvValue {
    /// Describes the payload this argument stands for.
    fn describe_arg(&self) -> Option<PayloadDescription>;
}

impl<T: DecodePayload> ArgKvValue for &&Probe<KvChange<T>> {
    fn describe_arg(&self) -> Option<PayloadDescription> {
        Some(describe::<T>())
    }
}

/// A batch handler's messages: `Vec<T>` or `Batch<T>` of a decodable `T`, whose payload is
/// `T`. Only batch handlers' describers bring it in scope. Not part of the API.
pub trait ArgBatchItems {
    /// Describes the payload of each message of the batch.
    fn describe_arg(&self) -> Option<PayloadDescription>;
}

impl<T: DecodePayload> ArgBatchItems for &&&Probe<Vec<T>> {
    fn describe_arg(&self) -> Option<PayloadDescription> {
        Some(describe::<T>())
    }
}

impl<T: DecodePayload> ArgBatchItems for &&&Probe<crate::consumer::Batch<T>> {
    fn describe_arg(&self) -> Option<PayloadDescription> {
        Some(describe::<T>())
    }
}

/// A handler argument that is a decodable payload. Not part of the API.
pub trait ArgDecoded {
    /// Describes the payload this argument stands for.
    fn describe_arg(&self) -> Option<PayloadDescription>;
}

impl<T: DecodePayload> ArgDecoded for &Probe<T> {
    fn describe_arg(&self) -> Option<PayloadDescription> {
        Some(describe::<T>())
    }
}

/// Any other handler argument: one the runtime provides, or one the handler's own
/// compilation refuses (reported there, once). Not part of the API.
pub trait ArgOther {
    /// Describes the payload this argument stands for: none.
    fn describe_arg(&self) -> Option<PayloadDescription>;
}

impl<T> ArgOther for Probe<T> {
    fn describe_arg(&self) -> Option<PayloadDescription> {
        None
    }
}

/// A `#[service]`'s `Result<R, E>` with a decodable reply `R`. Not part of the API.
#[doc(hidden)]
pub trait DescribeDecodedReply {
    /// Describes the reply.
    fn describe_reply(&self) -> PayloadDescription;
}

impl<R: DecodePayload, E> DescribeDecodedReply for &&Probe<Result<R, E>> {
    fn describe_reply(&self) -> PayloadDescription {
        describe::<R>()
    }
}

/// A `#[service]`'s `Result<R, E>` whose reply `R` is only encodable. Not part of the API.
#[doc(hidden)]
pub trait DescribeEncodedReply {
    /// Describes the reply.
    fn describe_reply(&self) -> PayloadDescription;
}

impl<R: EncodePayload, E> DescribeEncodedReply for &Probe<Result<R, E>> {
    fn describe_reply(&self) -> PayloadDescription {
        encoded_only::<R>()
    }
}

/// A type natty sends but cannot describe: it traces `Deserialize` impls, and `T` is only
/// `Serialize` (or Protobuf-encodable).
fn encoded_only<T: EncodePayload>() -> PayloadDescription {
    PayloadDescription {
        type_name: std::any::type_name::<T>(),
        format: T::FORMAT,
        schema: json!({
            "description": format!(
                "no schema: natty traces a type's Deserialize impl to describe it, and `{}` is \
                 only Serialize; derive Deserialize too to describe it",
                std::any::type_name::<T>()
            )
        }),
    }
}

/// Any other return type (the handler does not compile then). Not part of the API.
#[doc(hidden)]
pub trait DescribeUnknownReply {
    /// Describes the reply.
    fn describe_reply(&self) -> PayloadDescription;
}

impl<T> DescribeUnknownReply for Probe<T> {
    fn describe_reply(&self) -> PayloadDescription {
        unknown::<T>("not a `Result` natty can reply with")
    }
}

/// A `#[schedule]`'s body of a type natty can decode too. Not part of the API.
#[doc(hidden)]
pub trait DescribeDecodedBody {
    /// Describes the body.
    fn describe_body(&self) -> PayloadDescription;
}

impl<T: DecodePayload> DescribeDecodedBody for &&Probe<T> {
    fn describe_body(&self) -> PayloadDescription {
        describe::<T>()
    }
}

/// A `#[schedule]`'s body of a type natty can only encode. Not part of the API.
#[doc(hidden)]
pub trait DescribeEncodedBody {
    /// Describes the body.
    fn describe_body(&self) -> PayloadDescription;
}

impl<T: EncodePayload> DescribeEncodedBody for &Probe<T> {
    fn describe_body(&self) -> PayloadDescription {
        encoded_only::<T>()
    }
}

/// Any other body type (the schedule does not compile then). Not part of the API.
#[doc(hidden)]
pub trait DescribeUnknownBody {
    /// Describes the body.
    fn describe_body(&self) -> PayloadDescription;
}

impl<T> DescribeUnknownBody for Probe<T> {
    fn describe_body(&self) -> PayloadDescription {
        unknown::<T>("not a type natty can publish")
    }
}

fn unknown<T>(why: &str) -> PayloadDescription {
    PayloadDescription {
        type_name: std::any::type_name::<T>(),
        format: crate::payload::Format::Json,
        schema: json!({ "description": format!("no schema: {why}") }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_type_names() {
        assert_eq!(short_type_name("alloc::vec::Vec<shop::Order>"), "Vec<Order>");
        assert_eq!(short_type_name("u32"), "u32");
        assert_eq!(sanitize_key("Vec<Order>"), "Vec_Order");
        assert_eq!(Address::subject("$KV.config.>").key, "$KV_config_all");
        assert_eq!(sanitize_key(&Address::subject("$KV.config.>").key), "KV_config_all");
        assert_eq!(Address::subject("orders.*.created").key, "orders_any_created");
    }

    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Reply {
        total: u64,
    }

    #[derive(serde::Serialize)]
    struct SerializeOnly;

    #[test]
    // The borrows are the point: each level of reference is one level of the probe.
    #[allow(clippy::needless_borrow)]
    fn probes_pick_the_most_specific_description() {
        let value = (&&&Probe::<KvChange<Reply>>::new()).describe_arg().expect("a KV value");
        assert!(value.type_name.ends_with("Reply"), "{}", value.type_name);
        let decoded = (&&&Probe::<Reply>::new()).describe_arg().expect("a payload");
        assert_eq!(decoded.schema["properties"]["total"]["type"], "integer");
        // What the runtime provides, and a type that cannot be an argument at all (its handler
        // does not compile), describe no payload.
        assert!((&&&Probe::<crate::Context>::new()).describe_arg().is_none());
        assert!((&&&Probe::<std::rc::Rc<()>>::new()).describe_arg().is_none());

        let reply = (&&&Probe::<Result<Reply, std::io::Error>>::new()).describe_reply();
        assert!(reply.type_name.ends_with("Reply"));
        let encoded = (&&&Probe::<Result<SerializeOnly, std::io::Error>>::new()).describe_reply();
        assert!(encoded.type_name.ends_with("SerializeOnly"));
        assert!(encoded.schema["description"]
            .as_str()
            .unwrap_or_default()
            .contains("only Serialize"));
        let other = (&&&Probe::<u8>::new()).describe_reply();
        assert_eq!(other.type_name, "u8");
    }
}
