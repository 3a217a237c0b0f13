//! A token that some [`Fetch`] obtains and that is refreshed ahead of its expiry: the shared
//! machinery of the OAuth M2M, `databricks-cli` and workload identity methods.
//!
//! One fetch at a time in the process (single flight: callers that arrive during a fetch get
//! its result), a refresh once `min(TTL / 2, 20 min)` of a token's life remains as the SDKs do
//! (Go: `computeAsyncRefreshLeadTime` in `config/experimental/auth/cache.go`), retries with
//! [`Backoff`], and the current token kept until it expires when a refresh fails. A failure
//! that needs a person sets [`TokenStatus::action`](crate::token::status::TokenStatus) and logs
//! one warning, not one per attempt.

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use fresh_token::{RefreshFuture, SharedToken, Token, TokenSource};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::databricks::backoff::Backoff;
use crate::databricks::{ApiError, ErrorKind};
use crate::health::metrics::{Metrics, RotationResult};
use crate::token::status::{SourceKind, StatusCell};

/// After a fetch made because upstream rejected a token, no other such fetch for this long. If
/// the token just fetched is rejected too, the cause is not its age (a 403 for a permission,
/// say), and a fetch per rejected request would only load the identity provider; if that fetch
/// failed, the background task retries with backoff.
pub const REJECTION_FETCH_INTERVAL: Duration = Duration::from_secs(30);

/// The longest lead: a token is refreshed at the latest this long before it expires.
pub const MAX_REFRESH_LEAD: Duration = Duration::from_secs(20 * 60);

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

/// A token just obtained.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The token, its expiry attached.
    pub token: Token,
    /// When it expires.
    pub expiry: SystemTime,
}

/// How a method obtains a token.
pub trait Fetch: Send + Sync + fmt::Debug + 'static {
    /// A token to use instead of `current` (the one held, or the one upstream rejected).
    fn fetch(
        &self,
        current: Option<Token>,
    ) -> impl Future<Output = Result<Fetched, ApiError>> + Send;

    /// What a person must do when [`Fetch::fetch`] fails with [`ErrorKind::Auth`].
    fn action(&self) -> String;
}

/// Tokens from `F`, fetched once and shared. Clones share the token and the task.
pub struct RefreshingSource<F> {
    inner: Arc<Inner<F>>,
}

impl<F> Clone for RefreshingSource<F> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

struct Inner<F> {
    fetcher: F,
    kind: SourceKind,
    shared: SharedToken,
    status: StatusCell,
    metrics: Metrics,
    /// Single flight; holds when the last fetch for a rejected token started.
    fetching: tokio::sync::Mutex<Option<Instant>>,
    /// When the current token is due for refresh, and its lifetime.
    schedule: Mutex<Option<(SystemTime, Duration)>>,
    /// Wakes the background task after a fetch made on the request path.
    fetched: Notify,
}

/// Without a token, failures are retried at this pace.
const FIRST_TTL: Duration = Duration::from_secs(60);

