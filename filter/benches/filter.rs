//! Content filter micro-benchmarks: request sanitising and SSE rewriting.
//!
//! `cargo bench --bench filter -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use fresh_filter::{
    Mode, ModelRules, RequestContext, RequestSanitizer, SseLimits, SseRewriter, ToolContext,
    UsageScanner, fix_response_bytes, sanitize_request_bytes,
};
use serde_json::{Value, json};

/// The request the load harness sends: an OpenCode-shaped turn whose tool schemas carry
/// `$schema` and `additionalProperties`.
const LOADTEST_REQUEST: &[u8] = include_bytes!("../../tools/loadtest/agent-request.json");

fn tool(name: &str, description: &str) -> Value {
    json!({"type": "function", "function": {
        "name": name,
        "description": description,
        "parameters": {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Absolute path of the file"},
                "pattern": {"type": "string", "description": "Regular expression to search for"},
                "limit": {"type": "integer", "minimum": 1, "description": "Maximum number of results"}
            },
            "required": ["path"],
            "additionalProperties": false
        }
    }})
}

/// An agent request of about 3.7 KB: system prompt, a short tool-using exchange, six tools.
/// With `defects`, it carries what agents really send: an empty text part, stream_options and
/// `$schema`/`additionalProperties` in every tool schema.
fn agent_request(defects: bool) -> Vec<u8> {
    let system = "You are a coding agent working in the user's repository. Prefer small, \
        reviewable changes. Read files before editing them, run the tests after each change, \
        and explain what you did in a few sentences. ";
    let mut request = json!({
        "model": "databricks-claude-sonnet-4",
        "stream": true,
        "max_tokens": 8192,
        "messages": [
            {"role": "system", "content": system.repeat(2)},
            {"role": "user", "content": [
                {"type": "text", "text": "The tests in src/config.rs fail since yesterday. Find out why and fix it."}
            ]},
            {"role": "assistant", "content": "Let me look at the failing test first.", "tool_calls": [
                {"id": "call_01", "type": "function", "function": {
                    "name": "read_file", "arguments": "{\"path\": \"/repo/src/config.rs\", \"limit\": 200}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_01", "content":
                "use std::env;\n\npub fn port() -> u16 {\n    env::var(\"PORT\").ok().and_then(|p| p.parse().ok()).unwrap_or(4000)\n}\n"},
            {"role": "assistant", "content": "The default port changed. I will run the tests to confirm.", "tool_calls": [
                {"id": "call_02", "type": "function", "function": {
                    "name": "bash", "arguments": "{\"command\": \"cargo test config\"}"}}
            ]},
            {"role": "tool", "tool_call_id": "call_02", "content":
                "running 3 tests\ntest config::port_default ... FAILED\nassertion failed: left == right (4000 vs 8080)"}
        ],
        "tools": [
            tool("read_file", "Read a file from the repository"),
            tool("write_file", "Write a file in the repository"),
            tool("grep", "Search file contents"),
            tool("glob", "Find files by name"),
            tool("bash", "Run a shell command"),
            tool("edit", "Replace text in a file")
        ]
    });
    if !defects {
        for tool in request["tools"].as_array_mut().unwrap() {
            let schema = tool["function"]["parameters"].as_object_mut().unwrap();
            schema.remove("$schema");
            schema.remove("additionalProperties");
        }
    } else {
        request["stream_options"] = json!({"include_usage": true});
        request["messages"][1]["content"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "text", "text": "  "}));
    }
    serde_json::to_vec(&request).unwrap()
}

/// A long session of about 1 MB: many turns whose tool results hold file contents. With
/// `defects`, its tool schemas carry `$schema`/`additionalProperties`.
fn large_request(defects: bool) -> Vec<u8> {
    let file: String = (0..120)
        .map(|i| format!("    let value_{i} = compute(\"input {i}\", {i}).unwrap_or_default();\n"))
        .collect();
    let mut messages = vec![json!({"role": "system", "content": "You are a coding agent."})];
    // The length of `messages` as JSON, kept as it grows: serialising the whole list again
    // after each turn made building it quadratic.
    let mut len = serde_json::to_vec(&messages).unwrap().len();
    let mut turn = 0;
    while len < 1_000_000 {
        let id = format!("call_{turn}");
        for message in [
            json!({"role": "user", "content": [{"type": "text", "text": format!("Step {turn}: continue.")}]}),
            json!({"role": "assistant", "content": "Reading the next file.", "tool_calls": [
                {"id": id, "type": "function", "function": {"name": "read_file", "arguments": format!("{{\"path\": \"/repo/src/m{turn}.rs\"}}")}}
            ]}),
            json!({"role": "tool", "tool_call_id": id, "content": file}),
        ] {
            len += serde_json::to_vec(&message).unwrap().len() + 1;
            messages.push(message);
        }
        turn += 1;
    }
    debug_assert_eq!(len, serde_json::to_vec(&messages).unwrap().len());
    let mut tools: Vec<Value> = ["read_file", "write_file", "grep", "bash"]
        .iter()
        .map(|name| tool(name, "A tool"))
        .collect();
    if !defects {
        for tool in &mut tools {
            let schema = tool["function"]["parameters"].as_object_mut().unwrap();
            schema.remove("$schema");
            schema.remove("additionalProperties");
        }
    }
    serde_json::to_vec(&json!({"model": "m", "messages": messages, "tools": tools})).unwrap()
}

fn chunk(delta: Value, finish: Value) -> String {
    let event = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1_700_000_000,
        "model": "databricks-claude-sonnet-4", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {event}\n\n")
}

/// A streamed answer: 2000 content deltas, then a `databricks-tool-call` streamed in 40
/// fragments, `finish_reason: "stop"` and `[DONE]`.
fn sse_stream() -> Vec<u8> {
    let mut stream = String::new();
    for i in 0..2000 {
        stream += &chunk(json!({"content": format!("word{i} ")}), Value::Null);
    }
    stream += &chunk(
        json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "databricks-tool-call", "arguments": ""}}]}),
        Value::Null,
    );
    let args = format!(
        "{{\"name\": \"write_file\", \"path\": \"/repo/a.rs\", \"content\": \"{}\"}}",
        "fn main() {}\\n".repeat(40)
    );
    for piece in args.as_bytes().chunks(args.len().div_ceil(40)) {
        let piece = std::str::from_utf8(piece).unwrap();
        stream += &chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
            Value::Null,
        );
    }
    stream += &chunk(json!({}), json!("stop"));
    stream += "data: [DONE]\n\n";
    stream.into_bytes()
}

