//! The proxy over a real socket against the fake workspace.

mod common;

use std::io::{Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use common::fake_workspace::{Behaviour, FakeWorkspace, REDACTED, sha256_hex};
use common::harness::{serve_with, settings};
use common::{JsonBody, SseReader, http_client, open_slow_stream};
use fresh_token::{ConfigFileToken, SharedToken, Token, TokenSource};
use serde_json::{Value, json};

async fn json_of(res: reqwest::Response) -> Value {
    let text = res.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn shared(value: &str) -> Arc<dyn TokenSource> {
    Arc::new(SharedToken::with_token(Token::new(value).unwrap()))
}

#[tokio::test]
async fn every_method_and_query_string_is_forwarded() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let client = http_client();
    for method in ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        let url = format!("{}/echo/invocations?a=1&b=two%20words", proxy.url());
        let res = client
            .request(method.parse().unwrap(), &url)
            .body(if method == "GET" { "" } else { "payload" })
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{method}");
        let echo = json_of(res).await;
        assert_eq!(echo["method"], method);
        assert_eq!(echo["path"], "/serving-endpoints/echo/invocations");
        assert_eq!(echo["query"], "a=1&b=two%20words");
        assert_eq!(echo["auth"]["token_id"], pat.id.as_str(), "{method}");
    }
    // /health, /ready and /metrics answer locally only for GET.
    let res = client
        .post(format!("{}/health", proxy.url()))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(res).await["path"], "/serving-endpoints/health");
}

#[tokio::test]
async fn non_json_bodies_pass_byte_for_byte() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let client = http_client();
    let binary: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let not_json_json =
        b"{\"messages\": [ {\"role\": \"user\", \"content\": \"\"} ] } trailing".to_vec();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("application/octet-stream", binary.clone()),
        (
            "text/plain; charset=latin1",
            vec![0xff, 0xfe, b'a', 0, 0x80],
        ),
        ("application/json", not_json_json),
        ("application/json", b"[1, 2, 3]".to_vec()),
    ];
    for (content_type, body) in cases {
        let res = client
            .post(format!("{}/echo/invocations", proxy.url()))
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let echo = json_of(res).await;
        assert_eq!(echo["body_sha256"], sha256_hex(&body), "{content_type}");
        assert_eq!(echo["body_len"], body.len());
    }
    // A body of unknown length is streamed through.
    let chunks: Vec<Result<Bytes, std::io::Error>> = binary
        .chunks(7_001)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let res = client
        .post(format!("{}/echo/invocations", proxy.url()))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(res).await["body_sha256"], sha256_hex(&binary));
}

#[tokio::test]
async fn oversized_bodies_get_413_and_nothing_reaches_upstream() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let mut settings = settings(&ws.serving_base());
    settings.max_body = 1024;
    let proxy = serve_with(settings, shared(&pat.value)).await;
    let client = http_client();
    let big = vec![b'x'; 4096];
    let json_big = json!({"messages": [{"role": "user", "content": "y".repeat(4096)}]}).to_string();
    let before = ws.stats().requests;
    let declared = client
        .post(format!("{}/echo/invocations", proxy.url()))
        .header("content-type", "application/octet-stream")
        .body(big.clone())
        .send()
        .await
        .unwrap();
    let chunked_json = client
        .post(format!("{}/echo/invocations", proxy.url()))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            json_big
                .into_bytes()
                .chunks(512)
                .map(|c| Ok::<_, std::io::Error>(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )))
        .send()
        .await
        .unwrap();
    for res in [declared, chunked_json] {
        assert_eq!(res.status(), 413);
        assert_eq!(json_of(res).await["error"]["type"], "request_too_large");
    }
    assert_eq!(
        ws.stats().requests,
        before,
        "nothing may reach the upstream"
    );
    let small = client
        .post(format!("{}/echo/invocations", proxy.url()))
        .body(vec![b'x'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(small.status(), 200, "a body of exactly the limit passes");
}

#[tokio::test]
async fn hop_by_hop_headers_are_dropped_and_authorization_replaced() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let client = http_client();
    let res = client
        .post(format!("{}/echo/invocations", proxy.url()))
        .header("authorization", "Bearer dapi-client-stale")
        .header("connection", "x-private")
        .header("x-private", "only for the next hop")
        .header("te", "trailers")
        .header("trailer", "x-sum")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-custom", "kept")
        .body("hello")
        .send()
        .await
        .unwrap();
    let echo = json_of(res).await;
    let headers = echo["headers"].as_object().unwrap();
    for dropped in [
        "x-private",
        "te",
        "trailer",
        "proxy-authorization",
        "keep-alive",
        "upgrade",
    ] {
        assert!(
            !headers.contains_key(dropped),
            "{dropped} was forwarded: {headers:?}"
        );
    }
    assert_eq!(headers["x-custom"], "kept");
    assert_eq!(headers["authorization"], REDACTED);
    assert_eq!(echo["auth"]["valid"], true);
    assert_eq!(echo["auth"]["token_id"], pat.id.as_str());
}