impl<F: Fetch> RefreshingSource<F> {
    /// A source that fetches with `fetcher` and publishes its state as `kind`.
    pub fn new(fetcher: F, kind: SourceKind, status: StatusCell, metrics: Metrics) -> Self {
        status.update(|s| {
            s.source = kind;
            s.rotating = false;
        });
        Self {
            inner: Arc::new(Inner {
                fetcher,
                kind,
                shared: SharedToken::new(),
                status,
                metrics,
                fetching: tokio::sync::Mutex::new(None),
                schedule: Mutex::new(None),
                fetched: Notify::new(),
            }),
        }
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &F {
        &self.inner.fetcher
    }

    /// The background task: fetch now, then refresh each token ahead of its expiry, until
    /// `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut failures = 0u32;
        let mut retry_at: Option<Instant> = None;
        loop {
            let schedule = *self.inner.lock_schedule();
            let due = match (schedule, retry_at) {
                (_, Some(at)) => at,
                (Some((at, _)), None) => instant_of(at),
                (None, None) => Instant::now(),
            };
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = self.inner.fetched.notified() => {
                    retry_at = None;
                    failures = 0;
                    continue;
                }
                () = cancel.cancelled() => break,
            }
            let guard = self.inner.fetching.lock().await;
            let fresh = self
                .inner
                .lock_schedule()
                .is_some_and(|(at, _)| at > SystemTime::now());
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
                    let ttl = schedule.map_or(FIRST_TTL, |(_, ttl)| ttl);
                    let backoff: Backoff = fetch_backoff(ttl);
                    let delay = if err.kind() == ErrorKind::Auth {
                        // A person has to act; look again now and then, without hammering.
                        backoff.cap
                    } else {
                        backoff.delay(failures, fastrand::f64(), err.retry_after())
                    };
                    failures += 1;
                    retry_at = Some(Instant::now() + delay);
                    if err.kind() != ErrorKind::Auth {
                        tracing::warn!(
                            source = self.inner.kind.name(),
                            attempt = failures,
                            retry_in_ms = delay.as_millis() as u64,
                            error = %err,
                            "refreshing the token failed; keeping the current token until it expires"
                        );
                    }
                }
            }
        }
        tracing::info!(source = self.inner.kind.name(), "token refresher stopped");
    }
}

/// When a token that expires at `expiry` after living `ttl` is refreshed: `min(ttl / 2, 20 min)`
/// before its expiry, as the SDKs do. For every token of a minute or more that is at least
/// 30 s before the hard edge; a shorter token is refreshed at half its life.
pub fn refresh_due(expiry: SystemTime, ttl: Duration) -> SystemTime {
    expiry - refresh_lead(ttl)
}

/// The tokio instant of wall-clock time `at` (now when it has passed).
fn instant_of(at: SystemTime) -> Instant {
    Instant::now() + at.duration_since(SystemTime::now()).unwrap_or_default()
}

impl<F: Fetch> Inner<F> {
    fn lock_schedule(&self) -> std::sync::MutexGuard<'_, Option<(SystemTime, Duration)>> {
        self.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The rotation results this source counts: OAuth M2M keeps the names it always had.
    fn results(&self) -> (RotationResult, RotationResult) {
        match self.kind {
            SourceKind::Oauth => (RotationResult::OauthOk, RotationResult::OauthFailed),
            _ => (RotationResult::RefreshOk, RotationResult::RefreshFailed),
        }
    }

    fn current(&self) -> Option<Token> {
        self.shared
            .current()
            .filter(|token| !token.is_expired_at(SystemTime::now()))
    }

    /// One fetch. Callers hold `fetching`.
    async fn fetch(&self) -> Result<Token, ApiError> {
        let result = self.fetcher.fetch(self.shared.current()).await;
        let now = SystemTime::now();
        match result {
            Ok(Fetched { token, expiry }) => {
                let ttl = expiry.duration_since(now).unwrap_or_default();
                *self.lock_schedule() = Some((refresh_due(expiry, ttl), ttl));
                self.shared.publish(token.clone());
                self.metrics.rotation(self.results().0);
                let had_action = self.status.get().action.is_some();
                self.status.update(|s| {
                    s.present = true;
                    s.expires_at = Some(expiry);
                    s.dead = false;
                    s.last_rotation = Some(now);
                    s.rotations += 1;
                    s.action = None;
                });
                if had_action {
                    tracing::info!(source = self.kind.name(), "token refresh works again");
                }
                tracing::info!(
                    source = self.kind.name(),
                    expires_in_s = ttl.as_secs(),
                    "obtained a new access token"
                );
                Ok(token)
            }
            Err(err) => {
                self.metrics.rotation(self.results().1);
                if err.kind() == ErrorKind::Auth {
                    let action = self.fetcher.action();
                    let first = self.status.get().action.is_none();
                    self.status.update(|s| s.action = Some(action.clone()));
                    if first {
                        tracing::warn!(
                            source = self.kind.name(),
                            error = %err,
                            "the token cannot be refreshed without a person; {action}"
                        );
                    }
                }
                Err(err)
            }
        }
    }
}

