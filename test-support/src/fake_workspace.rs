//! A fake Databricks workspace on `127.0.0.1:0`, faithful enough that a proxy which works
//! against it works against the real REST API.
//!
//! It serves, with the real request and response shapes:
//!
//! - the token API (`/api/2.0/token/create`, `/delete`, `/list`), with tokens that really
//!   expire on the wall clock and are refused with 403 once expired or revoked;
//! - `GET /api/2.0/preview/scim/v2/Me`;
//! - OAuth M2M (`POST /oidc/v1/token`, client credentials with HTTP basic auth);
//! - model serving under `/serving-endpoints/`, where the endpoint name (or the `model` of a
//!   `chat/completions` body) picks a [`Behaviour`];
//! - the endpoint list, model families on `chat/completions`, Anthropic Messages, Responses,
//!   Gemini's native API and managed MCP servers (see [`models`]).
//!
//! Every endpoint but `/oidc/v1/token` wants `Authorization: Bearer <token>`: none gives 401
//! `UNAUTHENTICATED`, an unknown, revoked or expired token gives 403 `PERMISSION_DENIED`.
//!
//! The server runs on its own thread and Tokio runtime, so it keeps serving while a test blocks
//! or pauses its own clock. It stops when the last clone of the handle is dropped, or at
//! [`FakeWorkspace::shutdown`].
//!
//! ```ignore
//! let workspace = FakeWorkspace::start().await;
//! let bootstrap = workspace.mint(Duration::from_secs(900));
//! let response = client
//!     .post(workspace.endpoint_url(Behaviour::Echo))
//!     .bearer_auth(&bootstrap.value)
//!     .body("hello")
//!     .send()
//!     .await?;
//! assert_eq!(workspace.stats().serving_ok, 1);
//! ```

// Early HTTP answers travel as `Err(Response)`; their size is irrelevant in a test server.
#![allow(clippy::result_large_err)]

pub mod models;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// `userName` answered by `scim/v2/Me` and shown as the creator of every token.
pub const USER_NAME: &str = "fake-user@example.com";
/// SCIM id of the fake user (Databricks user ids are numeric strings).
pub const USER_ID: &str = "4242424242424242";
/// The tool name served models wrongly wrap real tool calls in.
pub const TOOL_CALL_NAME: &str = "databricks-tool-call";
/// Arguments of the wrapped tool call served by [`Behaviour::ToolCall`].
pub const TOOL_CALL_ARGUMENTS: &str = r#"{"name":"read_file","path":"/tmp/x"}"#;
/// The assistant text of [`Behaviour::Chat`], whole or as the concatenated stream deltas.
pub const CHAT_REPLY: &str = "Hello! How can I help you today?";
/// How [`Behaviour::Echo`] shows the `Authorization` header it received.
pub const REDACTED: &str = "[redacted]";

const CHAT_REPLY_PIECES: [&str; 3] = ["Hello", "! How can I", " help you today?"];
const TOOL_CALL_ARGUMENT_PIECES: [&str; 3] =
    [r#"{"name":"re"#, r#"ad_file","path""#, r#":"/tmp/x"}"#];
/// Above the proxy's default 32 MiB limit, so the proxy's own limit is what tests see.
const MAX_REQUEST_BODY: usize = 64 << 20;
const MAX_RECORDED_REQUESTS: usize = 256;
const MAX_RECORDED_ATTEMPTS: usize = 4096;
/// How long open connections may take to finish after shutdown before they are cut.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// What a serving endpoint does. Chosen by the endpoint name, the first path segment after
/// `/serving-endpoints/` (`/serving-endpoints/slow-stream/invocations`), or for
/// `/serving-endpoints/chat/completions` by the `model` of the JSON body. Any other name, any
/// path, any method: [`Behaviour::Echo`].
///
/// Parameters come from the query string or from an `x-fake-*` request header
/// (`?delay_ms=200` or `x-fake-delay-ms: 200`); the query wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Behaviour {
    /// `echo`: 200 JSON describing the request that arrived: `method`, `path`, `query` (raw,
    /// or null), `headers` (lower-case name to value, repeated values joined with `", "`,
    /// `authorization` shown as [`REDACTED`]), `auth` (`valid`, `token_id`, `kind`), `body_len`,
    /// `body_sha256` (hex), `body_base64`, and `body_text` (the body if UTF-8, else null).
    Echo,
    /// `chat`: an OpenAI `chat.completion` saying [`CHAT_REPLY`]; with `"stream": true` in the
    /// body, server-sent `chat.completion.chunk` events then `data: [DONE]`.
    Chat,
    /// `tool-call`: a completion whose only tool call is [`TOOL_CALL_NAME`] with
    /// [`TOOL_CALL_ARGUMENTS`] and `finish_reason: "stop"`. Streamed: the name in one event,
    /// the arguments split across three more, then the finish event.
    ToolCall,
    /// `tool-call-one-chunk`: as [`Behaviour::ToolCall`], but a stream carries name and whole
    /// arguments in a single event.
    ToolCallOneChunk,
    /// `slow-stream`: always streams `events` chunks (default 5), the first at once and each
    /// further one (and the final `[DONE]`) after `delay_ms` (default 100). The content of
    /// chunk `i` is `"part {i}; "`; the last chunk has `finish_reason: "stop"`.
    SlowStream,
    /// `slow-headers`: waits `delay_ms` (default 2000) before sending anything, then answers
    /// as [`Behaviour::Chat`].
    SlowHeaders,
    /// `status`: answers `status` (default 500) with a Databricks error body
    /// (`{"error_code", "message"}`; empty for 204, 205, 304; `{"status": n}` below 400), and
    /// `Retry-After: {retry_after}` when that parameter is given.
    Status,
}

impl Behaviour {
    /// Every behaviour.
    pub const ALL: [Self; 7] = [
        Self::Echo,
        Self::Chat,
        Self::ToolCall,
        Self::ToolCallOneChunk,
        Self::SlowStream,
        Self::SlowHeaders,
        Self::Status,
    ];

    /// The endpoint name (or chat `model`) that selects this behaviour.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Echo => "echo",
            Self::Chat => "chat",
            Self::ToolCall => "tool-call",
            Self::ToolCallOneChunk => "tool-call-one-chunk",
            Self::SlowStream => "slow-stream",
            Self::SlowHeaders => "slow-headers",
            Self::Status => "status",
        }
    }

    /// The behaviour an endpoint name selects, if it names one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|behaviour| behaviour.name() == name)
    }

    fn for_request(path: &str, body: &[u8]) -> Self {
        let rest = path
            .strip_prefix("/serving-endpoints")
            .unwrap_or_default()
            .trim_start_matches('/');
        let model;
        let name = if rest == "chat/completions" {
            model = model_of(body);
            model.as_deref().unwrap_or_default()
        } else {
            rest.split('/').next().unwrap_or_default()
        };
        Self::from_name(name).unwrap_or(Self::Echo)
    }
}

