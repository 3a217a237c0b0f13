//! Sanitising chat requests before they go upstream.

use serde_json::{Map, Value};

use super::report::{FilterAction, FilterReport};
use super::response::ToolContext;
use super::schema::strip_schema;

/// A generous bound on passes: one pass settles every cascade the rules know of, and the next
/// confirms nothing is left to change.
const MAX_PASSES: usize = 8;

/// The result of [`sanitize_request_bytes`].
#[derive(Clone, Debug, Default)]
pub struct RequestOutcome {
    /// The re-serialised request, only when the filter changed something. `None` means: forward
    /// the original bytes untouched.
    pub body: Option<Vec<u8>>,
    /// What was changed.
    pub report: FilterReport,
    /// The tools the request declared, for fixing its response.
    pub tools: ToolContext,
}

/// Sanitises a parsed chat request in place, to a fixed point, and reports what changed.
///
/// Handles the OpenAI (`messages[].content` as a string or parts, `tool_calls`, `tool` messages)
/// and Anthropic (`text`/`tool_use`/`tool_result`/`thinking` blocks, `system` blocks) shapes.
/// Anything that is not a JSON object is left alone.
pub fn sanitize_request(value: &mut Value) -> FilterReport {
    let mut report = FilterReport::default();
    if let Some(request) = value.as_object_mut() {
        for _ in 0..MAX_PASSES {
            if !sanitize_pass(request, &mut report) {
                break;
            }
        }
    }
    report
}

/// [`sanitize_request`] on a raw body. Bodies that are not a JSON object come back with no body
/// and an empty report; a request the filter did not change is not re-serialised.
pub fn sanitize_request_bytes(body: &[u8]) -> RequestOutcome {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return RequestOutcome::default();
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return RequestOutcome::default();
    };
    let report = sanitize_request(&mut value);
    let tools = ToolContext::from_request(&value);
    if report.is_empty() {
        return RequestOutcome {
            body: None,
            report,
            tools,
        };
    }
    match serde_json::to_vec(&value) {
        Ok(body) => RequestOutcome {
            body: Some(body),
            report,
            tools,
        },
        Err(_) => RequestOutcome {
            body: None,
            report: FilterReport::default(),
            tools,
        },
    }
}

/// One pass of every rule. Returns whether anything changed.
fn sanitize_pass(request: &mut Map<String, Value>, report: &mut FilterReport) -> bool {
    let mut changed = false;
    if request.remove("stream_options").is_some() {
        report.bump(FilterAction::StreamOptionsRemoved);
        changed = true;
    }
    if let Some(Value::Array(system)) = request.get_mut("system") {
        changed |= drop_empty_text(system, report);
        if system.is_empty() {
            request.remove("system");
            changed = true;
        }
    }
    if let Some(Value::Array(messages)) = request.get_mut("messages") {
        changed |= sanitize_messages(messages, report);
    }
    if let Some(Value::Array(tools)) = request.get_mut("tools") {
        for tool in tools.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(schema) = parameter_schema(tool) {
                changed |= strip_schema(schema, report);
            }
        }
    }
    changed
}

