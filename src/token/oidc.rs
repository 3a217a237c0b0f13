//! `env-oidc` and `file-oidc` auth: workload identity federation. A JWT issued by the platform
//! (Kubernetes, a CI system) is exchanged for a Databricks access token with RFC 8693 at the
//! token endpoint that `{host}/oidc/.well-known/oauth-authorization-server` names, as the Go
//! SDK does (`config/experimental/auth/oidc/tokensource.go`).
//!
//! The file is read again at every exchange: the platform replaces it before the JWT in it
//! expires. Neither the JWT nor the access token is ever logged; both are [`Token`]s.

use std::fmt;

use fresh_token::Token;
use tokio::sync::OnceCell;

use crate::config::SubjectToken;
use crate::databricks::oidc::OidcClient;
use crate::databricks::{ApiError, ErrorKind};
use crate::token::refreshing::{Fetch, Fetched};

/// Tokens exchanged for the platform's JWT.
pub struct OidcFetcher {
    client: OidcClient,
    subject: SubjectToken,
    client_id: Option<String>,
    token_endpoint: OnceCell<String>,
}

impl OidcFetcher {
    /// Exchange `subject` at the workspace `client` talks to, for `client_id`'s federation
    /// policy (`None`: account-wide federation).
    pub fn new(client: OidcClient, subject: SubjectToken, client_id: Option<String>) -> Self {
        Self {
            client,
            subject,
            client_id,
            token_endpoint: OnceCell::new(),
        }
    }

    async fn jwt(&self) -> Result<Token, ApiError> {
        const CALL: &str = "reading the JWT";
        match &self.subject {
            SubjectToken::Env { jwt, .. } => Ok(jwt.clone()),
            SubjectToken::File(path) => {
                // A file being replaced may be missing or empty for a moment: transient.
                let text = tokio::fs::read_to_string(path).await.map_err(|err| {
                    ApiError::new(
                        ErrorKind::Transient,
                        CALL,
                        format!("{}: {err}", path.display()),
                    )
                })?;
                Token::new(text.trim()).map_err(|err| {
                    ApiError::new(
                        ErrorKind::Transient,
                        CALL,
                        format!("{}: {err}", path.display()),
                    )
                })
            }
        }
    }
}

impl Fetch for OidcFetcher {
    async fn fetch(&self, _current: Option<Token>) -> Result<Fetched, ApiError> {
        let endpoint = self
            .token_endpoint
            .get_or_try_init(|| self.client.token_endpoint())
            .await?;
        let jwt = self.jwt().await?;
        let exchanged = self
            .client
            .exchange(endpoint, &jwt, self.client_id.as_deref())
            .await?;
        let expiry = exchanged
            .token
            .expires_at()
            .unwrap_or_else(|| std::time::SystemTime::now() + exchanged.ttl);
        Ok(Fetched {
            token: exchanged.token,
            expiry,
        })
    }

    fn action(&self) -> String {
        let from = match &self.subject {
            SubjectToken::Env { var, .. } => format!("the JWT in {var}"),
            SubjectToken::File(path) => format!("the JWT in {}", path.display()),
        };
        format!("check {from} and the federation policy of the service principal")
    }
}

impl fmt::Debug for OidcFetcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcFetcher")
            .field("subject", &self.subject)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}
