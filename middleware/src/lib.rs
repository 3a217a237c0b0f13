//! Tower middleware that puts a fresh bearer token on every request.
//!
//! Long-lived clients keep the token they started with; short-lived tokens are rotated under
//! them. [`FreshTokenLayer`] closes that gap: on every request it asks a [`TokenSource`] for the
//! current token and sets `Authorization: Bearer <token>`, replacing whatever the client sent.
//!
//! Sources:
//!
//! * [`SharedToken`]: an in-memory cell that a rotator publishes into; lookups are an atomic load.
//! * [`ConfigFileToken`]: the `token` of one profile of a `~/.databrickscfg` file, re-read only
//!   when the file changes, keeping the last good token when the file is torn.
//! * [`StaticToken`], and [`FirstAvailable`] to try several in order.
//!
//! [`databrickscfg`] reads and atomically updates the config file shared with the Databricks CLI.
//!
//! # Features
//!
//! * `config-file` (default): [`ConfigFileToken`] and [`databrickscfg`], with their INI parser
//!   and atomic writes. Without it the crate is the layer and the in-memory sources only.
//!
//! # On a client stack
//!
//! The layer works on any `Service<http::Request<B>>`, such as hyper-util's pooled client:
//!
//! ```
//! use bytes::Bytes;
//! use fresh_token::{FreshTokenLayer, SharedToken, Token};
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower::{ServiceBuilder, ServiceExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let upstream = format!("http://{}", listener.local_addr()?);
//! # tokio::spawn(async move {
//! #     loop {
//! #         let (stream, _) = listener.accept().await.unwrap();
//! #         let echo = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
//! #             let auth = req.headers().get("authorization").map(|v| v.as_bytes().to_vec()).unwrap_or_default();
//! #             Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(auth))))
//! #         });
//! #         tokio::spawn(hyper::server::conn::http1::Builder::new()
//! #             .serve_connection(hyper_util::rt::TokioIo::new(stream), echo));
//! #     }
//! # });
//! let token = SharedToken::with_token(Token::new("dapi-current")?);
//! let client = ServiceBuilder::new()
//!     .layer(FreshTokenLayer::new(token.clone()))
//!     .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());
//!
//! let req = http::Request::get(&upstream).body(Full::default())?;
//! let res = client.clone().oneshot(req).await?;
//! // The upstream here echoes the Authorization header it received.
//! assert_eq!(res.into_body().collect().await?.to_bytes(), "Bearer dapi-current");
//!
//! token.publish(Token::new("dapi-rotated")?);
//! let req = http::Request::get(&upstream).body(Full::default())?;
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.into_body().collect().await?.to_bytes(), "Bearer dapi-rotated");
//! # Ok(())
//! # }
//! ```
//!
//! # Retrying after a rejection
//!
//! The token put on a request is also stored in its extensions. A service behind the layer that
//! sees the upstream answer 401 or 403 can pass that token to [`TokenSource::refresh`], which
//! resolves to a different token worth one retry, or to `None`.

#![warn(missing_docs)]

#[cfg(feature = "config-file")]
pub mod databrickscfg;
#[cfg(feature = "config-file")]
mod file;
mod layer;
#[cfg(feature = "config-file")]
pub mod small_file;
mod source;
mod token;

#[cfg(feature = "config-file")]
pub use file::ConfigFileToken;
pub use layer::{
    FreshToken, FreshTokenLayer, MISSING_TOKEN_BODY, OnMissingToken, ResponseBody, ResponseFuture,
};
pub use source::{FirstAvailable, RefreshFuture, SharedToken, StaticToken, TokenSource};
pub use token::{InvalidToken, Token};
