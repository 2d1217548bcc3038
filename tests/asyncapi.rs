//! `Runtime::asyncapi`: the document lists every subject a registered handler receives from,
//! and every subject a `#[schedule]` has the server publish to, with the schema of its payload
//! type, and it is valid AsyncAPI 3 by the official parser.
//!
//! The validation runs `node` on the validator that `scripts/install-asyncapi-parser.sh`
//! installs (`NATTY_ASYNCAPI_VALIDATOR`, or `.natty/asyncapi/validate-asyncapi.cjs`).

use std::path::PathBuf;
use std::process::Command;

use natty_runtime::prelude::*;
use natty_runtime::{Format, Runtime};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[stream(name = "shop", subjects = ["shop.orders.>", "shop.refunds"])]
struct Shop;

#[stream(name = "invoices", subjects = ["shop.invoices"])]
struct Invoices;

#[stream(name = "reminders", subjects = ["shop.reminders"], schedules = true)]
struct Reminders;

/// What the server publishes on the `remind` schedule.
#[derive(Serialize, Deserialize)]
struct Reminder {
    text: String,
}

/// Sent by the server every hour, not received here.
#[schedule(stream = "reminders", subject = "shop.reminders", every = "1h")]
fn remind() -> Reminder {
    Reminder { text: "restock".into() }
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Order {
    id: String,
    customer: Customer,
    note: Option<String>,
    lines: Vec<Line>,
    status: Status,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Customer {
    name: String,
    email: Option<String>,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Line {
    sku: String,
    quantity: u32,
}

#[derive(Deserialize)]
#[allow(dead_code)]
enum Status {
    Open,
    Paid { at: u64 },
    Cancelled(String),
}

/// A Protobuf payload, as prost-build would generate it.
#[derive(Clone, PartialEq, prost::Message, Payload)]
#[payload(subject = "shop.invoices", format = "protobuf")]
struct Invoice {
    #[prost(string, tag = "1")]
    order_id: String,
}

#[derive(Serialize, Deserialize)]
struct Refund {
    order_id: String,
    region: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct QuoteRequest {
    skus: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct Quote {
    total_cents: u64,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct Feature {
    enabled: bool,
}

#[consumer(stream = "shop", durable = "billing", subject = "shop.orders.created")]
async fn bill(order: Order, ctx: Context) -> Result<(), std::io::Error> {
    let _ = (order, ctx);
    Ok(())
}

/// No filter: every subject of its stream.
#[consumer(stream = "shop")]
async fn audit(order: Order) -> Result<(), std::io::Error> {
    let _ = order;
    Ok(())
}

#[consumer(stream = "invoices", durable = "mailer")]
async fn mail(invoice: Invoice) -> Result<(), std::io::Error> {
    let _ = invoice;
    Ok(())
}

#[subscribe(subject = "shop.prices.*", queue = "pricing")]
async fn on_raw_price(price: serde_json::Value) -> Result<(), std::io::Error> {
    let _ = price;
    Ok(())
}

#[service(subject = "shop.quote")]
async fn quote(request: QuoteRequest) -> Result<Quote, std::io::Error> {
    Ok(Quote {
        total_cents: request.skus.len() as u64,
    })
}

#[kv_watch(bucket = "config", key = "features.>")]
async fn on_feature(change: KvChange<Feature>) -> Result<(), std::io::Error> {
    let _ = change;
    Ok(())
}

#[capture(
    stream = "shop",
    durable = "refund-backup",
    subject = "shop.refunds",
    store = "file://refunds/{key}/"
)]
fn backup(refund: &Refund) -> String {
    refund.region.clone()
}

fn document() -> Value {
    Runtime::builder()
        .url("nats://127.0.0.1:4222")
        .name("shop")
        .build()
        .expect("a runtime")
        .asyncapi()
}

/// Follows a local `$ref` (`#/a/b`) to what it points at, or returns `value` itself.
fn resolve<'a>(document: &'a Value, value: &'a Value) -> &'a Value {
    match value["$ref"].as_str() {
        Some(reference) => {
            let pointer = reference.strip_prefix('#').expect("a local reference");
            let target = document
                .pointer(pointer)
                .unwrap_or_else(|| panic!("{reference} resolves"));
            resolve(document, target)
        }
        None => value,
    }
}

/// The channel whose address is `address`.
fn channel<'a>(document: &'a Value, address: &str) -> &'a Value {
    document["channels"]
        .as_object()
        .expect("channels")
        .values()
        .find(|channel| channel["address"] == address)
        .unwrap_or_else(|| panic!("no channel for {address} in {:#}", document["channels"]))
}

/// The messages of the channel on `address`, resolved.
fn messages<'a>(document: &'a Value, address: &str) -> Vec<&'a Value> {
    channel(document, address)["messages"]
        .as_object()
        .expect("messages")
        .values()
        .map(|message| resolve(document, message))
        .collect()
}

