//! One filter call N times over, for counting its instructions under callgrind, which on a
//! busy machine is steadier than timing it:
//!
//! ```sh
//! cargo bench -p fresh-filter --bench instructions --no-run
//! BIN=$(ls -t target/release/deps/instructions-* | grep -v '\.d$' | head -1)
//! for n in 0 200; do valgrind --tool=callgrind --callgrind-out-file=/dev/null $BIN loadtest $n; done
//! ```
//!
//! The difference of the two totals over 200 is the cost of one call (N = 0 counts the setup
//! alone). Cases: `loadtest`, `loadtest_stateless`, `session_unchanged`,
//! `session_last_changed`, `sse`. Without arguments (as `cargo bench` runs it) it runs each
//! case once.
use std::hint::black_box;

use fresh_filter::{
    Mode, ModelRules, RequestContext, RequestSanitizer, SseLimits, SseRewriter, ToolContext,
    UsageScanner, sanitize_request_bytes,
};
use serde_json::json;

fn session(defects: bool) -> Vec<u8> {
    let file: String = (0..120)
        .map(|i| format!("    let value_{i} = compute(\"input {i}\", {i}).unwrap_or_default();\n"))
        .collect();
    let mut messages = vec![json!({"role": "system", "content": "You are a coding agent."})];
    let mut len = 0;
    let mut turn = 0;
    while len < 1_000_000 {
        let id = format!("call_{turn}");
        for m in [
            json!({"role": "user", "content": [{"type": "text", "text": format!("Step {turn}: continue.")}]}),
            json!({"role": "assistant", "content": "Reading the next file.", "tool_calls": [
            {"id": id, "type": "function", "function": {"name": "read_file", "arguments": format!("{{\"path\": \"/repo/src/m{turn}.rs\"}}")}}]}),
            json!({"role": "tool", "tool_call_id": id, "content": file}),
        ] {
            len += serde_json::to_vec(&m).unwrap().len() + 1;
            messages.push(m);
        }
        turn += 1;
    }
    // With defects: an empty text block in the last user message, so every assistant message
    // before it is read.
    if defects {
        messages.push(json!({"role": "user", "content": [{"type": "text", "text": "go on"}, {"type": "text", "text": " "}]}));
    }
    serde_json::to_vec(&json!({"model": "databricks-claude-sonnet-4", "messages": messages}))
        .unwrap()
}

fn sse_stream() -> Vec<u8> {
    let mut s = String::new();
    for i in 0..2000 {
        let event = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "databricks-claude-sonnet-4", "choices": [{"index": 0, "delta": {"content": format!("word{i} ")}, "finish_reason": null}]});
        s += &format!("data: {event}\n\n");
    }
    s += "data: [DONE]\n\n";
    s.into_bytes()
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (cases, n) = match &args[..] {
        [case, n] => (vec![case.as_str()], n.parse().expect("N is a count")),
        _ => (CASES.to_vec(), 1),
    };
    for case in cases {
        run(case, n);
    }
}

const CASES: [&str; 5] = [
    "loadtest",
    "loadtest_stateless",
    "session_unchanged",
    "session_last_changed",
    "sse",
];

/// The load harness's request: an OpenCode-shaped turn that needs cleaning.
const LOADTEST_REQUEST: &[u8] = include_bytes!("../../tools/loadtest/agent-request.json");

fn run(case: &str, n: usize) {
    let request = LOADTEST_REQUEST;
    let rules = ModelRules::builtin();
    let context = RequestContext::new(Mode::Chat);
    let sanitizer = RequestSanitizer::new();
    match case {
        "loadtest" => {
            sanitizer.sanitize_for(request, &rules, &context);
            for _ in 0..n {
                black_box(sanitizer.sanitize_for(black_box(request), &rules, &context));
            }
        }
        "loadtest_stateless" => {
            for _ in 0..n {
                black_box(sanitize_request_bytes(black_box(request)));
            }
        }
        "session_unchanged" | "session_last_changed" => {
            let body = session(case == "session_last_changed");
            sanitizer.sanitize_for(&body, &rules, &context);
            for _ in 0..n {
                black_box(sanitizer.sanitize_for(black_box(&body), &rules, &context));
            }
        }
        "sse" => {
            let stream = sse_stream();
            for _ in 0..n {
                let mut out = Vec::new();
                let mut rewriter =
                    SseRewriter::new(ToolContext::new(["bash"]), SseLimits::default());
                let mut scanner = UsageScanner::new(Mode::Chat);
                for chunk in stream.chunks(512) {
                    scanner.push(chunk);
                    rewriter.push(black_box(chunk), &mut out);
                }
                rewriter.finish(&mut out);
                black_box((out, scanner.finish()));
            }
        }
        other => panic!("unknown case {other}; the cases are {CASES:?}"),
    }
}
