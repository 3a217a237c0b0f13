//! Relaying the upstream answer: SSE streams through the rewriter, JSON bodies through the
//! response fixer, everything else streamed as it is.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;

use super::agent::Agent;
use super::client::{BoxError, UpstreamBody};
use super::describe_error;
use super::error::ProxyError;
use super::headers::client_response_headers;
use crate::health::metrics::Metrics;
use fresh_filter::{
    self as filter, FilterReport, Mode, SseLimits, SseRewriter, ToolContext, UsageScanner,
};

/// JSON bodies up to this size are read whole and fixed; larger ones stream through unchanged.
const MAX_FIXED_JSON: usize = 16 * 1024 * 1024;

type UpstreamStream = BoxStream<'static, Result<Bytes, BodyError>>;

/// Why the upstream body ended early.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// The connection or the body's encoding failed.
    #[error("{}", describe_error(&**.0))]
    Broke(BoxError),
    /// Nothing arrived for this long.
    #[error("nothing arrived for {} s", .0.as_secs())]
    Stalled(Duration),
}

/// The upstream body, ended with [`BodyError::Stalled`] when nothing arrives for `idle`: a
/// stream may run for hours, but one that has gone silent for that long is dead, and holding
/// it would hold the agent (and a shutdown) with it.
fn body_stream(upstream: http::Response<UpstreamBody>, idle: Duration) -> UpstreamStream {
    idle_limited(chunks(upstream), idle)
}

/// The upstream body's data, chunk by chunk.
fn chunks(upstream: http::Response<UpstreamBody>) -> UpstreamStream {
    upstream
        .into_body()
        .into_data_stream()
        .map_err(BodyError::Broke)
        .boxed()
}

/// `chunks`, ended with [`BodyError::Stalled`] when nothing arrives for `idle`.
fn idle_limited(chunks: UpstreamStream, idle: Duration) -> UpstreamStream {
    stream::unfold(Some(chunks), move |chunks| async move {
        let mut chunks = chunks?;
        match tokio::time::timeout(idle, chunks.next()).await {
            Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(chunks))),
            Ok(Some(Err(err))) => Some((Err(err), None)),
            Ok(None) => None,
            Err(_) => Some((Err(BodyError::Stalled(idle)), None)),
        }
    })
    .boxed()
}

/// An upstream JSON body as [`read_json`] found it.
enum JsonBody {
    /// Read whole.
    Whole(Bytes),
    /// Past [`MAX_FIXED_JSON`]: what was read, and the rest still to come.
    TooLarge(Bytes, UpstreamStream),
}

/// Whose tokens an answer's usage is: the model asked for, and the agent that asked.
#[derive(Clone, Debug)]
pub(super) struct Accounting {
    pub(super) model: String,
    pub(super) agent: Agent,
    pub(super) metrics: Metrics,
}

impl Accounting {
    fn record(&self, usage: Option<filter::Usage>) {
        if let Some(usage) = usage {
            self.metrics.token_usage(&self.model, self.agent, usage);
        }
    }
}

/// Turn the upstream response into the client's. `read_timeout` bounds reading a JSON body
/// whole, and any silence in a streamed one.
///
/// By `mode`: chat answers are fixed (JSON and SSE); Responses, Anthropic and Gemini answers
/// pass byte for byte, their event streams event by event; passthrough answers are streamed
/// as they come. Usage is read from successful model answers for `accounting`.
pub(super) fn relay<'a>(
    upstream: http::Response<UpstreamBody>,
    mode: Mode,
    tools: ToolContext,
    accounting: Option<Accounting>,
    metrics: &'a Metrics,
    read_timeout: Duration,
) -> impl Future<Output = Result<Response, ProxyError>> + Send + 'a {
    use futures_util::future::{Either, ready};

    let status = upstream.status();
    let accounting = accounting.filter(|_| status.is_success() && mode != Mode::Passthrough);
    let mut headers = client_response_headers(upstream.headers());
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let answer = move |body, headers| {
        let mut res = Response::new(body);
        *res.status_mut() = status;
        *res.headers_mut() = headers;
        res
    };

    let body = if mode == Mode::Passthrough {
        Body::from_stream(body_stream(upstream, read_timeout).inspect(log_body_error))
    } else if content_type == "text/event-stream" {
        headers.remove(CONTENT_LENGTH);
        let scanner = accounting.map(|accounting| (UsageScanner::new(mode), accounting));
        if mode == Mode::Chat {
            sse_body(
                body_stream(upstream, read_timeout),
                tools,
                metrics.clone(),
                scanner,
            )
        } else {
            events_body(body_stream(upstream, read_timeout), mode, scanner)
        }
    } else if content_type == "application/json"
        && http_body::Body::size_hint(upstream.body())
            .exact()
            .is_none_or(|n| n <= MAX_FIXED_JSON as u64)
    {
        // The only answers read before they are relayed. Boxed: every request's future would
        // otherwise be sized for this path, and a request waiting on its answer's head holds
        // that future.
        return Either::Left(Box::pin(async move {
            let body = json_body(
                upstream,
                mode,
                tools,
                accounting,
                metrics,
                read_timeout,
                &mut headers,
            )
            .await?;
            Ok(answer(body, headers))
        }));
    } else {
        Body::from_stream(body_stream(upstream, read_timeout).inspect(log_body_error))
    };
    Either::Right(ready(Ok(answer(body, headers))))
}

