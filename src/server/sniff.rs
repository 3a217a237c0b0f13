//! Telling HTTP/2 from HTTP/1 by a connection's first bytes.
//!
//! hyper-util's `auto` builder reads the first 24 bytes alone (the length of HTTP/2's preface)
//! and hands them to hyper. hyper's next read then finds its 8 KiB read buffer partly filled,
//! and doubles it: every HTTP/1 connection held 16 KiB for reading, for its whole life. Here
//! the first read asks for as much as hyper's own first read would, so hyper gets the request
//! head, and usually the whole request, at once, and its buffer stays at 8 KiB.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an HTTP/2 client sends first (RFC 9113 section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first read's size: hyper's initial read buffer.
const FIRST_READ: usize = 8 * 1024;

/// The protocol a connection speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Version {
    Http1,
    Http2,
}

/// What a connection's first bytes say: HTTP/2 once the whole preface is in, HTTP/1 from the
/// first byte that differs from it, nothing yet while they are a part of it.
fn version_of(first: &[u8]) -> Option<Version> {
    let seen = first.len().min(H2_PREFACE.len());
    if first[..seen] != H2_PREFACE[..seen] {
        Some(Version::Http1)
    } else if seen == H2_PREFACE.len() {
        Some(Version::Http2)
    } else {
        None
    }
}

/// Reads `io` until its protocol is known. A connection that ends before is HTTP/1's to close.
pub(crate) async fn sniff<I>(mut io: I) -> io::Result<(Version, Sniffed<I>)>
where
    I: AsyncRead + Unpin,
{
    let mut first = BytesMut::with_capacity(FIRST_READ);
    let version = loop {
        let read = io.read_buf(&mut first).await?;
        match version_of(&first) {
            Some(version) => break version,
            None if read == 0 => break Version::Http1,
            None => {}
        }
    };
    let sniffed = Sniffed {
        first: first.freeze(),
        io,
    };
    Ok((version, sniffed))
}

pin_project! {
    /// A connection whose first bytes were read to tell its protocol: reads return those first.
    /// Not `Debug`: those bytes are a request head, credentials and all.
    pub(crate) struct Sniffed<I> {
        first: Bytes,
        #[pin]
        io: I,
    }
}

impl<I: AsyncRead> AsyncRead for Sniffed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.first.is_empty() {
            return this.io.poll_read(cx, buf);
        }
        let n = this.first.len().min(buf.remaining());
        buf.put_slice(&this.first[..n]);
        this.first.advance(n);
        if this.first.is_empty() {
            // Let go of the first read's buffer as soon as hyper has it all.
            *this.first = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite> AsyncWrite for Sniffed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn the_first_bytes_tell_the_version() {
        let cases: [(&[u8], Option<Version>); 8] = [
            (b"", None),
            (b"P", None),
            (b"PRI * HTTP/2.0\r\n", None),
            (H2_PREFACE, Some(Version::Http2)),
            (
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
                Some(Version::Http2),
            ),
            (b"POST /serving-endpoints", Some(Version::Http1)),
            (b"PRI * HTTP/1.1\r\n", Some(Version::Http1)),
            (b"G", Some(Version::Http1)),
        ];
        for (first, expected) in cases {
            assert_eq!(
                version_of(first),
                expected,
                "{:?}",
                String::from_utf8_lossy(first)
            );
        }
    }

    /// The bytes read to tell the version come back first, and then the rest, in order; a
    /// preface split across reads is still recognised.
    #[tokio::test]
    async fn nothing_read_to_tell_the_version_is_lost() {
        for (chunks, version) in [
            (vec![&b"GET /health HTTP/1.1\r\n\r\n"[..]], Version::Http1),
            (
                vec![&b"PRI * HT"[..], &b"TP/2.0\r\n\r\nSM\r\n\r\nframes"[..]],
                Version::Http2,
            ),
            (vec![&b"PRI"[..], &b" * HTTP/1.1\r\n"[..]], Version::Http1),
            (vec![&b"PR"[..]], Version::Http1),
            (vec![], Version::Http1),
        ] {
            let (client, server) = tokio::io::duplex(64);
            let sent: Vec<u8> = chunks.concat();
            let writer = tokio::spawn(async move {
                let mut client = client;
                for chunk in chunks {
                    client.write_all(chunk).await.unwrap();
                    client.flush().await.unwrap();
                    tokio::task::yield_now().await;
                }
                client.shutdown().await.unwrap();
                client
            });
            let (found, mut sniffed) = sniff(server).await.unwrap();
            assert_eq!(found, version, "{:?}", String::from_utf8_lossy(&sent));
            let mut read = Vec::new();
            sniffed.read_to_end(&mut read).await.unwrap();
            assert_eq!(read, sent);
            drop(writer.await.unwrap());
        }
    }

    /// hyper's first read takes all of a request that arrived in one piece, so the head parses
    /// without a second read into a grown buffer.
    #[tokio::test]
    async fn a_request_sent_at_once_is_handed_over_at_once() {
        let request = b"POST /serving-endpoints/m/invocations HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}";
        let (mut client, server) = tokio::io::duplex(FIRST_READ);
        client.write_all(request).await.unwrap();
        let (_, mut sniffed) = sniff(server).await.unwrap();
        let mut hypers = vec![0; FIRST_READ];
        let n = sniffed.read(&mut hypers).await.unwrap();
        assert_eq!(&hypers[..n], request);
    }
}
