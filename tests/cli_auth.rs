//! `databricks-cli` auth through the real binary, against `tests/fake-databricks-cli` (a CLI
//! with a token cache and single-use refresh tokens) and the fake workspace's refresh grant.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::binary::{ProxyProcess, command};
use common::fake_workspace::FakeWorkspace;
use common::{JsonBody, http_client, wait_until};
use serde_json::{Value, json};

struct Setup {
    home: tempfile::TempDir,
    state: PathBuf,
}

/// A home with profile `dev` (`auth_type = databricks-cli`) and a CLI state whose login holds
/// `refresh_token`; `config` goes into the fake CLI's config.json.
fn setup(ws: &FakeWorkspace, refresh_token: &str, config: Value) -> Setup {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!(
            "[DEFAULT]\nhost = https://unused.example.com\n\n[dev]\nhost = {}\nauth_type = databricks-cli\n",
            ws.url()
        ),
    )
    .unwrap();
    let state = home.path().join("cli");
    std::fs::create_dir(&state).unwrap();
    let mut config = config;
    config["host"] = json!(ws.url());
    std::fs::write(state.join("config.json"), config.to_string()).unwrap();
    std::fs::write(
        state.join("cache.json"),
        json!({ "refresh_token": refresh_token }).to_string(),
    )
    .unwrap();
    Setup { home, state }
}

fn fake_cli() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fake-databricks-cli")
        .display()
        .to_string()
}

async fn start(setup: &Setup) -> ProxyProcess {
    let mut cmd = command(setup.home.path());
    cmd.env("DATABRICKS_CONFIG_PROFILE", "dev")
        .env("DATABRICKS_CLI_PATH", fake_cli())
        .env("FAKE_CLI_STATE", &setup.state)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "info");
    tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap()
}