/// The one message on `address`.
fn message<'a>(document: &'a Value, address: &str) -> &'a Value {
    let messages = messages(document, address);
    assert_eq!(messages.len(), 1, "one message on {address}: {messages:#?}");
    messages[0]
}

fn operation<'a>(document: &'a Value, name: &str) -> &'a Value {
    let operation = &document["operations"][name];
    assert!(
        operation.is_object(),
        "no operation {name}: {:#}",
        document["operations"]
    );
    operation
}

#[test]
fn every_channel_is_listed_with_its_payload_schema() {
    let document = document();
    assert_eq!(document["asyncapi"], "3.0.0");
    assert_eq!(document["info"]["title"], "shop");
    assert_eq!(
        document["servers"]["nats"],
        json!({ "host": "127.0.0.1:4222", "protocol": "nats" })
    );

    // One channel per subject a handler receives from, and nothing else but the reply inbox.
    let mut addresses: Vec<&str> = document["channels"]
        .as_object()
        .expect("channels")
        .values()
        .filter_map(|channel| channel["address"].as_str())
        .collect();
    addresses.sort_unstable();
    assert_eq!(
        addresses,
        [
            "$KV.config.features.>",
            "shop.invoices",
            "shop.orders.>",
            "shop.orders.created",
            "shop.prices.*",
            "shop.quote",
            "shop.refunds",
            "shop.reminders",
        ]
    );

    // A struct: its fields, a nested struct, an Option, a Vec and an enum.
    let order = message(&document, "shop.orders.created");
    assert_eq!(order["contentType"], "application/json");
    let schema = resolve(&document, &order["payload"]);
    assert_eq!(schema["type"], "object");
    assert_eq!(schema["properties"]["id"], json!({ "type": "string" }));
    assert_eq!(
        schema["required"],
        json!(["id", "customer", "lines", "status"]),
        "an Option is not required"
    );
    assert_eq!(
        schema["properties"]["note"],
        json!({ "anyOf": [{ "type": "string" }, { "type": "null" }] })
    );
    let customer = resolve(&document, &schema["properties"]["customer"]);
    assert_eq!(customer["title"], "Customer");
    assert_eq!(customer["required"], json!(["name"]));
    let lines = &schema["properties"]["lines"];
    assert_eq!(lines["type"], "array");
    let line = resolve(&document, &lines["items"]);
    assert_eq!(
        line["properties"]["quantity"],
        json!({ "type": "integer", "minimum": 0, "maximum": u32::MAX })
    );
    let status = resolve(&document, &schema["properties"]["status"]);
    assert_eq!(
        status["oneOf"],
        json!([
            { "type": "string", "enum": ["Open"] },
            {
                "type": "object",
                "properties": { "Paid": {
                    "type": "object",
                    "properties": { "at": { "type": "integer", "minimum": 0, "maximum": u64::MAX } },
                    "required": ["at"],
                } },
                "required": ["Paid"],
                "additionalProperties": false,
            },
            {
                "type": "object",
                "properties": { "Cancelled": { "type": "string" } },
                "required": ["Cancelled"],
                "additionalProperties": false,
            },
        ])
    );

    // Without a filter, a consumer receives from each subject of its stream; the same type
    // is one message shared by every channel that carries it.
    let order_ref = &channel(&document, "shop.orders.created")["messages"];
    assert_eq!(&channel(&document, "shop.orders.>")["messages"], order_ref);
    let refunds: Vec<&str> = messages(&document, "shop.refunds")
        .iter()
        .map(|message| message["name"].as_str().expect("a name"))
        .collect();
    assert_eq!(refunds, ["Order", "Refund"], "the audit consumer and the capture");
    for id in ["audit_shop_orders_all", "audit_shop_refunds"] {
        assert_eq!(operation(&document, id)["action"], "receive");
    }

    // Protobuf: named, with its content type.
    let invoice = message(&document, "shop.invoices");
    assert_eq!(invoice["contentType"], Format::Protobuf.content_type());
    assert_eq!(invoice["payload"]["title"], "Invoice");

    // A type that cannot be traced still gets a schema, saying why it is empty.
    let raw = message(&document, "shop.prices.*");
    assert!(
        raw["payload"]["description"]
            .as_str()
            .is_some_and(|why| why.contains("cannot be traced")),
        "{raw:#}"
    );

    // A KV watch receives the value type of its KvChange.
    let feature = message(&document, "$KV.config.features.>");
    assert_eq!(
        resolve(&document, &feature["payload"])["properties"]["enabled"],
        json!({ "type": "boolean" })
    );

    // Operations: one per handler, saying what, where and with which durable.
    let bill = operation(&document, "bill");
    assert_eq!(bill["action"], "receive");
    let summary = bill["summary"].as_str().expect("a summary");
    assert!(
        summary.contains("consumer `bill` on stream `shop`, durable `billing`"),
        "{summary}"
    );
    assert!(summary.contains(&format!("{}:", file!())), "{summary}");
    assert!(resolve(&document, &bill["channel"])["address"] == "shop.orders.created");
    let backup = operation(&document, "backup");
    assert!(backup["summary"]
        .as_str()
        .is_some_and(|s| s.contains("capture `backup`")));

    // A service receives the request and replies with its return type.
    let quote = operation(&document, "quote");
    let request = resolve(&document, &quote["messages"][0]);
    assert_eq!(request["name"], "QuoteRequest");
    let reply = resolve(&document, &quote["reply"]["messages"][0]);
    assert_eq!(reply["name"], "Quote");
    assert_eq!(
        resolve(&document, &reply["payload"])["properties"]["total_cents"]["type"],
        "integer"
    );
    assert!(resolve(&document, &quote["reply"]["channel"])["address"].is_null());

    // A schedule is sent (by the server, on the service's behalf) with its body's schema.
    let remind = operation(&document, "remind");
    assert_eq!(remind["action"], "send");
    assert_eq!(resolve(&document, &remind["channel"])["address"], "shop.reminders");
    let summary = remind["summary"].as_str().expect("a summary");
    assert!(
        summary.contains("schedule `remind` on stream `reminders`: the server publishes its body every 1h"),
        "{summary}"
    );
    assert_eq!(remind["x-natty"]["schedule"], "@every 1h");
    let reminder = resolve(&document, &remind["messages"][0]);
    assert_eq!(reminder["name"], "Reminder");
    assert_eq!(
        resolve(&document, &reminder["payload"])["properties"]["text"],
        json!({ "type": "string" })
    );

    // Declared streams are described under the extension.
    let streams: Vec<&Value> = document["x-natty"]["streams"]
        .as_array()
        .expect("streams")
        .iter()
        .collect();
    assert!(streams
        .iter()
        .any(|stream| stream["name"] == "shop" && stream["subjects"] == json!(["shop.orders.>", "shop.refunds"])));
}

