//! Fixing JSON chat-completion responses: `databricks-tool-call` remapping and `finish_reason`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::arguments::{NameScan, scan_name, without};
use super::report::{FilterAction, FilterReport};
use super::{DATABRICKS_TOOL_CALL, STOP, TOOL_CALL_PLACEHOLDER, TOOL_CALLS};

/// The tools a request declared, which decide whether a `databricks-tool-call` may be renamed.
///
/// With tools declared, a call is renamed only to one of them. With none declared (the
/// [`Default`]), the fallback renames to any non-empty string `"name"` other than
/// `databricks-tool-call` itself. When the request declares a tool actually named
/// `databricks-tool-call`, such calls are genuine and never renamed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ToolContext {
    declared: Option<Arc<[Box<str>]>>,
}

impl ToolContext {
    /// A context with these tool names declared. No names at all is the same as [`Default`].
    pub fn new<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<Box<str>>,
    {
        let names: Arc<[Box<str>]> = names.into_iter().map(Into::into).collect();
        ToolContext {
            declared: (!names.is_empty()).then_some(names),
        }
    }

    /// The tool names a chat request declares, in the OpenAI (`tools[].function.name`),
    /// OpenAI Responses (`tools[].name`) and Anthropic (`tools[].name`) shapes.
    pub fn from_request(request: &Value) -> Self {
        let Some(tools) = request.get("tools").and_then(Value::as_array) else {
            return ToolContext::default();
        };
        ToolContext::new(tools.iter().filter_map(|tool| {
            tool.get("function")
                .and_then(|f| f.get("name"))
                .or_else(|| tool.get("name"))
                .and_then(Value::as_str)
        }))
    }

    /// The declared tool names; empty when none were declared.
    pub fn declared(&self) -> impl Iterator<Item = &str> + '_ {
        self.declared
            .iter()
            .flat_map(|names| names.iter().map(AsRef::as_ref))
    }

    /// Whether calls named `databricks-tool-call` are candidates for renaming at all.
    pub(crate) fn remaps_databricks_calls(&self) -> bool {
        !self.declared().any(|name| name == DATABRICKS_TOOL_CALL)
    }

    /// Whether a `databricks-tool-call` may become a call of `name`.
    pub(crate) fn accepts(&self, name: &str) -> bool {
        if name == DATABRICKS_TOOL_CALL || !self.remaps_databricks_calls() {
            return false;
        }
        match &self.declared {
            Some(names) => names.iter().any(|declared| &**declared == name),
            None => !name.trim().is_empty(),
        }
    }
}

/// Fixes a parsed chat-completion response in place and reports what changed.
///
/// Anything that is not an OpenAI-shaped chat completion (`choices[].message`) is left alone.
pub fn fix_response(value: &mut Value, tools: &ToolContext) -> FilterReport {
    let mut report = FilterReport::default();
    let Some(choices) = value.get_mut("choices").and_then(Value::as_array_mut) else {
        return report;
    };
    for choice in choices.iter_mut().filter_map(Value::as_object_mut) {
        let mut made_tool_calls = false;
        if let Some(calls) = choice
            .get_mut("message")
            .and_then(|m| m.get_mut("tool_calls"))
            .and_then(Value::as_array_mut)
        {
            made_tool_calls = !calls.is_empty();
            for call in calls.iter_mut() {
                if let Some(function) = call.get_mut("function").and_then(Value::as_object_mut)
                    && remap_function(function, tools)
                {
                    report.bump(FilterAction::ToolNameRemapped);
                }
            }
        }
        if made_tool_calls && fix_finish_reason(choice) {
            report.bump(FilterAction::FinishReasonFixed);
        }
    }
    report
}

