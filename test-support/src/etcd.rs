//! A real etcd for tests, and the process signals that fleet tests send to the proxies they run.
//!
//! [`EtcdServer::start`] runs the system's `etcd` (Debian's `etcd-server` package) as a
//! single-member cluster on two free loopback ports with a fresh data directory, and returns
//! once the member answers healthy. It can be stopped, killed and started again on the same
//! ports and data, so a test can take etcd away from a running fleet and give it back.
//!
//! A fleet test that cannot find etcd fails: it must not pass without having run. `.ci/run`
//! installs the package.
//!
//! Everything here blocks (std processes and sockets): call it from a plain `#[test]`, or from
//! `tokio::task::spawn_blocking` where the runtime must keep running.
//!
//! ```no_run
//! use fresh_test_support::etcd::EtcdServer;
//!
//! let mut etcd = EtcdServer::start();
//! etcd.put("fleet/token", b"record");
//! etcd.restart();
//! assert_eq!(etcd.get("fleet/token").as_deref(), Some(&b"record"[..]));
//! println!("PAT_ETCD_ENDPOINTS={}", etcd.endpoint());
//! ```

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustix::process::{Pid, Signal};
use serde_json::{Value, json};
use tempfile::TempDir;

/// How long a start may take before the test fails with etcd's log. A busy machine makes etcd
/// slow to elect itself, never this slow.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long etcd may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Fresh ports are taken by binding port 0 and releasing it, so another process can take them
/// before etcd binds them: such a start is retried, on other ports for a first start.
const START_ATTEMPTS: u32 = 5;
/// Bytes of etcd's log shown when a start fails.
const LOG_TAIL: usize = 4000;

/// A single-member etcd on loopback, killed when dropped.
#[derive(Debug)]
pub struct EtcdServer {
    /// Holds the data directory and the log file; removed on drop.
    dir: TempDir,
    /// The member name, unique per server, so a start can tell its own etcd from another one
    /// that took the port.
    name: String,
    client_port: u16,
    peer_port: u16,
    /// A second client listener with TLS, for [`EtcdServer::start_with_tls`].
    tls: Option<(u16, TlsFiles)>,
    child: Option<Child>,
}

/// PEM files for etcd's TLS client listener: its certificate and key, and the CA that client
/// certificates must be signed by (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// The server certificate (with `127.0.0.1` among its names).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA of client certificates.
    pub client_ca: PathBuf,
}

impl EtcdServer {
    /// Starts etcd on two free loopback ports with an empty data directory, and waits until it
    /// is healthy. Leases may be as short as 1 s.
    ///
    /// # Panics
    ///
    /// When `etcd` is not installed, or does not become healthy within 20 s (its log's tail is
    /// in the message).
    pub fn start() -> Self {
        Self::start_inner(None)
    }

    /// [`start`](Self::start), with a second client listener on another free port that speaks
    /// TLS with `tls` and accepts only clients with a certificate signed by its client CA:
    /// [`tls_endpoint`](Self::tls_endpoint). The plain listener stays, for the test's own
    /// reads and health checks.
    pub fn start_with_tls(tls: TlsFiles) -> Self {
        Self::start_inner(Some(tls))
    }