/// Personal access token or OAuth access token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// A PAT (`dapi...`), from the token API or [`FakeWorkspace::mint`].
    Pat,
    /// An access token from `/oidc/v1/token`.
    OAuth,
}

impl TokenKind {
    fn name(self) -> &'static str {
        match self {
            Self::Pat => "pat",
            Self::OAuth => "oauth",
        }
    }
}

/// A token minted directly on the workspace. `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// The token id, as `token/list` and `token/delete` know it.
    pub id: String,
    /// The bearer value, `dapi` and 32 hex digits.
    pub value: String,
    /// When it stops working; `None` never.
    pub expiry: Option<SystemTime>,
}

impl fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedToken")
            .field("id", &self.id)
            .field("value", &"****")
            .field("expiry", &self.expiry)
            .finish()
    }
}

/// What the workspace knows about a live token, without its value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSummary {
    /// Token id.
    pub id: String,
    /// PAT or OAuth.
    pub kind: TokenKind,
    /// The comment given at creation (empty for OAuth tokens).
    pub comment: String,
    /// Creation time (millisecond precision).
    pub created: SystemTime,
    /// Expiry (millisecond precision); `None` never.
    pub expiry: Option<SystemTime>,
}

/// Counters of what the workspace answered, since start or [`FakeWorkspace::reset_stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Every HTTP request received.
    pub requests: u64,
    /// Bearer checks that failed (401 or 403), on any endpoint.
    pub denied: u64,
    /// Serving requests answered 2xx.
    pub serving_ok: u64,
    /// Serving requests refused for their bearer (401 or 403).
    pub serving_denied: u64,
    /// Serving requests with a valid bearer answered non-2xx (injected faults, `status`, bad
    /// parameters).
    pub serving_errors: u64,
    /// Tokens minted through `token/create`.
    pub creates: u64,
    /// `token/create` calls answered with an error, for any reason (bearer, body, fault).
    pub create_failures: u64,
    /// Tokens revoked through `token/delete`.
    pub deletes: u64,
    /// `token/delete` calls answered 404 (unknown, already deleted or expired id).
    pub delete_unknown: u64,
    /// `token/delete` calls answered with another error (bearer, body, fault).
    pub delete_failures: u64,
    /// `token/list` calls answered 200.
    pub lists: u64,
    /// Access tokens issued by `/oidc/v1/token`.
    pub oauth_issued: u64,
    /// `/oidc/v1/token` calls answered with an error.
    pub oauth_refused: u64,
}

/// A serving request as it arrived (kept for the last 256 requests that passed the bearer
/// check). The `Authorization` header is not kept.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The behaviour that answered it.
    pub behaviour: Behaviour,
    /// Request method.
    pub method: Method,
    /// Path, starting with `/serving-endpoints` (or `/api/2.0/mcp` for managed MCP calls).
    pub path: String,
    /// Raw query string, if any.
    pub query: Option<String>,
    /// Every header but `Authorization`.
    pub headers: HeaderMap,
    /// Id of the token the bearer mapped to.
    pub token_id: String,
    /// Kind of that token.
    pub token_kind: TokenKind,
    /// The body, byte for byte.
    pub body: Bytes,
}

/// One serving request that passed the bearer check, as [`FakeWorkspace::serving_attempts`]
/// lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServingAttempt {
    /// When it arrived.
    pub at: std::time::Instant,
    /// Path, starting with `/serving-endpoints`.
    pub path: String,
    /// Its `x-fake-agent` header, for telling the attempts of concurrent clients apart.
    pub agent: Option<String>,
    /// `Some` when it was answered 429 by [`FakeWorkspace::rate_limit_serving`]: the
    /// `Retry-After` seconds it announced, if any.
    pub rate_limited: Option<Option<u64>>,
}

/// Handle to a running fake workspace. Clones share the same server and state; the server
/// stops when the last clone is dropped.
#[derive(Clone)]
pub struct FakeWorkspace {
    inner: Arc<Inner>,
    server: Arc<ServerLifetime>,
}

impl fmt::Debug for FakeWorkspace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FakeWorkspace")
            .field("addr", &self.server.addr)
            .finish_non_exhaustive()
    }
}

impl FakeWorkspace {
    /// Binds `127.0.0.1:0` and serves on a thread of its own.
    pub async fn start() -> Self {
        let (started, addr) = Self::spawn();
        let addr = addr
            .await
            .expect("fake workspace thread died while starting");
        started(addr)
    }

    /// [`FakeWorkspace::start`] for code outside any async runtime.
    pub fn start_blocking() -> Self {
        let (started, addr) = Self::spawn();
        let addr = addr
            .blocking_recv()
            .expect("fake workspace thread died while starting");
        started(addr)
    }

