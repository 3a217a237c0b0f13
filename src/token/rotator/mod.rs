//! In-process PAT rotation.
//!
//! A [`Rotator`] keeps a Databricks personal access token alive for the proxy: it mints a new
//! token before the current one expires, writes it to the config file (and any `PAT_SINKS`),
//! publishes it to the proxy's in-memory [`SharedToken`], and revokes
//! the previous one after a grace period. `docs/ROTATION.md` describes the sequence, the
//! schedule and the failure modes.
//!
//! * [`schedule`]: the decision, a pure function of `now` ([`schedule::next_action`]).
//! * [`persistence`]: which minted tokens to revoke when a new one cannot be saved, pure too.
//! * the token API client is [`crate::databricks::token_api`].
//! * [`state`]: the state file that lets a restart resume; [`lock`]: one rotator per file.
//! * [`sinks`]: `PAT_SINKS`; [`sessions`]: whether anyone is using the proxy.
//!
//! The binary builds a [`Rotator`], stacks the proxy on [`Rotator::source`] and spawns
//! [`Rotator::run`]:
//!
//! ```no_run
//! use std::time::Duration;
//! use fresh_proxy::health::metrics::Metrics;
//! use fresh_proxy::token::rotator::{IdlePolicy, Rotator, RotatorConfig};
//! use fresh_proxy::token::status::{Activity, SourceKind, StatusCell, TokenStatus};
//! use fresh_token::TokenSource;
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn run() {
//! let config = RotatorConfig {
//!     config_file: "/home/me/.databrickscfg".into(),
//!     profile: "DEFAULT".to_owned(),
//!     host: "https://example.cloud.databricks.com".to_owned(),
//!     lifetime: Duration::from_secs(900),
//!     interval: Duration::from_secs(600),
//!     idle_policy: IdlePolicy::Keepalive,
//!     sessions_url: None,
//!     idle_after: Duration::from_secs(3600),
//!     revoke_grace: Duration::from_secs(30),
//!     comment: "fresh-proxy-auto-rotated".to_owned(),
//!     sinks: Vec::new(),
//!     revoke_bootstrap: false,
//! };
//! let status = StatusCell::new(TokenStatus::new(SourceKind::Rotator));
//! let rotator = Rotator::new(
//!     config,
//!     reqwest::Client::new(),
//!     None,
//!     status,
//!     Metrics::new(),
//!     Activity::default(),
//! )
//! .expect("the lock file can be opened");
//! let source = rotator.source(); // stack FreshTokenLayer on this
//! let cancel = CancellationToken::new();
//! let task = tokio::spawn(rotator.run(cancel.clone()));
//! assert!(source.current().is_some());
//! cancel.cancel();
//! task.await.unwrap();
//! # }
//! ```

pub mod coordination;
pub mod decisions;
mod engine;
pub mod etcd;
pub mod lock;
pub mod persistence;
pub mod schedule;
pub mod sessions;
pub mod sinks;
pub mod state;

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use fresh_token::{ConfigFileToken, RefreshFuture, SharedToken, Token, TokenSource};
use tokio_util::sync::CancellationToken;

use crate::health::metrics::Metrics;
use crate::token::status::{Activity, StatusCell};

pub use engine::LockError;
pub use schedule::IdlePolicy;
pub use sinks::{Sink, SinkKind, SinkSpecError, parse_sinks};

/// Everything the rotator needs to know, from the `PAT_*` and `DATABRICKS_*` settings.
#[derive(Clone, Debug)]
pub struct RotatorConfig {
    /// `DATABRICKS_CONFIG_FILE`.
    pub config_file: PathBuf,
    /// `DATABRICKS_CONFIG_PROFILE`.
    pub profile: String,
    /// The workspace URL, without a trailing slash.
    pub host: String,
    /// `PAT_TOKEN_LIFETIME`.
    pub lifetime: Duration,
    /// `PAT_ROTATION_INTERVAL`; below `lifetime`.
    pub interval: Duration,
    /// `PAT_IDLE_POLICY`.
    pub idle_policy: IdlePolicy,
    /// `PAT_SESSIONS_URL`.
    pub sessions_url: Option<String>,
    /// `PAT_IDLE_AFTER`.
    pub idle_after: Duration,
    /// `PAT_REVOKE_GRACE`.
    pub revoke_grace: Duration,
    /// `PAT_COMMENT`.
    pub comment: String,
    /// `PAT_SINKS`, parsed with [`parse_sinks`].
    pub sinks: Vec<Sink>,
    /// `PAT_REVOKE_BOOTSTRAP`.
    pub revoke_bootstrap: bool,
}

/// Rotates the token of one profile of a config file, or follows the process that does.
///
/// [`Rotator::new`] decides the starting token and whether this process rotates (it holds the
/// lock next to the config file) or follows (another process holds it). [`Rotator::run`] is the
/// background task.
pub struct Rotator {
    engine: engine::Engine,
}

impl Rotator {
    /// Read the config and state files, take the rotation lock if it is free, and publish the
    /// starting token. No network yet.
    ///
    /// `env_token` is `DATABRICKS_TOKEN`, if set. The starting token is, in this order: the
    /// config file's token when the state file says this proxy minted it and it is still live,
    /// then `env_token`, then the profile's token. A follower starts from the config file's
    /// token (the rotating process keeps it current), then `env_token`.
    ///
    /// A rotation lock file that cannot be opened for a reason other than another holder is an
    /// error: without it this process could never rotate.
    pub fn new(
        config: RotatorConfig,
        client: reqwest::Client,
        env_token: Option<Token>,
        status: StatusCell,
        metrics: Metrics,
        activity: Activity,
    ) -> Result<Self, LockError> {
        Self::coordinated(config, client, env_token, status, metrics, activity, None)
    }

    /// [`Rotator::new`] with another way to elect the rotator than the lock next to the config
    /// file (`None`): [`etcd::EtcdCoordination`] for a fleet.
    pub fn coordinated(
        config: RotatorConfig,
        client: reqwest::Client,
        env_token: Option<Token>,
        status: StatusCell,
        metrics: Metrics,
        activity: Activity,
        coordination: Option<Box<dyn coordination::Coordination>>,
    ) -> Result<Self, LockError> {
        Ok(Self {
            engine: engine::Engine::new(
                config,
                client,
                env_token,
                status,
                metrics,
                activity,
                coordination,
            )?,
        })
    }

    /// The token source to stack `FreshTokenLayer` on.
    pub fn source(&self) -> RotatorSource {
        RotatorSource {
            shared: self.engine.shared.clone(),
            file: self.engine.file.clone(),
        }
    }

    /// Whether this process holds the rotation lock now.
    pub fn is_rotating(&self) -> bool {
        self.engine.is_rotating()
    }

    /// The background task: rotate (or follow, and take over when the lock frees up) until
    /// `cancel` fires. Stops promptly; a revoke still in its grace period is left in the state
    /// file for the next start. A mint already sent finishes on its own task, so the new
    /// token is written and recorded even when this task is cancelled or aborted.
    pub async fn run(self, cancel: CancellationToken) {
        self.engine.run(cancel).await;
    }
}

impl fmt::Debug for Rotator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rotator")
            .field("config_file", &self.engine.config.config_file)
            .field("profile", &self.engine.config.profile)
            .field("rotating", &self.is_rotating())
            .finish_non_exhaustive()
    }
}

