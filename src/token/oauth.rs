//! OAuth M2M (service principal) tokens.
//!
//! With `DATABRICKS_CLIENT_ID` and `DATABRICKS_CLIENT_SECRET`, access tokens come from
//! `POST {host}/oidc/v1/token` (`grant_type=client_credentials`, `scope=all-apis`, the client
//! credentials as HTTP basic auth). One fetched token serves every request until it is
//! refreshed: [`OAuthSource::run`] fetches a new one once `min(TTL / 2, 20 min)` of its life
//! remains, as the Databricks SDKs do, and a rejected token triggers one shared fetch through
//! [`TokenSource::refresh`]. A failed refresh keeps the current token until it expires.
//!
//! The client secret is a [`Token`]: it never shows in `Debug` output or logs.
//!
//! ```no_run
//! use fresh_proxy::health::metrics::Metrics;
//! use fresh_proxy::token::oauth::{OAuthConfig, OAuthSource};
//! use fresh_proxy::token::status::{SourceKind, StatusCell, TokenStatus};
//! use fresh_token::Token;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() -> Result<(), fresh_token::InvalidToken> {
//! let config = OAuthConfig {
//!     host: "https://example.cloud.databricks.com".to_owned(),
//!     client_id: "6f1f0c4e-client-id".to_owned(),
//!     client_secret: Token::new("dose-client-secret")?,
//! };
//! let status = StatusCell::new(TokenStatus::new(SourceKind::Oauth));
//! let source = OAuthSource::new(config, reqwest::Client::new(), status, Metrics::new());
//! let cancel = CancellationToken::new();
//! tokio::spawn(source.clone().run(cancel.clone()));
//! // Stack FreshTokenLayer on `source`.
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use fresh_token::{RefreshFuture, SharedToken, Token, TokenSource};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::databricks::ApiError;
use crate::databricks::backoff::Backoff;
use crate::databricks::oidc::{AccessToken, DEFAULT_TTL, OidcClient};
use crate::health::metrics::{Metrics, RotationResult};
use crate::token::status::{SourceKind, StatusCell};

/// After a fetch made because upstream rejected a token, no other such fetch for this long. If
/// the token just fetched is rejected too, the cause is not its age (a 403 for a permission,
/// say), and a fetch per rejected request would only load the identity provider; if that fetch
/// failed, the background task retries with backoff.
pub const REJECTION_FETCH_INTERVAL: Duration = Duration::from_secs(30);

/// The longest lead: a token is refreshed at the latest this long before it expires.
pub const MAX_REFRESH_LEAD: Duration = Duration::from_secs(20 * 60);

/// The service principal's credentials and workspace.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    /// Workspace URL, without a trailing slash.
    pub host: String,
    /// `DATABRICKS_CLIENT_ID`.
    pub client_id: String,
    /// `DATABRICKS_CLIENT_SECRET`; prints as `****`.
    pub client_secret: Token,
}

/// How long before expiry a token of lifetime `ttl` is refreshed: `min(ttl / 2, 20 min)`.
pub fn refresh_lead(ttl: Duration) -> Duration {
    (ttl / 2).min(MAX_REFRESH_LEAD)
}

/// The delays between failed fetches, scaled to the token lifetime so that several retries
/// fit in the time a refresh has before expiry.
pub fn fetch_backoff(ttl: Duration) -> Backoff {
    Backoff {
        base: (ttl / 64).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        cap: (ttl / 8).clamp(Duration::from_millis(10), Duration::from_secs(60)),
    }
}

/// OAuth M2M access tokens, fetched once and shared. Clones share the token and the task.
#[derive(Clone)]
pub struct OAuthSource {
    inner: Arc<Inner>,
}

struct Inner {
    config: OAuthConfig,
    client: OidcClient,
    shared: SharedToken,
    status: StatusCell,
    metrics: Metrics,
    /// Concurrent fetches wait here and then reuse the one that finished. Holds when the last
    /// fetch for a rejected token started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// When the current token is due for refresh; `None` before the first fetch.
    schedule: Mutex<Option<Lifetime>>,
    /// Wakes [`OAuthSource::run`] after a fetch made on the request path.
    fetched: Notify,
}

#[derive(Clone, Copy, Debug)]
struct Lifetime {
    ttl: Duration,
    refresh_at: Instant,
    expires_at: Instant,
}

impl OAuthSource {
    /// A source for `config`. No network yet: the first token is fetched by
    /// [`OAuthSource::run`] or by the first [`TokenSource::refresh`].
    pub fn new(
        config: OAuthConfig,
        client: reqwest::Client,
        status: StatusCell,
        metrics: Metrics,
    ) -> Self {
        status.update(|s| {
            s.source = SourceKind::Oauth;
            s.rotating = false;
        });
        Self {
            inner: Arc::new(Inner {
                client: OidcClient::new(client, &config.host),
                config,
                shared: SharedToken::new(),
                status,
                metrics,
                fetching: tokio::sync::Mutex::new(None),
                schedule: Mutex::new(None),
                fetched: Notify::new(),
            }),
        }
    }

