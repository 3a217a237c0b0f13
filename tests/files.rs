//! The real binary when the files around the config file misbehave: a lock file that cannot be
//! opened or is a link, a torn config file, a FIFO in place of the config file. The permission
//! cases run as an unprivileged user, since root would open the files anyway.

#![cfg(unix)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::binary::{ProxyProcess, command};
use common::fake_workspace::FakeWorkspace;
use common::unprivileged::Unprivileged;
use common::{JsonBody, http_client};
use serde_json::{Value, json};

const CONFIG: &str = "[DEFAULT]\nhost = http://127.0.0.1:9\ntoken = dapi-in-file-0001\n";

fn mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

async fn get_json(url: String) -> (u16, Value) {
    let res = http_client()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .expect("an answer within 5 s");
    let status = res.status().as_u16();
    (
        status,
        serde_json::from_str(&res.text().await.unwrap()).unwrap(),
    )
}

#[test]
fn a_lock_path_preset_as_a_link_exits_2_and_leaves_its_target_untouched() {
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join(".databrickscfg");
    std::fs::write(&cfg, CONFIG).unwrap();
    let victim = home.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let lock = home.path().join(".databrickscfg.fresh-proxy.lock");
    std::os::unix::fs::symlink(&victim, &lock).unwrap();

    let out = command(home.path()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&lock.display().to_string()), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(!stderr.contains("dapi-in-file"), "{stderr}");
}

#[test]
fn a_lock_file_in_a_read_only_directory_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let Some(user) = Unprivileged::new(dir.path()) else {
        return;
    };
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let cfg = home.join(".databrickscfg");
    std::fs::write(&cfg, CONFIG).unwrap();
    user.give(&home);
    user.give(&cfg);
    mode(&cfg, 0o600);
    mode(&home, 0o555);

    let out = user.command(&home).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let lock = home.join(".databrickscfg.fresh-proxy.lock");
    assert!(stderr.contains(&lock.display().to_string()), "{stderr}");
    assert!(stderr.contains("Permission denied"), "{stderr}");
}