#[tokio::test]
async fn the_request_target_never_chooses_the_host() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let addr = proxy.addr;
    let raw = |request: String| {
        tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(addr).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut response = String::new();
            let _ = stream.read_to_string(&mut response);
            response
        })
    };
    let absolute = raw("GET http://203.0.113.7:81/echo/invocations?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".to_owned())
        .await
        .unwrap();
    assert!(absolute.starts_with("HTTP/1.1 200"), "{absolute}");
    assert!(
        absolute.contains("\"path\":\"/serving-endpoints/echo/invocations\""),
        "{absolute}"
    );
    let escape = raw(
        "GET /../api/2.0/token/list HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            .to_owned(),
    )
    .await
    .unwrap();
    assert!(escape.starts_with("HTTP/1.1 400"), "{escape}");
    let encoded = raw(
        "GET /%2e%2e/api/2.0/token/list HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            .to_owned(),
    )
    .await
    .unwrap();
    assert!(encoded.starts_with("HTTP/1.1 400"), "{encoded}");
    assert_eq!(ws.stats().lists, 0, "the token API must stay out of reach");
}

#[tokio::test]
async fn sse_arrives_incrementally() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let client = http_client();
    let started = Instant::now();
    let res = client
        .post(format!(
            "{}/slow-stream/invocations?delay_ms=300&events=5",
            proxy.url()
        ))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let mut reader = SseReader::new(res);
    let first = reader.next_data().await.expect("first event");
    let first_at = started.elapsed();
    assert!(first.contains("part 0"), "{first}");
    let rest = reader.collect_data().await;
    let ended_at = started.elapsed();
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(rest.len(), 5, "{rest:?}");
    // The stream takes 5 × 300 ms after the first event; the first must not wait for them.
    assert!(
        ended_at - first_at >= Duration::from_millis(1_200),
        "first {first_at:?}, end {ended_at:?}"
    );
}

