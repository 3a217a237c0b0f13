//! Running the proxy's app on a real socket for tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::ServiceExt;
use fresh_proxy::token::status::SourceKind;
use fresh_proxy::{AppState, ProxySettings, app};
use fresh_token::TokenSource;
use reqwest::Url;
use tokio::task::JoinHandle;

/// The app, served on `127.0.0.1:0` until dropped.
pub struct RunningProxy {
    pub addr: SocketAddr,
    pub state: AppState,
    server: JoinHandle<()>,
}

impl RunningProxy {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        self.server.abort();
    }
}

/// Settings pointing at `upstream_base`, with a short header timeout so tests stay quick.
pub fn settings(upstream_base: &str) -> ProxySettings {
    let mut settings = ProxySettings::new(Url::parse(upstream_base).expect("upstream URL"));
    settings.upstream_timeout = Duration::from_secs(10);
    settings
}

/// Serve `app(state)` on a fresh loopback port.
pub async fn serve(state: AppState) -> RunningProxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let app = app(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app.into_make_service())
            .await
            .expect("serve");
    });
    RunningProxy {
        addr,
        state,
        server,
    }
}

/// Serve a proxy to `settings` that takes tokens from `source`.
pub async fn serve_with(settings: ProxySettings, source: Arc<dyn TokenSource>) -> RunningProxy {
    serve(AppState::new(settings, source, SourceKind::Rotator)).await
}