/// The body of a JSON answer: read whole and fixed where it needs it, or streamed through when
/// it is too large to hold.
async fn json_body(
    upstream: http::Response<UpstreamBody>,
    mode: Mode,
    tools: ToolContext,
    accounting: Option<Accounting>,
    metrics: &Metrics,
    read_timeout: Duration,
    headers: &mut HeaderMap,
) -> Result<Body, ProxyError> {
    let body = match read_json(upstream, read_timeout).await? {
        JsonBody::Whole(bytes) if mode != Mode::Chat => {
            if let Some(accounting) = &accounting {
                accounting.record(filter::usage_of_json(mode, &bytes));
            }
            Body::from(bytes)
        }
        JsonBody::Whole(bytes) => {
            if let Some(accounting) = &accounting {
                accounting.record(filter::usage_of_json(mode, &bytes));
            }
            let (fixed, report) = super::off_worker_if_large(&bytes, move |body| {
                filter::fix_response_bytes(body, &tools)
            })
            .await;
            record(metrics, &report);
            match fixed {
                Some(fixed) => {
                    headers.insert(CONTENT_LENGTH, HeaderValue::from(fixed.len()));
                    Body::from(fixed)
                }
                None => Body::from(bytes),
            }
        }
        JsonBody::TooLarge(head, rest) => {
            tracing::debug!(
                limit = MAX_FIXED_JSON,
                "upstream JSON body too large to fix; streamed through unchanged"
            );
            Body::from_stream(
                stream::once(async { Ok(head) })
                    .chain(idle_limited(rest, read_timeout))
                    .inspect(log_body_error),
            )
        }
    };
    Ok(body)
}

/// Reads a JSON body whole, up to [`MAX_FIXED_JSON`] (a body of unknown length may be
/// larger: then what was read goes out ahead of the rest, unchanged).
async fn read_json(
    upstream: http::Response<UpstreamBody>,
    read_timeout: Duration,
) -> Result<JsonBody, ProxyError> {
    let read = async {
        let mut body = Vec::new();
        // The whole read has a time limit (below); past 16 MiB, the rest gets the idle one.
        let mut chunks = chunks(upstream);
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|err| {
                tracing::warn!(error = %err, "upstream body broke off");
                ProxyError::UpstreamUnreachable
            })?;
            body.extend_from_slice(&chunk);
            if body.len() > MAX_FIXED_JSON {
                return Ok(JsonBody::TooLarge(Bytes::from(body), chunks));
            }
        }
        Ok(JsonBody::Whole(Bytes::from(body)))
    };
    tokio::time::timeout(read_timeout, read)
        .await
        .map_err(|_| ProxyError::UpstreamTimeout)?
}

/// A body streamed through as it is can only end early by cutting the client's connection; the
/// log says why.
fn log_body_error(item: &Result<Bytes, BodyError>) {
    if let Err(err) = item {
        tracing::warn!(error = %err, "upstream body ended early; the client's connection is cut");
    }
}

fn record(metrics: &Metrics, report: &FilterReport) {
    metrics.filter_report(report);
}

struct SseState {
    upstream: UpstreamStream,
    rewriter: SseRewriter,
    metrics: Metrics,
    usage: Option<(UsageScanner, Accounting)>,
}

