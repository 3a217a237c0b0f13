//! The trust boundary: which requests may use the proxy's token at all.
//!
//! The proxy adds a workspace token to whatever reaches it, so whoever can reach it can spend
//! that token. Refused before anything is forwarded:
//!
//! * `TRACE` and `CONNECT` (405): a proxy that forwards them can be made to reflect or tunnel;
//! * a `Host` that does not name the listener (403): a web page that rebinds its own DNS name
//!   to 127.0.0.1 reaches the proxy with its own name in `Host`. Loopback names
//!   (`localhost`, `127.0.0.1`, `[::1]`) are allowed, with any port, plus `PROXY_ALLOWED_HOSTS`;
//! * a browser request from another site (403): an `Origin` whose host is not allowed, or
//!   `Sec-Fetch-Site: cross-site` without an allowed `Origin`; agents send neither;
//! * with `PROXY_CLIENT_KEY` set, a request without that key as `Authorization: Bearer <key>` or
//!   `x-api-key` (401). The key is never forwarded: `Authorization` is replaced by the token,
//!   `x-api-key` removed.
//!
//! `GET /health` and `GET /ready` stay open to any `Host` and need no key: probes (a container
//! healthcheck, a kubernetes probe sending the pod's address as `Host`) use them, and they hold
//! no secret and spend no token. `/metrics` is guarded like forwarding.

use std::borrow::Cow;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::Json;
use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready, ready};
use http::header::{AUTHORIZATION, HOST, ORIGIN, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use ring::digest::{SHA256, digest};
use serde_json::json;
use tower::{Layer, Service};

/// The header some clients (Anthropic's, among others) carry their key in.
const X_API_KEY: &str = "x-api-key";

/// Names every listener answers to.
const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];

/// The key clients must present when `PROXY_CLIENT_KEY` is set. Only its SHA-256 digest is
/// kept, and comparing digests takes the same time wherever the presented key differs.
#[derive(Clone)]
pub struct ClientKey([u8; 32]);

impl std::fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKey(****)")
    }
}

/// Why a value cannot be a client key; the message never shows the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the key must be visible ASCII without spaces, as it travels in a header")]
pub struct InvalidClientKey;

impl ClientKey {
    /// `value`, trimmed; it must be sendable as a bearer token.
    pub fn new(value: &str) -> Result<Self, InvalidClientKey> {
        let value = value.trim();
        if value.is_empty() || !value.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
            return Err(InvalidClientKey);
        }
        Ok(Self(fingerprint(value.as_bytes())))
    }

    fn matches(&self, presented: &[u8]) -> bool {
        fingerprint(presented) == self.0
    }
}