/// [`fix_response`] on a raw body. Returns the new body only when something changed; bodies
/// that are not JSON, or hold nothing to fix, are not parsed past a substring check.
pub fn fix_response_bytes(body: &[u8], tools: &ToolContext) -> (Option<Vec<u8>>, FilterReport) {
    let unchanged = (None, FilterReport::default());
    // The remap needs a `databricks-tool-call`, the finish fix a `"stop"` on a choice with
    // `"tool_calls"`; most bodies have neither and are never parsed.
    let may_need_a_fix =
        TOOL_CALL_PLACEHOLDER.is_in(body) || (STOP.is_in(body) && TOOL_CALLS.is_in(body));
    if !may_need_a_fix {
        return unchanged;
    }
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return unchanged;
    };
    let report = fix_response(&mut value, tools);
    if report.is_empty() {
        return unchanged;
    }
    match serde_json::to_vec(&value) {
        Ok(body) => (Some(body), report),
        Err(_) => unchanged,
    }
}

/// Renames a complete `databricks-tool-call` function (`{"name", "arguments"}`) to the tool its
/// arguments name. Returns whether it changed.
fn remap_function(function: &mut Map<String, Value>, tools: &ToolContext) -> bool {
    if function.get("name").and_then(Value::as_str) != Some(DATABRICKS_TOOL_CALL)
        || !tools.remaps_databricks_calls()
    {
        return false;
    }
    let remapped = match function.get_mut("arguments") {
        Some(Value::String(text)) => match scan_name(text) {
            NameScan::Found { name, cut } if tools.accepts(&name) => {
                *text = without(text, cut);
                Some(name)
            }
            _ => None,
        },
        // Some servers send arguments as an object rather than a JSON string.
        Some(Value::Object(args)) => match args.get("name").and_then(Value::as_str) {
            Some(name) if tools.accepts(name) => {
                let name = name.to_owned();
                args.shift_remove("name");
                Some(name)
            }
            _ => None,
        },
        _ => None,
    };
    match remapped {
        Some(name) => {
            function.insert("name".to_owned(), Value::String(name));
            true
        }
        None => false,
    }
}

