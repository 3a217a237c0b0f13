//! The fake workspace behaves like the Databricks REST API, so the other tests prove something.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fresh_test_support::fake_workspace::{
    Behaviour, CHAT_REPLY, FakeWorkspace, REDACTED, TOOL_CALL_ARGUMENTS, TOOL_CALL_NAME, TokenKind,
    USER_NAME, sha256_hex,
};
use fresh_test_support::{JsonBody, SseReader, http_client, wait_until};
use serde_json::{Value, json};

const DEADLINE: Duration = Duration::from_secs(10);

async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("read the body");
    let json = serde_json::from_slice(&body).unwrap_or_else(|error| {
        panic!(
            "body is not JSON ({error}): {:?}",
            String::from_utf8_lossy(&body)
        )
    });
    (status, json)
}

async fn get_me(workspace: &FakeWorkspace, token: &str) -> (u16, Value) {
    let response = http_client()
        .get(format!("{}/api/2.0/preview/scim/v2/Me", workspace.url()))
        .bearer_auth(token)
        .send()
        .await
        .expect("send scim/v2/Me");
    status_and_json(response).await
}

async fn create_token(workspace: &FakeWorkspace, bearer: &str, body: Value) -> (u16, Value) {
    let response = http_client()
        .post(format!("{}/api/2.0/token/create", workspace.url()))
        .bearer_auth(bearer)
        .json_body(&body)
        .send()
        .await
        .expect("send token/create");
    status_and_json(response).await
}

async fn delete_token(workspace: &FakeWorkspace, bearer: &str, token_id: &str) -> (u16, Value) {
    let response = http_client()
        .post(format!("{}/api/2.0/token/delete", workspace.url()))
        .bearer_auth(bearer)
        .json_body(&json!({ "token_id": token_id }))
        .send()
        .await
        .expect("send token/delete");
    status_and_json(response).await
}

async fn listed_ids(workspace: &FakeWorkspace, bearer: &str) -> Vec<String> {
    let response = http_client()
        .get(format!("{}/api/2.0/token/list", workspace.url()))
        .bearer_auth(bearer)
        .send()
        .await
        .expect("send token/list");
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 200, "{body}");
    body["token_infos"]
        .as_array()
        .expect("token_infos is an array")
        .iter()
        .map(|info| info["token_id"].as_str().expect("token_id").to_owned())
        .collect()
}

fn assert_invalid_token(status: u16, body: &Value) {
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        body,
        &json!({"error_code": "PERMISSION_DENIED", "message": "Invalid access token."})
    );
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    i64::try_from(since_epoch.as_millis()).unwrap()
}

fn is_lower_hex(text: &str) -> bool {
    text.bytes()
        .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
}

#[tokio::test]
async fn minted_token_works_until_its_lifetime_passes() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_millis(1500));
    let expiry = token.expiry.expect("a minted token has an expiry");

    let (status, me) = get_me(&workspace, &token.value).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["userName"], USER_NAME);
    assert_eq!(me["active"], true);

    wait_until(DEADLINE, "the minted token to be refused", || async {
        get_me(&workspace, &token.value).await.0 == 403
    })
    .await;
    assert!(
        SystemTime::now() >= expiry,
        "refused before its expiry time"
    );
    let (status, body) = get_me(&workspace, &token.value).await;
    assert_invalid_token(status, &body);
    assert!(!workspace.is_live(&token.value));
    assert!(!workspace.live_token_ids().contains(&token.id));
}

#[tokio::test]
async fn missing_or_unknown_bearer_is_refused() {
    let workspace = FakeWorkspace::start().await;
    let response = http_client()
        .get(format!("{}/api/2.0/token/list", workspace.url()))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error_code"], "UNAUTHENTICATED");

    let (status, body) = get_me(&workspace, "dapi00000000000000000000000000000000").await;
    assert_invalid_token(status, &body);
    assert_eq!(workspace.stats().denied, 2);
}

