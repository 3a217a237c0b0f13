//! Content filter: pure request, response and SSE rewriting.

mod arguments;
#[cfg(test)]
mod proptests;
mod report;
mod request;
mod response;
mod schema;
mod sse;
#[cfg(test)]
mod test_support;

pub use report::{FilterAction, FilterReport};
pub use request::{RequestOutcome, sanitize_request, sanitize_request_bytes};
pub use response::{ToolContext, fix_response, fix_response_bytes};
pub use sse::{SseLimits, SseRewriter};

/// The placeholder name some served models give every tool call.
pub const DATABRICKS_TOOL_CALL: &str = "databricks-tool-call";

/// Whether `needle` occurs in `haystack`. Valid UTF-8 (nearly every body) takes the standard
/// library's vectorised string search.
fn contains(haystack: &[u8], needle: &str) -> bool {
    match std::str::from_utf8(haystack) {
        Ok(text) => text.contains(needle),
        Err(_) => haystack
            .windows(needle.len())
            .any(|window| window == needle.as_bytes()),
    }
}
