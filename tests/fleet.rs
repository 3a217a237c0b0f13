//! Fleet mode: real proxies (the binary) coordinating through a real etcd, rotating against the
//! fake workspace with lifetimes of seconds. Every scenario checks that requests keep working,
//! that one member rotates, and that every token minted is either the current one, waiting out
//! its grace period, or revoked.
#![cfg(unix)]

mod common;

use std::time::{Duration, Instant};

use common::binary::{ProxyProcess, command};
use common::etcd::{self, EtcdServer};
use common::fake_workspace::{FakeWorkspace, IssuedToken, TokenKind};
use common::load::Load;
use common::{health, wait_until};
use serde_json::Value;

const COMMENT: &str = "fresh-proxy-auto-rotated";
const PREFIX: &str = "fresh-proxy/test-fleet";

/// Seconds: token lifetime, rotation interval, revoke grace, etcd lease.
#[derive(Clone, Copy)]
struct Timing {
    lifetime: u32,
    interval: u32,
    grace: u32,
    lease: u32,
}

const TIMING: Timing = Timing {
    lifetime: 12,
    interval: 3,
    grace: 1,
    lease: 2,
};

struct Member {
    process: ProxyProcess,
    home: tempfile::TempDir,
}

impl Member {
    fn url(&self) -> String {
        self.process.url()
    }

    fn config_token(&self) -> Option<String> {
        let cfg = self.home.path().join(".databrickscfg");
        fresh_token::databrickscfg::read_profile(&cfg, "DEFAULT")
            .ok()?
            .token
            .map(|t| t.expose_secret().to_owned())
    }
}

/// A member with a config file of its own, bootstrapped with `bootstrap`.
async fn member(ws: &FakeWorkspace, etcd: &str, bootstrap: &IssuedToken, timing: Timing) -> Member {
    member_with(ws, etcd, bootstrap, timing, &[]).await
}

/// [`member`] with more settings.
async fn member_with(
    ws: &FakeWorkspace,
    etcd: &str,
    bootstrap: &IssuedToken,
    timing: Timing,
    extra: &[(&str, &str)],
) -> Member {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!(
            "[DEFAULT]\nhost = {}\ntoken = {}\n",
            ws.url(),
            bootstrap.value
        ),
    )
    .unwrap();
    let mut cmd = command(home.path());
    cmd.env("PAT_TOKEN_LIFETIME", timing.lifetime.to_string())
        .env("PAT_ROTATION_INTERVAL", timing.interval.to_string())
        .env("PAT_REVOKE_GRACE", timing.grace.to_string())
        .env("PAT_COORDINATION", "etcd")
        .env("PAT_ETCD_ENDPOINTS", etcd)
        .env("PAT_ETCD_PREFIX", PREFIX)
        .env("PAT_ETCD_LEASE_TTL", timing.lease.to_string())
        .env("RUST_LOG", "info")
        .envs(extra.iter().copied());
    let process = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    Member { process, home }
}

async fn start_etcd() -> EtcdServer {
    tokio::task::spawn_blocking(EtcdServer::start)
        .await
        .unwrap()
}

/// How many of `members` say `rotator` on `/health`.
async fn rotators(members: &[&Member]) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, member) in members.iter().enumerate() {
        if health(&member.url()).await["token"]["role"] == "rotator" {
            found.push(i);
        }
    }
    found
}

/// The group's record in etcd, as JSON.
fn record(etcd: &EtcdServer) -> Option<Value> {
    let bytes = etcd.get(&format!("{PREFIX}/token"))?;
    Some(serde_json::from_slice(&bytes).unwrap())
}

/// Minted tokens the workspace still accepts that are neither the record's current token nor
/// waiting in its revoke list: a leak.
fn leaked(ws: &FakeWorkspace, record: &Value) -> Vec<String> {
    let mut known: Vec<&str> = vec![record["token_id"].as_str().unwrap()];
    known.extend(
        record["revoke"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["token_id"].as_str()),
    );
    ws.live_tokens()
        .into_iter()
        .filter(|t| t.kind == TokenKind::Pat && t.comment == COMMENT)
        .map(|t| t.id)
        .filter(|id| !known.contains(&id.as_str()))
        .collect()
}