    fn spawn() -> (
        impl FnOnce(SocketAddr) -> Self,
        oneshot::Receiver<SocketAddr>,
    ) {
        let inner = Arc::new(Inner {
            state: Mutex::new(WorkspaceState::default()),
            cancel: CancellationToken::new(),
            streams_abandoned: Arc::default(),
        });
        let (addr_tx, addr_rx) = oneshot::channel();
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let server_inner = Arc::clone(&inner);
        std::thread::Builder::new()
            .name("fake-workspace".to_owned())
            .spawn(move || serve_on_own_runtime(server_inner, addr_tx, stopped_tx))
            .expect("spawn the fake workspace thread");
        let cancel = inner.cancel.clone();
        let started = move |addr| Self {
            inner,
            server: Arc::new(ServerLifetime {
                addr,
                cancel,
                stopped: Mutex::new(Some(stopped_rx)),
            }),
        };
        (started, addr_rx)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// `http://127.0.0.1:PORT`, the workspace host.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// `{url}/serving-endpoints`, the proxy's default upstream base.
    pub fn serving_base(&self) -> String {
        format!("{}/serving-endpoints", self.url())
    }

    /// `{url}/serving-endpoints/{behaviour}/invocations`.
    pub fn endpoint_url(&self, behaviour: Behaviour) -> String {
        format!("{}/{}/invocations", self.serving_base(), behaviour.name())
    }

    /// `{url}/serving-endpoints/chat/completions` (behaviour chosen by the body's `model`).
    pub fn chat_completions_url(&self) -> String {
        format!("{}/chat/completions", self.serving_base())
    }

    /// Stops accepting connections, ends open streams and waits (bounded) for the server to
    /// stop. Other clones then talk to a closed port.
    pub async fn shutdown(&self) {
        self.server.cancel.cancel();
        let stopped = lock(&self.server.stopped).take();
        if let Some(stopped) = stopped {
            // The thread also cuts lingering connections after SHUTDOWN_GRACE.
            let _ = tokio::time::timeout(SHUTDOWN_GRACE * 3, stopped).await;
        }
    }

    /// A PAT valid for `lifetime` from now (millisecond precision, so sub-second lifetimes
    /// work; zero is already expired), as if created earlier with the token API.
    pub fn mint(&self, lifetime: Duration) -> IssuedToken {
        self.mint_with_comment(Some(lifetime), "")
    }

    /// A PAT that never expires.
    pub fn mint_without_expiry(&self) -> IssuedToken {
        self.mint_with_comment(None, "")
    }

    /// A PAT with a comment; `lifetime` `None` never expires.
    pub fn mint_with_comment(&self, lifetime: Option<Duration>, comment: &str) -> IssuedToken {
        let lifetime_ms = lifetime.map(|lifetime| saturating_ms(lifetime.as_millis()));
        let mut state = self.inner.lock();
        let token = state.insert_token(TokenKind::Pat, lifetime_ms, comment.to_owned(), now_ms());
        IssuedToken {
            id: token.id.clone(),
            value: token.value.clone(),
            expiry: token.expiry_ms.map(system_time),
        }
    }

    /// Revokes the token with this id (PAT or OAuth). False when no live token has it.
    pub fn revoke(&self, id: &str) -> bool {
        self.inner.lock().revoke_where(|token| token.id == id)
    }

    /// Revokes the token with this bearer value. False when no live token has it.
    pub fn revoke_value(&self, value: &str) -> bool {
        self.inner.lock().revoke_where(|token| token.value == value)
    }

    /// Makes the token with this id expire now, as if its lifetime had passed. False when no
    /// live token has it.
    pub fn expire_now(&self, id: &str) -> bool {
        let now = now_ms();
        let mut state = self.inner.lock();
        match state
            .tokens
            .iter_mut()
            .find(|token| token.id == id && token.is_live(now))
        {
            Some(token) => {
                token.expiry_ms = Some(now);
                true
            }
            None => false,
        }
    }

    /// Whether this bearer value would be accepted now.
    pub fn is_live(&self, value: &str) -> bool {
        let now = now_ms();
        let state = self.inner.lock();
        state
            .tokens
            .iter()
            .any(|token| token.value == value && token.is_live(now))
    }

    /// Whether the token with this id would be accepted now.
    pub fn is_live_id(&self, id: &str) -> bool {
        let now = now_ms();
        let state = self.inner.lock();
        state
            .tokens
            .iter()
            .any(|token| token.id == id && token.is_live(now))
    }

    /// Ids of the live PATs, oldest first (what `token/list` shows).
    pub fn live_token_ids(&self) -> Vec<String> {
        self.live_tokens()
            .into_iter()
            .filter(|token| token.kind == TokenKind::Pat)
            .map(|token| token.id)
            .collect()
    }

    /// Every live token, PAT and OAuth, oldest first.
    pub fn live_tokens(&self) -> Vec<TokenSummary> {
        let now = now_ms();
        let state = self.inner.lock();
        state
            .tokens
            .iter()
            .filter(|token| token.is_live(now))
            .map(|token| TokenSummary {
                id: token.id.clone(),
                kind: token.kind,
                comment: token.comment.clone(),
                created: system_time(token.created_ms),
                expiry: token.expiry_ms.map(system_time),
            })
            .collect()
    }

    /// Accepts these client credentials at `/oidc/v1/token`, issuing access tokens that live
    /// for `lifetime` (`expires_in` is its whole seconds). Replaces an earlier client.
    pub fn set_oauth_client(&self, client_id: &str, client_secret: &str, lifetime: Duration) {
        self.inner.lock().oauth_client = Some(OAuthClient {
            id: client_id.to_owned(),
            secret: client_secret.to_owned(),
            lifetime,
        });
    }

    /// Starts a `databricks auth login` token family: `/oidc/v1/token` accepts
    /// `grant_type=refresh_token` with the returned refresh token, once; each refresh answers a
    /// new access token that lives `lifetime` and a new refresh token. Reusing a spent refresh
    /// token revokes the family.
    pub fn start_u2m(&self, lifetime: Duration) -> String {
        let first = format!("dorf-{}", random_hex(16));
        self.inner.lock().u2m = Some(U2mFamily {
            current: first.clone(),
            used: Vec::new(),
            revoked: false,
            lifetime,
            stats: U2mStats::default(),
        });
        first
    }

    /// Revokes the U2M family, as an expired or revoked login: every refresh fails with
    /// `invalid_grant` "Refresh token is invalid".
    pub fn revoke_u2m(&self) {
        if let Some(family) = &mut self.inner.lock().u2m {
            family.revoked = true;
        }
    }

    /// What the U2M refresh grant saw, and whether the family was revoked.
    pub fn u2m_stats(&self) -> (U2mStats, bool) {
        self.inner
            .lock()
            .u2m
            .as_ref()
            .map(|f| (f.stats.clone(), f.revoked))
            .unwrap_or_default()
    }

    /// Accepts `jwt` (and no other) as the subject of the RFC 8693 token exchange at
    /// `/oidc/v1/token`, with `client_id` when given, issuing access tokens that live
    /// `lifetime`. Calling it again replaces the JWT: the old one is refused from then on.
    pub fn set_federated_jwt(&self, jwt: &str, client_id: Option<&str>, lifetime: Duration) {
        let mut state = self.inner.lock();
        let (exchanges, refused) = state
            .federation
            .as_ref()
            .map_or((0, 0), |f| (f.exchanges, f.refused));
        state.federation = Some(Federation {
            jwt: jwt.to_owned(),
            client_id: client_id.map(str::to_owned),
            lifetime,
            exchanges,
            refused,
        });
    }

    /// Token exchanges answered with a token, and refused.
    pub fn exchange_stats(&self) -> (u64, u64) {
        self.inner
            .lock()
            .federation
            .as_ref()
            .map_or((0, 0), |f| (f.exchanges, f.refused))
    }

    /// The next `n` `token/create` calls with a valid bearer answer `status` with a Databricks
    /// error body (added behind any faults already queued).
    pub fn fail_next_creates(&self, n: u32, status: u16) {
        self.inner.lock().faults.create.push(n, status, None);
    }

    /// As [`FakeWorkspace::fail_next_creates`], with `Retry-After: {retry_after_secs}`.
    pub fn fail_next_creates_with_retry_after(&self, n: u32, status: u16, retry_after_secs: u64) {
        self.inner
            .lock()
            .faults
            .create
            .push(n, status, Some(retry_after_secs));
    }

    /// The next `n` `token/delete` calls with a valid bearer answer `status`.
    pub fn fail_next_deletes(&self, n: u32, status: u16) {
        self.inner.lock().faults.delete.push(n, status, None);
    }

    /// The next `n` serving requests with a valid bearer answer `status`.
    pub fn fail_next_serving(&self, n: u32, status: u16) {
        self.inner.lock().faults.serving.push(n, status, None);
    }

    /// The next `n` serving requests with a valid bearer answer 429 `REQUEST_LIMIT_EXCEEDED`,
    /// as model serving does past an endpoint's rate limit, with `Retry-After: {secs}` or
    /// none (added behind any faults already queued). [`FakeWorkspace::serving_attempts`]
    /// tells when each attempt arrived and which were refused.
    pub fn rate_limit_serving(&self, n: u32, retry_after_secs: Option<u64>) {
        self.inner
            .lock()
            .faults
            .serving
            .push(n, 429, retry_after_secs);
    }

    /// Every serving request that passed the bearer check (the last 4096), oldest first.
    pub fn serving_attempts(&self) -> Vec<ServingAttempt> {
        self.inner.lock().attempts.iter().cloned().collect()
    }

    /// The next `n` `/oidc/v1/token` calls with valid client credentials answer `status`
    /// (OAuth error body).
    pub fn fail_next_oauth(&self, n: u32, status: u16) {
        self.inner.lock().faults.oauth.push(n, status, None);
    }

    /// Every `token/create` call waits this long before answering (zero: no wait).
    pub fn set_create_delay(&self, delay: Duration) {
        self.inner.lock().create_delay = delay;
    }

    /// The counters so far.
    pub fn stats(&self) -> Stats {
        self.inner.lock().stats.clone()
    }

    /// `slow-stream` responses whose reader went away before the end of the stream.
    pub fn streams_abandoned(&self) -> u64 {
        self.inner
            .streams_abandoned
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets every counter back to zero.
    pub fn reset_stats(&self) {
        self.inner.lock().stats = Stats::default();
    }

    /// The last serving requests that passed the bearer check, oldest first.
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.inner.lock().recorded.iter().cloned().collect()
    }

    /// Forgets the recorded requests.
    pub fn clear_recorded(&self) {
        self.inner.lock().recorded.clear();
    }
}

/// Hex SHA-256 of `bytes`, as [`Behaviour::Echo`] reports `body_sha256`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// Ends the server when the last handle goes.
struct ServerLifetime {
    addr: SocketAddr,
    cancel: CancellationToken,
    stopped: Mutex<Option<oneshot::Receiver<()>>>,
}

impl Drop for ServerLifetime {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

struct Inner {
    state: Mutex<WorkspaceState>,
    /// Cancelled at shutdown: ends open streams and waits.
    cancel: CancellationToken,
    /// Event streams whose reader went away before `[DONE]`.
    streams_abandoned: Arc<AtomicU64>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, WorkspaceState> {
        lock(&self.state)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock must not hide other failures.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn serve_on_own_runtime(
    inner: Arc<Inner>,
    addr_tx: oneshot::Sender<SocketAddr>,
    stopped_tx: oneshot::Sender<()>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fake-workspace-worker")
        .enable_all()
        .build()
        .expect("build the fake workspace runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener
            .local_addr()
            .expect("local address of the listener");
        if addr_tx.send(addr).is_err() {
            return;
        }
        let cancel = inner.cancel.clone();
        let serve = axum::serve(listener, router(inner))
            .with_graceful_shutdown(cancel.clone().cancelled_owned());
        let grace_over = async {
            cancel.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        };
        tokio::select! {
            result = serve => result.expect("fake workspace server failed"),
            () = grace_over => {}
        }
    });
    // Dropping the runtime cuts every connection that is still open.
    drop(runtime);
    let _ = stopped_tx.send(());
}

fn router(inner: Arc<Inner>) -> Router {
    Router::new()
        .route("/oidc/v1/token", post(oauth_token))
        .route(
            "/oidc/.well-known/oauth-authorization-server",
            get(oauth_discovery),
        )
        .route("/api/2.0/token/create", post(token_create))
        .route("/api/2.0/token/delete", post(token_delete))
        .route("/api/2.0/token/list", get(token_list))
        .route("/api/2.0/preview/scim/v2/Me", get(scim_me))
        .route("/serving-endpoints", any(serving))
        .route("/serving-endpoints/{*rest}", any(serving))
        .route("/api/2.0/serving-endpoints", get(models::list_endpoints))
        .route(
            "/serving-endpoints/chat/completions",
            any(models::chat_completions),
        )
        .route("/serving-endpoints/responses", any(models::responses))
        .route(
            "/serving-endpoints/anthropic/{*rest}",
            any(models::anthropic),
        )
        .route("/serving-endpoints/gemini/{*rest}", any(models::gemini))
        .route("/api/2.0/mcp/{*rest}", any(models::mcp))
        .fallback(no_such_api)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&inner),
            count_request,
        ))
        .with_state(inner)
}

