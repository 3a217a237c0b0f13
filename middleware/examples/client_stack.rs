//! `FreshTokenLayer` on a plain hyper-util client, with the token read from a Databricks config
//! file.
//!
//! Whoever rotates the token (fresh-proxy, the Databricks CLI, a person) rewrites the config
//! file; every request this client sends carries the token the file holds at that moment,
//! whatever `Authorization` the calling code set.
//!
//! The example runs offline: it starts a fake model endpoint on 127.0.0.1 that reports the token
//! it received, writes a config file in a temporary directory, and rotates the token in it
//! between two requests.
//!
//! ```sh
//! cargo run --example client_stack
//! ```

use std::time::Duration;

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use fresh_token::databrickscfg;
use fresh_token::{ConfigFileToken, FreshTokenLayer};
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tower::{ServiceBuilder, ServiceExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the fake endpoint saw on each request.
#[derive(Debug)]
struct Seen {
    /// `Authorization` of each request, in order.
    authorizations: Vec<String>,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let seen = run().await?;
    for (i, auth) in seen.authorizations.iter().enumerate() {
        // Only fake tokens here; never print a real one.
        println!("request {}: upstream saw `{auth}`", i + 1);
    }
    Ok(())
}

async fn run() -> Result<Seen, Error> {
    let (upstream, server) = fake_model_endpoint().await?;

    // A config file as the Databricks CLI writes it; the token comes later.
    let dir = tempfile::tempdir()?;
    let config_file = dir.path().join(".databrickscfg");
    databrickscfg::update_profile(&config_file, "DEFAULT", &[("host", &upstream)])?;

    // The stack: the layer in front of hyper-util's pooled client. `stat_interval(ZERO)` makes
    // every lookup check the file, so this demo needs no pauses; the default (one `stat` shared
    // by lookups within 1 ms) is what to use for real traffic.
    let source = ConfigFileToken::new(&config_file, "DEFAULT").stat_interval(Duration::ZERO);
    let client = ServiceBuilder::new()
        .layer(FreshTokenLayer::new(source))
        .service(Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>());

    let mut authorizations = Vec::new();
    for token in ["dapi-example-first", "dapi-example-rotated"] {
        // A rotation: the file is replaced atomically, as fresh-proxy and the CLI do.
        databrickscfg::update_profile(&config_file, "DEFAULT", &[("token", token)])?;

        let request = Request::post(format!("{upstream}/serving-endpoints/demo/invocations"))
            .header(CONTENT_TYPE, "application/json")
            // Whatever the caller sets is replaced by the current token.
            .header(AUTHORIZATION, "Bearer stale-token-of-the-caller")
            .body(Full::from(
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
            ))?;
        let response = client.clone().oneshot(request).await?;
        if response.status() != StatusCode::OK {
            return Err(format!("upstream answered {}", response.status()).into());
        }
        let body = response.into_body().collect().await?.to_bytes();
        authorizations.push(String::from_utf8(body.to_vec())?);
    }

    server.abort();
    Ok(Seen { authorizations })
}

/// A model endpoint on 127.0.0.1 that answers with the `Authorization` header it received.
async fn fake_model_endpoint() -> Result<(String, tokio::task::JoinHandle<()>), Error> {
    async fn invocations(headers: HeaderMap) -> String {
        headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)")
            .to_owned()
    }
    let router = Router::new().route("/serving-endpoints/{name}/invocations", post(invocations));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    Ok((url, server))
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn runs() {
        let seen = super::run().await.expect("the example runs");
        assert_eq!(
            seen.authorizations,
            ["Bearer dapi-example-first", "Bearer dapi-example-rotated"]
        );
    }
}
