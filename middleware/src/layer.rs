//! [`FreshTokenLayer`] and the [`FreshToken`] service.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use crate::source::TokenSource;

/// What [`FreshToken`] does with a request when its source has no token.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnMissingToken {
    /// Answer `503 Service Unavailable` with a JSON error body; the inner service is not called.
    #[default]
    Reject,
    /// Call the inner service with the request as it came, headers untouched.
    PassThrough,
}

/// The body of the 503 answer given when no token is available.
pub const MISSING_TOKEN_BODY: &str =
    r#"{"error":{"type":"token_unavailable","message":"no valid token is available"}}"#;

/// Applies [`FreshToken`], which puts the current token of a [`TokenSource`] on every request.
///
/// ```
/// use std::convert::Infallible;
/// use fresh_token::{FreshTokenLayer, SharedToken, Token};
/// use http::{Request, Response, StatusCode, header::AUTHORIZATION};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let token = SharedToken::new();
/// let service = ServiceBuilder::new()
///     .layer(FreshTokenLayer::new(token.clone()))
///     .service(service_fn(|req: Request<String>| async move {
///         let auth = req.headers()[AUTHORIZATION].to_str().unwrap().to_owned();
///         Ok::<_, Infallible>(Response::new(auth))
///     }));
///
/// // No token yet: a 503 with a JSON body, and the inner service is not called.
/// let res = service.clone().oneshot(Request::new(String::new())).await.unwrap();
/// assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
///
/// // Once a token is published, every request carries it, whatever the client sent.
/// token.publish(Token::new("dapi-current").unwrap());
/// let req = Request::builder()
///     .header(AUTHORIZATION, "Bearer stale-token-of-the-client")
///     .body(String::new())
///     .unwrap();
/// let res = service.oneshot(req).await.unwrap();
/// # use http_body_util::BodyExt;
/// let body = res.into_body().collect().await.unwrap().to_bytes();
/// assert_eq!(body, "Bearer dapi-current");
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct FreshTokenLayer<T> {
    source: T,
    on_missing: OnMissingToken,
}

impl<T> FreshTokenLayer<T> {
    /// Take tokens from `source`.
    #[must_use]
    pub fn new(source: T) -> Self {
        Self {
            source,
            on_missing: OnMissingToken::default(),
        }
    }

    /// What to do when the source has no token (default: [`OnMissingToken::Reject`]).
    #[must_use]
    pub fn on_missing(mut self, on_missing: OnMissingToken) -> Self {
        self.on_missing = on_missing;
        self
    }
}

impl<S, T: Clone> Layer<S> for FreshTokenLayer<T> {
    type Service = FreshToken<S, T>;

    fn layer(&self, inner: S) -> Self::Service {
        FreshToken {
            inner,
            source: self.source.clone(),
            on_missing: self.on_missing,
        }
    }
}

/// Middleware that sets `Authorization: Bearer <token>` on every request from a
/// [`TokenSource`], replacing any `Authorization` header the client sent.
///
/// The header value is marked sensitive. The token used is also put in the request's
/// extensions, so an inner service can hand it to [`TokenSource::refresh`] when the upstream
/// rejects it. When the source has no token the service answers 503 (see [`OnMissingToken`]);
/// it never fails with an error, which would drop the connection.
#[derive(Clone, Debug)]
pub struct FreshToken<S, T> {
    inner: S,
    source: T,
    on_missing: OnMissingToken,
}

impl<S, T> FreshToken<S, T> {
    /// Wrap `inner`, taking tokens from `source`.
    pub fn new(inner: S, source: T) -> Self {
        Self {
            inner,
            source,
            on_missing: OnMissingToken::default(),
        }
    }