/// The proxy's view of the rotated token.
///
/// [`current`](TokenSource::current) is an atomic load of the token the rotator (or, in a
/// follower, the config file watcher) published, unless that token is known to have expired:
/// then there is no token (the proxy answers 503) rather than one the workspace would refuse.
/// [`refresh`](TokenSource::refresh) offers a newer published token if there is one, else
/// re-reads the config file at once (on the blocking pool, waiting at most 2 s) and adopts a
/// different token found there (someone else rotated, or a person put a new token in).
#[derive(Clone)]
pub struct RotatorSource {
    shared: SharedToken,
    file: ConfigFileToken,
}

/// How long a rejected request waits for the config file to be re-read.
const REREAD_WAIT: Duration = Duration::from_secs(2);

impl TokenSource for RotatorSource {
    fn current(&self) -> Option<Token> {
        self.shared
            .current()
            .filter(|token| !token.is_expired_at(SystemTime::now()))
    }

    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        RefreshFuture::new(async move {
            if let Some(token) = self.current().filter(|t| !t.same_secret(rejected)) {
                return Some(token);
            }
            // On the blocking pool and bounded: a config file on a file system that stopped
            // answering must not hold a request (and its worker) for longer than that.
            let file = self.file.clone();
            let read = tokio::task::spawn_blocking(move || file.read_now());
            let found = match tokio::time::timeout(REREAD_WAIT, read).await {
                Ok(Ok(found)) => found.filter(|t| !t.same_secret(rejected))?,
                _ => return None,
            };
            // Another caller may have published something newer meanwhile.
            match self.current() {
                Some(now) if !now.same_secret(rejected) => Some(now),
                _ => {
                    self.shared.publish(found.clone());
                    Some(found)
                }
            }
        })
    }
}

impl fmt::Debug for RotatorSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotatorSource")
            .field("shared", &self.shared)
            .field("file", &self.file.path())
            .finish()
    }
}
