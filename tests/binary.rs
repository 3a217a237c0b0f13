//! The real binary: exit codes, serving, graceful shutdown, and what reaches its logs.

mod common;

use std::time::Duration;

use common::binary::{ProxyProcess, command};
use common::fake_workspace::{FakeWorkspace, IssuedToken};
use common::{JsonBody, http_client, open_slow_stream};
use serde_json::{Value, json};

#[test]
fn broken_configuration_exits_with_2_and_names_the_variable() {
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join(".databrickscfg");
    std::fs::write(
        &cfg,
        "[DEFAULT]\nhost = https://example.cloud.databricks.com\ntoken = dapi-in-file-0001\n\n[both]\nhost = https://example.cloud.databricks.com\ntoken = dapi-in-file-0002\nclient_id = sp-1\nclient_secret = dose-0003\n\n[u2m-elsewhere]\nhost = https://example.cloud.databricks.com\nauth_type = github-oidc\n",
    )
    .unwrap();
    type Case<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);
    let cases: &[Case<'_>] = &[
        (
            &[
                ("PAT_TOKEN_LIFETIME", "900"),
                ("PAT_ROTATION_INTERVAL", "900"),
            ],
            &["PAT_ROTATION_INTERVAL"],
        ),
        (&[("PROXY_PORT", "not-a-port")], &["PROXY_PORT"]),
        (
            &[("DATABRICKS_CONFIG_PROFILE", "missing")],
            &[".databrickscfg has no profile [missing]"],
        ),
        (
            &[("PROXY_UPSTREAM_BASE", "http://192.0.2.1/serving-endpoints")],
            &["PROXY_UPSTREAM_BASE"],
        ),
        (
            &[("DATABRICKS_HOST", "https://exa mple.com")],
            &["DATABRICKS_HOST"],
        ),
        (
            &[("DATABRICKS_TOKEN", "dapi-leaky\r\nX-Evil: 1")],
            &["DATABRICKS_TOKEN"],
        ),
        (&[("PAT_IDLE_POLICY", "sometimes")], &["PAT_IDLE_POLICY"]),
        (&[("PAT_TOKEN_LIFETIME", "abc")], &["PAT_TOKEN_LIFETIME"]),
        (&[("RUST_LOG", "info,hyper=[")], &["RUST_LOG"]),
        (
            &[("PROXY_UPSTREAM_TIMEOUT", "soon")],
            &["PROXY_UPSTREAM_TIMEOUT"],
        ),
        (
            &[("DATABRICKS_AUTH_TYPE", "azure-cli")],
            &["DATABRICKS_AUTH_TYPE", "`azure-cli` is not supported"],
        ),
        (
            &[("DATABRICKS_CONFIG_PROFILE", "both")],
            &[
                "more than one authorization method configured: oauth and pat",
                "[both]",
            ],
        ),
        (
            &[("DATABRICKS_CONFIG_PROFILE", "u2m-elsewhere")],
            &[
                "`auth_type` in profile [u2m-elsewhere]",
                "`github-oidc` is not supported",
            ],
        ),
        (
            &[
                ("DATABRICKS_AUTH_TYPE", "file-oidc"),
                ("DATABRICKS_OIDC_TOKEN_FILEPATH", "/nonexistent/jwt"),
            ],
            &["DATABRICKS_OIDC_TOKEN_FILEPATH", "/nonexistent/jwt"],
        ),
        (
            &[("DATABRICKS_AUTH_TYPE", "env-oidc")],
            &["DATABRICKS_OIDC_TOKEN: not set"],
        ),
        (
            &[
                ("DATABRICKS_CONFIG_FILE", "/nonexistent/cfg"),
                ("DATABRICKS_HOST", "https://h"),
            ],
            &[
                "no token",
                "/nonexistent/cfg does not exist",
                "DATABRICKS_TOKEN",
            ],
        ),
    ];
    for (env, needles) in cases {
        let mut cmd = command(home.path());
        cmd.envs(env.iter().copied());
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{env:?}: {stderr}");
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{env:?}: {stderr:?} lacks {needle:?}"
            );
        }
        assert!(
            !stderr.contains("dapi-") && !stderr.contains("dose-"),
            "{env:?}: a secret leaked: {stderr}"
        );
        let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(lines <= 4, "one clear message, not a dump: {stderr}");
    }
}

