//! `GET /models` and `GET /v1/models`: the workspace's READY chat endpoints in the OpenAI list
//! shape, from `GET {host}/api/2.0/serving-endpoints`, cached for a minute.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use fresh_token::{Token, TokenSource};
use http::StatusCode;
use reqwest::Url;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::time::Instant;

/// How long a fetched list is served before it is fetched again.
pub const MODELS_TTL: Duration = Duration::from_secs(60);

/// The workspace's chat models, fetched on demand and kept for [`MODELS_TTL`]. Clones share the
/// cache; concurrent callers with a stale cache share one fetch.
#[derive(Clone)]
pub struct ModelCatalog {
    list_url: Url,
    source: Arc<dyn TokenSource>,
    timeout: Duration,
    cache: Arc<Mutex<Option<Fetched>>>,
}

/// A list and when it was fetched.
type Fetched = (Instant, Arc<Value>);

impl std::fmt::Debug for ModelCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelCatalog")
            .field("list_url", &self.list_url.as_str())
            .finish_non_exhaustive()
    }
}

/// What `/models` is served from: the catalog and this runtime's upstream client.
#[derive(Clone, Debug)]
pub struct ModelsState {
    pub(crate) catalog: ModelCatalog,
    pub(crate) client: reqwest::Client,
}

/// Why the list could not be had.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ListError {
    NoToken,
    Unreachable,
    Refused(u16),
    Unreadable,
}

impl ModelCatalog {
    /// A catalog of `workspace`'s endpoints, fetched with tokens from `source`, waiting at most
    /// `timeout` for the workspace.
    pub fn new(workspace: &Url, source: Arc<dyn TokenSource>, timeout: Duration) -> Self {
        let list_url = Url::parse(&format!(
            "{}/api/2.0/serving-endpoints",
            workspace.as_str().trim_end_matches('/')
        ))
        .unwrap_or_else(|_| workspace.clone());
        Self {
            list_url,
            source,
            timeout,
            cache: Arc::default(),
        }
    }

    async fn models(&self, client: &reqwest::Client) -> Result<Arc<Value>, ListError> {
        let mut cache = self.cache.lock().await;
        if let Some((fetched, list)) = &*cache
            && fetched.elapsed() < MODELS_TTL
        {
            return Ok(Arc::clone(list));
        }
        let endpoints = self.fetch(client).await?;
        let list = Arc::new(openai_model_list(&endpoints));
        *cache = Some((Instant::now(), Arc::clone(&list)));
        Ok(list)
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Value, ListError> {
        let token = self.source.current().ok_or(ListError::NoToken)?;
        let mut res = self.get(client, &token).await?;
        if matches!(res.status().as_u16(), 401 | 403)
            && let Some(fresh) = self.source.refresh(&token).await
        {
            res = self.get(client, &fresh).await?;
        }
        if !res.status().is_success() {
            tracing::warn!(
                status = res.status().as_u16(),
                "the workspace refused to list serving endpoints"
            );
            return Err(ListError::Refused(res.status().as_u16()));
        }
        let read = tokio::time::timeout(self.timeout, res.bytes());
        match read.await {
            Ok(Ok(body)) => serde_json::from_slice(&body).map_err(|_| ListError::Unreadable),
            _ => Err(ListError::Unreadable),
        }
    }

    async fn get(
        &self,
        client: &reqwest::Client,
        token: &Token,
    ) -> Result<reqwest::Response, ListError> {
        let request = client
            .get(self.list_url.clone())
            .header(http::header::AUTHORIZATION, token.header_value().clone());
        match tokio::time::timeout(self.timeout, request.send()).await {
            Ok(Ok(res)) => Ok(res),
            _ => {
                tracing::warn!("the workspace could not be reached to list serving endpoints");
                Err(ListError::Unreachable)
            }
        }
    }
}

/// The OpenAI list (`{"object": "list", "data": [{"id", "object": "model", "created",
/// "owned_by"}]}`) of the endpoints that are READY and serve chat (`task` `llm/v1/chat`),
/// from a `GET /api/2.0/serving-endpoints` answer.
pub fn openai_model_list(endpoints: &Value) -> Value {
    let data: Vec<Value> = endpoints
        .get("endpoints")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|endpoint| {
            endpoint.pointer("/state/ready").and_then(Value::as_str) == Some("READY")
                && endpoint.get("task").and_then(Value::as_str) == Some("llm/v1/chat")
        })
        .filter_map(|endpoint| {
            let name = endpoint.get("name")?.as_str()?;
            let created = endpoint
                .get("creation_timestamp")
                .and_then(Value::as_i64)
                .map_or(0, |ms| ms / 1000);
            Some(json!({"id": name, "object": "model", "created": created, "owned_by": "databricks"}))
        })
        .collect();
    json!({"object": "list", "data": data})
}

/// `GET /models`, `GET /v1/models`.
pub(crate) async fn list(State(state): State<ModelsState>) -> Response {
    match state.catalog.models(&state.client).await {
        Ok(list) => Json(list.as_ref().clone()).into_response(),
        Err(err) => {
            let (status, kind, message) = match err {
                ListError::NoToken => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "token_unavailable",
                    "no valid token is available to list the workspace's models".to_owned(),
                ),
                ListError::Unreachable => (
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreachable",
                    "the workspace could not be reached to list its serving endpoints".to_owned(),
                ),
                ListError::Refused(code) => (
                    StatusCode::BAD_GATEWAY,
                    "upstream_refused",
                    format!("the workspace answered {code} to GET /api/2.0/serving-endpoints"),
                ),
                ListError::Unreadable => (
                    StatusCode::BAD_GATEWAY,
                    "upstream_unreadable",
                    "the workspace's list of serving endpoints could not be read".to_owned(),
                ),
            };
            (
                status,
                Json(json!({"error": {"type": kind, "message": message}})),
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ready_chat_endpoints_are_listed() {
        let endpoints = json!({"endpoints": [
            {"name": "chat-ready", "state": {"ready": "READY"}, "task": "llm/v1/chat",
             "creation_timestamp": 1_730_000_000_123_i64},
            {"name": "chat-not-ready", "state": {"ready": "NOT_READY"}, "task": "llm/v1/chat"},
            {"name": "embeddings", "state": {"ready": "READY"}, "task": "llm/v1/embeddings"},
            {"name": "completions", "state": {"ready": "READY"}, "task": "llm/v1/completions"},
            {"name": "custom-model", "state": {"ready": "READY"}},
            {"name": "no-state", "task": "llm/v1/chat"},
            {"state": {"ready": "READY"}, "task": "llm/v1/chat"},
            {"name": "chat-2", "state": {"ready": "READY", "config_update": "IN_PROGRESS"},
             "task": "llm/v1/chat"}
        ]});
        assert_eq!(
            openai_model_list(&endpoints),
            json!({"object": "list", "data": [
                {"id": "chat-ready", "object": "model", "created": 1_730_000_000, "owned_by": "databricks"},
                {"id": "chat-2", "object": "model", "created": 0, "owned_by": "databricks"}
            ]})
        );
        for empty in [json!({}), json!({"endpoints": null}), json!([])] {
            assert_eq!(
                openai_model_list(&empty),
                json!({"object": "list", "data": []})
            );
        }
    }
}
