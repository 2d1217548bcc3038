//! JSON Schemas of payload types: traced from a serde type's `Deserialize` impl with
//! serde-reflection, or a placeholder naming a Protobuf message.
//!
//! The schemas are draft-07, AsyncAPI 3's default schema format, and describe the JSON that
//! serde_json reads: externally tagged enums, `Option` as `null` or absent, bytes as arrays.

use std::collections::{BTreeMap, BTreeSet};
use std::panic::AssertUnwindSafe;

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use serde_reflection::{
    ContainerFormat, Error, Format, FormatHolder, Named, Registry, Samples, Tracer, TracerConfig, VariantFormat,
};

/// Rounds of tracing from scratch, each knowing more nested enums than the one before; a type
/// needs one more round per level of enums hidden inside other enums.
const MAX_ROUNDS: usize = 16;
/// Passes over the type within one round: one per enum variant still to visit.
const MAX_PASSES: usize = 1024;

/// The schema of `T` as serde_json reads it, or an empty schema whose `description` says why
/// `T` cannot be traced. Never panics, even when `T`'s `Deserialize` impl does.
pub(crate) fn traced<T: DeserializeOwned>() -> Value {
    let type_name = std::any::type_name::<T>();
    // A hand-written Deserialize impl may panic on the tracer's made-up values; a document
    // with one schema missing is better than no document.
    match std::panic::catch_unwind(AssertUnwindSafe(trace::<T>)) {
        Ok(Ok((root, registry))) => to_schema(&root, &registry),
        Ok(Err(error)) => untraceable(type_name, &error.to_string()),
        Err(_) => untraceable(type_name, "its Deserialize impl panicked while being traced"),
    }
}

/// The schema a derived Protobuf `Payload` reports. AsyncAPI's own Protobuf schema format
/// wants the `.proto` source, which a prost type does not carry, so this is a JSON Schema
/// object that only names the message; the message's `contentType` says it is Protobuf.
#[doc(hidden)]
pub fn protobuf(name: &str, type_name: &str) -> Value {
    json!({
        "title": name,
        "description": format!(
            "Protobuf message `{type_name}` (prost), sent as application/protobuf; \
             its .proto definition is not part of this document"
        ),
        "x-natty-protobuf-message": name,
    })
}

fn untraceable(type_name: &str, why: &str) -> Value {
    json!({
        "description": format!(
            "no schema: natty describes a payload by tracing its Deserialize impl, and `{type_name}` \
             cannot be traced ({why}); types that deserialize from any value (serde_json::Value, \
             untagged or internally tagged enums, #[serde(flatten)]) cannot be"
        )
    })
}

/// Traces `T` until every enum it contains, however deep, had each variant visited.
///
/// serde-reflection's `trace_type` only repeats for an enum at the top; a nested enum still
/// missing variants is only reported by `registry()`, which consumes the tracer. So each round
/// starts afresh knowing the names reported before, and clears them after each pass so the
/// next pass visits their next variant.
fn trace<T: DeserializeOwned>() -> Result<(Format, Registry), Error> {
    let samples = Samples::new();
    let mut enums: BTreeSet<String> = BTreeSet::new();
    for _ in 0..MAX_ROUNDS {
        // serde_json is human-readable: types such as IP addresses or UUIDs read strings there.
        let mut tracer = Tracer::new(TracerConfig::default().is_human_readable(true));
        let mut root = Format::unknown();
        for _ in 0..MAX_PASSES {
            let (format, _) = tracer.trace_type_once::<T>(&samples)?;
            if let Format::TypeName(name) = &format {
                enums.insert(name.clone());
            }
            root = format;
            let mut incomplete = false;
            for name in &enums {
                incomplete |= tracer.check_incomplete_enum(name).is_some();
            }
            if !incomplete {
                break;
            }
        }
        match tracer.registry() {
            Ok(registry) => {
                root.normalize()?;
                return Ok((root, registry));
            }
            Err(Error::MissingVariants(names)) if names.iter().any(|name| !enums.contains(name)) => {
                enums.extend(names);
            }
            Err(error) => return Err(error),
        }
    }
    Err(Error::Custom("enums nested too deeply to trace".into()))
}

/// Builds the schema of `root`: a named container inline (titled with its name), every other
/// named container it refers to under `definitions`.
fn to_schema(root: &Format, registry: &Registry) -> Value {
    let keys = definition_keys(registry);
    let mut builder = Builder {
        registry,
        keys: &keys,
        referenced: BTreeSet::new(),
    };
    let mut schema = match root {
        Format::TypeName(name) => builder.named(name),
        other => builder.format(other),
    };
    let mut definitions = Map::new();
    let mut done = BTreeSet::new();
    // Containers refer to one another, possibly in cycles: expand each referenced name once.
    while let Some(name) = builder.referenced.iter().find(|name| !done.contains(*name)).cloned() {
        done.insert(name.clone());
        let definition = builder.named(&name);
        definitions.insert(keys[&name].clone(), definition);
    }
    if !definitions.is_empty() {
        if let Value::Object(object) = &mut schema {
            object.insert("definitions".into(), Value::Object(definitions));
        }
    }
    schema
}

