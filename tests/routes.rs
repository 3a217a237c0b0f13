//! Every route and mode over a real socket against the fake workspace: Responses, Anthropic,
//! Gemini, chat by model family, managed MCP, the workspace API kept out of reach, `/models`,
//! and token usage in `/metrics`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake_workspace::models::{
    MCP_TOOLS, USAGE_CACHED_TOKENS, USAGE_INPUT_TOKENS, USAGE_OUTPUT_TOKENS,
};
use common::fake_workspace::{FakeWorkspace, IssuedToken};
use common::harness::{RunningProxy, serve_with, settings};
use common::{JsonBody, http_client};
use fresh_token::{SharedToken, Token, TokenSource};
use serde_json::{Value, json};

fn shared(value: &str) -> Arc<dyn TokenSource> {
    Arc::new(SharedToken::with_token(Token::new(value).unwrap()))
}

async fn start() -> (FakeWorkspace, IssuedToken, RunningProxy) {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(300));
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    (ws, pat, proxy)
}

async fn json_of(res: reqwest::Response) -> Value {
    let text = res.text().await.expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The `data:` JSON documents of an event stream.
fn data_events(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|line| line.strip_prefix("data: "))
        .filter(|data| *data != "[DONE]")
        .map(|data| serde_json::from_str(data).unwrap_or_else(|e| panic!("{e}: {data}")))
        .collect()
}

/// Sends `request` to the workspace directly, with the bearer, and returns the body bytes.
async fn direct(ws: &FakeWorkspace, pat: &IssuedToken, path: &str, request: &Value) -> Vec<u8> {
    let res = http_client()
        .post(format!("{}{path}", ws.url()))
        .bearer_auth(&pat.value)
        .json_body(request)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    res.bytes().await.unwrap().to_vec()
}

/// One raw HTTP/1.1 request with `target` exactly as written (no client normalises it).
async fn raw_request(proxy: &RunningProxy, method: &str, target: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}",
        proxy.addr
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("an answer in time")
    .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