#[tokio::test]
async fn streamed_tool_calls_are_remapped() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let client = http_client();
    let request = json!({
        "messages": [{"role": "user", "content": "read it"}],
        "tools": [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}],
        "stream": true,
        "stream_options": {"include_usage": true}
    });
    for behaviour in [Behaviour::ToolCall, Behaviour::ToolCallOneChunk] {
        let res = client
            .post(format!("{}/{}/invocations", proxy.url(), behaviour.name()))
            .json_body(&request)
            .send()
            .await
            .unwrap();
        let events = SseReader::new(res).collect_data().await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let mut names = Vec::new();
        let mut arguments = String::new();
        let mut finish = None;
        for event in &events[..events.len() - 1] {
            let chunk: Value = serde_json::from_str(event).expect("one JSON document per event");
            let choice = &chunk["choices"][0];
            for call in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                if let Some(name) = call["function"]["name"].as_str() {
                    names.push(name.to_owned());
                }
                arguments.push_str(call["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_owned());
            }
        }
        assert_eq!(names, ["read_file"], "{behaviour:?}: {events:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&arguments).unwrap(),
            json!({"path": "/tmp/x"})
        );
        assert_eq!(finish.as_deref(), Some("tool_calls"));
    }
    // And the plain JSON answer.
    let mut plain = request.clone();
    plain["stream"] = json!(false);
    let res = client
        .post(format!("{}/tool-call/invocations", proxy.url()))
        .json_body(&plain)
        .send()
        .await
        .unwrap();
    let body = json_of(res).await;
    assert_eq!(
        body["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "read_file"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn requests_are_sanitised_before_they_leave() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let request = json!({
        "model": "databricks-claude",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "  "}, {"type": "text", "text": "hi"}]},
            {"role": "assistant", "content": ""},
            {"role": "user", "content": "again"}
        ],
        "tools": [{"type": "function", "function": {"name": "edit", "parameters": {
            "type": "object",
            "properties": {"zeta": {"type": "string"}, "alpha": {"type": "string"}},
            "additionalProperties": false
        }}}],
        "stream_options": {"include_usage": true}
    });
    // Twice: the second time the proxy remembers the cleaned tools, and must send the same.
    let mut sent = Vec::new();
    for _ in 0..2 {
        let res = http_client()
            .post(format!("{}/echo/invocations", proxy.url()))
            .json_body(&request)
            .send()
            .await
            .unwrap();
        sent.push(json_of(res).await);
    }
    assert_eq!(sent[0]["body_text"], sent[1]["body_text"]);
    let echo = &sent[1];
    let forwarded: Value = serde_json::from_str(echo["body_text"].as_str().unwrap()).unwrap();
    // A Claude model accepts stream_options: it stays, and so does the usage of its streams.
    assert_eq!(
        forwarded["stream_options"],
        json!({"include_usage": true}),
        "{forwarded}"
    );
    assert_eq!(
        forwarded["messages"][0]["content"],
        json!([{"type": "text", "text": "hi"}])
    );
    assert_eq!(
        forwarded["messages"].as_array().unwrap().len(),
        2,
        "{forwarded}"
    );
    // A rewritten body keeps the client's key order: models read schemas in order.
    let text = echo["body_text"].as_str().unwrap();
    let position = |needle: &str| {
        text.find(needle)
            .unwrap_or_else(|| panic!("{needle} in {text}"))
    };
    assert!(position("\"model\"") < position("\"messages\""), "{text}");
    assert!(position("\"messages\"") < position("\"tools\""), "{text}");
    assert!(position("\"zeta\"") < position("\"alpha\""), "{text}");
    assert!(!text.contains("additionalProperties"), "{text}");
    let metrics = proxy.state.metrics().render(None);
    assert!(
        metrics.contains("fresh_proxy_filter_actions_total{kind=\"stream_options_removed\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fresh_proxy_filter_actions_total{kind=\"schema_keyword_removed\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn large_requests_are_sanitised_too() {
    // Above the size from which the filter runs off the worker thread.
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let long = "x".repeat(400 * 1024);
    let request = json!({
        "model": "databricks-gemini-2-5-pro",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": " "},
            {"type": "text", "text": long}
        ]}],
        "stream_options": {"include_usage": true}
    });
    let res = http_client()
        .post(format!("{}/echo/invocations", proxy.url()))
        .json_body(&request)
        .send()
        .await
        .unwrap();
    let echo = json_of(res).await;
    let forwarded: Value = serde_json::from_str(echo["body_text"].as_str().unwrap()).unwrap();
    assert!(forwarded.get("stream_options").is_none());
    assert_eq!(
        forwarded["messages"][0]["content"],
        json!([{"type": "text", "text": long}])
    );
}

