//! fresh-proxy: a local reverse proxy for Databricks model serving that keeps coding agents on a
//! fresh token.

pub mod filter;
pub mod rotator;
