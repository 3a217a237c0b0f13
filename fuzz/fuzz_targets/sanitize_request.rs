//! The request sanitiser and response fixer on arbitrary bytes: they never panic, a changed
//! body is valid JSON, and sanitising a sanitised body changes nothing.

#![no_main]

use fresh_proxy::filter::{fix_response_bytes, sanitize_request_bytes};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let outcome = sanitize_request_bytes(data);
    if let Some(body) = &outcome.body {
        assert!(!outcome.report.is_empty());
        serde_json::from_slice::<serde_json::Value>(body).expect("valid JSON");
        let again = sanitize_request_bytes(body);
        assert!(again.body.is_none(), "not settled: {:?}", again.report);
    }
    let (body, report) = fix_response_bytes(data, &outcome.tools);
    if let Some(body) = body {
        assert!(!report.is_empty());
        serde_json::from_slice::<serde_json::Value>(&body).expect("valid JSON");
    }
});
