//! The operator console, through real services (`tests/bin/console.rs`) on a real nats-server:
//! its JSON API shows the whole fleet (two instances, its leader, its partitioned group's
//! owners, its capture's last block) and runs each action (replay, delete,
//! pause, resume) only with the token; without a token the console is read-only and local; and
//! the page itself, loaded in headless Chromium, shows the handlers, the leader and a dead
//! letter, refuses a replay without the token and replays it with the token (screenshots kept
//! in `$CARGO_TARGET_TMPDIR/console/`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use natty_runtime::testing::NatsServer;
use natty_tests::{collect_lines, collect_stderr, http_request, send_signal, spawn_service, wait_until, Job};
use serde_json::Value;

const CONSOLE: &str = env!("CARGO_BIN_EXE_natty-test-console");
const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "console-test-token-0123456789";
const BEARER: &str = "Bearer console-test-token-0123456789";

/// Every handler the service declares, by name.
const HANDLERS: [&str; 5] = ["archive", "picky", "ping", "reaper", "tally"];

/// The sorted `name`s of a list of handlers.
fn names(handlers: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = handlers
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    names
}

/// One running instance of the service.
struct Instance {
    child: tokio::process::Child,
    out: Arc<Mutex<Vec<String>>>,
    err: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
}

impl Instance {
    /// Starts an instance serving its console on a free loopback port, with `token` if given.
    async fn start(url: &str, dir: &Path, token: Option<&str>) -> Instance {
        let store = format!("file://{}", dir.join("store").display());
        let accept = dir.join("accept").display().to_string();
        let mut env = vec![
            ("NATTY_METRICS_ADDR", "127.0.0.1:0"),
            ("NATTY_NAME", "console-test"),
            ("ARCHIVE_STORE", store.as_str()),
            ("PICKY_ACCEPT", accept.as_str()),
        ];
        if let Some(token) = token {
            env.push(("NATTY_CONSOLE_TOKEN", token));
        }
        let mut child = spawn_service(Path::new(CONSOLE), Some(url), &env);
        let (out, err) = (collect_lines(&mut child), collect_stderr(&mut child));
        wait_until(WAIT, "the instance running", || async {
            err.lock().unwrap().iter().any(|line| line.contains("natty is running"))
        })
        .await;
        let addr = err
            .lock()
            .unwrap()
            .iter()
            .find_map(|line| {
                let (_, rest) = line.split_once("serving the console, metrics and health on http://")?;
                rest.split_whitespace().next()?.parse().ok()
            })
            .expect("the console's address in the logs");
        Instance { child, out, err, addr }
    }

    fn handled(&self, id: u64) -> bool {
        self.out
            .lock()
            .unwrap()
            .iter()
            .any(|line| *line == format!("handled {id}"))
    }

    async fn stop(mut self) {
        send_signal(self.child.id().unwrap(), "TERM");
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .expect("stopped on SIGTERM")
            .unwrap();
        assert!(status.success(), "{:?}", self.err.lock().unwrap());
    }
}

/// `GET path` from loopback, no token: the status and the JSON.
async fn get(addr: SocketAddr, path: &str) -> (u16, Value) {
    call(addr, "GET", path, &[], None).await
}

