//! The HTTP client that carries requests upstream.

use std::time::Duration;

use reqwest::Url;

use crate::config;

/// The HTTP client used for upstream requests: pooled, HTTPS by rustls, gzip and deflate
/// decoded so the SSE rewriter sees plain text, no overall timeout (streams may be long).
pub fn upstream_client(upstream: &Url) -> reqwest::Client {
    install_crypto_provider();
    let mut builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
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
