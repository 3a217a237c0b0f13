//! Choosing and starting the token machinery for a [`Config`]: the rotator, OAuth, or a
//! follower of the config file.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use fresh_token::{ConfigFileToken, FirstAvailable, StaticToken, TokenSource};
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError, TokenMode};
use crate::metrics::Metrics;
use crate::status::{Activity, SourceKind, StatusCell, TokenStatus};

type Task = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The token source the proxy injects from, the state it shares with `/health`, and the
/// background task that keeps the token alive.
pub struct TokenSetup {
    /// What [`fresh_token::FreshTokenLayer`] reads.
    pub source: Arc<dyn TokenSource>,
    /// Published token status.
    pub status: StatusCell,
    /// Metrics shared with the app.
    pub metrics: Metrics,
    /// Proxied traffic, the default session signal.
    pub activity: Activity,
    task: Option<Box<dyn FnOnce(CancellationToken) -> Task + Send>>,
}

impl std::fmt::Debug for TokenSetup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSetup")
            .field("status", &self.status)
            .field("background_task", &self.task.is_some())
            .finish_non_exhaustive()
    }
}

impl TokenSetup {
    /// Build the sources for `config`. Nothing runs until [`TokenSetup::run`].
    pub fn new(config: &Config, client: reqwest::Client) -> Result<Self, ConfigError> {
        let metrics = Metrics::new();
        let activity = Activity::default();
        match &config.token_mode {
            TokenMode::Follow { env_token } => {
                let file = ConfigFileToken::new(&config.config_file, &config.profile);
                let mut sources: Vec<Arc<dyn TokenSource>> = vec![Arc::new(file)];
                if let Some(token) = env_token {
                    sources.push(Arc::new(StaticToken::new(token.clone())));
                }
                let _ = client;
                Ok(Self {
                    source: Arc::new(FirstAvailable::new(sources)),
                    status: StatusCell::new(TokenStatus::new(SourceKind::File)),
                    metrics,
                    activity,
                    task: None,
                })
            }
            TokenMode::Rotate { .. } | TokenMode::OAuth { .. } => Err(ConfigError::unsupported()),
        }
    }

    /// The background task (rotation or OAuth refresh); returns when `cancel` fires. Followers
    /// have none and return at once.
    pub async fn run(self, cancel: CancellationToken) {
        if let Some(task) = self.task {
            task(cancel).await;
        }
    }
}
