//! The workspace's OAuth endpoints: client credentials (M2M), discovery, and the RFC 8693 token
//! exchange of workload identity federation.
//!
//! The client secret and the subject JWT go only into request bodies and the basic-auth header;
//! errors carry the status and the server's `error` / `error_description`, never a request.

use std::time::{Duration, SystemTime};

use fresh_token::Token;
use serde::Deserialize;

use super::backoff::retry_after;
use super::error::ApiError;

/// How long one OAuth request may take.
pub const OAUTH_TIMEOUT: Duration = Duration::from_secs(30);

/// Without `expires_in`, a token is assumed to live an hour, the Databricks default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// The grant of RFC 8693.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// The subject token type for a JWT (RFC 8693 section 3).
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// An access token and how long it lives from when it was issued.
#[derive(Clone, Debug)]
pub struct AccessToken {
    /// The token, its expiry attached.
    pub token: Token,
    /// Its lifetime (`expires_in`).
    pub ttl: Duration,
}

/// The OAuth endpoints of one workspace.
#[derive(Clone, Debug)]
pub struct OidcClient {
    client: reqwest::Client,
    host: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

#[derive(Deserialize)]
struct Discovery {
    token_endpoint: String,
}

impl OidcClient {
    /// A client for the workspace at `host` (no trailing slash needed).
    pub fn new(client: reqwest::Client, host: &str) -> Self {
        Self {
            client,
            host: host.trim_end_matches('/').to_owned(),
        }
    }

    /// `POST {host}/oidc/v1/token` with `grant_type=client_credentials`, `scope=all-apis` and
    /// the client's credentials as HTTP basic auth.
    pub async fn client_credentials(
        &self,
        client_id: &str,
        client_secret: &Token,
    ) -> Result<AccessToken, ApiError> {
        let url = format!("{}/oidc/v1/token", self.host);
        let request = self
            .client
            .post(&url)
            .basic_auth(client_id, Some(client_secret.expose_secret()))
            .body("grant_type=client_credentials&scope=all-apis");
        self.token_request("oidc/v1/token", request).await
    }

    /// `GET {host}/oidc/.well-known/oauth-authorization-server`: the token endpoint, as the
    /// SDKs find it.
    pub async fn token_endpoint(&self) -> Result<String, ApiError> {
        const CALL: &str = "oidc/.well-known/oauth-authorization-server";
        let url = format!("{}/oidc/.well-known/oauth-authorization-server", self.host);
        let response = self
            .client
            .get(&url)
            .timeout(OAUTH_TIMEOUT)
            .send()
            .await
            .map_err(|err| ApiError::transport(CALL, &err))?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let body = response
            .bytes()
            .await
            .map_err(|err| ApiError::transport(CALL, &err))?;
        if !(200..300).contains(&status) {
            return Err(ApiError::from_status(CALL, status, "", "", retry_after));
        }
        let discovery: Discovery =
            serde_json::from_slice(&body).map_err(|err| ApiError::unexpected(CALL, err))?;
        Ok(discovery.token_endpoint)
    }

    /// RFC 8693 token exchange at `token_endpoint`: the platform's JWT (`subject`) for a
    /// Databricks access token, with `scope=all-apis` and `client_id` when given.
    pub async fn exchange(
        &self,
        token_endpoint: &str,
        subject: &Token,
        client_id: Option<&str>,
    ) -> Result<AccessToken, ApiError> {
        let body = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", TOKEN_EXCHANGE_GRANT)
                .append_pair("subject_token_type", JWT_TOKEN_TYPE)
                .append_pair("subject_token", subject.expose_secret())
                .append_pair("scope", "all-apis");
            if let Some(client_id) = client_id {
                form.append_pair("client_id", client_id);
            }
            form.finish()
        };
        let request = self.client.post(token_endpoint).body(body);
        self.token_request("token exchange", request).await
    }

    async fn token_request(
        &self,
        call: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<AccessToken, ApiError> {
        let response = request
            .timeout(OAUTH_TIMEOUT)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .send()
            .await
            .map_err(|err| ApiError::transport(call, &err))?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let body = response
            .bytes()
            .await
            .map_err(|err| ApiError::transport(call, &err))?;
        if !(200..300).contains(&status) {
            let error: Option<OAuthErrorBody> = serde_json::from_slice(&body).ok();
            let (code, description) = error
                .map(|e| (e.error, e.error_description))
                .unwrap_or_default();
            return Err(ApiError::from_status(
                call,
                status,
                &code,
                &description,
                retry_after,
            ));
        }
        let answer: TokenResponse =
            serde_json::from_slice(&body).map_err(|err| ApiError::unexpected(call, err))?;
        let ttl = answer.expires_in.map_or(DEFAULT_TTL, Duration::from_secs);
        let token = Token::with_expiry(&answer.access_token, SystemTime::now() + ttl)
            .map_err(|err| ApiError::unexpected(call, format!("unusable access token: {err}")))?;
        Ok(AccessToken { token, ttl })
    }
}