#[derive(Default)]
struct WorkspaceState {
    /// Every token ever issued, oldest first; revoked and expired ones stay, marked.
    tokens: Vec<TokenRecord>,
    oauth_client: Option<OAuthClient>,
    faults: Faults,
    create_delay: Duration,
    stats: Stats,
    recorded: VecDeque<RecordedRequest>,
    attempts: VecDeque<ServingAttempt>,
    models: models::ModelState,
    u2m: Option<U2mFamily>,
    federation: Option<Federation>,
}

/// The refresh tokens of one `databricks auth login`: single use, rotated at each refresh. A
/// refresh token presented a second time means two refreshes overlapped (or one was stolen):
/// the whole family is revoked, as identity providers with refresh token rotation do.
struct U2mFamily {
    current: String,
    used: Vec<String>,
    revoked: bool,
    lifetime: Duration,
    stats: U2mStats,
}

/// What the U2M refresh grant saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct U2mStats {
    /// Refreshes answered with a new access token.
    pub refreshes: u64,
    /// Refresh tokens presented after they had been used: overlapping refreshes.
    pub reused: u64,
    /// Refreshes refused (revoked family, unknown token).
    pub refused: u64,
}

/// Workload identity federation: the one platform JWT currently accepted by the token
/// exchange, and the life of the tokens it issues.
struct Federation {
    jwt: String,
    client_id: Option<String>,
    lifetime: Duration,
    exchanges: u64,
    refused: u64,
}

struct TokenRecord {
    id: String,
    value: String,
    kind: TokenKind,
    comment: String,
    created_ms: i64,
    expiry_ms: Option<i64>,
    revoked: bool,
}

impl TokenRecord {
    fn is_live(&self, now_ms: i64) -> bool {
        !self.revoked && self.expiry_ms.is_none_or(|expiry| now_ms < expiry)
    }

