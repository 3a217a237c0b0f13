//! The model APIs beyond one chat behaviour per endpoint, with the real shapes:
//!
//! - `GET /api/2.0/serving-endpoints`: the endpoint list (`name`, `state.ready`, `task`, ...);
//! - `POST /serving-endpoints/chat/completions` for models named after a family
//!   (`*claude*`, `*gemini*`, `*gpt*`): an OpenAI chat completion whose stream carries a usage
//!   chunk only when `stream_options.include_usage` asks for it, as OpenAI-compatible servers
//!   do; each family refuses (400) the fields it does not know: Gemini `stream_options` and
//!   `verbosity`, Claude `reasoning_effort`, `verbosity` and replayed `reasoning_content`;
//! - `POST /serving-endpoints/anthropic/v1/messages`: Anthropic Messages, JSON or the
//!   `message_start` ... `message_stop` event stream; a request carrying `x-api-key` is refused;
//! - `POST /serving-endpoints/responses`: OpenAI Responses, JSON or the `response.created` ...
//!   `response.completed` event stream, with `sequence_number`s and no `[DONE]`;
//! - `POST /serving-endpoints/gemini/v1beta/models/{model}:generateContent` and
//!   `:streamGenerateContent?alt=sse`: Gemini's native API, refusing an `id` in a
//!   `functionCall` or `functionResponse` part as the Vertex-served schema does;
//! - `POST /api/2.0/mcp/{*rest}`: a managed MCP server speaking JSON-RPC (`initialize`,
//!   `tools/list`, `tools/call`).
//!
//! All of them want a live bearer, as every serving call does, and are recorded.

use super::*;

/// Input tokens every fake model answer reports.
pub const USAGE_INPUT_TOKENS: u64 = 25;
/// Output tokens every fake model answer reports.
pub const USAGE_OUTPUT_TOKENS: u64 = 9;
/// Cached input tokens every fake model answer reports (part of the input).
pub const USAGE_CACHED_TOKENS: u64 = 10;

/// The endpoint list served until [`FakeWorkspace::set_serving_endpoints`] replaces it: three
/// READY chat endpoints, a READY embeddings endpoint, a chat endpoint still NOT_READY, and a
/// READY custom model without a task.
pub fn default_serving_endpoints() -> Vec<Value> {
    let endpoint = |name: &str, ready: &str, task: Option<&str>| {
        let mut endpoint = json!({
            "name": name,
            "id": random_hex(16),
            "creator": USER_NAME,
            "creation_timestamp": 1_730_000_000_000_i64,
            "last_updated_timestamp": 1_730_000_500_000_i64,
            "state": {
                "ready": ready,
                "config_update": if ready == "READY" { "NOT_UPDATING" } else { "IN_PROGRESS" },
            },
            "config": {"served_entities": [{"name": name, "entity_name": format!("system.ai.{name}")}]},
            "tags": [],
            "permission_level": "CAN_QUERY",
            "route_optimized": false,
        });
        if let Some(task) = task {
            endpoint["task"] = json!(task);
            endpoint["endpoint_type"] = json!("FOUNDATION_MODEL_API");
        }
        endpoint
    };
    vec![
        endpoint("databricks-claude-sonnet-4-5", "READY", Some("llm/v1/chat")),
        endpoint("databricks-gemini-2-5-pro", "READY", Some("llm/v1/chat")),
        endpoint("databricks-gpt-5", "READY", Some("llm/v1/chat")),
        endpoint(
            "databricks-gte-large-en",
            "READY",
            Some("llm/v1/embeddings"),
        ),
        endpoint("team-agent", "NOT_READY", Some("llm/v1/chat")),
        endpoint("churn-model", "READY", None),
    ]
}

/// Ids and times derived from the request body: the same request gets the same answer, byte for
/// byte, so a test can compare what came through the proxy with what the workspace sends.
fn stable(body: &[u8], prefix: &str) -> (String, i64) {
    let digest = sha256_hex(body);
    let created = 1_730_000_000 + i64::from_str_radix(&digest[..5], 16).unwrap_or(0);
    (format!("{prefix}{}", &digest[..24]), created)
}

/// State of the model APIs.
pub(super) struct ModelState {
    endpoints: Vec<Value>,
    list_faults: FaultQueue,
    lists: u64,
}

impl Default for ModelState {
    fn default() -> Self {
        ModelState {
            endpoints: default_serving_endpoints(),
            list_faults: FaultQueue::default(),
            lists: 0,
        }
    }
}

