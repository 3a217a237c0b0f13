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