/// The parameter schema of a declared tool: OpenAI chat (`function.parameters`), Anthropic
/// (`input_schema`) or OpenAI Responses (`parameters` on a `function` tool).
fn parameter_schema(tool: &mut Map<String, Value>) -> Option<&mut Value> {
    if tool.contains_key("function") {
        return tool.get_mut("function")?.get_mut("parameters");
    }
    if tool.contains_key("input_schema") {
        return tool.get_mut("input_schema");
    }
    if tool.get("type").and_then(Value::as_str) == Some("function") {
        return tool.get_mut("parameters");
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Assistant,
    /// OpenAI `tool` (and legacy `function`) results: never dropped for being empty, since the
    /// call they answer would be left without a result.
    ToolResult,
    Other,
}

impl Role {
    fn of(message: &Map<String, Value>) -> Role {
        match message.get("role").and_then(Value::as_str) {
            Some("assistant") => Role::Assistant,
            Some("tool" | "function") => Role::ToolResult,
            _ => Role::Other,
        }
    }
}

/// One forward sweep over the messages, compacting in place. Each message is judged against
/// the nearest earlier assistant message that is kept, so drops cascade within the sweep.
fn sanitize_messages(messages: &mut Vec<Value>, report: &mut FilterReport) -> bool {
    let mut changed = false;
    let mut kept = 0;
    let mut last_assistant: Option<usize> = None;
    for i in 0..messages.len() {
        let (earlier, rest) = messages.split_at_mut(i);
        let preceding = last_assistant.map(|j| &earlier[j]);
        let keep = sanitize_message(&mut rest[0], preceding, report, &mut changed);
        if !keep {
            changed = true;
            continue;
        }
        messages.swap(kept, i);
        if messages[kept].as_object().map(Role::of) == Some(Role::Assistant) {
            last_assistant = Some(kept);
        }
        kept += 1;
    }
    messages.truncate(kept);
    changed
}

/// Sanitises one message. Returns whether to keep it.
fn sanitize_message(
    message: &mut Value,
    preceding: Option<&Value>,
    report: &mut FilterReport,
    changed: &mut bool,
) -> bool {
    let Some(message) = message.as_object_mut() else {
        return true;
    };
    let role = Role::of(message);
    if role == Role::ToolResult {
        if let Some(id) = message.get("tool_call_id").and_then(Value::as_str)
            && !answers(preceding, id)
        {
            report.bump(FilterAction::OrphanToolResultDropped);
            return false;
        }
        return true;
    }
    if let Some(Value::Array(blocks)) = message.get_mut("content") {
        *changed |= sanitize_blocks(blocks, preceding, report);
    }
    let tool_calls = has_tool_calls(message);
    if content_is_empty(message) {
        if !tool_calls {
            report.bump(FilterAction::EmptyMessageDropped);
            return false;
        }
        // OpenAI's form for "no content, only tool calls".
        if let Some(content) = message.get_mut("content")
            && !content.is_null()
        {
            *content = Value::Null;
            report.bump(FilterAction::EmptyTextDropped);
            *changed = true;
        }
    }
    true
}

/// Drops empty text blocks and orphan `tool_result` blocks. Returns whether anything changed.
fn sanitize_blocks(
    blocks: &mut Vec<Value>,
    preceding: Option<&Value>,
    report: &mut FilterReport,
) -> bool {
    let before = blocks.len();
    let mut nested_changed = false;
    blocks.retain_mut(|block| match block.get("type").and_then(Value::as_str) {
        Some("text") if is_empty_text(block) => {
            report.bump(FilterAction::EmptyTextDropped);
            false
        }
        Some("tool_result") => {
            if let Some(id) = block.get("tool_use_id").and_then(Value::as_str)
                && !answers(preceding, id)
            {
                report.bump(FilterAction::OrphanToolResultDropped);
                return false;
            }
            if let Some(Value::Array(inner)) = block.get_mut("content") {
                nested_changed |= drop_empty_text(inner, report);
            }
            true
        }
        _ => true,
    });
    nested_changed || blocks.len() != before
}

/// Drops empty text blocks from a list of blocks. Returns whether anything changed.
fn drop_empty_text(blocks: &mut Vec<Value>, report: &mut FilterReport) -> bool {
    let before = blocks.len();
    blocks.retain(|block| {
        let empty =
            block.get("type").and_then(Value::as_str) == Some("text") && is_empty_text(block);
        if empty {
            report.bump(FilterAction::EmptyTextDropped);
        }
        !empty
    });
    blocks.len() != before
}

fn is_empty_text(block: &Value) -> bool {
    match block.get("text") {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => text.trim().is_empty(),
        Some(_) => false,
    }
}

fn content_is_empty(message: &Map<String, Value>) -> bool {
    match message.get("content") {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => text.trim().is_empty(),
        Some(Value::Array(blocks)) => blocks.is_empty(),
        Some(_) => false,
    }
}

fn has_tool_calls(message: &Map<String, Value>) -> bool {
    message
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|calls| !calls.is_empty())
        || message.get("function_call").is_some_and(Value::is_object)
}

/// Whether the assistant message `preceding` made the tool call with this id, as an OpenAI
/// `tool_calls` entry or an Anthropic `tool_use` block.
fn answers(preceding: Option<&Value>, id: &str) -> bool {
    let Some(assistant) = preceding else {
        return false;
    };
    let has_id = |item: &Value| item.get("id").and_then(Value::as_str) == Some(id);
    let in_tool_calls = assistant
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|calls| calls.iter().any(has_id));
    in_tool_calls
        || assistant
            .get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks.iter().any(|block| {
                    block.get("type").and_then(Value::as_str) == Some("tool_use") && has_id(block)
                })
            })
}
