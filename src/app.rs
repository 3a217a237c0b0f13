//! The whole HTTP surface as one tower service: [`app`] and the [`AppState`] it serves from.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::FromRef;
use axum::response::IntoResponse;
use axum::routing::future::RouteFuture;
use axum::routing::get;
use fresh_filter::ModelRules;
use fresh_token::{FreshTokenLayer, TokenSource};
use futures_util::FutureExt;
use futures_util::future::Either;
use http::{HeaderValue, Method, Request};
use reqwest::Url;
use tower::{Service, ServiceBuilder};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::{DefaultOnFailure, DefaultOnResponse, TraceLayer};
use tracing::Level;

use crate::health::{self, HealthState, metrics::Metrics};
use crate::proxy::guard::{ClientGuardLayer, ClientPolicy};
use crate::proxy::models::{self, ModelCatalog, ModelsState};
use crate::proxy::{
    self, BodyBudget, Forwarder, ForwardingClient, RateLimits, RouteTable, upstream_client,
};
use crate::token::status::{Activity, SourceKind, StatusCell, TokenStatus};

/// Everything [`app`] serves from.
#[derive(Clone)]
pub struct AppState {
    forwarder: Forwarder,
    catalog: ModelCatalog,
    /// The workspace API client `/models` lists endpoints with.
    api_client: reqwest::Client,
    source: Arc<dyn TokenSource>,
    status: StatusCell,
    metrics: Metrics,
    request_ids: RequestCounter,
    policy: ClientPolicy,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("forwarder", &self.forwarder)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Settings of the forwarding path.
#[derive(Clone, Debug)]
pub struct ProxySettings {
    /// Request paths and queries are appended to this URL.
    pub upstream_base: Url,
    /// Larger request bodies get 413.
    pub max_body: usize,
    /// Time to wait for upstream response headers.
    pub upstream_timeout: Duration,
    /// Bytes of request bodies buffered at once, across requests; past it, 503.
    pub body_budget: usize,
    /// How long a replayable request may wait across upstream 429s; zero passes them through.
    pub rate_limit_wait: Duration,
    /// Where each request path goes, and how it is handled.
    pub routes: RouteTable,
    /// Which request fields go for which models and APIs.
    pub rules: ModelRules,
    /// Ask for usage on streamed chat requests that did not (`PROXY_STREAM_USAGE=inject`).
    pub inject_stream_usage: bool,
}

impl ProxySettings {
    /// `upstream_base` with the default limits (32 MiB bodies, 300 s for headers, a 256 MiB
    /// body budget, 60 s of waiting across 429s) and the default routes, taking the workspace
    /// to be the base's origin.
    pub fn new(upstream_base: Url) -> Self {
        let mut workspace = upstream_base.clone();
        workspace.set_path("/");
        workspace.set_query(None);
        Self {
            routes: RouteTable::defaults(&workspace, &upstream_base),
            rules: ModelRules::builtin(),
            inject_stream_usage: false,
            upstream_base,
            max_body: 32 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(300),
            body_budget: 256 * 1024 * 1024,
            rate_limit_wait: Duration::from_secs(60),
        }
    }
}

impl AppState {
    /// State for a proxy to `settings.upstream_base` that takes tokens from `source`, with a new
    /// upstream client, fresh metrics and a status of `kind`.
    pub fn new(settings: ProxySettings, source: Arc<dyn TokenSource>, kind: SourceKind) -> Self {
        let client = upstream_client(&settings.upstream_base);
        Self::with_parts(
            settings,
            source,
            client,
            StatusCell::new(TokenStatus::new(kind)),
            Metrics::new(),
            Activity::default(),
        )
    }

