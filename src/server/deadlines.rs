//! Deadlines of one client connection: how long a client may take to send a request head, to
//! send the next request on a kept-alive connection, to continue a request body, and to read
//! the answer.
//!
//! hyper's own header timeout starts the moment an answer is finished, so it cannot tell an
//! idle kept-alive connection from a slow request head. Here the connection's socket and its
//! requests share a [`ConnectionClock`]: the socket knows when bytes arrive, the service knows
//! when a request is in flight, and together they know which deadline applies.

use std::error::Error as StdError;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits a connection is held to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadlines {
    /// From the first byte of a request head (or from accepting the connection) to its end;
    /// also the longest pause within a request body.
    pub header: Duration,
    /// From the end of an answer to the first byte of the next request.
    pub idle: Duration,
    /// The longest a client may leave its answer unread.
    pub write_stall: Duration,
}

/// Which stage a connection is in, as far as deadlines go.
#[derive(Debug)]
struct Stage {
    /// Requests whose head was read and whose answer is not yet sent.
    in_flight: usize,
    /// When the connection last became free of requests.
    idle_since: Instant,
    /// When the first byte of the next request head arrived, with no request in flight.
    head_started: Option<Instant>,
}

/// What the socket and the service of one connection share.
#[derive(Clone, Debug)]
pub(crate) struct ConnectionClock {
    stage: Arc<Mutex<Stage>>,
    deadlines: Deadlines,
}

impl ConnectionClock {
    /// A clock for a connection accepted at `now`: its first request head is due within the
    /// header timeout, as a later one is from its first byte.
    pub(crate) fn new(deadlines: Deadlines, now: Instant) -> Self {
        Self {
            stage: Arc::new(Mutex::new(Stage {
                in_flight: 0,
                idle_since: now,
                head_started: Some(now),
            })),
            deadlines,
        }
    }

    fn stage(&self) -> std::sync::MutexGuard<'_, Stage> {
        self.stage
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A request head was read: no socket deadline applies until its answer is sent.
    pub(crate) fn request_started(&self) -> InFlight {
        let mut stage = self.stage();
        stage.in_flight += 1;
        stage.head_started = None;
        InFlight(self.clone())
    }

    fn request_finished(&self, now: Instant) {
        let mut stage = self.stage();
        stage.in_flight = stage.in_flight.saturating_sub(1);
        if stage.in_flight == 0 {
            stage.idle_since = now;
        }
    }

    fn bytes_read(&self, now: Instant) {
        let mut stage = self.stage();
        if stage.in_flight == 0 && stage.head_started.is_none() {
            stage.head_started = Some(now);
        }
    }

    /// When a read that is still waiting must give up, if ever.
    fn read_deadline(&self) -> Option<Instant> {
        let stage = self.stage();
        read_deadline(&stage, self.deadlines)
    }

    /// The header timeout, which also bounds each pause within a request body.
    pub(crate) fn body_pause(&self) -> Duration {
        self.deadlines.header
    }
}

/// While a request is in flight, reads wait for as long as the service wants (hyper reads only
/// to notice a client that hangs up); between requests, a started head is due within the header
/// timeout and the next one is awaited for the idle timeout.
fn read_deadline(stage: &Stage, deadlines: Deadlines) -> Option<Instant> {
    if stage.in_flight > 0 {
        return None;
    }
    Some(match stage.head_started {
        Some(started) => started + deadlines.header,
        None => stage.idle_since + deadlines.idle,
    })
}

/// Marks one request in flight until its answer is sent or dropped.
#[derive(Debug)]
pub(crate) struct InFlight(ConnectionClock);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished(Instant::now());
    }
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

/// Polls `timer` set to `deadline`, arming or moving it first: ready once `deadline` passed.
fn expired(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    match timer {
        Some(sleep) if sleep.deadline() == deadline => {}
        Some(sleep) => sleep.as_mut().reset(deadline),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
    }
    timer
        .as_mut()
        .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready())
}

