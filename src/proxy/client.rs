//! The HTTP clients that carry requests upstream.
//!
//! Forwarded requests go through [`ForwardingClient`]: hyper-util's pooled client over
//! hyper-rustls, with nothing between the proxy and the connection but the gzip and deflate
//! decoders. The workspace API calls of the token machinery and `/models` are few and use
//! reqwest ([`upstream_client`]), whose conveniences (JSON, errors with their URL) they rely on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use futures_util::TryFutureExt;
use http::uri::Scheme;
use http::{Request, Response, Uri};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use reqwest::Url;
use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use tower::{Service, ServiceExt};
use tower_http::decompression::{Decompression, DecompressionBody};

use crate::config;

/// An error from a connection, a proxy, TLS or a body, as hyper and its connectors give it.
pub(crate) type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body as the forwarding client sends it: whole, or streamed (through the size limit).
pub(crate) type OutgoingBody = Either<Full<Bytes>, Body>;

/// An upstream answer's body: as it arrives (gzip and deflate decoded), or read whole earlier.
pub(crate) type UpstreamBody = Either<DecompressionBody<Incoming>, Full<Bytes>>;

/// How long a new upstream connection (TCP, proxy tunnel and TLS) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an unused pooled connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// How the forwarding client connects.
#[derive(Debug)]
pub struct ForwardingOptions {
    /// `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` as read from the environment,
    /// or none.
    pub proxies: Option<Matcher>,
    /// Certificates trusted besides the built-in (webpki) and the platform's roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// How long a new connection may take, proxy tunnel and TLS handshake included.
    pub connect_timeout: Duration,
}

impl ForwardingOptions {
    /// The options for a proxy to `upstream`: proxies from the environment unless `upstream` is
    /// on loopback (a local upstream is never reached through a proxy), no extra roots.
    pub fn from_env(upstream: &Url) -> Self {
        let proxies = (!config::is_loopback(upstream)).then(Matcher::from_env);
        Self {
            proxies,
            extra_roots: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

/// The client that forwards requests upstream: pooled (idle connections kept 90 s), HTTPS by
/// rustls with ring trusting the webpki roots and the platform's, HTTP/2 where the server
/// offers it by ALPN, `TCP_NODELAY`, a connect timeout, proxies from the environment, and gzip
/// and deflate answers decoded so the SSE rewriter sees plain text. No overall timeout: streams
/// may be long, and the forwarder bounds each wait itself. Redirects are never followed: a
/// reverse proxy hands them to its client.
///
/// Pooled connections are driven by tasks on the runtime that opened them: a runtime serving
/// the app takes its own client with [`ForwardingClient::for_runtime`].
#[derive(Clone)]
pub struct ForwardingClient {
    settings: Arc<Settings>,
    client: Client<HttpsConnector<ProxyConnector>, OutgoingBody>,
}

/// What every runtime's copy of the client shares: read once, since the platform's roots come
/// from files.
struct Settings {
    tls: rustls::ClientConfig,
    proxies: Option<Arc<Matcher>>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for ForwardingClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The proxies' `Debug` shows their URLs but never their credentials.
        f.debug_struct("ForwardingClient")
            .field("proxies", &self.settings.proxies)
            .field("connect_timeout", &self.settings.connect_timeout)
            .finish_non_exhaustive()
    }
}

impl ForwardingClient {
    /// The client for a proxy to `upstream`, configured from the environment.
    pub fn for_upstream(upstream: &Url) -> Self {
        Self::new(ForwardingOptions::from_env(upstream))
    }

    /// A client with `options`.
    pub fn new(options: ForwardingOptions) -> Self {
        let settings = Settings {
            tls: tls_config(options.extra_roots),
            proxies: options.proxies.map(Arc::new),
            connect_timeout: options.connect_timeout,
        };
        Self::with_settings(Arc::new(settings))
    }

    /// A client with the same settings and a pool of its own, for another runtime.
    pub fn for_runtime(&self) -> Self {
        Self::with_settings(Arc::clone(&self.settings))
    }

    fn with_settings(settings: Arc<Settings>) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(settings.connect_timeout));
        let connector = ProxyConnector {
            http,
            proxies: settings.proxies.clone(),
        };
        let https = HttpsConnectorBuilder::new()
            .with_tls_config(settings.tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_timer(TokioTimer::new())
            .build(https);
        Self { settings, client }
    }

    /// Sends `request` (its URI absolute) and waits for the answer's head.
    ///
    /// The returned future holds the request once, inside the client's own future.
    pub(crate) fn send(
        &self,
        mut request: Request<OutgoingBody>,
    ) -> impl Future<Output = Result<Response<UpstreamBody>, BoxError>> + Send + '_ {
        if request.uri().scheme() == Some(&Scheme::HTTP) {
            self.authorize_forward_proxy(&mut request);
        }
        Decompression::new(&self.client)
            .oneshot(request)
            .map_ok(|response| response.map(Either::Left))
            .map_err(BoxError::from)
    }

