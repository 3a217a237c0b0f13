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

use std::io;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::time::Duration;

use axum::Router;
use axum::serve::Listener;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How many connections the kernel holds for the proxy before it accepts them. The standard
/// library and tokio ask for 128; a burst of agents' streams (or a load test) opening more at
/// once would then see SYNs dropped and retried a second later. The kernel caps this at
/// `net.core.somaxconn`.
pub const LISTEN_BACKLOG: u32 = 1024;

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

/// Serve `listener` until `shutdown` is cancelled, then wait for every accepted connection to
/// finish (graceful shutdown: no new connections, in-flight requests complete).
///
/// `make_app` builds the app each worker serves. It runs once on each worker thread, inside that
/// worker's runtime, so what the app creates there (such as an upstream connection pool) belongs
/// to that runtime.
pub async fn serve<F>(
    listener: TcpListener,
    workers: NonZeroUsize,
    shutdown: CancellationToken,
    make_app: F,
) -> io::Result<()>
where
    F: Fn() -> Router + Clone + Send + 'static,
{
    let local_addr = listener.local_addr()?;
    let mut handoffs = Vec::with_capacity(workers.get());
    let mut finished = Vec::with_capacity(workers.get());
    for index in 0..workers.get() {
        let (handoff, accepted) = mpsc::unbounded_channel();
        let (done, worker_finished) = oneshot::channel();
        let listener = Handoff {
            accepted,
            local_addr,
        };
        spawn_worker(index, listener, shutdown.clone(), make_app.clone(), done)?;
        handoffs.push(handoff);
        finished.push(worker_finished);
    }

    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                wait_after_accept_error(err).await;
                continue;
            }
        };
        // Small writes (one SSE event, say) go out at once instead of waiting for an ACK.
        let _ = stream.set_nodelay(true);
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(err) => {
                tracing::warn!(error = %err, "cannot hand over an accepted connection");
                continue;
            }
        };
        // Round robin over the workers still running; one that is gone is skipped.
        let mut connection = Some((stream, peer));
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
    // No new connections: close the socket now, then let the workers drain theirs.
    drop(listener);
    drop(handoffs);
    for worker in finished {
        let _ = worker.await;
    }
    Ok(())
}

/// Start worker `index`: a thread with a single-threaded runtime serving what `listener` hands
/// it until `shutdown`; `done` is sent when its last connection has finished.
fn spawn_worker<F>(
    index: usize,
    listener: Handoff,
    shutdown: CancellationToken,
    make_app: F,
    done: oneshot::Sender<()>,
) -> io::Result<()>
where
    F: Fn() -> Router + Send + 'static,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("fresh-proxy-worker-{index}"))
        .spawn(move || {
            runtime.block_on(async move {
                let served = axum::serve(listener, make_app())
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await;
                if let Err(err) = served {
                    tracing::error!(worker = index, error = %err, "worker stopped");
                }
            });
            let _ = done.send(());
        })?;
    Ok(())
}

/// The connections a worker is handed, as an axum [`Listener`].
struct Handoff {
    accepted: mpsc::UnboundedReceiver<(std::net::TcpStream, SocketAddr)>,
    local_addr: SocketAddr,
}

impl Listener for Handoff {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            let Some((stream, peer)) = self.accepted.recv().await else {
                // The acceptor has stopped; graceful shutdown ends this worker.
                return std::future::pending().await;
            };
            // Registers the socket with this worker's runtime.
            match TcpStream::from_std(stream) {
                Ok(stream) => return (stream, peer),
                Err(err) => tracing::warn!(error = %err, "cannot take over a connection"),
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
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

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
    async fn start<F>(
        workers: usize,
        make_app: F,
    ) -> (SocketAddr, CancellationToken, JoinHandle<io::Result<()>>)
    where
        F: Fn() -> Router + Clone + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let workers = NonZeroUsize::new(workers).unwrap();
        let server = tokio::spawn(serve(listener, workers, shutdown.clone(), make_app));
        (addr, shutdown, server)
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