/// A key for each container name that AsyncAPI accepts (`^[A-Za-z0-9._-]+$`): serde names are
/// usually Rust identifiers, but `#[serde(rename)]` allows anything.
fn definition_keys(registry: &Registry) -> BTreeMap<String, String> {
    let mut keys = BTreeMap::new();
    let mut taken = BTreeSet::new();
    for name in registry.keys() {
        let base = sanitize_key(name);
        let mut key = base.clone();
        let mut n = 2;
        while !taken.insert(key.clone()) {
            key = format!("{base}_{n}");
            n += 1;
        }
        keys.insert(name.clone(), key);
    }
    keys
}

struct Builder<'a> {
    registry: &'a Registry,
    keys: &'a BTreeMap<String, String>,
    /// Names referred to with `$ref`, to put under `definitions`.
    referenced: BTreeSet<String>,
}

impl Builder<'_> {
    fn named(&mut self, name: &str) -> Value {
        let Some(container) = self.registry.get(name) else {
            return json!({ "title": name });
        };
        let mut schema = match container {
            ContainerFormat::UnitStruct => json!({ "type": "null" }),
            // serde_json reads a newtype struct as its content; `allOf` keeps the title
            // beside a `$ref`, which draft-07 would otherwise ignore.
            ContainerFormat::NewTypeStruct(inner) => json!({ "allOf": [self.format(inner)] }),
            ContainerFormat::TupleStruct(items) => self.tuple(items),
            ContainerFormat::Struct(fields) => self.object(fields),
            ContainerFormat::Enum(variants) => self.enumeration(variants),
        };
        if let Value::Object(object) = &mut schema {
            object.insert("title".into(), Value::String(name.to_owned()));
        }
        schema
    }

    fn format(&mut self, format: &Format) -> Value {
        match format {
            Format::Variable(_) => json!({}),
            Format::TypeName(name) => {
                self.referenced.insert(name.clone());
                let key = self.keys.get(name).cloned().unwrap_or_else(|| sanitize_key(name));
                json!({ "$ref": format!("#/definitions/{key}") })
            }
            Format::Unit => json!({ "type": "null" }),
            Format::Bool => json!({ "type": "boolean" }),
            Format::I8 => integer(i8::MIN.into(), i8::MAX.into()),
            Format::I16 => integer(i16::MIN.into(), i16::MAX.into()),
            Format::I32 => integer(i32::MIN.into(), i32::MAX.into()),
            Format::I64 => integer(i64::MIN.into(), i64::MAX.into()),
            Format::U8 => integer(0.into(), u8::MAX.into()),
            Format::U16 => integer(0.into(), u16::MAX.into()),
            Format::U32 => integer(0.into(), u32::MAX.into()),
            Format::U64 => integer(0.into(), u64::MAX.into()),
            // 128-bit bounds do not fit a JSON number that every tool reads.
            Format::I128 => json!({ "type": "integer" }),
            Format::U128 => json!({ "type": "integer", "minimum": 0 }),
            Format::F32 | Format::F64 => json!({ "type": "number" }),
            Format::Char => json!({ "type": "string", "minLength": 1, "maxLength": 1 }),
            Format::Str => json!({ "type": "string" }),
            // serde_json writes bytes as an array of numbers.
            Format::Bytes => json!({ "type": "array", "items": integer(0.into(), u8::MAX.into()) }),
            Format::Option(inner) => json!({ "anyOf": [self.format(inner), { "type": "null" }] }),
            Format::Seq(inner) => json!({ "type": "array", "items": self.format(inner) }),
            // JSON object keys are strings: serde_json writes numeric keys as their digits.
            Format::Map { value, .. } => json!({ "type": "object", "additionalProperties": self.format(value) }),
            Format::Tuple(items) => self.tuple(items),
            Format::TupleArray { content, size } => json!({
                "type": "array",
                "items": self.format(content),
                "minItems": size,
                "maxItems": size,
            }),
        }
    }

    fn tuple(&mut self, items: &[Format]) -> Value {
        let schemas: Vec<Value> = items.iter().map(|item| self.format(item)).collect();
        json!({ "type": "array", "items": schemas, "minItems": items.len(), "maxItems": items.len() })
    }

    /// A struct: every field a property, required unless it is an `Option` (serde_derive
    /// reads a missing `Option` field as `None`).
    fn object(&mut self, fields: &[Named<Format>]) -> Value {
        let mut properties = Map::new();
        let mut required = Vec::new();
        for field in fields {
            if !matches!(field.value, Format::Option(_)) {
                required.push(Value::String(field.name.clone()));
            }
            properties.insert(field.name.clone(), self.format(&field.value));
        }
        let mut schema = json!({ "type": "object", "properties": properties });
        if !required.is_empty() {
            schema["required"] = Value::Array(required);
        }
        schema
    }

    /// An externally tagged enum, as serde_json reads it: a unit variant is its name as a
    /// string, any other an object with the variant's name as its only key.
    fn enumeration(&mut self, variants: &BTreeMap<u32, Named<VariantFormat>>) -> Value {
        let mut units = Vec::new();
        let mut others = Vec::new();
        for variant in variants.values() {
            let content = match &variant.value {
                VariantFormat::Unit => {
                    units.push(Value::String(variant.name.clone()));
                    continue;
                }
                VariantFormat::Variable(_) => json!({}),
                VariantFormat::NewType(inner) => self.format(inner),
                VariantFormat::Tuple(items) => self.tuple(items),
                VariantFormat::Struct(fields) => self.object(fields),
            };
            others.push(json!({
                "type": "object",
                "properties": { variant.name.clone(): content },
                "required": [variant.name],
                "additionalProperties": false,
            }));
        }
        let units = json!({ "type": "string", "enum": units });
        match (others.is_empty(), units["enum"].as_array().is_some_and(Vec::is_empty)) {
            (true, _) => units,
            (false, true) => json!({ "oneOf": others }),
            (false, false) => {
                others.insert(0, units);
                json!({ "oneOf": others })
            }
        }
    }
}

