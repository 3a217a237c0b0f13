//! The rotator against the fake workspace, with lifetimes of a few seconds.

mod common;

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::fake_workspace::{Behaviour, FakeWorkspace};
use common::logs::{capture_logs, logs};
use common::{http_client, wait_until};
use fresh_proxy::AppState;
use fresh_proxy::health::metrics::Metrics;
use fresh_proxy::token::rotator::state::{self, SavedState};
use fresh_proxy::token::rotator::{IdlePolicy, Rotator, RotatorConfig, RotatorSource, parse_sinks};
use fresh_proxy::token::status::{Activity, SourceKind, StatusCell, TokenStatus};
use fresh_token::databrickscfg;
use fresh_token::{Token, TokenSource};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const COMMENT: &str = "fresh-proxy-test";
const DEADLINE: Duration = Duration::from_secs(30);
const OTHER_TOKEN: &str = "dapi-other-profile-token";

fn assert_no_secret_in_logs<'a>(values: impl IntoIterator<Item = &'a String>) {
    let logs = logs();
    for value in values {
        assert!(
            !logs.contains(value.as_str()),
            "a token value shows in the logs"
        );
    }
}

// ---------------------------------------------------------------------------------------------

struct Setup {
    workspace: FakeWorkspace,
    _dir: tempfile::TempDir,
    config_file: PathBuf,
    bootstrap: String,
}

impl Setup {
    async fn new() -> Self {
        capture_logs();
        let workspace = FakeWorkspace::start().await;
        let bootstrap = workspace.mint(Duration::from_secs(120)).value;
        let dir = tempfile::tempdir().unwrap();
        let config_file = dir.path().join(".databrickscfg");
        std::fs::write(&config_file, config_text(&workspace.url(), &bootstrap)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let loose = std::fs::Permissions::from_mode(0o644);
            std::fs::set_permissions(&config_file, loose).unwrap();
        }
        Self {
            workspace,
            _dir: dir,
            config_file,
            bootstrap,
        }
    }

    fn config(&self, lifetime_s: u64, interval_ms: u64, grace_ms: u64) -> RotatorConfig {
        RotatorConfig {
            config_file: self.config_file.clone(),
            profile: "DEFAULT".to_owned(),
            host: self.workspace.url(),
            lifetime: Duration::from_secs(lifetime_s),
            interval: Duration::from_millis(interval_ms),
            idle_policy: IdlePolicy::Keepalive,
            sessions_url: None,
            idle_after: Duration::from_secs(60),
            revoke_grace: Duration::from_millis(grace_ms),
            comment: COMMENT.to_owned(),
            sinks: Vec::new(),
            revoke_bootstrap: false,
        }
    }

    /// Live tokens minted by a rotator (the bootstrap token has no comment).
    fn live_minted(&self) -> Vec<String> {
        self.workspace
            .live_tokens()
            .into_iter()
            .filter(|t| t.comment == COMMENT)
            .map(|t| t.id)
            .collect()
    }

    fn saved_state(&self) -> SavedState {
        state::load(&state::state_path(&self.config_file))
            .unwrap()
            .expect("state file written")
    }
}

fn config_text(host: &str, token: &str) -> String {
    format!(
        "; written by hand\n[other]\nhost = https://other.example.com\ntoken = {OTHER_TOKEN}\n\n[DEFAULT]\nhost = {host}\n# the rotated one\ntoken = {token}\n"
    )
}

/// The config file is intact: mode 0600, the other profile and the comments kept, and the
/// profile holds `expected`.
fn assert_config_file_intact(path: &Path, expected: &Token) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(
        text.starts_with("; written by hand\n[other]\n"),
        "{}",
        text.len()
    );
    assert!(text.contains("# the rotated one\n"));
    let other = databrickscfg::read_profile(path, "other").unwrap();
    assert_eq!(other.token.unwrap().expose_secret(), OTHER_TOKEN);
    let profile = databrickscfg::read_profile(path, "DEFAULT").unwrap();
    assert!(profile.token.unwrap().same_secret(expected));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}

