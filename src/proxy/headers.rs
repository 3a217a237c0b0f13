//! Which headers cross the proxy.

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Hop-by-hop headers (RFC 9110 section 7.6.1), including every `Proxy-*` header.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "te" | "trailer" | "transfer-encoding" | "upgrade"
    ) || name.as_str().starts_with("proxy-")
}

/// Credentials agents send in headers of their own: Anthropic's `x-api-key`, Azure OpenAI's
/// `api-key`, Gemini's `x-goog-api-key`, and `Authorization`. None of them goes upstream: a
/// gateway that sees one next to the bearer refuses the call (Databricks' Anthropic route
/// refuses `x-api-key`), and the agent's key is no business of the workspace.
pub const CREDENTIAL_HEADERS: [&str; 4] =
    ["authorization", "x-api-key", "api-key", "x-goog-api-key"];

/// Request headers to send upstream: everything but hop-by-hop headers, headers the
/// `Connection` header names, those the client library sets itself (`Host`, `Content-Length`,
/// `Accept-Encoding`, `Expect`), and every credential ([`CREDENTIAL_HEADERS`]): the token goes
/// in when the request is sent.
///
/// The values are copied, together, into one buffer of their own. The client's values share
/// hyper's read buffer of the client connection, and these are kept until the answer's head
/// (a 401 or 403 sends them again): shared, they would keep that buffer from being reused, and
/// hyper's next read on the connection would allocate another.
pub fn upstream_request_headers(incoming: &HeaderMap) -> HeaderMap {
    let forwarded = filtered(incoming, 0, |name| {
        [
            header::HOST,
            header::CONTENT_LENGTH,
            header::ACCEPT_ENCODING,
            header::EXPECT,
        ]
        .contains(name)
            || CREDENTIAL_HEADERS.contains(&name.as_str())
    });
    detached(forwarded)
}

/// The headers of one request sent upstream: `forwarded` and the bearer `token`. The map has
/// room for what is added on the way out, so that adding it does not grow the map: the
/// `Accept-Encoding` of the client's decompression, the `Host` of hyper-util's client, and
/// the `Content-Length` hyper writes after looking up `Transfer-Encoding` (a lookup by
/// `entry` needs a free place even when it inserts nothing).
pub(super) fn with_token(forwarded: &HeaderMap, token: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(forwarded.len() + 4);
    for (name, value) in forwarded {
        headers.append(name.clone(), value.clone());
    }
    if let Some(token) = token {
        headers.insert(header::AUTHORIZATION, token.clone());
    }
    headers
}

/// `headers` with values copied into one buffer of their own.
fn detached(mut headers: HeaderMap) -> HeaderMap {
    let len = headers.values().map(HeaderValue::len).sum();
    let mut joined = BytesMut::with_capacity(len);
    for value in headers.values() {
        joined.extend_from_slice(value.as_bytes());
    }
    let mut joined = joined.freeze();
    // `values_mut` visits the values in the order `values` did.
    for value in headers.values_mut() {
        let copy = joined.split_to(value.len());
        // The bytes were a valid value already; the check cannot fail.
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(copy) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
    headers
}

/// Response headers to send to the client: everything but hop-by-hop headers and headers the
/// `Connection` header names. The map has room for the `x-request-id` added on the way out, so
/// that adding it does not grow the map.
pub fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    filtered(upstream, 1, |_| false)
}