pin_project! {
    /// A client socket held to its connection's deadlines: a read that waits past the head or
    /// idle deadline, or a write the client leaves unread past `write_stall`, fails with
    /// `TimedOut`, and hyper closes the connection.
    #[derive(Debug)]
    pub(crate) struct DeadlineIo<T> {
        #[pin]
        io: T,
        clock: ConnectionClock,
        read_timer: Option<Pin<Box<Sleep>>>,
        write_timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<T> DeadlineIo<T> {
    pub(crate) fn new(io: T, clock: ConnectionClock) -> Self {
        Self {
            io,
            clock,
            read_timer: None,
            write_timer: None,
        }
    }
}

impl<T: AsyncRead> AsyncRead for DeadlineIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        match this.io.poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.clock.bytes_read(Instant::now());
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => match this.clock.read_deadline() {
                Some(deadline) if expired(this.read_timer, deadline, cx) => Poll::Ready(Err(
                    timed_out("no request in time (PROXY_HEADER_TIMEOUT or PROXY_IDLE_TIMEOUT)"),
                )),
                _ => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite> DeadlineIo<T> {
    /// `write`'s result, failed once the client has left it pending for `write_stall`.
    fn stall_limited(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut T>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        match write(this.io, cx) {
            Poll::Pending => {
                let stall = this.clock.deadlines.write_stall;
                let deadline = match this.write_timer {
                    Some(sleep) => sleep.deadline(),
                    None => Instant::now() + stall,
                };
                if expired(this.write_timer, deadline, cx) {
                    return Poll::Ready(Err(timed_out("the client stopped reading its answer")));
                }
                Poll::Pending
            }
            ready @ Poll::Ready(_) => {
                *this.write_timer = None;
                ready
            }
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for DeadlineIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stall_limited(cx, |io, cx| io.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stall_limited(cx, |io, cx| io.poll_write_vectored(cx, bufs))
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

/// A request body that paused for longer than the header timeout.
#[derive(Debug, thiserror::Error)]
#[error("the client paused its request body for more than {} s (PROXY_HEADER_TIMEOUT)", .0.as_secs())]
pub(crate) struct BodyStalled(Duration);

pin_project! {
    /// A request body that fails with [`BodyStalled`] when the client pauses it for longer than
    /// `pause`, while the proxy is waiting for it (a slow upload holds a connection and a
    /// buffer as long as it lasts).
    #[derive(Debug)]
    pub(crate) struct PauseLimitedBody<B> {
        #[pin]
        inner: B,
        pause: Duration,
        timer: Option<Pin<Box<Sleep>>>,
    }
}

impl<B> PauseLimitedBody<B> {
    pub(crate) fn new(inner: B, pause: Duration) -> Self {
        Self {
            inner,
            pause,
            timer: None,
        }
    }
}

impl<B> Body for PauseLimitedBody<B>
where
    B: Body<Data = Bytes>,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Pending => {
                let deadline = match this.timer {
                    Some(sleep) => sleep.deadline(),
                    None => Instant::now() + *this.pause,
                };
                if expired(this.timer, deadline, cx) {
                    return Poll::Ready(Some(Err(Box::new(BodyStalled(*this.pause)))));
                }
                Poll::Pending
            }
            Poll::Ready(frame) => {
                *this.timer = None;
                Poll::Ready(frame.map(|frame| frame.map_err(Into::into)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project! {
    /// An answer's body that keeps its request counted as in flight until it is sent whole or
    /// dropped.
    #[derive(Debug)]
    pub(crate) struct CountedBody<B> {
        #[pin]
        inner: B,
        in_flight: Option<InFlight>,
    }
}

impl<B> CountedBody<B> {
    pub(crate) fn new(inner: B, in_flight: InFlight) -> Self {
        Self {
            inner,
            in_flight: Some(in_flight),
        }
    }
}

impl<B: Body> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.project();
        let frame = this.inner.poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.in_flight.take();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEADLINES: Deadlines = Deadlines {
        header: Duration::from_secs(30),
        idle: Duration::from_secs(120),
        write_stall: Duration::from_secs(120),
    };

    #[test]
    fn the_deadline_follows_the_stage_of_the_connection() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let cases = [
            // A new connection: its first head is due within the header timeout.
            (0, t0, Some(t0), Some(t0 + s(30))),
            // Kept alive after an answer at t0, no byte yet: the idle timeout.
            (0, t0, None, Some(t0 + s(120))),
            // The next head started at t0 + 100 s: the header timeout from its first byte.
            (0, t0, Some(t0 + s(100)), Some(t0 + s(130))),
            // A request in flight (a long stream, a slow upstream): no socket deadline.
            (1, t0, None, None),
            (2, t0, Some(t0), None),
        ];
        for (in_flight, idle_since, head_started, expected) in cases {
            let stage = Stage {
                in_flight,
                idle_since,
                head_started,
            };
            assert_eq!(read_deadline(&stage, DEADLINES), expected, "{stage:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn requests_move_the_clock_between_stages() {
        let accepted = Instant::now();
        let clock = ConnectionClock::new(DEADLINES, accepted);
        assert_eq!(clock.read_deadline(), Some(accepted + DEADLINES.header));

        let first = clock.request_started();
        let second = clock.request_started();
        assert_eq!(clock.read_deadline(), None);
        drop(first);
        assert_eq!(
            clock.read_deadline(),
            None,
            "one request is still in flight"
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(second);
        let answered = Instant::now();
        assert_eq!(clock.read_deadline(), Some(answered + DEADLINES.idle));

        tokio::time::advance(Duration::from_secs(60)).await;
        clock.bytes_read(Instant::now());
        let head = Instant::now();
        assert_eq!(clock.read_deadline(), Some(head + DEADLINES.header));
        // Later bytes of the same head do not move its deadline.
        tokio::time::advance(Duration::from_secs(10)).await;
        clock.bytes_read(Instant::now());
        assert_eq!(clock.read_deadline(), Some(head + DEADLINES.header));
    }

    #[tokio::test(start_paused = true)]
    async fn a_paused_body_fails_after_the_pause_limit_and_a_flowing_one_does_not() {
        use http_body_util::BodyExt;
        use http_body_util::StreamBody;

        let pause = Duration::from_secs(30);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, io::Error>>(1);
        let body = PauseLimitedBody::new(StreamBody::new(tokio_stream_from(rx)), pause);
        let reader = tokio::spawn(body.collect());
        // Chunks 20 s apart: each pause is below the limit, though the whole takes longer.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(20)).await;
            tx.send(Ok(Frame::data(Bytes::from_static(b"x"))))
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(31)).await;
        let err = reader
            .await
            .unwrap()
            .expect_err("the pause is over the limit");
        assert!(err.is::<BodyStalled>(), "{err}");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off_after_the_write_stall() {
        use tokio::io::AsyncWriteExt;

        let (client, server) = tokio::io::duplex(64);
        let clock = ConnectionClock::new(DEADLINES, Instant::now());
        let _request = clock.request_started();
        let mut io = DeadlineIo::new(server, clock);
        // The client reads nothing: the pipe fills, then the write waits.
        let started = Instant::now();
        let err = io
            .write_all(&[b'x'; 1024])
            .await
            .expect_err("an unread answer ends the connection");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), DEADLINES.write_stall);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_fails_its_read_at_the_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let (mut client, server) = tokio::io::duplex(64);
        let accepted = Instant::now();
        let mut io = DeadlineIo::new(server, ConnectionClock::new(DEADLINES, accepted));
        client.write_all(b"GET / HT").await.unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        let err = io.read(&mut buf).await.expect_err("the head is overdue");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(accepted.elapsed(), DEADLINES.header);
    }

    /// A stream over an mpsc receiver, without tokio-stream.
    fn tokio_stream_from<T: Send + 'static>(
        rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures_util::Stream<Item = T> {
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
    }
}