impl FakeWorkspace {
    /// Replaces the list `GET /api/2.0/serving-endpoints` answers with.
    pub fn set_serving_endpoints(&self, endpoints: Vec<Value>) {
        self.inner.lock().models.endpoints = endpoints;
    }

    /// The next `n` endpoint lists fail with `status`.
    pub fn fail_next_endpoint_lists(&self, n: u32, status: u16) {
        self.inner.lock().models.list_faults.push(n, status, None);
    }

    /// Endpoint lists answered 200.
    pub fn endpoint_lists(&self) -> u64 {
        self.inner.lock().models.lists
    }
}

pub(super) async fn list_endpoints(
    State(inner): State<Arc<Inner>>,
    headers: HeaderMap,
) -> Response {
    let mut state = inner.lock();
    if let Err(refusal) = state.authenticate(&headers, now_ms()) {
        return refusal;
    }
    if let Some(fault) = state.models.list_faults.next() {
        return fault.api_response();
    }
    state.models.lists += 1;
    Json(json!({"endpoints": state.models.endpoints})).into_response()
}

/// Authenticates and records the call as every serving call is.
fn admit(
    inner: &Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(), Response> {
    inner
        .lock()
        .admit_serving(method, uri, headers, body.clone())
        .map(|_| ())
}

fn invalid(message: &str) -> Response {
    api_error(StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE", message)
}

/// The families the chat route knows by model name, and what each refuses.
fn family_refusal(model: &str, request: &Map<String, Value>) -> Option<String> {
    let model = model.to_ascii_lowercase();
    let refuses: &[&str] = if model.contains("gemini") {
        &["stream_options", "verbosity"]
    } else if model.contains("claude") {
        &["reasoning_effort", "verbosity"]
    } else {
        &[]
    };
    if let Some(field) = refuses.iter().find(|field| request.contains_key(**field)) {
        return Some(format!(
            "Unsupported parameter: {field} is not supported by {model}"
        ));
    }
    let replayed = request
        .get("messages")
        .and_then(Value::as_array)
        .is_some_and(|messages| {
            messages
                .iter()
                .any(|m| m.get("reasoning_content").is_some())
        });
    (model.contains("claude") && replayed)
        .then(|| "Unsupported parameter: messages[].reasoning_content".to_owned())
}

fn is_family(model: &str) -> bool {
    let model = model.to_ascii_lowercase();
    ["claude", "gemini", "gpt"]
        .iter()
        .any(|family| model.contains(family))
}

pub(super) async fn chat_completions(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let model = model_of(&body).unwrap_or_default();
    if method != Method::POST || !is_family(&model) {
        return serving(State(inner), method, uri, headers, body).await;
    }
    if let Err(refusal) = admit(&inner, &method, &uri, &headers, &body) {
        return refusal;
    }
    let request = match json_object(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal,
    };
    if let Some(why) = family_refusal(&model, &request) {
        return invalid(&why);
    }
    let id = format!("chatcmpl_{}", random_hex(12));
    let created = now_ms() / 1000;
    let usage = json!({
        "prompt_tokens": USAGE_INPUT_TOKENS,
        "completion_tokens": USAGE_OUTPUT_TOKENS,
        "total_tokens": USAGE_INPUT_TOKENS + USAGE_OUTPUT_TOKENS,
        "prompt_tokens_details": {"cached_tokens": USAGE_CACHED_TOKENS},
    });
    if request.get("stream") != Some(&Value::Bool(true)) {
        return Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": CHAT_REPLY},
                         "finish_reason": "stop"}],
            "usage": usage,
        }))
        .into_response();
    }
    let chunk = |choices: Value| {
        Bytes::from(format!(
            "data: {}\n\n",
            json!({"id": id, "object": "chat.completion.chunk", "created": created,
                   "model": model, "choices": choices})
        ))
    };
    let mut events: Vec<Bytes> = CHAT_REPLY_PIECES
        .iter()
        .map(|piece| {
            chunk(json!([{"index": 0, "delta": {"content": piece}, "finish_reason": null}]))
        })
        .collect();
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": "stop"}]),
    ));
    let include_usage = request
        .get("stream_options")
        .and_then(|options| options.get("include_usage"))
        == Some(&Value::Bool(true));
    if include_usage {
        // OpenAI's usage chunk: no choices, the usage of the whole answer.
        let mut last = json!({"id": id, "object": "chat.completion.chunk", "created": created,
                              "model": model, "choices": []});
        last["usage"] = usage;
        events.push(Bytes::from(format!("data: {last}\n\n")));
    }
    sse_response(events, Duration::ZERO, None)
}