    /// `token_info` as `token/create` returns it.
    fn info(&self) -> Value {
        json!({
            "token_id": self.id,
            "creation_time": self.created_ms,
            "expiry_time": self.expiry_ms.unwrap_or(-1),
            "comment": self.comment,
        })
    }

    /// An entry of `token/list`.
    fn listed_info(&self) -> Value {
        let mut info = self.info();
        info["created_by_id"] = json!(USER_ID.parse::<u64>().unwrap_or_default());
        info["created_by_username"] = json!(USER_NAME);
        info["owner_id"] = json!(USER_ID.parse::<u64>().unwrap_or_default());
        info
    }
}

struct OAuthClient {
    id: String,
    secret: String,
    lifetime: Duration,
}

#[derive(Default)]
struct Faults {
    create: FaultQueue,
    delete: FaultQueue,
    serving: FaultQueue,
    oauth: FaultQueue,
}

#[derive(Default)]
struct FaultQueue(VecDeque<Fault>);

impl FaultQueue {
    fn push(&mut self, n: u32, status: u16, retry_after_secs: Option<u64>) {
        let status = StatusCode::from_u16(status).expect("a valid HTTP status code");
        let fault = Fault {
            status,
            retry_after_secs,
        };
        self.0.extend(std::iter::repeat_n(fault, n as usize));
    }

    fn next(&mut self) -> Option<Fault> {
        self.0.pop_front()
    }
}

#[derive(Clone, Copy)]
struct Fault {
    status: StatusCode,
    retry_after_secs: Option<u64>,
}

impl Fault {
    fn api_response(self) -> Response {
        let message = if self.status == StatusCode::TOO_MANY_REQUESTS {
            "Exceeded the rate limit of this serving endpoint. Please retry later.".to_owned()
        } else {
            format!("Injected failure ({})", self.status.as_u16())
        };
        self.with_retry_after(api_error(self.status, error_code(self.status), &message))
    }

    fn oauth_response(self) -> Response {
        let error = if self.status.is_server_error() {
            "server_error"
        } else {
            "invalid_request"
        };
        let body = json!({"error": error, "error_description": "Injected failure"});
        self.with_retry_after((self.status, Json(body)).into_response())
    }

    fn with_retry_after(self, mut response: Response) -> Response {
        if let Some(secs) = self.retry_after_secs {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

/// Who a valid bearer belongs to.
#[derive(Clone)]
struct Caller {
    token_id: String,
    kind: TokenKind,
}

impl WorkspaceState {
    fn insert_token(
        &mut self,
        kind: TokenKind,
        lifetime_ms: Option<i64>,
        comment: String,
        now_ms: i64,
    ) -> &TokenRecord {
        let value = match kind {
            TokenKind::Pat => format!("dapi{}", random_hex(16)),
            // Shaped like the JWTs Databricks issues; opaque to clients all the same.
            TokenKind::OAuth => format!(
                "eyJ{}.eyJ{}.{}",
                random_hex(12),
                random_hex(24),
                random_hex(32)
            ),
        };
        self.tokens.push(TokenRecord {
            id: random_hex(32),
            value,
            kind,
            comment,
            created_ms: now_ms,
            expiry_ms: lifetime_ms.map(|lifetime| now_ms.saturating_add(lifetime)),
            revoked: false,
        });
        self.tokens.last().expect("just pushed")
    }

    fn revoke_where(&mut self, mut matches: impl FnMut(&TokenRecord) -> bool) -> bool {
        let now = now_ms();
        match self
            .tokens
            .iter_mut()
            .find(|token| token.is_live(now) && matches(token))
        {
            Some(token) => {
                token.revoked = true;
                true
            }
            None => false,
        }
    }

    fn authenticate(&mut self, headers: &HeaderMap, now_ms: i64) -> Result<Caller, Response> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_of);
        let Some(bearer) = bearer else {
            self.stats.denied += 1;
            return Err(api_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "Credential was not sent or was of an unsupported type for this API.",
            ));
        };
        match self.tokens.iter().find(|token| token.value == bearer) {
            Some(token) if token.is_live(now_ms) => Ok(Caller {
                token_id: token.id.clone(),
                kind: token.kind,
            }),
            _ => {
                self.stats.denied += 1;
                Err(api_error(
                    StatusCode::FORBIDDEN,
                    "PERMISSION_DENIED",
                    "Invalid access token.",
                ))
            }
        }
    }

    fn token_create(&mut self, headers: &HeaderMap, body: &[u8]) -> Response {
        let now = now_ms();
        if let Err(refusal) = self.authenticate(headers, now) {
            return refusal;
        }
        if let Some(fault) = self.faults.create.next() {
            return fault.api_response();
        }
        let request = match json_object(body) {
            Ok(request) => request,
            Err(refusal) => return refusal,
        };
        let lifetime_seconds = match request.get("lifetime_seconds") {
            None | Some(Value::Null) => 0,
            Some(value) => match integer_of(value) {
                Some(seconds) if seconds >= 0 => seconds,
                _ => {
                    return api_error(
                        StatusCode::BAD_REQUEST,
                        "INVALID_PARAMETER_VALUE",
                        "lifetime_seconds must be a non-negative integer",
                    );
                }
            },
        };
        // As the real API: no lifetime (or 0) means the token never expires.
        let lifetime_ms = (lifetime_seconds > 0).then(|| lifetime_seconds.saturating_mul(1000));
        let comment = request
            .get("comment")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let token = self.insert_token(TokenKind::Pat, lifetime_ms, comment, now);
        Json(json!({"token_value": token.value, "token_info": token.info()})).into_response()
    }