    /// State from parts shared with the rotator: its status cell, metrics and activity. `client`
    /// serves `/models`; requests are forwarded by a [`ForwardingClient`] configured from the
    /// environment.
    pub fn with_parts(
        settings: ProxySettings,
        source: Arc<dyn TokenSource>,
        client: reqwest::Client,
        status: StatusCell,
        metrics: Metrics,
        activity: Activity,
    ) -> Self {
        let catalog = ModelCatalog::new(
            settings.routes.workspace(),
            source.clone(),
            settings.upstream_timeout,
        );
        let forwarder = Forwarder {
            sanitizer: Arc::default(),
            client: ForwardingClient::for_upstream(&settings.upstream_base),
            upstream_base: settings.upstream_base,
            routes: Arc::new(settings.routes),
            rules: Arc::new(settings.rules),
            inject_stream_usage: settings.inject_stream_usage,
            source: source.clone(),
            max_body: settings.max_body,
            upstream_timeout: settings.upstream_timeout,
            metrics: metrics.clone(),
            activity,
            body_budget: BodyBudget::new(settings.body_budget),
            rate_limits: RateLimits::new(settings.rate_limit_wait),
        };
        Self {
            forwarder,
            catalog,
            api_client: client,
            source,
            status,
            metrics,
            request_ids: RequestCounter::default(),
            policy: ClientPolicy::loopback(),
        }
    }

    /// Who may use the proxy (by default: clients naming a loopback host, no client key).
    pub fn with_client_policy(mut self, policy: ClientPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The same state forwarding with `client`, e.g. one that trusts a private CA or takes
    /// its proxies from elsewhere than the environment.
    pub fn with_forwarding_client(mut self, client: ForwardingClient) -> Self {
        self.forwarder.client = client;
        self
    }

    /// A copy sharing everything (token source, status, metrics, request ids, the filter's
    /// memory) but the upstream clients, which are new. A client's pooled connections are driven
    /// by tasks on the runtime that opened them, so each runtime serving the app should have its
    /// own: [`crate::server::serve`] builds one copy per worker.
    pub fn for_runtime(&self) -> Self {
        let mut copy = self.clone();
        copy.forwarder.client = self.forwarder.client.for_runtime();
        copy.api_client = upstream_client(&self.forwarder.upstream_base);
        copy
    }

    /// The metrics this app records into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl FromRef<AppState> for ModelsState {
    fn from_ref(app: &AppState) -> Self {
        ModelsState {
            catalog: app.catalog.clone(),
            client: app.api_client.clone(),
        }
    }
}

impl FromRef<AppState> for HealthState {
    fn from_ref(app: &AppState) -> Self {
        HealthState {
            source: app.source.clone(),
            status: app.status.clone(),
            metrics: app.metrics.clone(),
            upstream: app.forwarder.upstream_base.clone(),
        }
    }
}

/// The proxy's whole HTTP surface, as one tower service: forwarding with token injection on
/// every path, plus `/health`, `/ready`, `/metrics`, `/models` and `/v1/models` for `GET` (and
/// `HEAD`). Request ids, tracing and the client guard wrap both.
///
/// Forwarded requests do not pass through a router: the few local paths are told apart by
/// one comparison, and only they reach the axum [`Router`] that serves them.
/// A router's fallback would add a copy of the URI, a map of path parameters and a boxed
/// service call to every forwarded request. Serve it with `axum::serve(listener,
/// app(state).into_make_service())` (`axum::ServiceExt`), or with [`crate::server::serve`].
pub fn app(
    state: AppState,
) -> impl Service<
    Request<Body>,
    Response = axum::response::Response,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    let metrics = state.metrics.clone();
    // One copy for every request: a `Forwarder` is a few hundred bytes of handles, each
    // request's future holds only this pointer.
    let forwarder = Arc::new(state.forwarder.clone());
    let request_ids = state.request_ids.clone();
    let guard = ClientGuardLayer::new(state.policy.clone());
    let status = state.status.clone();
    let forward = ServiceBuilder::new()
        .map_response(
            move |res: http::Response<fresh_token::ResponseBody<Body>>| {
                metrics.request(res.status().as_u16());
                match status.get().action.as_deref() {
                    Some(action) if res.body().is_rejected() => {
                        token_unavailable(action).into_response()
                    }
                    _ => res.map(Body::new),
                }
            },
        )
        .layer(FreshTokenLayer::new(state.source.clone()))
        .service(tower::service_fn(move |req| {
            proxy::forward(Arc::clone(&forwarder), req).map(Ok::<_, Infallible>)
        }));
    let local = Router::new()
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route("/models", get(models::list))
        .route("/v1/models", get(models::list))
        .with_state(state);
    ServiceBuilder::new()
        // One body type for every answer, as `axum::serve` takes.
        .map_response(|res: http::Response<_>| res.map(Body::new))
        .layer(SetSensitiveRequestHeadersLayer::new(
            proxy::CREDENTIAL_HEADERS.map(http::HeaderName::from_static),
        ))
        .layer(SetRequestIdLayer::x_request_id(request_ids))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    // Debug level: at the default `info`, a span per request costs more than
                    // the rest of the tracing.
                    tracing::debug_span!("request", id, method = %req.method(), path = req.uri().path())
                })
                .on_request(())
                .on_response(DefaultOnResponse::new().level(Level::DEBUG))
                .on_failure(DefaultOnFailure::new().level(Level::WARN)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        // Refusals are answered before anything else runs, and are traced like others.
        .layer(guard)
        .service(Dispatch { local, forward })
}

