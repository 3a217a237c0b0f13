//! The JSON errors the proxy itself answers with.

use axum::Json;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
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
}

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
        }
    }

    /// The status code of the answer.
    pub fn status(&self) -> StatusCode {
        self.parts().0
    }

    /// `{"error": {"type": ..., "message": ...}}`.
    pub fn body(&self) -> serde_json::Value {
        let (_, kind, message) = self.parts();
        json!({ "error": { "type": kind, "message": message } })
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        (self.status(), Json(self.body())).into_response()
    }
}