struct Instance {
    source: RotatorSource,
    status: StatusCell,
    metrics: Metrics,
    activity: Activity,
    cancel: CancellationToken,
    task: JoinHandle<()>,
    rotating_at_start: bool,
}

impl Instance {
    fn launch(config: RotatorConfig, env_token: Option<Token>) -> Self {
        let status = StatusCell::new(TokenStatus::new(SourceKind::Rotator));
        let metrics = Metrics::new();
        let activity = Activity::default();
        let rotator = Rotator::new(
            config,
            http_client(),
            env_token,
            status.clone(),
            metrics.clone(),
            activity.clone(),
        )
        .expect("the rotation lock file opens");
        let rotating_at_start = rotator.is_rotating();
        let source = rotator.source();
        let cancel = CancellationToken::new();
        let task = tokio::spawn(rotator.run(cancel.clone()));
        Self {
            source,
            status,
            metrics,
            activity,
            cancel,
            task,
            rotating_at_start,
        }
    }

    fn rotations(&self) -> u64 {
        self.status.get().rotations
    }

    async fn wait_rotations(&self, at_least: u64) {
        wait_until(DEADLINE, &format!("{at_least} rotations"), || async {
            self.rotations() >= at_least
        })
        .await;
    }

    async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the rotator stops promptly")
            .unwrap();
    }
}

/// What a load loop saw: the statuses that were not 200, the number of 200s, and the token
/// values it used.
#[derive(Debug, Default)]
struct LoadReport {
    failures: Vec<u16>,
    ok: u64,
    seen: HashSet<String>,
}