/// `POST path` with `body`, with the token.
async fn act(addr: SocketAddr, path: &str, body: &str) -> (u16, Value) {
    call(addr, "POST", path, &[("Authorization", BEARER)], Some(body)).await
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let (status, text) = http_request(addr, method, path, headers, body).await.expect("HTTP");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn publish(js: &async_nats::jetstream::Context, id: u64) {
    let payload = serde_json::to_vec(&Job { id }).unwrap();
    js.publish(format!("jobs.{id}"), payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
}

/// The dead letters first published to `jobs.<id>`, by their sequence.
async fn dead_letters_of(addr: SocketAddr, id: u64) -> Vec<u64> {
    let (status, list) = get(addr, "/api/dead-letters?consumer=picky").await;
    assert_eq!(status, 200, "{list}");
    list["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|letter| letter["original_subject"] == format!("jobs.{id}"))
        .map(|letter| letter["sequence"].as_u64().unwrap())
        .collect()
}

/// `picky`'s entry in the fleet as the instance at `addr` shows it: its own, with the server's counts.
async fn picky(addr: SocketAddr) -> Value {
    let (status, fleet) = get(addr, "/api/fleet").await;
    assert_eq!(status, 200, "{fleet}");
    fleet["instances"][0]["handlers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|handler| handler["name"] == "picky")
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_api_shows_the_fleet_and_acts_only_with_the_token() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = async_nats::jetstream::new(server.client().await);
    let dir = tempfile::tempdir().unwrap();
    let one = Instance::start(&url, dir.path(), Some(TOKEN)).await;
    let two = Instance::start(&url, dir.path(), Some(TOKEN)).await;

    // The fleet: both instances, every handler, one leader that both agree on.
    let agreed = |fleet: &Value| {
        let instances = fleet["instances"].as_array().unwrap();
        let leaders: Vec<&Value> = instances.iter().map(|i| &i["leaders"][0]).collect();
        instances.len() == 2
            && leaders.iter().filter(|l| l["leader"] == true).count() == 1
            && leaders
                .iter()
                .all(|l| l["holder"] == leaders.iter().find(|l| l["leader"] == true).unwrap()["holder"])
    };
    wait_until(WAIT, "both instances, and the leader known to both", || async {
        agreed(&get(one.addr, "/api/fleet").await.1)
    })
    .await;
    let (status, fleet) = get(one.addr, "/api/fleet").await;
    assert!(status == 200 && agreed(&fleet), "{fleet}");
    assert_eq!(fleet["service"], "console-test");
    assert_eq!(fleet["self"], fleet["instances"][0]["instance"]);
    let holder = fleet["instances"][0]["leaders"][0]["holder"].clone();
    assert!(
        fleet["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["instance"] == holder),
        "the holder is one of the instances: {fleet}"
    );
    for instance in fleet["instances"].as_array().unwrap() {
        assert_eq!(names(&instance["handlers"]), HANDLERS, "{instance}");
    }

    // The group's partitions: each owned by one instance, the owners the instances, both
    // instances agreeing on them.
    wait_until(
        WAIT,
        "the group's 4 partitions owned, split between the instances",
        || async {
            let (_, fleet) = get(one.addr, "/api/fleet").await;
            let Some(instances) = fleet["instances"].as_array().filter(|all| all.len() == 2) else {
                return false;
            };
            let ids: Vec<&Value> = instances.iter().map(|i| &i["instance"]).collect();
            let mut owned: Vec<u64> = instances
                .iter()
                .flat_map(|i| i["groups"][0]["owned"].as_array().cloned().unwrap_or_default())
                .map(|k| k.as_u64().unwrap())
                .collect();
            owned.sort_unstable();
            let owners = &instances[0]["groups"][0]["owners"];
            owned == [0, 1, 2, 3]
                && instances.iter().all(|i| i["groups"][0]["owners"] == *owners)
                && (0..4).all(|k| ids.contains(&&owners[k.to_string()]))
                && instances
                    .iter()
                    .all(|i| !i["groups"][0]["owned"].as_array().unwrap().is_empty())
        },
    )
    .await;

    // A capture's last stored block.
    for id in 1..=10 {
        let reading = serde_json::to_vec(&natty_tests::Reading::new(id, 2)).unwrap();
        js.publish("readings.x", reading.into()).await.unwrap().await.unwrap();
    }
    wait_until(WAIT, "the capture's last stored block shown", || async {
        let (_, fleet) = get(one.addr, "/api/fleet").await;
        let captures: Vec<&Value> = fleet["instances"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| &i["captures"][0])
            .collect();
        captures
            .iter()
            .map(|c| c["messages"].as_u64().unwrap_or(0))
            .sum::<u64>()
            == 10
            && captures.iter().any(|c| {
                c["last_block"]["path"]
                    .as_str()
                    .is_some_and(|path| path.contains("sensor-"))
                    && c["last_block"]["bytes"].as_u64().is_some_and(|bytes| bytes > 0)
            })
    })
    .await;

    // A dead letter, listed with where it came from and why.
    publish(&js, 1).await;
    wait_until(WAIT, "job 1 dead-lettered", || async {
        !dead_letters_of(one.addr, 1).await.is_empty()
    })
    .await;
    let letters = dead_letters_of(one.addr, 1).await;
    let (_, list) = get(two.addr, "/api/dead-letters?subject=jobs.*").await;
    let listed = &list["dead_letters"][0];
    assert_eq!(listed["reason"], "job 1 is not accepted yet", "{list}");
    assert_eq!(listed["original_stream"], "jobs");
    assert_eq!(listed["payload_preview"], r#"{"id":1}"#);

    // Refusals: no token, a wrong one, another site's name for loopback, a GET of an action,
    // an action that names nothing.
    let replay = format!(r#"{{"sequence":{}}}"#, letters[0]);
    let pause = r#"{"stream":"jobs","durable":"picky","for_s":60}"#;
    let resume = r#"{"stream":"jobs","durable":"picky"}"#;
    let every_action = [
        ("/api/dead-letters/replay", replay.as_str()),
        ("/api/dead-letters/delete", replay.as_str()),
        ("/api/consumers/pause", pause),
        ("/api/consumers/resume", resume),
    ];
    for (path, body) in every_action {
        let (status, why) = call(one.addr, "POST", path, &[], Some(body)).await;
        assert_eq!(status, 401, "{path} without the token: {why}");
        assert!(why["error"].as_str().unwrap().contains("NATTY_CONSOLE_TOKEN"), "{why}");
    }
    assert!(
        picky(one.addr).await["paused_until"].is_null(),
        "not paused without the token"
    );
    let wrong = [("Authorization", "Bearer not-the-token-at-all-0000")];
    assert_eq!(
        call(one.addr, "POST", "/api/dead-letters/replay", &wrong, Some(&replay))
            .await
            .0,
        401
    );
    assert_eq!(call(one.addr, "GET", "/api/fleet", &wrong, None).await.0, 401);
    let rebound = [("Host", "evil.example:80")];
    assert_eq!(call(one.addr, "GET", "/api/fleet", &rebound, None).await.0, 401);
    assert_eq!(get(one.addr, "/api/dead-letters/replay").await.0, 405);
    let (status, why) = act(one.addr, "/api/dead-letters/delete", "{}").await;
    assert_eq!(status, 400, "{why}");
    assert_eq!(
        act(one.addr, "/api/dead-letters/replay", r#"{"sequence":999999}"#)
            .await
            .0,
        404
    );
    assert_eq!(dead_letters_of(one.addr, 1).await, letters, "nothing refused was done");

    // Replay, with the token: handled by the service, gone from the dead letters.
    std::fs::write(dir.path().join("accept"), b"").unwrap();
    let (status, done) = act(one.addr, "/api/dead-letters/replay", &replay).await;
    assert_eq!((status, done["replayed"].as_u64()), (200, Some(1)), "{done}");
    wait_until(WAIT, "job 1 handled after its replay", || async {
        one.handled(1) || two.handled(1)
    })
    .await;
    assert!(dead_letters_of(one.addr, 1).await.is_empty());

    // Delete, by a filter.
    std::fs::remove_file(dir.path().join("accept")).unwrap();
    publish(&js, 2).await;
    wait_until(WAIT, "job 2 dead-lettered", || async {
        !dead_letters_of(one.addr, 2).await.is_empty()
    })
    .await;
    let (status, done) = act(
        two.addr,
        "/api/dead-letters/delete",
        r#"{"consumer":"picky","subject":"jobs.2"}"#,
    )
    .await;
    assert_eq!((status, done["deleted"].as_u64()), (200, Some(1)), "{done}");
    assert!(dead_letters_of(one.addr, 2).await.is_empty());

    // Pause: a job published meanwhile stays pending, through an instance's restart.
    let (status, paused) = act(
        one.addr,
        "/api/consumers/pause",
        r#"{"stream":"jobs","durable":"picky","for_s":120}"#,
    )
    .await;
    assert_eq!(status, 200, "{paused}");
    assert!(paused["paused_until"].is_string(), "{paused}");
    assert_eq!(
        act(
            one.addr,
            "/api/consumers/pause",
            r#"{"stream":"jobs","durable":"nobody","for_s":1}"#
        )
        .await
        .0,
        404
    );
    std::fs::write(dir.path().join("accept"), b"").unwrap();
    publish(&js, 3).await;
    two.stop().await;
    let two = Instance::start(&url, dir.path(), Some(TOKEN)).await;
    wait_until(WAIT, "job 3 pending on the paused consumer", || async {
        let picky = picky(one.addr).await;
        picky["pending"] == 1 && picky["paused_until"].is_string()
    })
    .await;
    assert!(!one.handled(3) && !two.handled(3), "handled while paused");

    // Resume: delivered.
    let (status, resumed) = act(
        two.addr,
        "/api/consumers/resume",
        r#"{"stream":"jobs","durable":"picky"}"#,
    )
    .await;
    assert_eq!(status, 200, "{resumed}");
    wait_until(WAIT, "job 3 handled after the resume", || async {
        one.handled(3) || two.handled(3)
    })
    .await;
    assert!(picky(one.addr).await["paused_until"].is_null());
    one.stop().await;
    two.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_console_is_read_only_and_a_short_token_is_refused() {
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let dir = tempfile::tempdir().unwrap();
    let open = Instance::start(&url, dir.path(), None).await;
    assert_eq!(get(open.addr, "/api/fleet").await.0, 200);
    let (status, page) = http_request(open.addr, "GET", "/", &[], None).await.unwrap();
    assert_eq!(status, 200);
    assert!(page.contains("<html"), "the page");
    for (path, body) in [
        ("/api/dead-letters/replay", r#"{"all":true}"#),
        ("/api/dead-letters/delete", r#"{"all":true}"#),
        (
            "/api/consumers/pause",
            r#"{"stream":"jobs","durable":"picky","for_s":60}"#,
        ),
        ("/api/consumers/resume", r#"{"stream":"jobs","durable":"picky"}"#),
    ] {
        let (status, why) = call(open.addr, "POST", path, &[], Some(body)).await;
        assert_eq!(status, 403, "{path}: {why}");
        assert!(why["error"].as_str().unwrap().contains("NATTY_CONSOLE_TOKEN"), "{why}");
        assert_eq!(act(open.addr, path, body).await.0, 403, "{path}: no token to match");
    }
    open.stop().await;

    let mut refused = spawn_service(Path::new(CONSOLE), Some(&url), &[("NATTY_CONSOLE_TOKEN", "short")]);
    let err = collect_stderr(&mut refused);
    let status = tokio::time::timeout(WAIT, refused.wait())
        .await
        .expect("exits")
        .unwrap();
    assert!(!status.success());
    wait_until(WAIT, "the refusal logged", || async {
        err.lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("NATTY_CONSOLE_TOKEN"))
    })
    .await;
    let stderr = err.lock().unwrap().join("\n");
    assert!(
        stderr.contains("NATTY_CONSOLE_TOKEN") && stderr.contains("16 characters"),
        "{stderr}"
    );
    assert!(!stderr.contains("short"), "the token is not repeated: {stderr}");
}

/// `NATTY_CONSOLE_DRIVER` (from `scripts/install-puppeteer.sh`), or where that script puts it.
fn driver() -> PathBuf {
    std::env::var_os("NATTY_CONSOLE_DRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.natty/puppeteer/console.cjs"))
}

/// `NATTY_CHROMIUM` (from `scripts/install-chromium.sh`), or `chromium` on the `PATH`.
fn chromium() -> PathBuf {
    if let Some(path) = std::env::var_os("NATTY_CHROMIUM") {
        return PathBuf::from(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|candidate| candidate.is_file())
        .expect("chromium is missing: run scripts/install-chromium.sh, or set NATTY_CHROMIUM to its binary")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_in_chromium_shows_the_fleet_and_replays_a_dead_letter() {
    let driver = driver();
    assert!(
        driver.exists(),
        "{} is missing: run scripts/install-puppeteer.sh and scripts/install-chromium.sh (scripts/test.sh does)",
        driver.display()
    );
    let server = NatsServer::start().await.expect("nats-server");
    let url = server.url();
    let js = async_nats::jetstream::new(server.client().await);
    let dir = tempfile::tempdir().unwrap();
    let one = Instance::start(&url, dir.path(), Some(TOKEN)).await;
    let two = Instance::start(&url, dir.path(), Some(TOKEN)).await;
    publish(&js, 1).await;
    wait_until(WAIT, "job 1 dead-lettered", || async {
        !dead_letters_of(one.addr, 1).await.is_empty()
    })
    .await;
    std::fs::write(dir.path().join("accept"), b"").unwrap();

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console");
    std::fs::create_dir_all(&shots).unwrap();
    let page = format!("http://{}/", one.addr);
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("node")
            .arg(&driver)
            .arg(chromium())
            .arg(&page)
            .arg(TOKEN)
            .arg(&shots)
            .arg("jobs.1")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the browser finished within 2 minutes")
    .expect("run node");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the browser test failed: {stderr}");
    let seen: Value = serde_json::from_slice(&output.stdout).expect("what the page showed, as JSON");
    eprintln!("screenshots in {}", shots.display());

    let instances: Vec<&str> = seen["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_str().unwrap())
        .collect();
    assert_eq!(instances.len(), 2, "{seen}");
    assert!(seen["self"].as_str().unwrap().contains(instances[0]), "{seen}");
    assert_eq!(names(&seen["handlers"]), HANDLERS, "{seen}");
    let leader = &seen["leaders"][0];
    assert_eq!(leader["name"], "reaper", "{seen}");
    assert!(
        instances.iter().any(|i| leader["text"].as_str().unwrap().contains(i)),
        "the holder shown: {seen}"
    );
    assert_eq!(seen["captures"][0], "archive", "{seen}");
    let letter = seen["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["text"].as_str().unwrap().contains("jobs.1"))
        .expect("the dead letter shown");
    assert!(
        letter["text"].as_str().unwrap().contains("job 1 is not accepted yet"),
        "{seen}"
    );
    assert!(
        seen["refused"].as_str().unwrap().contains("token"),
        "the refusal shown: {seen}"
    );
    wait_until(WAIT, "job 1 handled after its replay from the page", || async {
        one.handled(1) || two.handled(1)
    })
    .await;
    for shot in ["console.png", "console-refused.png", "console-replayed.png"] {
        assert!(shots.join(shot).exists(), "{shot} kept");
    }
    one.stop().await;
    two.stop().await;
}
