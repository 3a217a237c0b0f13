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
