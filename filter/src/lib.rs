//! Content filter: pure request, response and SSE rewriting.
//!
//! Databricks model serving rejects some requests that agents send (empty text blocks, tool
//! results whose call is gone, JSON-Schema keywords some models refuse), and some served models
//! answer with defects agents choke on (tool calls named `databricks-tool-call` with the real
//! name inside the arguments, `finish_reason: "stop"` on tool calls). This module fixes both
//! sides without I/O:
//!
//! * [`sanitize_request_bytes`] / [`sanitize_request`] clean a chat request, to a fixed point;
//! * [`fix_response_bytes`] / [`fix_response`] fix a JSON chat completion;
//! * [`SseRewriter`] fixes a streamed one, chunk by chunk;
//! * [`ModelRules`] says which fields a given model and API refuse, and
//!   [`RequestSanitizer::sanitize_for`] applies them before the rest.
//!
//! Each reports what it changed in a [`FilterReport`], counted by [`FilterAction`]. Input that
//! needs no change is never re-serialised: the caller forwards the original bytes.
//!
//! ```
//! use fresh_filter::{fix_response_bytes, sanitize_request_bytes};
//!
//! let request = br#"{"model": "m", "stream_options": {"include_usage": true},
//!     "messages": [{"role": "user", "content": [{"type": "text", "text": " "},
//!                                               {"type": "text", "text": "hi"}]}],
//!     "tools": [{"type": "function", "function": {"name": "bash", "parameters": {}}}]}"#;
//! let outcome = sanitize_request_bytes(request);
//! let sanitised: serde_json::Value = serde_json::from_slice(&outcome.body.unwrap())?;
//! assert_eq!(sanitised["messages"][0]["content"].as_array().unwrap().len(), 1);
//! // `stream_options` is a matter for the model rules, not for this general pass.
//! assert!(sanitised.get("stream_options").is_some());
//! assert_eq!(
//!     outcome.report.iter().collect::<Vec<_>>(),
//!     [("empty_text_dropped", 1)]
//! );
//!
//! // The response to it names the tool inside the arguments.
//! let response = br#"{"choices": [{"index": 0, "finish_reason": "stop", "message": {
//!     "role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
//!     "name": "databricks-tool-call", "arguments": "{\"name\": \"bash\", \"cmd\": \"ls\"}"}}]}}]}"#;
//! let (fixed, report) = fix_response_bytes(response, &outcome.tools);
//! let fixed: serde_json::Value = serde_json::from_slice(&fixed.unwrap())?;
//! let call = &fixed["choices"][0]["message"]["tool_calls"][0]["function"];
//! assert_eq!(call["name"], "bash");
//! assert_eq!(call["arguments"], r#"{ "cmd": "ls"}"#);
//! assert_eq!(fixed["choices"][0]["finish_reason"], "tool_calls");
//! assert_eq!(report.total(), 2);
//!
//! // A request with nothing to fix is not re-serialised.
//! assert!(sanitize_request_bytes(br#"{"messages": []}"#).body.is_none());
//! # Ok::<(), serde_json::Error>(())
//! ```

mod arguments;
mod lean;
#[cfg(test)]
mod proptests;
mod report;
mod request;
mod response;
mod rules;
mod schema;
mod sse;
#[cfg(test)]
mod test_support;
mod usage;
mod view;

pub use report::{FilterAction, FilterReport};
pub use request::request_model;
pub use request::{RequestOutcome, RequestSanitizer, sanitize_request, sanitize_request_bytes};
pub use response::{ToolContext, fix_response, fix_response_bytes};
pub use rules::{
    BUILTIN_RULES, FieldPath, Glob, Mode, ModelRules, RequestContext, Rule, RulesError,
};
pub use sse::{SseLimits, SseRewriter};
pub use usage::{Usage, UsageScanner, usage_of_json};

/// The placeholder name some served models give every tool call.
pub const DATABRICKS_TOOL_CALL: &str = "databricks-tool-call";

/// What the answers' fixes look for before they parse anything.
static TOOL_CALLS: Needle = Needle::new("\"tool_calls\"");
static STOP: Needle = Needle::new("\"stop\"");
static TOOL_CALL_PLACEHOLDER: Needle = Needle::new(DATABRICKS_TOOL_CALL);

/// A text searched for in every request or answer, with memchr's vectorised searcher for it,
/// built once: building one costs more than searching a body of a few kilobytes with it.
struct Needle {
    text: &'static str,
    finder: std::sync::OnceLock<memchr::memmem::Finder<'static>>,
}

impl Needle {
    const fn new(text: &'static str) -> Self {
        Self {
            text,
            finder: std::sync::OnceLock::new(),
        }
    }

    /// Whether the needle occurs in `haystack`, searched as bytes (a text is not checked for
    /// UTF-8 first: the needle is, and so a match is one in the text).
    fn is_in(&self, haystack: &[u8]) -> bool {
        self.finder
            .get_or_init(|| memchr::memmem::Finder::new(self.text))
            .find(haystack)
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::Needle;

    /// One needle, its searcher built on the first search, answers every later one.
    #[test]
    fn a_needle_is_found_wherever_it_is_and_only_there() {
        static STOP: Needle = Needle::new("\"stop\"");
        let cases: &[(&[u8], bool)] = &[
            (b"", false),
            (b"\"stop\"", true),
            (br#"{"finish_reason":"stop"}"#, true),
            (br#"{"finish_reason":"stopped"}"#, false),
            (br#"{"finish_reason":"sto"#, false),
            (br#"{"a":"x","b":"stop"}"#, true),
            ("{\"é\":\"stop\"}".as_bytes(), true),
            (b"stop", false),
        ];
        for _ in 0..2 {
            for (haystack, found) in cases {
                assert_eq!(
                    STOP.is_in(haystack),
                    *found,
                    "{}",
                    String::from_utf8_lossy(haystack)
                );
            }
        }
    }
}