    /// A plain-HTTP request sent through a proxy goes to it whole, so it carries the proxy's
    /// credentials itself (an HTTPS request's go in its tunnel's `CONNECT`).
    fn authorize_forward_proxy(&self, request: &mut Request<OutgoingBody>) {
        let Some(proxies) = &self.settings.proxies else {
            return;
        };
        if let Some(auth) = proxies
            .intercept(request.uri())
            .and_then(|proxy| proxy.basic_auth().cloned())
        {
            let mut auth = auth;
            auth.set_sensitive(true);
            request
                .headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth);
        }
    }
}

/// Rustls with ring, trusting the webpki roots, the platform's roots (which `SSL_CERT_FILE`
/// and `SSL_CERT_DIR` replace, as OpenSSL's do) and `extra`. A platform store that cannot be
/// read is a warning: the webpki roots still serve.
fn tls_config(extra: Vec<CertificateDer<'static>>) -> rustls::ClientConfig {
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    let native = rustls_native_certs::load_native_certs();
    for err in &native.errors {
        tracing::warn!(error = %err, "some of the platform's root certificates could not be read; the built-in roots are used");
    }
    roots.add_parsable_certificates(native.certs);
    roots.add_parsable_certificates(extra);
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// Opens TCP connections for the TLS layer: straight to the destination, through a `CONNECT`
/// tunnel for an HTTPS destination the proxies intercept, or to the proxy itself for a plain
/// HTTP one (the request then goes in absolute form).
#[derive(Clone)]
pub(crate) struct ProxyConnector {
    http: HttpConnector,
    proxies: Option<Arc<Matcher>>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<ProxiedStream, BoxError>> + Send>>;

impl Service<Uri> for ProxyConnector {
    type Response = ProxiedStream;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let proxy = self.proxies.as_ref().and_then(|p| p.intercept(&dst));
        let mut http = self.http.clone();
        Box::pin(async move {
            let Some(proxy) = proxy else {
                return Ok(ProxiedStream::direct(http.call(dst).await?));
            };
            if proxy.uri().scheme() != Some(&Scheme::HTTP) {
                // TLS to the proxy itself, or SOCKS: a proxy spoken to in plain HTTP only.
                return Err("only http:// proxies are supported".into());
            }
            if dst.scheme() == Some(&Scheme::HTTPS) {
                let mut tunnel = Tunnel::new(proxy.uri().clone(), http);
                if let Some(auth) = proxy.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Ok(ProxiedStream::direct(tunnel.oneshot(dst).await?))
            } else {
                let stream = http.call(proxy.uri().clone()).await?;
                Ok(ProxiedStream {
                    io: stream,
                    forward_proxy: true,
                })
            }
        })
    }
}

/// A TCP connection, to the destination or to a proxy that takes requests in absolute form.
#[derive(Debug)]
pub(crate) struct ProxiedStream {
    io: TokioIo<tokio::net::TcpStream>,
    forward_proxy: bool,
}

impl ProxiedStream {
    fn direct(io: TokioIo<tokio::net::TcpStream>) -> Self {
        Self {
            io,
            forward_proxy: false,
        }
    }
}

impl Connection for ProxiedStream {
    fn connected(&self) -> Connected {
        self.io.connected().proxy(self.forward_proxy)
    }
}

impl hyper::rt::Read for ProxiedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxiedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// An upstream failure in words, for logs: each cause in turn. hyper, its connectors and
/// rustls name no URL and no credential in their errors.
pub(crate) fn describe(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The reqwest client for the workspace's API (the token machinery and `/models`): pooled,
/// HTTPS by rustls, no overall timeout.
pub fn upstream_client(upstream: &Url) -> reqwest::Client {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .tcp_nodelay(true)
        // A reverse proxy hands 3xx answers to the client instead of following them.
        .redirect(reqwest::redirect::Policy::none());
    if config::is_loopback(upstream) {
        builder = builder.no_proxy();
    }
    builder
        .build()
        .expect("the upstream client settings are valid")
}

/// reqwest is built without a default TLS crypto provider; use ring's. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy's credentials reach neither the client's `Debug` nor a log line that prints it.
    #[test]
    fn proxy_credentials_are_not_in_debug_output() {
        let proxies = Matcher::builder()
            .https("http://alice:s3cret-pass@proxy.example:3128")
            .build();
        let client = ForwardingClient::new(ForwardingOptions {
            proxies: Some(proxies),
            extra_roots: Vec::new(),
            connect_timeout: CONNECT_TIMEOUT,
        });
        let shown = format!("{client:?}");
        assert!(shown.contains("proxy.example"), "{shown}");
        assert!(!shown.contains("s3cret-pass"), "{shown}");
        assert!(!shown.contains("alice"), "{shown}");
    }

    #[test]
    fn a_loopback_upstream_is_never_proxied() {
        let cases = [
            ("http://127.0.0.1:8080/serving-endpoints", false),
            ("http://localhost:8080/", false),
            ("https://adb-1.azuredatabricks.net/serving-endpoints", true),
        ];
        for (upstream, proxied) in cases {
            let options = ForwardingOptions::from_env(&Url::parse(upstream).unwrap());
            assert_eq!(options.proxies.is_some(), proxied, "{upstream}");
        }
    }
}
