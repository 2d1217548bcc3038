//! natty-runtime's optional features, seen from a user's crate: `#[capture]` without the
//! `capture` feature is one compile error that says to enable it (not "cannot find `capture`
//! in `__private`").

use std::path::Path;
use std::process::Command;

#[test]
fn capture_without_its_feature_is_a_compile_error_that_names_the_feature() {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace");
    let user = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(user.path().join("src")).expect("src");
    std::fs::write(
        user.path().join("Cargo.toml"),
        format!(
            "[package]\nname = \"no-capture\"\nversion = \"0.0.0\"\nedition = \"2021\"\n\n\
             [dependencies]\nnatty-runtime = {{ path = {:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n\
             [workspace]\n",
            workspace.join("natty-runtime")
        ),
    )
    .expect("Cargo.toml");
    // The workspace's versions, so that nothing is resolved anew (and nothing downloaded).
    std::fs::copy(workspace.join("Cargo.lock"), user.path().join("Cargo.lock")).expect("Cargo.lock");
    std::fs::write(
        user.path().join("src/main.rs"),
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
    )
    .expect("main.rs");
    // A target dir of its own that outlives the test: natty-runtime without features is built
    // once, not again on every run.
    let target = workspace.join("target").join("no-capture-feature");
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["check", "--offline", "--quiet", "--message-format=short"])
        .current_dir(user.path())
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo check");
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
