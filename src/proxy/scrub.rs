//! Keeping the token out of answers: an upstream that echoes the request's `Authorization`
//! (a debugging endpoint, a verbose error page) must not hand the token to the client, which
//! may be any local program or, through a browser, a web page.
//!
//! The token's value is replaced by `[redacted]` in every response header and in the body of
//! every error answer (4xx, 5xx) that is not an event stream. The body is scrubbed as it
//! streams, holding back only as many bytes as a token could straddle.

use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use fresh_token::Token;
use futures_util::StreamExt;
use futures_util::stream;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue};

/// What a token value becomes.
pub(crate) const REDACTED: &[u8] = b"[redacted]";

/// `res` with the values of `tokens` replaced by [`REDACTED`] in its headers and, for an error
/// answer that is not an event stream, in its body.
pub(crate) fn without_tokens<'a>(
    res: Response,
    tokens: impl IntoIterator<Item = &'a Token>,
) -> Response {
    // Borrowed: the tokens are copied only for a body that is scrubbed as it streams.
    let mut secrets: Vec<&[u8]> = Vec::with_capacity(2);
    for token in tokens {
        let secret = token.expose_secret().as_bytes();
        if !secret.is_empty() && !secrets.contains(&secret) {
            secrets.push(secret);
        }
    }
    if secrets.is_empty() {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    scrub_headers(&mut parts.headers, &secrets);
    let is_stream = parts
        .headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("text/event-stream")
        });
    let is_error = parts.status.is_client_error() || parts.status.is_server_error();
    if !is_error || is_stream {
        return Response::from_parts(parts, body);
    }
    // Replacing changes the length.
    parts.headers.remove(CONTENT_LENGTH);
    let owned: Arc<[Box<[u8]>]> = secrets.iter().map(|&secret| secret.into()).collect();
    Response::from_parts(parts, scrubbed_body(body, owned))
}

/// Headers are only copied where a secret is found in them, which is almost never.
fn scrub_headers(headers: &mut HeaderMap, secrets: &[&[u8]]) {
    for value in headers.values_mut() {
        if !secrets
            .iter()
            .any(|secret| find(value.as_bytes(), secret).is_some())
        {
            continue;
        }
        let mut bytes = value.as_bytes().to_vec();
        redact(&mut bytes, secrets);
        // The redacted value is the original with visible ASCII swapped in: still valid.
        *value = HeaderValue::from_bytes(&bytes)
            .unwrap_or_else(|_| HeaderValue::from_static("[redacted]"));
    }
}

fn scrubbed_body(body: Body, secrets: Arc<[Box<[u8]>]>) -> Body {
    // An occurrence that starts in what goes out ends within what is held back.
    let hold = secrets.iter().map(|s| s.len()).max().unwrap_or(1) - 1;
    let chunks = body.into_data_stream();
    let scrubbed = stream::unfold(Some((chunks, Vec::new())), move |state| {
        let secrets = Arc::clone(&secrets);
        async move {
            let (mut chunks, mut held) = state?;
            loop {
                match chunks.next().await {
                    Some(Ok(chunk)) => {
                        held.extend_from_slice(&chunk);
                        redact(&mut held, &secrets);
                        let ready = held.len().saturating_sub(hold);
                        if ready > 0 {
                            let out: Vec<u8> = held.drain(..ready).collect();
                            return Some((Ok(Bytes::from(out)), Some((chunks, held))));
                        }
                    }
                    Some(Err(err)) => return Some((Err(err), None)),
                    None => {
                        return (!held.is_empty()).then(|| (Ok(Bytes::from(held)), None));
                    }
                }
            }
        }
    });
    Body::from_stream(scrubbed)
}

/// Replaces every occurrence of each secret in `bytes` with [`REDACTED`]; whether any was.
fn redact(bytes: &mut Vec<u8>, secrets: &[impl AsRef<[u8]>]) -> bool {
    let mut changed = false;
    for secret in secrets {
        let secret = secret.as_ref();
        let mut from = 0;
        while let Some(at) = find(&bytes[from..], secret) {
            let start = from + at;
            bytes.splice(start..start + secret.len(), REDACTED.iter().copied());
            from = start + REDACTED.len();
            changed = true;
        }
    }
    changed
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use http_body_util::BodyExt;

    const SECRET: &str = "dapi0123456789abcdef0123456789abcdef";

    fn token() -> Token {
        Token::new(SECRET).unwrap()
    }

    async fn body_text(res: Response) -> String {
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// A body arriving in `pieces`.
    fn chunked(pieces: Vec<String>) -> Body {
        Body::from_stream(stream::iter(
            pieces
                .into_iter()
                .map(|p| Ok::<_, std::convert::Infallible>(Bytes::from(p))),
        ))
    }

    #[test]
    fn redact_replaces_every_occurrence() {
        let secrets: Vec<Box<[u8]>> = vec![SECRET.as_bytes().into()];
        let mut text = format!("Bearer {SECRET}, again {SECRET}{SECRET}.").into_bytes();
        assert!(redact(&mut text, &secrets));
        assert_eq!(text, b"Bearer [redacted], again [redacted][redacted].");
        let mut clean = b"nothing here".to_vec();
        assert!(!redact(&mut clean, &secrets));
    }

    #[tokio::test]
    async fn a_token_split_across_chunks_is_still_redacted() {
        let echoed = format!("{{\"error\":\"bad header: Bearer {SECRET}\"}}");
        // Every split point, including inside the token.
        for cut in 0..echoed.len() {
            let pieces = vec![echoed[..cut].to_owned(), echoed[cut..].to_owned()];
            let mut res = Response::new(chunked(pieces));
            *res.status_mut() = StatusCode::BAD_REQUEST;
            res.headers_mut()
                .insert(CONTENT_LENGTH, HeaderValue::from(echoed.len()));
            let res = without_tokens(res, [&token()]);
            assert!(res.headers().get(CONTENT_LENGTH).is_none());
            assert_eq!(
                body_text(res).await,
                "{\"error\":\"bad header: Bearer [redacted]\"}",
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn headers_always_and_bodies_of_error_answers_are_scrubbed() {
        let body = format!("ok {SECRET}");
        let mut res = Response::new(Body::from(body.clone()));
        res.headers_mut().insert(
            "x-echo",
            HeaderValue::from_str(&format!("Bearer {SECRET}")).unwrap(),
        );
        let res = without_tokens(res, [&token()]);
        assert_eq!(res.headers()["x-echo"], "Bearer [redacted]");
        // A successful answer's body is the model's output, passed as it is.
        assert_eq!(body_text(res).await, body);

        let mut stream = Response::new(Body::from(body.clone()));
        *stream.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        stream
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        assert_eq!(body_text(without_tokens(stream, [&token()])).await, body);
    }
}