#[tokio::test]
async fn upstream_down_is_a_502_json_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/serving-endpoints", closed.local_addr().unwrap());
    drop(closed);
    let proxy = serve_with(settings(&base), shared("dapi-unused")).await;
    let res = http_client()
        .post(format!("{}/chat/invocations", proxy.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(res.headers()["content-type"], "application/json");
    assert_eq!(json_of(res).await["error"]["type"], "upstream_unreachable");
}

#[tokio::test]
async fn no_upstream_headers_in_time_is_a_504_json_error() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let mut settings = settings(&ws.serving_base());
    settings.upstream_timeout = Duration::from_millis(300);
    let proxy = serve_with(settings, shared(&pat.value)).await;
    let started = Instant::now();
    let res = http_client()
        .post(format!(
            "{}/slow-headers/invocations?delay_ms=5000",
            proxy.url()
        ))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    assert_eq!(json_of(res).await["error"]["type"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(4));
}

#[tokio::test]
async fn upstream_errors_pass_through_untouched() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    // With waiting on, a 429 is waited out (tests/rate_limits.rs); here it is passed as it is.
    let mut settings = settings(&ws.serving_base());
    settings.rate_limit_wait = Duration::ZERO;
    let proxy = serve_with(settings, shared(&pat.value)).await;
    let res = http_client()
        .post(format!(
            "{}/status/invocations?status=429&retry_after=7",
            proxy.url()
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()["retry-after"], "7");
    assert_eq!(json_of(res).await["error_code"], "REQUEST_LIMIT_EXCEEDED");
}

fn write_config(path: &std::path::Path, token: &str) {
    fresh_token::databrickscfg::update_profile(path, "DEFAULT", &[("token", token)]).unwrap();
}

#[tokio::test]
async fn retry_once_turns_a_rotation_race_into_a_200() {
    let ws = FakeWorkspace::start().await;
    let first = ws.mint(Duration::from_secs(60));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".databrickscfg");
    write_config(&path, &first.value);
    // A file source that only looks at the file again when asked to: the race, made certain.
    let source = ConfigFileToken::new(&path, "DEFAULT").stat_interval(Duration::from_secs(3600));
    assert!(source.current().is_some());
    let proxy = serve_with(settings(&ws.serving_base()), Arc::new(source)).await;

    let second = ws.mint(Duration::from_secs(60));
    write_config(&path, &second.value);
    ws.revoke(&first.id);

    let res = http_client()
        .post(format!("{}/echo/invocations", proxy.url()))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(json_of(res).await["auth"]["token_id"], second.id.as_str());
    assert_eq!(ws.stats().serving_denied, 1, "the first attempt was denied");
    let metrics = proxy.state.metrics().render(None);
    assert!(metrics.contains("fresh_proxy_retries_total 1"), "{metrics}");
}