fn integer(minimum: Value, maximum: Value) -> Value {
    json!({ "type": "integer", "minimum": minimum, "maximum": maximum })
}

/// A key AsyncAPI accepts for channels, operations and components (`^[A-Za-z0-9_-]+$`).
pub(crate) fn sanitize_key(name: &str) -> String {
    let key: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let key = key.trim_matches('_');
    if key.is_empty() {
        "_".to_owned()
    } else {
        key.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Line {
        sku: String,
        quantity: u16,
        kind: Kind,
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    enum Kind {
        Physical,
        Digital { url: String },
        Voucher(u32),
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Order {
        id: String,
        note: Option<String>,
        lines: Vec<Line>,
        first: Line,
    }

    #[test]
    fn structs_nested_enums_options_and_sequences() {
        let schema = traced::<Order>();
        assert_eq!(schema["title"], "Order");
        assert_eq!(schema["required"], json!(["id", "lines", "first"]));
        assert_eq!(schema["properties"]["note"]["anyOf"][1], json!({ "type": "null" }));
        assert_eq!(schema["properties"]["lines"]["items"]["$ref"], "#/definitions/Line");
        assert_eq!(schema["properties"]["first"]["$ref"], "#/definitions/Line");
        let line = &schema["definitions"]["Line"];
        assert_eq!(line["properties"]["quantity"], integer(0.into(), 65535.into()));
        let kind = &schema["definitions"]["Kind"]["oneOf"];
        // The nested enum is traced in full, every variant in declaration order.
        assert_eq!(kind[0], json!({ "type": "string", "enum": ["Physical"] }));
        assert_eq!(kind[1]["properties"]["Digital"]["required"], json!(["url"]));
        assert_eq!(kind[2]["properties"]["Voucher"]["maximum"], json!(u32::MAX));
    }

    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Tree {
        children: Vec<Tree>,
    }

    #[test]
    fn a_recursive_type_refers_to_itself() {
        let schema = traced::<Tree>();
        assert_eq!(schema["properties"]["children"]["items"]["$ref"], "#/definitions/Tree");
        assert_eq!(schema["definitions"]["Tree"]["title"], "Tree");
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    #[allow(dead_code)]
    enum Loose {
        Number(u32),
        Text(String),
    }

    #[test]
    fn an_untraceable_type_gets_an_empty_schema_that_says_why() {
        let schema = traced::<Loose>();
        let description = schema["description"].as_str().unwrap_or_default();
        assert!(description.contains("cannot be traced"), "{schema}");
        assert_eq!(schema.as_object().map(Map::len), Some(1), "{schema}");
    }

    #[test]
    fn primitives_and_collections() {
        assert_eq!(traced::<String>(), json!({ "type": "string" }));
        assert_eq!(traced::<i8>(), integer((-128).into(), 127.into()));
        let map = traced::<std::collections::HashMap<String, bool>>();
        assert_eq!(map["additionalProperties"], json!({ "type": "boolean" }));
        assert_eq!(traced::<(u8, String)>()["items"][1], json!({ "type": "string" }));
    }
}