#[tokio::test]
async fn a_responses_stream_arrives_byte_for_byte() {
    let (ws, pat, proxy) = start().await;
    let request = json!({"model": "databricks-gpt-5", "input": "hi", "stream": true});
    let expected = direct(&ws, &pat, "/serving-endpoints/responses", &request).await;
    for path in ["/responses", "/serving-endpoints/responses"] {
        let res = http_client()
            .post(format!("{}{path}", proxy.url()))
            .header("user-agent", "codex_cli_rs/0.46.0 (Ubuntu 24.4.0; x86_64)")
            .json_body(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        assert_eq!(res.headers()["content-type"], "text/event-stream");
        let got = res.bytes().await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&expected),
            "{path}"
        );
    }
    let text = String::from_utf8(expected).unwrap();
    let kinds: Vec<String> = data_events(&text)
        .iter()
        .map(|e| e["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(kinds.first().unwrap(), "response.created");
    assert_eq!(kinds.last().unwrap(), "response.completed");

    // A whole (not streamed) answer, byte for byte too.
    let request = json!({"model": "databricks-gpt-5", "input": "hi"});
    let expected = direct(&ws, &pat, "/serving-endpoints/responses", &request).await;
    let res = http_client()
        .post(format!("{}/responses", proxy.url()))
        .json_body(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(res.bytes().await.unwrap().to_vec(), expected);

    let metrics = proxy.state.metrics().render(None);
    let line = format!(
        "fresh_proxy_tokens_total{{model=\"databricks-gpt-5\",agent=\"codex\",kind=\"input\"}} {}",
        2 * USAGE_INPUT_TOKENS
    );
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
}

#[tokio::test]
async fn claude_codes_key_never_reaches_the_workspace() {
    let (ws, pat, proxy) = start().await;
    let request = json!({"model": "databricks-claude-sonnet-4-5", "max_tokens": 256, "stream": true,
                         "messages": [{"role": "user", "content": "hi"}]});
    let expected = direct(
        &ws,
        &pat,
        "/serving-endpoints/anthropic/v1/messages",
        &request,
    )
    .await;
    ws.clear_recorded();
    for path in [
        "/anthropic/v1/messages",
        "/serving-endpoints/anthropic/v1/messages",
    ] {
        let res = http_client()
            .post(format!("{}{path}", proxy.url()))
            .header("x-api-key", "sk-ant-agent-own-key")
            .header("authorization", "Bearer sk-ant-agent-own-key")
            .header("anthropic-version", "2023-06-01")
            .header("user-agent", "claude-cli/2.0.14 (external, cli)")
            .json_body(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let got = res.bytes().await.unwrap();
        assert_eq!(got.to_vec(), expected, "{path}: byte for byte");
    }
    let recorded = ws.recorded_requests();
    assert_eq!(recorded.len(), 2);
    for call in &recorded {
        assert_eq!(call.path, "/serving-endpoints/anthropic/v1/messages");
        assert!(
            call.headers.get("x-api-key").is_none(),
            "{:?}",
            call.headers
        );
        assert_eq!(call.token_id, pat.id, "the proxy's token, not the agent's");
        assert_eq!(call.headers["anthropic-version"], "2023-06-01");
    }
    // The stream keeps every event of its real shape, usage included.
    let text = String::from_utf8(expected).unwrap();
    let events = data_events(&text);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds[0], "message_start");
    assert_eq!(kinds.last(), Some(&"message_stop"));
    assert!(kinds.contains(&"message_delta"));
    let metrics = proxy.state.metrics().render(None);
    for (kind, count) in [
        ("input", USAGE_INPUT_TOKENS),
        ("output", USAGE_OUTPUT_TOKENS),
        ("cached", USAGE_CACHED_TOKENS),
    ] {
        let line = format!(
            "fresh_proxy_tokens_total{{model=\"databricks-claude-sonnet-4-5\",agent=\"claude-code\",kind=\"{kind}\"}} {}",
            2 * count
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
}

#[tokio::test]
async fn every_agent_credential_header_is_dropped() {
    let (ws, pat, proxy) = start().await;
    let res = http_client()
        .post(format!("{}/echo/invocations", proxy.url()))
        .header("x-api-key", "k1")
        .header("api-key", "k2")
        .header("x-goog-api-key", "k3")
        .header("authorization", "Bearer agent-key")
        .header("x-kept", "yes")
        .json_body(&json!({"x": 1}))
        .send()
        .await
        .unwrap();
    let echo = json_of(res).await;
    let headers = echo["headers"].as_object().unwrap();
    for name in ["x-api-key", "api-key", "x-goog-api-key"] {
        assert!(!headers.contains_key(name), "{name} reached the workspace");
    }
    assert_eq!(headers["x-kept"], "yes");
    assert_eq!(echo["auth"]["token_id"], pat.id.as_str());
    let _ = ws;
}

#[tokio::test]
async fn a_claude_stream_keeps_its_usage_and_gemini_gets_no_stream_options() {
    let (ws, _pat, proxy) = start().await;
    let ask = |model: &str| {
        json!({"model": model, "stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let res = http_client()
        .post(format!("{}/chat/completions", proxy.url()))
        .json_body(&ask("databricks-claude-sonnet-4-5"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let events = data_events(&res.text().await.unwrap());
    let usage = events
        .iter()
        .find(|e| !e["usage"].is_null())
        .expect("a usage chunk");
    assert_eq!(usage["usage"]["prompt_tokens"], USAGE_INPUT_TOKENS);

    ws.clear_recorded();
    let res = http_client()
        .post(format!(
            "{}/serving-endpoints/chat/completions",
            proxy.url()
        ))
        .json_body(&ask("databricks-gemini-2-5-pro"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", res.text().await.unwrap());
    let sent: Value = serde_json::from_slice(&ws.recorded_requests()[0].body).unwrap();
    assert!(sent.get("stream_options").is_none(), "{sent}");
    assert_eq!(sent["stream"], true);
    let metrics = proxy.state.metrics().render(None);
    assert!(
        metrics.contains("fresh_proxy_filter_actions_total{kind=\"stream_options_removed\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn model_rules_from_a_file_replace_the_built_in_ones() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(300));
    let mut settings = settings(&ws.serving_base());
    // No rules at all: the Gemini model gets stream_options and refuses it, as it does upstream.
    settings.rules = fresh_filter::ModelRules::none();
    let proxy = serve_with(settings, shared(&pat.value)).await;
    let res = http_client()
        .post(format!("{}/chat/completions", proxy.url()))
        .json_body(
            &json!({"model": "databricks-gemini-2-5-pro", "stream": true,
                           "stream_options": {"include_usage": true}, "messages": []}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
}

#[tokio::test]
async fn stream_usage_inject_asks_where_the_model_accepts_it() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(300));
    let mut settings = settings(&ws.serving_base());
    settings.inject_stream_usage = true;
    let proxy = serve_with(settings, shared(&pat.value)).await;
    let ask = |model: &str| json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    let res = http_client()
        .post(format!("{}/chat/completions", proxy.url()))
        .header("x-agent-name", "opencode")
        .json_body(&ask("databricks-claude-sonnet-4-5"))
        .send()
        .await
        .unwrap();
    let events = data_events(&res.text().await.unwrap());
    assert!(events.iter().any(|e| !e["usage"].is_null()), "{events:?}");
    let metrics = proxy.state.metrics().render(None);
    let line = format!(
        "fresh_proxy_tokens_total{{model=\"databricks-claude-sonnet-4-5\",agent=\"opencode\",kind=\"output\"}} {USAGE_OUTPUT_TOKENS}"
    );
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");

    // The Gemini model refuses stream_options: none is added.
    let res = http_client()
        .post(format!("{}/chat/completions", proxy.url()))
        .json_body(&ask("databricks-gemini-2-5-pro"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // A request that is not streamed gets none either.
    ws.clear_recorded();
    let res = http_client()
        .post(format!("{}/chat/completions", proxy.url()))
        .json_body(&json!({"model": "databricks-claude-sonnet-4-5", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let sent: Value = serde_json::from_slice(&ws.recorded_requests()[0].body).unwrap();
    assert!(sent.get("stream_options").is_none(), "{sent}");
}

#[tokio::test]
async fn gemini_native_calls_lose_function_ids_and_their_key() {
    let (ws, _pat, proxy) = start().await;
    let request = json!({"contents": [
        {"role": "user", "parts": [{"text": "list files"}]},
        {"role": "model", "parts": [{"functionCall": {"id": "call-1", "name": "ls", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"id": "call-1", "name": "ls",
                                                        "response": {"files": []}}}]}
    ]});
    for (path, streamed) in [
        (
            "/gemini/v1beta/models/databricks-gemini-2-5-pro:generateContent",
            false,
        ),
        (
            "/serving-endpoints/gemini/v1beta/models/databricks-gemini-2-5-pro:streamGenerateContent?alt=sse",
            true,
        ),
    ] {
        ws.clear_recorded();
        let res = http_client()
            .post(format!("{}{path}", proxy.url()))
            .header("x-goog-api-key", "AIza-agent-key")
            .header("user-agent", "GeminiCLI/0.9.0 (linux; x64)")
            .json_body(&request)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let text = res.text().await.unwrap();
        let answer = if streamed {
            data_events(&text).pop().unwrap()
        } else {
            serde_json::from_str(&text).unwrap()
        };
        assert_eq!(
            answer["usageMetadata"]["candidatesTokenCount"],
            USAGE_OUTPUT_TOKENS
        );
        let call = &ws.recorded_requests()[0];
        assert!(call.headers.get("x-goog-api-key").is_none());
        let sent: Value = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(
            sent["contents"][1]["parts"][0]["functionCall"],
            json!({"name": "ls", "args": {}})
        );
        assert!(
            sent["contents"][2]["parts"][0]["functionResponse"]
                .get("id")
                .is_none()
        );
    }
    let metrics = proxy.state.metrics().render(None);
    let line = format!(
        "fresh_proxy_tokens_total{{model=\"databricks-gemini-2-5-pro\",agent=\"gemini-cli\",kind=\"output\"}} {}",
        2 * USAGE_OUTPUT_TOKENS
    );
    assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
}

#[tokio::test]
async fn the_serving_endpoints_path_only_swaps_the_host() {
    let (ws, _pat, proxy) = start().await;
    let res = http_client()
        .post(format!(
            "{}/serving-endpoints/chat/completions",
            proxy.url()
        ))
        .json_body(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = json_of(res).await;
    assert_eq!(body["object"], "chat.completion");
    let paths: Vec<String> = ws.recorded_requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/serving-endpoints/chat/completions"]);
}

#[tokio::test]
async fn mcp_reaches_the_workspace_with_the_fresh_token() {
    let (ws, pat, proxy) = start().await;
    let res = http_client()
        .post(format!(
            "{}/api/2.0/mcp/functions/main/default",
            proxy.url()
        ))
        .header("authorization", "Bearer agent-mcp-key")
        .json_body(&json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = json_of(res).await;
    assert_eq!(body["id"], 7);
    let names: Vec<&str> = body["result"]["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, MCP_TOOLS);
    let call = &ws.recorded_requests()[0];
    assert_eq!(call.path, "/api/2.0/mcp/functions/main/default");
    assert_eq!(call.token_id, pat.id);
    // The JSON-RPC body went as it came: no filter touches MCP.
    assert_eq!(
        serde_json::from_slice::<Value>(&call.body).unwrap(),
        json!({"jsonrpc": "2.0", "id": 7, "method": "tools/list"})
    );
}

#[tokio::test]
async fn a_token_call_through_the_proxy_mints_nothing() {
    let (ws, _pat, proxy) = start().await;
    let live_before = ws.live_token_ids();
    let requests_before = ws.stats().requests;
    let cases = [
        ("POST", "/api/2.0/token/create", 403),
        ("POST", "/api/2.0/token/delete", 403),
        ("GET", "/api/2.0/token/list", 403),
        ("POST", "/API/2.0/Token/create", 403),
        ("GET", "/api/2.0/token-management/tokens", 403),
        ("POST", "/api/2.0/mcp/../token/create", 400),
        ("POST", "/api/2.0/mcp/%2e%2e/token/create", 400),
        ("POST", "/serving-endpoints/../api/2.0/token/create", 400),
        ("POST", "/../api/2.0/token/create", 400),
        ("GET", "/api/2.0/clusters/list", 404),
        ("GET", "/api/2.0/serving-endpoints", 404),
    ];
    for (method, target, status) in cases {
        let (got, body) = raw_request(&proxy, method, target).await;
        assert_eq!(got, status, "{method} {target}: {body}");
        let error: Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{body}"));
        assert!(error["error"]["type"].is_string(), "{body}");
        assert!(error["error"]["message"].is_string(), "{body}");
    }
    assert_eq!(ws.stats().creates, 0);
    assert_eq!(ws.live_token_ids(), live_before);
    assert_eq!(
        ws.stats().requests,
        requests_before,
        "the workspace was never called"
    );
}

#[tokio::test]
async fn v1_models_lists_only_ready_chat_endpoints_from_a_cache() {
    let (ws, _pat, proxy) = start().await;
    for path in ["/v1/models", "/models", "/v1/models"] {
        let res = http_client()
            .get(format!("{}{path}", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{path}");
        let body = json_of(res).await;
        assert_eq!(body["object"], "list");
        let ids: Vec<&str> = body["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap())
            .collect();
        assert_eq!(
            ids,
            [
                "databricks-claude-sonnet-4-5",
                "databricks-gemini-2-5-pro",
                "databricks-gpt-5"
            ],
            "{path}"
        );
        assert!(
            body["data"]
                .as_array()
                .unwrap()
                .iter()
                .all(|m| m["object"] == "model")
        );
    }
    assert_eq!(
        ws.endpoint_lists(),
        1,
        "served from the cache after the first"
    );

    // Other methods on those paths are forwarded like any other path.
    let res = http_client()
        .post(format!("{}/v1/models", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(res).await["path"], "/serving-endpoints/v1/models");
}

#[tokio::test]
async fn models_says_clearly_when_the_workspace_cannot_list() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(300));
    ws.fail_next_endpoint_lists(1, 500);
    let proxy = serve_with(settings(&ws.serving_base()), shared(&pat.value)).await;
    let res = http_client()
        .get(format!("{}/v1/models", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body = json_of(res).await;
    assert_eq!(body["error"]["type"], "upstream_refused");
    assert!(body["error"]["message"].as_str().unwrap().contains("500"));

    // A workspace that is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let proxy = serve_with(
        settings(&format!("http://{addr}/serving-endpoints")),
        shared(&pat.value),
    )
    .await;
    let res = http_client()
        .get(format!("{}/models", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body = json_of(res).await;
    assert_eq!(body["error"]["type"], "upstream_unreachable");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("could not be reached")
    );

    // No token yet: 503, and the workspace is not asked.
    let lists = ws.endpoint_lists();
    let proxy = serve_with(settings(&ws.serving_base()), Arc::new(SharedToken::new())).await;
    let res = http_client()
        .get(format!("{}/v1/models", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(json_of(res).await["error"]["type"], "token_unavailable");
    assert_eq!(ws.endpoint_lists(), lists);
}

#[tokio::test]
async fn bad_input_on_the_new_paths_gets_the_upstreams_answer_unchanged() {
    let (ws, _pat, proxy) = start().await;
    // Not JSON on the Anthropic route: forwarded as it is; the workspace's 400 comes back.
    let res = http_client()
        .post(format!("{}/anthropic/v1/messages", proxy.url()))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(&ws.recorded_requests()[0].body[..], b"{not json");
    // A Responses request without input: the workspace's refusal, not a proxy error.
    let res = http_client()
        .post(format!("{}/responses", proxy.url()))
        .json_body(&json!({"model": "databricks-gpt-5"}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(json_of(res).await["error_code"], "INVALID_PARAMETER_VALUE");
}

#[test]
fn a_malformed_routes_or_rules_file_exits_2_naming_the_file_and_line() {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        "[DEFAULT]\nhost = https://example.cloud.databricks.com\ntoken = dapi-in-file-0001\n",
    )
    .unwrap();
    let routes = home.path().join("routes.toml");
    std::fs::write(
        &routes,
        "[[route]]\nprefix = \"/gateway\"\nupstream = \"https://gw.example.com\"\nmode = \"chats\"\n",
    )
    .unwrap();
    let token_route = home.path().join("token-route.toml");
    std::fs::write(
        &token_route,
        "\n[[route]]\nprefix = \"/t\"\nupstream = \"https://example.cloud.databricks.com/api/2.0/token\"\nmode = \"passthrough\"\n",
    )
    .unwrap();
    let rules = home.path().join("rules.json");
    std::fs::write(
        &rules,
        "{\"rules\": [\n  {\"name\": \"x\", \"models\": [\"*\"],\n   \"modes\": [\"chat\"], \"remove\": [\"a[]\"]}\n]}\n",
    )
    .unwrap();
    let cases: &[(&str, &std::path::Path, &[String])] = &[
        (
            "PROXY_ROUTES_FILE",
            &routes,
            &[format!("{}:4:", routes.display()), "chats".to_owned()],
        ),
        (
            "PROXY_ROUTES_FILE",
            &token_route,
            &[
                format!("{}:4:", token_route.display()),
                "/api/2.0/mcp".to_owned(),
            ],
        ),
        (
            "PROXY_FILTER_RULES",
            &rules,
            &[format!("{}:3:", rules.display()), "a[]".to_owned()],
        ),
        (
            "PROXY_FILTER_RULES",
            std::path::Path::new("/nonexistent/rules.json"),
            &["cannot read /nonexistent/rules.json".to_owned()],
        ),
    ];
    for (var, path, needles) in cases {
        let out = common::binary::command(home.path())
            .env(var, path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{var}={}: {stderr}",
            path.display()
        );
        assert!(stderr.contains(var), "{stderr}");
        for needle in *needles {
            assert!(
                stderr.contains(needle.as_str()),
                "{stderr:?} lacks {needle:?}"
            );
        }
        assert_eq!(stderr.lines().count(), 1, "one message: {stderr}");
    }
}

/// The binary as a new user runs it: routes built from `DATABRICKS_HOST`, a routes file and the
/// stream usage setting read, and no agent's key in any log line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_routes_every_agent_and_logs_no_key() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(300));
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[DEFAULT]\nhost = {}\ntoken = {}\n", ws.url(), pat.value),
    )
    .unwrap();
    let routes = home.path().join("routes.toml");
    std::fs::write(
        &routes,
        format!(
            "[[route]]\nprefix = \"/my-mcp\"\nupstream = \"{}/api/2.0/mcp/functions/main\"\nmode = \"passthrough\"\n",
            ws.url()
        ),
    )
    .unwrap();
    let mut cmd = common::binary::command(home.path());
    cmd.env("PAT_ROTATION", "off")
        .env("RUST_LOG", "debug")
        .env("PROXY_ROUTES_FILE", &routes)
        .env("PROXY_STREAM_USAGE", "inject");
    let proxy = tokio::task::spawn_blocking(move || common::binary::ProxyProcess::start(cmd))
        .await
        .unwrap();
    let secret = "sk-ant-api03-never-logged-0123456789";
    let client = http_client();

    let res = client
        .post(format!("{}/anthropic/v1/messages", proxy.url()))
        .header("x-api-key", secret)
        .header("user-agent", "claude-cli/2.0.14 (external, cli)")
        .json_body(
            &json!({"model": "databricks-claude-sonnet-4-5", "max_tokens": 64,
                           "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    // Streamed chat without stream_options: usage is asked for (PROXY_STREAM_USAGE=inject).
    let res = client
        .post(format!(
            "{}/serving-endpoints/chat/completions",
            proxy.url()
        ))
        .header("authorization", format!("Bearer {secret}"))
        .json_body(&json!({"model": "databricks-gpt-5", "stream": true,
                           "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let events = data_events(&res.text().await.unwrap());
    assert!(events.iter().any(|e| !e["usage"].is_null()), "{events:?}");
    let res = client
        .post(format!("{}/my-mcp/default", proxy.url()))
        .json_body(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize"}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        json_of(res).await["result"]["serverInfo"]["name"],
        "databricks-mcp/functions/main/default"
    );
    let res = client
        .post(format!("{}/api/2.0/token/create", proxy.url()))
        .json_body(&json!({"lifetime_seconds": 60}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    assert_eq!(ws.stats().creates, 0);
    let res = client
        .get(format!("{}/v1/models", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(res).await["data"].as_array().unwrap().len(), 3);
    let metrics = client
        .get(format!("{}/metrics", proxy.url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        format!(
            "fresh_proxy_tokens_total{{model=\"databricks-claude-sonnet-4-5\",agent=\"claude-code\",kind=\"input\"}} {USAGE_INPUT_TOKENS}"
        ),
        format!(
            "fresh_proxy_tokens_total{{model=\"databricks-gpt-5\",agent=\"other\",kind=\"output\"}} {USAGE_OUTPUT_TOKENS}"
        ),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    for call in ws.recorded_requests() {
        assert!(call.headers.get("x-api-key").is_none());
        assert_eq!(call.token_id, pat.id);
    }
    let logs = proxy.logs();
    assert!(logs.contains("DEBUG"), "debug logs are on: {logs}");
    assert!(
        !logs.contains(secret),
        "an agent's key in the logs:\n{logs}"
    );
    assert!(!logs.contains(&pat.value), "the token in the logs:\n{logs}");
}

/// The AI Gateway forms keep their path on the workspace host. (The fake workspace serves no AI
/// Gateway, so its 404 names the path that reached it.)
#[tokio::test]
async fn ai_gateway_forms_reach_the_workspace_with_their_path() {
    let (ws, _pat, proxy) = start().await;
    for path in [
        "/ai-gateway/anthropic/v1/messages",
        "/ai-gateway/gemini/v1beta/models/m:generateContent",
        "/ai-gateway/mlflow/v1/responses",
        "/ai-gateway/mlflow/v1/chat/completions",
    ] {
        let before = ws.stats().requests;
        let res = http_client()
            .post(format!("{}{path}", proxy.url()))
            .header("x-api-key", "agent-key")
            .json_body(&json!({"model": "m", "input": "hi"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 404, "{path}");
        let body = json_of(res).await;
        assert_eq!(
            body["message"],
            format!("No API found for 'POST {path}'"),
            "{path}"
        );
        assert_eq!(ws.stats().requests, before + 1);
    }
}
