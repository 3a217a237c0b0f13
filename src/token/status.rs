//! What the proxy knows about its token and its traffic, shared between the rotator, the
//! forwarding path and `/health`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Serialize;

/// Where the current token comes from, as `/health` names it: the auth method, and for PATs
/// whether this process rotates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SourceKind {
    /// `pat-rotating`: minted by the rotator in this process.
    #[serde(rename = "pat-rotating")]
    Rotator,
    /// `pat-file`: read from the config file (follower mode, or a bootstrap token from the
    /// profile).
    #[serde(rename = "pat-file")]
    File,
    /// `oauth-m2m`: an OAuth M2M access token.
    #[serde(rename = "oauth-m2m")]
    Oauth,
    /// `env`: `DATABRICKS_TOKEN`.
    #[serde(rename = "env")]
    Env,
    /// `databricks-cli`: a U2M token from `databricks auth token`.
    #[serde(rename = "databricks-cli")]
    DatabricksCli,
    /// `env-oidc`: workload identity federation, the JWT from an environment variable.
    #[serde(rename = "env-oidc")]
    EnvOidc,
    /// `file-oidc`: workload identity federation, the JWT from a file.
    #[serde(rename = "file-oidc")]
    FileOidc,
}

impl SourceKind {
    /// The name `/health` gives it.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Rotator => "pat-rotating",
            Self::File => "pat-file",
            Self::Oauth => "oauth-m2m",
            Self::Env => "env",
            Self::DatabricksCli => "databricks-cli",
            Self::EnvOidc => "env-oidc",
            Self::FileOidc => "file-oidc",
        }
    }
}

/// How close the token is to expiry, as `/health` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenState {
    /// More than [`EXPIRING_WITHIN`] left, or no known expiry.
    Fresh,
    /// Less than [`EXPIRING_WITHIN`] left.
    Expiring,
    /// Past its expiry, or rejected as dead.
    Expired,
    /// No token at all.
    Missing,
}

/// A token with less than this left is reported as `expiring`.
pub const EXPIRING_WITHIN: Duration = Duration::from_secs(120);

/// A snapshot of the token's life, published by whoever owns the token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenStatus {
    /// Where the token comes from.
    pub source: SourceKind,
    /// Whether a token is held at all.
    pub present: bool,
    /// When the token expires, if known.
    pub expires_at: Option<SystemTime>,
    /// Set when the token is known to be dead before its expiry (revoked, rejected).
    pub dead: bool,
    /// When this process last rotated (or refreshed) the token.
    pub last_rotation: Option<SystemTime>,
    /// Rotations (or OAuth refreshes) done by this process.
    pub rotations: u64,
    /// Whether this process holds the rotation lock.
    pub rotating: bool,
    /// Why the rotation lock file cannot be opened, while it cannot: this process could not
    /// take over rotation if the holder stopped. A path and an OS error, never a secret.
    pub lock_error: Option<String>,
    /// `PAT_COORDINATION`: what elects the rotator.
    pub coordination: crate::token::rotator::coordination::Backend,
    /// Why the coordination backend (etcd) cannot be reached, while it cannot: this process
    /// serves its current token but neither rotates nor learns new tokens.
    pub coordination_error: Option<String>,
    /// The token in use has not reached the config file, the state file or a sink: readers
    /// of those files still hold an older token, and a restart would not know this one.
    pub persist_failed: bool,
    /// What a person must do before a token can be had again (`run: databricks auth login
    /// ...`), set when a refresh failed for a reason no retry can cure.
    pub action: Option<String>,
}

impl TokenStatus {
    /// A status for a token of `source` with nothing else known yet.
    pub fn new(source: SourceKind) -> Self {
        Self {
            source,
            present: false,
            expires_at: None,
            dead: false,
            last_rotation: None,
            rotations: 0,
            rotating: false,
            lock_error: None,
            coordination: crate::token::rotator::coordination::Backend::File,
            coordination_error: None,
            persist_failed: false,
            action: None,
        }
    }

    /// `/health`'s `token.role`: `rotator` when this process obtains its tokens itself (it
    /// holds the rotation lock, or refreshes an OAuth, CLI or federated token), `follower` when
    /// it serves a token that another process or a person puts in the config file or the
    /// environment.
    pub fn role(&self) -> &'static str {
        match self.source {
            SourceKind::Rotator if self.rotating => "rotator",
            SourceKind::Rotator | SourceKind::File | SourceKind::Env => "follower",
            SourceKind::Oauth
            | SourceKind::DatabricksCli
            | SourceKind::EnvOidc
            | SourceKind::FileOidc => "rotator",
        }
    }

    /// Whether something needs a person although the token itself may be fine: the lock file
    /// cannot be opened, or new tokens cannot be saved.
    pub fn files_failing(&self) -> bool {
        self.lock_error.is_some() || self.persist_failed || self.coordination_error.is_some()
    }

    /// The state at `now`.
    pub fn state_at(&self, now: SystemTime) -> TokenState {
        if !self.present {
            return TokenState::Missing;
        }
        if self.dead {
            return TokenState::Expired;
        }
        match self.expires_at.map(|at| at.duration_since(now)) {
            None => TokenState::Fresh,
            Some(Err(_)) => TokenState::Expired,
            Some(Ok(left)) if left.is_zero() => TokenState::Expired,
            Some(Ok(left)) if left < EXPIRING_WITHIN => TokenState::Expiring,
            Some(Ok(_)) => TokenState::Fresh,
        }
    }

    /// Whole seconds to expiry at `now` (negative once expired), if the expiry is known.
    pub fn expires_in_s(&self, now: SystemTime) -> Option<i64> {
        self.expires_at.map(|at| match at.duration_since(now) {
            Ok(left) => left.as_secs() as i64,
            Err(past) => -(past.duration().as_secs() as i64),
        })
    }
}