fn cli_calls(setup: &Setup) -> Vec<String> {
    std::fs::read_to_string(setup.state.join("calls.log"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Every secret the fake CLI ever held.
fn cli_secrets(setup: &Setup) -> Vec<String> {
    let cache: Value =
        serde_json::from_str(&std::fs::read_to_string(setup.state.join("cache.json")).unwrap())
            .unwrap();
    ["access_token", "refresh_token"]
        .iter()
        .filter_map(|k| cache[k].as_str().map(str::to_owned))
        .collect()
}

async fn json(res: reqwest::Response) -> Value {
    let text = res.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

async fn ready(url: &str) -> (u16, Value) {
    let res = http_client()
        .get(format!("{url}/ready"))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, json(res).await)
}

async fn chat(url: &str) -> (u16, Value) {
    let res = http_client()
        .post(format!("{url}/chat/invocations"))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, json(res).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_profile_never_refresh_at_once() {
    let ws = FakeWorkspace::start().await;
    // 10 s tokens: each proxy refreshes 5 s before expiry; a refresh takes 300 ms, so
    // unguarded refreshes of the two would overlap and break the family. The CLI's cache hands
    // out its token while 2 s of it are left.
    let refresh_token = ws.start_u2m(Duration::from_secs(10));
    let setup = setup(
        &ws,
        &refresh_token,
        json!({"delay": 0.3, "expiry_delta": 2}),
    );
    let a = start(&setup).await;
    let b = start(&setup).await;
    for proxy in [&a, &b] {
        let url = proxy.url();
        wait_until(Duration::from_secs(20), "ready", || {
            let url = url.clone();
            async move { ready(&url).await.0 == 200 }
        })
        .await;
    }

    let started = Instant::now();
    let mut requests = 0;
    let mut failed = Vec::new();
    while started.elapsed() < Duration::from_secs(16) {
        for proxy in [&a, &b] {
            let (status, body) = chat(&proxy.url()).await;
            requests += 1;
            if status != 200 {
                failed.push((status, body));
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (stats, revoked) = ws.u2m_stats();
    assert!(
        failed.is_empty(),
        "{} of {requests} failed: {failed:?}",
        failed.len()
    );
    assert_eq!(stats.reused, 0, "overlapping refreshes: {stats:?}");
    assert!(!revoked, "the token family was revoked");
    assert!(stats.refreshes >= 3, "tokens were refreshed: {stats:?}");
    let calls = cli_calls(&setup);
    let token_calls = calls.iter().filter(|c| c.contains("auth token")).count();
    eprintln!(
        "{requests} requests, {} failed; {token_calls} CLI token calls; {stats:?}",
        failed.len()
    );
    assert!(
        token_calls * 5 < requests,
        "{token_calls} CLI calls for {requests} requests"
    );
    assert!(
        calls.iter().any(|c| c.contains("--profile dev")),
        "{calls:?}"
    );
    // Refreshes never overlap: each start is followed by its end before the next start.
    let marks: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.split_whitespace().nth(2))
        .filter(|m| m.starts_with("refresh-"))
        .collect();
    for pair in marks.chunks(2) {
        assert_eq!(pair, ["refresh-start", "refresh-end"], "{marks:?}");
    }

    let logs = format!("{}\n{}", a.logs(), b.logs());
    for secret in cli_secrets(&setup) {
        assert!(!logs.contains(&secret), "a token reached the logs");
    }
    let health = http_client()
        .get(format!("{}/health", a.url()))
        .send()
        .await
        .unwrap();
    let health = json(health).await;
    assert_eq!(health["token"]["source"], "databricks-cli");
    let metrics = common::get_text(format!("{}/metrics", a.url())).await;
    let refreshed = metrics
        .lines()
        .find(|l| l.starts_with("fresh_proxy_rotations_total{result=\"refresh_ok\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(refreshed.is_some_and(|n| n >= 1.0), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_login_says_what_to_run() {
    let ws = FakeWorkspace::start().await;
    let refresh_token = ws.start_u2m(Duration::from_secs(60));
    ws.revoke_u2m();
    let setup = setup(&ws, &refresh_token, json!({}));
    let proxy = start(&setup).await;
    let url = proxy.url();

    let action = "run: databricks auth login --profile dev";
    wait_until(Duration::from_secs(20), "the reason", || {
        let url = url.clone();
        async move {
            let (status, body) = ready(&url).await;
            status == 503 && body["reason"].as_str().is_some_and(|r| r.contains(action))
        }
    })
    .await;
    for _ in 0..5 {
        let (status, body) = chat(&url).await;
        assert_eq!(status, 503);
        assert_eq!(body["error"]["type"], "token_unavailable");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(action), "{message}");
    }
    let logs = proxy.logs();
    let warnings: Vec<_> = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(action))
        .collect();
    assert_eq!(
        warnings.len(),
        1,
        "one warning, not one per request: {logs}"
    );
    assert!(!logs.contains(&refresh_token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbled_answer_is_retried() {
    let ws = FakeWorkspace::start().await;
    let refresh_token = ws.start_u2m(Duration::from_secs(60));
    let setup = setup(&ws, &refresh_token, json!({"malformed": 2}));
    let proxy = start(&setup).await;
    let url = proxy.url();
    wait_until(Duration::from_secs(20), "ready after retries", || {
        let url = url.clone();
        async move { ready(&url).await.0 == 200 }
    })
    .await;
    assert_eq!(chat(&url).await.0, 200);
    let logs = proxy.logs();
    assert!(logs.contains("cannot parse the CLI's answer"), "{logs}");
    assert!(!logs.contains("eyJ-garbled"), "{logs}");
    for secret in cli_secrets(&setup) {
        assert!(!logs.contains(&secret), "a token reached the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_cli_is_asked_by_host() {
    let ws = FakeWorkspace::start().await;
    let refresh_token = ws.start_u2m(Duration::from_secs(60));
    let setup = setup(&ws, &refresh_token, json!({"version": "0.200.0"}));
    let proxy = start(&setup).await;
    let url = proxy.url();
    wait_until(Duration::from_secs(20), "ready", || {
        let url = url.clone();
        async move { ready(&url).await.0 == 200 }
    })
    .await;
    assert_eq!(chat(&url).await.0, 200);
    let calls = cli_calls(&setup);
    let token_calls: Vec<_> = calls.iter().filter(|c| c.contains("auth token")).collect();
    assert!(!token_calls.is_empty());
    for call in token_calls {
        assert!(call.contains(&format!("--host {}", ws.url())), "{call}");
        assert!(
            !call.contains("--profile") && !call.contains("--force-refresh"),
            "{call}"
        );
    }
}