#[tokio::test]
async fn revoked_token_is_refused() {
    let workspace = FakeWorkspace::start().await;
    let by_id = workspace.mint(Duration::from_secs(600));
    let by_value = workspace.mint_without_expiry();
    assert_eq!(by_value.expiry, None);
    assert_eq!(get_me(&workspace, &by_id.value).await.0, 200);
    assert_eq!(get_me(&workspace, &by_value.value).await.0, 200);

    assert!(workspace.revoke(&by_id.id));
    assert!(workspace.revoke_value(&by_value.value));
    assert!(!workspace.revoke(&by_id.id), "already revoked");

    for token in [&by_id, &by_value] {
        let (status, body) = get_me(&workspace, &token.value).await;
        assert_invalid_token(status, &body);
        assert!(!workspace.is_live(&token.value));
    }
}

#[tokio::test]
async fn expire_now_ends_a_token_at_once() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    assert!(workspace.expire_now(&token.id));
    let (status, body) = get_me(&workspace, &token.value).await;
    assert_invalid_token(status, &body);
}

#[tokio::test]
async fn create_honours_lifetime_seconds_in_milliseconds() {
    let workspace = FakeWorkspace::start().await;
    let bootstrap = workspace.mint(Duration::from_secs(600));
    let before = now_ms();
    let (status, created) = create_token(
        &workspace,
        &bootstrap.value,
        json!({"lifetime_seconds": 900, "comment": "fresh-proxy-auto-rotated"}),
    )
    .await;
    let after = now_ms();
    assert_eq!(status, 200, "{created}");

    let value = created["token_value"].as_str().unwrap();
    assert!(value.starts_with("dapi"), "PAT shape");
    assert_eq!(value.len(), 36);
    assert!(is_lower_hex(&value[4..]));
    let info = &created["token_info"];
    let id = info["token_id"].as_str().unwrap();
    assert!(is_lower_hex(id) && id.len() == 64, "{id}");
    let creation = info["creation_time"].as_i64().unwrap();
    assert!((before..=after).contains(&creation), "creation_time in ms");
    assert_eq!(info["expiry_time"].as_i64().unwrap() - creation, 900_000);
    assert_eq!(info["comment"], "fresh-proxy-auto-rotated");

    assert_eq!(get_me(&workspace, value).await.0, 200);
    assert!(workspace.is_live_id(id));
    let summary = workspace
        .live_tokens()
        .into_iter()
        .find(|token| token.id == id)
        .unwrap();
    assert_eq!(summary.kind, TokenKind::Pat);
    assert_eq!(summary.comment, "fresh-proxy-auto-rotated");

    // Without a lifetime (or with 0), the token never expires: expiry_time -1.
    for body in [json!({}), json!({"lifetime_seconds": 0})] {
        let (status, created) = create_token(&workspace, &bootstrap.value, body).await;
        assert_eq!(status, 200, "{created}");
        assert_eq!(created["token_info"]["expiry_time"], -1);
    }
    // 64-bit integers may come as strings, as the API accepts them.
    let (status, created) = create_token(
        &workspace,
        &bootstrap.value,
        json!({"lifetime_seconds": "60"}),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let info = &created["token_info"];
    assert_eq!(
        info["expiry_time"].as_i64().unwrap() - info["creation_time"].as_i64().unwrap(),
        60_000
    );

    let (status, body) = create_token(
        &workspace,
        &bootstrap.value,
        json!({"lifetime_seconds": -5}),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body["error_code"], "INVALID_PARAMETER_VALUE");

    let stats = workspace.stats();
    assert_eq!((stats.creates, stats.create_failures), (4, 1));
}

#[tokio::test]
async fn created_token_really_expires() {
    let workspace = FakeWorkspace::start().await;
    let bootstrap = workspace.mint(Duration::from_secs(600));
    let (status, created) =
        create_token(&workspace, &bootstrap.value, json!({"lifetime_seconds": 1})).await;
    assert_eq!(status, 200, "{created}");
    let value = created["token_value"].as_str().unwrap().to_owned();
    assert_eq!(get_me(&workspace, &value).await.0, 200);

    wait_until(DEADLINE, "the created token to expire", || async {
        get_me(&workspace, &value).await.0 == 403
    })
    .await;
    let expiry_ms = created["token_info"]["expiry_time"].as_i64().unwrap();
    assert!(now_ms() >= expiry_ms);
    let (status, body) = create_token(&workspace, &value, json!({})).await;
    assert_invalid_token(status, &body);
}

#[tokio::test]
async fn delete_revokes_and_unknown_ids_are_not_found() {
    let workspace = FakeWorkspace::start().await;
    let bootstrap = workspace.mint(Duration::from_secs(600));
    let victim = workspace.mint(Duration::from_secs(600));

    let (status, body) = delete_token(&workspace, &bootstrap.value, &victim.id).await;
    assert_eq!((status, &body), (200, &json!({})));
    let (status, body) = get_me(&workspace, &victim.value).await;
    assert_invalid_token(status, &body);

    for id in [victim.id.as_str(), "0123456789abcdef"] {
        let (status, body) = delete_token(&workspace, &bootstrap.value, id).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error_code"], "RESOURCE_DOES_NOT_EXIST");
        assert!(body["message"].is_string());
    }

    // A token may revoke itself; afterwards it is refused.
    let (status, _) = delete_token(&workspace, &bootstrap.value, &bootstrap.id).await;
    assert_eq!(status, 200);
    let (status, body) = delete_token(&workspace, &bootstrap.value, &bootstrap.id).await;
    assert_invalid_token(status, &body);

    let stats = workspace.stats();
    assert_eq!(
        (stats.deletes, stats.delete_unknown, stats.delete_failures),
        (2, 2, 1)
    );
}

#[tokio::test]
async fn list_shows_only_live_tokens_without_values() {
    let workspace = FakeWorkspace::start().await;
    let caller = workspace.mint(Duration::from_secs(600));
    let live = workspace.mint_with_comment(None, "kept");
    let revoked = workspace.mint(Duration::from_secs(600));
    let short = workspace.mint(Duration::from_millis(300));
    workspace.revoke(&revoked.id);
    workspace.set_oauth_client("client", "secret", Duration::from_secs(600));

    wait_until(DEADLINE, "the short token to expire", || async {
        !workspace.is_live(&short.value)
    })
    .await;
    let listed = listed_ids(&workspace, &caller.value).await;
    assert_eq!(listed, vec![caller.id.clone(), live.id.clone()]);
    assert_eq!(workspace.live_token_ids(), listed);

    let body = http_client()
        .get(format!("{}/api/2.0/token/list", workspace.url()))
        .bearer_auth(&caller.value)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains(&caller.value) && !body.contains(&live.value));
    let infos: Value = serde_json::from_str(&body).unwrap();
    let kept = &infos["token_infos"][1];
    assert_eq!(kept["comment"], "kept");
    assert_eq!(kept["expiry_time"], -1);
    assert_eq!(kept["created_by_username"], USER_NAME);
}

