//! One error for every call to Databricks, classified by what the caller can do about it.
//!
//! Texts never hold a token, a JWT, a client secret or an `Authorization` header: they are built
//! from the status, the server's error code and message (truncated), and [`describe`] for
//! transport failures.

use std::fmt;
use std::time::Duration;

/// What a failure means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// 429, 5xx, no answer, a timeout: worth a retry after a backoff.
    Transient,
    /// 401, or an OAuth `invalid_grant` / `invalid_client`: the credential is not accepted.
    /// Retrying with it will not help; a new one (or a person) is needed.
    Auth,
    /// 403: the credential is accepted but may not do this (Databricks also answers 403 for a
    /// token it does not know, so callers that care check with SCIM `Me`).
    Permission,
    /// Any other answer (400, 404, an unexpected body): the request itself is wrong.
    BadRequest,
}

/// Why a call to Databricks failed.
#[derive(Debug, thiserror::Error)]
pub struct ApiError {
    kind: ErrorKind,
    /// The call, e.g. `token/create` or `oidc/v1/token`.
    call: String,
    status: Option<u16>,
    code: String,
    message: String,
    retry_after: Option<Duration>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.call)?;
        if let Some(status) = self.status {
            write!(f, " {status}")?;
        }
        for part in [&self.code, &self.message] {
            if !part.is_empty() {
                write!(f, " {part}")?;
            }
        }
        Ok(())
    }
}

impl ApiError {
    /// A failure of `call` of `kind`, explained by `message` (which must hold no secret).
    pub fn new(kind: ErrorKind, call: &str, message: impl Into<String>) -> Self {
        Self {
            kind,
            call: call.to_owned(),
            status: None,
            code: String::new(),
            message: message.into(),
            retry_after: None,
        }
    }

    /// An HTTP answer with a non-2xx `status`: classified by the status and, for OAuth
    /// endpoints, by the `error` code. `code` and `message` come from the answer's body.
    pub fn from_status(
        call: &str,
        status: u16,
        code: &str,
        message: &str,
        retry_after: Option<Duration>,
    ) -> Self {
        let kind = match (status, code) {
            (429 | 500..=599, _) => ErrorKind::Transient,
            (401, _) | (_, "invalid_grant" | "invalid_client" | "unauthorized_client") => {
                ErrorKind::Auth
            }
            (403, _) => ErrorKind::Permission,
            _ => ErrorKind::BadRequest,
        };
        Self {
            kind,
            call: call.to_owned(),
            status: Some(status),
            code: code.to_owned(),
            message: truncate(message, 200),
            retry_after: retry_after.filter(|_| kind == ErrorKind::Transient),
        }
    }

    /// A request that got no (complete) answer: transient.
    pub fn transport(call: &str, err: &reqwest::Error) -> Self {
        Self::new(ErrorKind::Transient, call, describe(err))
    }

    /// An answer that is not what the API documents (a body that does not parse, a token that
    /// cannot be used in a header).
    pub fn unexpected(call: &str, problem: impl fmt::Display) -> Self {
        Self::new(
            ErrorKind::BadRequest,
            call,
            format!("unexpected answer: {problem}"),
        )
    }

    /// What the failure means for the caller.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether a retry after a backoff can help.
    pub fn is_transient(&self) -> bool {
        self.kind == ErrorKind::Transient
    }

    /// 401 or 403: the credential used for the call was refused.
    pub fn is_refused(&self) -> bool {
        matches!(self.kind, ErrorKind::Auth | ErrorKind::Permission)
    }

    /// The HTTP status, when there was an answer.
    pub fn status(&self) -> Option<u16> {
        self.status
    }

    /// The delay the server asked for, if any (transient failures only).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }
}

/// A reqwest error without anything secret: what failed (timeout, connection, body), the URL's
/// path (never its query) and the causes, with the URL replaced where a cause repeats it.
pub fn describe(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_body() || err.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let mut text = match err.url() {
        Some(url) => format!("{kind} ({})", url.path()),
        None => kind.to_owned(),
    };
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let mut cause_text = cause.to_string();
        if let Some(url) = err.url() {
            cause_text = cause_text.replace(url.as_str(), "<url>");
        }
        text.push_str(": ");
        text.push_str(&cause_text);
        source = cause.source();
    }
    text
}

/// `text` cut to `max` characters, marked when cut.
pub(crate) fn truncate(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_table() {
        let cases: &[(u16, &str, ErrorKind)] = &[
            (429, "", ErrorKind::Transient),
            (500, "", ErrorKind::Transient),
            (503, "TEMPORARILY_UNAVAILABLE", ErrorKind::Transient),
            (401, "", ErrorKind::Auth),
            (400, "invalid_grant", ErrorKind::Auth),
            (401, "invalid_client", ErrorKind::Auth),
            (403, "PERMISSION_DENIED", ErrorKind::Permission),
            (400, "INVALID_PARAMETER_VALUE", ErrorKind::BadRequest),
            (404, "RESOURCE_DOES_NOT_EXIST", ErrorKind::BadRequest),
        ];
        for (status, code, kind) in cases {
            let err = ApiError::from_status("x", *status, code, "m", Some(Duration::from_secs(3)));
            assert_eq!(err.kind(), *kind, "{status} {code}");
            assert_eq!(
                err.retry_after().is_some(),
                *kind == ErrorKind::Transient,
                "Retry-After only matters for a retry: {status}"
            );
            assert_eq!(
                err.is_refused(),
                matches!(kind, ErrorKind::Auth | ErrorKind::Permission)
            );
        }
    }

    #[test]
    fn display_names_the_call_and_the_answer() {
        let err = ApiError::from_status(
            "token/create",
            403,
            "PERMISSION_DENIED",
            "no tokens for you",
            None,
        );
        assert_eq!(
            err.to_string(),
            "token/create: 403 PERMISSION_DENIED no tokens for you"
        );
        let err = ApiError::new(ErrorKind::Transient, "oidc/v1/token", "timed out");
        assert_eq!(err.to_string(), "oidc/v1/token: timed out");
    }

    #[test]
    fn truncate_keeps_short_texts() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc…");
    }

    #[tokio::test]
    async fn describe_keeps_the_query_out() {
        crate::install_crypto_provider();
        // Nothing listens on port 9 of loopback: a connection error with a URL attached.
        let err = reqwest::Client::new()
            .get("http://127.0.0.1:9/oidc/v1/token?secret=dose-1234")
            .send()
            .await
            .unwrap_err();
        let text = describe(&err);
        assert!(
            text.starts_with("cannot connect (/oidc/v1/token)"),
            "{text}"
        );
        assert!(!text.contains("dose-1234"), "{text}");
    }
}
