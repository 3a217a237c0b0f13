//! The request sanitiser and response fixer on arbitrary bytes: they never panic, a changed
//! body is well-formed JSON, sanitising a sanitised body changes nothing, and a body left alone is
//! one the rules on a parsed `Value` leave alone too.

#![no_main]

use fresh_filter::{
    ToolContext, fix_response_bytes, sanitize_request, sanitize_request_bytes,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let outcome = sanitize_request_bytes(data);
    if let Some(body) = &outcome.body {
        assert!(!outcome.report.is_empty());
        // Well-formed JSON; and if serde_json can hold the input as a `Value` (a number past
        // the range of f64 is well-formed but it cannot), it can hold the output too.
        serde_json::from_slice::<serde::de::IgnoredAny>(body).expect("well-formed JSON");
        if serde_json::from_slice::<serde_json::Value>(data).is_ok() {
            serde_json::from_slice::<serde_json::Value>(body).expect("valid JSON");
        }
        let again = sanitize_request_bytes(body);
        assert!(again.body.is_none(), "not settled: {:?}", again.report);
    } else if let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(data)
        && value.is_object()
    {
        assert!(outcome.report.is_empty());
        assert_eq!(outcome.tools, ToolContext::from_request(&value));
        let report = sanitize_request(&mut value);
        assert!(
            report.is_empty(),
            "left alone, but the rules say {report:?}"
        );
    }
    let (body, report) = fix_response_bytes(data, &outcome.tools);
    if let Some(body) = body {
        assert!(!report.is_empty());
        serde_json::from_slice::<serde_json::Value>(&body).expect("valid JSON");
    }
});
