//! The reference passthrough used when nginx is absent: what a reverse proxy costs with no
//! filtering at all. Bodies stream through; upstream connections are pooled; the request gets
//! an `Authorization` header as nginx's `proxy_set_header` would give it.

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONNECTION, CONTENT_TYPE, HOST, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// The upstream URL that request paths are appended to.
#[derive(Clone, Debug)]
pub(crate) struct Base {
    authority: http::uri::Authority,
    prefix: String,
}

impl Base {
    pub(crate) fn parse(url: &str) -> Result<Self, &'static str> {
        let uri: Uri = url.parse().map_err(|_| "not a URL")?;
        if uri.scheme_str() != Some("http") {
            return Err("only http:// is supported");
        }
        let authority = uri.authority().ok_or("no host")?.clone();
        if !matches!(authority.host(), "127.0.0.1" | "localhost" | "[::1]") {
            return Err("the harness forwards to loopback addresses only");
        }
        Ok(Self {
            authority,
            prefix: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    fn target(&self, uri: &Uri) -> Result<Uri, http::Error> {
        let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path}", self.prefix))
            .build()
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) async fn serve(listener: TcpListener, base: Base) -> std::io::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let host = HeaderValue::from_str(base.authority.as_str()).expect("an authority is a header");
    loop {
        let (socket, _) = listener.accept().await?;
        let _ = socket.set_nodelay(true);
        let (client, base, host) = (client.clone(), base.clone(), host.clone());
        tokio::spawn(async move {
            let service =
                service_fn(move |req| forward(req, client.clone(), base.clone(), host.clone()));
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(socket), service)
                .await;
        });
    }
}

async fn forward(
    mut req: Request<Incoming>,
    client: Client<HttpConnector, Incoming>,
    base: Base,
    host: HeaderValue,
) -> Result<Response<Body>, hyper::Error> {
    let Ok(target) = base.target(req.uri()) else {
        return Ok(error(StatusCode::BAD_REQUEST));
    };
    *req.uri_mut() = target;
    let headers = req.headers_mut();
    headers.remove(CONNECTION);
    headers.insert(HOST, host);
    headers.insert(
        AUTHORIZATION,
        HeaderValue::from_static("Bearer dapi-loadtest-reference"),
    );
    match client.request(req).await {
        Ok(res) => Ok(res.map(BodyExt::boxed)),
        Err(_) => Ok(error(StatusCode::BAD_GATEWAY)),
    }
}

fn error(status: StatusCode) -> Response<Body> {
    let body = format!(r#"{{"error":{{"type":"passthrough","message":"{status}"}}}}"#);
    let mut res = Response::new(Full::new(Bytes::from(body)).map_err(|e| match e {}).boxed());
    *res.status_mut() = status;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}
