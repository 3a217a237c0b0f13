//! Serving connections: one task accepts them and hands each, round robin, to one of several
//! worker threads, each running its own single-threaded tokio runtime and its own copy of the
//! app.
//!
//! Why not one multi-threaded runtime: a proxied request is relayed between two tasks, the
//! client's connection and the pooled upstream connection, and back. On a work-stealing runtime
//! those tasks often sit on different threads, so every relay is a cross-thread wake-up, and
//! idle workers spin looking for work to steal. A connection that stays on one thread for its
//! whole life, with an upstream pool owned by that thread, does neither. docs/BENCHMARKS.md has
//! the measurements.
//!
//! The listening socket stays a single, exclusively bound socket (no `SO_REUSEPORT`), so a
//! second proxy started on the same port still fails with "address in use".
//!
//! Every connection is held to deadlines (`deadlines.rs`) and counted against
//! `PROXY_MAX_CONNECTIONS` with a reserve for health checks (`limit.rs`): a client that opens
//! connections and sends nothing, or sends slowly, cannot take the proxy's file descriptors.

mod deadlines;
mod limit;
mod sniff;
mod unix;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

pub use deadlines::Deadlines;
use deadlines::{ConnectionClock, CountedBody, DeadlineIo, PauseLimitedBody};
use limit::{Admission, ConnectionLimit, RESERVE_HEAD_TIMEOUT, Slot};
pub use limit::{FIXED_DESCRIPTORS, RESERVE_CONNECTIONS, connection_budget};
pub use unix::listen_unix;

/// How many connections the kernel holds for the proxy before it accepts them. The standard
/// library and tokio ask for 128; a burst of agents' streams (or a load test) opening more at
/// once would then see SYNs dropped and retried a second later. The kernel caps this at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

/// Idle time before TCP keepalive probes start on a client connection, so that a long stream
/// to a client whose machine vanished ends instead of holding its connection forever.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// A listening socket on `addr` with [`LISTEN_BACKLOG`], `SO_REUSEADDR` set as
/// `TcpListener::bind` sets it. Must be called within a tokio runtime.
pub fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// How many worker threads to serve with: one per CPU the process may use (cgroup limits
/// included), at least one.
pub fn default_workers() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// What the server listens on: a TCP socket, and optionally a Unix socket
/// (`PROXY_UNIX_SOCKET`).
#[derive(Debug)]
pub struct Listeners {
    /// The TCP listener.
    pub tcp: TcpListener,
    /// The Unix socket listener, if any.
    pub unix: Option<UnixListener>,
}

impl From<TcpListener> for Listeners {
    fn from(tcp: TcpListener) -> Self {
        Self { tcp, unix: None }
    }
}

/// Limits on client connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionSettings {
    /// Deadlines each connection is held to.
    pub deadlines: Deadlines,
    /// Client connections served at once; a small reserve past it answers health checks.
    pub max_connections: usize,
}

impl Default for ConnectionSettings {
    /// 30 s for a request head, 120 s of keep-alive idle time, 4096 connections.
    fn default() -> Self {
        Self {
            deadlines: Deadlines {
                header: Duration::from_secs(30),
                idle: Duration::from_secs(120),
                write_stall: Duration::from_secs(120),
            },
            max_connections: 4096,
        }
    }
}

/// What a worker serves: a tower service that answers every request, such as
/// [`crate::app()`] or an axum [`Router`](axum::Router).
pub trait App:
    tower::Service<Request<Body>, Response = Response, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S> App for S where
    S: tower::Service<
            Request<Body>,
            Response = Response,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// Serve `listeners` until `shutdown` is cancelled, then wait for every accepted connection to