    fn token_delete(&mut self, headers: &HeaderMap, body: &[u8]) -> Response {
        let now = now_ms();
        if let Err(refusal) = self.authenticate(headers, now) {
            return refusal;
        }
        if let Some(fault) = self.faults.delete.next() {
            return fault.api_response();
        }
        let request = match json_object(body) {
            Ok(request) => request,
            Err(refusal) => return refusal,
        };
        let Some(token_id) = request.get("token_id").and_then(Value::as_str) else {
            return api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_PARAMETER_VALUE",
                "Missing required field: token_id",
            );
        };
        match self.tokens.iter_mut().find(|token| {
            token.kind == TokenKind::Pat && token.id == token_id && token.is_live(now)
        }) {
            Some(token) => {
                token.revoked = true;
                Json(json!({})).into_response()
            }
            None => api_error(
                StatusCode::NOT_FOUND,
                "RESOURCE_DOES_NOT_EXIST",
                &format!("Token with ID {token_id} does not exist."),
            ),
        }
    }

    fn token_list(&mut self, headers: &HeaderMap) -> Response {
        let now = now_ms();
        if let Err(refusal) = self.authenticate(headers, now) {
            return refusal;
        }
        self.stats.lists += 1;
        let token_infos: Vec<Value> = self
            .tokens
            .iter()
            .filter(|token| token.kind == TokenKind::Pat && token.is_live(now))
            .map(TokenRecord::listed_info)
            .collect();
        Json(json!({ "token_infos": token_infos })).into_response()
    }

    fn oauth_token(&mut self, headers: &HeaderMap, body: &[u8]) -> Response {
        let form = form_pairs(body);
        let form_value = |key: &str| {
            form.iter()
                .find(|(name, _)| name == key)
                .map(|(_, value)| value.as_str())
        };
        match form_value("grant_type") {
            Some("refresh_token") => return self.u2m_refresh(form_value("refresh_token")),
            Some("urn:ietf:params:oauth:grant-type:token-exchange") => {
                return self.token_exchange(
                    form_value("subject_token_type"),
                    form_value("subject_token"),
                    form_value("client_id"),
                    form_value("scope"),
                );
            }
            _ => {}
        }
        let credentials = basic_credentials(headers).or_else(|| {
            Some((
                form_value("client_id")?.to_owned(),
                form_value("client_secret")?.to_owned(),
            ))
        });
        let lifetime = match (&self.oauth_client, credentials) {
            (Some(client), Some((id, secret))) if client.id == id && client.secret == secret => {
                client.lifetime
            }
            _ => {
                return oauth_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    "Client authentication failed",
                );
            }
        };
        if let Some(fault) = self.faults.oauth.next() {
            return fault.oauth_response();
        }
        if form_value("grant_type") != Some("client_credentials") {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "Only client_credentials is supported",
            );
        }
        let scope = form_value("scope").unwrap_or("all-apis").to_owned();
        let lifetime_ms = saturating_ms(lifetime.as_millis());
        let token = self.insert_token(TokenKind::OAuth, Some(lifetime_ms), String::new(), now_ms());
        Json(json!({
            "access_token": token.value,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
            "scope": scope,
        }))
        .into_response()
    }

    fn u2m_refresh(&mut self, presented: Option<&str>) -> Response {
        let now = now_ms();
        let Some(family) = &mut self.u2m else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "Refresh token is invalid",
            );
        };
        let presented = presented.unwrap_or_default();
        if family.used.iter().any(|used| used == presented) {
            family.stats.reused += 1;
            family.revoked = true;
        }
        if family.revoked || presented != family.current {
            family.stats.refused += 1;
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "Refresh token is invalid",
            );
        }
        let next = format!("dorf-{}", random_hex(16));
        family
            .used
            .push(std::mem::replace(&mut family.current, next.clone()));
        family.stats.refreshes += 1;
        let lifetime = family.lifetime;
        let token = self.insert_token(
            TokenKind::OAuth,
            Some(saturating_ms(lifetime.as_millis())),
            String::new(),
            now,
        );
        Json(json!({
            "access_token": token.value,
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
            "refresh_token": next,
        }))
        .into_response()
    }

    fn token_exchange(
        &mut self,
        subject_type: Option<&str>,
        subject: Option<&str>,
        client_id: Option<&str>,
        scope: Option<&str>,
    ) -> Response {
        let now = now_ms();
        let Some(federation) = &mut self.federation else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "No federation policy",
            );
        };
        let accepted = subject_type == Some("urn:ietf:params:oauth:token-type:jwt")
            && subject == Some(federation.jwt.as_str())
            && scope == Some("all-apis")
            && client_id == federation.client_id.as_deref();
        if !accepted {
            federation.refused += 1;
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "The subject token is not accepted by any federation policy",
            );
        }
        federation.exchanges += 1;
        let lifetime = federation.lifetime;
        let token = self.insert_token(
            TokenKind::OAuth,
            Some(saturating_ms(lifetime.as_millis())),
            String::new(),
            now,
        );
        Json(json!({
            "access_token": token.value,
            "token_type": "Bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "expires_in": lifetime.as_secs(),
        }))
        .into_response()
    }

    fn admit_serving(
        &mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<ServingCall, Response> {
        let caller = match self.authenticate(headers, now_ms()) {
            Ok(caller) => caller,
            Err(refusal) => {
                self.stats.serving_denied += 1;
                return Err(refusal);
            }
        };
        let behaviour = Behaviour::for_request(uri.path(), &body);
        let mut kept_headers = headers.clone();
        kept_headers.remove(header::AUTHORIZATION);
        if self.recorded.len() == MAX_RECORDED_REQUESTS {
            self.recorded.pop_front();
        }
        self.recorded.push_back(RecordedRequest {
            behaviour,
            method: method.clone(),
            path: uri.path().to_owned(),
            query: uri.query().map(str::to_owned),
            headers: kept_headers.clone(),
            token_id: caller.token_id.clone(),
            token_kind: caller.kind,
            body: body.clone(),
        });
        let fault = self.faults.serving.next();
        if self.attempts.len() == MAX_RECORDED_ATTEMPTS {
            self.attempts.pop_front();
        }
        self.attempts.push_back(ServingAttempt {
            at: std::time::Instant::now(),
            path: uri.path().to_owned(),
            agent: headers
                .get("x-fake-agent")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            rate_limited: fault
                .filter(|fault| fault.status == StatusCode::TOO_MANY_REQUESTS)
                .map(|fault| fault.retry_after_secs),
        });
        if let Some(fault) = fault {
            self.stats.serving_errors += 1;
            return Err(fault.api_response());
        }
        Ok(ServingCall {
            behaviour,
            method: method.clone(),
            uri: uri.clone(),
            headers: kept_headers,
            caller,
            body,
        })
    }
}

async fn count_request(State(inner): State<Arc<Inner>>, request: Request, next: Next) -> Response {
    inner.lock().stats.requests += 1;
    next.run(request).await
}

async fn token_create(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let delay = inner.lock().create_delay;
    if !delay.is_zero() && !sleep_unless_cancelled(&inner.cancel, delay).await {
        return shutting_down();
    }
    let mut state = inner.lock();
    let response = state.token_create(&headers, &body);
    if response.status().is_success() {
        state.stats.creates += 1;
    } else {
        state.stats.create_failures += 1;
    }
    response
}

async fn token_delete(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut state = inner.lock();
    let response = state.token_delete(&headers, &body);
    match response.status() {
        StatusCode::OK => state.stats.deletes += 1,
        StatusCode::NOT_FOUND => state.stats.delete_unknown += 1,
        _ => state.stats.delete_failures += 1,
    }
    response
}

async fn token_list(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    inner.lock().token_list(&headers)
}

async fn scim_me(State(inner): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = inner.lock().authenticate(&headers, now_ms()) {
        return refusal;
    }
    Json(json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "id": USER_ID,
        "userName": USER_NAME,
        "displayName": "Fake User",
        "active": true,
        "emails": [{"type": "work", "value": USER_NAME, "primary": true}],
    }))
    .into_response()
}