/// Sends the proxy's own endpoints to their router and every other request to forwarding.
#[derive(Clone)]
struct Dispatch<F> {
    local: Router,
    forward: F,
}

impl<F> Dispatch<F> {
    /// Whether the proxy answers `req` itself: `GET` or `HEAD` on one of its paths. Any other
    /// method on those paths is forwarded like any other request.
    fn is_local<B>(req: &Request<B>) -> bool {
        matches!(*req.method(), Method::GET | Method::HEAD)
            && matches!(
                req.uri().path(),
                "/health" | "/ready" | "/metrics" | "/models" | "/v1/models"
            )
    }
}

impl<F> Service<Request<Body>> for Dispatch<F>
where
    F: Service<Request<Body>, Response = axum::response::Response, Error = Infallible>,
{
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Either<RouteFuture<Infallible>, F::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready.
        self.forward.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        if Self::is_local(&req) {
            Either::Left(self.local.call(req))
        } else {
            Either::Right(self.forward.call(req))
        }
    }
}

/// The 503 an agent gets when no token can be had until a person acts: the same JSON error as
/// always, its message saying what to run.
fn token_unavailable(action: &str) -> axum::response::Response {
    let body = serde_json::json!({
        "error": {
            "type": "token_unavailable",
            "message": format!("no valid token is available: {action}"),
        }
    });
    (http::StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

/// `n` in lower-case hex, written into `buf`: no `format!` on every request.
fn hex(mut n: u64, buf: &mut [u8; 16]) -> &[u8] {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
        if n == 0 {
            return &buf[at..];
        }
    }
}

/// Request ids: a process-wide counter, cheaper than random ids and easy to follow in logs.
#[derive(Clone, Debug, Default)]
struct RequestCounter(Arc<AtomicU64>);

impl MakeRequestId for RequestCounter {
    fn make_request_id<B>(&mut self, _request: &Request<B>) -> Option<RequestId> {
        let id = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        HeaderValue::from_bytes(hex(id, &mut [0; 16]))
            .ok()
            .map(RequestId::new)
    }
}

#[cfg(test)]
mod tests {
    use super::{Dispatch, hex};

    #[test]
    fn only_get_and_head_on_the_proxys_own_paths_stay_local() {
        let cases = [
            ("GET", "/health", true),
            ("HEAD", "/health", true),
            ("GET", "/ready", true),
            ("GET", "/metrics", true),
            ("GET", "/models", true),
            ("HEAD", "/v1/models", true),
            ("POST", "/health", false),
            ("DELETE", "/metrics", false),
            ("OPTIONS", "/ready", false),
            ("GET", "/health/", false),
            ("GET", "/Health", false),
            ("GET", "/models/x", false),
            ("GET", "/serving-endpoints/health", false),
            ("POST", "/serving-endpoints/m/invocations", false),
        ];
        for (method, path, local) in cases {
            let req = http::Request::builder()
                .method(method)
                .uri(format!("http://127.0.0.1:4000{path}?a=1"))
                .body(())
                .unwrap();
            assert_eq!(Dispatch::<()>::is_local(&req), local, "{method} {path}");
        }
    }

    #[test]
    fn request_ids_are_lower_case_hex() {
        for n in [0, 1, 9, 10, 15, 16, 255, 0xdead_beef, u64::MAX] {
            assert_eq!(hex(n, &mut [0; 16]), format!("{n:x}").as_bytes(), "{n}");
        }
    }
}
