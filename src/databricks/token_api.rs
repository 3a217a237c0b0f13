//! The Databricks token API and SCIM `Me`, built on reqwest.
//!
//! Every call is authenticated with a [`Token`] given by the caller and bounded in time. Errors
//! are [`ApiError`]s, classified so that the rotator knows whether a retry can help; none ever
//! carries a token value or an `Authorization` header.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fresh_token::Token;
use serde::Deserialize;
use serde_json::json;

use super::backoff::retry_after;
use super::error::{ApiError, ErrorKind};

/// How long one API call may take.
pub const API_TIMEOUT: Duration = Duration::from_secs(30);

/// A client for one workspace.
#[derive(Clone)]
pub struct TokenApi {
    client: reqwest::Client,
    host: String,
}

/// A token just created by `token/create`. `Debug` never shows the value.
#[derive(Clone, Debug)]
pub struct MintedToken {
    /// The token, with its expiry attached when it has one.
    pub token: Token,
    /// Its id, as `token/list` and `token/delete` know it.
    pub token_id: String,
    /// When the workspace created it.
    pub created_at: SystemTime,
    /// When it expires (`None`: never).
    pub expires_at: Option<SystemTime>,
}

/// One entry of `token/list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenInfo {
    /// Token id.
    pub token_id: String,
    /// Comment given at creation.
    pub comment: String,
    /// Creation time.
    pub created_at: Option<SystemTime>,
    /// Expiry (`None`: never).
    pub expires_at: Option<SystemTime>,
}

/// How a `token/delete` ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    /// The token was revoked now.
    Revoked,
    /// The workspace does not know the id (already revoked or expired): nothing left to do.
    AlreadyGone,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error_code: String,
    #[serde(default)]
    message: String,
}

#[derive(Deserialize)]
struct RawTokenInfo {
    token_id: String,
    #[serde(default)]
    comment: String,
    #[serde(default)]
    creation_time: Option<i64>,
    #[serde(default)]
    expiry_time: Option<i64>,
}

impl RawTokenInfo {
    fn into_info(self) -> TokenInfo {
        TokenInfo {
            token_id: self.token_id,
            comment: self.comment,
            created_at: self.creation_time.and_then(from_millis),
            expires_at: self.expiry_time.and_then(from_millis),
        }
    }
}

#[derive(Deserialize)]
struct CreateResponse {
    token_value: String,
    token_info: RawTokenInfo,
}

#[derive(Deserialize)]
struct ListResponse {
    #[serde(default)]
    token_infos: Vec<RawTokenInfo>,
}

#[derive(Deserialize)]
struct MeResponse {
    #[serde(default, rename = "userName")]
    user_name: String,
}

/// The API gives times in milliseconds since the epoch; `-1` (or any value ≤ 0) means never.
fn from_millis(ms: i64) -> Option<SystemTime> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
}

impl TokenApi {
    /// A client for the workspace at `host` (`https://...`, no trailing slash needed).
    pub fn new(client: reqwest::Client, host: &str) -> Self {
        Self {
            client,
            host: host.trim_end_matches('/').to_owned(),
        }
    }

    /// `POST /api/2.0/token/create`: a new PAT that lives `lifetime`.
    pub async fn create(
        &self,
        auth: &Token,
        lifetime: Duration,
        comment: &str,
    ) -> Result<MintedToken, ApiError> {
        let body = json!({"lifetime_seconds": lifetime.as_secs().max(1), "comment": comment});
        let bytes = self
            .call(reqwest::Method::POST, "token/create", auth, Some(body))
            .await?;
        let response: CreateResponse = parse(&bytes, "token/create")?;
        let info = response.token_info.into_info();
        let token = match info.expires_at {
            Some(at) => Token::with_expiry(&response.token_value, at),
            None => Token::new(&response.token_value),
        }
        .map_err(|err| ApiError::unexpected("token/create", format!("unusable token: {err}")))?;
        Ok(MintedToken {
            token,
            token_id: info.token_id,
            created_at: info.created_at.unwrap_or_else(SystemTime::now),
            expires_at: info.expires_at,
        })
    }

    /// `POST /api/2.0/token/delete`. An id the workspace does not know counts as done.
    pub async fn delete(&self, auth: &Token, token_id: &str) -> Result<Deleted, ApiError> {
        let body = json!({ "token_id": token_id });
        match self
            .call(reqwest::Method::POST, "token/delete", auth, Some(body))
            .await
        {
            Ok(_) => Ok(Deleted::Revoked),
            Err(err) if err.kind() == ErrorKind::BadRequest && err.status() == Some(404) => {
                Ok(Deleted::AlreadyGone)
            }
            Err(err) => Err(err),
        }
    }

    /// `GET /api/2.0/token/list`: the caller's live PATs.
    pub async fn list(&self, auth: &Token) -> Result<Vec<TokenInfo>, ApiError> {
        let bytes = self
            .call(reqwest::Method::GET, "token/list", auth, None)
            .await?;
        let response: ListResponse = parse(&bytes, "token/list")?;
        Ok(response
            .token_infos
            .into_iter()
            .map(RawTokenInfo::into_info)
            .collect())
    }

    /// `GET /api/2.0/preview/scim/v2/Me`: whether `auth` is accepted at all; the user name.
    pub async fn me(&self, auth: &Token) -> Result<String, ApiError> {
        let bytes = self
            .call(reqwest::Method::GET, "preview/scim/v2/Me", auth, None)
            .await?;
        let response: MeResponse = parse(&bytes, "scim/v2/Me")?;
        Ok(response.user_name)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: &Token,
        body: Option<serde_json::Value>,
    ) -> Result<bytes::Bytes, ApiError> {
        let url = format!("{}/api/2.0/{path}", self.host);
        let mut request = self
            .client
            .request(method, &url)
            .timeout(API_TIMEOUT)
            // Marked sensitive: reqwest and hyper never print it.
            .header(http::header::AUTHORIZATION, auth.header_value().clone());
        if let Some(body) = body {
            request = request
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .map_err(|err| ApiError::transport(path, &err))?;
        let status = response.status().as_u16();
        let retry_after = retry_after(response.headers(), SystemTime::now());
        let bytes = response
            .bytes()
            .await
            .map_err(|err| ApiError::transport(path, &err))?;
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let error: Option<ErrorBody> = serde_json::from_slice(&bytes).ok();
        let (code, message) = error.map(|e| (e.error_code, e.message)).unwrap_or_default();
        Err(ApiError::from_status(
            path,
            status,
            &code,
            &message,
            retry_after,
        ))
    }
}

impl fmt::Debug for TokenApi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenApi")
            .field("host", &self.host)
            .finish()
    }
}

fn parse<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, ApiError> {
    // serde_json errors name a position and an expectation, never the input text.
    serde_json::from_slice(bytes).map_err(|err| ApiError::unexpected(what, err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_of_the_api() {
        assert_eq!(from_millis(-1), None);
        assert_eq!(from_millis(0), None);
        assert_eq!(
            from_millis(1_500),
            Some(UNIX_EPOCH + Duration::from_millis(1_500))
        );
    }
}
