//! Client connections against the real binary: deadlines for request heads, the connection
//! limit and its reserve for health checks, the open-files limit, the Unix socket.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::binary::{ProxyProcess, command};
use common::fake_workspace::{FakeWorkspace, IssuedToken};
use common::{JsonBody, http_client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The proxy in follower mode for `ws`, following a config file that holds `pat`, run by
/// `cmd` (the binary, or a wrapper around it) with `env`.
async fn start(
    ws: &FakeWorkspace,
    pat: &IssuedToken,
    mut cmd: Command,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, ProxyProcess) {
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[DEFAULT]\nhost = {}\ntoken = {}\n", ws.url(), pat.value),
    )
    .unwrap();
    cmd.env("HOME", home.path())
        .env("PAT_ROTATION", "off")
        .envs(env.iter().copied());
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    (home, proxy)
}

/// The binary; [`start`] gives it its home.
fn binary() -> Command {
    command(Path::new("/nonexistent"))
}

/// One request on `stream` and the status of its answer, read up to the end of the head.
async fn status_on(stream: &mut TcpStream, request: &str) -> Option<u16> {
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&head);
    text.split_whitespace().nth(1)?.parse().ok()
}

/// `GET /health` on a new connection, within `limit`.
async fn health_within(url: &str, limit: Duration) -> u16 {
    let res = tokio::time::timeout(limit, http_client().get(format!("{url}/health")).send())
        .await
        .unwrap_or_else(|_| panic!("/health did not answer within {limit:?}"))
        .expect("/health answered");
    res.status().as_u16()
}

async fn chat(url: &str) -> reqwest::Response {
    http_client()
        .post(format!("{url}/chat/invocations"))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

/// Whether `stream` is closed by the other side within `limit`.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0) | Err(_)) => return true,
            // Whatever was answered, the connection must still end.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_request_heads_neither_slow_others_nor_stay_open() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(&ws, &pat, binary(), &[("PROXY_HEADER_TIMEOUT", "2")]).await;

    // 400 clients that start a request head and stall.
    let opened = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..400 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"POST /chat/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl")
            .await
            .unwrap();
        stalled.push(stream);
    }
    assert_eq!(
        health_within(&proxy.url(), Duration::from_secs(2)).await,
        200
    );
    let res = tokio::time::timeout(Duration::from_secs(5), chat(&proxy.url()))
        .await
        .expect("a chat request answered in time");
    assert_eq!(res.status(), 200);

    // Each stalled connection is closed once PROXY_HEADER_TIMEOUT has passed (bounded wait).
    let closing = stalled
        .iter_mut()
        .map(|stream| closed_within(stream, Duration::from_secs(15)));
    let closed = futures_util::future::join_all(closing).await;
    let still_open = closed.iter().filter(|closed| !**closed).count();
    assert_eq!(still_open, 0, "stalled heads left open");
    assert!(
        opened.elapsed() >= Duration::from_millis(1500),
        "closed by the header timeout, not at once"
    );
    assert_eq!(
        ws.stats().serving_ok,
        1,
        "only the chat request was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_outlives_the_header_timeout_until_the_idle_timeout() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(
        &ws,
        &pat,
        binary(),
        &[("PROXY_HEADER_TIMEOUT", "1"), ("PROXY_IDLE_TIMEOUT", "4")],
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let health = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";
    assert_eq!(status_on(&mut stream, health).await, Some(200));
    // Idle for twice the header timeout: still open, and serves the next request.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status_on(&mut stream, health).await, Some(200));
    // Then closed once the idle timeout passes.
    let waited = Instant::now();
    assert!(closed_within(&mut stream, Duration::from_secs(10)).await);
    assert!(
        waited.elapsed() >= Duration::from_secs(3),
        "closed after {:?}, before PROXY_IDLE_TIMEOUT",
        waited.elapsed()
    );
}

