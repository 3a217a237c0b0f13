//! Shared by the integration tests: the proxy run on a real socket or as the real binary, and
//! the fake workspace and helpers of `fresh-test-support`.

// Each test binary uses a subset of this module.
#![allow(dead_code, unreachable_pub)]

pub mod binary;
pub mod harness;
pub mod load;
#[cfg(unix)]
pub mod unprivileged;

pub use fresh_test_support::*;

/// `GET {url}/health`, as JSON.
pub async fn health(url: &str) -> serde_json::Value {
    let text = get_text(format!("{url}/health")).await;
    serde_json::from_str(&text).unwrap()
}

/// A streamed chat request declaring one tool, `read_file`: the fake upstreams answer it with a
/// `databricks-tool-call` for the proxy to remap.
pub fn streamed_tool_call_request() -> serde_json::Value {
    serde_json::json!({
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}],
        "stream": true
    })
}
