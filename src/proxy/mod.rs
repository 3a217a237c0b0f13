//! Forwarding: every request that is not `/health`, `/ready` or `/metrics` goes to the upstream
//! with the injected token, sanitised, and its answer streams back, fixed where needed.
//!
//! Request bodies: JSON bodies are read whole (up to `PROXY_MAX_BODY`) so the content filter
//! can rewrite them; other bodies with a `Content-Length` are read whole too. Both can be
//! replayed, so a 401 or 403 from upstream is retried once with a refreshed token. A body of
//! unknown length that is not JSON is streamed through a size limit instead and is never
//! replayed: its 401 or 403 goes to the client as it is.

mod client;
mod error;
mod headers;
mod response;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fresh_token::{Token, TokenSource};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, Method, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use reqwest::Url;

use crate::databricks::error::describe as describe_error;
use crate::health::metrics::Metrics;
use crate::token::status::Activity;
use fresh_filter::{RequestSanitizer, ToolContext};

pub use client::{install_crypto_provider, upstream_client};
pub use error::ProxyError;
pub use headers::{client_response_headers, upstream_request_headers};

/// What the forwarding handler needs.
#[derive(Clone)]
pub struct Forwarder {
    pub(crate) client: reqwest::Client,
    pub(crate) upstream_base: Url,
    pub(crate) source: Arc<dyn TokenSource>,
    pub(crate) max_body: usize,
    pub(crate) upstream_timeout: Duration,
    pub(crate) metrics: Metrics,
    pub(crate) activity: Activity,
    /// Shared by all requests, so that each agent's `tools` are cleaned once.
    pub(crate) sanitizer: Arc<RequestSanitizer>,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream_base", &self.upstream_base.as_str())
            .field("max_body", &self.max_body)
            .field("upstream_timeout", &self.upstream_timeout)
            .finish_non_exhaustive()
    }
}

/// A request body as it will be sent upstream.
enum Outgoing {
    /// Read whole: can be sent again.
    Buffered(Bytes),
    /// Streamed through the size limit: can be sent once.
    Streaming(Option<Body>),
}

impl Outgoing {
    fn replayable(&self) -> bool {
        matches!(self, Self::Buffered(_))
    }

    fn next_body(&mut self) -> reqwest::Body {
        match self {
            Self::Buffered(bytes) => reqwest::Body::from(bytes.clone()),
            Self::Streaming(body) => {
                reqwest::Body::wrap_stream(body.take().unwrap_or_default().into_data_stream())
            }
        }
    }
}

/// Forward one request; errors become JSON answers.
pub async fn forward(fwd: Forwarder, req: Request) -> Response {
    fwd.activity.record(SystemTime::now());
    match fwd.forward(req).await {
        Ok(res) => res,
        Err(err) => err.into_response(),
    }
}