/// The headers to forward, built in one pass: nothing is copied only to be removed again. The
/// map has `room` for more.
fn filtered(
    headers: &HeaderMap,
    room: usize,
    also_dropped: impl Fn(&HeaderName) -> bool,
) -> HeaderMap {
    // Nearly every request and answer names nothing in `Connection` (or has none): no list.
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !is_hop_by_hop(name))
        .collect();
    let mut out = HeaderMap::with_capacity(headers.len() + room);
    for (name, value) in headers {
        if !is_hop_by_hop(name) && !also_dropped(name) && !named_by_connection.contains(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `count` headers named `{prefix}-0`, `{prefix}-1` and so on.
    fn numbered(prefix: &str, count: usize) -> HeaderMap {
        (0..count)
            .map(|i| {
                let name = HeaderName::try_from(format!("{prefix}-{i}")).unwrap();
                (name, HeaderValue::from_static("v"))
            })
            .collect()
    }

    /// The `x-request-id` added to every answer on its way out fits in the map as built.
    #[test]
    fn an_answers_headers_have_room_for_the_request_id() {
        for count in 0..20 {
            let mut headers = client_response_headers(&numbered("x-upstream", count));
            let capacity = headers.capacity();
            headers.insert("x-request-id", HeaderValue::from_static("1f"));
            assert_eq!(headers.capacity(), capacity, "{count} headers");
        }
    }

    /// The token, the decoder's `Accept-Encoding`, hyper-util's `Host` and hyper's
    /// `Content-Length` fit in an upstream request's map as built, in the order they are added.
    #[test]
    fn an_upstream_requests_headers_have_room_for_what_is_added_on_the_way() {
        let token = HeaderValue::from_static("Bearer dapi-not-a-real-token");
        for count in 0..20 {
            let mut headers = with_token(&numbered("x-agent", count), Some(&token));
            assert_eq!(headers.len(), count + 1);
            let capacity = headers.capacity();
            headers.insert(header::ACCEPT_ENCODING, HeaderValue::from_static("gzip"));
            headers.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
            // hyper's encoder: `Transfer-Encoding` is looked up, then the length set.
            assert!(matches!(
                headers.entry(header::TRANSFER_ENCODING),
                header::Entry::Vacant(_)
            ));
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(3_449));
            assert_eq!(headers.capacity(), capacity, "{count} headers");
        }
    }

    /// The forwarded values are equal to the client's but share nothing with the buffer the
    /// client's were read into, so that buffer is free once the client's request is dropped.
    #[test]
    fn forwarded_values_hold_no_part_of_the_clients_buffer() {
        let read = bytes::Bytes::from(b"application/jsonclaude-cli/2.0both".to_vec());
        let value = |range| HeaderValue::from_maybe_shared(read.slice(range)).unwrap();
        let mut incoming = HeaderMap::new();
        incoming.append(header::CONTENT_TYPE, value(0..16));
        incoming.append(header::USER_AGENT, value(16..30));
        incoming.append("x-tag", value(30..34));
        incoming.append("x-tag", value(16..22));
        let mut secret = value(30..34);
        secret.set_sensitive(true);
        incoming.append("x-secret", secret);

        let forwarded = upstream_request_headers(&incoming);
        drop(incoming);
        assert!(
            read.is_unique(),
            "a forwarded value still shares the read buffer"
        );
        assert_eq!(forwarded[header::CONTENT_TYPE], "application/json");
        assert_eq!(forwarded[header::USER_AGENT], "claude-cli/2.0");
        let tags: Vec<_> = forwarded.get_all("x-tag").iter().collect();
        assert_eq!(tags, ["both", "claude"]);
        assert!(forwarded["x-secret"].is_sensitive());
        assert!(!forwarded[header::USER_AGENT].is_sensitive());
    }

    #[test]
    fn hop_by_hop_headers_are_dropped() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-checksum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-authorization", "Basic abc"),
            ("proxy-foo", "bar"),
            ("x-private", "named by connection"),
            ("host", "127.0.0.1:4000"),
            ("content-length", "12"),
            ("accept-encoding", "br"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
            ("authorization", "Bearer injected"),
            ("x-api-key", "sk-ant-agent"),
            ("api-key", "azure-key"),
            ("x-goog-api-key", "AIza-key"),
        ] {
            headers.append(name, value.parse().unwrap());
        }
        let up = upstream_request_headers(&headers);
        let mut kept: Vec<_> = up.keys().map(|k| k.as_str()).collect();
        kept.sort_unstable();
        assert_eq!(kept, ["content-type", "x-custom"]);

        let down = client_response_headers(&headers);
        let mut kept: Vec<_> = down.keys().map(|k| k.as_str()).collect();
        kept.sort_unstable();
        assert_eq!(
            kept,
            [
                "accept-encoding",
                "api-key",
                "authorization",
                "content-length",
                "content-type",
                "host",
                "x-api-key",
                "x-custom",
                "x-goog-api-key"
            ]
        );
    }
}
