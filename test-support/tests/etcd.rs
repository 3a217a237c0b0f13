//! The etcd launcher runs a real etcd that keeps its data across restarts and is really gone
//! when killed, and the process signals really stop, continue and kill a process.

#![cfg(unix)]

use std::io::ErrorKind;
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use fresh_test_support::etcd::{self, EtcdServer};
use fresh_test_support::{JsonBody, http_client};
use serde_json::{Value, json};

async fn health(etcd: &EtcdServer) -> reqwest::Result<Value> {
    let body = http_client()
        .get(format!("{}/health", etcd.endpoint()))
        .timeout(Duration::from_millis(500))
        .send()
        .await?
        .text()
        .await?;
    Ok(serde_json::from_str(&body).expect("/health answers JSON"))
}

/// A write through etcd's own JSON gateway, not through the launcher's helpers.
async fn gateway_put(etcd: &EtcdServer, key: &str, value: &str) {
    let status = http_client()
        .post(format!("{}/v3/kv/put", etcd.endpoint()))
        .json_body(&json!({"key": BASE64.encode(key), "value": BASE64.encode(value)}))
        .send()
        .await
        .expect("put")
        .status();
    assert_eq!(status, 200);
}

fn refuses_connections(etcd: &EtcdServer) -> bool {
    TcpStream::connect_timeout(&etcd.client_addr(), Duration::from_secs(1))
        .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused)
}

#[tokio::test]
async fn etcd_starts_healthy_on_loopback_and_stores_keys() {
    let etcd = EtcdServer::start();
    assert!(
        etcd.endpoint().starts_with("http://127.0.0.1:"),
        "{}",
        etcd.endpoint()
    );
    assert_eq!(health(&etcd).await.unwrap()["health"], "true");

    gateway_put(&etcd, "fleet/team/token", "record-1").await;
    gateway_put(&etcd, "fleet/team/leader", "").await;
    // Just past the prefix, in key order, on both sides.
    gateway_put(&etcd, "fleet/team0", "outside").await;
    gateway_put(&etcd, "fleet/tea", "outside").await;
    assert_eq!(
        etcd.get("fleet/team/token").as_deref(),
        Some(&b"record-1"[..])
    );
    assert_eq!(etcd.get("fleet/team/missing"), None);
    assert_eq!(
        etcd.get_prefix("fleet/team/"),
        vec![
            ("fleet/team/leader".to_owned(), Vec::new()),
            ("fleet/team/token".to_owned(), b"record-1".to_vec()),
        ]
    );

    etcd.put("fleet/team/token", b"record-2");
    assert_eq!(
        etcd.get("fleet/team/token").as_deref(),
        Some(&b"record-2"[..])
    );

    // Fleet tests let a leader's lease run out: it may be as short as 1 s (2 s is etcd's
    // shortest with its default timings).
    let lease: Value = serde_json::from_str(
        &http_client()
            .post(format!("{}/v3/lease/grant", etcd.endpoint()))
            .json_body(&json!({"TTL": 1}))
            .send()
            .await
            .expect("grant a lease")
            .text()
            .await
            .unwrap(),
    )
    .unwrap();
    assert_eq!(lease["TTL"], "1", "{lease}");
}

#[tokio::test]
async fn data_survives_a_restart_and_a_kill_on_the_same_endpoint() {
    let mut etcd = EtcdServer::start();
    let endpoint = etcd.endpoint();
    let first_pid = etcd.pid().expect("running");
    etcd.put("fleet/token", b"before");

    etcd.restart();
    assert_eq!(etcd.endpoint(), endpoint);
    assert_ne!(etcd.pid(), Some(first_pid), "a new process");
    assert_eq!(etcd.get("fleet/token").as_deref(), Some(&b"before"[..]));
    etcd.put("fleet/token", b"after restart");

    etcd.kill();
    assert_eq!(etcd.pid(), None);
    assert!(refuses_connections(&etcd), "a killed etcd refuses");
    assert!(health(&etcd).await.unwrap_err().is_connect());

    etcd.start_again();
    assert_eq!(etcd.endpoint(), endpoint);
    assert_eq!(health(&etcd).await.unwrap()["health"], "true");
    assert_eq!(
        etcd.get("fleet/token").as_deref(),
        Some(&b"after restart"[..])
    );

    etcd.stop();
    assert!(refuses_connections(&etcd), "a stopped etcd refuses");
}

#[test]
fn start_again_waits_for_a_port_another_process_holds() {
    let mut etcd = EtcdServer::start();
    etcd.put("key", b"kept");
    etcd.kill();
    let squatter = std::net::TcpListener::bind(etcd.client_addr()).expect("take etcd's port");
    let release = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        drop(squatter);
    });
    etcd.start_again();
    release.join().unwrap();
    assert_eq!(etcd.get("key").as_deref(), Some(&b"kept"[..]));
    let log = std::fs::read_to_string(etcd.log_path()).unwrap();
    assert!(
        log.contains("address already in use"),
        "the first attempt met the taken port:\n{log}"
    );
}

#[test]
fn each_server_has_its_own_ports_and_data() {
    let (one, two) = (EtcdServer::start(), EtcdServer::start());
    assert_ne!(one.endpoint(), two.endpoint());
    assert_ne!(one.data_dir(), two.data_dir());
    one.put("key", b"one");
    assert_eq!(two.get("key"), None);
}

#[test]
fn a_dropped_server_is_gone() {
    let etcd = EtcdServer::start();
    let addr = etcd.client_addr();
    let data = etcd.data_dir();
    drop(etcd);
    let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        .is_err_and(|e| e.kind() == ErrorKind::ConnectionRefused);
    assert!(refused, "no etcd left on {addr}");
    assert!(!data.exists(), "its data directory is removed");
}

#[tokio::test]
async fn a_paused_etcd_answers_nothing_until_resumed() {
    let etcd = EtcdServer::start();
    let pid = etcd.pid().unwrap();
    etcd::pause(pid);
    // The kernel still accepts the connection; nobody answers on it.
    let hung = health(&etcd).await.unwrap_err();
    etcd::resume(pid);
    assert!(hung.is_timeout(), "{hung}");
    assert_eq!(health(&etcd).await.unwrap()["health"], "true");
}

/// The scheduler state letter of `/proc/PID/stat`: `T` when stopped.
fn state(child: &Child) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 1..];
    after_name.trim_start().chars().next().unwrap()
}

fn sleeper() -> Child {
    Command::new("sleep").arg("30").spawn().expect("run sleep")
}

#[test]
fn signals_stop_continue_and_kill_a_process() {
    let mut child = sleeper();
    etcd::pause(child.id());
    wait_for(|| state(&child) == 'T', "the process to stop");
    etcd::resume(child.id());
    wait_for(|| state(&child) != 'T', "the process to continue");
    etcd::kill9(child.id());
    assert_eq!(child.wait().unwrap().signal(), Some(9));

    let mut child = sleeper();
    etcd::terminate(child.id());
    assert_eq!(child.wait().unwrap().signal(), Some(15));
}

fn wait_for(check: impl Fn() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}
