//! fresh-proxy: a local reverse proxy for Databricks model serving that keeps coding agents on a
//! fresh token.
//!
//! [`app`] builds the whole HTTP surface as an axum [`Router`](axum::Router), so tests and examples run exactly
//! what the binary runs:
//!
//! * every method and path but the three below is forwarded to the upstream base, with the
//!   current token injected by [`fresh_token::FreshTokenLayer`], the request sanitised and the
//!   answer fixed by the [`fresh_filter`] crate;
//! * `GET /health`, `GET /ready` and `GET /metrics` answer locally.
//!
//! One module per concern: [`config`] (settings and their validation), [`proxy`] (forwarding),
//! [`token`] (the machinery that keeps the token alive: rotation, OAuth, the followed file),
//! [`databricks`] (the client for Databricks' own APIs),
//! [`health`] (`/health`, `/ready`, `/metrics`) and [`server`] (connections and workers).

mod app;
pub mod config;
pub mod databricks;
pub mod health;
pub mod proxy;
pub mod server;
pub mod token;

pub use app::{AppState, ProxySettings, app};
pub use proxy::{ForwardingClient, ForwardingOptions, install_crypto_provider, upstream_client};
pub use server::{LISTEN_BACKLOG, listen};
