//! The JSON errors the proxy itself answers with.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::header::RETRY_AFTER;
use http::{HeaderValue, StatusCode};
use serde_json::json;

/// An error made by the proxy, not relayed from upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The request body is larger than `PROXY_MAX_BODY`.
    BodyTooLarge {
        /// The limit, in bytes.
        limit: usize,
    },
    /// The request could not be read or is not acceptable.
    BadRequest(&'static str),
    /// The upstream could not be reached or broke off.
    UpstreamUnreachable,
    /// The upstream sent no response headers in time.
    UpstreamTimeout,
    /// The upstream endpoint cools down after a 429 for longer than the request may wait.
    RateLimited {
        /// Whole seconds until it takes requests again, for `Retry-After`.
        retry_after: u64,
    },
    /// Buffering this body would take request bodies past `PROXY_BODY_BUDGET`.
    BodyBudgetExhausted {
        /// The budget, in bytes.
        budget: usize,
    },
    /// The path is the workspace's token API, which is never reachable through the proxy.
    TokenApiRefused,
    /// The path matches no route (under `/api/`, only managed MCP servers are routed).
    NoRoute,
}

/// Seconds a client is asked to wait after a full body budget: bodies in flight are usually
/// forwarded within that.
const BUDGET_RETRY_AFTER: u64 = 2;

impl ProxyError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::BodyTooLarge { limit } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                format!("request body is larger than {limit} bytes"),
            ),
            Self::BadRequest(why) => (StatusCode::BAD_REQUEST, "bad_request", (*why).to_owned()),
            Self::UpstreamUnreachable => (
                StatusCode::BAD_GATEWAY,
                "upstream_unreachable",
                "the upstream could not be reached".to_owned(),
            ),
            Self::UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream sent no response headers in time".to_owned(),
            ),
            Self::RateLimited { retry_after } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("the upstream endpoint is rate limited; retry after {retry_after} s"),
            ),
            Self::BodyBudgetExhausted { budget } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                format!(
                    "request bodies being filtered already take the budget of {budget} bytes; retry shortly"
                ),
            ),
            Self::TokenApiRefused => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "the workspace token API is not reachable through the proxy".to_owned(),
            ),
            Self::NoRoute => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no route for this path: under /api/ only /api/2.0/mcp/ is forwarded".to_owned(),
            ),
        }
    }

    /// The status code of the answer.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// The `Retry-After` of the answer, in seconds, if it has one.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after } => Some(*retry_after),
            Self::BodyBudgetExhausted { .. } => Some(BUDGET_RETRY_AFTER),
            _ => None,
        }
    }

    /// `{"error": {"type": ..., "message": ...}}`.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, message) = self.parts();
        json!({ "error": { "type": kind, "message": message } })
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), Json(self.body())).into_response();
        if let Some(secs) = self.retry_after() {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}