/// finish (graceful shutdown: no new connections, in-flight requests complete).
///
/// `make_app` builds the app each worker serves. It runs once on each worker thread, inside that
/// worker's runtime, so what the app creates there (such as an upstream connection pool) belongs
/// to that runtime.
pub async fn serve<F, S>(
    listeners: impl Into<Listeners>,
    workers: NonZeroUsize,
    settings: ConnectionSettings,
    shutdown: CancellationToken,
    make_app: F,
) -> io::Result<()>
where
    F: Fn() -> S + Clone + Send + 'static,
    S: App,
{
    let Listeners { tcp, unix } = listeners.into();
    let limit = ConnectionLimit::new(settings.max_connections);
    let mut handoffs = Vec::with_capacity(workers.get());
    let mut finished = Vec::with_capacity(workers.get());
    for index in 0..workers.get() {
        let (handoff, accepted) = mpsc::unbounded_channel();
        let (done, worker_finished) = oneshot::channel();
        spawn_worker(
            index,
            accepted,
            settings.deadlines,
            shutdown.clone(),
            make_app.clone(),
            done,
        )?;
        handoffs.push(handoff);
        finished.push(worker_finished);
    }

    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted.map(|(stream, _)| tcp_stream(stream)),
            accepted = accept_unix(unix.as_ref()) => accepted.map(|stream| {
                stream.into_std().map(ClientStream::Unix)
            }),
            () = shutdown.cancelled() => break,
        };
        let stream = match accepted {
            Ok(Ok(stream)) => stream,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "cannot hand over an accepted connection");
                continue;
            }
            Err(err) => {
                wait_after_accept_error(err).await;
                continue;
            }
        };
        let connection = match limit.admit() {
            Admission::Served(slot) => Handoff {
                stream,
                slot,
                reserve: false,
            },
            Admission::Reserve(slot) => Handoff {
                stream,
                slot,
                reserve: true,
            },
            // Closed at once: the kernel's queue keeps moving for the connections after it.
            Admission::Refused => continue,
        };
        // Round robin over the workers still running; one that is gone is skipped.
        let mut connection = Some(connection);
        for _ in 0..handoffs.len() {
            let handoff = &handoffs[next];
            next = (next + 1) % handoffs.len();
            match handoff.send(connection.take().expect("put back on failure")) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => connection = Some(back),
            }
        }
        if connection.is_some() {
            return Err(io::Error::other("no worker thread is serving"));
        }
    }
    // No new connections: close the sockets now, then let the workers drain theirs.
    drop(tcp);
    drop(unix);
    drop(handoffs);
    for worker in finished {
        let _ = worker.await;
    }
    Ok(())
}

/// An accepted TCP connection, set up for serving and detached from the acceptor's runtime.
fn tcp_stream(stream: tokio::net::TcpStream) -> io::Result<ClientStream> {
    // Small writes (one SSE event, say) go out at once instead of waiting for an ACK.
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    stream.into_std().map(ClientStream::Tcp)
}

async fn accept_unix(listener: Option<&UnixListener>) -> io::Result<tokio::net::UnixStream> {
    match listener {
        Some(listener) => listener.accept().await.map(|(stream, _)| stream),
        None => std::future::pending().await,
    }
}

/// A client connection between the acceptor and a worker.
#[derive(Debug)]
enum ClientStream {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

/// An accepted connection handed to a worker, with its place in the connection count.
#[derive(Debug)]
struct Handoff {
    stream: ClientStream,
    slot: Slot,
    /// Past `PROXY_MAX_CONNECTIONS`: health checks only.
    reserve: bool,
}

/// Start worker `index`: a thread with a single-threaded runtime serving what it is handed
/// until `shutdown`; `done` is sent when its last connection has finished.
fn spawn_worker<F, S>(
    index: usize,
    mut accepted: mpsc::UnboundedReceiver<Handoff>,
    deadlines: Deadlines,
    shutdown: CancellationToken,
    make_app: F,
    done: oneshot::Sender<()>,
) -> io::Result<()>
where
    F: Fn() -> S + Send + 'static,
    S: App,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("fresh-proxy-worker-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let app = make_app();
                // Each connection task holds a sender; `recv` ends once they all have finished.
                let (open, mut all_closed) = mpsc::channel::<()>(1);
                loop {
                    let handoff = tokio::select! {
                        handoff = accepted.recv() => handoff,
                        () = shutdown.cancelled() => None,
                    };
                    let Some(handoff) = handoff else { break };
                    spawn_connection(handoff, &app, deadlines, &shutdown, open.clone());
                }
                drop(open);
                let _ = all_closed.recv().await;
            });
            let _ = done.send(());
        })?;
    Ok(())
}