impl SseState {
    /// End of stream (clean or not): flush what the rewriter holds and count its changes.
    fn finish(mut self, error: Option<&BodyError>) -> Vec<u8> {
        let mut out = Vec::new();
        self.rewriter.finish(&mut out);
        record(&self.metrics, self.rewriter.report());
        if let Some((scanner, accounting)) = self.usage.take() {
            accounting.record(scanner.finish());
        }
        if let Some(err) = error {
            tracing::warn!(error = %err, "upstream stream ended early");
            // An event cut off by the failure must not be completed by the error event that
            // follows: drop it.
            out.truncate(complete_events_len(&out));
            // The client gets a well-formed event saying why, then a clean end of stream.
            out.extend_from_slice(match err {
                BodyError::Broke(_) => b"event: error\ndata: {\"error\":{\"type\":\"upstream_unreachable\",\"message\":\"the upstream stream broke off\"}}\n\n",
                BodyError::Stalled(_) => b"event: error\ndata: {\"error\":{\"type\":\"upstream_timeout\",\"message\":\"the upstream stream sent nothing for PROXY_UPSTREAM_TIMEOUT\"}}\n\n",
            });
        }
        out
    }
}

/// The length of the prefix of `out` made of complete events: up to the last blank line.
fn complete_events_len(out: &[u8]) -> usize {
    const BLANK_LINES: [&[u8]; 5] = [b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"];
    BLANK_LINES
        .iter()
        .filter_map(|blank| {
            out.windows(blank.len())
                .rposition(|w| w == *blank)
                .map(|at| at + blank.len())
        })
        .max()
        .unwrap_or(0)
}

/// The SSE body: events that need no change go out as soon as they are complete; nothing
/// follows `[DONE]`; an upstream failure ends the stream with an `error` event.
fn sse_body(
    upstream: UpstreamStream,
    tools: ToolContext,
    metrics: Metrics,
    usage: Option<(UsageScanner, Accounting)>,
) -> Body {
    let state = SseState {
        upstream,
        rewriter: SseRewriter::new(tools, SseLimits::default()),
        metrics,
        usage,
    };
    let events = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            match state.upstream.next().await {
                Some(Ok(chunk)) => {
                    if let Some((scanner, _)) = &mut state.usage {
                        scanner.push(&chunk);
                    }
                    let mut out = Vec::new();
                    state.rewriter.push(&chunk, &mut out);
                    if state.rewriter.is_done() {
                        out.extend(state.finish(None));
                        return Some((Ok::<_, std::convert::Infallible>(Bytes::from(out)), None));
                    }
                    if !out.is_empty() {
                        return Some((Ok(Bytes::from(out)), Some(state)));
                    }
                }
                Some(Err(err)) => {
                    let out = state.finish(Some(&err));
                    return Some((Ok(Bytes::from(out)), None));
                }
                None => {
                    let out = state.finish(None);
                    return (!out.is_empty()).then(|| (Ok(Bytes::from(out)), None));
                }
            }
        }
    });
    Body::from_stream(events)
}

/// A stream is held back at most this far waiting for the end of an event; past it, what is
/// held goes out as it is.
const MAX_HELD_EVENT: usize = 1 << 20;

/// An event stream passed on unchanged, byte for byte: each complete event goes out as soon as
/// its blank line arrives (so a failure never leaves half an event with the client), usage is
/// read on the way, and an upstream failure ends the stream with an `error` event in the API's
/// own shape.
fn events_body(
    upstream: UpstreamStream,
    mode: Mode,
    usage: Option<(UsageScanner, Accounting)>,
) -> Body {
    struct State {
        upstream: UpstreamStream,
        held: Vec<u8>,
        usage: Option<(UsageScanner, Accounting)>,
    }
    impl State {
        fn finish(&mut self) {
            if let Some((scanner, accounting)) = self.usage.take() {
                accounting.record(scanner.finish());
            }
        }
    }
    let state = State {
        upstream,
        held: Vec::new(),
        usage,
    };
    let events = stream::unfold(Some(state), move |state| async move {
        let mut state = state?;
        loop {
            match state.upstream.next().await {
                Some(Ok(chunk)) => {
                    if let Some((scanner, _)) = &mut state.usage {
                        scanner.push(&chunk);
                    }
                    if let Some(out) = complete_events(&mut state.held, chunk) {
                        return Some((Ok::<_, std::convert::Infallible>(out), Some(state)));
                    }
                }
                Some(Err(err)) => {
                    tracing::warn!(error = %err, "upstream stream ended early");
                    state.finish();
                    // What was held is part of an event the failure cut off: dropped.
                    let event = error_event(mode, &err);
                    return Some((Ok(Bytes::from(event)), None));
                }
                None => {
                    state.finish();
                    let rest = std::mem::take(&mut state.held);
                    return (!rest.is_empty()).then(|| (Ok(Bytes::from(rest)), None));
                }
            }
        }
    });
    Body::from_stream(events)
}