#[test]
fn help_lists_every_variable() {
    let home = tempfile::tempdir().unwrap();
    let out = command(home.path()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "DATABRICKS_CONFIG_FILE",
        "DATABRICKS_CONFIG_PROFILE",
        "DATABRICKS_HOST",
        "DATABRICKS_CLIENT_ID",
        "PROXY_HOST",
        "PROXY_PORT",
        "PROXY_UPSTREAM_BASE",
        "PROXY_MAX_BODY",
        "PROXY_UPSTREAM_TIMEOUT",
        "PAT_ROTATION",
        "PAT_TOKEN_LIFETIME",
        "PAT_ROTATION_INTERVAL",
        "PAT_IDLE_POLICY",
        "PAT_SESSIONS_URL",
        "PAT_IDLE_AFTER",
        "PAT_REVOKE_GRACE",
        "PAT_COMMENT",
        "PAT_SINKS",
        "RUST_LOG",
    ] {
        assert!(
            help.contains(&format!("[env: {var}=")),
            "--help lacks {var}"
        );
    }
    assert!(
        !help.contains("--databricks-token"),
        "secrets never come from flags"
    );
    assert!(
        !help.contains("--databricks-client-secret"),
        "secrets never come from flags"
    );
}

/// The binary in follower mode (`PAT_ROTATION=off`) with `env` set, following a config file
/// that holds `pat` for `ws`; the home directory lives as long as the returned guard.
async fn start_follower(
    ws: &FakeWorkspace,
    pat: &IssuedToken,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, ProxyProcess) {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[DEFAULT]\nhost = {}\ntoken = {}\n", ws.url(), pat.value),
    )
    .unwrap();
    let mut cmd = command(home.path());
    cmd.env("PAT_ROTATION", "off").envs(env.iter().copied());
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    (home, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_serves_then_drains_in_flight_streams_on_sigterm() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, mut proxy) = start_follower(&ws, &pat, &[("RUST_LOG", "trace")]).await;
    let client = http_client();

    let health: Value = client
        .get(format!("{}/health", proxy.url()))
        .send()
        .await
        .unwrap()
        .json_text()
        .await;
    assert_eq!(health["token"]["source"], "pat-file");
    assert_eq!(health["status"], "ok");
    let res = client
        .post(format!("{}/chat/invocations", proxy.url()))
        .header("authorization", "Bearer dapi-client-own-0002")
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let stream = open_slow_stream(&proxy.url(), 200, 8).await;
    proxy.terminate();
    let rest = stream.collect_data().await;
    assert_eq!(
        rest.last().map(String::as_str),
        Some("[DONE]"),
        "the in-flight stream was cut: {rest:?}"
    );
    assert_eq!(rest.len(), 8);

    let status = tokio::task::spawn_blocking(move || {
        let status = proxy.wait(Duration::from_secs(20));
        (status, proxy)
    })
    .await
    .unwrap();
    let (status, proxy) = status;
    assert!(status.expect("exited after SIGTERM").success());
    let logs = proxy.logs();
    assert!(logs.contains("shutting down"), "{logs}");
    for secret in [pat.value.as_str(), "dapi-client-own-0002"] {
        assert!(!logs.contains(secret), "a token value reached the logs");
    }
    assert!(
        !logs.to_ascii_lowercase().contains("bearer "),
        "an Authorization header reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_stops_without_waiting_out_the_grace_period() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start_follower(&ws, &pat, &[("PROXY_SHUTDOWN_GRACE", "120")]).await;
    // A stream that would run for a minute holds the drain.
    let _stream = open_slow_stream(&proxy.url(), 1000, 60).await;

    proxy.terminate();
    common::wait_until(
        Duration::from_secs(10),
        "the first signal taken",
        || async { proxy.logs().contains("shutting down") },
    )
    .await;
    proxy.terminate();
    let (status, proxy) = tokio::task::spawn_blocking(move || {
        let mut proxy = proxy;
        let status = proxy.wait(Duration::from_secs(10));
        (status, proxy)
    })
    .await
    .unwrap();
    assert!(
        status
            .expect("exited soon after the second signal")
            .success(),
        "{}",
        proxy.logs()
    );
    // The process has exited; its last lines may still be on their way through the pipe.
    common::wait_until(
        Duration::from_secs(5),
        "the second signal logged",
        || async { proxy.logs().contains("a second signal") },
    )
    .await;
}

trait JsonText {
    async fn json_text(self) -> Value;
}

impl JsonText for reqwest::Response {
    async fn json_text(self) -> Value {
        serde_json::from_str(&self.text().await.unwrap()).unwrap()
    }
}
