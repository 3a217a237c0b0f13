//! The Databricks API client: every call the proxy makes to Databricks itself (never the
//! forwarded traffic) goes through here.
//!
//! * [`token_api`]: the token API (`token/create`, `token/delete`, `token/list`) and SCIM `Me`;
//! * [`oidc`]: the OAuth endpoints: client credentials, discovery, token exchange;
//! * [`error`]: one [`ApiError`] that classifies every failure as transient,
//!   auth, permission or bad request, and [`describe`](error::describe), the one way to put a
//!   transport error in a log line without a secret;
//! * [`backoff`]: one [`Backoff`](backoff::Backoff) for every retry.

pub mod backoff;
pub mod cli;
pub mod error;
pub mod oidc;
pub mod token_api;

pub use error::{ApiError, ErrorKind};
