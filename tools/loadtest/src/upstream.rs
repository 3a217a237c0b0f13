//! The fake upstream: as fast as a model endpoint can be, so that what the load measures is the
//! proxy in front of it.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// How each SSE answer is paced.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SseShape {
    /// Data events, the last one with `finish_reason: "stop"`; `[DONE]` follows.
    pub(crate) events: u32,
    /// Pause before each event after the first, and before `[DONE]`.
    pub(crate) interval: Duration,
}

const COMPLETION: &str = r#"{"id":"chatcmpl-load","object":"chat.completion","created":1700000000,"model":"databricks-claude-sonnet-4","choices":[{"index":0,"message":{"role":"assistant","content":"The default port changed from 4000 to 8080 in the last commit; I restored it and the config tests pass again."},"finish_reason":"stop"}],"usage":{"prompt_tokens":1024,"completion_tokens":27,"total_tokens":1051}}"#;

/// Counters served at `GET /__stats`.
#[derive(Debug, Default)]
struct Stats {
    requests: AtomicU64,
    request_bytes: AtomicU64,
    sse_started: AtomicU64,
    sse_finished: AtomicU64,
    sse_active: AtomicU64,
    sse_peak: AtomicU64,
}

impl Stats {
    fn json(&self) -> String {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            r#"{{"requests":{},"request_bytes":{},"sse_started":{},"sse_finished":{},"sse_active":{},"sse_peak":{}}}"#,
            get(&self.requests),
            get(&self.request_bytes),
            get(&self.sse_started),
            get(&self.sse_finished),
            get(&self.sse_active),
            get(&self.sse_peak),
        )
    }
}

/// Counts a stream as active until dropped, also when the client goes away mid-stream.
#[derive(Debug)]
struct ActiveStream(Arc<Stats>);

impl ActiveStream {
    fn start(stats: Arc<Stats>) -> Self {
        stats.sse_started.fetch_add(1, Ordering::Relaxed);
        let active = stats.sse_active.fetch_add(1, Ordering::Relaxed) + 1;
        stats.sse_peak.fetch_max(active, Ordering::Relaxed);
        Self(stats)
    }
}

impl Drop for ActiveStream {
    fn drop(&mut self) {
        self.0.sse_active.fetch_sub(1, Ordering::Relaxed);
    }
}

type Body = BoxBody<Bytes, Infallible>;

pub(crate) async fn serve(listener: TcpListener, sse: SseShape) -> std::io::Result<()> {
    let stats = Arc::new(Stats::default());
    loop {
        let (socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(req, stats.clone(), sse));
            // Clients that hang up mid-stream are part of the test, not an error here.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    stats: Arc<Stats>,
    sse: SseShape,
) -> Result<Response<Body>, hyper::Error> {
    if req.method() == Method::GET && req.uri().path() == "/__stats" {
        return Ok(json(StatusCode::OK, Bytes::from(stats.json())));
    }
    let body = req.into_body().collect().await?.to_bytes();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats
        .request_bytes
        .fetch_add(body.len() as u64, Ordering::Relaxed);
    if wants_stream(&body) {
        Ok(event_stream(ActiveStream::start(stats), sse))
    } else {
        Ok(json(
            StatusCode::OK,
            Bytes::from_static(COMPLETION.as_bytes()),
        ))
    }
}

/// `"stream": true` at any depth is good enough for a fake: the harness sends it top level.
fn wants_stream(body: &[u8]) -> bool {
    let text = String::from_utf8_lossy(body);
    text.contains(r#""stream":true"#) || text.contains(r#""stream": true"#)
}

fn json(status: StatusCode, body: Bytes) -> Response<Body> {
    let mut res = Response::new(Full::new(body).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

fn chunk(index: u32, last: bool) -> Bytes {
    let (delta, finish) = match (index, last) {
        (0, _) => (r#"{"role":"assistant","content":""}"#.to_owned(), "null"),
        (_, false) => (format!(r#"{{"content":"word{index} "}}"#), "null"),
        (_, true) => ("{}".to_owned(), r#""stop""#),
    };
    Bytes::from(
        format!(
            r#"data: {{"id":"chatcmpl-load","object":"chat.completion.chunk","created":1700000000,"model":"databricks-claude-sonnet-4","choices":[{{"index":0,"delta":{delta},"finish_reason":{finish}}}]}}"#
        ) + "\n\n",
    )
}

fn event_stream(active: ActiveStream, sse: SseShape) -> Response<Body> {
    let events = stream::unfold((0u32, Some(active)), move |(index, active)| async move {
        let active = active?;
        if index > 0 {
            tokio::time::sleep(sse.interval).await;
        }
        if index < sse.events {
            let frame = Frame::data(chunk(index, index + 1 == sse.events));
            return Some((Ok(frame), (index + 1, Some(active))));
        }
        active.0.sse_finished.fetch_add(1, Ordering::Relaxed);
        // Dropping `active` after [DONE] ends the stream.
        Some((
            Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))),
            (index + 1, None),
        ))
    });
    let mut res = Response::new(BodyExt::boxed(StreamBody::new(events)));
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    res.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-cache"));
    res
}