/// The validator `scripts/install-asyncapi-parser.sh` installs.
fn validator() -> PathBuf {
    const HINT: &str = "run `scripts/install-asyncapi-parser.sh` from the workspace root (it needs node and npm) \
                        to install @asyncapi/parser into .natty/asyncapi, or set NATTY_ASYNCAPI_VALIDATOR \
                        to the path it prints";
    if let Some(path) = std::env::var_os("NATTY_ASYNCAPI_VALIDATOR").filter(|path| !path.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "NATTY_ASYNCAPI_VALIDATOR={} does not exist; {HINT}",
            path.display()
        );
        return path;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .map(|dir| dir.join(".natty/asyncapi/validate-asyncapi.cjs"))
        .find(|path| path.is_file())
        .unwrap_or_else(|| panic!("no AsyncAPI validator found; {HINT}"))
}

/// Runs the validator on `document`: whether it passed, and what it printed.
fn validate(document: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("asyncapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(document).expect("JSON")).expect("written");
    let output = Command::new("node")
        .arg(validator())
        .arg(&file)
        .output()
        .expect("node runs (install nodejs)");
    let printed = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.code().is_some_and(|code| code <= 1),
        "the validator itself failed: {printed}"
    );
    (output.status.success(), printed)
}

#[test]
fn the_document_is_valid_asyncapi_3() {
    let document = document();
    let (valid, printed) = validate(&document);
    assert!(valid, "{printed}\n{document:#}");

    // The validator does reject a broken document: a message the operation names is gone.
    let mut broken = document.clone();
    let removed = broken["channels"]
        .as_object_mut()
        .and_then(|channels| channels.values_mut().find(|channel| channel["address"] == "shop.quote"))
        .and_then(|channel| channel["messages"].as_object_mut())
        .map(|messages| messages.clear());
    assert!(removed.is_some());
    let (valid, printed) = validate(&broken);
    assert!(!valid, "a dangling reference must not validate: {printed}");
    assert!(printed.contains("error"), "{printed}");
}