/// `event: {type}\ndata: {json}\n\n`, as Anthropic and the Responses API frame events.
fn named_event(data: &Value) -> Bytes {
    let kind = data["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// A finite event stream with no `[DONE]` (neither Anthropic nor Responses send one).
fn event_stream(events: Vec<Bytes>) -> Response {
    let frames = futures_util::stream::iter(events.into_iter().map(Ok::<_, Infallible>));
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(frames),
    )
        .into_response()
}

pub(super) async fn anthropic(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = admit(&inner, &method, &uri, &headers, &body) {
        return refusal;
    }
    if uri.path() != "/serving-endpoints/anthropic/v1/messages" || method != Method::POST {
        return no_such_api(method, uri).await;
    }
    if headers.contains_key("x-api-key") {
        // The route authenticates by bearer only; a second credential is refused.
        return api_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "x-api-key is not accepted; authenticate with Authorization: Bearer",
        );
    }
    let request = match json_object(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal,
    };
    let Some(model) = request.get("model").and_then(Value::as_str) else {
        return invalid("model: field required");
    };
    if !request.contains_key("max_tokens") || !request.contains_key("messages") {
        return invalid("max_tokens and messages are required");
    }
    let (id, _) = stable(&body, "msg_");
    let usage = json!({
        "input_tokens": USAGE_INPUT_TOKENS - USAGE_CACHED_TOKENS,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": USAGE_CACHED_TOKENS,
        "output_tokens": USAGE_OUTPUT_TOKENS,
    });
    if request.get("stream") != Some(&Value::Bool(true)) {
        return Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": CHAT_REPLY}],
            "stop_reason": "end_turn", "stop_sequence": null, "usage": usage,
        }))
        .into_response();
    }
    let mut start_usage = usage;
    start_usage["output_tokens"] = json!(1);
    let mut events = vec![
        named_event(&json!({"type": "message_start", "message": {
            "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": start_usage}})),
        named_event(&json!({"type": "content_block_start", "index": 0,
                            "content_block": {"type": "text", "text": ""}})),
        named_event(&json!({"type": "ping"})),
    ];
    events.extend(CHAT_REPLY_PIECES.iter().map(|piece| {
        named_event(&json!({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": piece}}))
    }));
    events.push(named_event(
        &json!({"type": "content_block_stop", "index": 0}),
    ));
    events.push(named_event(&json!({"type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": null},
        "usage": {"output_tokens": USAGE_OUTPUT_TOKENS}})));
    events.push(named_event(&json!({"type": "message_stop"})));
    event_stream(events)
}

pub(super) async fn responses(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = admit(&inner, &method, &uri, &headers, &body) {
        return refusal;
    }
    if method != Method::POST {
        return no_such_api(method, uri).await;
    }
    let request = match json_object(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal,
    };
    let (Some(model), Some(_)) = (
        request.get("model").and_then(Value::as_str),
        request.get("input"),
    ) else {
        return invalid("model and input are required");
    };
    let (id, created) = stable(&body, "resp_");
    let (item_id, _) = stable(id.as_bytes(), "msg_");
    let usage = json!({
        "input_tokens": USAGE_INPUT_TOKENS,
        "input_tokens_details": {"cached_tokens": USAGE_CACHED_TOKENS},
        "output_tokens": USAGE_OUTPUT_TOKENS,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": USAGE_INPUT_TOKENS + USAGE_OUTPUT_TOKENS,
    });
    let text = json!({"type": "output_text", "text": CHAT_REPLY, "annotations": []});
    let item = json!({"id": item_id, "type": "message", "status": "completed", "role": "assistant",
                      "content": [text]});
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": created, "status": status,
               "model": model, "output": output, "usage": usage})
    };
    if request.get("stream") != Some(&Value::Bool(true)) {
        return Json(response("completed", json!([item]), usage)).into_response();
    }
    let mut sequence = 0;
    let mut event = |mut data: Value| {
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        named_event(&data)
    };
    let mut events = vec![
        event(
            json!({"type": "response.created", "response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            json!({"type": "response.in_progress", "response": response("in_progress", json!([]), Value::Null)}),
        ),
        event(
            json!({"type": "response.output_item.added", "output_index": 0,
                     "item": {"id": item_id, "type": "message", "status": "in_progress",
                              "role": "assistant", "content": []}}),
        ),
        event(
            json!({"type": "response.content_part.added", "item_id": item_id, "output_index": 0,
                     "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": []}}),
        ),
    ];
    for piece in CHAT_REPLY_PIECES {
        events.push(event(
            json!({"type": "response.output_text.delta", "item_id": item_id,
                                 "output_index": 0, "content_index": 0, "delta": piece}),
        ));
    }
    events.push(event(
        json!({"type": "response.output_text.done", "item_id": item_id,
                             "output_index": 0, "content_index": 0, "text": CHAT_REPLY}),
    ));
    events.push(event(
        json!({"type": "response.content_part.done", "item_id": item_id,
                             "output_index": 0, "content_index": 0, "part": text}),
    ));
    events.push(event(
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    ));
    events.push(event(json!({"type": "response.completed",
                             "response": response("completed", json!([item]), usage)})));
    event_stream(events)
}