#[tokio::test]
async fn a_rejection_with_no_newer_token_is_answered_once() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    ws.revoke(&pat.id);
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let res = http_client()
        .post(format!("{}/chat/invocations", proxy.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(
        ws.stats().serving_denied,
        1,
        "no retry without a different token"
    );
}

#[tokio::test]
async fn ready_flips_with_the_token_state() {
    let ws = FakeWorkspace::start().await;
    let token = SharedToken::new();
    let proxy = serve_with(settings(&ws.serving_base()), Arc::new(token.clone())).await;
    let client = http_client();
    let ready = || async {
        client
            .get(format!("{}/ready", proxy.url()))
            .send()
            .await
            .unwrap()
    };
    let health = || async {
        json_of(
            client
                .get(format!("{}/health", proxy.url()))
                .send()
                .await
                .unwrap(),
        )
        .await
    };

    let res = ready().await;
    assert_eq!(res.status(), 503);
    assert_eq!(json_of(res).await["reason"], "no token is available");
    assert_eq!(health().await["token"]["state"], "missing");
    let res = client
        .post(format!("{}/chat/invocations", proxy.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(json_of(res).await["error"]["type"], "token_unavailable");

    let pat = ws.mint(Duration::from_secs(600));
    token.publish(Token::with_expiry(&pat.value, pat.expiry.unwrap()).unwrap());
    assert_eq!(ready().await.status(), 200);
    let h = health().await;
    assert_eq!(h["status"], "ok");
    assert_eq!(h["token"]["state"], "fresh");
    assert!(h["token"]["expires_in_s"].as_i64().unwrap() > 590);
    assert!(!h.to_string().contains(&pat.value));

    token.publish(
        Token::with_expiry(&pat.value, SystemTime::now() - Duration::from_secs(1)).unwrap(),
    );
    let res = ready().await;
    assert_eq!(res.status(), 503);
    assert_eq!(json_of(res).await["reason"], "the token has expired");
    let h = health().await;
    assert_eq!(h["status"], "degraded");
    assert_eq!(h["token"]["state"], "expired");
}

#[tokio::test]
async fn metrics_parse_as_prometheus_text() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let token =
        SharedToken::with_token(Token::with_expiry(&pat.value, pat.expiry.unwrap()).unwrap());
    let proxy = serve_with(settings(&ws.serving_base()), Arc::new(token)).await;
    let client = http_client();
    for _ in 0..3 {
        client
            .post(format!("{}/chat/invocations", proxy.url()))
            .body("{}")
            .send()
            .await
            .unwrap();
    }
    let res = client
        .get(format!("{}/metrics", proxy.url()))
        .send()
        .await
        .unwrap();
    assert!(
        res.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = res.text().await.unwrap();
    let scrape =
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("parses");
    let value = |name: &str, label: Option<(&str, &str)>| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value("fresh_proxy_requests_total", Some(("class", "2xx"))),
        Some(3.0)
    );
    assert!(value("fresh_proxy_token_seconds_to_expiry", None).unwrap() > 590.0);
    assert!(
        scrape
            .samples
            .iter()
            .any(|s| s.metric.starts_with("fresh_proxy_upstream_latency_seconds"))
    );
    assert!(!text.contains(&pat.value));
}

/// The harshest form of the old staleness bug: the token in the file is replaced every few
/// hundred milliseconds and the old one revoked at once, while clients keep sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_rewritten_and_revoked_under_load_fails_no_request() {
    let ws = FakeWorkspace::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".databrickscfg");
    let first = ws.mint(Duration::from_secs(120));
    write_config(&path, &first.value);
    let source = ConfigFileToken::new(&path, "DEFAULT");
    let proxy = serve_with(settings(&ws.serving_base()), Arc::new(source)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, url) = (stop.clone(), ok.clone(), proxy.url());
        clients.push(tokio::spawn(async move {
            let client = http_client();
            let mut failures = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let res = client
                    .post(format!("{url}/chat/invocations"))
                    .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .unwrap();
                match res.status().as_u16() {
                    200 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(other),
                }
            }
            failures
        }));
    }

    let mut previous = first;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let next = ws.mint(Duration::from_secs(120));
        write_config(&path, &next.value);
        ws.revoke(&previous.id);
        previous = next;
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for client in clients {
        failures.extend(client.await.unwrap());
    }
    let served = ok.load(Ordering::Relaxed);
    assert!(
        failures.is_empty(),
        "{} failed of {}: {failures:?}",
        failures.len(),
        served + failures.len()
    );
    assert!(served >= 50, "only {served} requests were sent");
    // The race was real: the upstream did deny stale tokens, and retries recovered them.
    let denied = ws.stats().serving_denied;
    let metrics = proxy.state.metrics().render(None);
    eprintln!("served {served}, denied-then-retried {denied}");
    assert!(
        metrics.contains(&format!("fresh_proxy_retries_total {denied}")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_client_disconnect_cancels_the_upstream_stream() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(60));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let stream = open_slow_stream(&proxy.url(), 200, 100).await;
    assert_eq!(ws.streams_abandoned(), 0);
    drop(stream);
    // 100 events × 200 ms would take 20 s; the upstream must see the reader leave long before.
    common::wait_until(
        Duration::from_secs(5),
        "the upstream stream to be dropped",
        || async { ws.streams_abandoned() == 1 },
    )
    .await;
}

/// Serve `app` on a loopback port as a stand-in upstream; returns its serving base URL.
async fn serve_upstream(app: axum::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}/serving-endpoints")
}

/// An upstream that sends two events of an SSE stream, then breaks the connection.
async fn breaking_upstream() -> String {
    use axum::body::Body;
    use axum::response::IntoResponse;
    let app = axum::Router::new().fallback(|| async {
        use futures_util::StreamExt;
        let events = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n")),
            Ok(Bytes::from_static(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"b\"}}]}\n\ndata: {\"choi")),
        ])
        .chain(futures_util::stream::once(async {
            // Let the first events reach the client before the connection breaks.
            tokio::time::sleep(Duration::from_millis(200)).await;
            Err(std::io::Error::other("upstream died"))
        }));
        ([("content-type", "text/event-stream")], Body::from_stream(events)).into_response()
    });
    serve_upstream(app).await
}

