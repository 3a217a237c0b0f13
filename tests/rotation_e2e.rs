//! The real binary rotating against the fake workspace, with lifetimes of a few seconds.

mod common;

use std::path::Path;
use std::time::Duration;

use common::binary::{ProxyProcess, command};
use common::fake_workspace::{FakeWorkspace, TokenKind};
use common::load::Load;
use common::{JsonBody, health, http_client, wait_until};
use serde_json::json;

const COMMENT: &str = "fresh-proxy-auto-rotated";

fn write_home(ws: &FakeWorkspace) -> tempfile::TempDir {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[other]\nhost = https://other.example.com\ntoken = dapi-other-profile-0003\n\n[DEFAULT]\nhost = {}\n", ws.url()),
    )
    .unwrap();
    home
}

fn rotating_proxy(
    home: &Path,
    bootstrap: &str,
    lifetime: u32,
    interval: u32,
    grace: u32,
) -> std::process::Command {
    let mut cmd = command(home);
    // Named, so that the profile's host is read although a token is set in the environment:
    // the SDKs skip the file otherwise.
    cmd.env("DATABRICKS_TOKEN", bootstrap)
        .env("DATABRICKS_CONFIG_PROFILE", "DEFAULT")
        .env("PAT_TOKEN_LIFETIME", lifetime.to_string())
        .env("PAT_ROTATION_INTERVAL", interval.to_string())
        .env("PAT_REVOKE_GRACE", grace.to_string())
        .env("RUST_LOG", "debug");
    cmd
}

async fn start(cmd: std::process::Command) -> ProxyProcess {
    tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap()
}

/// Tokens this proxy minted that the workspace still accepts.
fn live_minted(ws: &FakeWorkspace) -> usize {
    ws.live_tokens()
        .iter()
        .filter(|t| t.kind == TokenKind::Pat && t.comment == COMMENT)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rotations_under_load_fail_no_request() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let home = write_home(&ws);
    let cfg = home.path().join(".databrickscfg");
    let mut proxy = start(rotating_proxy(home.path(), &bootstrap.value, 4, 1, 1)).await;

    let load = Load::start(&[proxy.url()], 4);
    wait_until(Duration::from_secs(60), "ten rotations", || async {
        ws.stats().creates >= 11
    })
    .await;
    load.finish_without_failures("rotations under load", 100)
        .await;

    let h = health(&proxy.url()).await;
    assert_eq!(h["token"]["source"], "pat-rotating");
    assert_eq!(h["token"]["rotating"], true);
    assert!(h["token"]["rotations"].as_u64().unwrap() >= 10, "{h}");
    assert_eq!(ws.stats().create_failures, 0);

    // The file keeps its other profile and mode, and holds a live minted token.
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(
        text.contains(
            "[other]\nhost = https://other.example.com\ntoken = dapi-other-profile-0003\n"
        ),
        "{text}"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&cfg).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
    let current = fresh_token::databrickscfg::read_profile(&cfg, "DEFAULT")
        .unwrap()
        .token
        .unwrap();
    assert!(ws.is_live(current.expose_secret()));
    // At most the current token and one in its grace period are alive.
    assert!(
        live_minted(&ws) <= 2,
        "{} minted tokens are live",
        live_minted(&ws)
    );

    let logs = proxy.logs();
    assert!(
        !logs.contains(current.expose_secret()),
        "the current token reached the logs"
    );
    assert!(
        !logs.contains(&bootstrap.value),
        "the bootstrap token reached the logs"
    );
    assert!(
        !logs.to_ascii_lowercase().contains("bearer "),
        "an Authorization header reached the logs"
    );

    // SIGTERM: the rotator stops (it runs on a thread of its own) and the process exits cleanly.
    proxy.terminate();
    let (status, proxy) = tokio::task::spawn_blocking(move || {
        let status = proxy.wait(Duration::from_secs(20));
        (status, proxy)
    })
    .await
    .unwrap();
    assert!(status.expect("exited after SIGTERM").success());
    // The process has exited; its last lines may still be on their way through the pipe.
    wait_until(
        Duration::from_secs(5),
        "the rotator's stop logged",
        || async { proxy.logs().contains("rotator stopped") },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_and_restart_leak_no_token() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let home = write_home(&ws);
    let mut first = start(rotating_proxy(home.path(), &bootstrap.value, 6, 2, 2)).await;
    wait_until(Duration::from_secs(30), "three rotations", || async {
        ws.stats().creates >= 3
    })
    .await;
    first.kill();

    let second = start(rotating_proxy(home.path(), &bootstrap.value, 6, 2, 2)).await;
    let creates = ws.stats().creates;
    wait_until(Duration::from_secs(30), "two more rotations", || async {
        ws.stats().creates >= creates + 2
    })
    .await;
    // Past the grace period of the last rotation, only the current token and at most one in
    // grace may be alive: everything minted before the crash was revoked.
    wait_until(
        Duration::from_secs(10),
        "at most two live minted tokens",
        || async { live_minted(&ws) <= 2 },
    )
    .await;
    let h = health(&second.url()).await;
    assert_eq!(h["token"]["rotating"], true);
    let res = http_client()
        .post(format!("{}/chat/invocations", second.url()))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_one_rotates_and_the_other_takes_over() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let home = write_home(&ws);
    let mut a = start(rotating_proxy(home.path(), &bootstrap.value, 6, 2, 1)).await;
    wait_until(Duration::from_secs(20), "the first rotation", || async {
        ws.stats().creates >= 1
    })
    .await;
    let b = start(rotating_proxy(home.path(), &bootstrap.value, 6, 2, 1)).await;

    assert_eq!(health(&a.url()).await["token"]["rotating"], true);
    assert_eq!(health(&b.url()).await["token"]["rotating"], false);
    assert_eq!(health(&a.url()).await["token"]["role"], "rotator");
    assert_eq!(health(&b.url()).await["token"]["role"], "follower");

    // The follower serves with the leader's tokens through rotations.
    let load = Load::start(&[b.url()], 2);
    let creates = ws.stats().creates;
    wait_until(
        Duration::from_secs(30),
        "two rotations by the leader",
        || async { ws.stats().creates >= creates + 2 },
    )
    .await;

    a.kill();
    let b_url = b.url();
    wait_until(Duration::from_secs(30), "the follower to take over", || {
        let url = b_url.clone();
        async move { health(&url).await["token"]["rotating"] == true }
    })
    .await;
    let creates = ws.stats().creates;
    wait_until(
        Duration::from_secs(30),
        "a rotation by the new leader",
        || async { ws.stats().creates > creates },
    )
    .await;
    load.finish_without_failures("follower", 20).await;
}
