//! OAuth M2M (service principal) tokens.
//!
//! With `DATABRICKS_CLIENT_ID` and `DATABRICKS_CLIENT_SECRET`, access tokens come from
//! `POST {host}/oidc/v1/token` (`grant_type=client_credentials`, `scope=all-apis`, the client
//! credentials as HTTP basic auth). One fetched token serves every request until it is
//! refreshed: [`OAuthSource::run`] fetches a new one once `min(TTL / 2, 20 min)` of its life
//! remains, as the Databricks SDKs do, and a rejected token triggers one shared fetch through
//! [`TokenSource::refresh`]. A failed refresh keeps the current token until it expires. The
//! refreshing is the same as for the other fetched tokens ([`RefreshingSource`]); this module
//! only says how a token is fetched.
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
use std::time::SystemTime;

use fresh_token::{RefreshFuture, Token, TokenSource};
use tokio_util::sync::CancellationToken;

use crate::databricks::ApiError;
use crate::databricks::oidc::{AccessToken, OidcClient};
use crate::health::metrics::Metrics;
use crate::token::refreshing::{Fetch, Fetched, RefreshingSource};
use crate::token::status::{SourceKind, StatusCell};

/// A service principal of one workspace.
#[derive(Clone, Debug)]
pub struct OAuthConfig {
    /// Workspace URL, without a trailing slash.
    pub host: String,
    /// `DATABRICKS_CLIENT_ID`.
    pub client_id: String,
    /// `DATABRICKS_CLIENT_SECRET`.
    pub client_secret: Token,
}

/// Fetches with the client-credentials grant.
struct ClientCredentials {
    config: OAuthConfig,
    client: OidcClient,
}

impl Fetch for ClientCredentials {
    async fn fetch(&self, _current: Option<Token>) -> Result<Fetched, ApiError> {
        let AccessToken { token, ttl } = self
            .client
            .client_credentials(&self.config.client_id, &self.config.client_secret)
            .await?;
        let expiry = token
            .expires_at()
            .unwrap_or_else(|| SystemTime::now() + ttl);
        Ok(Fetched { token, expiry })
    }

    fn action(&self) -> String {
        format!(
            "check DATABRICKS_CLIENT_ID ({}) and DATABRICKS_CLIENT_SECRET: the workspace refuses them",
            self.config.client_id
        )
    }
}

impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("host", &self.config.host)
            .field("client_id", &self.config.client_id)
            .field("client_secret", &self.config.client_secret)
            .finish()
    }
}

/// OAuth M2M access tokens, fetched once and shared, refreshed ahead of expiry. Clones share
/// the token and the refresh.
#[derive(Clone, Debug)]
pub struct OAuthSource(RefreshingSource<ClientCredentials>);

impl OAuthSource {
    /// A source for `config` that publishes its state into `status`. Nothing is fetched until
    /// [`OAuthSource::run`] starts or a request needs a token.
    pub fn new(
        config: OAuthConfig,
        client: reqwest::Client,
        status: StatusCell,
        metrics: Metrics,
    ) -> Self {
        let fetcher = ClientCredentials {
            client: OidcClient::new(client, &config.host),
            config,
        };
        Self(RefreshingSource::new(
            fetcher,
            SourceKind::Oauth,
            status,
            metrics,
        ))
    }

    /// The background task: fetch now, then refresh each token ahead of its expiry, until
    /// `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        self.0.run(cancel).await;
    }
}

impl TokenSource for OAuthSource {
    /// The fetched token while it is unexpired.
    fn current(&self) -> Option<Token> {
        self.0.current()
    }

    /// One shared fetch; at most one per
    /// [`REJECTION_FETCH_INTERVAL`](crate::token::refreshing::REJECTION_FETCH_INTERVAL) for
    /// rejected tokens.
    fn refresh<'a>(&'a self, rejected: &'a Token) -> RefreshFuture<'a> {
        self.0.refresh(rejected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