/// Serve one connection on this worker's runtime until it closes; on `shutdown`, finish the
/// request in flight and close.
fn spawn_connection<S: App>(
    handoff: Handoff,
    app: &S,
    deadlines: Deadlines,
    shutdown: &CancellationToken,
    open: mpsc::Sender<()>,
) {
    let Handoff {
        stream,
        slot,
        reserve,
    } = handoff;
    let deadlines = if reserve {
        Deadlines {
            header: deadlines.header.min(RESERVE_HEAD_TIMEOUT),
            ..deadlines
        }
    } else {
        deadlines
    };
    let clock = ConnectionClock::new(deadlines, tokio::time::Instant::now());
    let service = ConnectionService {
        app: app.clone(),
        clock: clock.clone(),
        reserve,
    };
    let shutdown = shutdown.clone();
    // Registers the socket with this worker's runtime.
    let served = match stream {
        ClientStream::Tcp(stream) => tokio::net::TcpStream::from_std(stream)
            .map(|io| tokio::spawn(serve_connection(io, clock, service, reserve, shutdown))),
        ClientStream::Unix(stream) => tokio::net::UnixStream::from_std(stream)
            .map(|io| tokio::spawn(serve_connection(io, clock, service, reserve, shutdown))),
    };
    match served {
        Ok(task) => {
            // The slot and the worker's count are held until the connection's task ends.
            tokio::spawn(async move {
                let _ = task.await;
                drop((slot, open));
            });
        }
        Err(err) => tracing::warn!(error = %err, "cannot take over a connection"),
    }
}

async fn serve_connection<I, S>(
    io: I,
    clock: ConnectionClock,
    service: ConnectionService<S>,
    reserve: bool,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: App,
{
    let io = DeadlineIo::new(io, clock);
    let sniffed = tokio::select! {
        sniffed = sniff::sniff(io) => sniffed,
        () = shutdown.cancelled() => return,
    };
    let (version, io) = match sniffed {
        Ok(sniffed) => sniffed,
        Err(err) => {
            tracing::trace!(error = %err, "connection ended before its first request");
            return;
        }
    };
    let io = TokioIo::new(io);
    let service = TowerToHyperService::new(service);
    match version {
        sniff::Version::Http1 => {
            // Head and idle deadlines are the connection clock's: hyper's own header timeout
            // would start when an answer ends and so cut idle kept-alive connections at the
            // header timeout.
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(None)
                .keep_alive(!reserve)
                .serve_connection(io, service);
            let connection = std::pin::pin!(connection);
            until_shutdown(connection, http1::Connection::graceful_shutdown, shutdown).await;
        }
        // Boxed: an HTTP/2 connection's state is twice the size of an HTTP/1 one's, and held
        // inline it would make every connection's task that large.
        sniff::Version::Http2 => {
            let connection = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(io, service);
            let mut connection = Box::pin(connection);
            let connection = connection.as_mut();
            until_shutdown(connection, http2::Connection::graceful_shutdown, shutdown).await;
        }
    }
}

/// Serves `connection` until it closes; on `shutdown`, finishes what is in flight and closes.
/// The connection is pinned by the caller, so that its state is held once.
async fn until_shutdown<C>(
    mut connection: Pin<&mut C>,
    graceful_shutdown: fn(Pin<&mut C>),
    shutdown: CancellationToken,
) where
    C: Future<Output = hyper::Result<()>>,
{
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(err) = result {
                tracing::trace!(error = %err, "connection ended");
            }
        }
        () = shutdown.cancelled() => {
            graceful_shutdown(connection.as_mut());
            let _ = connection.await;
        }
    }
}

/// The app as one connection serves it: requests counted on the connection's clock, request
/// bodies held to the pause limit, and in the reserve only health checks.
#[derive(Clone)]
struct ConnectionService<S> {
    app: S,
    clock: ConnectionClock,
    reserve: bool,
}

impl<S: App> tower::Service<Request<Incoming>> for ConnectionService<S> {
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.clock.request_started();
        if self.reserve && !is_health_check(&req) {
            let res = overloaded();
            return Box::pin(async move {
                Ok(res.map(|body| Body::new(CountedBody::new(body, in_flight))))
            });
        }
        let pause = self.clock.body_pause();
        let req = req.map(|body| Body::new(PauseLimitedBody::new(body, pause)));
        let app = self.app.clone();
        Box::pin(async move {
            let res = app.oneshot(req).await?;
            Ok(res.map(|body| Body::new(CountedBody::new(body, in_flight))))
        })
    }
}

/// What the reserve answers besides health checks.
fn is_health_check<B>(req: &Request<B>) -> bool {
    matches!(*req.method(), Method::GET | Method::HEAD)
        && matches!(req.uri().path(), "/health" | "/ready" | "/metrics")
}

