//! Stream builders and a reference client for the filter's tests.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{FilterReport, SseLimits, SseRewriter, ToolContext};

/// Runs a stream given as chunks through a fresh rewriter, then `finish`.
pub(crate) fn rewrite_chunks(
    chunks: &[&[u8]],
    tools: &ToolContext,
    limits: SseLimits,
) -> (Vec<u8>, FilterReport) {
    let mut rewriter = SseRewriter::new(tools.clone(), limits);
    let mut out = Vec::new();
    for chunk in chunks {
        rewriter.push(chunk, &mut out);
    }
    rewriter.finish(&mut out);
    (out, rewriter.report().clone())
}

/// Runs a stream unsplit, and asserts that every split into two chunks and a byte-by-byte
/// delivery give the same output and report.
pub(crate) fn rewrite(
    input: &[u8],
    tools: &ToolContext,
    limits: SseLimits,
) -> (Vec<u8>, FilterReport) {
    let whole = rewrite_chunks(&[input], tools, limits);
    for split in 0..=input.len() {
        let (a, b) = input.split_at(split);
        let got = rewrite_chunks(&[a, b], tools, limits);
        assert_eq!(
            String::from_utf8_lossy(&got.0),
            String::from_utf8_lossy(&whole.0),
            "split at {split}"
        );
        assert_eq!(got.1, whole.1, "split at {split}");
    }
    let bytes: Vec<&[u8]> = input.chunks(1).collect();
    let got = rewrite_chunks(&bytes, tools, limits);
    assert_eq!(got, whole, "byte by byte");
    whole
}

/// The `data` of each event, parsed the way a WHATWG-conforming client does.
pub(crate) fn events(stream: &[u8]) -> Vec<Vec<u8>> {
    let mut events = Vec::new();
    let mut data: Option<Vec<u8>> = None;
    let mut rest = stream;
    while let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') {
        let line = &rest[..end];
        let skip = if rest[end] == b'\r' && rest.get(end + 1) == Some(&b'\n') {
            2
        } else {
            1
        };
        rest = &rest[end + skip..];
        if line.is_empty() {
            if let Some(data) = data.take() {
                events.push(data);
            }
            continue;
        }
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => continue,
            Some(colon) => {
                let value = &line[colon + 1..];
                (&line[..colon], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        if name == b"data" {
            match &mut data {
                Some(buf) => {
                    buf.push(b'\n');
                    buf.extend_from_slice(value);
                }
                None => data = Some(value.to_vec()),
            }
        }
    }
    events
}

/// What a client makes of a chat-completion stream.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct ClientView {
    pub(crate) text: String,
    /// (choice, tool index) -> (name, arguments), names as first given, arguments joined.
    pub(crate) calls: BTreeMap<(u64, u64), (String, String)>,
    /// Later names that differ from the first one.
    pub(crate) renamed: usize,
    pub(crate) finish_reasons: Vec<String>,
    pub(crate) done: bool,
    pub(crate) after_done: usize,
    /// Events whose data is neither JSON nor `[DONE]`.
    pub(crate) not_json: usize,
}

pub(crate) fn client_view(stream: &[u8]) -> ClientView {
    let mut view = ClientView::default();
    for data in events(stream) {
        if view.done {
            view.after_done += 1;
            continue;
        }
        if data == b"[DONE]" {
            view.done = true;
            continue;
        }
        let Ok(value) = serde_json::from_slice::<Value>(&data) else {
            view.not_json += 1;
            continue;
        };
        for (cpos, choice) in value["choices"]
            .as_array()
            .into_iter()
            .flatten()
            .enumerate()
        {
            let c = choice["index"].as_u64().unwrap_or(cpos as u64);
            if let Some(text) = choice["delta"]["content"].as_str() {
                view.text.push_str(text);
            }
            for (tpos, call) in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let t = call["index"].as_u64().unwrap_or(tpos as u64);
                let entry = view.calls.entry((c, t)).or_default();
                if let Some(name) = call["function"]["name"].as_str() {
                    if entry.0.is_empty() {
                        entry.0 = name.to_owned();
                    } else if entry.0 != name {
                        view.renamed += 1;
                    }
                }
                if let Some(args) = call["function"]["arguments"].as_str() {
                    entry.1.push_str(args);
                }
            }
            if let Some(reason) = choice["finish_reason"].as_str() {
                view.finish_reasons.push(reason.to_owned());
            }
        }
    }
    view
}

pub(crate) fn sse(value: &Value) -> String {
    format!("data: {value}\n\n")
}

pub(crate) fn content_chunk(text: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"content": text}, "finish_reason": null}]})
}

pub(crate) fn call_open(t: u64, name: &str, args: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"role": "assistant", "tool_calls": [
            {"index": t, "id": format!("call_{t}"), "type": "function",
             "function": {"name": name, "arguments": args}}]},
         "finish_reason": null}]})
}

pub(crate) fn call_args(t: u64, args: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {"tool_calls": [{"index": t, "function": {"arguments": args}}]},
         "finish_reason": null}]})
}

pub(crate) fn finish_chunk(reason: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": {}, "finish_reason": reason}]})
}

pub(crate) const DONE: &str = "data: [DONE]\n\n";