#[tokio::test]
async fn oauth_client_credentials_issue_bearers_that_expire() {
    let workspace = FakeWorkspace::start().await;
    workspace.set_oauth_client("sp-client", "sp-secret", Duration::from_secs(1));
    let client = http_client();
    let token_url = format!("{}/oidc/v1/token", workspace.url());
    let form = "grant_type=client_credentials&scope=all-apis";

    let response = client
        .post(&token_url)
        .basic_auth("sp-client", Some("wrong"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");

    let response = client
        .post(&token_url)
        .basic_auth("sp-client", Some("sp-secret"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    let (status, issued) = status_and_json(response).await;
    assert_eq!(status, 200, "{issued}");
    assert_eq!(issued["token_type"], "Bearer");
    assert_eq!(issued["expires_in"], 1);
    assert_eq!(issued["scope"], "all-apis");
    let access = issued["access_token"].as_str().unwrap().to_owned();

    assert_eq!(get_me(&workspace, &access).await.0, 200);
    let response = client
        .post(workspace.endpoint_url(Behaviour::Echo))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    let (status, echo) = status_and_json(response).await;
    assert_eq!(status, 200);
    assert_eq!(echo["auth"]["kind"], "oauth");
    // OAuth tokens are not PATs: token/list does not show them.
    assert!(listed_ids(&workspace, &access).await.is_empty());

    wait_until(DEADLINE, "the access token to expire", || async {
        get_me(&workspace, &access).await.0 == 403
    })
    .await;

    // Credentials in the form body work too.
    let response = client
        .post(&token_url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("grant_type=client_credentials&client_id=sp-client&client_secret=sp-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let stats = workspace.stats();
    assert_eq!((stats.oauth_issued, stats.oauth_refused), (2, 1));
}

#[tokio::test]
async fn injected_create_failures_come_first() {
    let workspace = FakeWorkspace::start().await;
    let bootstrap = workspace.mint(Duration::from_secs(600));
    workspace.fail_next_creates_with_retry_after(2, 503, 7);
    workspace.fail_next_creates(1, 500);

    let client = http_client();
    for (expected_status, code, retry_after) in [
        (503, "TEMPORARILY_UNAVAILABLE", Some("7")),
        (503, "TEMPORARILY_UNAVAILABLE", Some("7")),
        (500, "INTERNAL_ERROR", None),
    ] {
        let response = client
            .post(format!("{}/api/2.0/token/create", workspace.url()))
            .bearer_auth(&bootstrap.value)
            .json_body(&json!({"lifetime_seconds": 60}))
            .send()
            .await
            .unwrap();
        let header = response
            .headers()
            .get("retry-after")
            .map(|value| value.to_str().unwrap().to_owned());
        assert_eq!(header.as_deref(), retry_after);
        let (status, body) = status_and_json(response).await;
        assert_eq!(
            (status, body["error_code"].as_str()),
            (expected_status, Some(code))
        );
    }
    let (status, body) = create_token(
        &workspace,
        &bootstrap.value,
        json!({"lifetime_seconds": 60}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let stats = workspace.stats();
    assert_eq!((stats.creates, stats.create_failures), (1, 3));
    assert_eq!(workspace.live_token_ids().len(), 2);
}

#[tokio::test]
async fn injected_serving_failures_then_success() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    workspace.fail_next_serving(2, 500);
    let client = http_client();
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let response = client
            .post(workspace.endpoint_url(Behaviour::Echo))
            .bearer_auth(&token.value)
            .body("x")
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(statuses, [500, 500, 200]);
    let stats = workspace.stats();
    assert_eq!((stats.serving_ok, stats.serving_errors), (1, 2));
}

#[tokio::test]
async fn rate_limited_serving_answers_429_and_records_each_attempt() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    workspace.rate_limit_serving(1, Some(3));
    workspace.rate_limit_serving(1, None);
    let client = http_client();
    let before = Instant::now();
    let mut answers = Vec::new();
    for agent in ["a", "b", "c"] {
        let response = client
            .post(workspace.endpoint_url(Behaviour::Chat))
            .bearer_auth(&token.value)
            .header("x-fake-agent", agent)
            .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        let (status, body) = status_and_json(response).await;
        answers.push((status, retry_after, body["error_code"].clone()));
    }
    assert_eq!(
        answers,
        [
            (429, Some("3".to_owned()), json!("REQUEST_LIMIT_EXCEEDED")),
            (429, None, json!("REQUEST_LIMIT_EXCEEDED")),
            (200, None, Value::Null),
        ]
    );
    let attempts = workspace.serving_attempts();
    let seen: Vec<_> = attempts
        .iter()
        .map(|a| (a.agent.as_deref(), a.rate_limited, a.path.as_str()))
        .collect();
    let path = "/serving-endpoints/chat/invocations";
    assert_eq!(
        seen,
        [
            (Some("a"), Some(Some(3)), path),
            (Some("b"), Some(None), path),
            (Some("c"), None, path),
        ]
    );
    assert!(attempts.windows(2).all(|w| w[0].at <= w[1].at));
    assert!(attempts[0].at >= before);
}

#[tokio::test]
async fn serving_enforces_the_bearer() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let client = http_client();
    let send = |bearer: Option<&str>| {
        let request = client
            .post(workspace.chat_completions_url())
            .json_body(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}));
        match bearer {
            Some(bearer) => request.bearer_auth(bearer),
            None => request,
        }
        .send()
    };
    assert_eq!(send(Some(&token.value)).await.unwrap().status(), 200);
    assert_eq!(send(None).await.unwrap().status(), 401);
    workspace.revoke(&token.id);
    let (status, body) = status_and_json(send(Some(&token.value)).await.unwrap()).await;
    assert_invalid_token(status, &body);

    let stats = workspace.stats();
    assert_eq!((stats.serving_ok, stats.serving_denied), (1, 2));
    assert_eq!(stats.requests, 3);
}

#[tokio::test]
async fn echo_reports_every_byte_and_never_the_bearer() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let body: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let url = format!(
        "{}/echo/some/path?a=1&b=two%20words",
        workspace.serving_base()
    );
    let response = http_client()
        .put(&url)
        .bearer_auth(&token.value)
        .header("x-custom", "one")
        .header("content-type", "application/octet-stream")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    assert!(
        !text.contains(&token.value),
        "echo must not show the bearer"
    );
    let echo: Value = serde_json::from_str(&text).unwrap();

    assert_eq!(echo["method"], "PUT");
    assert_eq!(echo["path"], "/serving-endpoints/echo/some/path");
    assert_eq!(echo["query"], "a=1&b=two%20words");
    assert_eq!(echo["headers"]["x-custom"], "one");
    assert_eq!(echo["headers"]["authorization"], REDACTED);
    assert_eq!(echo["auth"]["valid"], true);
    assert_eq!(echo["auth"]["token_id"], token.id.as_str());
    assert_eq!(echo["auth"]["kind"], "pat");
    assert_eq!(echo["body_len"], body.len());
    assert_eq!(echo["body_sha256"], sha256_hex(&body));
    assert_eq!(
        BASE64
            .decode(echo["body_base64"].as_str().unwrap())
            .unwrap(),
        body
    );
    assert_eq!(echo["body_text"], Value::Null, "not UTF-8");

    let recorded = workspace.recorded_requests();
    assert_eq!(recorded.len(), 1);
    let request = &recorded[0];
    assert_eq!(request.behaviour, Behaviour::Echo);
    assert_eq!(request.body.as_ref(), body.as_slice());
    assert_eq!(request.token_id, token.id);
    assert!(request.headers.get("authorization").is_none());
    assert!(!format!("{recorded:?}").contains(&token.value));

    // Any method, and a text body comes back as text.
    let response = http_client()
        .delete(format!("{}/whatever", workspace.serving_base()))
        .bearer_auth(&token.value)
        .body("plain text")
        .send()
        .await
        .unwrap();
    let (status, echo) = status_and_json(response).await;
    assert_eq!(status, 200);
    assert_eq!(echo["method"], "DELETE");
    assert_eq!(echo["query"], Value::Null);
    assert_eq!(echo["body_text"], "plain text");
}

#[tokio::test]
async fn chat_answers_json_and_stream() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let client = http_client();
    let request = |stream: bool| {
        client
            .post(workspace.chat_completions_url())
            .bearer_auth(&token.value)
            .json_body(&json!({
                "model": "chat",
                "stream": stream,
                "messages": [{"role": "user", "content": "hi"}],
            }))
            .send()
    };

    let (status, completion) = status_and_json(request(false).await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(completion["object"], "chat.completion");
    assert_eq!(completion["model"], "chat");
    assert_eq!(completion["choices"][0]["message"]["content"], CHAT_REPLY);
    assert_eq!(completion["choices"][0]["finish_reason"], "stop");

    let response = request(true).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = SseReader::new(response).collect_data().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|data| serde_json::from_str(data).unwrap())
        .collect();
    assert!(chunks.len() >= 3);
    assert!(
        chunks
            .iter()
            .all(|chunk| chunk["object"] == "chat.completion.chunk")
    );
    let text: String = chunks
        .iter()
        .filter_map(|chunk| chunk["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, CHAT_REPLY);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
}

fn tool_call_of(chunks: &[Value]) -> (Vec<String>, Vec<String>) {
    let mut names = Vec::new();
    let mut argument_pieces = Vec::new();
    for chunk in chunks {
        for call in chunk["choices"][0]["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            if let Some(name) = call["function"]["name"].as_str() {
                names.push(name.to_owned());
            }
            if let Some(piece) = call["function"]["arguments"].as_str()
                && !piece.is_empty()
            {
                argument_pieces.push(piece.to_owned());
            }
        }
    }
    (names, argument_pieces)
}

#[tokio::test]
async fn tool_call_carries_the_databricks_defect() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let client = http_client();
    let request = |model: &str, stream: bool| {
        client
            .post(workspace.chat_completions_url())
            .bearer_auth(&token.value)
            .json_body(&json!({"model": model, "stream": stream, "messages": []}))
            .send()
    };

    let (status, completion) = status_and_json(request("tool-call", false).await.unwrap()).await;
    assert_eq!(status, 200);
    let choice = &completion["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], TOOL_CALL_NAME);
    assert_eq!(call["function"]["arguments"], TOOL_CALL_ARGUMENTS);
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(arguments, json!({"name": "read_file", "path": "/tmp/x"}));

    for (model, expected_pieces) in [("tool-call", 3), ("tool-call-one-chunk", 1)] {
        let events = SseReader::new(request(model, true).await.unwrap())
            .collect_data()
            .await;
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|data| serde_json::from_str(data).unwrap())
            .collect();
        let (names, pieces) = tool_call_of(&chunks);
        assert_eq!(names, [TOOL_CALL_NAME], "{model}");
        assert_eq!(pieces.len(), expected_pieces, "{model}");
        assert_eq!(pieces.concat(), TOOL_CALL_ARGUMENTS, "{model}");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
    }

    // The endpoint name selects the behaviour on the invocations path too.
    let response = client
        .post(workspace.endpoint_url(Behaviour::ToolCall))
        .bearer_auth(&token.value)
        .json_body(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    let (_, completion) = status_and_json(response).await;
    assert_eq!(
        completion["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        TOOL_CALL_NAME
    );
}

#[tokio::test]
async fn slow_stream_delivers_events_incrementally() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let delay = Duration::from_millis(200);
    let started = Instant::now();
    let response = http_client()
        .post(format!(
            "{}?delay_ms={}&events=5",
            workspace.endpoint_url(Behaviour::SlowStream),
            delay.as_millis()
        ))
        .bearer_auth(&token.value)
        .json_body(&json!({"stream": true}))
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let first = reader.next_data().await.expect("a first event");
    let first_at = started.elapsed();
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["choices"][0]["delta"]["content"], "part 0; ");

    let mut rest = Vec::new();
    while let Some(data) = reader.next_data().await {
        rest.push(data);
    }
    let ended_at = started.elapsed();
    assert_eq!(rest.len(), 5, "four more chunks and [DONE]");
    assert_eq!(rest.last().map(String::as_str), Some("[DONE]"));
    // Five delays separate the first event from the end of the stream.
    assert!(ended_at >= delay * 5, "ended after {ended_at:?}");
    assert!(
        first_at + delay * 3 <= ended_at,
        "first event at {first_at:?}, end at {ended_at:?}"
    );

    // Parameters also come from headers.
    let started = Instant::now();
    let response = http_client()
        .get(format!("{}/slow-stream", workspace.serving_base()))
        .bearer_auth(&token.value)
        .header("x-fake-delay-ms", "50")
        .header("x-fake-events", "2")
        .send()
        .await
        .unwrap();
    let events = SseReader::new(response).collect_data().await;
    assert_eq!(events.len(), 3);
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn slow_headers_hold_back_the_response() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let url = format!(
        "{}?delay_ms=5000",
        workspace.endpoint_url(Behaviour::SlowHeaders)
    );
    let error = impatient
        .post(&url)
        .bearer_auth(&token.value)
        .send()
        .await
        .expect_err("no headers within 300 ms");
    assert!(error.is_timeout(), "{error}");

    let started = Instant::now();
    let response = http_client()
        .post(workspace.endpoint_url(Behaviour::SlowHeaders))
        .bearer_auth(&token.value)
        .header("x-fake-delay-ms", "300")
        .json_body(&json!({"messages": []}))
        .send()
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let (status, completion) = status_and_json(response).await;
    assert_eq!(status, 200);
    assert_eq!(completion["choices"][0]["message"]["content"], CHAT_REPLY);
}

#[tokio::test]
async fn status_endpoint_answers_the_chosen_status() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let client = http_client();

    let response = client
        .post(format!(
            "{}?status=429&retry_after=3",
            workspace.endpoint_url(Behaviour::Status)
        ))
        .bearer_auth(&token.value)
        .send()
        .await
        .unwrap();
    assert_eq!(response.headers()["retry-after"], "3");
    let (status, body) = status_and_json(response).await;
    assert_eq!(
        (status, &body["error_code"]),
        (429, &json!("REQUEST_LIMIT_EXCEEDED"))
    );

    let response = client
        .get(format!("{}/status/anything", workspace.serving_base()))
        .bearer_auth(&token.value)
        .header("x-fake-status", "418")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 418);

    let response = client
        .post(format!(
            "{}?status=204",
            workspace.endpoint_url(Behaviour::Status)
        ))
        .bearer_auth(&token.value)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert!(response.bytes().await.unwrap().is_empty());

    let response = client
        .post(format!(
            "{}?status=99",
            workspace.endpoint_url(Behaviour::Status)
        ))
        .bearer_auth(&token.value)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn unknown_api_paths_are_not_found() {
    let workspace = FakeWorkspace::start().await;
    let response = http_client()
        .get(format!("{}/api/2.0/clusters/list", workspace.url()))
        .send()
        .await
        .unwrap();
    let (status, body) = status_and_json(response).await;
    assert_eq!(
        (status, &body["error_code"]),
        (404, &json!("ENDPOINT_NOT_FOUND"))
    );
}

