//! The proxy assembled by hand from the library, to show the pieces the binary puts together.
//!
//! * a token source ([`SharedToken`]; the binary uses the rotator's, which publishes into one),
//! * [`AppState`]: forwarding settings, the source, an upstream client, status and metrics,
//! * [`app`]: the proxy as one tower service (forwarding with token injection and the content
//!   filter, plus `/health`, `/ready` and `/metrics`),
//! * `axum::serve` (through `into_make_service`) with graceful shutdown.
//!
//! The example runs offline against a fake workspace on 127.0.0.1, sends a few requests through
//! the proxy, and stops by itself:
//!
//! ```sh
//! cargo run --example proxy_by_hand
//! ```

use std::sync::Arc;

use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router, ServiceExt};
use fresh_proxy::token::status::SourceKind;
use fresh_proxy::{AppState, ProxySettings, app};
use fresh_token::{SharedToken, Token};
use http::header::AUTHORIZATION;
use reqwest::Url;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the demo saw through the proxy.
#[derive(Debug)]
struct Outcome {
    /// The echo of each chat request, as the fake upstream received it.
    echoes: Vec<Value>,
    /// `GET /health`.
    health: Value,
    /// Status of `GET /ready` before and after a token was published.
    ready: [u16; 2],
    /// `GET /metrics`.
    metrics: String,
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let outcome = run().await?;
    for echo in &outcome.echoes {
        println!("upstream received: {echo}");
    }
    println!(
        "GET /ready before and after publishing: {:?}",
        outcome.ready
    );
    println!("GET /health: {}", outcome.health);
    for line in outcome
        .metrics
        .lines()
        .filter(|l| l.contains("requests_total"))
    {
        println!("{line}");
    }
    Ok(())
}

async fn run() -> Result<Outcome, Error> {
    let (workspace, workspace_server) = fake_workspace().await?;

    // 1. The token source. Nothing is published yet: /ready says 503, requests get 503.
    let token = SharedToken::new();

    // 2. The state: the upstream base (the binary derives it from DATABRICKS_HOST), limits, the
    //    source, and a fresh upstream client, status and metrics.
    let settings = ProxySettings::new(Url::parse(&format!("{workspace}/serving-endpoints"))?);
    let state = AppState::new(settings, Arc::new(token.clone()), SourceKind::Env);

    // 3. The router, served on a loopback port until `stop` fires.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = tokio::spawn(
        axum::serve(listener, app(state).into_make_service())
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );

    // An agent's view: an OpenAI-style client pointed at the proxy.
    fresh_proxy::install_crypto_provider();
    let agent = reqwest::Client::builder().no_proxy().build()?;
    let ready_before = agent.get(format!("{proxy}/ready")).send().await?.status();

    let mut echoes = Vec::new();
    for value in ["dapi-example-first", "dapi-example-rotated"] {
        // A rotator publishes; the next request carries the new token.
        token.publish(Token::new(value)?);
        let chat = json!({
            "model": "demo-model",
            "messages": [
                { "role": "system", "content": "" },
                { "role": "user", "content": "Hello" },
            ],
            "stream_options": { "include_usage": true },
        });
        let response = agent
            .post(format!("{proxy}/chat/completions"))
            // The agent's own key never reaches the upstream.
            .bearer_auth("sk-placeholder-of-the-agent")
            .header("content-type", "application/json")
            .body(chat.to_string())
            .send()
            .await?;
        echoes.push(serde_json::from_slice(&response.bytes().await?)?);
    }

    let ready_after = agent.get(format!("{proxy}/ready")).send().await?.status();
    let health = serde_json::from_slice(
        &agent
            .get(format!("{proxy}/health"))
            .send()
            .await?
            .bytes()
            .await?,
    )?;
    let metrics = agent
        .get(format!("{proxy}/metrics"))
        .send()
        .await?
        .text()
        .await?;

    stop.cancel();
    server.await??;
    workspace_server.abort();
    Ok(Outcome {
        echoes,
        health,
        ready: [ready_before.as_u16(), ready_after.as_u16()],
        metrics,
    })
}

/// A model-serving endpoint on 127.0.0.1 that echoes what arrived: the token and the body.
async fn fake_workspace() -> Result<(String, tokio::task::JoinHandle<()>), Error> {
    async fn chat(headers: HeaderMap, Json(body): Json<Value>) -> Json<Value> {
        let token = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("(none)");
        Json(json!({ "token": token, "body": body }))
    }
    let router = Router::new().route("/serving-endpoints/chat/completions", post(chat));
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
        let outcome = super::run().await.expect("the example runs");
        let tokens: Vec<&str> = outcome
            .echoes
            .iter()
            .map(|e| e["token"].as_str().unwrap())
            .collect();
        assert_eq!(tokens, ["dapi-example-first", "dapi-example-rotated"]);
        for echo in &outcome.echoes {
            // The content filter ran: the empty system message is gone. `stream_options` stays:
            // the model rules remove it only for models that refuse it.
            let messages = echo["body"]["messages"].as_array().unwrap();
            assert_eq!(messages.len(), 1, "{echo}");
            assert_eq!(messages[0]["content"], "Hello");
            assert_eq!(
                echo["body"]["stream_options"]["include_usage"], true,
                "{echo}"
            );
        }
        assert_eq!(outcome.ready, [503, 200]);
        assert_eq!(outcome.health["status"], "ok");
        assert_eq!(outcome.health["token"]["source"], "env");
        assert!(
            outcome
                .metrics
                .lines()
                .any(|l| l == "fresh_proxy_requests_total{class=\"2xx\"} 2"),
            "{}",
            outcome.metrics
        );
    }
}
