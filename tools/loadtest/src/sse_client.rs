//! The SSE scale run's client: many concurrent streams, each one checked to the end.
//!
//! All connections are opened first and the requests go out together, so that the streams
//! overlap however long it takes to open them.
//!
//! A stream counts as completed when it answered 200 with `text/event-stream`, every `data:`
//! event holds one JSON document, the expected number of them arrived, and the body ends with
//! `data: [DONE]` and nothing after it.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Args;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

#[derive(Debug, Args)]
pub(crate) struct SseArgs {
    /// `http://127.0.0.1:PORT/path` of the proxy.
    #[arg(long)]
    url: String,
    /// The chat request; its top-level `"stream": false` is sent as `"stream": true`.
    #[arg(long)]
    body: std::path::PathBuf,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1000)]
    streams: usize,
    /// Data events each stream must carry before `[DONE]`.
    #[arg(long, default_value_t = 10)]
    events: usize,
    /// Give up on streams still open after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
    /// Tokio worker threads.
    #[arg(long, default_value_t = 1)]
    pub(crate) threads: usize,
}

#[derive(Debug)]
enum Outcome {
    Completed {
        first_event: Duration,
        total: Duration,
    },
    Failed(String),
}

/// Streams open right now and the most that were open at once.
#[derive(Debug, Default)]
struct OpenStreams {
    now: AtomicU64,
    peak: AtomicU64,
}

impl OpenStreams {
    fn opened(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    fn closed(&self) {
        self.now.fetch_sub(1, Ordering::Relaxed);
    }
}

pub(crate) async fn run(args: SseArgs) -> ExitCode {
    let target = match Target::parse(&args.url) {
        Ok(target) => Arc::new(target),
        Err(why) => {
            eprintln!("loadtest sse: --url {}: {why}", args.url);
            return ExitCode::from(2);
        }
    };
    let body = match std::fs::read(&args.body)
        .map_err(|e| e.to_string())
        .and_then(streaming)
    {
        Ok(body) => body,
        Err(why) => {
            eprintln!("loadtest sse: --body {}: {why}", args.body.display());
            return ExitCode::from(2);
        }
    };

    let open = Arc::new(OpenStreams::default());
    let all_connected = Arc::new(Barrier::new(args.streams));
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..args.streams {
        let (target, body, open) = (target.clone(), body.clone(), open.clone());
        let all_connected = all_connected.clone();
        tasks.spawn(async move {
            let connection = connect(&target).await;
            all_connected.wait().await;
            match connection {
                Ok(sender) => one_stream(sender, &target, body, &open, args.events).await,
                Err(why) => Outcome::Failed(why),
            }
        });
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_secs);
    let mut outcomes = Vec::with_capacity(args.streams);
    while !tasks.is_empty() {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(Some(Ok(outcome))) => outcomes.push(outcome),
            Ok(Some(Err(err))) => outcomes.push(Outcome::Failed(format!("task: {err}"))),
            Ok(None) => break,
            Err(_) => {
                let left = tasks.len();
                tasks.abort_all();
                outcomes.extend((0..left).map(|_| Outcome::Failed("timed out".to_owned())));
                break;
            }
        }
    }
    let elapsed = started.elapsed();