fn fingerprint(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// Who may use the proxy: the `Host` names it answers to and the client key, if any.
#[derive(Clone, Debug)]
pub struct ClientPolicy {
    hosts: Arc<[String]>,
    key: Option<ClientKey>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        Self::loopback()
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `TRACE` or `CONNECT`.
    Method,
    /// No `Host` header and no authority in the request target.
    NoHost,
    /// A `Host` the proxy does not answer to.
    ForeignHost,
    /// A browser request from another site.
    ForeignOrigin,
    /// `PROXY_CLIENT_KEY` is set and the request does not carry it.
    NoClientKey,
}

impl Refusal {
    /// The status of the answer.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::NoHost => StatusCode::BAD_REQUEST,
            Self::ForeignHost | Self::ForeignOrigin => StatusCode::FORBIDDEN,
            Self::NoClientKey => StatusCode::UNAUTHORIZED,
        }
    }

    /// The error `type` of the answer's JSON.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Method => "method_not_allowed",
            Self::NoHost => "bad_request",
            Self::ForeignHost => "host_not_allowed",
            Self::ForeignOrigin => "origin_not_allowed",
            Self::NoClientKey => "client_key_required",
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::Method => "TRACE and CONNECT are not served",
            Self::NoHost => "the request has no Host header",
            Self::ForeignHost => {
                "the Host header names a host this proxy does not answer to (see PROXY_ALLOWED_HOSTS)"
            }
            Self::ForeignOrigin => "requests from web pages of other sites are refused",
            Self::NoClientKey => {
                "this proxy requires its client key (PROXY_CLIENT_KEY) as `Authorization: Bearer <key>` or `x-api-key`"
            }
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "type": self.kind(), "message": self.message() } });
        let mut res = (self.status(), Json(body)).into_response();
        match self {
            Self::Method => {
                res.headers_mut().insert(
                    http::header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            Self::NoClientKey => {
                res.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::NoHost | Self::ForeignHost | Self::ForeignOrigin => {}
        }
        res
    }
}

impl ClientPolicy {
    /// Loopback names only, no client key.
    pub fn loopback() -> Self {
        Self {
            hosts: LOOPBACK_NAMES.iter().map(|&name| name.to_owned()).collect(),
            key: None,
        }
    }

    /// Also answer to `names` (host names or addresses, as [`host_name`] gives them).
    pub fn allow_hosts(mut self, names: impl IntoIterator<Item = String>) -> Self {
        let mut hosts = self.hosts.to_vec();
        hosts.extend(
            names
                .into_iter()
                .filter_map(|name| host_name(&name).map(Cow::into_owned)),
        );
        self.hosts = hosts.into();
        self
    }

    /// Require `key` of every client.
    pub fn require_key(mut self, key: ClientKey) -> Self {
        self.key = Some(key);
        self
    }

    /// Whether a client key is required.
    pub fn requires_key(&self) -> bool {
        self.key.is_some()
    }

    fn allows_host(&self, authority: &str) -> bool {
        host_name(authority).is_some_and(|name| self.hosts.iter().any(|host| **host == *name))
    }

    /// Whether `method`, `path`, `target_host` (the authority of the request target, for
    /// HTTP/2) and `headers` may pass.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        target_host: Option<&str>,
        headers: &HeaderMap,
    ) -> Result<(), Refusal> {
        if *method == Method::TRACE || *method == Method::CONNECT {
            return Err(Refusal::Method);
        }
        if matches!(*method, Method::GET | Method::HEAD) && matches!(path, "/health" | "/ready") {
            return Ok(());
        }
        let host = headers
            .get(HOST)
            .and_then(|v| v.to_str().ok())
            .or(target_host)
            .ok_or(Refusal::NoHost)?;
        if !self.allows_host(host) {
            return Err(Refusal::ForeignHost);
        }
        match headers
            .get(ORIGIN)
            .map(|v| v.to_str().ok().and_then(origin_authority))
        {
            // `Origin: null` (a sandboxed or file page) or an unreadable one has no allowed host.
            Some(None) => return Err(Refusal::ForeignOrigin),
            Some(Some(origin)) if !self.allows_host(origin) => return Err(Refusal::ForeignOrigin),
            Some(Some(_)) => {}
            None => {
                let site = headers.get("sec-fetch-site").map(HeaderValue::as_bytes);
                if matches!(site, Some(b"cross-site" | b"same-site")) {
                    return Err(Refusal::ForeignOrigin);
                }
            }
        }
        match &self.key {
            Some(key) if !presents(key, headers) => Err(Refusal::NoClientKey),
            _ => Ok(()),
        }
    }
}

/// Whether `headers` carry `key`, as a bearer token or in `x-api-key`.
fn presents(key: &ClientKey, headers: &HeaderMap) -> bool {
    let bearer = headers
        .get_all(AUTHORIZATION)
        .iter()
        .filter_map(|v| bearer_value(v.as_bytes()));
    let api_key = headers.get_all(X_API_KEY).iter().map(HeaderValue::as_bytes);
    bearer
        .chain(api_key)
        .any(|presented| key.matches(trim(presented)))
}