    /// The background task: fetch a token now, then refresh each one ahead of its expiry,
    /// until `cancel` fires. Failed fetches are retried with backoff; the current token stays
    /// in use until it expires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        loop {
            let schedule = *self.inner.lock_schedule();
            let due = match (schedule, retry_at) {
                (_, Some(at)) => at,
                (Some(lifetime), None) => lifetime.refresh_at,
                (None, None) => Instant::now(),
            };
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = self.inner.fetched.notified() => {
                    // Fetched on the request path: the schedule moved on.
                    retry_at = None;
                    failures = 0;
                    continue;
                }
                () = cancel.cancelled() => break,
            }
            let guard = self.inner.fetching.lock().await;
            // A refresh on the request path may have fetched while we waited for the lock.
            let fresh = self
                .inner
                .lock_schedule()
                .is_some_and(|l| l.refresh_at > Instant::now());
            if fresh {
                retry_at = None;
                failures = 0;
                continue;
            }
            let fetched = self.inner.fetch().await;
            drop(guard);
            match fetched {
                Ok(_) => {
                    retry_at = None;
                    failures = 0;
                }
                Err(err) => {
                    let ttl = schedule.map_or(DEFAULT_TTL, |l| l.ttl);
                    let delay =
                        fetch_backoff(ttl).delay(failures, fastrand::f64(), err.retry_after());
                    failures += 1;
                    retry_at = Some(Instant::now() + delay);
                    tracing::warn!(
                        attempt = failures,
                        retry_in_ms = delay.as_millis() as u64,
                        error = %err,
                        "fetching an OAuth access token failed; keeping the current token until it expires"
                    );
                }
            }
        }
        tracing::info!("OAuth token refresher stopped");
    }
}

impl Inner {
    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, Option<Lifetime>> {
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn current(&self) -> Option<Token> {
        self.shared
            .current()
            .filter(|token| !token.is_expired_at(SystemTime::now()))
    }

    /// One token request. Callers hold `fetching`.
    async fn fetch(&self) -> Result<Token, ApiError> {
        let result = self.request().await;
        match &result {
            Ok(token) => {
                let now = SystemTime::now();
                self.metrics.rotation(RotationResult::OauthOk);
                self.status.update(|s| {
                    s.source = SourceKind::Oauth;
                    s.present = true;
                    s.expires_at = token.expires_at();
                    s.dead = false;
                    s.last_rotation = Some(now);
                    s.rotations += 1;
                });
                tracing::info!(
                    expires_in_s = token
                        .expires_at()
                        .and_then(|at| at.duration_since(now).ok())
                        .map_or(0, |d| d.as_secs()),
                    "fetched an OAuth access token"
                );
            }
            Err(_) => self.metrics.rotation(RotationResult::OauthFailed),
        }
        result
    }

    async fn request(&self) -> Result<Token, ApiError> {
        let AccessToken { token, ttl } = self
            .client
            .client_credentials(&self.config.client_id, &self.config.client_secret)
            .await?;
        let now = Instant::now();
        *self.lock_schedule() = Some(Lifetime {
            ttl,
            refresh_at: now + ttl - refresh_lead(ttl),
            expires_at: now + ttl,
        });
        self.shared.publish(token.clone());
        Ok(token)
    }
}

impl TokenSource for OAuthSource {
    /// The fetched token while it is unexpired.
    fn current(&self) -> Option<Token> {
        self.inner.current()
    }

    /// One shared fetch: callers that arrive while a fetch runs get its result. At most one
    /// fetch per [`REJECTION_FETCH_INTERVAL`]: within it, a rejected token gets no other.
    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        RefreshFuture::new(async move {
            let mut last_fetch = self.inner.fetching.lock().await;
            if let Some(token) = self.inner.current().filter(|t| !t.same_secret(rejected)) {
                return Some(token);
            }
            if last_fetch.is_some_and(|at| at.elapsed() < REJECTION_FETCH_INTERVAL) {
                return None;
            }
            *last_fetch = Some(Instant::now());
            match self.inner.fetch().await {
                Ok(token) => {
                    self.inner.fetched.notify_one();
                    Some(token).filter(|t| !t.same_secret(rejected))
                }
                Err(err) => {
                    tracing::warn!(error = %err, "fetching an OAuth access token after a rejection failed");
                    None
                }
            }
        })
    }
}

impl fmt::Debug for OAuthSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let schedule = *self.inner.lock_schedule();
        f.debug_struct("OAuthSource")
            .field("host", &self.inner.config.host)
            .field("client_id", &self.inner.config.client_id)
            .field("client_secret", &self.inner.config.client_secret)
            .field("token", &self.inner.shared.current())
            .field("expires_at", &schedule.map(|l| l.expires_at))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_lead_table() {
        let cases = [
            (Duration::from_secs(3600), Duration::from_secs(20 * 60)),
            (Duration::from_secs(1800), Duration::from_secs(900)),
            (Duration::from_secs(4), Duration::from_secs(2)),
        ];
        for (ttl, lead) in cases {
            assert_eq!(refresh_lead(ttl), lead, "ttl {ttl:?}");
        }
    }

    #[test]
    fn debug_hides_the_secret() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let config = OAuthConfig {
            host: "https://h".to_owned(),
            client_id: "client".to_owned(),
            client_secret: Token::new("dose-very-secret").unwrap(),
        };
        let source = OAuthSource::new(
            config.clone(),
            reqwest::Client::new(),
            StatusCell::new(crate::token::status::TokenStatus::new(SourceKind::Oauth)),
            Metrics::new(),
        );
        for shown in [format!("{config:?}"), format!("{source:?}")] {
            assert!(!shown.contains("very-secret"), "{shown}");
            assert!(shown.contains("client"), "{shown}");
        }
    }
}
