//! The console's HTTP side: the page at `/`, its JSON API under `/api/`, and who may do what.
//!
//! Reading needs no credentials only from the machine itself (a loopback peer naming a
//! loopback host, so that a web page elsewhere cannot read it through DNS rebinding); from
//! anywhere else it needs the token (`NATTY_CONSOLE_TOKEN`). Every action needs the token,
//! from anywhere, sent as `Authorization: Bearer <token>`: a header no HTML form can set, so a
//! page on another site cannot make a browser act. Actions are POSTs of JSON.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::{header, HeaderMap, Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::{rfc3339, Console};
use crate::dead_letters::{self, DeadLetter, Filter};

/// The page: one file, no build step, nothing from the internet.
const PAGE: &str = include_str!("page.html");
/// The largest action body read.
const MAX_BODY: usize = 64 * 1024;
/// Dead letters listed at most, newest first, and how far back the listing looks.
const LIST_LIMIT: usize = 200;
const LIST_SCAN: u64 = 5_000;
/// Characters of a dead letter's payload shown.
const PREVIEW_CHARS: usize = 200;
/// Dead letters one replay or delete request acts on at most.
const MAX_ACTED: usize = 1_000;

type Reply = Response<Full<Bytes>>;

/// Whether `path` is the console's.
pub(crate) fn serves(path: &str) -> bool {
    path == "/" || path == "/api" || path.starts_with("/api/")
}

/// What a request wants to do.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Act,
}

/// Refuses a request that may not have `access`, with the status and why.
fn authorize(
    token: Option<&str>,
    peer: SocketAddr,
    headers: &HeaderMap,
    access: Access,
) -> Result<(), (StatusCode, &'static str)> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| {
            let (scheme, credentials) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(credentials)
        })
        .map(str::trim);
    match (presented, token) {
        (Some(presented), Some(token)) if same(presented, token) => Ok(()),
        // A token left in the page by another service on this port: reading locally needs none.
        (Some(_), None) if access == Access::Read && local(peer, headers) => Ok(()),
        (Some(_), Some(_)) => Err((StatusCode::UNAUTHORIZED, "wrong console token")),
        (Some(_), None) => Err((
            StatusCode::FORBIDDEN,
            "this service has no console token: set NATTY_CONSOLE_TOKEN to use one",
        )),
        (None, _) if access == Access::Read && local(peer, headers) => Ok(()),
        (None, Some(_)) if access == Access::Read => Err((
            StatusCode::UNAUTHORIZED,
            "this console needs its token from anywhere but the machine it runs on (NATTY_CONSOLE_TOKEN)",
        )),
        (None, Some(_)) => Err((
            StatusCode::UNAUTHORIZED,
            "actions need the console token (NATTY_CONSOLE_TOKEN)",
        )),
        (None, None) if access == Access::Read => Err((
            StatusCode::FORBIDDEN,
            "this console is read from the machine it runs on only, unless NATTY_CONSOLE_TOKEN is set",
        )),
        (None, None) => Err((
            StatusCode::FORBIDDEN,
            "actions are off: set NATTY_CONSOLE_TOKEN to allow them with that token",
        )),
    }
}

/// Compares without stopping at the first difference, so timing tells nothing of the token.
fn same(presented: &str, token: &str) -> bool {
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    let mut differ = a.len() ^ b.len();
    for (i, byte) in b.iter().enumerate() {
        differ |= usize::from(a.get(i).copied().unwrap_or(!byte) ^ byte);
    }
    differ == 0
}

/// Headers a proxy adds: a request carrying one came from elsewhere through a proxy on this
/// machine, whatever its peer address says.
const FORWARDED: [&str; 4] = ["forwarded", "x-forwarded-for", "x-real-ip", "via"];