fn bearer_value(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// `https://example.com:8443` to `example.com:8443`; `None` for `null` and anything else.
fn origin_authority(origin: &str) -> Option<&str> {
    let (_, rest) = origin.trim().split_once("://")?;
    Some(rest.trim_end_matches('/'))
}

/// The host of `authority` (`name`, `name:port`, `1.2.3.4:port`, `[::1]:port`), lower-case,
/// without port or trailing dot; `None` if it is not a host name or address. Borrowed from
/// `authority` unless it has upper-case letters: every request's `Host` is checked.
pub fn host_name(authority: &str) -> Option<Cow<'_, str>> {
    let authority = authority.trim();
    let host = if let Some(rest) = authority.strip_prefix('[') {
        let (inside, after) = rest.split_once(']')?;
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        if inside.is_empty()
            || !inside
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return None;
        }
        // The brackets and what is inside them.
        return Some(lower_case(&authority[..inside.len() + 2]));
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) if is_port(port) => host,
            Some(_) => return None,
            None => authority,
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    valid.then(|| lower_case(host))
}

fn lower_case(text: &str) -> Cow<'_, str> {
    if text.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(text.to_ascii_lowercase())
    } else {
        Cow::Borrowed(text)
    }
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// Applies a [`ClientPolicy`] in front of a service.
#[derive(Clone, Debug)]
pub struct ClientGuardLayer {
    policy: ClientPolicy,
}

impl ClientGuardLayer {
    /// A layer refusing what `policy` refuses.
    pub fn new(policy: ClientPolicy) -> Self {
        Self { policy }
    }
}

impl<S> Layer<S> for ClientGuardLayer {
    type Service = ClientGuard<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientGuard {
            inner,
            policy: self.policy.clone(),
        }
    }
}

/// The service of [`ClientGuardLayer`]: refused requests are answered here and never reach
/// `inner`; admitted ones lose `x-api-key` when a client key is required.
#[derive(Clone, Debug)]
pub struct ClientGuard<S> {
    inner: S,
    policy: ClientPolicy,
}