    let mut first_events = Vec::new();
    let mut totals = Vec::new();
    let mut failures = Vec::new();
    for outcome in outcomes {
        match outcome {
            Outcome::Completed { first_event, total } => {
                first_events.push(first_event);
                totals.push(total);
            }
            Outcome::Failed(why) => failures.push(why),
        }
    }
    first_events.sort_unstable();
    totals.sort_unstable();
    println!(
        "SSE streams={} completed={} dropped={} peak_open={} elapsed_ms={} first_event_p50_ms={:.1} first_event_p99_ms={:.1} stream_p50_ms={:.1} stream_p99_ms={:.1}",
        args.streams,
        totals.len(),
        failures.len(),
        open.peak.load(Ordering::Relaxed),
        elapsed.as_millis(),
        millis(percentile(&first_events, 50)),
        millis(percentile(&first_events, 99)),
        millis(percentile(&totals, 50)),
        millis(percentile(&totals, 99)),
    );
    failures.sort_unstable();
    failures.dedup();
    for why in failures.iter().take(5) {
        println!("SSE failure: {why}");
    }
    if totals.len() == args.streams {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Where the streams go.
#[derive(Debug)]
struct Target {
    address: String,
    host: http::HeaderValue,
    path: String,
}

impl Target {
    fn parse(url: &str) -> Result<Self, &'static str> {
        let uri: Uri = url.parse().map_err(|_| "not a URL")?;
        if uri.scheme_str() != Some("http") {
            return Err("only http:// is supported");
        }
        let authority = uri.authority().ok_or("no host")?;
        if !matches!(authority.host(), "127.0.0.1" | "localhost") {
            return Err("the harness sends load to loopback addresses only");
        }
        let port = authority.port_u16().ok_or("no port")?;
        Ok(Self {
            address: format!("127.0.0.1:{port}"),
            host: http::HeaderValue::from_str(authority.as_str()).map_err(|_| "bad host")?,
            path: uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
        })
    }
}

/// The request body with its top-level `"stream": false` turned into `true`.
fn streaming(body: Vec<u8>) -> Result<Bytes, String> {
    let text = String::from_utf8(body).map_err(|_| "not UTF-8".to_owned())?;
    for (from, to) in [
        (r#""stream": false"#, r#""stream": true"#),
        (r#""stream":false"#, r#""stream":true"#),
    ] {
        if text.contains(from) {
            return Ok(Bytes::from(text.replacen(from, to, 1)));
        }
    }
    Err(r#"has no "stream": false to turn on"#.to_owned())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> Result<Sender, String> {
    let socket = TcpStream::connect(&target.address)
        .await
        .map_err(|err| format!("connect: {err}"))?;
    let _ = socket.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(socket))
        .await
        .map_err(|err| format!("handshake: {err}"))?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One request on an open connection, read to the end. Times count from sending the request.
async fn one_stream(
    mut sender: Sender,
    target: &Target,
    body: Bytes,
    open: &OpenStreams,
    events: usize,
) -> Outcome {
    let started = Instant::now();
    let request = Request::post(target.path.as_str())
        .header(HOST, target.host.clone())
        .header(CONTENT_TYPE, "application/json")
        .header(ACCEPT, "text/event-stream")
        .header(AUTHORIZATION, "Bearer client-supplied-token")
        .body(Full::new(body))
        .expect("a valid request");
    let mut response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(err) => return Outcome::Failed(format!("request: {err}")),
    };
    if response.status() != StatusCode::OK {
        return Outcome::Failed(format!("status {}", response.status()));
    }
    let is_sse = response
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    if !is_sse {
        return Outcome::Failed("not text/event-stream".to_owned());
    }
    open.opened();
    let mut received = Vec::new();
    let mut first_event = None;
    let read = loop {
        match response.body_mut().frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    first_event.get_or_insert_with(|| started.elapsed());
                    received.extend_from_slice(&data);
                }
            }
            Some(Err(err)) => break Err(format!("body: {err}")),
            None => break Ok(()),
        }
    };
    open.closed();
    let total = started.elapsed();
    if let Err(why) = read.and_then(|()| check_events(&received, events)) {
        return Outcome::Failed(why);
    }
    Outcome::Completed {
        first_event: first_event.unwrap_or(total),
        total,
    }
}

/// `events` JSON data events, then `[DONE]` as the very last thing.
fn check_events(body: &[u8], events: usize) -> Result<(), String> {
    let text = std::str::from_utf8(body).map_err(|_| "stream is not UTF-8".to_owned())?;
    if !text.ends_with("data: [DONE]\n\n") {
        return Err("stream did not end with data: [DONE]".to_owned());
    }
    let mut data_events = 0;
    for event in text.split("\n\n").filter(|e| !e.trim().is_empty()) {
        let data: String = event
            .lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect::<Vec<_>>()
            .join("\n");
        if data.is_empty() || data == "[DONE]" {
            continue;
        }
        if !matches!(
            serde_json::from_str(&data),
            Ok(serde_json::Value::Object(_))
        ) {
            return Err(format!("event is not one JSON document: {data:.80}"));
        }
        data_events += 1;
    }
    if data_events != events {
        return Err(format!("{data_events} data events, expected {events}"));
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) * p).div_ceil(100)]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