/// Turns `finish_reason: "stop"` into `"tool_calls"`. Returns whether it changed.
pub(crate) fn fix_finish_reason(choice: &mut Map<String, Value>) -> bool {
    match choice.get_mut("finish_reason") {
        Some(reason) if reason.as_str() == Some("stop") => {
            *reason = Value::String("tool_calls".to_owned());
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn completion(name: &str, arguments: Value, finish_reason: &str) -> Value {
        json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": name, "arguments": arguments}
                    }]
                },
                "finish_reason": finish_reason
            }]
        })
    }

    fn call(value: &Value) -> (&str, &Value, &str) {
        let choice = &value["choices"][0];
        let function = &choice["message"]["tool_calls"][0]["function"];
        (
            function["name"].as_str().unwrap(),
            &function["arguments"],
            choice["finish_reason"].as_str().unwrap(),
        )
    }

    #[test]
    fn response_rules() {
        let declared = ToolContext::new(["read_file", "bash"]);
        let none = ToolContext::default();
        let own = ToolContext::new(["databricks-tool-call", "read_file"]);
        let args = r#"{"name": "read_file", "path": "/x"}"#;
        let rest = json!(r#"{ "path": "/x"}"#);
        let dbx = "databricks-tool-call";
        let both: &[(&str, u64)] = &[("tool_name_remapped", 1), ("finish_reason_fixed", 1)];
        let finish_only: &[(&str, u64)] = &[("finish_reason_fixed", 1)];
        #[rustfmt::skip]
        let cases = [
            // (name, arguments, finish_reason, tools) -> (name, arguments, finish_reason), report
            // Remapped to a declared tool, the rest of the arguments kept as text.
            ((dbx, json!(args), "stop", &declared), ("read_file", rest.clone(), "tool_calls"), both),
            // Fallback without declared tools.
            ((dbx, json!(args), "stop", &none), ("read_file", rest, "tool_calls"), both),
            // A name that no declared tool has is a real argument: not stolen.
            ((dbx, json!(r#"{"name": "Ada"}"#), "stop", &declared),
             (dbx, json!(r#"{"name": "Ada"}"#), "tool_calls"), finish_only),
            // A real tool with an argument called name is never touched.
            (("bash", json!(r#"{"name": "read_file"}"#), "stop", &declared),
             ("bash", json!(r#"{"name": "read_file"}"#), "tool_calls"), finish_only),
            // The request declared databricks-tool-call itself: the call is genuine.
            ((dbx, json!(args), "stop", &own), (dbx, json!(args), "tool_calls"), finish_only),
            // Arguments as an object.
            ((dbx, json!({"name": "bash", "cmd": "ls"}), "tool_calls", &declared),
             ("bash", json!({"cmd": "ls"}), "tool_calls"), &[("tool_name_remapped", 1)]),
            // Already right, or another finish_reason: nothing to do.
            (("bash", json!("{}"), "tool_calls", &declared), ("bash", json!("{}"), "tool_calls"), &[]),
            (("bash", json!("{}"), "length", &declared), ("bash", json!("{}"), "length"), &[]),
        ];
        for ((name, arguments, finish, tools), want, want_report) in cases {
            let mut value = completion(name, arguments.clone(), finish);
            let report = fix_response(&mut value, tools);
            let (got_name, got_args, got_reason) = call(&value);
            assert_eq!(
                (got_name, got_args.clone(), got_reason),
                want,
                "{name} {arguments}"
            );
            assert_eq!(
                report.iter().collect::<Vec<_>>(),
                want_report,
                "{name} {arguments}"
            );
        }
    }

    #[test]
    fn stop_without_tool_calls_stays() {
        let mut value = json!({"choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"},
            {"index": 1, "message": {"role": "assistant", "tool_calls": []}, "finish_reason": "stop"}
        ]});
        let before = value.clone();
        assert!(fix_response(&mut value, &ToolContext::default()).is_empty());
        assert_eq!(value, before);
    }

    #[test]
    fn bytes_are_only_rewritten_when_changed() {
        let tools = ToolContext::default();
        for body in [
            &b"not json"[..],
            b"\xff\xfe\"stop\"",
            br#"{"choices":[{"message":{"content":"stop"},"finish_reason":"stop"}]}"#,
            br#"{"type":"message","stop_reason":"end_turn"}"#,
            b"[1,2]",
        ] {
            let (new_body, report) = fix_response_bytes(body, &tools);
            assert!(new_body.is_none() && report.is_empty());
        }
        let body = serde_json::to_vec(&completion(
            "databricks-tool-call",
            json!(r#"{"name":"bash","cmd":"ls"}"#),
            "stop",
        ))
        .unwrap();
        let (new_body, report) = fix_response_bytes(&body, &tools);
        let value: Value = serde_json::from_slice(&new_body.unwrap()).unwrap();
        assert_eq!(
            call(&value),
            ("bash", &json!(r#"{"cmd":"ls"}"#), "tool_calls")
        );
        assert_eq!(report.get(FilterAction::ToolNameRemapped), 1);
    }

    #[test]
    fn tool_context_from_request_shapes() {
        let request = json!({"tools": [
            {"type": "function", "function": {"name": "openai_tool", "parameters": {}}},
            {"name": "anthropic_tool", "input_schema": {}},
            {"type": "function", "name": "responses_tool", "parameters": {}},
            {"type": "web_search"}
        ]});
        let tools = ToolContext::from_request(&request);
        assert_eq!(
            tools.declared().collect::<Vec<_>>(),
            ["openai_tool", "anthropic_tool", "responses_tool"]
        );
        assert_eq!(
            ToolContext::from_request(&json!({"tools": []})),
            ToolContext::default()
        );
        assert!(ToolContext::default().accepts("anything"));
        assert!(!ToolContext::default().accepts(" "));
        assert!(!ToolContext::default().accepts(DATABRICKS_TOOL_CALL));
        assert!(!tools.accepts("anything"));
        assert!(tools.accepts("anthropic_tool"));
    }
}