/// Calls the fake serving endpoint with `source`'s current token until `stop`, and reports
/// what it saw.
fn load_loop(
    workspace: &FakeWorkspace,
    source: RotatorSource,
    activity: Activity,
    stop: CancellationToken,
) -> JoinHandle<LoadReport> {
    let url = workspace.endpoint_url(Behaviour::Echo);
    tokio::spawn(async move {
        let client = http_client();
        let mut report = LoadReport::default();
        while !stop.is_cancelled() {
            let token = source.current().expect("a token is always available");
            report.seen.insert(token.expose_secret().to_owned());
            activity.record(std::time::SystemTime::now());
            let status = client
                .post(&url)
                .header(http::header::AUTHORIZATION, token.header_value().clone())
                .body("ping")
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(599);
            if status == 200 {
                report.ok += 1;
            } else {
                report.failures.push(status);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        report
    })
}

async fn finish_loops(loops: Vec<JoinHandle<LoadReport>>) -> (Vec<u16>, u64, HashSet<String>) {
    let mut all = LoadReport::default();
    for handle in loops {
        let report = handle.await.unwrap();
        all.failures.extend(report.failures);
        all.ok += report.ok;
        all.seen.extend(report.seen);
    }
    (all.failures, all.ok, all.seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_rotations_under_load_without_a_failed_request() {
    let setup = Setup::new().await;
    let rotator = Instance::launch(setup.config(3, 1_000, 500), None);
    assert!(rotator.rotating_at_start);
    let stop = CancellationToken::new();
    let loops: Vec<_> = (0..3)
        .map(|_| {
            load_loop(
                &setup.workspace,
                rotator.source.clone(),
                rotator.activity.clone(),
                stop.clone(),
            )
        })
        .collect();

    // After every rotation the config file is intact and holds the published token.
    let mut checked = 0;
    while checked < 10 {
        rotator.wait_rotations(checked + 1).await;
        checked = rotator.rotations();
        let current = rotator.source.current().unwrap();
        let on_disk = databrickscfg::read_profile(&setup.config_file, "DEFAULT").unwrap();
        if on_disk
            .token
            .as_ref()
            .is_some_and(|t| t.same_secret(&current))
        {
            assert_config_file_intact(&setup.config_file, &current);
        }
    }
    stop.cancel();
    let (failures, ok, mut seen) = finish_loops(loops).await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 100, "only {ok} requests made");
    assert!(seen.len() >= 10, "{} tokens used", seen.len());

    assert!(rotator.status.get().rotating);
    let text = rotator.metrics.render(None);
    let ok_count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fresh_proxy_rotations_total{result=\"ok\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_default();
    assert!(ok_count >= 10, "{text}");
    let (source, status) = (rotator.source.clone(), rotator.status.clone());
    rotator.stop().await;
    let status = status.get();
    assert_eq!(status.source, SourceKind::Rotator);
    assert!(status.last_rotation.is_some());
    let current = source.current().unwrap();
    assert_eq!(current.expires_at(), status.expires_at);
    // At most the current token and one in grace are live.
    assert!(setup.live_minted().len() <= 2, "{:?}", setup.live_minted());
    // The state file knows ids and expiry, never a value.
    let saved = setup.saved_state();
    let saved_text = std::fs::read_to_string(state::state_path(&setup.config_file)).unwrap();
    assert!(setup.workspace.is_live(current.expose_secret()));
    assert!(saved.current.is_some());
    seen.insert(setup.bootstrap.clone());
    for value in &seen {
        assert!(!saved_text.contains(value.as_str()));
    }
    assert!(logs().contains("rotated the token"));
    assert_no_secret_in_logs(&seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_failed_creates_are_survived_and_sinks_follow() {
    let setup = Setup::new().await;
    let dir = setup.config_file.parent().unwrap().to_owned();
    let env_file = dir.join("agent.env");
    let json_file = dir.join("settings.json");
    let yaml_file = dir.join("config.yaml");
    std::fs::write(&env_file, "# agent\nOTHER=1\nexport API_TOKEN=\"old\"\n").unwrap();
    std::fs::write(
        &json_file,
        "{\n  \"theme\": \"dark\",\n  \"env\": {\n    \"X\": \"y\"\n  }\n}\n",
    )
    .unwrap();
    std::fs::write(
        &yaml_file,
        "# hermes\nmodel:\n  name: m  # keep\n  api_key: old\n",
    )
    .unwrap();
    let mut config = setup.config(3, 1_000, 300);
    config.sinks = parse_sinks(&format!(
        "dotenv:{}:API_TOKEN;json:{}:/env/TOKEN;yaml:{}:model.api_key;dotenv:{}:ABSENT",
        env_file.display(),
        json_file.display(),
        yaml_file.display(),
        dir.join("missing.env").display()
    ))
    .unwrap();
    let rotator = Instance::launch(config, None);
    rotator.wait_rotations(1).await;
    setup.workspace.fail_next_creates(3, 500);
    let before = rotator.rotations();
    let stop = CancellationToken::new();
    let loops = vec![load_loop(
        &setup.workspace,
        rotator.source.clone(),
        rotator.activity.clone(),
        stop.clone(),
    )];
    rotator.wait_rotations(before + 2).await;
    stop.cancel();
    let (failures, _, seen) = finish_loops(loops).await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert_eq!(setup.workspace.stats().create_failures, 3);
    let text = rotator.metrics.render(None);
    assert!(
        text.lines()
            .any(|l| l == "fresh_proxy_rotations_total{result=\"failed\"} 3"),
        "{text}"
    );
    let source = rotator.source.clone();
    rotator.stop().await;

    let current = source.current().unwrap();
    let value = current.expose_secret();
    assert_eq!(
        std::fs::read_to_string(&env_file).unwrap(),
        format!("# agent\nOTHER=1\nexport API_TOKEN=\"{value}\"\n")
    );
    assert_eq!(
        std::fs::read_to_string(&json_file).unwrap(),
        format!(
            "{{\n  \"theme\": \"dark\",\n  \"env\": {{\n    \"TOKEN\": \"{value}\",\n    \"X\": \"y\"\n  }}\n}}\n"
        )
    );
    assert_eq!(
        std::fs::read_to_string(&yaml_file).unwrap(),
        format!("# hermes\nmodel:\n  name: m  # keep\n  api_key: {value}\n")
    );
    assert!(!dir.join("missing.env").exists());
    let logs = logs();
    assert!(logs.contains("minting a new token failed; retrying"));
    assert!(logs.contains("sink file missing; skipped"));
    assert_no_secret_in_logs(seen.iter().chain([&setup.bootstrap]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_and_restart_leak_no_token() {
    let setup = Setup::new().await;
    let config = setup.config(4, 1_000, 300);

    // Crash right after a rotation: the previous token is still in its grace period.
    let first = Instance::launch(config.clone(), None);
    first.wait_rotations(3).await;
    first.task.abort();
    let _ = first.task.await;
    let pending = setup.saved_state().revoke;
    assert!(!pending.is_empty(), "a revoke was pending at the crash");

    let second = Instance::launch(config.clone(), None);
    wait_until(DEADLINE, "the second instance rotating", || async {
        second.status.get().rotating
    })
    .await;
    // It resumes with the token the first one minted (no bootstrap mint).
    let resumed = second.source.current().unwrap();
    assert!(setup.workspace.is_live(resumed.expose_secret()));
    assert!(
        resumed.expires_at().is_some(),
        "resumed with a known expiry"
    );
    for revoke in &pending {
        let id = revoke.token_id.clone();
        let workspace = setup.workspace.clone();
        wait_until(DEADLINE, "the pending revoke done after restart", || {
            let workspace = workspace.clone();
            let id = id.clone();
            async move { !workspace.is_live_id(&id) }
        })
        .await;
    }
    second.wait_rotations(1).await;

    // Crash while token/create is in flight: the mint still completes and is recorded.
    let quiet = second.rotations();
    wait_until(DEADLINE, "no revoke pending", || async {
        setup.saved_state().revoke.is_empty() && second.rotations() == quiet
    })
    .await;
    setup.workspace.set_create_delay(Duration::from_millis(400));
    let creates = setup.workspace.stats().creates;
    let requests = setup.workspace.stats().requests;
    wait_until(DEADLINE, "token/create in flight", || async {
        setup.workspace.stats().requests > requests
    })
    .await;
    second.task.abort();
    let _ = second.task.await;
    wait_until(DEADLINE, "the in-flight mint completed", || async {
        setup.workspace.stats().creates > creates
    })
    .await;
    setup.workspace.set_create_delay(Duration::ZERO);

    let third = Instance::launch(config, None);
    // The detached mint holds the lock until it has written everything.
    wait_until(DEADLINE, "the third instance rotating", || async {
        third.status.get().rotating
    })
    .await;
    third.wait_rotations(2).await;
    wait_until(
        DEADLINE,
        "at most the current token and one in grace",
        || async { setup.live_minted().len() <= 2 },
    )
    .await;
    let current_id = setup.saved_state().current.unwrap().token_id;
    let live = setup.live_minted();
    assert!(live.contains(&current_id), "{live:?}");
    // The bootstrap token is not ours to revoke.
    assert!(setup.workspace.is_live(&setup.bootstrap));
    third.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_follows_and_takes_over() {
    let setup = Setup::new().await;
    let config = setup.config(3, 1_000, 500);
    let leader = Instance::launch(config.clone(), None);
    let follower = Instance::launch(config, None);
    assert!(leader.rotating_at_start);
    assert!(!follower.rotating_at_start);
    assert!(!follower.status.get().rotating);
    assert_eq!(follower.status.get().source, SourceKind::File);

    let stop = CancellationToken::new();
    let loops = vec![load_loop(
        &setup.workspace,
        follower.source.clone(),
        follower.activity.clone(),
        stop.clone(),
    )];
    leader.wait_rotations(3).await;
    wait_until(DEADLINE, "the follower sees the leader's token", || async {
        let (a, b) = (leader.source.current(), follower.source.current());
        a.zip(b).is_some_and(|(a, b)| a.same_secret(&b))
    })
    .await;
    assert_eq!(follower.rotations(), 0, "the follower never rotates");
    // The follower knows the expiry from the state file.
    wait_until(DEADLINE, "the follower knows the expiry", || async {
        follower.status.get().expires_at.is_some()
    })
    .await;

    leader.stop().await;
    let handed_over = follower.source.current().unwrap();
    wait_until(DEADLINE, "the follower takes over", || async {
        follower.status.get().rotating
    })
    .await;
    follower.wait_rotations(2).await;
    stop.cancel();
    let (failures, ok, seen) = finish_loops(loops).await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 0);
    assert!(!follower.source.current().unwrap().same_secret(&handed_over));
    // It resumed with the leader's last token, so that one gets revoked too.
    wait_until(
        DEADLINE,
        "at most the current token and one in grace",
        || async { setup.live_minted().len() <= 2 },
    )
    .await;
    follower.stop().await;
    assert_no_secret_in_logs(seen.iter().chain([&setup.bootstrap]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_config_file_never_stops_service() {
    let setup = Setup::new().await;
    let config = setup.config(3, 1_000, 500);
    let leader = Instance::launch(config.clone(), None);
    let follower = Instance::launch(config, None);
    leader.wait_rotations(1).await;
    let stop = CancellationToken::new();
    let loops: Vec<_> = [&leader, &follower]
        .iter()
        .map(|i| {
            load_loop(
                &setup.workspace,
                i.source.clone(),
                i.activity.clone(),
                stop.clone(),
            )
        })
        .collect();
    wait_until(DEADLINE, "the follower in step", || async {
        let (a, b) = (leader.source.current(), follower.source.current());
        a.zip(b).is_some_and(|(a, b)| a.same_secret(&b))
    })
    .await;

    // A foreign writer truncates the file and writes half of it, in place.
    let rotations = leader.rotations();
    let text = std::fs::read_to_string(&setup.config_file).unwrap();
    let cut = text.find("[DEFAULT]").unwrap() + 4;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&setup.config_file)
        .unwrap();
    file.write_all(&text.as_bytes()[..cut]).unwrap();
    drop(file);
    assert!(databrickscfg::read_profile(&setup.config_file, "DEFAULT").is_err());
    // The next rotation cannot be read back from the file: the leader publishes its new
    // token in memory but does not revoke the one the file's readers still hold.
    leader.wait_rotations(rotations + 1).await;
    assert!(follower.source.current().is_some());
    assert!(leader.status.get().persist_failed);
    // The foreign writer finishes its write; the rotation after that reaches the follower.
    std::fs::write(&setup.config_file, &text).unwrap();
    let repaired = leader.rotations();
    leader.wait_rotations(repaired + 1).await;
    assert!(!leader.status.get().persist_failed);
    wait_until(DEADLINE, "the follower in step again", || async {
        let (a, b) = (leader.source.current(), follower.source.current());
        a.zip(b).is_some_and(|(a, b)| a.same_secret(&b))
    })
    .await;
    stop.cancel();
    let (failures, ok, seen) = finish_loops(loops).await;
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 0);
    assert!(follower.source.current().is_some());
    leader.stop().await;
    follower.stop().await;
    assert!(logs().contains("the new token cannot be saved"));
    assert_no_secret_in_logs(seen.iter().chain([&setup.bootstrap]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_bootstrap_only_when_it_can_be_identified() {
    // Only the bootstrap token exists: it is identified and revoked after the first rotation.
    let alone = Setup::new().await;
    let mut config = alone.config(3, 1_000, 200);
    config.revoke_bootstrap = true;
    let rotator = Instance::launch(config, None);
    rotator.wait_rotations(1).await;
    wait_until(DEADLINE, "the bootstrap token revoked", || async {
        !alone.workspace.is_live(&alone.bootstrap)
    })
    .await;
    rotator.stop().await;

    // Two tokens could be the bootstrap token: neither is revoked.
    let crowded = Setup::new().await;
    let unrelated = crowded.workspace.mint(Duration::from_secs(120));
    let mut config = crowded.config(3, 1_000, 200);
    config.revoke_bootstrap = true;
    let rotator = Instance::launch(config, Some(Token::new(&crowded.bootstrap).unwrap()));
    assert_eq!(rotator.status.get().source, SourceKind::Env);
    rotator.wait_rotations(2).await;
    assert!(crowded.workspace.is_live(&crowded.bootstrap));
    assert!(crowded.workspace.is_live(&unrelated.value));
    rotator.stop().await;
    assert!(logs().contains("nothing tells them apart"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapse_lets_an_idle_token_expire_and_resumes_from_the_config_file() {
    let setup = Setup::new().await;
    let mut config = setup.config(2, 1_000, 200);
    config.idle_policy = IdlePolicy::Lapse;
    let rotator = Instance::launch(config, None);
    // The bootstrap token (unknown expiry) is replaced at once, then nobody uses the proxy.
    rotator.wait_rotations(1).await;
    wait_until(DEADLINE, "the token reported expired", || async {
        let status = rotator.status.get();
        status
            .expires_at
            .is_some_and(|at| at <= std::time::SystemTime::now())
    })
    .await;
    let requests = setup.workspace.stats().requests;
    let denied = setup.workspace.stats().denied;
    assert_eq!(rotator.rotations(), 1);
    assert!(logs().contains("no API call is made with it"));
    assert!(
        rotator.source.current().is_none(),
        "the expired token is not handed to the proxy"
    );
    // The proxy in front of it says so, and answers 503 rather than send the dead token.
    let proxy = common::harness::serve(AppState::with_parts(
        common::harness::settings(&setup.workspace.serving_base()),
        Arc::new(rotator.source.clone()),
        http_client(),
        rotator.status.clone(),
        rotator.metrics.clone(),
        rotator.activity.clone(),
    ))
    .await;
    let client = http_client();
    let get = |path: &'static str| {
        let request = client.get(format!("{}{path}", proxy.url())).send();
        async move {
            let res = request.await.unwrap();
            let status = res.status().as_u16();
            let body: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
            (status, body)
        }
    };
    let (_, health) = get("/health").await;
    assert_eq!(health["token"]["state"], "expired", "{health}");
    let (status, ready) = get("/ready").await;
    assert_eq!(
        (status, &ready["reason"]),
        (503, &"the token has expired".into())
    );
    let res = client
        .post(format!("{}/chat/invocations", proxy.url()))
        .header("content-type", "application/json")
        .body(r#"{"messages":[{"role":"user","content":"hi"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
    assert!(res.text().await.unwrap().contains("token_unavailable"));

    // A person puts a new token in the config file: rotation resumes with it.
    let fresh = setup.workspace.mint(Duration::from_secs(60));
    databrickscfg::update_profile(&setup.config_file, "DEFAULT", &[("token", &fresh.value)])
        .unwrap();
    rotator.wait_rotations(2).await;
    assert_eq!(
        setup.workspace.stats().denied,
        denied,
        "no call with a dead token"
    );
    assert!(setup.workspace.stats().requests > requests);
    let current = rotator.source.current().expect("a token again");
    assert!(setup.workspace.is_live(current.expose_secret()));
    rotator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_the_minted_token_expired_makes_no_call_with_it() {
    let setup = Setup::new().await;
    let config = setup.config(2, 1_000, 200);
    let first = Instance::launch(config.clone(), None);
    first.wait_rotations(1).await;
    first.stop().await;
    let minted = databrickscfg::read_profile(&setup.config_file, "DEFAULT")
        .unwrap()
        .token
        .unwrap();
    wait_until(DEADLINE, "the minted token to expire", || async {
        !setup.workspace.is_live(minted.expose_secret())
    })
    .await;

    let stats = setup.workspace.stats();
    let second = Instance::launch(config, None);
    // The state file knows the token's expiry: it is reported expired, not treated as a
    // bootstrap token of unknown expiry that would be used to mint.
    let status = second.status.get();
    assert!(status.present);
    assert!(
        status
            .expires_at
            .is_some_and(|at| at <= std::time::SystemTime::now()),
        "{status:?}"
    );
    wait_until(DEADLINE, "expiry reported", || async {
        logs().contains("no API call is made with it")
    })
    .await;
    let after = setup.workspace.stats();
    assert_eq!(after.creates, stats.creates, "no mint with a dead token");
    assert_eq!(after.denied, stats.denied, "no call with a dead token");
    assert!(
        second.source.current().is_none(),
        "the expired token is not handed to the proxy"
    );
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_a_new_token_cannot_be_saved_minting_pauses_and_unsaved_tokens_are_revoked() {
    let setup = Setup::new().await;
    let dir = setup.config_file.parent().unwrap().to_owned();
    // A sink that cannot take the token (root writes anywhere, but not into a broken document).
    let sink = dir.join("settings.json");
    std::fs::write(&sink, "{ not json").unwrap();
    // Lifetime 4 s, interval 1 s: margin 3 s. Unsaved, a token is replaced 1.5 s before expiry
    // (every 2.5 s) instead of every second.
    let mut config = setup.config(4, 1_000, 200);
    config.sinks = parse_sinks(&format!("json:{}:/env/TOKEN", sink.display())).unwrap();
    let rotator = Instance::launch(config, None);
    rotator.wait_rotations(1).await;
    wait_until(DEADLINE, "persist_failed reported", || async {
        rotator.status.get().persist_failed
    })
    .await;

    // Six seconds that would hold six rotations, and six live tokens, without the pause.
    let started = rotator.rotations();
    let mut most_live = 0;
    for _ in 0..60 {
        most_live = most_live.max(setup.live_minted().len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated = rotator.rotations() - started;
    assert!((1..=3).contains(&rotated), "{rotated} rotations in 6 s");
    // The held token, and the one before it during its 200 ms grace.
    assert!(most_live <= 2, "{most_live} live tokens");
    assert!(rotator.status.get().persist_failed);
    let text = rotator.metrics.render(None);
    let failures: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("fresh_proxy_persist_failures_total "))
        .expect("the metric")
        .parse()
        .unwrap();
    assert!(failures >= rotated as f64, "{text}");
    // The config file and the state file were written; the bootstrap token in the sink's
    // readers' hands (the files as a whole) is left alive.
    assert!(setup.workspace.is_live(&setup.bootstrap));
    // Other tests share the log capture: count this test's lines only.
    let here = setup.config_file.display().to_string();
    let reports = logs()
        .lines()
        .filter(|l| l.contains("the new token cannot be saved") && l.contains(&here))
        .count();
    assert_eq!(reports, 1, "reported once");

    // Repaired: the next attempt saves the held token, and minting resumes its schedule.
    std::fs::write(&sink, "{}\n").unwrap();
    wait_until(DEADLINE, "persist_failed cleared", || async {
        !rotator.status.get().persist_failed
    })
    .await;
    wait_until(DEADLINE, "the sink holding the token in use", || async {
        let held = rotator.source.current().unwrap();
        let text = std::fs::read_to_string(&sink).unwrap();
        text.contains(held.expose_secret())
    })
    .await;
    assert!(logs().contains("the token is saved again"));
    rotator.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_token_is_replaced_by_one_found_in_the_config_file() {
    let setup = Setup::new().await;
    let rotator = Instance::launch(setup.config(600, 300_000, 500), None);
    rotator.wait_rotations(1).await;
    let rejected = rotator.source.current().unwrap();
    // Nothing newer anywhere: no token worth a retry.
    assert!(rotator.source.refresh(&rejected).await.is_none());

    // A person puts a new token in the profile.
    let pasted = setup.workspace.mint(Duration::from_secs(600));
    databrickscfg::update_profile(&setup.config_file, "DEFAULT", &[("token", &pasted.value)])
        .unwrap();
    let found = rotator.source.refresh(&rejected).await.expect("re-read");
    assert_eq!(found.expose_secret(), pasted.value);
    assert!(rotator.source.current().unwrap().same_secret(&found));
    rotator.stop().await;
}