fn sanitize(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse_only");
    for (name, body) in [
        ("agent_3.7kb", agent_request(false)),
        ("session_1mb", large_request(false)),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| serde_json::from_slice::<Value>(black_box(&body)).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("sanitize_request");
    for (name, body) in [
        ("agent_3.7kb_unchanged", agent_request(false)),
        ("agent_3.7kb_changed", agent_request(true)),
        ("loadtest_3.8kb", LOADTEST_REQUEST.to_vec()),
        ("session_1mb_unchanged", large_request(false)),
        ("session_1mb_changed", large_request(true)),
    ] {
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| sanitize_request_bytes(black_box(&body)))
        });
    }
    group.finish();

    // What the proxy does: a `RequestSanitizer` that has seen this agent's tools before.
    let mut group = c.benchmark_group("request_sanitizer");
    for (name, body) in [
        ("agent_3.7kb_unchanged", agent_request(false)),
        ("agent_3.7kb_changed", agent_request(true)),
        ("loadtest_3.8kb", LOADTEST_REQUEST.to_vec()),
    ] {
        let sanitizer = RequestSanitizer::new();
        sanitizer.sanitize(&body);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| b.iter(|| sanitizer.sanitize(black_box(&body))));
    }
    group.finish();

    // The proxy's own call on a chat route: the built-in model rules, then the sanitizer that
    // has seen this agent's tools before.
    let rules = ModelRules::builtin();
    let context = RequestContext::new(Mode::Chat);
    let mut group = c.benchmark_group("sanitize_for_chat");
    for (name, body) in [
        ("loadtest_3.8kb", LOADTEST_REQUEST.to_vec()),
        ("agent_3.7kb_unchanged", agent_request(false)),
        ("session_1mb_changed", large_request(true)),
    ] {
        let sanitizer = RequestSanitizer::new();
        sanitizer.sanitize_for(&body, &rules, &context);
        group.throughput(Throughput::Bytes(body.len() as u64));
        group.bench_function(name, |b| {
            b.iter(|| sanitizer.sanitize_for(black_box(&body), &rules, &context))
        });
    }
    group.finish();
}

fn sse(c: &mut Criterion) {
    let stream = sse_stream();
    let tools = ToolContext::new(["read_file", "write_file", "bash"]);
    let mut group = c.benchmark_group("sse_rewrite");
    group.throughput(Throughput::Bytes(stream.len() as u64));
    // Upstream reads arrive in pieces of a few hundred bytes to a few KiB.
    for piece in [512, 8192] {
        group.bench_function(format!("chunks_of_{piece}"), |b| {
            let mut out = Vec::with_capacity(stream.len() + 1024);
            b.iter(|| {
                out.clear();
                let mut rewriter = SseRewriter::new(tools.clone(), SseLimits::default());
                for chunk in stream.chunks(piece) {
                    rewriter.push(black_box(chunk), &mut out);
                }
                rewriter.finish(&mut out);
                out.len()
            });
        });
    }
    // What the proxy runs beside the rewriter on a chat stream, to count tokens.
    group.bench_function("usage_scan_chunks_of_512", |b| {
        b.iter(|| {
            let mut scanner = UsageScanner::new(Mode::Chat);
            for chunk in stream.chunks(512) {
                scanner.push(black_box(chunk));
            }
            scanner.finish()
        });
    });
    group.finish();

    let body = serde_json::to_vec(
        &json!({"choices": [{"index": 0, "message": {"role": "assistant",
        "content": "word ".repeat(2000)}, "finish_reason": "stop"}]}),
    )
    .unwrap();
    let mut group = c.benchmark_group("fix_response");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("json_10kb_unchanged", |b| {
        b.iter(|| fix_response_bytes(black_box(&body), &tools))
    });
    group.finish();
}

criterion_group!(benches, sanitize, sse);
criterion_main!(benches);