async fn oauth_token(State(inner): State<Arc<Inner>>, headers: HeaderMap, body: Bytes) -> Response {
    let mut state = inner.lock();
    let response = state.oauth_token(&headers, &body);
    if response.status().is_success() {
        state.stats.oauth_issued += 1;
    } else {
        state.stats.oauth_refused += 1;
    }
    response
}

/// The workspace's OAuth authorization server metadata (RFC 8414), as the SDKs read it.
async fn oauth_discovery(headers: HeaderMap) -> Response {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    let base = format!("http://{host}/oidc");
    Json(json!({
        "issuer": base,
        "authorization_endpoint": format!("{base}/v1/authorize"),
        "token_endpoint": format!("{base}/v1/token"),
        "grant_types_supported": [
            "client_credentials",
            "refresh_token",
            "urn:ietf:params:oauth:grant-type:token-exchange"
        ],
    }))
    .into_response()
}

async fn serving(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Refusals and injected faults are counted where they are decided.
    let admitted = inner.lock().admit_serving(&method, &uri, &headers, body);
    let response = match admitted {
        Ok(call) => call.respond(&inner.cancel, &inner.streams_abandoned).await,
        Err(refusal) => return refusal,
    };
    let mut state = inner.lock();
    if response.status().is_success() {
        state.stats.serving_ok += 1;
    } else {
        state.stats.serving_errors += 1;
    }
    response
}

async fn no_such_api(method: Method, uri: Uri) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "ENDPOINT_NOT_FOUND",
        &format!("No API found for '{method} {}'", uri.path()),
    )
}

/// A serving request that passed the bearer check and the fault queue.
struct ServingCall {
    behaviour: Behaviour,
    method: Method,
    uri: Uri,
    /// Without `Authorization`.
    headers: HeaderMap,
    caller: Caller,
    body: Bytes,
}

impl ServingCall {
    async fn respond(self, cancel: &CancellationToken, abandoned: &Arc<AtomicU64>) -> Response {
        match self.behaviour {
            Behaviour::Echo => self.echo(),
            Behaviour::Chat => self.chat(),
            Behaviour::ToolCall => self.tool_call(true),
            Behaviour::ToolCallOneChunk => self.tool_call(false),
            Behaviour::SlowStream => self.slow_stream(cancel, abandoned.clone()),
            Behaviour::SlowHeaders => {
                let delay = match self.param("delay_ms", 2000) {
                    Ok(ms) => Duration::from_millis(ms),
                    Err(refusal) => return refusal,
                };
                if !sleep_unless_cancelled(cancel, delay).await {
                    return shutting_down();
                }
                self.chat()
            }
            Behaviour::Status => self.status(),
        }
    }

    fn echo(&self) -> Response {
        let mut headers = Map::new();
        headers.insert(header::AUTHORIZATION.as_str().to_owned(), json!(REDACTED));
        for (name, value) in &self.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            match headers.get_mut(name.as_str()) {
                Some(Value::String(joined)) => {
                    joined.push_str(", ");
                    joined.push_str(&value);
                }
                _ => {
                    headers.insert(name.as_str().to_owned(), json!(value));
                }
            }
        }
        Json(json!({
            "method": self.method.as_str(),
            "path": self.uri.path(),
            "query": self.uri.query(),
            "headers": headers,
            "auth": {
                "valid": true,
                "token_id": self.caller.token_id,
                "kind": self.caller.kind.name(),
            },
            "body_len": self.body.len(),
            "body_sha256": sha256_hex(&self.body),
            "body_base64": BASE64.encode(&self.body),
            "body_text": std::str::from_utf8(&self.body).ok(),
        }))
        .into_response()
    }

    fn wants_stream(&self) -> bool {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|body| body.get("stream")?.as_bool())
            .unwrap_or(false)
    }

    fn completion(&self) -> Completion {
        Completion {
            id: format!("chatcmpl_{}", random_hex(12)),
            model: model_of(&self.body).unwrap_or_else(|| self.behaviour.name().to_owned()),
            created: now_ms() / 1000,
        }
    }

    fn chat(&self) -> Response {
        let completion = self.completion();
        if !self.wants_stream() {
            let message = json!({"role": "assistant", "content": CHAT_REPLY});
            return completion.whole(message);
        }
        let mut events: Vec<Bytes> = CHAT_REPLY_PIECES
            .iter()
            .enumerate()
            .map(|(i, piece)| {
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": piece})
                } else {
                    json!({"content": piece})
                };
                completion.chunk(delta, None)
            })
            .collect();
        events.push(completion.chunk(json!({}), Some("stop")));
        sse_response(events, Duration::ZERO, None)
    }

    fn tool_call(&self, split_arguments: bool) -> Response {
        let completion = self.completion();
        let call_id = format!("call_{}", random_hex(12));
        if !self.wants_stream() {
            let message = json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "id": call_id,
                    "type": "function",
                    "function": {"name": TOOL_CALL_NAME, "arguments": TOOL_CALL_ARGUMENTS},
                }],
            });
            return completion.whole(message);
        }
        let opening_arguments = if split_arguments {
            ""
        } else {
            TOOL_CALL_ARGUMENTS
        };
        let mut events = vec![completion.chunk(
            json!({
                "role": "assistant",
                "content": null,
                "tool_calls": [{
                    "index": 0,
                    "id": call_id,
                    "type": "function",
                    "function": {"name": TOOL_CALL_NAME, "arguments": opening_arguments},
                }],
            }),
            None,
        )];
        if split_arguments {
            events.extend(TOOL_CALL_ARGUMENT_PIECES.iter().map(|piece| {
                completion.chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    None,
                )
            }));
        }
        events.push(completion.chunk(json!({}), Some("stop")));
        sse_response(events, Duration::ZERO, None)
    }

    fn slow_stream(&self, cancel: &CancellationToken, abandoned: Arc<AtomicU64>) -> Response {
        let (delay_ms, count) = match (self.param("delay_ms", 100), self.param("events", 5)) {
            (Ok(delay_ms), Ok(count)) if count <= 100_000 => (delay_ms, count),
            (Err(refusal), _) | (_, Err(refusal)) => return refusal,
            _ => return bad_parameter("events must be at most 100000"),
        };
        let completion = self.completion();
        let events = (0..count)
            .map(|i| {
                let content = format!("part {i}; ");
                let delta = if i == 0 {
                    json!({"role": "assistant", "content": content})
                } else {
                    json!({"content": content})
                };
                let finish = (i + 1 == count).then_some("stop");
                completion.chunk(delta, finish)
            })
            .collect();
        let mut response = sse_response(
            events,
            Duration::from_millis(delay_ms),
            Some(cancel.clone()),
        );
        // Count a stream dropped before its end: a client disconnect must reach us through the proxy.
        let guard = AbandonGuard {
            abandoned,
            finished: false,
        };
        let body = std::mem::take(response.body_mut());
        let frames = futures_util::stream::unfold(
            (body.into_data_stream(), guard),
            |(mut frames, mut guard)| async move {
                match frames.next().await {
                    Some(frame) => Some((frame, (frames, guard))),
                    None => {
                        guard.mark_finished();
                        None
                    }
                }
            },
        );
        *response.body_mut() = Body::from_stream(frames);
        response
    }

    fn status(&self) -> Response {
        let status = match self.param("status", 500) {
            Ok(code) => u16::try_from(code)
                .ok()
                .filter(|code| (200..=599).contains(code))
                .and_then(|code| StatusCode::from_u16(code).ok()),
            Err(refusal) => return refusal,
        };
        let Some(status) = status else {
            return bad_parameter("status must be a final HTTP status code (200-599)");
        };
        let retry_after = match self.optional_param("retry_after") {
            Ok(retry_after) => retry_after,
            Err(refusal) => return refusal,
        };
        let mut response = match status.as_u16() {
            204 | 205 | 304 => status.into_response(),
            code if code < 400 => (status, Json(json!({ "status": code }))).into_response(),
            code => api_error(status, error_code(status), &format!("fake status {code}")),
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }

    /// `?name=` from the query, else header `x-fake-<name with - for _>`, else `default`.
    fn param(&self, name: &str, default: u64) -> Result<u64, Response> {
        Ok(self.optional_param(name)?.unwrap_or(default))
    }

    fn optional_param(&self, name: &str) -> Result<Option<u64>, Response> {
        let from_query = self.uri.query().and_then(|query| {
            query
                .split('&')
                .filter_map(|pair| pair.split_once('='))
                .find(|(key, _)| *key == name)
                .map(|(_, value)| value.to_owned())
        });
        let header_name = format!("x-fake-{}", name.replace('_', "-"));
        let from_header = || {
            self.headers
                .get(header_name.as_str())
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        match from_query.or_else(from_header) {
            None => Ok(None),
            Some(raw) => raw
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| bad_parameter(&format!("{name} must be a non-negative integer"))),
        }
    }
}

