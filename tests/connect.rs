//! natty connects to a real nats-server with every authentication method it reads from the
//! environment (user/password, token, nkey seed, creds file in operator mode) and over TLS
//! (server-only and mutual), and refuses promptly, naming the URL and the cause, when the server
//! rejects the credentials or the certificate.
//!
//! Certificates, nkeys and JWTs are made by the tests themselves, so nothing here depends on
//! files outside the temporary directories.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use futures_util::StreamExt;
use natty_runtime::testing::NatsServer;
use natty_runtime::{Client, Config};
use nkeys::KeyPair;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType};
use serde_json::json;
use tempfile::TempDir;

/// How long any connection attempt may take before the test calls it a hang. natty's own
/// connect timeout is 5 s (doubled as an outer bound), so a refusal must come well inside this.
const CONNECT_DEADLINE: Duration = Duration::from_secs(15);
/// How long one round trip on an established connection may take.
const ROUND_TRIP_DEADLINE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// Connecting through natty's configuration
// ---------------------------------------------------------------------------------------------

/// Connects the way a natty service does: the settings go through `Config::from_lookup`, as if
/// they were environment variables, so the tests cover the variable names users set.
async fn connect(url: &str, vars: &[(&str, &str)]) -> natty_runtime::Result<Client> {
    let mut env: HashMap<String, String> = vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    env.insert("NATS_URL".to_owned(), url.to_owned());
    env.insert("NATTY_NAME".to_owned(), "natty-connect-test".to_owned());
    let config = Config::from_lookup(|key| env.get(key).cloned())?;
    match tokio::time::timeout(CONNECT_DEADLINE, Client::connect_with(&config, url)).await {
        Ok(result) => result,
        Err(_) => panic!("connecting to {url} did not return within {CONNECT_DEADLINE:?}"),
    }
}

/// Connects and panics with natty's own error if that fails, so a broken setup shows its cause.
async fn connected(url: &str, vars: &[(&str, &str)]) -> Client {
    connect(url, vars)
        .await
        .unwrap_or_else(|error| panic!("natty could not connect to {url}: {error}"))
}

/// Expects the connection to be refused as a connect error (not a config error, which would mean
/// the test's own settings were wrong) whose message names the URL, and returns that message for
/// the caller to check the cause.
async fn refused(url: &str, vars: &[(&str, &str)]) -> String {
    let error = match connect(url, vars).await {
        Ok(_) => panic!("natty connected to {url}, but the server should have refused it"),
        Err(error) => error,
    };
    // What failed is the error's text; why is its source, which `fn main() ->
    // natty_runtime::Result<()>` prints after it (the error's `Debug`).
    let what = error.to_string();
    let message = format!("{error:?}");
    assert!(
        matches!(error, natty_runtime::Error::Connect { .. }),
        "expected a connect error, got: {message}"
    );
    assert!(what.contains("cannot connect to NATS"), "{what}");
    assert!(what.contains(url), "the error should name {url}: {what}");
    assert!(
        message.starts_with(&what) && message.contains("caused by: "),
        "the cause follows what failed: {message}"
    );
    message
}

/// Proves the connection carries traffic both ways, core and JetStream: a flush only shows the
/// server answered a PING, while a request/reply needs subscriptions and routing to work for
/// this user, and a stored publish needs JetStream enabled for the user's account.
async fn prove_usable(client: &Client) {
    let nats = client.nats().clone();
    tokio::time::timeout(ROUND_TRIP_DEADLINE, nats.flush())
        .await
        .expect("flush within the deadline")
        .expect("flush");

    let mut echo = nats.subscribe("connect.echo").await.expect("subscribe");
    let responder = tokio::spawn({
        let nats = nats.clone();
        async move {
            let request = echo.next().await.expect("a request on connect.echo");
            let reply = request.reply.expect("the request has a reply subject");
            nats.publish(reply, request.payload).await.expect("publish the reply");
            nats.flush().await.expect("flush the reply");
        }
    });
    let reply = tokio::time::timeout(ROUND_TRIP_DEADLINE, nats.request("connect.echo", "ping".into()))
        .await
        .expect("a reply within the deadline")
        .expect("request");
    assert_eq!(&reply.payload[..], b"ping");
    responder.await.expect("responder task");

    client
        .jetstream()
        .create_stream(async_nats::jetstream::stream::Config {
            name: "connect".into(),
            subjects: vec!["connect.js.>".into()],
            ..Default::default()
        })
        .await
        .expect("create a stream");
    let ack = client
        .publish("connect.js.1", &json!({ "ok": true }))
        .await
        .expect("publish to the stream");
    assert_eq!(ack.stream, "connect");
    assert_eq!(ack.sequence, 1);
}

