//! The forwarding client against upstreams as a workspace and a corporate network present them:
//! HTTPS under a private CA, HTTP/2 offered by ALPN, an HTTP proxy (`CONNECT` tunnels for HTTPS,
//! absolute-form requests for plain HTTP), `NO_PROXY`, compressed answers, and connections
//! that never complete.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use bytes::Bytes;
use common::harness::{RunningProxy, serve, settings};
use common::logs::{capture_logs, logs};
use common::{JsonBody, SseReader, http_client};
use fresh_proxy::token::status::SourceKind;
use fresh_proxy::{AppState, ForwardingClient, ForwardingOptions};
use fresh_token::{SharedToken, Token};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TOKEN: &str = "dapi-upstream-client-test-token";

/// What an upstream saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    version: http::Version,
    path: String,
    authorization: Option<String>,
    accept_encoding: Option<String>,
}

/// A stand-in workspace: answers every request with JSON saying what it saw, counts the
/// connections it accepted.
#[derive(Clone, Default)]
struct Upstream {
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
}

impl Upstream {
    /// A chat stream at `/serving-endpoints/sse/...` (a tool call under the name Databricks
    /// gives it, which the proxy must restore); JSON saying what it saw anywhere else.
    fn router(&self) -> Router {
        let seen = Arc::clone(&self.seen);
        let sse = Router::new().fallback(tool_call_stream);
        Router::new()
            .nest("/serving-endpoints/sse", sse)
            .fallback(move |req: Request| {
                let seen = Arc::clone(&seen);
                async move {
                    let entry = {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_owned())
                        };
                        Seen {
                            version: req.version(),
                            path: req.uri().path().to_owned(),
                            authorization: header("authorization"),
                            accept_encoding: header("accept-encoding"),
                        }
                    };
                    // As a model endpoint does: the whole request is read before the answer.
                    if axum::body::to_bytes(req.into_body(), usize::MAX)
                        .await
                        .is_err()
                    {
                        return http::StatusCode::BAD_REQUEST.into_response();
                    }
                    seen.lock().unwrap().push(entry.clone());
                    axum::Json(json!({
                    "version": format!("{:?}", entry.version),
                    "path": entry.path,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}}],
                }))
                .into_response()
                }
            })
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A streamed chat answer calling a tool, as Databricks names it, in events sent apart.
async fn tool_call_stream() -> axum::response::Response {
    use futures_util::StreamExt;
    let events = [
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{\"name\":\"databricks-tool-call\",\"arguments\":\"\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\"{\\\"name\\\":\\\"read_file\\\",\\\"path\\\":\\\"/x\\\"}\"}}]}}]}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: [DONE]\n\n",
    ];
    let body = futures_util::stream::iter(events).then(|event| async move {
        tokio::time::sleep(Duration::from_millis(10)).await;
        Ok::<_, std::io::Error>(Bytes::from_static(event.as_bytes()))
    });
    (
        [("content-type", "text/event-stream")],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// A private CA and a server certificate it issued for `workspace.example` and `127.0.0.1`.
struct Pki {
    root: CertificateDer<'static>,
    root_pem: String,
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

fn pki() -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fresh-proxy test CA");
    let root = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let names = vec!["workspace.example".to_owned(), "127.0.0.1".to_owned()];
    let leaf = CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    Pki {
        root: root.der().clone(),
        root_pem: root.pem(),
        chain: vec![leaf.der().clone()],
        key: key.serialize_der(),
    }
}

/// Serves `upstream` over TLS with `pki`'s certificate, offering `alpn`; returns its address.
async fn serve_tls(upstream: &Upstream, pki: &Pki, alpn: &[&[u8]]) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.key.clone()));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(pki.chain.clone(), key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = upstream.router();
    let connections = Arc::clone(&upstream.connections);
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            connections.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            let service = TowerToHyperService::new(router.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

/// Serves `router` over plain HTTP; returns its address.
async fn serve_plain(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// An HTTP proxy as corporate networks run them: `CONNECT host:port` opens a tunnel, any other
/// request line names an absolute URL and is forwarded; without the right
/// `Proxy-Authorization` the answer is 407. Every name resolves to `target`, as the
/// network's own DNS would resolve the workspace.
#[derive(Clone)]
struct HttpProxy {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
}

impl HttpProxy {
    async fn start(target: SocketAddr, credentials: &'static str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let recorded = Arc::clone(&heads);
        let expected = format!("Basic {}", base64_of(credentials));
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let recorded = Arc::clone(&recorded);
                let expected = expected.clone();
                tokio::spawn(async move {
                    let _ = relay(client, target, &recorded, &expected).await;
                });
            }
        });
        Self { addr, heads }
    }

    fn url(&self, userinfo: &str) -> String {
        format!("http://{userinfo}@{}", self.addr)
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }
}

async fn relay(
    mut client: TcpStream,
    target: SocketAddr,
    recorded: &Mutex<Vec<String>>,
    expected_auth: &str,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if client.read(&mut byte).await? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    recorded.lock().unwrap().push(text.clone());
    let authorized = text.lines().any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.eq_ignore_ascii_case("proxy-authorization") && value.trim() == expected_auth
        })
    });
    if !authorized {
        client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\n\r\n")
            .await?;
        return Ok(());
    }
    let mut upstream = TcpStream::connect(target).await?;
    if text.starts_with("CONNECT ") {
        client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await?;
    } else {
        upstream.write_all(&head).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

fn base64_of(text: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A proxy to `base` forwarding with `client`.
async fn proxy_with(base: &str, client: ForwardingClient) -> RunningProxy {
    let source = Arc::new(SharedToken::with_token(Token::new(TOKEN).unwrap()));
    let state = AppState::new(settings(base), source, SourceKind::Env);
    serve(state.with_forwarding_client(client)).await
}

fn options(
    proxies: Option<Matcher>,
    extra_roots: Vec<CertificateDer<'static>>,
) -> ForwardingOptions {
    ForwardingOptions {
        proxies,
        extra_roots,
        connect_timeout: Duration::from_secs(10),
    }
}

/// A client that leaves answers as they come: an encoded answer the proxy failed to decode
/// shows as such instead of being decoded here.
fn undecoding_client() -> reqwest::Client {
    fresh_proxy::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .no_gzip()
        .no_deflate()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

async fn chat(proxy: &RunningProxy) -> reqwest::Response {
    undecoding_client()
        .post(format!("{}/chat/invocations", proxy.url()))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
}

/// Asks `proxy` for the streamed tool call; its events' data, one a line.
async fn stream_tool_call(proxy: &RunningProxy) -> String {
    let res = undecoding_client()
        .post(format!("{}/sse/invocations", proxy.url()))
        .json_body(&common::streamed_tool_call_request())
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().get("content-encoding").is_none());
    SseReader::new(res).collect_data().await.join("\n")
}

async fn json_of(res: reqwest::Response) -> Value {
    let text = res.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[tokio::test]
async fn an_https_upstream_is_trusted_by_its_root_and_refused_without_it() {
    let pki = pki();
    let upstream = Upstream::default();
    let addr = serve_tls(&upstream, &pki, &[b"http/1.1"]).await;
    let base = format!("https://{addr}/serving-endpoints");

    let trusted = proxy_with(
        &base,
        ForwardingClient::new(options(None, vec![pki.root.clone()])),
    )
    .await;
    for _ in 0..3 {
        let res = chat(&trusted).await;
        assert_eq!(res.status(), 200);
        let body = json_of(res).await;
        assert_eq!(body["version"], "HTTP/1.1");
        assert_eq!(body["path"], "/serving-endpoints/chat/invocations");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(
        seen[0].authorization.as_deref(),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    // Pooled: the three requests shared one connection.
    assert_eq!(upstream.connections.load(Ordering::SeqCst), 1);

    // Without the private root (the built-in and platform roots only), the certificate is
    // refused and the agent gets a JSON error.
    let untrusted = proxy_with(&base, ForwardingClient::new(options(None, Vec::new()))).await;
    let res = chat(&untrusted).await;
    assert_eq!(res.status(), 502);
    assert_eq!(json_of(res).await["error"]["type"], "upstream_unreachable");
    assert_eq!(upstream.seen().len(), 3, "nothing reached the upstream");
}

#[tokio::test]
async fn http2_is_used_where_the_upstream_offers_it_by_alpn() {
    let pki = pki();
    let upstream = Upstream::default();
    let addr = serve_tls(&upstream, &pki, &[b"h2", b"http/1.1"]).await;
    let base = format!("https://{addr}/serving-endpoints");
    let proxy = proxy_with(
        &base,
        ForwardingClient::new(options(None, vec![pki.root.clone()])),
    )
    .await;
    let answers = futures_util::future::join_all((0..4).map(|_| chat(&proxy))).await;
    for res in answers {
        assert_eq!(res.status(), 200);
        assert_eq!(json_of(res).await["version"], "HTTP/2.0");
    }
    let text = stream_tool_call(&proxy).await;
    assert!(text.contains("\"name\":\"read_file\""), "{text}");
    assert!(!text.contains("databricks-tool-call"), "{text}");
    assert!(
        upstream
            .seen()
            .iter()
            .all(|s| s.version == http::Version::HTTP_2)
    );
    assert!(
        upstream.seen()[0]
            .authorization
            .as_deref()
            .is_some_and(|auth| auth.ends_with(TOKEN))
    );
}

#[tokio::test]
async fn https_goes_through_the_proxy_in_a_connect_tunnel_and_no_proxy_bypasses_it() {
    capture_logs();
    let pki = pki();
    let upstream = Upstream::default();
    let addr = serve_tls(&upstream, &pki, &[b"h2", b"http/1.1"]).await;
    let proxy = HttpProxy::start(addr, "corp-user:s3cret@pass").await;
    let matcher = |no: &str| {
        Matcher::builder()
            .https(proxy.url("corp-user:s3cret%40pass"))
            .no(no)
            .build()
    };

    // The workspace by its name, reachable only through the proxy.
    let base = "https://workspace.example/serving-endpoints";
    let client = ForwardingClient::new(options(Some(matcher("localhost")), vec![pki.root.clone()]));
    let agent = proxy_with(base, client).await;
    let res = chat(&agent).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        json_of(res).await["version"],
        "HTTP/2.0",
        "TLS and ALPN run inside the tunnel"
    );
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let mut lines = heads[0].lines();
    assert_eq!(lines.next(), Some("CONNECT workspace.example:443 HTTP/1.1"));
    let expected_auth = format!("Basic {}", base64_of("corp-user:s3cret@pass"));
    assert!(
        heads[0]
            .lines()
            .any(|l| l.eq_ignore_ascii_case(&format!("proxy-authorization: {expected_auth}"))),
        "{heads:?}"
    );
    assert_eq!(upstream.seen().len(), 1);
    assert_eq!(
        upstream.seen()[0].path,
        "/serving-endpoints/chat/invocations"
    );

    // `NO_PROXY` naming the upstream: straight there, the proxy sees nothing.
    let direct = format!("https://127.0.0.1:{}/serving-endpoints", addr.port());
    let client = ForwardingClient::new(options(
        Some(matcher("localhost, 127.0.0.1")),
        vec![pki.root.clone()],
    ));
    let bypassing = proxy_with(&direct, client).await;
    assert_eq!(chat(&bypassing).await.status(), 200);
    assert_eq!(proxy.heads().len(), 1, "NO_PROXY must bypass the proxy");
    assert_eq!(upstream.seen().len(), 2);

    // The same upstream without the NO_PROXY entry is tunnelled.
    let client = ForwardingClient::new(options(Some(matcher("localhost")), vec![pki.root.clone()]));
    let tunnelled = proxy_with(&direct, client).await;
    assert_eq!(chat(&tunnelled).await.status(), 200);
    let heads = proxy.heads();
    assert_eq!(heads.len(), 2);
    assert!(heads[1].starts_with(&format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n", addr.port())));

    // Wrong credentials: the proxy's 407 becomes the agent's JSON error.
    let wrong = Matcher::builder()
        .https(proxy.url("corp-user:wrong"))
        .build();
    let refused = proxy_with(
        base,
        ForwardingClient::new(options(Some(wrong), vec![pki.root.clone()])),
    )
    .await;
    let res = chat(&refused).await;
    assert_eq!(res.status(), 502);
    assert_eq!(json_of(res).await["error"]["type"], "upstream_unreachable");

    let logs = logs();
    for secret in ["s3cret", &base64_of("corp-user:s3cret@pass"), TOKEN] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}

#[tokio::test]
async fn plain_http_goes_to_the_proxy_in_absolute_form_with_its_credentials() {
    let upstream = Upstream::default();
    let addr = serve_plain(upstream.router()).await;
    let proxy = HttpProxy::start(addr, "corp-user:pw").await;
    let matcher = Matcher::builder().http(proxy.url("corp-user:pw")).build();
    let base = "http://workspace.example:8080/serving-endpoints";
    let agent = proxy_with(
        base,
        ForwardingClient::new(options(Some(matcher), Vec::new())),
    )
    .await;
    let res = chat(&agent).await;
    assert_eq!(res.status(), 200);
    let heads = proxy.heads();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(
        heads[0].starts_with(
            "POST http://workspace.example:8080/serving-endpoints/chat/invocations HTTP/1.1\r\n"
        ),
        "{heads:?}"
    );
    assert_eq!(
        upstream.seen()[0].path,
        "/serving-endpoints/chat/invocations"
    );
}

/// An upstream that compresses every answer the request accepts, with the given encoder.
async fn compressing_upstream(upstream: &Upstream, gzip: bool) -> String {
    use tower_http::compression::CompressionLayer;
    use tower_http::compression::predicate::SizeAbove;
    let layer = if gzip {
        CompressionLayer::new().no_deflate()
    } else {
        CompressionLayer::new().no_gzip()
    };
    let layer = layer.compress_when(SizeAbove::new(0));
    let seen = Arc::clone(&upstream.seen);
    let record = axum::middleware::from_fn(move |req: Request, next: axum::middleware::Next| {
        let seen = Arc::clone(&seen);
        async move {
            seen.lock().unwrap().push(Seen {
                version: req.version(),
                path: req.uri().path().to_owned(),
                authorization: None,
                accept_encoding: req
                    .headers()
                    .get("accept-encoding")
                    .map(|v| v.to_str().unwrap().to_owned()),
            });
            let res = next.run(req).await;
            // What went on the wire: the compressed answer.
            assert!(res.headers().contains_key("content-encoding"));
            res
        }
    });
    let app = upstream.router().layer(layer).layer(record);
    format!("http://{}/serving-endpoints", serve_plain(app).await)
}

#[tokio::test]
async fn gzip_and_deflate_answers_are_decoded_and_streams_fixed() {
    for gzip in [true, false] {
        let upstream = Upstream::default();
        let base = compressing_upstream(&upstream, gzip).await;
        let proxy = proxy_with(
            &base,
            ForwardingClient::for_upstream(&base.parse().unwrap()),
        )
        .await;

        let res = chat(&proxy).await;
        assert_eq!(res.status(), 200, "gzip {gzip}");
        assert!(res.headers().get("content-encoding").is_none());
        let body = json_of(res).await;
        assert_eq!(
            body["choices"][0]["message"]["content"], "hello",
            "gzip {gzip}"
        );

        let text = stream_tool_call(&proxy).await;
        assert!(
            text.contains("\"name\":\"read_file\""),
            "gzip {gzip}: {text}"
        );
        assert!(
            !text.contains("databricks-tool-call"),
            "gzip {gzip}: {text}"
        );
        assert!(
            text.contains("\"finish_reason\":\"tool_calls\""),
            "gzip {gzip}: {text}"
        );

        for seen in upstream.seen() {
            let accepted = seen.accept_encoding.unwrap_or_default();
            assert!(
                accepted.contains("gzip") && accepted.contains("deflate"),
                "{accepted:?}"
            );
        }
    }
}

/// A listening socket whose accept queue is full: the kernel drops further connection
/// attempts, so a connect to it hangs as one to an unreachable host does.
async fn unanswering_upstream() -> (SocketAddr, Vec<TcpStream>, std::net::TcpListener) {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let listener: std::net::TcpListener = socket.into();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    // Fill the queue; a connect that does not complete at once shows it is full.
    for _ in 0..8 {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => held.push(stream),
            _ => break,
        }
    }
    (addr, held, listener)
}

#[tokio::test]
async fn a_connection_that_never_completes_gets_a_json_error_in_time() {
    let (addr, _held, _listener) = unanswering_upstream().await;
    let base = format!("http://{addr}/serving-endpoints");

    // The connect timeout ends it: 502.
    let client = ForwardingClient::new(ForwardingOptions {
        proxies: None,
        extra_roots: Vec::new(),
        connect_timeout: Duration::from_millis(300),
    });
    let proxy = proxy_with(&base, client).await;
    let started = Instant::now();
    let res = chat(&proxy).await;
    assert_eq!(res.status(), 502);
    assert_eq!(json_of(res).await["error"]["type"], "upstream_unreachable");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // A longer connect timeout than PROXY_UPSTREAM_TIMEOUT: the upstream timeout ends it, 504.
    let source = Arc::new(SharedToken::with_token(Token::new(TOKEN).unwrap()));
    let mut settings = settings(&base);
    settings.upstream_timeout = Duration::from_millis(300);
    let state = AppState::new(settings, source, SourceKind::Env)
        .with_forwarding_client(ForwardingClient::new(options(None, Vec::new())));
    let proxy = serve(state).await;
    let started = Instant::now();
    let res = chat(&proxy).await;
    assert_eq!(res.status(), 504);
    assert_eq!(json_of(res).await["error"]["type"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_streamed_request_body_still_meets_the_size_limit() {
    let upstream = Upstream::default();
    let addr = serve_plain(upstream.router()).await;
    let base = format!("http://{addr}/serving-endpoints");
    let source = Arc::new(SharedToken::with_token(Token::new(TOKEN).unwrap()));
    let mut settings = settings(&base);
    settings.max_body = 64 * 1024;
    let proxy = serve(AppState::new(settings, source, SourceKind::Env)).await;
    let chunks: Vec<Result<Bytes, std::io::Error>> = (0..32)
        .map(|_| Ok(Bytes::from(vec![b'x'; 8 * 1024])))
        .collect();
    let res = http_client()
        .post(format!("{}/files/invocations", proxy.url()))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 413);
    assert_eq!(json_of(res).await["error"]["type"], "request_too_large");
}

/// The binary as a corporate network runs it: `HTTPS_PROXY` with credentials, the private CA in
/// `SSL_CERT_FILE`, the workspace reachable only through the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_takes_its_proxy_and_roots_from_the_environment() {
    use common::binary::{ProxyProcess, command};
    let pki = pki();
    let upstream = Upstream::default();
    let addr = serve_tls(&upstream, &pki, &[b"h2", b"http/1.1"]).await;
    let proxy = HttpProxy::start(addr, "corp-user:env-s3cret").await;
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[DEFAULT]\nhost = https://workspace.example\ntoken = {TOKEN}\n"),
    )
    .unwrap();
    let ca_file = home.path().join("corp-ca.pem");
    std::fs::write(&ca_file, &pki.root_pem).unwrap();
    let mut cmd = command(home.path());
    cmd.env("PAT_ROTATION", "off")
        .env("RUST_LOG", "trace")
        .env("HTTPS_PROXY", proxy.url("corp-user:env-s3cret"))
        .env("NO_PROXY", "localhost")
        .env("SSL_CERT_FILE", &ca_file);
    let running = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    let res = http_client()
        .post(format!("{}/chat/invocations", running.url()))
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "{}", running.logs());
    assert_eq!(json_of(res).await["version"], "HTTP/2.0");
    let heads = proxy.heads();
    assert!(
        heads
            .iter()
            .any(|h| h.starts_with("CONNECT workspace.example:443 HTTP/1.1\r\n")),
        "{heads:?}"
    );
    assert!(
        upstream
            .seen()
            .iter()
            .any(|s| s.path == "/serving-endpoints/chat/invocations")
    );
    let logs = running.logs();
    for secret in ["env-s3cret", &base64_of("corp-user:env-s3cret"), TOKEN] {
        assert!(!logs.contains(secret), "{secret} in the logs");
    }
}