pub(super) async fn gemini(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = admit(&inner, &method, &uri, &headers, &body) {
        return refusal;
    }
    let Some(call) = uri
        .path()
        .strip_prefix("/serving-endpoints/gemini/v1beta/models/")
    else {
        return no_such_api(method, uri).await;
    };
    let (model, action) = call.split_once(':').unwrap_or((call, ""));
    let stream = match action {
        "generateContent" => false,
        "streamGenerateContent" => true,
        _ => return no_such_api(method, uri).await,
    };
    let request = match json_object(&body) {
        Ok(request) => request,
        Err(refusal) => return refusal,
    };
    let Some(contents) = request.get("contents").and_then(Value::as_array) else {
        return gemini_error("Invalid JSON payload received. contents is required.");
    };
    for (i, content) in contents.iter().enumerate() {
        let parts = content
            .get("parts")
            .and_then(Value::as_array)
            .into_iter()
            .flatten();
        for (j, part) in parts.enumerate() {
            for (key, field) in [
                ("functionCall", "function_call"),
                ("functionResponse", "function_response"),
            ] {
                if part.get(key).and_then(|inner| inner.get("id")).is_some() {
                    return gemini_error(&format!(
                        "Invalid JSON payload received. Unknown name \"id\" at 'contents[{i}].parts[{j}].{field}': Cannot find field."
                    ));
                }
            }
        }
    }
    let chunk = |text: &str, done: bool, output: u64| {
        let mut candidate =
            json!({"content": {"role": "model", "parts": [{"text": text}]}, "index": 0});
        if done {
            candidate["finishReason"] = json!("STOP");
        }
        json!({"candidates": [candidate], "modelVersion": model, "usageMetadata": {
            "promptTokenCount": USAGE_INPUT_TOKENS,
            "cachedContentTokenCount": USAGE_CACHED_TOKENS,
            "candidatesTokenCount": output,
            "totalTokenCount": USAGE_INPUT_TOKENS + output}})
    };
    if !stream {
        return Json(chunk(CHAT_REPLY, true, USAGE_OUTPUT_TOKENS)).into_response();
    }
    let last = CHAT_REPLY_PIECES.len() - 1;
    let events = CHAT_REPLY_PIECES
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let output = if i == last {
                USAGE_OUTPUT_TOKENS
            } else {
                i as u64 + 1
            };
            Bytes::from(format!("data: {}\r\n\r\n", chunk(piece, i == last, output)))
        })
        .collect();
    event_stream(events)
}

fn gemini_error(message: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": {"code": 400, "message": message, "status": "INVALID_ARGUMENT"}})),
    )
        .into_response()
}

/// Tools every fake MCP server offers.
pub const MCP_TOOLS: [&str; 2] = ["main__default__lookup", "main__default__summarize"];

pub(super) async fn mcp(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(refusal) = admit(&inner, &method, &uri, &headers, &body) {
        return refusal;
    }
    if method != Method::POST {
        return StatusCode::METHOD_NOT_ALLOWED.into_response();
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return Json(json!({"jsonrpc": "2.0", "id": null,
                           "error": {"code": -32700, "message": "Parse error"}}))
        .into_response();
    };
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let server = uri.path().trim_start_matches("/api/2.0/mcp/");
    let result = match request.get("method").and_then(Value::as_str) {
        Some("initialize") => json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {"tools": {"listChanged": false}},
            "serverInfo": {"name": format!("databricks-mcp/{server}"), "version": "1.0.0"},
        }),
        Some("tools/list") => json!({"tools": MCP_TOOLS.iter().map(|name| json!({
            "name": name, "description": "A Unity Catalog function",
            "inputSchema": {"type": "object", "properties": {}}})).collect::<Vec<_>>()}),
        Some("tools/call") => {
            json!({"content": [{"type": "text", "text": format!("called on {server}")}],
                                     "isError": false})
        }
        _ => {
            return Json(json!({"jsonrpc": "2.0", "id": id,
                               "error": {"code": -32601, "message": "Method not found"}}))
            .into_response();
        }
    };
    Json(json!({"jsonrpc": "2.0", "id": id, "result": result})).into_response()
}
