//! `FreshTokenLayer` inside someone else's axum app: a handler that calls a model endpoint
//! through a client stacked with the layer.
//!
//! The app (a tiny "summarise this" service) keeps one client in its state. The token lives
//! in a [`SharedToken`] that the app's own token code publishes into (here: the demo itself,
//! standing in for a rotator or an OAuth refresh). Every outgoing call carries the token
//! published last; while there is none, the layer answers 503 without calling the model, and
//! the handler passes that on.
//!
//! The example runs offline against a fake model endpoint on 127.0.0.1 and stops by itself:
//!
//! ```sh
//! cargo run --example axum_app
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use fresh_token::{FreshToken, FreshTokenLayer, SharedToken, Token};
use http::Request;
use http::header::{AUTHORIZATION, CONTENT_TYPE};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::{ServiceBuilder, ServiceExt};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The outgoing client of the app: hyper-util's pooled client behind the layer.
type ModelClient = FreshToken<Client<HttpConnector, Full<Bytes>>, SharedToken>;

/// The app's state: its model client and where the model lives.
#[derive(Clone, Debug)]
struct SummaryApp {
    model: ModelClient,
    endpoint: String,
}

/// `POST /summarize`: ask the model, answer with its text.
async fn summarize(
    State(app): State<SummaryApp>,
    text: String,
) -> Result<String, (StatusCode, String)> {
    let body = json!({
        "messages": [{ "role": "user", "content": format!("Summarise: {text}") }],
        "max_tokens": 64,
    });
    let request = Request::post(&app.endpoint)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::from(body.to_string()))
        .map_err(|err| (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    let response = app
        .model
        .oneshot(request)
        .await
        .map_err(|err| (StatusCode::BAD_GATEWAY, err.to_string()))?;
    let status = response.status();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|err| (StatusCode::BAD_GATEWAY, err.to_string()))?
        .to_bytes();
    if !status.is_success() {
        // 503 from the layer when no token is published yet, or the model's own error.
        return Err((status, String::from_utf8_lossy(&bytes).into_owned()));
    }
    let answer: Value = serde_json::from_slice(&bytes)
        .map_err(|err| (StatusCode::BAD_GATEWAY, format!("model answer: {err}")))?;
    Ok(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

/// The app's router. The layer sits on the outgoing client, not on the routes: incoming
/// requests are the app's business.
fn summary_app(token: SharedToken, model_base: &str) -> Router {
    let model = ServiceBuilder::new()
        .layer(FreshTokenLayer::new(token))
        .service(Client::builder(TokioExecutor::new()).build_http());
    let state = SummaryApp {
        model,
        endpoint: format!("{model_base}/serving-endpoints/demo-model/invocations"),
    };
    Router::new()
        .route("/summarize", post(summarize))
        .with_state(state)
}

/// What the demo saw.
#[derive(Debug)]
struct Outcome {
    /// Status and body of each `POST /summarize`.
    answers: Vec<(u16, String)>,
    /// Calls that reached the model endpoint.
    model_calls: usize,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Error> {
    let outcome = run().await?;
    for (status, body) in &outcome.answers {
        println!("POST /summarize -> {status}: {body}");
    }
    println!("calls that reached the model: {}", outcome.model_calls);
    Ok(())
}

async fn run() -> Result<Outcome, Error> {
    let model_calls = Arc::new(AtomicUsize::new(0));
    let (model_base, model_server) = fake_model_endpoint(model_calls.clone()).await?;

    let token = SharedToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let app_url = format!("http://{}/summarize", listener.local_addr()?);
    let stop = CancellationToken::new();
    let app_server = tokio::spawn(
        axum::serve(listener, summary_app(token.clone(), &model_base))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );

    let caller = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let mut answers = Vec::new();
    // No token yet, then a first token, then a rotated one.
    for publish in [
        None,
        Some("dapi-example-first"),
        Some("dapi-example-rotated"),
    ] {
        if let Some(value) = publish {
            token.publish(Token::new(value)?);
        }
        let request = Request::post(&app_url).body(Full::from("a long design document"))?;
        let response = caller.request(request).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        answers.push((status, String::from_utf8(body.to_vec())?));
    }

    stop.cancel();
    app_server.await??;
    model_server.abort();
    Ok(Outcome {
        answers,
        model_calls: model_calls.load(Ordering::SeqCst),
    })
}

/// A chat model on 127.0.0.1 whose answer names the token it was called with.
async fn fake_model_endpoint(
    calls: Arc<AtomicUsize>,
) -> Result<(String, tokio::task::JoinHandle<()>), Error> {
    let invocations = move |headers: HeaderMap| async move {
        calls.fetch_add(1, Ordering::SeqCst);
        let auth = headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)");
        Json(json!({
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": format!("short summary (called with {auth})") },
                "finish_reason": "stop",
            }],
        }))
    };
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
        let outcome = super::run().await.expect("the example runs");
        let statuses: Vec<u16> = outcome.answers.iter().map(|(s, _)| *s).collect();
        assert_eq!(statuses, [503, 200, 200]);
        let bodies: Vec<&str> = outcome.answers.iter().map(|(_, b)| b.as_str()).collect();
        assert!(bodies[0].contains("token_unavailable"), "{}", bodies[0]);
        assert!(bodies[1].ends_with("(called with Bearer dapi-example-first)"));
        assert!(bodies[2].ends_with("(called with Bearer dapi-example-rotated)"));
        // The first call was answered by the layer: the model never saw it.
        assert_eq!(outcome.model_calls, 2);
    }
}