/// The listener tells HTTP/2 from HTTP/1 by a connection's first bytes: an HTTP/2 client with
/// prior knowledge is served in HTTP/2, and an HTTP/1 request whose first bytes look like the
/// start of HTTP/2's preface, sent a few bytes at a time, is still read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_clients_are_told_apart_by_their_first_bytes() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(&ws, &pat, binary(), &[]).await;
    let url = format!("http://{}", proxy.addr);

    common::install_crypto();
    let h2 = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let res = h2
        .post(format!("{url}/chat/invocations"))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.version(), reqwest::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    assert_eq!(ws.stats().serving_ok, 1);

    // "PRI" is where HTTP/2's preface and this request part ways.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    for part in ["P", "RI", " /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"] {
        stream.write_all(part.as_bytes()).await.unwrap();
        stream.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&head, b"HTTP/1.1 ", "{}", String::from_utf8_lossy(&head));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_limit_health_checks_are_answered_and_nothing_is_forwarded() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(&ws, &pat, binary(), &[("PROXY_MAX_CONNECTIONS", "20")]).await;
    // 20 kept-alive connections, each known to be accepted: it has been answered.
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
        let status = status_on(
            &mut stream,
            "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await;
        assert_eq!(status, Some(200));
        held.push(stream);
    }
    ws.reset_stats();
    assert_eq!(
        health_within(&proxy.url(), Duration::from_secs(5)).await,
        200
    );
    let res = http_client()
        .get(format!("{}/ready", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = chat(&proxy.url()).await;
    assert_eq!(res.status(), 503);
    assert_eq!(res.headers()["retry-after"], "1");
    let body: serde_json::Value = serde_json::from_str(&res.text().await.unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "too_many_connections");
    assert_eq!(
        ws.stats().requests,
        0,
        "nothing past the limit reached the workspace"
    );

    drop(held);
    common::wait_until(
        Duration::from_secs(10),
        "a chat request once connections closed",
        || async { chat(&proxy.url()).await.status() == 200 },
    )
    .await;
}

/// With only 256 open files allowed (as a low systemd default would), 400 idle connections
/// would exhaust them and leave `/health` unanswered; the proxy caps its connections to fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_files_limit_caps_connections_instead_of_running_out() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let mut cmd = Command::new("prlimit");
    cmd.env_clear()
        .stdin(std::process::Stdio::null())
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_fresh-proxy"));
    let (_home, proxy) = start(&ws, &pat, cmd, &[("PROXY_HEADER_TIMEOUT", "60")]).await;
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    // The reserve may be taken by idle connections for its 2 s head deadline: retry meanwhile.
    let url = proxy.url();
    common::wait_until(Duration::from_secs(8), "/health answered", || async {
        let res = http_client()
            .get(format!("{url}/health"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        res.is_ok_and(|res| res.status() == 200)
    })
    .await;
    let logs = proxy.logs();
    assert!(
        logs.contains("allows fewer client connections than PROXY_MAX_CONNECTIONS"),
        "{logs}"
    );
    assert!(!logs.contains("Too many open files"), "{logs}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unix_socket_is_private_and_serves() {
    use std::os::unix::fs::PermissionsExt;

    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("proxy.sock");
    let socket_text = socket.to_str().unwrap().to_owned();
    let (_home, proxy) = start(&ws, &pat, binary(), &[("PROXY_UNIX_SOCKET", &socket_text)]).await;
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut stream = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let request = format!(
        "POST /chat/invocations HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(ws.stats().serving_ok, 1);
    assert!(proxy.logs().contains("also listening on a Unix socket"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_key_comes_from_the_environment_and_never_reaches_the_logs() {
    let key = "fp-binary-client-key-55d1";
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(
        &ws,
        &pat,
        binary(),
        &[("PROXY_CLIENT_KEY", key), ("RUST_LOG", "trace")],
    )
    .await;
    let client = http_client();
    let url = format!("{}/chat/invocations", proxy.url());
    let body = json!({"messages": [{"role": "user", "content": "hi"}]});
    let res = client.post(&url).json_body(&body).send().await.unwrap();
    assert_eq!(res.status(), 401);
    let res = client
        .post(&url)
        .bearer_auth(key)
        .json_body(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let res = client
        .post(&url)
        .header("x-api-key", key)
        .json_body(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(ws.stats().serving_ok, 2);
    let logs = proxy.logs();
    assert!(!logs.contains(key), "the client key reached the logs");
    assert!(!logs.contains(&pat.value), "the token reached the logs");
}

#[test]
fn bad_client_settings_exit_with_2_and_name_the_variable() {
    let home = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str)] = &[
        ("PROXY_HEADER_TIMEOUT", "0"),
        ("PROXY_IDLE_TIMEOUT", "soon"),
        ("PROXY_MAX_CONNECTIONS", "0"),
        ("PROXY_ALLOWED_HOSTS", "http://proxy"),
        ("PROXY_CLIENT_KEY", "secret with spaces"),
    ];
    for (name, value) in cases {
        let mut cmd = command(home.path());
        cmd.env("DATABRICKS_HOST", "https://example.cloud.databricks.com")
            .env("DATABRICKS_TOKEN", "dapi-bootstrap-0001")
            .env(name, value);
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}={value}: {stderr}");
        assert!(stderr.contains(name), "{name}: {stderr}");
        assert!(
            !stderr.contains("secret with spaces"),
            "the key was printed: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_is_warned_about_once() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(&ws, &pat, binary(), &[]).await;
    assert!(!proxy.logs().contains("listening beyond loopback"));
    drop(proxy);

    // All interfaces; the test still talks to it over loopback only.
    let (_home, proxy) = start(&ws, &pat, binary(), &[("PROXY_HOST", "0.0.0.0")]).await;
    let url = format!("http://127.0.0.1:{}", proxy.addr.port());
    assert_eq!(health_within(&url, Duration::from_secs(5)).await, 200);
    let logs = proxy.logs();
    assert_eq!(
        logs.matches("listening beyond loopback").count(),
        1,
        "{logs}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_body_that_pauses_past_the_header_timeout_is_refused_and_not_forwarded() {
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let (_home, proxy) = start(&ws, &pat, binary(), &[("PROXY_HEADER_TIMEOUT", "1")]).await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let started = Instant::now();
    let status = status_on(
        &mut stream,
        "POST /chat/invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"messages\":",
    );
    let status = tokio::time::timeout(Duration::from_secs(10), status)
        .await
        .expect("an answer once the body paused too long");
    assert_eq!(status, Some(400));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(ws.stats().requests, 0, "a partial body was forwarded");
}

/// The config file's `token` of the `DEFAULT` profile.
fn file_token(home: &Path) -> Option<String> {
    let text = std::fs::read_to_string(home.join(".databrickscfg")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("token = "))
        .map(str::to_owned)
}

/// The issue seen in the field: idle connections took every descriptor, and the rotation could
/// no longer write its files. With the connection limit fitted to the open-files limit, the
/// rotation goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_few_open_files_and_many_idle_connections_the_rotation_still_writes_its_files() {
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[DEFAULT]\nhost = {}\n", ws.url()),
    )
    .unwrap();
    let mut cmd = Command::new("prlimit");
    cmd.env_clear()
        .stdin(std::process::Stdio::null())
        .arg("--nofile=256:256")
        .arg(env!("CARGO_BIN_EXE_fresh-proxy"))
        .env("HOME", home.path())
        .env("DATABRICKS_TOKEN", &pat.value)
        // The host is in the profile: name it, as the SDKs' precedence asks.
        .env("DATABRICKS_CONFIG_PROFILE", "DEFAULT")
        .env("PAT_TOKEN_LIFETIME", "60")
        .env("PAT_ROTATION_INTERVAL", "2")
        .env("PAT_REVOKE_GRACE", "1")
        .env("PROXY_HEADER_TIMEOUT", "60");
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    // A proxied request makes the session active, so the rotator rotates every 2 s.
    assert_eq!(chat(&proxy.url()).await.status(), 200);

    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(TcpStream::connect(proxy.addr).await.unwrap());
    }
    let before = file_token(home.path());
    let creates = ws.stats().creates;
    common::wait_until(
        Duration::from_secs(20),
        "a rotation written to the config file",
        || {
            let changed = file_token(home.path()) != before;
            let minted = ws.stats().creates > creates;
            async move { changed && minted }
        },
    )
    .await;
    let logs = proxy.logs();
    assert!(!logs.contains("Too many open files"), "{logs}");
    drop(idle);
}