/// A request from this machine, to this machine by a loopback name, not through a proxy.
fn local(peer: SocketAddr, headers: &HeaderMap) -> bool {
    if !peer.ip().to_canonical().is_loopback() || FORWARDED.iter().any(|name| headers.contains_key(*name)) {
        return false;
    }
    // No name, or one that is not text: not known to be local.
    let Some(host) = headers.get(header::HOST).and_then(|value| value.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Answers a console request.
pub(crate) async fn respond(
    console: Option<Arc<Console>>,
    token: Option<&str>,
    peer: SocketAddr,
    request: Request<Incoming>,
) -> Reply {
    let path = request.uri().path().to_string();
    let method = request.method().clone();
    if path == "/" {
        if method != Method::GET && method != Method::HEAD {
            return error(StatusCode::METHOD_NOT_ALLOWED, "GET only");
        }
        return page();
    }
    let access = if method == Method::POST {
        Access::Act
    } else {
        Access::Read
    };
    if method != Method::GET && method != Method::HEAD && method != Method::POST {
        return error(StatusCode::METHOD_NOT_ALLOWED, "GET or POST only");
    }
    if let Err((status, why)) = authorize(token, peer, request.headers(), access) {
        return error(status, why);
    }
    let Some(console) = console else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not running yet: connecting to NATS or provisioning",
        );
    };
    match (access, path.as_str()) {
        (Access::Read, "/api/fleet") => json(StatusCode::OK, &console.fleet().await),
        (Access::Read, "/api/status") => json(StatusCode::OK, &console.status(true).await),
        (Access::Read, "/api/dead-letters") => list(&console, request.uri().query().unwrap_or_default()).await,
        (Access::Act, "/api/dead-letters/replay") => match body::<Selection>(request).await {
            Ok(selection) => act_on_dead_letters(&console, selection, Action::Replay).await,
            Err(refused) => refused,
        },
        (Access::Act, "/api/dead-letters/delete") => match body::<Selection>(request).await {
            Ok(selection) => act_on_dead_letters(&console, selection, Action::Delete).await,
            Err(refused) => refused,
        },
        (Access::Act, "/api/consumers/pause") => match body::<Pause>(request).await {
            Ok(pause) => pause_consumer(&console, pause).await,
            Err(refused) => refused,
        },
        (Access::Act, "/api/consumers/resume") => match body::<Pause>(request).await {
            Ok(resume) => pause_consumer(&console, Pause { for_s: None, ..resume }).await,
            Err(refused) => refused,
        },
        (
            Access::Read,
            "/api/dead-letters/replay" | "/api/dead-letters/delete" | "/api/consumers/pause" | "/api/consumers/resume",
        ) => error(StatusCode::METHOD_NOT_ALLOWED, "an action is a POST"),
        (Access::Act, "/api/fleet" | "/api/status" | "/api/dead-letters") => {
            error(StatusCode::METHOD_NOT_ALLOWED, "a GET: it changes nothing")
        }
        _ => error(
            StatusCode::NOT_FOUND,
            "not found: the API has GET /api/fleet, /api/status, /api/dead-letters; POST /api/dead-letters/replay, /api/dead-letters/delete, /api/consumers/pause, /api/consumers/resume",
        ),
    }
}

/// The page, with headers that keep it from being framed or loading anything from elsewhere.
fn page() -> Reply {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        "text/html; charset=utf-8"
            .parse()
            .unwrap_or(header::HeaderValue::from_static("text/html")),
    );
    if let Ok(policy) = header::HeaderValue::from_str(policy()) {
        headers.insert(header::CONTENT_SECURITY_POLICY, policy);
    }
    headers.insert(header::X_FRAME_OPTIONS, header::HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::REFERRER_POLICY, header::HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    response
}

/// The page's content security policy: its one inline script runs by its hash (so a script
/// that got into the page some other way would not), it loads nothing, it talks only to the
/// service, and no other site may frame it.
fn policy() -> &'static str {
    static POLICY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    POLICY.get_or_init(|| {
        use base64::Engine as _;
        let script = PAGE
            .split_once("<script>")
            .and_then(|(_, rest)| rest.split_once("</script>"))
            .map_or("", |(script, _)| script);
        let hash = base64::engine::general_purpose::STANDARD
            .encode(ring::digest::digest(&ring::digest::SHA256, script.as_bytes()));
        format!(
            "default-src 'none'; script-src 'sha256-{hash}'; style-src 'unsafe-inline'; connect-src 'self'; \
             img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
        )
    })
}

