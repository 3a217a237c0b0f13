//! Relaying the upstream answer: SSE streams through the rewriter, JSON bodies through the
//! response fixer, everything else streamed as it is.

use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt, TryStreamExt};
use http::HeaderValue;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};

use super::describe_error;
use super::error::ProxyError;
use super::headers::client_response_headers;
use crate::health::metrics::Metrics;
use fresh_filter::{self as filter, FilterReport, SseLimits, SseRewriter, ToolContext};

/// JSON bodies up to this size are read whole and fixed; larger ones stream through unchanged.
const MAX_FIXED_JSON: usize = 16 * 1024 * 1024;

type UpstreamStream = BoxStream<'static, Result<Bytes, BodyError>>;

/// Why the upstream body ended early.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    /// The connection or the body's encoding failed.
    #[error("{}", describe_error(.0))]
    Broke(reqwest::Error),
    /// Nothing arrived for this long.
    #[error("nothing arrived for {} s", .0.as_secs())]
    Stalled(Duration),
}

/// The upstream body, ended with [`BodyError::Stalled`] when nothing arrives for `idle`: a
/// stream may run for hours, but one that has gone silent for that long is dead, and holding
/// it would hold the agent (and a shutdown) with it.
fn body_stream(upstream: reqwest::Response, idle: Duration) -> UpstreamStream {
    idle_limited(
        upstream.bytes_stream().map_err(BodyError::Broke).boxed(),
        idle,
    )
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

/// Turn the upstream response into the client's. `read_timeout` bounds reading a JSON body
/// whole, and any silence in a streamed one.
pub(super) async fn relay(
    upstream: reqwest::Response,
    tools: ToolContext,
    metrics: &Metrics,
    read_timeout: Duration,
) -> Result<Response, ProxyError> {
    let status = upstream.status();
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

    let body = if content_type == "text/event-stream" {
        headers.remove(CONTENT_LENGTH);
        sse_body(body_stream(upstream, read_timeout), tools, metrics.clone())
    } else if content_type == "application/json"
        && upstream
            .content_length()
            .is_none_or(|n| n as usize <= MAX_FIXED_JSON)
    {
        match read_json(upstream, read_timeout).await? {
            JsonBody::Whole(bytes) => {
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
        }
    } else {
        Body::from_stream(body_stream(upstream, read_timeout).inspect(log_body_error))
    };
    let mut res = Response::new(body);
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    Ok(res)
}

/// Reads a JSON body whole, up to [`MAX_FIXED_JSON`] (a body of unknown length may be
/// larger: then what was read goes out ahead of the rest, unchanged).
async fn read_json(
    upstream: reqwest::Response,
    read_timeout: Duration,
) -> Result<JsonBody, ProxyError> {
    let read = async {
        let mut body = Vec::new();
        // The whole read has a time limit (below); past 16 MiB, the rest gets the idle one.
        let mut chunks = upstream.bytes_stream().map_err(BodyError::Broke).boxed();
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
}

impl SseState {
    /// End of stream (clean or not): flush what the rewriter holds and count its changes.
    fn finish(mut self, error: Option<&BodyError>) -> Vec<u8> {
        let mut out = Vec::new();
        self.rewriter.finish(&mut out);
        record(&self.metrics, self.rewriter.report());
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
fn sse_body(upstream: UpstreamStream, tools: ToolContext, metrics: Metrics) -> Body {
    let state = SseState {
        upstream,
        rewriter: SseRewriter::new(tools, SseLimits::default()),
        metrics,
    };
    let events = stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        loop {
            match state.upstream.next().await {
                Some(Ok(chunk)) => {
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

#[cfg(test)]
mod tests {
    use super::complete_events_len;

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