/// Starts a server with `config` that a plain client cannot use, so only the port is awaited.
async fn server_with(config: String) -> NatsServer {
    NatsServer::builder()
        .config(config)
        .ready_check(false)
        .start()
        .await
        .expect("start nats-server")
}

/// A path as a quoted nats-server config string (JSON string syntax, which the config accepts).
fn quoted(path: &Path) -> String {
    serde_json::Value::from(path.to_string_lossy().into_owned()).to_string()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temporary paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// User/password, token, nkey
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_user_and_password() {
    let server = server_with(r#"authorization { user: "alice", password: "wonder land" }"#.to_owned()).await;
    let url = server.url();

    let client = connected(&url, &[("NATS_USER", "alice"), ("NATS_PASSWORD", "wonder land")]).await;
    prove_usable(&client).await;

    let message = refused(&url, &[("NATS_USER", "alice"), ("NATS_PASSWORD", "wrong")]).await;
    assert!(message.contains("authorization violation"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_token() {
    let server = server_with(r#"authorization { token: "s3cret-token" }"#.to_owned()).await;
    let url = server.url();

    let client = connected(&url, &[("NATS_TOKEN", "s3cret-token")]).await;
    prove_usable(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_token_is_refused_naming_url_and_cause() {
    let server = server_with(r#"authorization { token: "s3cret-token" }"#.to_owned()).await;
    let url = server.url();

    let message = refused(&url, &[("NATS_TOKEN", "not-the-token")]).await;
    assert!(message.contains("authorization violation"), "{message}");
    // No credentials at all is refused the same way, so the server really requires the token.
    let message = refused(&url, &[]).await;
    assert!(message.contains("authorization violation"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_nkey_seed() {
    let user = KeyPair::new_user();
    let server = server_with(format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        user.public_key()
    ))
    .await;
    let url = server.url();

    let seed = user.seed().expect("user seed");
    let client = connected(&url, &[("NATS_NKEY", &seed)]).await;
    prove_usable(&client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_not_allowed_by_server_is_refused() {
    let allowed = KeyPair::new_user();
    let stranger = KeyPair::new_user();
    let server = server_with(format!(
        "authorization {{ users: [ {{ nkey: {} }} ] }}",
        allowed.public_key()
    ))
    .await;
    let url = server.url();

    let seed = stranger.seed().expect("stranger seed");
    let message = refused(&url, &[("NATS_NKEY", &seed)]).await;
    assert!(message.contains("authorization violation"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// Creds file (operator mode, JWTs made here)
// ---------------------------------------------------------------------------------------------

/// Encodes and signs a NATS JWT by hand. General JWT crates do not know the `ed25519-nkey`
/// algorithm NATS uses, and the format is small: three base64url segments, the last being the
/// issuer nkey's signature over the first two, which the server checks against `iss`.
fn nats_jwt(issuer: &KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    // The server treats `jti` only as an identifier, so any unique string will do; nsc's hash of
    // the claims is not needed.
    static NEXT_ID: AtomicU64 = AtomicU64::new(0);
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs();
    let jti = format!("{}{iat}{}", &subject[..16], NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let header = json!({ "typ": "JWT", "alg": "ed25519-nkey" });
    let claims = json!({
        "jti": jti,
        "iat": iat,
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let signature = issuer.sign(signed.as_bytes()).expect("sign the JWT");
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An account JWT with every limit unlimited. With `jetstream`, the JetStream limits
/// (`mem_storage`, `disk_storage`, `streams`, `consumer`) are set too: without them JetStream is
/// off for the account even though the server runs it. The system account must not have them:
/// nats-server refuses to start ("Not allowed to enable JetStream on the system account").
fn account_jwt(operator: &KeyPair, account: &KeyPair, name: &str, jetstream: bool) -> String {
    let mut limits = json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
    });
    if jetstream {
        for key in ["mem_storage", "disk_storage", "streams", "consumer"] {
            limits[key] = json!(-1);
        }
    }
    let nats = json!({ "type": "account", "version": 2, "limits": limits });
    nats_jwt(operator, &account.public_key(), name, nats)
}

/// A user JWT with no permission restrictions, issued by `account`.
fn user_jwt(account: &KeyPair, user: &KeyPair, name: &str) -> String {
    let nats = json!({
        "type": "user",
        "version": 2,
        "pub": {},
        "sub": {},
        "subs": -1,
        "data": -1,
        "payload": -1,
    });
    nats_jwt(account, &user.public_key(), name, nats)
}

/// The `.creds` file `nsc` writes: async-nats finds the JWT and the seed by these exact markers.
fn creds_file_text(user_jwt: &str, user: &KeyPair) -> String {
    let seed = user.seed().expect("user seed");
    format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
    )
}

/// An operator with a system account and one application account, as a server in operator
/// mode with an in-memory resolver needs them: the server trusts only the operator JWT and
/// looks every account up in `resolver_preload`.
struct Operator {
    config: String,
    account: KeyPair,
}

impl Operator {
    fn new() -> Operator {
        let operator = KeyPair::new_operator();
        let system = KeyPair::new_account();
        let account = KeyPair::new_account();
        let operator_jwt = nats_jwt(
            &operator,
            &operator.public_key(),
            "natty-test-operator",
            json!({ "type": "operator", "version": 2 }),
        );
        let config = format!(
            "operator: {operator_jwt}\n\
             system_account: {system_pub}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {system_pub}: {system_jwt}\n  {account_pub}: {account_jwt}\n}}\n",
            system_pub = system.public_key(),
            system_jwt = account_jwt(&operator, &system, "SYS", false),
            account_pub = account.public_key(),
            account_jwt = account_jwt(&operator, &account, "APP", true),
        );
        Operator { config, account }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_creds_file() {
    let operator = Operator::new();
    let server = server_with(operator.config.clone()).await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("temp dir");

    let user = KeyPair::new_user();
    let creds = dir.path().join("user.creds");
    std::fs::write(
        &creds,
        creds_file_text(&user_jwt(&operator.account, &user, "app-user"), &user),
    )
    .expect("write creds");
    let client = match connect(&url, &[("NATS_CREDS", path_str(&creds))]).await {
        Ok(client) => client,
        Err(error) => panic!(
            "natty could not connect to {url} with a creds file: {error}\n--- server log ---\n{}",
            std::fs::read_to_string(server.log_file()).unwrap_or_default()
        ),
    };
    prove_usable(&client).await;

    // A user signed by an account the operator never issued is refused: the creds were checked.
    let rogue_account = KeyPair::new_account();
    let rogue = KeyPair::new_user();
    let rogue_creds = dir.path().join("rogue.creds");
    std::fs::write(
        &rogue_creds,
        creds_file_text(&user_jwt(&rogue_account, &rogue, "rogue"), &rogue),
    )
    .expect("write creds");
    let message = refused(&url, &[("NATS_CREDS", path_str(&rogue_creds))]).await;
    assert!(message.contains("authorization violation"), "{message}");
}

// ---------------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------------

/// A throwaway CA and what it signs, as PEM files in a temporary directory.
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-sign the CA");
        Ca { cert, key }
    }

    /// Issues a leaf certificate and writes `<stem>.pem` and `<stem>-key.pem` into `dir`.
    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        common_name: &str,
        sans: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::new()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.subject_alt_names = sans;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign the leaf");
        let cert_path = dir.join(format!("{stem}.pem"));
        let key_path = dir.join(format!("{stem}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    fn write(&self, dir: &Path, stem: &str) -> PathBuf {
        let path = dir.join(format!("{stem}.pem"));
        std::fs::write(&path, self.cert.pem()).expect("write CA cert");
        path
    }
}

/// Everything a TLS test needs: a CA, a server certificate for 127.0.0.1 and localhost, a client
/// certificate, and a second CA that signed none of them.
struct Pki {
    /// Holds the files below; removed when the test ends.
    _dir: TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("temp dir");
        let ca = Ca::new("natty test CA");
        let (server_cert, server_key) = ca.issue(
            dir.path(),
            "server",
            "natty test server",
            vec![
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                SanType::DnsName("localhost".try_into().expect("DNS name")),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert, client_key) = ca.issue(
            dir.path(),
            "client",
            "natty test client",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
        );
        let ca_path = ca.write(dir.path(), "ca");
        let other_ca = Ca::new("natty unrelated CA").write(dir.path(), "other-ca");
        Pki {
            _dir: dir,
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
            other_ca,
        }
    }

    /// The server's `tls` block; with `verify`, clients must present a certificate from the CA.
    fn server_config(&self, verify: bool) -> String {
        let mut config = format!(
            "tls {{\n  cert_file: {}\n  key_file: {}\n  timeout: 5\n",
            quoted(&self.server_cert),
            quoted(&self.server_key)
        );
        if verify {
            config.push_str(&format!("  ca_file: {}\n  verify: true\n", quoted(&self.ca)));
        }
        config.push_str("}\n");
        config
    }
}

/// The server requires TLS, so a client that does not speak it cannot get through; this keeps
/// the positive TLS tests from passing over a plain-text connection.
async fn assert_plain_text_refused(url: &str) {
    let attempt = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .connect(url);
    let result = tokio::time::timeout(CONNECT_DEADLINE, attempt)
        .await
        .expect("a plain-text connection attempt returns within the deadline");
    assert!(
        result.is_err(),
        "a client without the test CA connected to {url}: the server does not require TLS"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_tls_with_ca_only() {
    let pki = Pki::new();
    let server = server_with(pki.server_config(false)).await;
    let url = server.url();
    assert_plain_text_refused(&url).await;

    // natty turns TLS on when NATS_CA is set, so the plain nats:// URL works as given.
    let client = connected(&url, &[("NATS_CA", path_str(&pki.ca))]).await;
    assert!(client.nats().server_info().tls_required, "server should announce TLS");
    prove_usable(&client).await;

    // The tls:// scheme works too, and so does the DNS name in the certificate.
    let tls_url = format!("tls://127.0.0.1:{}", server.port());
    let client = connected(&tls_url, &[("NATS_CA", path_str(&pki.ca))]).await;
    client.nats().flush().await.expect("flush over tls://");
    let localhost_url = format!("nats://localhost:{}", server.port());
    let client = connected(&localhost_url, &[("NATS_CA", path_str(&pki.ca))]).await;
    client.nats().flush().await.expect("flush via localhost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_with_mutual_tls() {
    let pki = Pki::new();
    let server = server_with(pki.server_config(true)).await;
    let url = server.url();
    assert_plain_text_refused(&url).await;

    let client = connected(
        &url,
        &[
            ("NATS_CA", path_str(&pki.ca)),
            ("NATS_CERT", path_str(&pki.client_cert)),
            ("NATS_KEY", path_str(&pki.client_key)),
        ],
    )
    .await;
    prove_usable(&client).await;

    // Without the client certificate the same server refuses: the one above was really checked.
    let message = refused(&url, &[("NATS_CA", path_str(&pki.ca))]).await;
    // The server's TLS alert, as rustls words it: "received fatal alert: CertificateRequired".
    assert!(message.contains("CertificateRequired"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_wrong_ca_is_refused_naming_url_and_cause() {
    let pki = Pki::new();
    let server = server_with(pki.server_config(false)).await;
    let url = server.url();

    let message = refused(&url, &[("NATS_CA", path_str(&pki.other_ca))]).await;
    // rustls words it "invalid peer certificate: UnknownIssuer".
    assert!(message.contains("invalid peer certificate"), "{message}");

    // The same server accepts the right CA, so the refusal above was about the CA alone.
    let client = connected(&url, &[("NATS_CA", path_str(&pki.ca))]).await;
    client.nats().flush().await.expect("flush with the right CA");
}