/// A JSON answer.
fn json(status: StatusCode, value: &impl Serialize) -> Reply {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    if status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"natty console\""),
        );
    }
    response
}

/// A refusal or failure: `{"error": "..."}`.
fn error(status: StatusCode, why: &str) -> Reply {
    json(status, &serde_json::json!({ "error": why }))
}

/// Reads a JSON body of at most [`MAX_BODY`] bytes.
async fn body<T: for<'de> Deserialize<'de>>(request: Request<Incoming>) -> Result<T, Reply> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "an action's body is JSON (Content-Type: application/json)",
        ));
    }
    let bytes = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|_| error(StatusCode::PAYLOAD_TOO_LARGE, "the body is too large or was cut off"))?
        .to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("the body is not what this action takes: {e}"),
        )
    })
}

/// A dead letter as the API lists it.
#[derive(Serialize)]
struct Listed {
    sequence: u64,
    consumer: String,
    stream: &'static str,
    subject: String,
    original_subject: String,
    original_stream: String,
    original_sequence: u64,
    reason: String,
    delivery_count: u64,
    at: Option<String>,
    payload_preview: String,
    payload_bytes: usize,
}

impl From<&DeadLetter> for Listed {
    fn from(letter: &DeadLetter) -> Self {
        Listed {
            sequence: letter.sequence,
            consumer: letter.consumer.clone(),
            stream: crate::consumer::DEAD_LETTER_STREAM,
            subject: letter.subject.clone(),
            original_subject: letter.original_subject.clone(),
            original_stream: letter.original_stream.clone(),
            original_sequence: letter.original_sequence,
            reason: letter.reason.clone(),
            delivery_count: letter.delivery_count,
            at: letter.time.map(rfc3339),
            payload_preview: letter.preview(PREVIEW_CHARS),
            payload_bytes: letter.payload.len(),
        }
    }
}

/// Which dead letters an action takes: one by its sequence, or those a filter selects
/// (`all` must be said when the filter is empty).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Selection {
    sequence: Option<u64>,
    consumer: Option<String>,
    subject: Option<String>,
    reason: Option<String>,
    #[serde(default)]
    all: bool,
}

impl Selection {
    fn filter(&self) -> Filter {
        let given = |text: &Option<String>| text.as_ref().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        Filter {
            sequence: self.sequence,
            consumer: given(&self.consumer),
            subject: given(&self.subject),
            reason: given(&self.reason),
        }
    }
}

/// `GET /api/dead-letters?consumer=&subject=&reason=`.
async fn list(console: &Console, query: &str) -> Reply {
    let mut selection = Selection::default();
    for (name, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
        let value = decode(value);
        match name {
            "consumer" => selection.consumer = Some(value),
            "subject" => selection.subject = Some(value),
            "reason" => selection.reason = Some(value),
            _ => {}
        }
    }
    let js = console.client().jetstream();
    let filter = selection.filter();
    match dead_letters::newest(js, &filter, LIST_LIMIT, LIST_SCAN, console.dead_letters()).await {
        Ok(found) => json(
            StatusCode::OK,
            &serde_json::json!({
                "dead_letters": found.letters.iter().map(Listed::from).collect::<Vec<_>>(),
                "total": found.total,
                "more": found.more,
            }),
        ),
        Err(e) => error(StatusCode::BAD_GATEWAY, &crate::error::chain(&e).to_string()),
    }
}

/// Decodes a query parameter (`+` and `%XX`).
fn decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Clone, Copy)]
enum Action {
    Replay,
    Delete,
}

