//! Test support for fresh-proxy's crates: a fake Databricks workspace on `127.0.0.1:0`
//! ([`fake_workspace`]), log capture that lets a test assert no secret was logged ([`logs`]),
//! a real etcd and process signals for the fleet tests (`etcd`, Unix only), and small HTTP
//! helpers for talking to local test servers.
//!
//! A dev-dependency only: nothing here ships in the proxy.

// A fake server answers early with `Err(Response)`; `missing_docs` is not asked of test code.
#![allow(clippy::result_large_err)]

#[cfg(unix)]
pub mod etcd;
pub mod fake_workspace;
pub mod logs;

use std::future::Future;
use std::time::{Duration, Instant};

/// Installs the ring crypto provider that reqwest (built without a default provider) needs.
/// Idempotent.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A reqwest client for talking to local test servers: crypto installed, no proxy from the
/// environment, and every request bounded in time.
pub fn http_client() -> reqwest::Client {
    install_crypto();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("build a reqwest client")
}

/// The body of `GET url` as text, with [`http_client`]; panics if the request fails.
pub async fn get_text(url: impl reqwest::IntoUrl) -> String {
    http_client()
        .get(url)
        .send()
        .await
        .expect("send a GET")
        .text()
        .await
        .expect("read the answer")
}

/// `RequestBuilder::json` for reqwest built without its `json` feature.
pub trait JsonBody {
    /// Sends `body` as `application/json`.
    fn json_body(self, body: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, body: &serde_json::Value) -> Self {
        self.header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens the fake workspace's `slow-stream` (`events` events `delay_ms` apart) through the proxy
/// at `proxy_url`, and returns it once its first event, "part 0", has arrived.
pub async fn open_slow_stream(proxy_url: &str, delay_ms: u64, events: u32) -> SseReader {
    let res = http_client()
        .post(format!(
            "{proxy_url}/slow-stream/invocations?delay_ms={delay_ms}&events={events}"
        ))
        .json_body(
            &serde_json::json!({"messages": [{"role": "user", "content": "hi"}], "stream": true}),
        )
        .send()
        .await
        .unwrap();
    let mut stream = SseReader::new(res);
    assert!(stream.next_data().await.unwrap().contains("part 0"));
    stream
}

/// Reads a server-sent-event response one event at a time, as the bytes arrive.
#[derive(Debug)]
pub struct SseReader {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl SseReader {
    /// Wraps a response whose body is an event stream.
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The `data` of the next event (several `data:` lines joined with `\n`), or `None` at
    /// the end of the body. Events without data lines are skipped.
    pub async fn next_data(&mut self) -> Option<String> {
        loop {
            if let Some(data) = self.take_event() {
                return Some(data);
            }
            match self.response.chunk().await.expect("read the event stream") {
                // Lines may end in CRLF; JSON data never holds a raw CR.
                Some(chunk) => self
                    .buffer
                    .extend(chunk.iter().copied().filter(|&byte| byte != b'\r')),
                None => {
                    let rest = std::mem::take(&mut self.buffer);
                    assert!(
                        rest.iter().all(u8::is_ascii_whitespace),
                        "event stream ended inside an event: {:?}",
                        String::from_utf8_lossy(&rest)
                    );
                    return None;
                }
            }
        }
    }

    /// Every remaining event's data, to the end of the body.
    pub async fn collect_data(mut self) -> Vec<String> {
        let mut events = Vec::new();
        while let Some(data) = self.next_data().await {
            events.push(data);
        }
        events
    }

    fn take_event(&mut self) -> Option<String> {
        loop {
            let end = self.buffer.windows(2).position(|pair| pair == b"\n\n")?;
            let event: Vec<u8> = self.buffer.drain(..end + 2).collect();
            let event = String::from_utf8(event).expect("event stream is UTF-8");
            let data: Vec<&str> = event
                .lines()
                .filter_map(|line| line.strip_prefix("data:"))
                .map(|value| value.strip_prefix(' ').unwrap_or(value))
                .collect();
            if !data.is_empty() {
                return Some(data.join("\n"));
            }
        }
    }
}