    /// A layer that wraps services in this middleware.
    pub fn layer(source: T) -> FreshTokenLayer<T> {
        FreshTokenLayer::new(source)
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwrap the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, T, ReqBody, ResBody> Service<Request<ReqBody>> for FreshToken<S, T>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    T: TokenSource,
{
    type Response = Response<ResponseBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        match self.source.current() {
            Some(token) => {
                req.headers_mut()
                    .insert(AUTHORIZATION, token.header_value().clone());
                req.extensions_mut().insert(token);
            }
            None if self.on_missing == OnMissingToken::PassThrough => {}
            None => {
                // Per request, so not a warning: the source reports the lapse once, where it
                // knows why.
                tracing::debug!("no token available; answering 503");
                return ResponseFuture::rejected(missing_token_response());
            }
        }
        ResponseFuture::inner(self.inner.call(req))
    }
}

fn missing_token_response() -> Response<Bytes> {
    let mut res = Response::new(Bytes::from_static(MISSING_TOKEN_BODY.as_bytes()));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

pin_project! {
    /// Response future of [`FreshToken`].
    pub struct ResponseFuture<F> {
        #[pin]
        kind: Kind<F>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Inner { #[pin] future: F },
        Rejected { response: Option<Response<Bytes>> },
    }
}

impl<F> ResponseFuture<F> {
    fn inner(future: F) -> Self {
        Self {
            kind: Kind::Inner { future },
        }
    }

    fn rejected(response: Response<Bytes>) -> Self {
        Self {
            kind: Kind::Rejected {
                response: Some(response),
            },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Inner { future } => {
                let res = ready!(future.poll(cx))?;
                Poll::Ready(Ok(res.map(ResponseBody::inner)))
            }
            KindProj::Rejected { response } => {
                let res = response.take().expect("polled after completion");
                Poll::Ready(Ok(res.map(ResponseBody::rejected)))
            }
        }
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

pin_project! {
    /// Response body of [`FreshToken`]: the inner service's body, or the JSON error body of a
    /// request answered for lack of a token.
    pub struct ResponseBody<B> {
        #[pin]
        kind: BodyKind<B>,
    }
}

pin_project! {
    #[project = BodyKindProj]
    enum BodyKind<B> {
        Inner { #[pin] body: B },
        Rejected { body: Option<Bytes> },
    }
}

impl<B> ResponseBody<B> {
    /// Whether this is the body of a request answered 503 for lack of a token (the inner
    /// service was not called), so that an application can say more about why.
    pub fn is_rejected(&self) -> bool {
        matches!(self.kind, BodyKind::Rejected { .. })
    }

    fn inner(body: B) -> Self {
        Self {
            kind: BodyKind::Inner { body },
        }
    }

    fn rejected(body: Bytes) -> Self {
        Self {
            kind: BodyKind::Rejected { body: Some(body) },
        }
    }
}

impl<B> Body for ResponseBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            BodyKindProj::Inner { body } => body.poll_frame(cx),
            BodyKindProj::Rejected { body } => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            BodyKind::Inner { body } => body.is_end_stream(),
            BodyKind::Rejected { body } => body.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            BodyKind::Inner { body } => body.size_hint(),
            BodyKind::Rejected { body } => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
        }
    }
}

impl<B> fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseBody").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SharedToken, Token};
    use http_body_util::BodyExt;
    use std::convert::Infallible;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::{ServiceBuilder, ServiceExt, service_fn};

    /// Echoes what the inner service saw: the Authorization header, whether it was sensitive,
    /// and whether the token reached the extensions.
    async fn echo(req: Request<String>) -> Result<Response<String>, Infallible> {
        let auth = req
            .headers()
            .get_all(AUTHORIZATION)
            .iter()
            .collect::<Vec<_>>();
        let summary = format!(
            "count={} value={} sensitive={} ext={}",
            auth.len(),
            auth.first().map_or("-", |v| v.to_str().unwrap()),
            auth.first().is_some_and(|v| v.is_sensitive()),
            req.extensions()
                .get::<Token>()
                .map_or("-", |t| t.expose_secret()),
        );
        Ok(Response::new(summary))
    }

    async fn body_of<B: Body<Data = Bytes>>(res: Response<B>) -> String
    where
        B::Error: fmt::Debug,
    {
        String::from_utf8(res.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn injects_and_replaces_the_client_header() {
        let shared = SharedToken::with_token(Token::new("dapi-fresh").unwrap());
        let service = ServiceBuilder::new()
            .layer(FreshTokenLayer::new(shared))
            .service_fn(echo);
        let cases: &[&[&str]] = &[&[], &["Bearer client-stale"], &["Basic abc", "Bearer x"]];
        for client_headers in cases {
            let mut req = Request::builder();
            for value in *client_headers {
                req = req.header(AUTHORIZATION, *value);
            }
            let res = service
                .clone()
                .oneshot(req.body(String::new()).unwrap())
                .await
                .unwrap();
            assert_eq!(res.status(), StatusCode::OK);
            assert_eq!(
                body_of(res).await,
                "count=1 value=Bearer dapi-fresh sensitive=true ext=dapi-fresh",
                "client sent {client_headers:?}"
            );
        }
    }

    #[tokio::test]
    async fn follows_each_publication() {
        let shared = SharedToken::new();
        let service = FreshToken::new(service_fn(echo), shared.clone());
        for value in ["dapi-1", "dapi-2", "dapi-3"] {
            shared.publish(Token::new(value).unwrap());
            let res = service
                .clone()
                .oneshot(Request::new(String::new()))
                .await
                .unwrap();
            assert!(
                body_of(res)
                    .await
                    .contains(&format!("value=Bearer {value} "))
            );
        }
    }

    #[tokio::test]
    async fn missing_token_is_a_503_json_answer_and_the_inner_service_is_not_called() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let inner = service_fn(move |req: Request<String>| {
            counted.fetch_add(1, Ordering::SeqCst);
            echo(req)
        });
        let service = FreshTokenLayer::new(SharedToken::new()).layer(inner);
        let res = service.oneshot(Request::new(String::new())).await.unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(res.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(
            res.body().size_hint().exact(),
            Some(MISSING_TOKEN_BODY.len() as u64)
        );
        let body: serde_json::Value = serde_json::from_str(&body_of(res).await).unwrap();
        assert_eq!(body["error"]["type"], "token_unavailable");
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn pass_through_leaves_the_request_untouched() {
        let service = FreshTokenLayer::new(SharedToken::new())
            .on_missing(OnMissingToken::PassThrough)
            .layer(service_fn(echo));
        let req = Request::builder()
            .header(AUTHORIZATION, "Bearer client-own")
            .body(String::new())
            .unwrap();
        let res = service.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        assert_eq!(
            body_of(res).await,
            "count=1 value=Bearer client-own sensitive=false ext=-"
        );
    }

    #[test]
    fn accessors_reach_the_inner_service() {
        let mut service = FreshToken::new(7_u8, SharedToken::new());
        *service.get_mut() += 1;
        assert_eq!(*service.get_ref(), 8);
        assert_eq!(service.into_inner(), 8);
    }
}