/// POSTs a streaming chat request to `url` and reads the answer to its end: a 200 whose body
/// must end cleanly within 10 s, not hang or abort.
async fn stream_to_its_end(url: String) -> String {
    let res = http_client()
        .post(url)
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), res.text())
        .await
        .expect("the stream must end, not hang")
        .expect("the stream must end cleanly, not abort")
}

/// The non-empty events of a raw event stream.
fn raw_events(raw: &str) -> Vec<&str> {
    raw.split("\n\n").filter(|e| !e.trim().is_empty()).collect()
}

/// The JSON of an `event: error` event.
fn error_event(event: &str) -> Value {
    let data = event
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("not an error event: {event:?}"));
    serde_json::from_str(data).unwrap()
}

#[tokio::test]
async fn a_broken_upstream_stream_ends_with_an_error_event_not_a_corrupt_stream() {
    let base = breaking_upstream().await;
    let proxy = serve_with(settings(&base), shared("dapi-unused")).await;
    let raw = stream_to_its_end(format!("{}/chat/invocations", proxy.url())).await;
    let events = raw_events(&raw);
    assert_eq!(events.len(), 3, "{raw:?}");
    assert!(
        events[0].contains("\"a\"") && events[1].contains("\"b\""),
        "{raw:?}"
    );
    let error = error_event(events[2]);
    assert_eq!(error["error"]["type"], "upstream_unreachable");
    assert!(
        !raw.contains("{\"choi\n"),
        "the torn event must not be emitted as data"
    );
}

/// An upstream that sends the start of its answer, then nothing, keeping the connection open:
/// an SSE event at `/serving-endpoints/sse/...`, some plain text anywhere else.
async fn stalling_upstream() -> String {
    use axum::body::Body;
    use axum::response::IntoResponse;
    let stall = |content_type: &'static str, first: &'static [u8]| {
        move || async move {
            let body =
                futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from_static(first))])
                    .chain(futures_util::stream::pending());
            ([("content-type", content_type)], Body::from_stream(body)).into_response()
        }
    };
    use futures_util::StreamExt;
    let sse = axum::Router::new().fallback(stall(
        "text/event-stream",
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"a\"}}]}\n\n",
    ));
    let app = axum::Router::new()
        .nest("/serving-endpoints/sse", sse)
        .fallback(stall("text/plain", b"partial"));
    serve_upstream(app).await
}