    fn start_inner(tls: Option<TlsFiles>) -> Self {
        let binary = etcd_binary();
        let dir = tempfile::Builder::new()
            .prefix("etcd-test-")
            .tempdir()
            .expect("create etcd's temp dir");
        static STARTED: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "test-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::Relaxed)
        );
        let (client_port, peer_port) = free_ports();
        let mut server = Self {
            dir,
            name,
            client_port,
            peer_port,
            tls: tls.map(|files| (free_ports().0, files)),
            child: None,
        };
        for attempt in 1..=START_ATTEMPTS {
            match server.launch(&binary) {
                Ok(()) => return server,
                Err(Failure::PortTaken(log)) if attempt < START_ATTEMPTS => {
                    eprintln!("etcd: a port was taken, trying others:\n{log}");
                    // The member directory names the old ports: start over from nothing.
                    let _ = std::fs::remove_dir_all(server.data_dir());
                    (server.client_port, server.peer_port) = free_ports();
                    if let Some((port, _)) = &mut server.tls {
                        *port = free_ports().0;
                    }
                }
                Err(Failure::PortTaken(log) | Failure::Other(log)) => {
                    panic!("etcd did not start:\n{log}")
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Starts etcd again after [`stop`](Self::stop) or [`kill`](Self::kill), on the same ports
    /// and the same data directory, so every key written before is there; waits until healthy.
    ///
    /// # Panics
    ///
    /// When etcd is still running, or does not become healthy within 20 s.
    pub fn start_again(&mut self) {
        assert!(
            self.child.is_none(),
            "etcd is still running: stop or kill it first"
        );
        let binary = etcd_binary();
        for attempt in 1..=START_ATTEMPTS {
            match self.launch(&binary) {
                Ok(()) => return,
                // The ports are fixed now: wait for whoever holds one to let it go.
                Err(Failure::PortTaken(_)) if attempt < START_ATTEMPTS => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(Failure::PortTaken(log) | Failure::Other(log)) => {
                    panic!("etcd did not start again on {}:\n{log}", self.endpoint())
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// [`stop`](Self::stop), then [`start_again`](Self::start_again).
    pub fn restart(&mut self) {
        self.stop();
        self.start_again();
    }

    /// Stops etcd with SIGTERM, as an operator would, and waits for it to exit (SIGKILL after
    /// 10 s). Does nothing when it is not running.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        signal(child.id(), Signal::TERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait().expect("wait for etcd").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }

    /// Kills etcd with SIGKILL, as a crash would, and waits for it to exit. Does nothing when it
    /// is not running.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `http://127.0.0.1:PORT`, the client URL: a value for `PAT_ETCD_ENDPOINTS`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.client_addr())
    }

    /// `https://127.0.0.1:PORT`, the TLS client URL of [`start_with_tls`](Self::start_with_tls).
    ///
    /// # Panics
    ///
    /// When the server was started without TLS.
    pub fn tls_endpoint(&self) -> String {
        let (port, _) = self.tls.as_ref().expect("started with TLS");
        format!("https://127.0.0.1:{port}")
    }

    /// The client address.
    pub fn client_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.client_port))
    }

    /// etcd's process id while it runs, for [`pause`] and [`resume`].
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data directory, kept across [`start_again`](Self::start_again).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// etcd's stdout and stderr, across every start.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// Writes `key` = `value` through etcd's JSON gateway.
    ///
    /// # Panics
    ///
    /// When etcd does not accept the write.
    pub fn put(&self, key: &str, value: &[u8]) {
        self.call(
            "/v3/kv/put",
            &json!({"key": BASE64.encode(key), "value": BASE64.encode(value)}),
        );
    }

    /// The value of `key`, or `None` when it is not set.
    ///
    /// # Panics
    ///
    /// When etcd does not answer.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let answer = self.call("/v3/kv/range", &json!({"key": BASE64.encode(key)}));
        values(&answer).into_iter().next().map(|(_, value)| value)
    }

    /// Every key under `prefix` with its value, in key order.
    ///
    /// # Panics
    ///
    /// When etcd does not answer.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let answer = self.call(
            "/v3/kv/range",
            &json!({
                "key": BASE64.encode(prefix),
                "range_end": BASE64.encode(prefix_end(prefix.as_bytes())),
            }),
        );
        values(&answer)
    }