/// Replays or deletes the dead letters `selection` takes, oldest first, at most
/// [`MAX_ACTED`] per request (the answer says whether more are left). It runs on its own task:
/// a client that goes away does not cut it off halfway unlogged.
async fn act_on_dead_letters(console: &Console, selection: Selection, action: Action) -> Reply {
    let filter = selection.filter();
    if !filter.is_narrowed() && !selection.all {
        return error(
            StatusCode::BAD_REQUEST,
            "name a sequence or a filter (consumer, subject, reason), or say \"all\": true",
        );
    }
    let js = console.client().jetstream().clone();
    let (verb, past) = match action {
        Action::Replay => ("replay", "replayed"),
        Action::Delete => ("delete", "deleted"),
    };
    tracing::info!(?filter, "console: {verb} of dead letters asked");
    let acting = tokio::spawn(async move {
        let failed = |e: crate::Error| crate::error::chain(&e).to_string();
        let mut scan = dead_letters::Scan::start(&js, &filter).await.map_err(failed)?;
        let mut done = 0usize;
        while done < MAX_ACTED {
            let Some(letter) = scan.next(&filter).await.map_err(failed)? else {
                return Ok((done, false));
            };
            let outcome = match action {
                Action::Replay => dead_letters::replay(&js, &letter).await,
                Action::Delete => dead_letters::delete(&js, &letter).await,
            };
            if let Err(error) = outcome {
                let why = format!(
                    "{verb} of dead letter {} failed after {done} done: {}",
                    letter.sequence,
                    crate::error::chain(&error)
                );
                tracing::warn!("console: {why}");
                return Err(why);
            }
            done += 1;
        }
        let more = scan.next(&filter).await.map_err(failed)?.is_some();
        Ok::<_, String>((done, more))
    });
    match acting.await {
        Ok(Ok((0, _))) if selection.sequence.is_some() => {
            error(StatusCode::NOT_FOUND, "no dead letter at that sequence")
        }
        Ok(Ok((done, more))) => {
            tracing::info!(count = done, more, "console: {verb} of dead letters done");
            json(StatusCode::OK, &serde_json::json!({ past: done, "more": more }))
        }
        Ok(Err(why)) => error(StatusCode::BAD_GATEWAY, &why),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the action's task failed"),
    }
}

/// A consumer to pause (for `for_s` seconds) or resume (`for_s` absent).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Pause {
    stream: String,
    durable: String,
    for_s: Option<f64>,
}

