//! Forwarding: every request that is not `/health`, `/ready` or `/metrics` goes to the upstream
//! with the injected token, sanitised, and its answer streams back, fixed where needed.
//!
//! Request bodies: JSON bodies are read whole (up to `PROXY_MAX_BODY`) so the content filter
//! can rewrite them; other bodies with a `Content-Length` are read whole too. Both can be
//! replayed, so a 401 or 403 from upstream is retried once with a refreshed token. A body of
//! unknown length that is not JSON is streamed through a size limit instead and is never
//! replayed: its 401 or 403 goes to the client as it is.
//!
//! Buffered bodies take their size from `PROXY_BODY_BUDGET` while they live (`body_budget.rs`).
//! An upstream 429 starts a cooldown of its endpoint that every request to it waits out, and a
//! replayable request is sent again after it, within `PROXY_RATE_LIMIT_WAIT` (`rate_limit.rs`).

mod agent;
mod body_budget;
mod client;
mod collect;
mod cooldown;
mod error;
pub mod guard;
mod headers;
pub mod models;
mod rate_limit;
mod response;
pub mod routes;
mod scrub;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Body;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use fresh_token::{Token, TokenSource};
use futures_util::future::{Either as FutureEither, ready};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use reqwest::Url;

use crate::health::metrics::{Metrics, RateLimitOutcome};
use crate::token::status::Activity;
use fresh_filter::{ModelRules, RequestContext, RequestSanitizer, ToolContext};

pub(crate) use body_budget::BodyBudget;
use body_budget::{BudgetShare, FILTER_PEAK};
use cooldown::retry_after_secs;
pub(crate) use rate_limit::RateLimits;
use rate_limit::{TooLong, endpoint_key};

pub use agent::Agent;
use client::{BoxError, OutgoingBody, UpstreamBody, describe as describe_error};
pub use client::{ForwardingClient, ForwardingOptions, install_crypto_provider, upstream_client};
pub use error::ProxyError;
pub use headers::{CREDENTIAL_HEADERS, client_response_headers, upstream_request_headers};
pub use routes::{Mode, Refusal, Route, RouteTable};

/// What the forwarding handler needs.
#[derive(Clone)]
pub struct Forwarder {
    pub(crate) client: ForwardingClient,
    pub(crate) upstream_base: Url,
    /// Where each request path goes, and how it is handled.
    pub(crate) routes: Arc<RouteTable>,
    pub(crate) source: Arc<dyn TokenSource>,
    pub(crate) max_body: usize,
    pub(crate) upstream_timeout: Duration,
    pub(crate) metrics: Metrics,
    pub(crate) activity: Activity,
    /// Shared by all requests, so that each agent's `tools` are cleaned once.
    pub(crate) sanitizer: Arc<RequestSanitizer>,
    /// Bytes of buffered request bodies, across requests.
    pub(crate) body_budget: BodyBudget,
    /// Cooldowns of rate-limited upstream endpoints, across requests.
    pub(crate) rate_limits: RateLimits,
    /// Which fields go for which models and APIs.
    pub(crate) rules: Arc<ModelRules>,
    /// `PROXY_STREAM_USAGE=inject`.
    pub(crate) inject_stream_usage: bool,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder")
            .field("upstream_base", &self.upstream_base.as_str())
            .field("max_body", &self.max_body)
            .field("upstream_timeout", &self.upstream_timeout)
            .field("body_budget", &self.body_budget.total())
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

    fn next_body(&mut self) -> OutgoingBody {
        match self {
            Self::Buffered(bytes) => Either::Left(Full::new(bytes.clone())),
            Self::Streaming(body) => Either::Right(body.take().unwrap_or_default()),
        }
    }
}

/// On an answer, the token its retry was sent with, so that it is scrubbed as well.
#[derive(Clone)]
struct RetriedWith(Token);

/// Forward one request; errors become JSON answers.
///
/// The client's request head is read before the returned future and let go there: its headers
/// share hyper's read buffer of the connection, which hyper can then reuse for its next read
/// instead of allocating another while the answer is awaited. The future holds what it needs
/// of the head once, not copies of the request at each level.
pub fn forward(fwd: Arc<Forwarder>, req: Request) -> impl Future<Output = Response> + Send {
    fwd.activity.record(SystemTime::now());
    let (parts, body) = req.into_parts();
    let head = match fwd.head(parts) {
        Ok(head) => head,
        // The proxy's own errors never hold a token, and keep their `Content-Length`.
        Err(err) => return FutureEither::Left(ready(err.into_response())),
    };
    FutureEither::Right(async move {
        match fwd.forward(&head, body).await {
            Ok(res) => {
                let retried = res.extensions().get::<RetriedWith>().map(|r| r.0.clone());
                scrub::without_tokens(res, head.token.iter().chain(retried.iter()))
            }
            Err(err) => err.into_response(),
        }
    })
}

