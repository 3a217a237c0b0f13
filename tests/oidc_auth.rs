//! `file-oidc` and `env-oidc` through the real binary against the fake workspace's discovery
//! document and RFC 8693 token exchange, which accepts only the current JWT and issues tokens
//! that serving refuses once they expire.

mod common;

use std::time::{Duration, Instant};

use common::binary::{ProxyProcess, command};
use common::fake_workspace::FakeWorkspace;
use common::{JsonBody, http_client, wait_until};
use serde_json::{Value, json};

async fn json(res: reqwest::Response) -> Value {
    let text = res.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

async fn get(url: &str) -> (u16, Value) {
    let res = http_client().get(url).send().await.unwrap();
    let status = res.status().as_u16();
    (status, json(res).await)
}

async fn chat(url: &str) -> u16 {
    http_client()
        .post(format!("{url}/chat/invocations"))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn start(cmd: std::process::Command) -> ProxyProcess {
    tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap()
}

/// A JWT-shaped subject token; unique, so the logs can be searched for it.
fn jwt(n: u32) -> String {
    format!(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJwb2QtMSJ9.sig{n}-{}",
        std::process::id()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_oidc_follows_the_replaced_jwt_without_a_failed_request() {
    let ws = FakeWorkspace::start().await;
    let home = tempfile::tempdir().unwrap();
    let path = home.path().join("token");
    let (first, second) = (jwt(1), jwt(2));
    ws.set_federated_jwt(&first, Some("sp-1"), Duration::from_secs(6));
    std::fs::write(&path, format!("{first}\n")).unwrap();

    let mut cmd = command(home.path());
    cmd.env("DATABRICKS_HOST", ws.url())
        .env("DATABRICKS_AUTH_TYPE", "file-oidc")
        .env("DATABRICKS_CLIENT_ID", "sp-1")
        .env("DATABRICKS_OIDC_TOKEN_FILEPATH", &path)
        .env("RUST_LOG", "trace");
    let proxy = start(cmd).await;
    let url = proxy.url();
    wait_until(Duration::from_secs(20), "ready", || {
        let url = url.clone();
        async move { get(&format!("{url}/ready")).await.0 == 200 }
    })
    .await;

    let started = Instant::now();
    let (mut requests, mut failed, mut replaced) = (0, 0, false);
    while started.elapsed() < Duration::from_secs(14) {
        if !replaced && started.elapsed() > Duration::from_secs(5) {
            // The platform writes a new JWT; from now on the old one is refused.
            let tmp = home.path().join("token.tmp");
            std::fs::write(&tmp, &second).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            ws.set_federated_jwt(&second, Some("sp-1"), Duration::from_secs(6));
            replaced = true;
        }
        requests += 1;
        if chat(&url).await != 200 {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (exchanges, _) = ws.exchange_stats();
    // Tokens live 6 s and the run lasts 9 s past the replacement: without reading the new
    // JWT, the token would have expired and requests failed.
    assert_eq!(failed, 0, "{failed} of {requests} failed");
    assert!(exchanges >= 3, "tokens were exchanged again: {exchanges}");
    let (_, health) = get(&format!("{url}/health")).await;
    assert_eq!(health["token"]["source"], "file-oidc");

    let logs = proxy.logs();
    assert!(
        logs.contains("TRACE") || logs.contains("DEBUG"),
        "logs captured"
    );
    for secret in [&first, &second] {
        assert!(!logs.contains(secret.as_str()), "a JWT reached the logs");
    }
    // Every access token the workspace issued is shaped `eyJ...`, as are the JWTs.
    assert!(!logs.contains("eyJ"), "a token reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn env_oidc_exchanges_the_variable_without_a_client_id() {
    let ws = FakeWorkspace::start().await;
    let home = tempfile::tempdir().unwrap();
    let subject = jwt(3);
    ws.set_federated_jwt(&subject, None, Duration::from_secs(60));

    let mut cmd = command(home.path());
    cmd.env("DATABRICKS_HOST", ws.url())
        .env("MY_PLATFORM_JWT", &subject)
        .env("DATABRICKS_OIDC_TOKEN_ENV", "MY_PLATFORM_JWT")
        .env("RUST_LOG", "debug");
    let proxy = start(cmd).await;
    let url = proxy.url();
    wait_until(Duration::from_secs(20), "ready", || {
        let url = url.clone();
        async move { get(&format!("{url}/ready")).await.0 == 200 }
    })
    .await;
    assert_eq!(chat(&url).await, 200);
    let (_, health) = get(&format!("{url}/health")).await;
    assert_eq!(health["token"]["source"], "env-oidc");
    assert_eq!(ws.exchange_stats(), (1, 0));
    assert!(!proxy.logs().contains("eyJ"), "a token reached the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jwt_no_policy_accepts_is_reported() {
    let ws = FakeWorkspace::start().await;
    let home = tempfile::tempdir().unwrap();
    ws.set_federated_jwt(&jwt(4), None, Duration::from_secs(60));
    let mut cmd = command(home.path());
    cmd.env("DATABRICKS_HOST", ws.url())
        .env("DATABRICKS_OIDC_TOKEN", jwt(5))
        .env("RUST_LOG", "debug");
    let proxy = start(cmd).await;
    let url = proxy.url();
    wait_until(Duration::from_secs(20), "the reason", || {
        let url = url.clone();
        async move {
            let (status, body) = get(&format!("{url}/ready")).await;
            status == 503
                && body["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("check the JWT in DATABRICKS_OIDC_TOKEN"))
        }
    })
    .await;
    assert!(!proxy.logs().contains("eyJ"), "a token reached the logs");
}
