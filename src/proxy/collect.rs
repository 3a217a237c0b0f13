//! Reading a request body whole without copying it when it came in one piece.

use axum::body::Body;
use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use super::error::ProxyError;

/// The whole body. `admit(len)` is asked before the body grows to `len` bytes and may refuse.
///
/// A body that arrives as one chunk (nearly every agent request: the client writes it at once,
/// and the server hands it over as a slice of its read buffer) is returned as that chunk, not
/// copied; only a body in several chunks is joined, into one buffer sized by `declared` (the
/// `Content-Length`), so that it is never held twice while it grows.
pub(super) async fn whole_body(
    mut body: Body,
    declared: usize,
    mut admit: impl FnMut(usize) -> Result<(), ProxyError>,
) -> Result<Bytes, ProxyError> {
    // The body while it is a single chunk; `joined` once a second one arrives.
    let mut single: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|_| ProxyError::BadRequest("the request body could not be read"))?;
        let Ok(chunk) = frame.into_data() else {
            continue;
        };
        let held = single.as_ref().map_or(0, Bytes::len) + joined.as_ref().map_or(0, BytesMut::len);
        admit(held + chunk.len())?;
        match (&mut single, &mut joined) {
            (None, None) => single = Some(chunk),
            (_, Some(buffer)) => buffer.extend_from_slice(&chunk),
            (Some(first), None) => {
                let mut buffer = BytesMut::with_capacity(declared.max(held + chunk.len()));
                buffer.extend_from_slice(first);
                buffer.extend_from_slice(&chunk);
                single = None;
                joined = Some(buffer);
            }
        }
    }
    Ok(match (single, joined) {
        (Some(single), _) => single,
        (None, Some(buffer)) => buffer.freeze(),
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures_util::stream;

    fn chunked(chunks: &[&'static [u8]]) -> Body {
        let chunks: Vec<Result<Bytes, std::io::Error>> = chunks
            .iter()
            .map(|chunk| Ok(Bytes::from_static(chunk)))
            .collect();
        Body::from_stream(stream::iter(chunks))
    }

    #[tokio::test]
    async fn a_body_in_one_chunk_is_the_chunk_itself() {
        let chunk = Bytes::from(br#"{"messages": []}"#.to_vec());
        let read = whole_body(Body::from(chunk.clone()), chunk.len(), |_| Ok(()))
            .await
            .unwrap();
        assert_eq!(read, chunk);
        // The same memory: not copied.
        assert_eq!(read.as_ptr(), chunk.as_ptr());
    }

    #[tokio::test]
    async fn a_body_in_pieces_is_joined_in_order_and_each_size_is_admitted() {
        let cases: &[(&[&'static [u8]], &[u8])] = &[
            (&[], b""),
            (&[b""], b""),
            (&[b"ab", b"cd"], b"abcd"),
            (&[b"a", b"", b"bc", b"d"], b"abcd"),
        ];
        for (chunks, want) in cases {
            let mut asked = Vec::new();
            let read = whole_body(chunked(chunks), 0, |len| {
                asked.push(len);
                Ok(())
            })
            .await
            .unwrap();
            assert_eq!(&read[..], *want, "{chunks:?}");
            let mut running = 0;
            let expected: Vec<usize> = chunks
                .iter()
                .map(|chunk| {
                    running += chunk.len();
                    running
                })
                .collect();
            assert_eq!(asked, expected, "{chunks:?}");
        }
    }

    #[tokio::test]
    async fn a_refusal_stops_the_read() {
        let mut asked = 0;
        let read = whole_body(chunked(&[b"abc", b"def", b"ghi"]), 9, |len| {
            asked += 1;
            if len > 4 {
                Err(ProxyError::BodyTooLarge { limit: 4 })
            } else {
                Ok(())
            }
        })
        .await;
        assert!(matches!(read, Err(ProxyError::BodyTooLarge { limit: 4 })));
        assert_eq!(asked, 2);
    }
}