/// Shared fields of one chat completion and its chunks.
struct Completion {
    id: String,
    model: String,
    created: i64,
}

impl Completion {
    fn usage() -> Value {
        json!({"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21})
    }

    fn whole(&self, message: Value) -> Response {
        Json(json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": Self::usage(),
        }))
        .into_response()
    }

    /// One `data:` event; the finishing chunk also carries `usage`, as Databricks sends it.
    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Bytes {
        let mut chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        });
        if finish_reason.is_some() {
            chunk["usage"] = Self::usage();
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    }
}

/// An event stream of `events` then `data: [DONE]`, each after `delay` but the first. A
/// cancelled `cancel` ends the stream early (without `[DONE]`).
fn sse_response(
    mut events: Vec<Bytes>,
    delay: Duration,
    cancel: Option<CancellationToken>,
) -> Response {
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let cancel = cancel.unwrap_or_default();
    let frames =
        futures_util::stream::unfold((events.into_iter(), true), move |(mut events, first)| {
            let cancel = cancel.clone();
            async move {
                let event = events.next()?;
                if !first && !delay.is_zero() && !sleep_unless_cancelled(&cancel, delay).await {
                    return None;
                }
                Some((Ok::<_, Infallible>(event), (events, false)))
            }
        });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

struct AbandonGuard {
    abandoned: Arc<AtomicU64>,
    finished: bool,
}

impl AbandonGuard {
    fn mark_finished(&mut self) {
        self.finished = true;
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.abandoned
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// False when cancelled first.
async fn sleep_unless_cancelled(cancel: &CancellationToken, delay: Duration) -> bool {
    tokio::select! {
        () = tokio::time::sleep(delay) => true,
        () = cancel.cancelled() => false,
    }
}

fn shutting_down() -> Response {
    api_error(
        StatusCode::SERVICE_UNAVAILABLE,
        "TEMPORARILY_UNAVAILABLE",
        "The workspace is shutting down",
    )
}

fn api_error(status: StatusCode, error_code: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"error_code": error_code, "message": message})),
    )
        .into_response()
}

fn bad_parameter(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response()
}

/// The Databricks `error_code` that goes with an HTTP status.
fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "INVALID_PARAMETER_VALUE",
        401 => "UNAUTHENTICATED",
        403 => "PERMISSION_DENIED",
        404 => "RESOURCE_DOES_NOT_EXIST",
        409 => "RESOURCE_CONFLICT",
        429 => "REQUEST_LIMIT_EXCEEDED",
        501 => "NOT_IMPLEMENTED",
        503 => "TEMPORARILY_UNAVAILABLE",
        504 => "DEADLINE_EXCEEDED",
        code if code >= 500 => "INTERNAL_ERROR",
        _ => "BAD_REQUEST",
    }
}

/// The body as a JSON object; an empty body counts as `{}`.
fn json_object(body: &[u8]) -> Result<Map<String, Value>, Response> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(object)) => Ok(object),
        _ => Err(api_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
            "Invalid JSON given in the body of the request - expected a map",
        )),
    }
}

/// The API takes 64-bit integers as JSON numbers or as decimal strings.
fn integer_of(value: &Value) -> Option<i64> {
    match value {
        Value::Number(number) => number.as_i64(),
        Value::String(text) => text.parse().ok(),
        _ => None,
    }
}

fn model_of(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    Some(body.get("model")?.as_str()?.to_owned())
}

fn bearer_of(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let authorization = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = authorization.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(BASE64.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

/// `application/x-www-form-urlencoded` pairs, decoded.
fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            (form_decode(name), form_decode(value))
        })
        .collect()
}

fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|digits| u8::from_str_radix(digits, 16).ok());
        match (bytes[i], escaped) {
            (_, Some(byte)) => {
                decoded.push(byte);
                i += 3;
            }
            (b'+', None) => {
                decoded.push(b' ');
                i += 1;
            }
            (byte, None) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn random_hex(bytes: usize) -> String {
    let random: Vec<u8> = std::iter::repeat_with(|| fastrand::u8(..))
        .take(bytes)
        .collect();
    hex(&random)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut text, byte| {
        let _ = write!(text, "{byte:02x}");
        text
    })
}

fn now_ms() -> i64 {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    saturating_ms(since_epoch.as_millis())
}

fn saturating_ms(ms: u128) -> i64 {
    i64::try_from(ms).unwrap_or(i64::MAX)
}

fn system_time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or_default())
}