impl<F: Fetch> TokenSource for RefreshingSource<F> {
    /// The fetched token while it is unexpired.
    fn current(&self) -> Option<Token> {
        self.inner.current()
    }

    /// One shared fetch; at most one per [`REJECTION_FETCH_INTERVAL`] for rejected tokens.
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
                    tracing::warn!(source = self.inner.kind.name(), error = %err, "refreshing a rejected token failed");
                    None
                }
            }
        })
    }
}

impl<F: Fetch> fmt::Debug for RefreshingSource<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingSource")
            .field("fetcher", &self.inner.fetcher)
            .field("token", &self.inner.shared.current())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::UNIX_EPOCH;

    use crate::token::status::TokenStatus;

    /// Hands out `tok-N` for the N-th fetch after a pause, or fails as told.
    #[derive(Debug, Default)]
    struct Counting {
        fetches: AtomicU32,
        fail: Option<ErrorKind>,
    }

    impl Fetch for Counting {
        async fn fetch(&self, _current: Option<Token>) -> Result<Fetched, ApiError> {
            let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(kind) = self.fail {
                return Err(ApiError::new(kind, "test", "no"));
            }
            let expiry = SystemTime::now() + Duration::from_secs(600);
            Ok(Fetched {
                token: Token::with_expiry(format!("tok-{n}"), expiry).unwrap(),
                expiry,
            })
        }

        fn action(&self) -> String {
            "run: something".to_owned()
        }
    }

    fn source(fail: Option<ErrorKind>) -> RefreshingSource<Counting> {
        RefreshingSource::new(
            Counting {
                fail,
                ..Counting::default()
            },
            SourceKind::DatabricksCli,
            StatusCell::new(TokenStatus::new(SourceKind::DatabricksCli)),
            Metrics::new(),
        )
    }

    #[tokio::test]
    async fn concurrent_refreshes_share_one_fetch() {
        let source = source(None);
        let rejected = Token::new("tok-0").unwrap();
        let refreshes = (0..10).map(|_| source.refresh(&rejected));
        let tokens = futures_util::future::join_all(refreshes).await;
        assert_eq!(source.fetcher().fetches.load(Ordering::SeqCst), 1);
        for token in tokens {
            assert_eq!(token.unwrap().expose_secret(), "tok-1");
        }
        assert_eq!(source.current().unwrap().expose_secret(), "tok-1");
        assert_eq!(source.inner.status.get().rotations, 1);
    }

    #[tokio::test]
    async fn a_failure_that_needs_a_person_is_published_once() {
        let source = source(Some(ErrorKind::Auth));
        let rejected = Token::new("tok-0").unwrap();
        assert!(source.refresh(&rejected).await.is_none());
        assert_eq!(
            source.inner.status.get().action.as_deref(),
            Some("run: something")
        );
        // Within the rejection interval, no second fetch.
        assert!(source.refresh(&rejected).await.is_none());
        assert_eq!(source.fetcher().fetches.load(Ordering::SeqCst), 1);
        let transient = self::source(Some(ErrorKind::Transient));
        assert!(transient.refresh(&rejected).await.is_none());
        assert_eq!(transient.inner.status.get().action, None);
    }

    #[test]
    fn refresh_lead_table() {
        let expiry = UNIX_EPOCH + Duration::from_secs(100_000);
        let secs = Duration::from_secs;
        let cases = [
            (secs(3600), secs(20 * 60)),
            (secs(7200), secs(20 * 60)),
            (secs(1800), secs(900)),
            (secs(60), secs(30)),
            (secs(12), secs(6)),
        ];
        for (ttl, lead) in cases {
            assert_eq!(refresh_due(expiry, ttl), expiry - lead, "ttl {ttl:?}");
        }
        for ttl in (60..=7200).step_by(7).map(secs) {
            let margin = expiry.duration_since(refresh_due(expiry, ttl)).unwrap();
            assert!(margin >= secs(30), "ttl {ttl:?}: {margin:?} before expiry");
        }
    }
}