impl<S> ClientGuard<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, unwrapped.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, B> Service<Request<B>> for ClientGuard<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let checked = self.policy.check(
            req.method(),
            req.uri().path(),
            req.uri().authority().map(|a| a.as_str()),
            req.headers(),
        );
        if let Err(refusal) = checked {
            return Either::Left(ready(Ok(refusal.into_response())));
        }
        if self.policy.requires_key() {
            req.headers_mut().remove(X_API_KEY);
        }
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    HeaderValue::from_str(value).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn host_names_are_parsed_from_authorities() {
        let cases = [
            ("localhost", Some("localhost")),
            ("LocalHost:4000", Some("localhost")),
            ("localhost.:4000", Some("localhost")),
            ("127.0.0.1:4000", Some("127.0.0.1")),
            ("[::1]:4000", Some("[::1]")),
            ("[::1]", Some("[::1]")),
            ("fresh-proxy:4000", Some("fresh-proxy")),
            ("::1", None),
            ("evil.example:4000:1", None),
            ("localhost:http", None),
            ("[::1]x", None),
            ("", None),
            ("a b", None),
            ("user@localhost", None),
        ];
        for (authority, expected) in cases {
            assert_eq!(host_name(authority).as_deref(), expected, "{authority:?}");
        }
        // A name already in lower case is not copied.
        assert!(matches!(
            host_name("localhost:4000"),
            Some(Cow::Borrowed("localhost"))
        ));
        assert!(matches!(
            host_name("[::1]:4000"),
            Some(Cow::Borrowed("[::1]"))
        ));
        assert!(matches!(host_name("LocalHost"), Some(Cow::Owned(_))));
    }

    /// Policy, method, path, headers, outcome.
    type Case<'a> = (
        &'a ClientPolicy,
        Method,
        &'a str,
        &'a [(&'a str, &'a str)],
        Result<(), Refusal>,
    );

    #[test]
    fn requests_are_checked_in_order() {
        let key = ClientKey::new("client-key-123").unwrap();
        let open = ClientPolicy::loopback().allow_hosts(["fresh-proxy".to_owned()]);
        let locked = open.clone().require_key(key);
        let local = ("host", "127.0.0.1:4000");
        let cases: &[Case<'_>] = &[
            (&open, Method::POST, "/chat", &[local], Ok(())),
            (
                &open,
                Method::POST,
                "/chat",
                &[("host", "localhost")],
                Ok(()),
            ),
            (&open, Method::POST, "/chat", &[("host", "[::1]:9")], Ok(())),
            (
                &open,
                Method::POST,
                "/chat",
                &[("host", "fresh-proxy:4000")],
                Ok(()),
            ),
            (
                &open,
                Method::POST,
                "/chat",
                &[("host", "rebound.example:4000")],
                Err(Refusal::ForeignHost),
            ),
            (
                &open,
                Method::POST,
                "/chat",
                &[("host", "127.0.0.2:4000")],
                Err(Refusal::ForeignHost),
            ),
            (&open, Method::POST, "/chat", &[], Err(Refusal::NoHost)),
            (
                &open,
                Method::TRACE,
                "/chat",
                &[local],
                Err(Refusal::Method),
            ),
            (
                &open,
                Method::CONNECT,
                "/health",
                &[local],
                Err(Refusal::Method),
            ),
            // Probes reach /health and /ready by any name, without a key.
            (
                &locked,
                Method::GET,
                "/health",
                &[("host", "10.1.2.3:4000")],
                Ok(()),
            ),
            (&locked, Method::GET, "/ready", &[], Ok(())),
            (
                &locked,
                Method::GET,
                "/metrics",
                &[local],
                Err(Refusal::NoClientKey),
            ),
            (
                &open,
                Method::POST,
                "/chat",
                &[local, ("origin", "http://localhost:3000")],
                Ok(()),
            ),
            (
                &open,
                Method::POST,
                "/chat",
                &[local, ("origin", "https://evil.example")],
                Err(Refusal::ForeignOrigin),
            ),
            (
                &open,
                Method::POST,
                "/chat",
                &[local, ("origin", "null")],
                Err(Refusal::ForeignOrigin),
            ),
            (
                &open,
                Method::GET,
                "/chat",
                &[local, ("sec-fetch-site", "cross-site")],
                Err(Refusal::ForeignOrigin),
            ),
            (
                &open,
                Method::GET,
                "/chat",
                &[local, ("sec-fetch-site", "none")],
                Ok(()),
            ),
            (
                &locked,
                Method::POST,
                "/chat",
                &[local],
                Err(Refusal::NoClientKey),
            ),
            (
                &locked,
                Method::POST,
                "/chat",
                &[local, ("authorization", "Bearer wrong")],
                Err(Refusal::NoClientKey),
            ),
            (
                &locked,
                Method::POST,
                "/chat",
                &[local, ("authorization", "Bearer client-key-123")],
                Ok(()),
            ),
            (
                &locked,
                Method::POST,
                "/chat",
                &[local, ("authorization", "bearer client-key-123")],
                Ok(()),
            ),
            (
                &locked,
                Method::POST,
                "/chat",
                &[local, ("x-api-key", "client-key-123")],
                Ok(()),
            ),
            (
                &locked,
                Method::POST,
                "/chat",
                &[local, ("authorization", "client-key-123")],
                Err(Refusal::NoClientKey),
            ),
            // The key does not open a foreign Host.
            (
                &locked,
                Method::POST,
                "/chat",
                &[("host", "evil.example"), ("x-api-key", "client-key-123")],
                Err(Refusal::ForeignHost),
            ),
        ];
        for (policy, method, path, pairs, expected) in cases {
            let got = policy.check(method, path, None, &headers(pairs));
            assert_eq!(got, *expected, "{method} {path} {pairs:?}");
        }
        // HTTP/2 carries the host in the request target.
        assert_eq!(
            open.check(
                &Method::POST,
                "/chat",
                Some("localhost:4000"),
                &HeaderMap::new()
            ),
            Ok(())
        );
    }

    #[test]
    fn client_keys_never_print() {
        let key = ClientKey::new("client-key-123").unwrap();
        assert_eq!(format!("{key:?}"), "ClientKey(****)");
        let policy = ClientPolicy::loopback().require_key(key);
        assert!(!format!("{policy:?}").contains("client-key-123"));
        assert!(ClientKey::new("has space").is_err());
        assert!(ClientKey::new("  ").is_err());
        assert!(!ClientKey::new("x").unwrap().matches(b"y"));
    }
}