/// What forwarding needs of a client's request head.
struct Head {
    method: Method,
    target: routes::Target,
    /// The token the request carries (`FreshTokenLayer` put it there).
    token: Option<Token>,
    /// The headers to send upstream.
    headers: HeaderMap,
    agent: Agent,
    /// The model the URL names (Gemini's routes do).
    path_model: Option<String>,
    is_json: bool,
    /// The body's `Content-Length`.
    declared: Option<u64>,
}

impl Forwarder {
    /// Where a request goes and what goes with it, or why it goes nowhere.
    fn head(&self, parts: http::request::Parts) -> Result<Head, ProxyError> {
        let target = self.target(&parts.uri)?;
        let declared = declared_length(&parts.headers);
        if declared.is_some_and(|len| len > self.max_body as u64) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_body,
            });
        }
        let path_model = match target.mode {
            Mode::Gemini => routes::gemini_model(target.uri.path()),
            _ => None,
        };
        Ok(Head {
            token: parts.extensions.get::<Token>().cloned(),
            headers: upstream_request_headers(&parts.headers),
            agent: Agent::of(&parts.headers),
            is_json: parts
                .headers
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(is_json_content_type),
            declared,
            path_model,
            target,
            method: parts.method,
        })
    }

    async fn forward(&self, head: &Head, body: Body) -> Result<Response, ProxyError> {
        let Head {
            method,
            target,
            token,
            headers,
            ..
        } = head;
        let uri = &target.uri;
        // Held until the answer's headers are in: the body stays in memory until then.
        let (mut outgoing, tools, model, _budget) = self.read_body(head, body).await?;
        let mut held = Held::new(&self.rate_limits);
        let accounting = model.map(|model| response::Accounting {
            model,
            agent: head.agent,
            metrics: self.metrics.clone(),
        });
        let relay = move |upstream| {
            response::relay(
                upstream,
                target.mode,
                tools,
                accounting,
                &self.metrics,
                self.upstream_timeout,
            )
        };
        // The answer goes into the future that relays it as soon as it is in, and this block
        // ends before that future is awaited: no place is kept for it beside that future in
        // this one, which a request waiting on its answer holds.
        let relaying = {
            // The token goes on after the hop-by-hop headers are gone, so that a client's
            // `Connection: authorization` cannot strip it.
            let upstream = self
                .send_when_allowed(
                    method,
                    uri,
                    headers,
                    &mut outgoing,
                    token.as_ref(),
                    &mut held,
                )
                .await?;
            let rejected = matches!(
                upstream.status(),
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
            );
            match token.as_ref() {
                // Boxed, as only a rejected token takes this path: every request's future
                // would otherwise be sized for it.
                Some(used) if rejected && outgoing.replayable() => FutureEither::Left(Box::pin(
                    self.after_rejected_token(upstream, used, head, outgoing, held, relay),
                )),
                _ => FutureEither::Right(relay(upstream)),
            }
        };
        relaying.await
    }

    /// After a 401 or 403 to `used`: a retry with a refreshed token, its answer relayed with
    /// that token named on it; or the rejection relayed as it is when there is no fresher token.
    async fn after_rejected_token<R, F>(
        &self,
        rejection: http::Response<UpstreamBody>,
        used: &Token,
        head: &Head,
        mut outgoing: Outgoing,
        mut held: Held,
        relay: R,
    ) -> Result<Response, ProxyError>
    where
        R: FnOnce(http::Response<UpstreamBody>) -> F,
        F: Future<Output = Result<Response, ProxyError>>,
    {
        let Some(fresh) = self.source.refresh(used).await else {
            return relay(rejection).await;
        };
        tracing::info!(
            status = rejection.status().as_u16(),
            "upstream rejected the token; retrying once with a refreshed token"
        );
        // Let go of the rejection (and its connection) before the retry.
        drop(rejection);
        self.metrics.retry();
        let upstream = self
            .send_when_allowed(
                &head.method,
                &head.target.uri,
                &head.headers,
                &mut outgoing,
                Some(&fresh),
                &mut held,
            )
            .await?;
        let mut res = relay(upstream).await?;
        res.extensions_mut().insert(RetriedWith(fresh));
        Ok(res)
    }

    /// The route's upstream URL and mode. The request target never chooses the host: only its
    /// path and query are used, and a path that climbs out of its route's base is refused.
    fn target(&self, uri: &http::Uri) -> Result<routes::Target, ProxyError> {
        let path_and_query = uri.path_and_query().map_or("/", |pq| pq.as_str());
        self.routes
            .resolve(path_and_query)
            .map_err(|refusal| match refusal {
                Refusal::TokenApi => ProxyError::TokenApiRefused,
                Refusal::NotRoutable => ProxyError::NoRoute,
                Refusal::LeavesBase => {
                    ProxyError::BadRequest("the request path leaves the upstream base")
                }
            })
    }

    /// The body to send, the tools it declares, and the model it asks for (the head's
    /// `path_model` when the URL names it).
    async fn read_body(
        &self,
        head: &Head,
        body: Body,
    ) -> Result<(Outgoing, ToolContext, Option<String>, Option<BudgetShare>), ProxyError> {
        let (is_json, mode) = (head.is_json, head.target.mode);
        if !is_json && head.declared.is_none() && !http_body::Body::is_end_stream(&body) {
            let limited = Limited::new(body, self.max_body);
            return Ok((
                Outgoing::Streaming(Some(Body::new(limited))),
                ToolContext::default(),
                head.path_model.clone(),
                None,
            ));
        }
        // Passthrough bodies are not filtered, so they hold only their size.
        let factor = if is_json && mode != Mode::Passthrough {
            FILTER_PEAK
        } else {
            1
        };
        let (bytes, mut share) = self.read_whole(head.declared, body, factor).await?;
        if !is_json || bytes.is_empty() || mode == Mode::Passthrough {
            return Ok((
                Outgoing::Buffered(bytes),
                ToolContext::default(),
                head.path_model.clone(),
                Some(share),
            ));
        }
        let sanitizer = Arc::clone(&self.sanitizer);
        let rules = Arc::clone(&self.rules);
        let inject_stream_usage = self.inject_stream_usage;
        let path_model = head.path_model.clone();
        // The filter finds the body's model as it reads the body for the rules.
        let mut outcome = off_worker_if_large(&bytes, move |body| {
            let context = RequestContext {
                mode,
                model: path_model.as_deref(),
                inject_stream_usage,
            };
            sanitizer.sanitize_for(body, &rules, &context)
        })
        .await;
        let model = outcome.model.take();
        self.metrics.filter_report(&outcome.report);
        if !outcome.report.is_empty() {
            tracing::debug!(report = ?outcome.report, "request sanitised");
        }
        let bytes = outcome.body.map_or(bytes, Bytes::from);
        // Filtered: only the body to send is left.
        share.shrink_to(bytes.len());
        Ok((Outgoing::Buffered(bytes), outcome.tools, model, Some(share)))
    }

    /// The whole body, within `PROXY_MAX_BODY` and the body budget, counted `factor` times its
    /// size. A declared length takes its share of the budget before anything is read, and
    /// sizes the buffer once: collecting chunks and joining them would hold the body twice.
    async fn read_whole(
        &self,
        declared: Option<u64>,
        body: Body,
        factor: usize,
    ) -> Result<(Bytes, BudgetShare), ProxyError> {
        let too_large = ProxyError::BodyTooLarge {
            limit: self.max_body,
        };
        let exhausted = ProxyError::BodyBudgetExhausted {
            budget: self.body_budget.total(),
        };
        let mut share = self.body_budget.share();
        let declared = declared.map_or(0, |len| len as usize);
        share
            .cover(declared.saturating_mul(factor))
            .map_err(|_| exhausted.clone())?;
        let bytes = collect::whole_body(body, declared, |len| {
            if len > self.max_body {
                return Err(too_large.clone());
            }
            share
                .cover(len.saturating_mul(factor))
                .map_err(|_| exhausted.clone())
        })
        .await?;
        Ok((bytes, share))
    }

    /// Sends the request once the endpoint's cooldown allows, and again after each 429 while
    /// the request can be replayed and has time left to wait. A 429 that is not waited out goes
    /// to the client with a `Retry-After`.
    async fn send_when_allowed(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        outgoing: &mut Outgoing,
        token: Option<&Token>,
        held: &mut Held,
    ) -> Result<http::Response<UpstreamBody>, ProxyError> {
        let limits = &self.rate_limits;
        if !limits.enabled() {
            let upstream = self
                .send(method, uri, headers, outgoing.next_body(), token)
                .await?;
            if upstream.status() == StatusCode::TOO_MANY_REQUESTS {
                self.metrics.rate_limited(RateLimitOutcome::Passed);
            }
            return Ok(upstream);
        }
        let deadline = held.deadline;
        if limits.any() {
            let key = held.key(uri, outgoing);
            if let Err(TooLong { retry_after }) = limits.wait_turn(key, deadline).await {
                self.metrics.rate_limited(RateLimitOutcome::Passed);
                return Err(ProxyError::RateLimited {
                    retry_after: retry_after_secs(retry_after),
                });
            }
        }
        loop {
            let upstream = self
                .send(method, uri, headers, outgoing.next_body(), token)
                .await?;
            if upstream.status() != StatusCode::TOO_MANY_REQUESTS {
                if limits.any() {
                    limits.answered(held.key(uri, outgoing));
                }
                return Ok(upstream);
            }
            // Boxed, as only a 429 takes this path: every request's future would otherwise be
            // sized for it, and a request waiting on its answer holds that future.
            if let Some(refusal) =
                Box::pin(self.after_rate_limited(upstream, uri, outgoing, held)).await?
            {
                return Ok(refusal);
            }
        }
    }

    /// After a 429: `None` once the endpoint's turn has come and the request can be sent
    /// again, or the refusal to relay, with a `Retry-After`, when it cannot wait that long.
    async fn after_rate_limited(
        &self,
        upstream: http::Response<UpstreamBody>,
        uri: &http::Uri,
        // `&mut` for `Send`: a streamed body is not `Sync`.
        outgoing: &mut Outgoing,
        held: &mut Held,
    ) -> Result<Option<http::Response<UpstreamBody>>, ProxyError> {
        let limits = &self.rate_limits;
        let deadline = held.deadline;
        let key = held.key(uri, outgoing);
        let retry_after = upstream
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok());
        let left = limits.rate_limited(key, retry_after);
        // The refusal is read now, so that no upstream connection is held while waiting.
        let refusal = self.read_refusal(upstream).await;
        let waited = if outgoing.replayable() {
            limits.wait_turn(key, deadline).await
        } else {
            Err(TooLong { retry_after: left })
        };
        match waited {
            Ok(()) => {
                self.metrics.rate_limited(RateLimitOutcome::Absorbed);
                tracing::debug!("replaying a request after an upstream 429");
                Ok(None)
            }
            Err(TooLong { retry_after }) => {
                self.metrics.rate_limited(RateLimitOutcome::Passed);
                let mut refusal = refusal?;
                refusal.headers_mut().insert(
                    RETRY_AFTER,
                    HeaderValue::from(retry_after_secs(retry_after)),
                );
                Ok(Some(refusal.map(|body| Either::Right(Full::new(body)))))
            }
        }
    }

    /// A small upstream answer read whole (a 429's JSON error), to be relayed later.
    async fn read_refusal(
        &self,
        upstream: http::Response<UpstreamBody>,
    ) -> Result<http::Response<Bytes>, ProxyError> {
        let (parts, body) = upstream.into_parts();
        let read = Limited::new(body, MAX_REFUSAL_BYTES).collect();
        match tokio::time::timeout(self.upstream_timeout, read).await {
            Ok(Ok(body)) => Ok(http::Response::from_parts(parts, body.to_bytes())),
            _ => Err(ProxyError::UpstreamUnreachable),
        }
    }

    /// The request is built before the returned future: a request waiting on its answer's
    /// head holds that future, and it holds the request only once, in the client's.
    fn send(
        &self,
        method: &Method,
        uri: &http::Uri,
        headers: &HeaderMap,
        body: OutgoingBody,
        token: Option<&Token>,
    ) -> impl Future<Output = Result<http::Response<UpstreamBody>, ProxyError>> + Send + '_ {
        let mut request = http::Request::new(body);
        *request.method_mut() = method.clone();
        *request.uri_mut() = uri.clone();
        *request.headers_mut() = headers::with_token(headers, token.map(Token::header_value));
        let sending = self.client.send(request);
        async move {
            let started = Instant::now();
            let sent = tokio::time::timeout(self.upstream_timeout, sending).await;
            self.metrics
                .upstream_latency(started.elapsed().as_secs_f64());
            self.sent(sent)
        }
    }

    /// What became of a request sent upstream.
    fn sent(
        &self,
        sent: Result<Result<http::Response<UpstreamBody>, BoxError>, tokio::time::error::Elapsed>,
    ) -> Result<http::Response<UpstreamBody>, ProxyError> {
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
                tracing::warn!(error = %describe_error(&*err), "upstream request failed");
                Err(ProxyError::UpstreamUnreachable)
            }
            Ok(Ok(res)) => Ok(res),
        }
    }
}

/// Upstream error bodies are a few hundred bytes; a 429 held for relaying is cut off here.
const MAX_REFUSAL_BYTES: usize = 64 * 1024;

/// One request's place in the rate limits: how long it may wait, and (worked out when first
/// needed) the endpoint it is for.
struct Held {
    deadline: tokio::time::Instant,
    key: Option<String>,
}

impl Held {
    fn new(limits: &RateLimits) -> Self {
        Self {
            deadline: limits.deadline(),
            key: None,
        }
    }

    fn key(&mut self, uri: &http::Uri, outgoing: &Outgoing) -> &str {
        self.key.get_or_insert_with(|| {
            let body = match outgoing {
                Outgoing::Buffered(bytes) => Some(&bytes[..]),
                Outgoing::Streaming(_) => None,
            };
            endpoint_key(uri, body)
        })
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

fn is_body_limit(err: &BoxError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&**err);
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