/// The published [`TokenStatus`]: written by one owner, read by `/health`, `/ready` and
/// `/metrics` without locks.
#[derive(Clone, Debug)]
pub struct StatusCell(Arc<ArcSwap<TokenStatus>>);

impl StatusCell {
    /// A cell holding `status`.
    pub fn new(status: TokenStatus) -> Self {
        Self(Arc::new(ArcSwap::from_pointee(status)))
    }

    /// The current snapshot.
    pub fn get(&self) -> Arc<TokenStatus> {
        self.0.load_full()
    }

    /// Change the snapshot. Only the token's owner calls this, so read-modify-write is safe.
    pub fn update(&self, change: impl FnOnce(&mut TokenStatus)) {
        let mut next = (*self.0.load_full()).clone();
        change(&mut next);
        self.0.store(Arc::new(next));
    }
}

/// When the proxy last forwarded a request: the session signal used when `PAT_SESSIONS_URL` is
/// unset.
#[derive(Clone, Debug, Default)]
pub struct Activity(Arc<AtomicU64>);

impl Activity {
    /// Record a proxied request at `now`.
    pub fn record(&self, now: SystemTime) {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        self.0.fetch_max(secs, Ordering::Relaxed);
    }

    /// The last proxied request, if any.
    pub fn last(&self) -> Option<SystemTime> {
        match self.0.load(Ordering::Relaxed) {
            0 => None,
            secs => Some(UNIX_EPOCH + Duration::from_secs(secs)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_at_table() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let status = |present, dead, expires_at: Option<u64>| TokenStatus {
            present,
            dead,
            expires_at: expires_at.map(|s| UNIX_EPOCH + Duration::from_secs(s)),
            ..TokenStatus::new(SourceKind::Rotator)
        };
        let cases = [
            (
                status(false, false, Some(20_000)),
                TokenState::Missing,
                Some(10_000),
            ),
            (status(true, false, None), TokenState::Fresh, None),
            (
                status(true, false, Some(20_000)),
                TokenState::Fresh,
                Some(10_000),
            ),
            (
                status(true, false, Some(10_119)),
                TokenState::Expiring,
                Some(119),
            ),
            (
                status(true, false, Some(10_000)),
                TokenState::Expired,
                Some(0),
            ),
            (
                status(true, false, Some(9_000)),
                TokenState::Expired,
                Some(-1_000),
            ),
            (
                status(true, true, Some(20_000)),
                TokenState::Expired,
                Some(10_000),
            ),
        ];
        for (i, (status, state, expires_in)) in cases.into_iter().enumerate() {
            assert_eq!(status.state_at(now), state, "case {i}");
            assert_eq!(status.expires_in_s(now), expires_in, "case {i}");
        }
    }

    #[test]
    fn health_names_of_the_sources() {
        for kind in [
            SourceKind::Rotator,
            SourceKind::File,
            SourceKind::Oauth,
            SourceKind::Env,
            SourceKind::DatabricksCli,
            SourceKind::EnvOidc,
            SourceKind::FileOidc,
        ] {
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.name());
        }
        assert_eq!(SourceKind::Rotator.name(), "pat-rotating");
        let mut status = TokenStatus::new(SourceKind::Rotator);
        assert_eq!(
            status.role(),
            "follower",
            "a rotator without the lock follows"
        );
        status.rotating = true;
        assert_eq!(status.role(), "rotator");
        for (kind, role) in [
            (SourceKind::File, "follower"),
            (SourceKind::Env, "follower"),
            (SourceKind::Oauth, "rotator"),
            (SourceKind::DatabricksCli, "rotator"),
            (SourceKind::EnvOidc, "rotator"),
            (SourceKind::FileOidc, "rotator"),
        ] {
            assert_eq!(TokenStatus::new(kind).role(), role, "{kind:?}");
        }
        assert_eq!(SourceKind::File.name(), "pat-file");
    }

    #[test]
    fn activity_keeps_the_latest() {
        let activity = Activity::default();
        assert_eq!(activity.last(), None);
        let t = UNIX_EPOCH + Duration::from_secs(500);
        activity.record(t);
        activity.record(t - Duration::from_secs(100));
        assert_eq!(activity.last(), Some(t));
    }
}