#[tokio::test]
async fn a_lock_file_that_stops_opening_later_degrades_health_once() {
    let dir = tempfile::tempdir().unwrap();
    let Some(user) = Unprivileged::new(dir.path()) else {
        return;
    };
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let cfg = home.join(".databrickscfg");
    std::fs::write(&cfg, CONFIG).unwrap();
    let lock_path = home.join(".databrickscfg.fresh-proxy.lock");
    std::fs::write(&lock_path, "").unwrap();
    for path in [&home, &cfg, &lock_path] {
        user.give(path);
    }
    mode(&cfg, 0o600);
    mode(&lock_path, 0o600);
    // Another rotator holds the lock: the proxy starts as a follower.
    let holder = std::fs::OpenOptions::new()
        .write(true)
        .open(&lock_path)
        .unwrap();
    holder.try_lock().unwrap();

    let mut cmd = user.command(&home);
    cmd.env("PAT_TOKEN_LIFETIME", "60")
        .env("PAT_ROTATION_INTERVAL", "2");
    let proxy = ProxyProcess::start(cmd);
    let (status, health) = get_json(format!("{}/health", proxy.url())).await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok", "{health}");
    assert_eq!(health["token"]["lock_error"], Value::Null);

    // Now the lock file cannot be opened by the proxy's user.
    mode(&lock_path, 0o000);
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        let (_, health) = get_json(format!("{}/health", proxy.url())).await;
        if health["status"] == "degraded" {
            break health;
        }
        assert!(Instant::now() < deadline, "never degraded: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = health["token"]["lock_error"].as_str().unwrap().to_owned();
    assert!(
        reason.contains(&lock_path.display().to_string()),
        "{reason}"
    );
    assert!(reason.contains("Permission denied"), "{reason}");
    let (status, ready) = get_json(format!("{}/ready", proxy.url())).await;
    assert_eq!(status, 503, "{ready}");
    assert!(
        ready["reason"].as_str().unwrap().contains("lock file"),
        "{ready}"
    );
    // The proxy polls the lock every 100 ms here: a second report would be one per poll.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("cannot open the rotation lock file").count(),
        1,
        "{logs}"
    );

    mode(&lock_path, 0o600);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _) = get_json(format!("{}/ready", proxy.url())).await;
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(proxy.logs().contains("can be opened again"));
    drop(holder);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_config_file_with_host_and_token_in_the_environment_starts_and_serves() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join(".databrickscfg");
    let torn: &[u8] = b"[DEFAULT\nhost = https://h\ntoken = caf\xe9";
    std::fs::write(&cfg, torn).unwrap();

    let mut cmd = command(home.path());
    cmd.env("DATABRICKS_HOST", ws.url())
        .env("DATABRICKS_TOKEN", &pat.value);
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    let res = http_client()
        .post(format!("{}/chat/invocations", proxy.url()))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (status, health) = get_json(format!("{}/health", proxy.url())).await;
    assert_eq!(status, 200);
    assert_ne!(health["token"]["state"], "missing", "{health}");
    let logs = proxy.logs();
    assert!(logs.contains("not UTF-8 text"), "{logs}");
    assert!(logs.contains("starting from DATABRICKS_HOST"), "{logs}");
    // The torn file is left for a person to repair, not edited further.
    assert_eq!(std::fs::read(&cfg).unwrap(), torn);
    assert!(!logs.contains(&pat.value));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fifo_in_place_of_the_followed_config_file_holds_up_no_request() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let home = tempfile::tempdir().unwrap();
    let cfg = home.path().join(".databrickscfg");
    std::fs::write(
        &cfg,
        format!("[DEFAULT]\nhost = {}\ntoken = {}\n", ws.url(), pat.value),
    )
    .unwrap();
    let mut cmd = command(home.path());
    cmd.env("PAT_ROTATION", "off");
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();

    // Nobody ever writes to this FIFO: a read that waits for a writer waits forever.
    std::fs::remove_file(&cfg).unwrap();
    let made = std::process::Command::new("mkfifo").arg(&cfg).status();
    assert!(made.unwrap().success());
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    for _ in 0..3 {
        let (status, health) = get_json(format!("{}/health", proxy.url())).await;
        assert_eq!(status, 200);
        assert_eq!(health["token"]["state"], "fresh", "{health}");
        let res = http_client()
            .post(format!("{}/chat/invocations", proxy.url()))
            .timeout(Duration::from_secs(5))
            .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .expect("an answer within 5 s");
        assert_eq!(res.status(), 200);
    }
    let logs = proxy.logs();
    assert!(logs.contains("not a regular file (a FIFO)"), "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_config_directory_pauses_minting_and_reports_persist_failed() {
    let dir = tempfile::tempdir().unwrap();
    let Some(user) = Unprivileged::new(dir.path()) else {
        return;
    };
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let cfg = home.join(".databrickscfg");
    std::fs::write(
        &cfg,
        format!(
            "[DEFAULT]\nhost = {}\ntoken = {}\n",
            ws.url(),
            bootstrap.value
        ),
    )
    .unwrap();
    let lock_path = home.join(".databrickscfg.fresh-proxy.lock");
    std::fs::write(&lock_path, "").unwrap();
    for path in [&home, &cfg, &lock_path] {
        user.give(path);
    }
    mode(&cfg, 0o600);
    mode(&lock_path, 0o600);
    // The lock opens, but nothing new can be created beside the config file: no temporary
    // file for an atomic write, no state file.
    mode(&home, 0o555);

    let mut cmd = user.command(&home);
    cmd.env("PAT_TOKEN_LIFETIME", "4")
        .env("PAT_ROTATION_INTERVAL", "1")
        .env("PAT_REVOKE_GRACE", "1");
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let health = loop {
        let (_, health) = get_json(format!("{}/health", proxy.url())).await;
        if health["token"]["persist_failed"] == true {
            break health;
        }
        assert!(Instant::now() < deadline, "never reported: {health}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(health["status"], "degraded", "{health}");
    // The token itself works: requests are served and /ready says so.
    let (status, _) = get_json(format!("{}/ready", proxy.url())).await;
    assert_eq!(status, 200);

    // Six seconds that would mint six tokens, none revoked, without the pause.
    let minted_live = || {
        ws.live_tokens()
            .into_iter()
            .filter(|t| t.comment == "fresh-proxy-auto-rotated")
            .count()
    };
    let mut most_live = 0;
    for _ in 0..30 {
        most_live = most_live.max(minted_live());
        let res = http_client()
            .post(format!("{}/chat/invocations", proxy.url()))
            .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!((1..=2).contains(&most_live), "{most_live} live tokens");
    // The token the config file's readers hold stays alive.
    assert!(ws.is_live(&bootstrap.value));
    let metrics = common::get_text(format!("{}/metrics", proxy.url())).await;
    let failures: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("fresh_proxy_persist_failures_total "))
        .expect("the metric")
        .parse()
        .unwrap();
    assert!(failures >= 2.0, "{metrics}");
    let logs = proxy.logs();
    assert!(logs.contains("Permission denied"), "{logs}");
    assert_eq!(logs.matches("the new token cannot be saved").count(), 1);
    assert!(!logs.contains(&bootstrap.value));
}