/// Takes `chunk` after what is `held` and returns the complete events, if any: up to the last
/// blank line, or everything once more than [`MAX_HELD_EVENT`] is waiting. Only a cut-off event
/// is copied and kept; when nothing was held, the complete events go out as a slice of the
/// chunk itself.
fn complete_events(held: &mut Vec<u8>, chunk: Bytes) -> Option<Bytes> {
    if held.is_empty() {
        let complete = if chunk.len() > MAX_HELD_EVENT {
            chunk.len()
        } else {
            complete_events_len(&chunk)
        };
        held.extend_from_slice(&chunk[complete..]);
        return (complete > 0).then(|| chunk.slice(..complete));
    }
    held.extend_from_slice(&chunk);
    let complete = if held.len() > MAX_HELD_EVENT {
        held.len()
    } else {
        complete_events_len(held)
    };
    if complete == 0 {
        return None;
    }
    let rest = held.split_off(complete);
    Some(Bytes::from(std::mem::replace(held, rest)))
}

/// The event that tells a client of `mode` its stream broke off.
fn error_event(mode: Mode, err: &BodyError) -> Vec<u8> {
    let (kind, message) = match err {
        BodyError::Broke(_) => ("upstream_unreachable", "the upstream stream broke off"),
        BodyError::Stalled(_) => (
            "upstream_timeout",
            "the upstream stream sent nothing for PROXY_UPSTREAM_TIMEOUT",
        ),
    };
    let data = match mode {
        // Anthropic's own error event: `{"type": "error", "error": {"type", "message"}}`.
        Mode::Anthropic => serde_json::json!({
            "type": "error",
            "error": {"type": "api_error", "message": message},
        }),
        // Responses streams end in an `error` event with a code.
        Mode::Responses => serde_json::json!({
            "type": "error",
            "code": kind,
            "message": message,
            "param": null,
        }),
        _ => serde_json::json!({"error": {"type": kind, "message": message}}),
    };
    format!("event: error\ndata: {data}\n\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::{MAX_HELD_EVENT, complete_events, complete_events_len};

    /// `stream` fed in pieces cut at `cuts`: what goes out, piece by piece.
    fn relayed(stream: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut held = Vec::new();
        let mut out = Vec::new();
        let mut from = 0;
        for &to in cuts.iter().chain([&stream.len()]) {
            let chunk = Bytes::copy_from_slice(&stream[from..to]);
            out.extend(complete_events(&mut held, chunk));
            from = to;
        }
        out
    }

    #[test]
    fn complete_events_go_out_whole_in_order_however_the_stream_is_cut() {
        let stream: &[u8] = b"event: a\ndata: {\"x\":1}\n\nevent: b\r\ndata: 2\r\n\r\ndata: 3\n\n";
        for cuts in [
            vec![],
            vec![5],
            vec![24],
            vec![10, 25, 40],
            (1..stream.len()).collect(),
        ] {
            let out = relayed(stream, &cuts);
            assert_eq!(out.concat(), stream, "cuts {cuts:?}");
            for piece in &out {
                // Every piece ends an event: a failure after it leaves no half event.
                assert_eq!(complete_events_len(piece), piece.len(), "cuts {cuts:?}");
            }
        }
    }

    #[test]
    fn events_in_one_chunk_go_out_without_a_copy_and_nothing_is_kept() {
        let chunk = Bytes::from_static(b"data: 1\n\ndata: 2\n\ndata: {\"cut");
        let mut held = Vec::new();
        let out = complete_events(&mut held, chunk.clone()).unwrap();
        assert_eq!(&out[..], b"data: 1\n\ndata: 2\n\n");
        assert_eq!(out.as_ptr(), chunk.as_ptr());
        assert_eq!(held, b"data: {\"cut");
        let out = complete_events(&mut held, Bytes::from_static(b"\"}\n\n")).unwrap();
        assert_eq!(&out[..], b"data: {\"cut\"}\n\n");
        assert!(held.is_empty() && held.capacity() == 0);
    }

    #[test]
    fn an_event_past_the_bound_goes_out_as_it_is() {
        let mut held = Vec::new();
        let big = Bytes::from(vec![b'x'; MAX_HELD_EVENT + 1]);
        assert_eq!(
            complete_events(&mut held, big).unwrap().len(),
            MAX_HELD_EVENT + 1
        );
        assert!(held.is_empty());
        assert!(complete_events(&mut held, Bytes::from(vec![b'y'; MAX_HELD_EVENT])).is_none());
        let out = complete_events(&mut held, Bytes::from_static(b"z")).unwrap();
        assert_eq!(out.len(), MAX_HELD_EVENT + 1);
    }

    #[test]
    fn complete_events_len_stops_at_the_last_blank_line() {
        let cases: &[(&[u8], usize)] = &[
            (b"", 0),
            (b"data: {\"a", 0),
            (b"data: 1\n\n", 9),
            (b"data: 1\n\ndata: {\"choi", 9),
            (b"data: 1\r\n\r\ndata: 2\r\n", 11),
            (b"data: 1\r\rdata: 2\r", 9),
            (b"data: 1\n\ndata: 2\r\n\r\ndata: 3\n", 20),
        ];
        for (out, expected) in cases {
            assert_eq!(
                complete_events_len(out),
                *expected,
                "{:?}",
                String::from_utf8_lossy(out)
            );
        }
    }
}

#[cfg(test)]
mod event_stream_tests {
    use super::*;
    use http_body_util::BodyExt;

    fn upstream(
        rx: tokio::sync::mpsc::UnboundedReceiver<Result<Bytes, BodyError>>,
    ) -> UpstreamStream {
        futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        })
        .boxed()
    }

    /// Each complete event goes out as soon as its blank line arrives, byte for byte, before the
    /// next chunk comes; the rest of an event waits for its end.
    #[tokio::test]
    async fn events_pass_unchanged_as_soon_as_they_are_whole() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut body = events_body(upstream(rx), Mode::Anthropic, None);
        let first = "event: message_start\r\ndata: {\"type\":\"message_start\"}\r\n\r\n";
        tx.send(Ok(Bytes::from(format!("{first}event: ping\ndata: {{\"ty"))))
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(frame, first.as_bytes());
        tx.send(Ok(Bytes::from_static(b"pe\":\"ping\"}\n\n")))
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(frame, &b"event: ping\ndata: {\"type\":\"ping\"}\n\n"[..]);
        // A clean end passes what is left as it is, even without a final blank line.
        tx.send(Ok(Bytes::from_static(b"data: tail"))).unwrap();
        drop(tx);
        let rest = body.collect().await.unwrap().to_bytes();
        assert_eq!(rest, &b"data: tail"[..]);
    }

    /// An upstream failure drops the event it cut off and ends with one error event in the
    /// API's own shape.
    #[tokio::test]
    async fn a_broken_stream_ends_with_an_error_event_of_its_api() {
        let cases = [
            (
                Mode::Anthropic,
                r#"{"type":"error","error":{"type":"api_error","#,
            ),
            (
                Mode::Responses,
                r#"{"type":"error","code":"upstream_timeout","#,
            ),
            (Mode::Gemini, r#"{"error":{"type":"upstream_timeout","#),
        ];
        for (mode, start) in cases {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let body = events_body(upstream(rx), mode, None);
            tx.send(Ok(Bytes::from_static(b"data: {\"a\":1}\n\ndata: {\"cut")))
                .unwrap();
            tx.send(Err(BodyError::Stalled(Duration::from_secs(1))))
                .unwrap();
            let out = body.collect().await.unwrap().to_bytes();
            let text = String::from_utf8(out.to_vec()).unwrap();
            let (kept, error) = text.split_once("event: error\ndata: ").expect(&text);
            assert_eq!(kept, "data: {\"a\":1}\n\n", "{mode}");
            assert!(error.starts_with(start), "{mode}: {error}");
            assert!(error.ends_with("}\n\n"), "{mode}: {error}");
            let data: serde_json::Value =
                serde_json::from_str(error.trim_end()).expect("one JSON document");
            assert!(data.is_object());
        }
    }
}
