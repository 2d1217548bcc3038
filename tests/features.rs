//! natty-runtime as a user's Cargo.toml has it, checked by building a small user crate:
//! `#[capture]` without the `capture` feature is one compile error that says to enable it (not
//! "cannot find `capture` in `__private`"), and every macro works through a renamed dependency
//! with `crate = "..."`.

use std::path::Path;
use std::process::{Command, Output};

/// `cargo check` of a user crate with `dependencies` (TOML lines; `{runtime}` stands for the
/// path of natty-runtime) and `main` as its `src/main.rs`.
fn check_user_crate(dependencies: &str, main: &str) -> Output {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace");
    let user = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(user.path().join("src")).expect("src");
    let runtime = format!("{:?}", workspace.join("natty-runtime"));
    std::fs::write(
        user.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"user\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\n{}\nserde = {{ version = \"1\", features = [\"derive\"] }}\nserde_json = \"1\"\n\n[workspace]\n",
            dependencies.replace("{runtime}", &runtime)
        ),
    )
    .expect("Cargo.toml");
    // The workspace's versions, so that nothing is resolved anew (and nothing downloaded).
    std::fs::copy(workspace.join("Cargo.lock"), user.path().join("Cargo.lock")).expect("Cargo.lock");
    std::fs::write(user.path().join("src/main.rs"), main).expect("main.rs");
    // A target dir of its own that outlives the test: natty-runtime without features is built
    // once, not again on every run.
    let target = workspace.join("target").join("no-capture-feature");
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["check", "--offline", "--quiet", "--message-format=short"])
        .current_dir(user.path())
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo check")
}

#[test]
fn capture_without_its_feature_is_a_compile_error_that_names_the_feature() {
    let output = check_user_crate(
        "natty-runtime = { path = {runtime} }",
        r#"
#[derive(serde::Deserialize, serde::Serialize)]
struct Reading {
    sensor: String,
}

#[natty_runtime::capture(stream = "readings", durable = "archive", store = "file:///tmp/readings/{key}")]
fn by_sensor(reading: &Reading) -> String {
    reading.sensor.clone()
}

fn main() {}
"#,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "it compiled without the feature:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|line| line.contains("error")).collect();
    assert!(
        errors
            .iter()
            .any(|line| line.contains("src/main.rs:7") && line.contains("needs natty-runtime's `capture` feature")),
        "no error naming the feature at the attribute:\n{stderr}"
    );
    assert!(
        !stderr.contains("__private") && !stderr.contains("cannot find"),
        "errors beside the one that matters:\n{stderr}"
    );
}

#[test]
fn every_macro_works_through_a_renamed_dependency_with_the_crate_key() {
    let output = check_user_crate(
        "natty = { package = \"natty-runtime\", path = {runtime} }",
        r#"
use natty::{consumer, kv_bucket, kv_watch, leader, object_store, service, stream, subscribe, Payload};

#[derive(serde::Serialize, serde::Deserialize, Payload)]
#[payload(crate = "natty", subject = "orders.{store}.created")]
struct OrderCreated {
    store: String,
}

#[stream(crate = "natty", name = "orders", subjects = ["orders.>"])]
struct Orders;

#[kv_bucket(crate = "natty", name = "profiles")]
struct Profiles;

#[object_store(crate = "natty", name = "reports")]
struct Reports;

#[consumer(crate = "natty", stream = "orders", durable = "billing")]
async fn bill(order: OrderCreated, ctx: natty::Context) {
    let _ = (order.store, ctx.subject());
}

#[subscribe(crate = "natty", subject = "prices.>")]
async fn on_price(price: u64, envelope: natty::Envelope) {
    let _ = (price, envelope.subject());
}

#[service(crate = "natty", subject = "prices.lookup")]
async fn lookup(id: u64) -> Result<u64, std::io::Error> {
    Ok(id)
}

#[kv_watch(crate = "natty", bucket = "profiles")]
async fn profile_changed(change: natty::KvChange<serde_json::Value>) {
    let _ = change;
}

#[leader(crate = "natty", bucket = "election", key = "scheduler")]
async fn schedule(lease: natty::Lease) {
    let _ = lease;
}

fn main() {}
"#,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "a renamed natty-runtime did not compile:\n{stderr}"
    );
}
