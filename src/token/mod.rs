//! The token machinery: choosing and starting, for a [`Config`], the rotator, OAuth, or a
//! follower of the config file, and the status they publish for `/health`.

pub mod cli;
pub mod follower;
pub mod oauth;
pub mod oidc;
pub mod precedence;
pub mod refreshing;
pub mod rotator;
pub mod status;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use fresh_token::{ConfigFileToken, TokenSource};
use tokio_util::sync::CancellationToken;

use crate::config::SubjectToken;
use crate::config::{Config, ConfigError, TokenMode};
use crate::databricks::cli::CliTarget;
use crate::databricks::oidc::OidcClient;
use crate::databricks::token_api::TokenApi;
use crate::health::metrics::Metrics;
use crate::token::cli::CliFetcher;
use crate::token::follower::FileFollower;
use crate::token::oauth::{OAuthConfig, OAuthSource};
use crate::token::oidc::OidcFetcher;
use crate::token::refreshing::{Fetch, RefreshingSource};
use crate::token::rotator::coordination::Coordination;
use crate::token::rotator::etcd::{EtcdCoordination, Prefix, member_name};
use crate::token::rotator::{Rotator, RotatorConfig, parse_sinks};
use crate::token::status::{Activity, SourceKind, StatusCell, TokenStatus};

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
            TokenMode::DatabricksCli { cli_path, profile } => {
                let target = CliTarget {
                    cli_path: cli_path.clone(),
                    profile: profile.clone(),
                    host: config.host.as_str().trim_end_matches('/').to_owned(),
                };
                let fetcher = CliFetcher::new(target, &config.config_file);
                Ok(Self::refreshing(
                    fetcher,
                    SourceKind::DatabricksCli,
                    metrics,
                    activity,
                ))
            }
            TokenMode::Oidc { subject, client_id } => {
                let kind = match subject {
                    SubjectToken::Env { .. } => SourceKind::EnvOidc,
                    SubjectToken::File(_) => SourceKind::FileOidc,
                };
                let host = config.host.as_str().trim_end_matches('/');
                let fetcher = OidcFetcher::new(
                    OidcClient::new(client, host),
                    subject.clone(),
                    client_id.clone(),
                );
                Ok(Self::refreshing(fetcher, kind, metrics, activity))
            }
            TokenMode::Follow { env_token } => {
                drop(client);
                let file = ConfigFileToken::new(&config.config_file, &config.profile);
                // Well inside the rotator's revoke grace, so a follower never holds a revoked
                // token for long; a rejected request re-reads at once anyway.
                let poll = (config.rotation.revoke_grace / 4)
                    .clamp(Duration::from_millis(50), Duration::from_secs(1));
                let (follower, source) = FileFollower::new(file, env_token.clone(), poll);
                Ok(Self {
                    source: Arc::new(source),
                    status: StatusCell::new(TokenStatus::new(SourceKind::File)),
                    metrics,
                    activity,
                    task: Some(Box::new(move |cancel| Box::pin(follower.run(cancel)))),
                })
            }
            TokenMode::Rotate { env_token } => {
                let sinks = match &config.rotation.sinks {
                    Some(spec) => {
                        parse_sinks(spec).map_err(|err| ConfigError::var("PAT_SINKS", err))?
                    }
                    None => Vec::new(),
                };
                let settings = &config.rotation;
                let rotator_config = RotatorConfig {
                    config_file: config.config_file.clone(),
                    profile: config.profile.clone(),
                    host: config.host.as_str().trim_end_matches('/').to_owned(),
                    lifetime: settings.lifetime,
                    interval: settings.interval,
                    idle_policy: settings.idle_policy,
                    sessions_url: settings.sessions_url.as_ref().map(|u| u.to_string()),
                    idle_after: settings.idle_after,
                    revoke_grace: settings.revoke_grace,
                    comment: settings.comment.clone(),
                    sinks,
                    revoke_bootstrap: settings.revoke_bootstrap,
                };
                let status = StatusCell::new(TokenStatus::new(SourceKind::Rotator));
                let coordination = settings.etcd.clone().map(|etcd| {
                    let prefix = match &etcd.prefix {
                        Some(prefix) => Prefix::Fixed(prefix.clone()),
                        None => Prefix::Lookup {
                            api: TokenApi::new(client.clone(), &rotator_config.host),
                            host: rotator_config.host.clone(),
                        },
                    };
                    Box::new(EtcdCoordination::new(etcd, member_name(), prefix))
                        as Box<dyn Coordination>
                });
                let rotator = Rotator::coordinated(
                    rotator_config,
                    client,
                    env_token.clone(),
                    status.clone(),
                    metrics.clone(),
                    activity.clone(),
                    coordination,
                )
                .map_err(|err| ConfigError::var("DATABRICKS_CONFIG_FILE", err))?;
                Ok(Self {
                    source: Arc::new(rotator.source()),
                    status,
                    metrics,
                    activity,
                    task: Some(Box::new(move |cancel| Box::pin(rotator.run(cancel)))),
                })
            }
            TokenMode::OAuth {
                client_id,
                client_secret,
            } => {
                let status = StatusCell::new(TokenStatus::new(SourceKind::Oauth));
                let oauth = OAuthSource::new(
                    OAuthConfig {
                        host: config.host.as_str().trim_end_matches('/').to_owned(),
                        client_id: client_id.clone(),
                        client_secret: client_secret.clone(),
                    },
                    client,
                    status.clone(),
                    metrics.clone(),
                );
                let task = oauth.clone();
                Ok(Self {
                    source: Arc::new(oauth),
                    status,
                    metrics,
                    activity,
                    task: Some(Box::new(move |cancel| Box::pin(task.run(cancel)))),
                })
            }
        }
    }

    /// A source that `fetcher` keeps fresh, with its background task.
    fn refreshing<F: Fetch>(
        fetcher: F,
        kind: SourceKind,
        metrics: Metrics,
        activity: Activity,
    ) -> Self {
        let status = StatusCell::new(TokenStatus::new(kind));
        let source = RefreshingSource::new(fetcher, kind, status.clone(), metrics.clone());
        let task = source.clone();
        Self {
            source: Arc::new(source),
            status,
            metrics,
            activity,
            task: Some(Box::new(move |cancel| Box::pin(task.run(cancel)))),
        }
    }

    /// The background task (rotation, a refresh, or following the config file); returns when
    /// `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        if let Some(task) = self.task {
            task(cancel).await;
        }
    }
}