    /// A POST to the gateway that must answer 200 with JSON.
    fn call(&self, path: &str, body: &Value) -> Value {
        let (status, answer) = http(self.client_addr(), "POST", path, &body.to_string())
            .unwrap_or_else(|e| panic!("POST {path} to etcd at {}: {e}", self.endpoint()));
        assert_eq!(status, 200, "POST {path} to etcd: {answer}");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("etcd's answer {answer}: {e}"))
    }

    /// Spawns etcd and waits until this member answers healthy. On failure the process is gone
    /// and the error holds the log's tail.
    fn launch(&mut self, binary: &Path) -> Result<(), Failure> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open etcd's log file");
        let logged_before = log.metadata().map_or(0, |meta| meta.len());
        let client = self.endpoint();
        let listen = match &self.tls {
            Some((port, _)) => format!("{client},https://127.0.0.1:{port}"),
            None => client.clone(),
        };
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(binary);
        command
            .arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args(["--listen-client-urls", &listen])
            .args(["--advertise-client-urls", &listen])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("{}={peer}", self.name)])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", &self.name])
            // Half the default raft timings, which a single member can afford: etcd's shortest
            // lease (one and a half election timeouts, rounded up to whole seconds) becomes 1 s
            // instead of 2 s, so a fleet test can let a leader's lease run out quickly.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-level", "error"])
            .args(["--log-outputs", "stderr"])
            // etcd reads every ETCD_* variable as a flag: none from the test's environment.
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone etcd's log file"))
            .stderr(log);
        if let Some((_, files)) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&files.cert)
                .arg("--key-file")
                .arg(&files.key)
                .arg("--trusted-ca-file")
                .arg(&files.client_ca)
                .arg("--client-cert-auth");
        }
        // etcd 3.4 refuses to run on arm64 unless told that it may.
        if cfg!(target_arch = "aarch64") {
            command.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("wait for etcd") {
                let message = format!(
                    "etcd exited with {status}; the end of {}:\n{}",
                    self.log_path().display(),
                    self.log_tail()
                );
                // Only this start's lines: an earlier clash in the log says nothing now.
                let log = std::fs::read(self.log_path()).unwrap_or_default();
                let this_start = usize::try_from(logged_before)
                    .ok()
                    .and_then(|from| log.get(from..))
                    .unwrap_or_default();
                let port_taken =
                    String::from_utf8_lossy(this_start).contains("address already in use");
                return Err(if port_taken {
                    Failure::PortTaken(message)
                } else {
                    Failure::Other(message)
                });
            }
            if self.is_healthy_member() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::Other(format!(
                    "etcd was not healthy on {client} after {START_TIMEOUT:?}; the end of {}:\n{}",
                    self.log_path().display(),
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `/health` says so, and the member answering is this one and not another etcd
    /// that took the port first.
    fn is_healthy_member(&self) -> bool {
        let healthy = http(self.client_addr(), "GET", "/health", "")
            .ok()
            .filter(|(status, _)| *status == 200)
            .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
            .is_some_and(|health| health["health"] == "true");
        healthy
            && http(self.client_addr(), "POST", "/v3/cluster/member/list", "{}")
                .ok()
                .and_then(|(_, body)| serde_json::from_str::<Value>(&body).ok())
                .is_some_and(|list| {
                    list["members"]
                        .as_array()
                        .is_some_and(|members| members.iter().any(|m| m["name"] == *self.name))
                })
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let start = text.len().saturating_sub(LOG_TAIL);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }
}

/// Why a start failed, with the log's tail.
enum Failure {
    /// Another process bound a port first: another attempt may succeed.
    PortTaken(String),
    Other(String),
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Stops process `pid` with SIGSTOP: it holds its sockets and leases but runs no code, as a
/// host cut off by a partition or frozen by a long pause would.
///
/// # Panics
///
/// When the signal cannot be sent (no such process).
pub fn pause(pid: u32) {
    signal(pid, Signal::STOP);
}

/// Lets a process stopped by [`pause`] run again (SIGCONT).
///
/// # Panics
///
/// When the signal cannot be sent (no such process).
pub fn resume(pid: u32) {
    signal(pid, Signal::CONT);
}

/// Kills process `pid` with SIGKILL, as a crash would: no shutdown code runs. The parent still
/// reaps it (`Child::wait`, or the drop of the test's process handle).
///
/// # Panics
///
/// When the signal cannot be sent (no such process).
pub fn kill9(pid: u32) {
    signal(pid, Signal::KILL);
}

/// Asks process `pid` to shut down with SIGTERM.
///
/// # Panics
///
/// When the signal cannot be sent (no such process).
pub fn terminate(pid: u32) {
    signal(pid, Signal::TERM);
}

fn signal(pid: u32, signal: Signal) {
    let target = i32::try_from(pid)
        .ok()
        .and_then(Pid::from_raw)
        .unwrap_or_else(|| panic!("{pid} is not a process id"));
    rustix::process::kill_process(target, signal)
        .unwrap_or_else(|e| panic!("send {signal:?} to process {pid}: {e}"));
}

/// The `etcd` on `PATH`.
fn etcd_binary() -> PathBuf {
    find_in_path("etcd", &std::env::var_os("PATH").unwrap_or_default()).unwrap_or_else(|| {
        panic!(
            "etcd is not installed: the fleet tests run a real etcd. Install it with \
             `apt-get install etcd-server` (Debian, Ubuntu), as .ci/run does"
        )
    })
}

/// The first executable file called `name` in the directories of `path`, as a shell finds it.
fn find_in_path(name: &str, path: &std::ffi::OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
}

/// Two distinct free loopback ports: both are bound at once, so they differ, then released.
fn free_ports() -> (u16, u16) {
    let bind = || TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    let (client, peer) = (bind(), bind());
    let port = |listener: &TcpListener| listener.local_addr().expect("local address").port();
    (port(&client), port(&peer))
}

/// One HTTP/1.0 request, so the answer is neither chunked nor kept alive: `(status, body)`.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, answer.clone());
    let (head, body) = answer.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok((status, body.to_owned()))
}

/// The `(key, value)` pairs of a range answer. The gateway leaves out empty fields, so an empty
/// value has no `value`.
fn values(answer: &Value) -> Vec<(String, Vec<u8>)> {
    let decode = |field: &Value| {
        BASE64
            .decode(field.as_str().unwrap_or_default())
            .unwrap_or_else(|e| panic!("etcd's base64 {field}: {e}"))
    };
    answer["kvs"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|kv| {
            let key = String::from_utf8(decode(&kv["key"])).expect("keys written as text");
            (key, decode(&kv["value"]))
        })
        .collect()
}

/// The smallest key after every key that starts with `prefix`: the prefix with its last byte
/// below 0xff incremented, as etcd's clients compute a prefix range.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte is 0xff (or the prefix is empty): "\0" asks for every key to the end.
    vec![0]
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::{find_in_path, prefix_end};

    #[test]
    fn etcd_is_found_only_as_an_executable_file_on_the_path() {
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let [not_executable, directory, executable] = [0, 1, 2].map(|i| dirs[i].path());
        std::fs::write(not_executable.join("etcd"), "").unwrap();
        std::fs::create_dir(directory.join("etcd")).unwrap();
        let binary = executable.join("etcd");
        std::fs::write(&binary, "").unwrap();
        std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();

        let path = |dirs: &[&std::path::Path]| std::env::join_paths(dirs).unwrap();
        assert_eq!(
            find_in_path("etcd", &path(&[not_executable, directory])),
            None
        );
        assert_eq!(
            find_in_path("etcd", &path(&[not_executable, directory, executable])),
            Some(binary)
        );
        assert_eq!(find_in_path("etcd", &path(&[])), None);
    }

    #[test]
    fn prefix_end_is_the_next_key_after_the_prefix() {
        for (prefix, end) in [
            (&b"fleet/"[..], &b"fleet0"[..]),
            (b"a", b"b"),
            (b"a\xff", b"b"),
            (b"\xff\xff", b"\0"),
            (b"", b"\0"),
        ] {
            assert_eq!(prefix_end(prefix), end, "{prefix:?}");
        }
    }
}
