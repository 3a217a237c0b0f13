//! The [`Token`] type: a bearer secret that never prints itself.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;

/// A bearer token, ready to be put in an `Authorization` header.
///
/// The value is validated once, when the token is made, and the header value is built then too,
/// so injecting it on the hot path is a reference-count bump. `Debug` and `Display` print
/// `****`, never the value: a token can sit in a struct that gets logged without leaking.
///
/// ```
/// use fresh_token::Token;
///
/// let token = Token::new("dapi0123456789abcdef").unwrap();
/// assert_eq!(format!("{token:?}"), "Token(****)");
/// assert_eq!(token.to_string(), "****");
/// assert!(token.header_value().is_sensitive());
/// assert!(Token::new("dapi\r\nX-Injected: 1").is_err());
/// ```
#[derive(Clone)]
pub struct Token(pub(crate) Arc<TokenInner>);

pub(crate) struct TokenInner {
    secret: Box<str>,
    header: HeaderValue,
    expires_at: Option<SystemTime>,
}

/// Why a string cannot be used as a token. The message never includes the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidToken {
    /// The value is empty or only white space.
    #[error("token is empty")]
    Empty,
    /// The value holds a byte that is not allowed in a bearer token (a control character such
    /// as CR or LF, white space, or a non-ASCII byte).
    #[error("token holds a byte that is not allowed in a header value, at offset {offset}")]
    InvalidByte {
        /// Offset of the first offending byte, after trimming surrounding white space.
        offset: usize,
    },
}

impl Token {
    /// Validate `value` and build a token from it. Surrounding white space (as left by editors
    /// and INI files) is trimmed; anything else outside visible ASCII is refused, so a value can
    /// never smuggle a second header into a request.
    pub fn new(value: impl AsRef<str>) -> Result<Self, InvalidToken> {
        Self::build(value.as_ref(), None)
    }

    /// Like [`Token::new`], with the instant at which the token stops being accepted.
    pub fn with_expiry(
        value: impl AsRef<str>,
        expires_at: SystemTime,
    ) -> Result<Self, InvalidToken> {
        Self::build(value.as_ref(), Some(expires_at))
    }

    fn build(value: &str, expires_at: Option<SystemTime>) -> Result<Self, InvalidToken> {
        let secret = value.trim();
        if secret.is_empty() {
            return Err(InvalidToken::Empty);
        }
        // RFC 6750 b64token is narrower still; visible ASCII keeps the header unambiguous.
        if let Some(offset) = secret.bytes().position(|b| !(0x21..=0x7e).contains(&b)) {
            return Err(InvalidToken::InvalidByte { offset });
        }
        let mut header = HeaderValue::try_from(format!("Bearer {secret}"))
            .map_err(|_| InvalidToken::InvalidByte { offset: 0 })?;
        header.set_sensitive(true);
        Ok(Self(Arc::new(TokenInner {
            secret: secret.into(),
            header,
            expires_at,
        })))
    }

    /// The secret itself. Call this only to hand the value to something that needs it (a
    /// header, a config file); never log it.
    pub fn expose_secret(&self) -> &str {
        &self.0.secret
    }

    /// `Bearer <token>`, marked sensitive so that tracing and hyper's own debug output hide it.
    pub fn header_value(&self) -> &HeaderValue {
        &self.0.header
    }

    /// When the token stops being accepted, if known.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.0.expires_at
    }

    /// Whether the token is known to be expired at `now`. A token of unknown expiry is not.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.0.expires_at.is_some_and(|at| at <= now)
    }

    /// Whether two tokens carry the same secret, whatever their expiry metadata.
    pub fn same_secret(&self, other: &Token) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.secret == other.0.secret
    }
}

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.same_secret(other)
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(****)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("****")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn refuses_values_that_are_not_visible_ascii() {
        let cases: &[(&str, Result<(), InvalidToken>)] = &[
            ("dapiabc123", Ok(())),
            ("  dapiabc123\n", Ok(())),
            ("", Err(InvalidToken::Empty)),
            ("   \t", Err(InvalidToken::Empty)),
            (
                "dapi\r\nX-Evil: 1",
                Err(InvalidToken::InvalidByte { offset: 4 }),
            ),
            ("dapi\nabc", Err(InvalidToken::InvalidByte { offset: 4 })),
            ("dapi abc", Err(InvalidToken::InvalidByte { offset: 4 })),
            ("dapi\0abc", Err(InvalidToken::InvalidByte { offset: 4 })),
            ("dapi\u{7f}", Err(InvalidToken::InvalidByte { offset: 4 })),
            ("dapié", Err(InvalidToken::InvalidByte { offset: 4 })),
        ];
        for (input, expected) in cases {
            assert_eq!(Token::new(input).map(|_| ()), *expected, "input {input:?}");
        }
    }

    #[test]
    fn never_prints_the_secret() {
        let token = Token::new("dapisecretvalue").unwrap();
        for shown in [
            format!("{token:?}"),
            format!("{token}"),
            format!("{:?}", Some(token.clone())),
            format!("{:#?}", token.header_value()),
        ] {
            assert!(!shown.contains("dapisecretvalue"), "{shown}");
        }
        let err = Token::new("dapi\nsecretvalue").unwrap_err().to_string();
        assert!(!err.contains("secretvalue"), "{err}");
    }

    #[test]
    fn header_is_bearer_and_sensitive() {
        let token = Token::new(" dapiabc ").unwrap();
        assert_eq!(token.header_value(), "Bearer dapiabc");
        assert!(token.header_value().is_sensitive());
        assert_eq!(token.expose_secret(), "dapiabc");
    }

    #[test]
    fn expiry_math() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let token = Token::with_expiry("dapiabc", t0).unwrap();
        let cases = [
            (t0 - Duration::from_secs(1), false),
            (t0, true),
            (t0 + Duration::from_secs(1), true),
        ];
        for (now, expired) in cases {
            assert_eq!(token.is_expired_at(now), expired);
        }
        assert!(!Token::new("dapiabc").unwrap().is_expired_at(t0));
        assert_eq!(token, Token::new("dapiabc").unwrap());
    }
}
