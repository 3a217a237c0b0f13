//! `/health`, `/ready` and `/metrics`, served from a [`HealthState`]: the token source, the
//! published status and the metrics, nothing of the forwarding path.

pub mod metrics;
mod usage;

use std::sync::Arc;
use std::time::SystemTime;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use http::header::CONTENT_TYPE;
use serde_json::json;

use fresh_token::TokenSource;
use reqwest::Url;

use crate::health::metrics::Metrics;
use crate::token::status::{StatusCell, TokenState, TokenStatus};

/// What `/health`, `/ready` and `/metrics` read. The app derives it from its own state
/// (`FromRef`), so these handlers know nothing of forwarding.
#[derive(Clone, Debug)]
pub struct HealthState {
    /// The source the proxy injects from.
    pub source: Arc<dyn TokenSource>,
    /// The status the token machinery publishes.
    pub status: StatusCell,
    /// The metrics rendered at `/metrics`.
    pub metrics: Metrics,
    /// The upstream base, reported by `/health`.
    pub upstream: Url,
}

/// The token's status as it is now: the published snapshot, with presence and expiry taken
/// from the token the proxy would inject.
fn token_status(app: &HealthState, now: SystemTime) -> TokenStatus {
    let mut status = (*app.status.get()).clone();
    let token = app.source.current();
    // A source hands out nothing once it knows its token expired (the proxy answers 503); the
    // status still knows that token, so it is reported expired rather than missing.
    let held_expired = status.present && status.expires_at.is_some_and(|at| at <= now);
    status.present = token.is_some() || held_expired;
    if status.expires_at.is_none() {
        status.expires_at = token.and_then(|t| t.expires_at());
    }
    status
}

fn rfc3339(at: Option<SystemTime>) -> Option<String> {
    at.map(|at| humantime::format_rfc3339_seconds(at).to_string())
}

/// `GET /health`: always 200 while the process runs; never a token value.
pub(crate) async fn health(State(app): State<HealthState>) -> Json<serde_json::Value> {
    let now = SystemTime::now();
    let status = token_status(&app, now);
    let state = status.state_at(now);
    let overall = match state {
        TokenState::Fresh | TokenState::Expiring if !status.files_failing() => "ok",
        _ => "degraded",
    };
    Json(json!({
        "status": overall,
        "upstream": app.upstream.as_str(),
        "token": {
            "source": status.source,
            "state": state,
            "expires_in_s": status.expires_in_s(now),
            "last_rotation": rfc3339(status.last_rotation),
            "rotations": status.rotations,
            "rotating": status.rotating,
            "role": status.role(),
            "coordination": status.coordination.name(),
            "coordination_error": status.coordination_error,
            "persist_failed": status.persist_failed,
            "lock_error": status.lock_error,
            "action": status.action,
        },
    }))
}

/// `GET /ready`: 200 while a usable, unexpired token is held, else 503 with a reason.
pub(crate) async fn ready(State(app): State<HealthState>) -> Response {
    let now = SystemTime::now();
    let status = token_status(&app, now);
    let reason = match (status.state_at(now), &status.lock_error) {
        // Serving works for now, but no one here can rotate when the holder of the lock stops.
        (TokenState::Fresh | TokenState::Expiring, Some(error)) => {
            format!("the rotation lock file cannot be opened: {error}")
        }
        (TokenState::Fresh | TokenState::Expiring, None) => {
            return Json(json!({ "status": "ready" })).into_response();
        }
        (TokenState::Missing, _) => "no token is available".to_owned(),
        (TokenState::Expired, _) => "the token has expired".to_owned(),
    };
    // A failure no retry can cure says what a person must run.
    let reason = match &status.action {
        Some(action) => format!("{reason}: {action}"),
        None => reason,
    };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "status": "not_ready", "reason": reason })),
    )
        .into_response()
}

/// `GET /metrics`: Prometheus text format.
pub(crate) async fn metrics(State(app): State<HealthState>) -> Response {
    let now = SystemTime::now();
    let status = token_status(&app, now);
    let text = app.metrics.render(status.expires_in_s(now));
    (
        [(
            CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        text,
    )
        .into_response()
}
