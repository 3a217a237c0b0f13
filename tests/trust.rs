//! The trust boundary over a real socket: what is refused before the workspace, the client key,
//! the injected token against hop-by-hop tricks, and the token scrubbed from echoing answers.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_workspace::FakeWorkspace;
use common::harness::{self, settings};
use common::logs::{capture_logs, logs};
use fresh_proxy::AppState;
use fresh_proxy::proxy::guard::{ClientKey, ClientPolicy, Refusal};
use fresh_proxy::token::status::SourceKind;
use fresh_token::{SharedToken, Token, TokenSource};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CLIENT_KEY: &str = "fp-client-key-7f3a9c2e";

fn shared(value: &str) -> Arc<dyn TokenSource> {
    Arc::new(SharedToken::with_token(Token::new(value).unwrap()))
}

async fn proxy(upstream_base: &str, token: &str, policy: ClientPolicy) -> harness::RunningProxy {
    let state = AppState::new(settings(upstream_base), shared(token), SourceKind::Rotator)
        .with_client_policy(policy);
    harness::serve(state).await
}

/// Sends `head` (request line and headers, without the blank line) with `Connection: close`
/// and an empty body; the status and the body of the answer.
async fn raw(addr: std::net::SocketAddr, head: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("{head}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .expect("an answer in time")
        .unwrap();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

/// The `error.type` of a JSON error body (possibly chunked: the JSON is found inside).
fn error_type(body: &str) -> String {
    let start = body
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in {body:?}"));
    let end = body.rfind('}').unwrap();
    let value: Value = serde_json::from_str(&body[start..=end]).unwrap();
    value["error"]["type"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn echo_of(body: &str) -> Value {
    let start = body.find('{').unwrap();
    let end = body.rfind('}').unwrap();
    serde_json::from_str(&body[start..=end]).unwrap()
}

#[tokio::test]
async fn foreign_hosts_origins_and_methods_are_refused_before_the_workspace() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let policy = ClientPolicy::loopback().allow_hosts(["fresh-proxy".to_owned()]);
    let proxy = proxy(&ws.serving_base(), &pat.value, policy).await;
    let refused = [
        (
            "POST /chat/invocations HTTP/1.1\r\nHost: rebound.example:4000",
            403,
            "host_not_allowed",
        ),
        (
            "POST /chat/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: https://evil.example",
            403,
            "origin_not_allowed",
        ),
        (
            "POST /chat/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: null",
            403,
            "origin_not_allowed",
        ),
        (
            "GET /echo/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: cross-site",
            403,
            "origin_not_allowed",
        ),
        (
            "TRACE /echo/invocations HTTP/1.1\r\nHost: 127.0.0.1",
            405,
            "method_not_allowed",
        ),
        (
            "TRACE /health HTTP/1.1\r\nHost: 127.0.0.1",
            405,
            "method_not_allowed",
        ),
        (
            "CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443",
            405,
            "method_not_allowed",
        ),
    ];
    for (head, status, kind) in refused {
        let (got, body) = raw(proxy.addr, head).await;
        assert_eq!(got, status, "{head}: {body}");
        assert_eq!(error_type(&body), kind, "{head}");
    }
    assert_eq!(
        ws.stats().requests,
        0,
        "a refused request reached the workspace"
    );

    let allowed = [
        "GET /echo/invocations HTTP/1.1\r\nHost: localhost:4000\r\nOrigin: http://localhost:3000",
        "GET /echo/invocations HTTP/1.1\r\nHost: [::1]:4000",
        "GET /echo/invocations HTTP/1.1\r\nHost: fresh-proxy:4000",
        "GET /echo/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nSec-Fetch-Site: same-origin",
    ];
    for head in allowed {
        let (status, body) = raw(proxy.addr, head).await;
        assert_eq!(status, 200, "{head}: {body}");
    }
    assert_eq!(ws.stats().serving_ok, allowed.len() as u64);
    // Probes name the host by address, and still get /health.
    let (status, _) = raw(proxy.addr, "GET /health HTTP/1.1\r\nHost: 10.1.2.3:4000").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_connection_header_naming_authorization_cannot_strip_the_token() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = proxy(&ws.serving_base(), &pat.value, ClientPolicy::loopback()).await;
    let (status, body) = raw(
        proxy.addr,
        "GET /echo/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer client-own\r\nConnection: authorization",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let echo = echo_of(&body);
    assert_eq!(echo["auth"]["valid"], true, "{echo}");
    assert_eq!(echo["auth"]["token_id"], pat.id.as_str());
}

/// An upstream that echoes the `Authorization` it gets: in a header of every answer, and in
/// the body of a 400 (`/bad`) and of a 200 (`/ok`); `/retry` refuses the first token.
async fn echoing_upstream() -> String {
    use axum::http::{HeaderMap, StatusCode};
    use axum::routing::any;

    async fn echo(status: StatusCode, headers: HeaderMap) -> impl axum::response::IntoResponse {
        let auth = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (
            status,
            [
                ("x-debug-authorization", auth.clone()),
                ("content-type", "text/plain".to_owned()),
            ],
            format!("rejected header: {auth}"),
        )
    }
    let app = axum::Router::new()
        .route(
            "/serving-endpoints/bad",
            any(|h: HeaderMap| echo(StatusCode::BAD_REQUEST, h)),
        )
        .route(
            "/serving-endpoints/ok",
            any(|h: HeaderMap| echo(StatusCode::OK, h)),
        )
        // Rejects the first token as revoked (403), then echoes the one it is retried with.
        .route(
            "/serving-endpoints/retry",
            any(|h: HeaderMap| async move {
                let first = h
                    .get("authorization")
                    .is_some_and(|v| v == "Bearer dapi-first-0001");
                let status = if first {
                    StatusCode::FORBIDDEN
                } else {
                    StatusCode::BAD_REQUEST
                };
                echo(status, h).await
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!(
        "http://{}/serving-endpoints",
        listener.local_addr().unwrap()
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    base
}

#[tokio::test]
async fn an_upstream_that_echoes_the_token_does_not_hand_it_to_the_client() {
    let token = "dapi0123456789abcdef0123456789abcdef";
    let base = echoing_upstream().await;
    let proxy = proxy(&base, token, ClientPolicy::loopback()).await;
    let client = common::http_client();

    let res = client
        .get(format!("{}/bad", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(res.headers()["x-debug-authorization"], "Bearer [redacted]");
    let body = res.text().await.unwrap();
    assert_eq!(body, "rejected header: Bearer [redacted]");

    let res = client
        .get(format!("{}/ok", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-debug-authorization"], "Bearer [redacted]");
    let _ = res.text().await.unwrap();
}

#[tokio::test]
async fn with_a_client_key_only_clients_presenting_it_are_served_and_it_is_never_forwarded() {
    capture_logs();
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let policy = ClientPolicy::loopback().require_key(ClientKey::new(CLIENT_KEY).unwrap());
    let proxy = proxy(&ws.serving_base(), &pat.value, policy).await;
    let client = common::http_client();
    let url = format!("{}/echo/invocations", proxy.url());

    for request in [
        client.get(&url),
        client.get(&url).bearer_auth("wrong-key"),
        client.get(&url).header("x-api-key", "wrong-key"),
        client.get(format!("{}/metrics", proxy.url())),
    ] {
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), 401);
        assert_eq!(res.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            error_type(&res.text().await.unwrap()),
            "client_key_required"
        );
    }
    assert_eq!(
        ws.stats().requests,
        0,
        "a refused request reached the workspace"
    );
    // Health checks need no key.
    for path in ["/health", "/ready"] {
        let res = client
            .get(format!("{}{path}", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
    }

    for request in [
        client.get(&url).bearer_auth(CLIENT_KEY),
        client.get(&url).header("x-api-key", CLIENT_KEY),
    ] {
        let res = request.send().await.unwrap();
        assert_eq!(res.status(), 200);
        let text = res.text().await.unwrap();
        assert!(
            !text.contains(CLIENT_KEY),
            "the key reached the upstream: {text}"
        );
        let echo = echo_of(&text);
        assert_eq!(
            echo["auth"]["token_id"],
            pat.id.as_str(),
            "the token replaced the key"
        );
        assert!(echo["headers"].get("x-api-key").is_none(), "{echo}");
    }
    let logs = logs();
    assert!(
        !logs.contains(CLIENT_KEY),
        "the client key reached the logs"
    );
    assert!(!logs.contains(&pat.value), "the token reached the logs");
}

#[test]
fn the_failure_and_security_pages_name_every_refusal() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let failures = std::fs::read_to_string(root.join("docs/FAILURE_MODES.md")).unwrap();
    let security = std::fs::read_to_string(root.join("docs/SECURITY.md")).unwrap();
    let refusals = [
        Refusal::Method,
        Refusal::NoHost,
        Refusal::ForeignHost,
        Refusal::ForeignOrigin,
        Refusal::NoClientKey,
    ];
    for refusal in refusals {
        let answer = format!("**{}** `{}`", refusal.status().as_u16(), refusal.kind());
        assert!(
            failures.contains(&answer),
            "docs/FAILURE_MODES.md lacks {answer}"
        );
        assert!(
            security.contains(&answer),
            "docs/SECURITY.md lacks {answer}"
        );
    }
    assert!(failures.contains("**503** `too_many_connections`"));
}

/// A source whose current token is rejected and whose refresh offers a second one.
#[derive(Debug)]
struct RotatedUnderneath;

impl TokenSource for RotatedUnderneath {
    fn current(&self) -> Option<Token> {
        Token::new("dapi-first-0001").ok()
    }

    fn refresh<'a>(&'a self, _rejected: &'a Token) -> fresh_token::RefreshFuture<'a> {
        fresh_token::RefreshFuture::ready(Token::new("dapi-second-0002").ok())
    }
}

#[tokio::test]
async fn the_token_a_retry_used_is_scrubbed_too() {
    let base = echoing_upstream().await;
    let state = AppState::new(
        settings(&base),
        Arc::new(RotatedUnderneath),
        SourceKind::Rotator,
    );
    let proxy = harness::serve(state).await;
    let res = common::http_client()
        .get(format!("{}/retry", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "the retry's answer");
    assert_eq!(res.headers()["x-debug-authorization"], "Bearer [redacted]");
    assert_eq!(
        res.text().await.unwrap(),
        "rejected header: Bearer [redacted]"
    );
}