impl Forwarder {
    async fn forward(&self, req: Request) -> Result<Response, ProxyError> {
        let (parts, body) = req.into_parts();
        let url = self.upstream_url(&parts.uri)?;
        let token = parts.extensions.get::<Token>().cloned();
        let headers = upstream_request_headers(&parts.headers);

        if declared_length(&parts.headers).is_some_and(|len| len > self.max_body as u64) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_body,
            });
        }
        let (mut outgoing, tools) = self.read_body(&parts.headers, body).await?;

        let method = parts.method;
        let mut upstream = self
            .send(&method, &url, &headers, outgoing.next_body(), None)
            .await?;
        let rejected = matches!(
            upstream.status(),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
        );
        let used = token.filter(|_| rejected && outgoing.replayable());
        if let Some(fresh) = match &used {
            Some(used) => self.source.refresh(used).await,
            None => None,
        } {
            tracing::info!(
                status = upstream.status().as_u16(),
                "upstream rejected the token; retrying once with a refreshed token"
            );
            self.metrics.retry();
            let body = outgoing.next_body();
            upstream = self
                .send(&method, &url, &headers, body, Some(&fresh))
                .await?;
        }
        response::relay(upstream, tools, &self.metrics, self.upstream_timeout).await
    }

    /// `PROXY_UPSTREAM_BASE` + path + query. The request target never chooses the host: only
    /// its path and query are used, and a path that climbs out of the base is refused.
    fn upstream_url(&self, uri: &http::Uri) -> Result<Url, ProxyError> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        let path_and_query = if path_and_query.starts_with('/') {
            path_and_query.to_owned()
        } else {
            format!("/{path_and_query}")
        };
        let base = self.upstream_base.as_str().trim_end_matches('/');
        let url = Url::parse(&format!("{base}{path_and_query}"))
            .map_err(|_| ProxyError::BadRequest("the request path is not valid"))?;
        let base_path = self.upstream_base.path().trim_end_matches('/');
        let inside = url.path() == base_path || url.path().starts_with(&format!("{base_path}/"));
        if url.host() != self.upstream_base.host()
            || url.port_or_known_default() != self.upstream_base.port_or_known_default()
            || !inside
        {
            return Err(ProxyError::BadRequest(
                "the request path leaves the upstream base",
            ));
        }
        Ok(url)
    }

    async fn read_body(
        &self,
        headers: &HeaderMap,
        body: Body,
    ) -> Result<(Outgoing, ToolContext), ProxyError> {
        let is_json = headers
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_json_content_type);
        if !is_json && declared_length(headers).is_none() && !http_body::Body::is_end_stream(&body)
        {
            let limited = Limited::new(body, self.max_body);
            return Ok((
                Outgoing::Streaming(Some(Body::new(limited))),
                ToolContext::default(),
            ));
        }
        let bytes = match Limited::new(body, self.max_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(err) if err.is::<LengthLimitError>() => {
                return Err(ProxyError::BodyTooLarge {
                    limit: self.max_body,
                });
            }
            Err(_) => return Err(ProxyError::BadRequest("the request body could not be read")),
        };
        if !is_json || bytes.is_empty() {
            return Ok((Outgoing::Buffered(bytes), ToolContext::default()));
        }
        let sanitizer = Arc::clone(&self.sanitizer);
        let outcome = off_worker_if_large(&bytes, move |body| sanitizer.sanitize(body)).await;
        self.metrics.filter_report(&outcome.report);
        if !outcome.report.is_empty() {
            tracing::debug!(report = ?outcome.report, "request sanitised");
        }
        let bytes = outcome.body.map_or(bytes, Bytes::from);
        Ok((Outgoing::Buffered(bytes), outcome.tools))
    }

    async fn send(
        &self,
        method: &Method,
        url: &Url,
        headers: &HeaderMap,
        body: reqwest::Body,
        token: Option<&Token>,
    ) -> Result<reqwest::Response, ProxyError> {
        let mut headers = headers.clone();
        if let Some(token) = token {
            headers.insert(http::header::AUTHORIZATION, token.header_value().clone());
        }
        let request = self
            .client
            .request(method.clone(), url.clone())
            .headers(headers)
            .body(body);
        let started = Instant::now();
        let sent = tokio::time::timeout(self.upstream_timeout, request.send()).await;
        self.metrics
            .upstream_latency(started.elapsed().as_secs_f64());
        match sent {
            Err(_) => {
                tracing::warn!(
                    timeout_s = self.upstream_timeout.as_secs(),
                    "no upstream response headers in time"
                );
                Err(ProxyError::UpstreamTimeout)
            }
            Ok(Err(err)) if is_body_limit(&err) => Err(ProxyError::BodyTooLarge {
                limit: self.max_body,
            }),
            Ok(Err(err)) => {
                tracing::warn!(error = %describe_error(&err), "upstream request failed");
                Err(ProxyError::UpstreamUnreachable)
            }
            Ok(Ok(res)) => Ok(res),
        }
    }
}

/// Bodies at least this large are filtered on tokio's blocking pool. A worker thread serves
/// many connections at once; filtering megabytes of JSON on it (a few milliseconds per
/// megabyte) would hold all of them up meanwhile.
const OFFLOAD_BYTES: usize = 256 * 1024;

/// `work(body)`, moved off the worker thread onto the blocking pool when `body` is large.
pub(crate) async fn off_worker_if_large<T: Send + 'static>(
    body: &Bytes,
    work: impl FnOnce(&[u8]) -> T + Send + 'static,
) -> T {
    if body.len() < OFFLOAD_BYTES {
        return work(body);
    }
    let body = body.clone();
    match tokio::task::spawn_blocking(move || work(&body)).await {
        Ok(out) => out,
        Err(err) => match err.try_into_panic() {
            Ok(panic) => std::panic::resume_unwind(panic),
            // Cancelled: the runtime is shutting down and drops this request too.
            Err(_) => std::future::pending().await,
        },
    }
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

fn is_json_content_type(value: &str) -> bool {
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

fn is_body_limit(err: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        if current.is::<LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn large_bodies_are_filtered_off_the_worker_thread() {
        let here = std::thread::current().id();
        let cases = [(OFFLOAD_BYTES - 1, true), (OFFLOAD_BYTES, false)];
        for (len, on_this_thread) in cases {
            let body = Bytes::from(vec![b' '; len]);
            let (thread, seen) =
                off_worker_if_large(&body, |body| (std::thread::current().id(), body.len())).await;
            assert_eq!(seen, len);
            assert_eq!(thread == here, on_this_thread, "{len} bytes");
        }
    }
}