/// Wait until every member's config file holds the record's current token.
async fn all_hold_the_record(ws: &FakeWorkspace, etcd: &EtcdServer, members: &[&Member]) {
    wait_until(
        Duration::from_secs(15),
        "every member's config file holds the published token",
        || async {
            let Some(record) = record(etcd) else {
                return false;
            };
            let current = record["token"].as_str().unwrap().to_owned();
            ws.is_live(&current)
                && members
                    .iter()
                    .all(|m| m.config_token().as_deref() == Some(current.as_str()))
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_one_rotator_and_a_survivor_takes_over_from_a_killed_one() {
    three_members_then_kill_the_rotator(TIMING, None).await;
}

/// The outside acceptance check's settings: 30 s tokens, 10 s interval, a 5 s lease, three
/// members under load for 35 s, then the two survivors for 35 s. Run by hand (a minute and a
/// half): `cargo test --test fleet -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "takes 80 s; run by hand"]
async fn acceptance_timings() {
    let timing = Timing {
        lifetime: 30,
        interval: 10,
        grace: 5,
        lease: 5,
    };
    three_members_then_kill_the_rotator(timing, Some(Duration::from_secs(35))).await;
}

/// Load three members until four rotations (or for `phase`), kill -9 the rotator, then load the
/// survivors until three more (or for `phase`).
async fn three_members_then_kill_the_rotator(timing: Timing, phase: Option<Duration>) {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let etcd = start_etcd().await;
    let endpoint = etcd.endpoint();
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(member(&ws, &endpoint, &bootstrap, timing).await);
    }

    let urls: Vec<String> = members.iter().map(Member::url).collect();
    let load = Load::start(&urls, 1);
    let started = Instant::now();
    match phase {
        Some(phase) => tokio::time::sleep(phase).await,
        None => {
            wait_until(Duration::from_secs(60), "four rotations", || async {
                ws.stats().creates >= 4
            })
            .await
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mints = ws.stats().creates;
    let served = load.finish_without_failures("three members", 50).await;
    eprintln!("three members: {served} requests served, 0 failed, {mints} mints in {elapsed:.1} s");
    // One rotator mints once per interval (and once at the start, from the bootstrap token);
    // three would mint three times as often.
    let expected = elapsed / f64::from(timing.interval) + 2.0;
    assert!(
        (mints as f64) <= expected,
        "{mints} mints in {elapsed:.1} s: more than one rotator"
    );
    let refs: Vec<&Member> = members.iter().collect();
    assert_eq!(rotators(&refs).await.len(), 1, "exactly one rotator");
    for member in &members {
        let h = health(&member.url()).await;
        assert_eq!(h["token"]["coordination"], "etcd", "{h}");
        assert_eq!(h["status"], "ok", "{h}");
    }
    all_hold_the_record(&ws, &etcd, &refs).await;
    let record_now = record(&etcd).unwrap();
    assert_eq!(leaked(&ws, &record_now), Vec::<String>::new());

    // kill -9 the rotator: a survivor takes over within the lease, the fleet keeps serving.
    let leader = rotators(&refs).await[0];
    let mut dead = members.remove(leader);
    dead.process.kill();
    let survivors: Vec<&Member> = members.iter().collect();
    let urls: Vec<String> = members.iter().map(Member::url).collect();
    let before = ws.stats().creates;
    let load = Load::start(&urls, 1);
    let started = Instant::now();
    match phase {
        Some(phase) => tokio::time::sleep(phase).await,
        None => {
            wait_until(Duration::from_secs(60), "a survivor rotates", || async {
                ws.stats().creates >= before + 3
            })
            .await
        }
    }
    let served = load.finish_without_failures("two survivors", 50).await;
    let mints = ws.stats().creates - before;
    eprintln!(
        "two survivors: {served} requests served, 0 failed, {mints} mints in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(mints >= 1, "no survivor rotated");
    assert_eq!(
        rotators(&survivors).await.len(),
        1,
        "exactly one survivor rotates"
    );
    all_hold_the_record(&ws, &etcd, &survivors).await;
    // The dead rotator's tokens are revoked by its successor once their grace has passed.
    wait_until(
        Duration::from_secs(u64::from(timing.grace) + 15),
        "nothing leaked",
        || async { record(&etcd).is_some_and(|r| leaked(&ws, &r).is_empty()) },
    )
    .await;
    let dead_logs = dead.process.logs();
    let logs = [
        dead_logs,
        survivors[0].process.logs(),
        survivors[1].process.logs(),
    ];
    for log in &logs {
        assert!(!log.contains(&bootstrap.value), "a token reached the logs");
        let current = record(&etcd).unwrap()["token"].as_str().unwrap().to_owned();
        assert!(!log.contains(&current), "a token reached the logs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_going_away_stops_minting_not_serving_and_its_return_resumes_rotation() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let mut etcd = start_etcd().await;
    let endpoint = etcd.endpoint();
    // Tokens outlive the outage: members serve the current one meanwhile.
    let timing = Timing {
        lifetime: 30,
        ..TIMING
    };
    let a = member(&ws, &endpoint, &bootstrap, timing).await;
    let b = member(&ws, &endpoint, &bootstrap, timing).await;
    wait_until(Duration::from_secs(30), "a rotation", || async {
        ws.stats().creates >= 1
    })
    .await;
    all_hold_the_record(&ws, &etcd, &[&a, &b]).await;

    let load = Load::start(&[a.url(), b.url()], 1);
    tokio::task::block_in_place(|| etcd.stop());
    // Past the lease, no member may mint any more.
    tokio::time::sleep(Duration::from_secs(u64::from(timing.lease) + 1)).await;
    let during = ws.stats().creates;
    tokio::time::sleep(Duration::from_secs(u64::from(timing.interval) * 2)).await;
    assert_eq!(ws.stats().creates, during, "a member minted without etcd");
    for member in [&a, &b] {
        let h = health(&member.url()).await;
        assert_eq!(h["status"], "degraded", "{h}");
        assert!(h["token"]["coordination_error"].is_string(), "{h}");
        assert_eq!(h["token"]["role"], "follower", "{h}");
    }

    tokio::task::block_in_place(|| etcd.start_again());
    wait_until(Duration::from_secs(30), "rotation resumes", || async {
        ws.stats().creates >= during + 2
    })
    .await;
    load.finish_without_failures("through the outage", 50).await;
    assert_eq!(rotators(&[&a, &b]).await.len(), 1);
    wait_until(Duration::from_secs(15), "healthy again", || async {
        health(&a.url()).await["status"] == "ok" && health(&b.url()).await["status"] == "ok"
    })
    .await;
    all_hold_the_record(&ws, &etcd, &[&a, &b]).await;
    wait_until(Duration::from_secs(15), "nothing leaked", || async {
        record(&etcd).is_some_and(|r| leaked(&ws, &r).is_empty())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_rotator_cannot_publish_when_it_wakes_and_a_late_member_catches_up() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let etcd = start_etcd().await;
    let endpoint = etcd.endpoint();
    let a = member(&ws, &endpoint, &bootstrap, TIMING).await;
    let b = member(&ws, &endpoint, &bootstrap, TIMING).await;
    wait_until(Duration::from_secs(30), "a rotation", || async {
        ws.stats().creates >= 1
    })
    .await;
    let leader = rotators(&[&a, &b]).await;
    assert_eq!(leader.len(), 1);
    let (old, other) = if leader[0] == 0 { (&a, &b) } else { (&b, &a) };
    let old_name = record(&etcd).unwrap()["leader"]
        .as_str()
        .unwrap()
        .to_owned();

    // Partition the rotator (SIGSTOP) past its lease and a rotation: the other takes over.
    etcd::pause(old.process.pid());
    let before = ws.stats().creates;
    wait_until(
        Duration::from_secs(30),
        "the other member rotates",
        || async {
            ws.stats().creates > before
                && record(&etcd).is_some_and(|r| r["leader"].as_str() != Some(old_name.as_str()))
        },
    )
    .await;
    etcd::resume(old.process.pid());
    // Awake, the old rotator learns it was deposed before it acts: its lease ran out while it
    // slept. Whatever it does, no record of its own is published again.
    let watch_until = Instant::now() + Duration::from_secs(u64::from(TIMING.interval) * 2);
    while Instant::now() < watch_until {
        let r = record(&etcd).unwrap();
        assert_ne!(
            r["leader"].as_str(),
            Some(old_name.as_str()),
            "a deposed rotator published"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(&old.url()).await["token"]["role"], "follower");
    assert_eq!(health(&other.url()).await["token"]["role"], "rotator");
    all_hold_the_record(&ws, &etcd, &[&a, &b]).await;

    // A member joining late, with only the bootstrap token in its file, serves the fleet's.
    let late = member(&ws, &endpoint, &bootstrap, TIMING).await;
    all_hold_the_record(&ws, &etcd, &[&a, &b, &late]).await;
    assert_eq!(health(&late.url()).await["token"]["role"], "follower");
    assert_eq!(rotators(&[&a, &b, &late]).await.len(), 1);
    wait_until(Duration::from_secs(15), "nothing leaked", || async {
        record(&etcd).is_some_and(|r| leaked(&ws, &r).is_empty())
    })
    .await;
}

/// `etcdctl` against `endpoint`, as root once auth is on.
fn etcdctl(endpoint: &str, args: &[&str]) {
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={endpoint}"))
        .args(args)
        .output()
        .expect("etcdctl (Debian's etcd-client package) runs");
    assert!(
        out.status.success(),
        "etcdctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_etcd_auth_only_members_with_the_password_take_part() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let etcd = start_etcd().await;
    let endpoint = etcd.endpoint();
    let password = "etcd-password-7f3a";
    tokio::task::block_in_place(|| {
        etcdctl(
            &endpoint,
            &["user", "add", "root", "--new-user-password", password],
        );
        etcdctl(&endpoint, &["user", "grant-role", "root", "root"]);
        etcdctl(&endpoint, &["auth", "enable"]);
    });

    // A member with the wrong password cannot join: it serves its token, degraded, and never
    // mints.
    let intruder = member_with(
        &ws,
        &endpoint,
        &bootstrap,
        TIMING,
        &[
            ("PAT_ETCD_USER", "root"),
            ("PAT_ETCD_PASSWORD", "not-the-password"),
        ],
    )
    .await;
    wait_until(
        Duration::from_secs(15),
        "the intruder reports etcd refusing it",
        || async { health(&intruder.url()).await["token"]["coordination_error"].is_string() },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        ws.stats().creates,
        0,
        "a member without the password minted"
    );
    let h = health(&intruder.url()).await;
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["token"]["role"], "follower", "{h}");

    let mut good = member_with(
        &ws,
        &endpoint,
        &bootstrap,
        TIMING,
        &[("PAT_ETCD_USER", "root"), ("PAT_ETCD_PASSWORD", password)],
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the member with the password rotates",
        || async { ws.stats().creates >= 2 },
    )
    .await;
    let h = health(&good.url()).await;
    assert_eq!(h["token"]["role"], "rotator", "{h}");
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(health(&intruder.url()).await["token"]["role"], "follower");
    // The intruder never learns the fleet's token.
    let current = good.config_token().unwrap();
    assert_ne!(intruder.config_token().as_deref(), Some(current.as_str()));
    good.process.kill();
    for log in [good.process.logs(), intruder.process.logs()] {
        assert!(
            !log.contains(password),
            "the etcd password reached the logs"
        );
        assert!(!log.contains(&current), "a token reached the logs");
    }
}

/// PEM files of a test CA, a server certificate for 127.0.0.1 and a client certificate.
fn fleet_pki(dir: &std::path::Path) -> etcd::TlsFiles {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let write = |name: &str, pem: String| {
        let path = dir.join(name);
        std::fs::write(&path, pem).unwrap();
        path
    };
    let leaf = |names: Vec<String>, file: &str| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        write(&format!("{file}.pem"), cert.pem());
        write(&format!("{file}-key.pem"), key.serialize_pem());
    };
    leaf(
        vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        "server",
    );
    leaf(vec!["fleet-member".to_owned()], "client");
    etcd::TlsFiles {
        cert: dir.join("server.pem"),
        key: dir.join("server-key.pem"),
        client_ca: write("ca.pem", ca.pem()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_mutual_tls_members_with_a_client_certificate_take_part() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let pki = tempfile::tempdir().unwrap();
    let files = fleet_pki(pki.path());
    let etcd = tokio::task::spawn_blocking({
        let files = files.clone();
        move || EtcdServer::start_with_tls(files)
    })
    .await
    .unwrap();
    let endpoint = etcd.tls_endpoint();
    let path = |name: &str| pki.path().join(name).to_str().unwrap().to_owned();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client-key.pem"));

    // Without a client certificate, etcd refuses the member.
    let refused = member_with(&ws, &endpoint, &bootstrap, TIMING, &[("PAT_ETCD_CA", &ca)]).await;
    let member = member_with(
        &ws,
        &endpoint,
        &bootstrap,
        TIMING,
        &[
            ("PAT_ETCD_CA", &ca),
            ("PAT_ETCD_CERT", &cert),
            ("PAT_ETCD_KEY", &key),
        ],
    )
    .await;
    wait_until(
        Duration::from_secs(30),
        "the member rotates over TLS",
        || async { ws.stats().creates >= 2 },
    )
    .await;
    assert_eq!(health(&member.url()).await["token"]["role"], "rotator");
    all_hold_the_record(&ws, &etcd, &[&member]).await;
    let h = health(&refused.url()).await;
    assert!(h["token"]["coordination_error"].is_string(), "{h}");
    assert_eq!(h["token"]["role"], "follower", "{h}");
    assert_eq!(
        refused.config_token().as_deref(),
        Some(bootstrap.value.as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_prefix_members_meet_under_their_workspace_and_user() {
    let ws = FakeWorkspace::start().await;
    let bootstrap = ws.mint(Duration::from_secs(600));
    let etcd = start_etcd().await;
    let endpoint = etcd.endpoint();
    let unset = [("PAT_ETCD_PREFIX", "")];
    let a = member_with(&ws, &endpoint, &bootstrap, TIMING, &unset).await;
    let b = member_with(&ws, &endpoint, &bootstrap, TIMING, &unset).await;
    let host = ws.url().trim_start_matches("http://").to_owned();
    let key = format!(
        "fresh-proxy/{host}/{}/token",
        common::fake_workspace::USER_NAME
    );
    wait_until(
        Duration::from_secs(30),
        "a record under the default prefix",
        || async { etcd.get(&key).is_some() },
    )
    .await;
    assert_eq!(rotators(&[&a, &b]).await.len(), 1);
    let record: Value = serde_json::from_slice(&etcd.get(&key).unwrap()).unwrap();
    let current = record["token"].as_str().unwrap();
    wait_until(Duration::from_secs(15), "both serve the record", || async {
        a.config_token().as_deref() == Some(current) && b.config_token().as_deref() == Some(current)
    })
    .await;
    assert!(etcd.get(&format!("{PREFIX}/token")).is_none());
}