#[tokio::test]
async fn a_stream_that_goes_silent_ends_instead_of_hanging() {
    let base = stalling_upstream().await;
    let mut settings = settings(&base);
    settings.upstream_timeout = Duration::from_secs(1);
    let proxy = serve_with(settings, shared("dapi-unused")).await;

    let raw = stream_to_its_end(format!("{}/sse/invocations", proxy.url())).await;
    let events = raw_events(&raw);
    assert_eq!(events.len(), 2, "{raw:?}");
    assert!(events[0].contains("\"a\""), "{raw:?}");
    assert_eq!(
        error_event(events[1])["error"]["type"],
        "upstream_timeout",
        "{raw:?}"
    );

    // A body passed through as it is: the client's connection is cut, not held.
    let res = http_client()
        .get(format!("{}/plain/invocations", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let read = tokio::time::timeout(Duration::from_secs(10), res.bytes())
        .await
        .expect("the body must end, not hang");
    assert!(read.is_err(), "a stalled body must not look complete");
}

/// An upstream that gzips everything it answers, event streams included.
async fn gzipping_upstream() -> String {
    use axum::body::Body;
    use axum::response::IntoResponse;
    use tower_http::compression::CompressionLayer;
    use tower_http::compression::predicate::SizeAbove;
    let app = axum::Router::new()
        .fallback(|| async {
            let stream = concat!(
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"databricks-tool-call\",\"arguments\":\"\"}}]}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"name\\\":\\\"read_file\\\",\\\"path\\\":\\\"/x\\\"}\"}}]}}]}\n\n",
                "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                "data: [DONE]\n\n",
            );
            ([("content-type", "text/event-stream")], Body::from(stream)).into_response()
        })
        .layer(CompressionLayer::new().gzip(true).compress_when(SizeAbove::new(0)));
    serve_upstream(app).await
}

#[tokio::test]
async fn gzip_from_upstream_is_decoded_so_the_stream_can_be_fixed() {
    let base = gzipping_upstream().await;
    let proxy = serve_with(settings(&base), shared("dapi-unused")).await;
    let res = http_client()
        .post(format!("{}/chat/invocations", proxy.url()))
        .header("accept-encoding", "gzip")
        .json_body(&common::streamed_tool_call_request())
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("content-encoding").is_none());
    let events = SseReader::new(res).collect_data().await;
    let text = events.join("\n");
    assert!(text.contains("\"name\":\"read_file\""), "{text}");
    assert!(!text.contains("databricks-tool-call"), "{text}");
    assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
}

/// An upstream answering a 17 MiB JSON document in chunks, without `Content-Length`: plain at
/// `/serving-endpoints/plain/...`, gzipped at `/serving-endpoints/gzip/...`.
async fn large_json_upstream(document: Bytes) -> String {
    use axum::body::Body;
    use axum::response::IntoResponse;
    use tower_http::compression::CompressionLayer;
    use tower_http::compression::predicate::SizeAbove;
    let chunked = move || {
        let document = document.clone();
        async move {
            let chunks: Vec<Result<Bytes, std::io::Error>> = (0..document.len())
                .step_by(64 * 1024)
                .map(|at| Ok(document.slice(at..(at + 64 * 1024).min(document.len()))))
                .collect();
            (
                [("content-type", "application/json")],
                Body::from_stream(futures_util::stream::iter(chunks)),
            )
                .into_response()
        }
    };
    let gzip = axum::Router::new().fallback(chunked.clone()).layer(
        CompressionLayer::new()
            .gzip(true)
            .compress_when(SizeAbove::new(0)),
    );
    let app = axum::Router::new()
        .nest("/serving-endpoints/gzip", gzip)
        .fallback(chunked);
    serve_upstream(app).await
}

#[tokio::test]
async fn json_answers_too_large_to_fix_stream_through_unchanged() {
    let mut document = b"{\"object\":\"list\",\"data\":\"".to_vec();
    document.resize(document.len() + 17 * 1024 * 1024, b'x');
    document.extend_from_slice(b"\"}");
    let document = Bytes::from(document);
    let base = large_json_upstream(document.clone()).await;
    let base = base.trim_end_matches("/serving-endpoints").to_owned();
    for path in [
        "/serving-endpoints/plain/invocations",
        "/serving-endpoints/gzip/invocations",
    ] {
        let proxy = serve_with(
            settings(&format!("{base}/serving-endpoints")),
            shared("dapi-unused"),
        )
        .await;
        let target = path.trim_start_matches("/serving-endpoints");
        let res = http_client()
            .post(format!("{}{target}", proxy.url()))
            .header("accept-encoding", "gzip")
            .json_body(&json!({"input": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let body = res.bytes().await.expect("the whole body");
        assert_eq!(body.len(), document.len(), "{path}");
        assert!(body == document, "{path}: the body changed");
    }
}

#[tokio::test]
async fn a_burst_of_connections_waits_in_the_listen_backlog() {
    let listener = fresh_proxy::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    // Nothing accepts: a connection completes its handshake only while the kernel has room to
    // queue it. With the usual backlog of 128, connection 130 would wait for a SYN retry (1 s).
    let mut open = Vec::new();
    for n in 0..400 {
        let stream = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .unwrap_or_else(|_| panic!("connection {n} was not queued"))
        .unwrap();
        open.push(stream);
    }
    assert_eq!(open.len(), 400);
}

#[tokio::test]
async fn a_second_proxy_on_the_same_port_is_refused() {
    let first = fresh_proxy::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = first.local_addr().unwrap();
    // The listening socket is bound exclusively: a second proxy must not share its connections.
    let second = fresh_proxy::listen(addr).expect_err("the port is taken");
    assert_eq!(second.kind(), std::io::ErrorKind::AddrInUse);
}