/// Pauses or resumes a consumer this service declares (every partition of a group).
async fn pause_consumer(console: &Console, pause: Pause) -> Reply {
    let Some(consumers) = console.consumers_of(&pause.stream, &pause.durable) else {
        return error(
            StatusCode::NOT_FOUND,
            &format!(
                "this service declares no durable consumer `{}` on stream `{}`",
                pause.durable, pause.stream
            ),
        );
    };
    let how_long = match pause.for_s {
        None => None,
        // Clamped first: a `Duration` cannot hold every finite number of seconds.
        Some(seconds) if seconds.is_finite() && seconds > 0.0 => Some(Duration::from_secs_f64(
            seconds.min(crate::operate::MAX_PAUSE.as_secs_f64()),
        )),
        Some(_) => return error(StatusCode::BAD_REQUEST, "for_s is a number of seconds above 0"),
    };
    match crate::operate::pause(console.client(), &consumers, how_long).await {
        Ok(Some(until)) => {
            tracing::info!(stream = %pause.stream, durable = %pause.durable, until = %rfc3339(until), "console: consumer paused");
            json(StatusCode::OK, &serde_json::json!({ "paused_until": rfc3339(until) }))
        }
        Ok(None) => {
            tracing::info!(stream = %pause.stream, durable = %pause.durable, "console: consumer resumed");
            json(StatusCode::OK, &serde_json::json!({ "paused_until": null }))
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, &crate::error::chain(&e).to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, bearer: Option<&str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, host.parse().unwrap());
        if let Some(token) = bearer {
            headers.insert(header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
        }
        headers
    }

    fn allowed(token: Option<&str>, peer: &str, headers: &HeaderMap, access: Access) -> Result<(), StatusCode> {
        authorize(token, peer.parse().unwrap(), headers, access).map_err(|(status, _)| status)
    }

    #[test]
    fn reading_without_a_token_is_for_this_machine_only() {
        let here = headers("127.0.0.1:9090", None);
        assert_eq!(allowed(None, "127.0.0.1:5000", &here, Access::Read), Ok(()));
        assert_eq!(
            allowed(None, "[::1]:5000", &headers("[::1]:9090", None), Access::Read),
            Ok(())
        );
        assert_eq!(
            allowed(None, "127.0.0.1:5000", &headers("localhost:9090", None), Access::Read),
            Ok(())
        );
        assert_eq!(
            allowed(None, "10.0.0.5:5000", &here, Access::Read),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            allowed(Some("secret"), "10.0.0.5:5000", &here, Access::Read),
            Err(StatusCode::UNAUTHORIZED)
        );
        // DNS rebinding: a loopback peer asking for another site's name.
        assert_eq!(
            allowed(
                None,
                "127.0.0.1:5000",
                &headers("evil.example:9090", None),
                Access::Read
            ),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn a_request_through_a_proxy_or_naming_no_host_is_not_local() {
        let mut proxied = headers("127.0.0.1:9090", None);
        proxied.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
        assert_eq!(
            allowed(None, "127.0.0.1:5000", &proxied, Access::Read),
            Err(StatusCode::FORBIDDEN)
        );
        let mut via = headers("localhost:9090", None);
        via.insert("via", "1.1 nginx".parse().unwrap());
        assert_eq!(
            allowed(Some("secret"), "127.0.0.1:5000", &via, Access::Read),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            allowed(None, "127.0.0.1:5000", &HeaderMap::new(), Access::Read),
            Err(StatusCode::FORBIDDEN)
        );
        // A token another service left in the page does not stop a local read.
        let stale = headers("127.0.0.1:9090", Some("from-another-service"));
        assert_eq!(allowed(None, "127.0.0.1:5000", &stale, Access::Read), Ok(()));
        let mut lower = headers("127.0.0.1:9090", None);
        lower.insert(header::AUTHORIZATION, "bearer secret".parse().unwrap());
        assert_eq!(allowed(Some("secret"), "10.0.0.5:5000", &lower, Access::Act), Ok(()));
    }

    #[test]
    fn every_action_needs_the_token() {
        let here = headers("127.0.0.1:9090", None);
        assert_eq!(
            allowed(None, "127.0.0.1:5000", &here, Access::Act),
            Err(StatusCode::FORBIDDEN)
        );
        assert_eq!(
            allowed(Some("secret"), "127.0.0.1:5000", &here, Access::Act),
            Err(StatusCode::UNAUTHORIZED)
        );
        let with = headers("127.0.0.1:9090", Some("secret"));
        assert_eq!(allowed(Some("secret"), "10.0.0.5:5000", &with, Access::Act), Ok(()));
        assert_eq!(allowed(Some("secret"), "10.0.0.5:5000", &with, Access::Read), Ok(()));
        let wrong = headers("127.0.0.1:9090", Some("secreT"));
        assert_eq!(
            allowed(Some("secret"), "127.0.0.1:5000", &wrong, Access::Act),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            allowed(Some("secret"), "127.0.0.1:5000", &wrong, Access::Read),
            Err(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            allowed(None, "127.0.0.1:5000", &with, Access::Act),
            Err(StatusCode::FORBIDDEN)
        );
    }

    #[test]
    fn the_page_has_one_inline_script_which_the_policy_allows_by_hash() {
        assert_eq!(
            PAGE.matches("<script").count(),
            1,
            "one script, no attributes: the hash covers it"
        );
        assert!(policy().contains("script-src 'sha256-"), "{}", policy());
        for fetch in [
            "src=\"http",
            "href=\"http",
            "url(http",
            "@import",
            "fetch('http",
            "fetch(\"http",
        ] {
            assert!(!PAGE.contains(fetch), "nothing from the internet: {fetch}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("ab", "abc"));
        assert!(!same("abcd", "abc"));
        assert!(!same("", "abc"));
    }

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(decode("orders.%3E"), "orders.>");
        assert_eq!(decode("a+b"), "a b");
        assert_eq!(decode("50%"), "50%");
        assert_eq!(decode("%zz"), "%zz");
        assert_eq!(decode("%é"), "%é");
    }
}