/// 503 for a request that arrived past `PROXY_MAX_CONNECTIONS`.
fn overloaded() -> Response {
    let body = serde_json::json!({
        "error": {
            "type": "too_many_connections",
            "message": "the proxy holds PROXY_MAX_CONNECTIONS client connections; retry shortly",
        }
    });
    let mut res = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
    res.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    res
}

/// As axum and hyper do: an error of one connection is skipped; anything else (such as running
/// out of file descriptors) is logged and waited out for a second, instead of spinning.
async fn wait_after_accept_error(err: io::Error) {
    if matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %err, "cannot accept connections; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use axum::Router;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::sync::Notify;
    use tokio::task::JoinHandle;

    use super::*;

    /// An app that answers with the name of the thread serving it.
    fn thread_name_app() -> Router {
        Router::new().route(
            "/",
            get(|| async { std::thread::current().name().unwrap_or("?").to_owned() }),
        )
    }

    /// One HTTP/1.1 request on `stream`; the body of the answer.
    async fn get_on(stream: &mut TcpStream, path: &str) -> String {
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed before the answer was complete");
            answer.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .expect("a content-length")
                    .parse()
                    .unwrap();
                if body.len() >= length {
                    return body[..length].to_owned();
                }
            }
        }
    }

    /// `serve` on a free loopback port with `workers` workers: its address, the shutdown
    /// switch, and the running server.
    async fn start<F, S>(
        workers: usize,
        make_app: F,
    ) -> (SocketAddr, CancellationToken, JoinHandle<io::Result<()>>)
    where
        F: Fn() -> S + Clone + Send + 'static,
        S: App,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let workers = NonZeroUsize::new(workers).unwrap();
        let server = tokio::spawn(serve(
            listener,
            workers,
            ConnectionSettings::default(),
            shutdown.clone(),
            make_app,
        ));
        (addr, shutdown, server)
    }

    #[tokio::test]
    async fn accepted_connections_get_tcp_keepalive_and_nodelay() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let ClientStream::Tcp(stream) = tcp_stream(accepted).unwrap() else {
            panic!("a TCP stream");
        };
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), TCP_KEEPALIVE);
        assert!(socket.tcp_nodelay().unwrap());
        drop(client);
    }

    #[tokio::test]
    async fn connections_are_dealt_round_robin_and_stay_on_their_worker() {
        let (addr, shutdown, server) = start(3, thread_name_app).await;

        let mut per_worker = BTreeMap::<String, usize>::new();
        let mut connections = Vec::new();
        for _ in 0..9 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let worker = get_on(&mut stream, "/").await;
            *per_worker.entry(worker.clone()).or_default() += 1;
            connections.push((stream, worker));
        }
        let expected: BTreeMap<String, usize> = (0..3)
            .map(|i| (format!("fresh-proxy-worker-{i}"), 3))
            .collect();
        assert_eq!(per_worker, expected);
        // Every later request of a connection is served by the worker it was given.
        for (stream, worker) in &mut connections {
            for _ in 0..3 {
                assert_eq!(&get_on(stream, "/").await, worker);
            }
        }

        drop(connections);
        shutdown.cancel();
        server.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn shutdown_refuses_new_connections_and_lets_requests_in_flight_finish() {
        let entered = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let app = {
            let (entered, release) = (entered.clone(), release.clone());
            move || {
                let (entered, release) = (entered.clone(), release.clone());
                Router::new().route(
                    "/slow",
                    get(move || async move {
                        entered.notify_one();
                        release.notified().await;
                        "finished".to_owned()
                    }),
                )
            }
        };
        let (addr, shutdown, mut server) = start(2, app).await;

        let mut stream = TcpStream::connect(addr).await.unwrap();
        let in_flight = tokio::spawn(async move { get_on(&mut stream, "/slow").await });
        entered.notified().await;
        shutdown.cancel();

        // The listening socket closes at once...
        tokio::time::timeout(Duration::from_secs(10), async {
            while TcpStream::connect(addr).await.is_ok() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the listener closed");
        // ...while the server waits for the request in flight.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), &mut server)
                .await
                .is_err(),
            "the server stopped with a request in flight"
        );
        release.notify_one();
        assert_eq!(in_flight.await.unwrap(), "finished");
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the server finished once its connection did")
            .unwrap()
            .unwrap();
    }
}