#[tokio::test]
async fn concurrent_creates_mint_distinct_tokens() {
    let workspace = FakeWorkspace::start().await;
    let bootstrap = workspace.mint(Duration::from_secs(600));
    let creates = (0..20).map(|_| {
        create_token(
            &workspace,
            &bootstrap.value,
            json!({"lifetime_seconds": 60}),
        )
    });
    let created = futures_util::future::join_all(creates).await;
    let mut values: Vec<&str> = created
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 200);
            body["token_value"].as_str().unwrap()
        })
        .collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), 20);
    assert_eq!(workspace.stats().creates, 20);
}

#[tokio::test]
async fn debug_output_never_shows_a_token_value() {
    let workspace = FakeWorkspace::start().await;
    let token = workspace.mint(Duration::from_secs(600));
    let printed = format!("{token:?} {workspace:?} {:?}", workspace.live_tokens());
    assert!(!printed.contains(&token.value));
    assert!(printed.contains(&token.id));
}

#[tokio::test]
async fn shutdown_and_drop_close_the_port() {
    let client = http_client();

    let workspace = FakeWorkspace::start().await;
    let url = format!("{}/api/2.0/token/list", workspace.url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    // An open stream must not keep the server up.
    let token = workspace.mint(Duration::from_secs(600));
    let streaming = client
        .post(format!(
            "{}?delay_ms=10000&events=3",
            workspace.endpoint_url(Behaviour::SlowStream)
        ))
        .bearer_auth(&token.value)
        .send()
        .await
        .unwrap();
    workspace.shutdown().await;
    // Fresh clients, so no pooled connection stands in for a new one.
    assert!(
        http_client()
            .get(&url)
            .send()
            .await
            .unwrap_err()
            .is_connect()
    );
    drop(streaming);

    let workspace = FakeWorkspace::start().await;
    let url = format!("{}/api/2.0/token/list", workspace.url());
    let clone = workspace.clone();
    drop(workspace);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    drop(clone);
    wait_until(DEADLINE, "the dropped workspace to close its port", || {
        let request = http_client().get(&url).send();
        async move { request.await.is_err_and(|error| error.is_connect()) }
    })
    .await;
}

#[test]
fn starts_outside_a_runtime() {
    let workspace = FakeWorkspace::start_blocking();
    assert!(workspace.addr().ip().is_loopback());
    assert_ne!(workspace.addr().port(), 0);
    assert!(workspace.url().starts_with("http://127.0.0.1:"));
}

#[tokio::test]
async fn delete_and_oauth_faults_and_create_delay() {
    let workspace = FakeWorkspace::start().await;
    let bootstrap = workspace.mint(Duration::from_secs(600));
    let victim = workspace.mint(Duration::from_secs(600));

    workspace.fail_next_deletes(1, 429);
    let (status, body) = delete_token(&workspace, &bootstrap.value, &victim.id).await;
    assert_eq!(
        (status, &body["error_code"]),
        (429, &json!("REQUEST_LIMIT_EXCEEDED"))
    );
    assert!(
        workspace.is_live(&victim.value),
        "a failed delete revokes nothing"
    );
    assert_eq!(
        delete_token(&workspace, &bootstrap.value, &victim.id)
            .await
            .0,
        200
    );

    workspace.set_oauth_client("id", "secret", Duration::from_secs(60));
    workspace.fail_next_oauth(1, 503);
    let request_token = || {
        http_client()
            .post(format!("{}/oidc/v1/token", workspace.url()))
            .basic_auth("id", Some("secret"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("grant_type=client_credentials&scope=all-apis")
            .send()
    };
    let (status, body) = status_and_json(request_token().await.unwrap()).await;
    assert_eq!((status, &body["error"]), (503, &json!("server_error")));
    assert_eq!(request_token().await.unwrap().status(), 200);

    workspace.set_create_delay(Duration::from_millis(300));
    let started = Instant::now();
    let (status, _) = create_token(&workspace, &bootstrap.value, json!({})).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[test]
fn handle_is_shareable_across_threads() {
    fn assert_shareable<T: Clone + Send + Sync + 'static>() {}
    assert_shareable::<FakeWorkspace>();
}

async fn token_form(workspace: &FakeWorkspace, form: &[(&str, &str)]) -> (u16, Value) {
    let body = form
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(':', "%3A")))
        .collect::<Vec<_>>()
        .join("&");
    let response = http_client()
        .post(format!("{}/oidc/v1/token", workspace.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    status_and_json(response).await
}

#[tokio::test]
async fn u2m_refresh_tokens_are_single_use_and_reuse_revokes_the_family() {
    let workspace = FakeWorkspace::start().await;
    let first = workspace.start_u2m(Duration::from_secs(60));
    let refresh = |token: String| {
        let workspace = workspace.clone();
        async move {
            token_form(
                &workspace,
                &[("grant_type", "refresh_token"), ("refresh_token", &token)],
            )
            .await
        }
    };
    let (status, answer) = refresh(first.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let second = answer["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(
        get_me(&workspace, answer["access_token"].as_str().unwrap())
            .await
            .0,
        200
    );

    // The spent token again, as a refresh that overlapped the first would present it.
    let (status, answer) = refresh(first).await;
    assert_eq!(status, 400);
    assert_eq!(answer["error"], "invalid_grant");
    assert_eq!(answer["error_description"], "Refresh token is invalid");
    // The family is gone: the newest refresh token no longer works either.
    assert_eq!(refresh(second).await.0, 400);
    let (stats, revoked) = workspace.u2m_stats();
    assert!(revoked);
    assert_eq!((stats.refreshes, stats.reused), (1, 1));
}

#[tokio::test]
async fn token_exchange_takes_only_the_current_jwt_and_its_tokens_expire() {
    let workspace = FakeWorkspace::start().await;
    let discovery: Value = status_and_json(
        http_client()
            .get(format!(
                "{}/oidc/.well-known/oauth-authorization-server",
                workspace.url()
            ))
            .send()
            .await
            .unwrap(),
    )
    .await
    .1;
    let endpoint = format!("{}/oidc/v1/token", workspace.url());
    assert_eq!(discovery["token_endpoint"], endpoint.as_str());

    workspace.set_federated_jwt("jwt-one", Some("sp-1"), Duration::from_secs(1));
    let exchange = |jwt: &'static str, client_id: &'static str| {
        let workspace = workspace.clone();
        async move {
            token_form(
                &workspace,
                &[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                    ("subject_token", jwt),
                    ("scope", "all-apis"),
                    ("client_id", client_id),
                ],
            )
            .await
        }
    };
    assert_eq!(exchange("jwt-one", "sp-2").await.0, 401, "another client");
    let (status, issued) = exchange("jwt-one", "sp-1").await;
    assert_eq!(status, 200, "{issued}");
    assert_eq!(issued["expires_in"], 1);
    let access = issued["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get_me(&workspace, &access).await.0, 200);

    workspace.set_federated_jwt("jwt-two", Some("sp-1"), Duration::from_secs(1));
    assert_eq!(exchange("jwt-one", "sp-1").await.0, 401, "the replaced JWT");
    assert_eq!(exchange("jwt-two", "sp-1").await.0, 200);
    assert_eq!(workspace.exchange_stats(), (2, 2));

    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get_me(&workspace, &access).await.0, 403, "expired");
}
