//! Property tests: chunking never matters, nothing is lost or duplicated, sanitising settles.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::arguments::{NameScan, scan_name, without};
use super::test_support::{
    call_args, call_open, client_view, content_chunk, events, rewrite_chunks,
};
use super::view::{checked_members, clean_request, elements, is_text, members};
use super::{
    DATABRICKS_TOOL_CALL, FilterAction, RequestSanitizer, SseLimits, ToolContext, sanitize_request,
    sanitize_request_bytes,
};

/// Suite time matters more than depth here; the fuzz targets go deeper. `PROPTEST_CASES`
/// overrides the count for a longer run.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// One SSE event of a generated stream, before line ends and `data:` styles are chosen.
#[derive(Clone, Debug)]
enum Event {
    Json(Value),
    Comment,
    NotJson(String),
    Done,
}

#[derive(Clone, Debug)]
struct Style {
    eol: &'static str,
    space: bool,
    pretty: bool,
    fields: bool,
}

fn style() -> impl Strategy<Value = Style> {
    (
        prop_oneof![Just("\n"), Just("\r\n"), Just("\r")],
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(eol, space, pretty, fields)| Style {
            eol,
            space,
            pretty,
            fields,
        })
}

/// Arguments for a `databricks-tool-call`: name first, name last, an undeclared name, or none.
fn call_arguments() -> impl Strategy<Value = String> {
    (0..4u8, "[a-z/ ]{0,12}", 0..3u8).prop_map(|(shape, path, tool)| {
        let tool = ["bash", "read_file", "Ada"][usize::from(tool)];
        match shape {
            0 => format!("{{\"name\": \"{tool}\", \"path\": \"{path}\"}}"),
            1 => format!(
                "{{\"path\": \"{path}\", \"n\": [1, {{\"name\": \"x\"}}], \"name\": \"{tool}\"}}"
            ),
            2 => format!("{{\"name\":\"{tool}\"}}"),
            _ => format!("{{\"path\": \"{path}\"}}"),
        }
    })
}

/// A chat-completion stream: content, tool calls streamed in fragments (some named
/// `databricks-tool-call`), comments, non-JSON events, a finish_reason, `[DONE]`, and junk after.
fn stream_events() -> impl Strategy<Value = Vec<Event>> {
    let piece = prop_oneof![
        2 => "[a-z \"\\\\]{0,8}".prop_map(|t| vec![Event::Json(content_chunk(&t))]),
        1 => Just(vec![Event::Comment]),
        1 => "[a-z:]{0,6}".prop_map(|t| vec![Event::NotJson(t)]),
        4 => (call_arguments(), prop::collection::vec(0..40usize, 0..6), prop::bool::weighted(0.8))
            .prop_map(|(args, cuts, placeholder)| {
                let mut cuts: Vec<usize> = cuts
                    .into_iter()
                    .map(|c| c.min(args.len()))
                    .filter(|&c| args.is_char_boundary(c))
                    .collect();
                cuts.push(0);
                cuts.push(args.len());
                cuts.sort_unstable();
                cuts.dedup();
                let name = if placeholder { DATABRICKS_TOOL_CALL } else { "bash" };
                // Each piece of the stream uses its own tool index, given later.
                let mut events = vec![Event::Json(call_open(0, name, &args[..cuts[1]]))];
                for pair in cuts[1..].windows(2) {
                    events.push(Event::Json(call_args(0, &args[pair[0]..pair[1]])));
                }
                events
            }),
    ];
    (
        prop::collection::vec(piece, 1..6),
        prop_oneof![3 => Just("stop"), 1 => Just("length"), 1 => Just("tool_calls")],
        any::<bool>(),
    )
        .prop_map(|(pieces, reason, done)| {
            let mut events = Vec::new();
            for (t, piece) in pieces.into_iter().enumerate() {
                for mut event in piece {
                    if let Event::Json(value) = &mut event
                        && let Some(call) = value.pointer_mut("/choices/0/delta/tool_calls/0")
                    {
                        call["index"] = json!(t);
                        if call.get("id").is_some() {
                            call["id"] = json!(format!("call_{t}"));
                        }
                    }
                    events.push(event);
                }
            }
            events.push(Event::Json(json!({"choices": [
                {"index": 0, "delta": {}, "finish_reason": reason}]})));
            if done {
                events.push(Event::Done);
                events.push(Event::Json(content_chunk("after done")));
            }
            events
        })
}

fn render_stream(events: &[Event], styles: &[Style]) -> Vec<u8> {
    let mut out = String::new();
    for (i, event) in events.iter().enumerate() {
        let style = &styles[i % styles.len()];
        let eol = style.eol;
        let data = if style.space { "data: " } else { "data:" };
        if style.fields {
            out += &format!("event: chunk{eol}id: {i}{eol}");
        }
        match event {
            Event::Json(value) if style.pretty => {
                for line in serde_json::to_string_pretty(value).unwrap().lines() {
                    out += &format!("{data}{line}{eol}");
                }
            }
            Event::Json(value) => out += &format!("{data}{value}{eol}"),
            Event::Comment => out += &format!(": ping{eol}"),
            Event::NotJson(text) => out += &format!("{data}{text}{eol}"),
            Event::Done => out += &format!("{data}[DONE]{eol}"),
        }
        out += eol;
    }
    out.into_bytes()
}

fn split_at_points<'a>(input: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = points.iter().map(|p| p % (input.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for p in points {
        chunks.push(&input[start..p]);
        start = p;
    }
    chunks.push(&input[start..]);
    chunks
}

fn limits() -> impl Strategy<Value = SseLimits> {
    prop_oneof![
        2 => Just(SseLimits::default()),
        1 => (1..6usize, 100..1500usize, 150..2000usize).prop_map(|(events, bytes, event)| SseLimits {
            max_held_events: events,
            max_held_bytes: bytes,
            max_event_bytes: event,
        }),
    ]
}

fn tools() -> impl Strategy<Value = ToolContext> {
    prop_oneof![
        2 => Just(ToolContext::default()),
        2 => Just(ToolContext::new(["bash", "read_file"])),
        1 => Just(ToolContext::new([DATABRICKS_TOOL_CALL, "bash"])),
    ]
}

proptest! {
    #![proptest_config(config(96))]

    #[test]
    fn any_chunking_gives_the_same_output(
        events in stream_events(),
        styles in prop::collection::vec(style(), 1..4),
        points in prop::collection::vec(any::<usize>(), 0..8),
        tools in tools(),
        limits in limits(),
    ) {
        let input = render_stream(&events, &styles);
        let whole = rewrite_chunks(&[&input], &tools, limits);
        let chunks = split_at_points(&input, &points);
        let split = rewrite_chunks(&chunks, &tools, limits);
        prop_assert_eq!(String::from_utf8_lossy(&split.0), String::from_utf8_lossy(&whole.0));
        prop_assert_eq!(split.1, whole.1);
    }

    #[test]
    fn no_event_is_lost_or_duplicated(
        pieces in stream_events(),
        styles in prop::collection::vec(style(), 1..4),
        tools in tools(),
        limits in limits(),
    ) {
        let input = render_stream(&pieces, &styles);
        let (output, report) = rewrite_chunks(&[&input], &tools, limits);
        // Every event that goes out is one JSON document (client_view checks), or [DONE].
        let before = client_view(&input);
        let after = client_view(&output);
        prop_assert_eq!(&after.text, &before.text);
        prop_assert_eq!(after.done, before.done);
        prop_assert_eq!(after.after_done, 0);
        prop_assert_eq!(after.renamed, 0);
        prop_assert_eq!(after.calls.len(), before.calls.len());
        let mut remapped = 0;
        for (key, (name, args)) in &before.calls {
            let (out_name, out_args) = &after.calls[key];
            if out_name == name {
                prop_assert_eq!(out_args, args);
            } else {
                remapped += 1;
                prop_assert_eq!(name.as_str(), DATABRICKS_TOOL_CALL);
                let NameScan::Found { name: real, cut } = scan_name(args) else {
                    return Err(TestCaseError::fail(format!("remapped without a name: {args}")));
                };
                prop_assert_eq!(out_name, &real);
                prop_assert_eq!(out_args, &without(args, cut));
            }
        }
        prop_assert_eq!(report.get(FilterAction::ToolNameRemapped), remapped);
        // Comments, and events that are not JSON, all arrive, in order; none after [DONE].
        let others = |stream: &[u8]| {
            let events = events(stream);
            let end = events.iter().position(|e| e == b"[DONE]").map_or(events.len(), |p| p + 1);
            events[..end]
                .iter()
                .filter(|e| serde_json::from_slice::<Value>(e).is_err())
                .cloned()
                .collect::<Vec<_>>()
        };
        prop_assert_eq!(others(&output), others(&input));
        let comments = |stream: &[u8], upto: Option<usize>| {
            let text = String::from_utf8_lossy(stream);
            let end = upto.unwrap_or(text.len());
            text[..end].matches(": ping").count()
        };
        let input_done = String::from_utf8_lossy(&input).find("[DONE]");
        prop_assert_eq!(comments(&output, None), comments(&input, input_done));
        // With nothing to fix, the output is the input byte for byte, up to [DONE].
        if report.is_empty() {
            if input_done.is_some() {
                let body = output.trim_ascii_end();
                let tail = &output[body.len()..];
                prop_assert!(input.starts_with(&output));
                prop_assert!(body.ends_with(b"[DONE]"));
                prop_assert!(matches!(tail, b"\n\n" | b"\r\r" | b"\r\n\r\n"), "{:?}", tail);
            } else {
                prop_assert_eq!(&output, &input);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_chunking_never_matters(
        input in prop::collection::vec(
            prop_oneof![
                4 => prop::sample::select(b"data: {}[]\"\r\n:tool_calls,stop".to_vec()),
                1 => any::<u8>(),
            ],
            0..300,
        ),
        points in prop::collection::vec(any::<usize>(), 0..6),
        limits in limits(),
    ) {
        let tools = ToolContext::default();
        let whole = rewrite_chunks(&[&input], &tools, limits);
        let split = rewrite_chunks(&split_at_points(&input, &points), &tools, limits);
        prop_assert_eq!(split, whole);
    }
}

fn text_block() -> impl Strategy<Value = Value> {
    prop_oneof![Just(""), Just(" \n"), Just("hi")].prop_map(|t| json!({"type": "text", "text": t}))
}

fn block() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => text_block(),
        2 => (0..3u8).prop_map(|i| json!({"type": "tool_use", "id": format!("t{i}"), "name": "f", "input": {}})),
        2 => ((0..3u8), prop::collection::vec(text_block(), 0..3)).prop_map(|(i, content)| {
            json!({"type": "tool_result", "tool_use_id": format!("t{i}"), "content": content})
        }),
        1 => Just(json!({"type": "thinking", "thinking": "hmm", "signature": "s"})),
        1 => Just(json!({"type": "image", "source": {}})),
    ]
}

fn message() -> impl Strategy<Value = Value> {
    let content = prop_oneof![
        Just(Value::Null),
        prop_oneof![Just(""), Just("  "), Just("text")].prop_map(|t| json!(t)),
        prop::collection::vec(block(), 0..4).prop_map(Value::Array),
    ];
    let calls = prop::collection::vec(0..3u8, 0..3).prop_map(|ids| {
        ids.into_iter()
            .map(|i| json!({"id": format!("t{i}"), "type": "function", "function": {"name": "f", "arguments": "{}"}}))
            .collect::<Vec<_>>()
    });
    (0..4u8, content, calls, 0..3u8).prop_map(|(role, content, calls, id)| match role {
        0 => json!({"role": "user", "content": content}),
        1 if calls.is_empty() => json!({"role": "assistant", "content": content}),
        1 => json!({"role": "assistant", "content": content, "tool_calls": calls}),
        2 => json!({"role": "tool", "tool_call_id": format!("t{id}"), "content": "out"}),
        _ => json!({"role": "system", "content": content}),
    })
}

/// Schemas with keywords in schema position and as property names.
fn schema() -> impl Strategy<Value = Value> {
    let names = prop::sample::select(vec![
        "path",
        "pattern",
        "minLength",
        "additionalProperties",
        "$schema",
        "$id",
        "items",
    ]);
    let leaf = prop_oneof![
        Just(json!({"type": "string", "pattern": "^a", "minLength": 1})),
        Just(json!({"type": "integer", "$comment": "c"})),
        Just(json!(true)),
    ];
    leaf.prop_recursive(3, 24, 4, move |inner| {
        let names = names.clone();
        prop_oneof![
            (
                prop::collection::btree_map(names, inner.clone(), 0..4),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(|(properties, extra, strict)| {
                    let required: Vec<&str> = properties
                        .keys()
                        .copied()
                        .chain(extra.then_some("ghost"))
                        .collect();
                    let mut schema =
                        json!({"type": "object", "properties": properties, "required": required});
                    if strict {
                        schema["additionalProperties"] = json!(false);
                        schema["$schema"] = json!("https://json-schema.org/draft/2020-12/schema");
                    }
                    schema
                }),
            inner
                .clone()
                .prop_map(|items| json!({"type": "array", "items": items, "$id": "x"})),
            prop::collection::vec(inner, 1..3)
                .prop_map(|any_of| json!({"anyOf": any_of, "default": {"$id": 1}})),
        ]
    })
}

fn request() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(message(), 0..8),
        prop::collection::vec(schema(), 0..3),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(messages, schemas, anthropic, stream_options)| {
            let tools: Vec<Value> = schemas
                .into_iter()
                .enumerate()
                .map(|(i, schema)| {
                    if anthropic {
                        json!({"name": format!("tool{i}"), "input_schema": schema})
                    } else {
                        json!({"type": "function", "function": {"name": format!("tool{i}"), "parameters": schema}})
                    }
                })
                .collect();
            let mut request = json!({"model": "m", "messages": messages, "tools": tools});
            if stream_options {
                request["stream_options"] = json!({"include_usage": true});
            }
            request
        })
}

/// Every property name in schema position, with its path.
fn property_names(schema: &Value, path: &str, names: &mut Vec<String>) {
    let Some(map) = schema.as_object() else {
        return;
    };
    if let Some(Value::Object(properties)) = map.get("properties") {
        for (name, sub) in properties {
            let path = format!("{path}/{name}");
            names.push(path.clone());
            property_names(sub, &path, names);
        }
    }
    if let Some(items) = map.get("items") {
        property_names(items, &format!("{path}[]"), names);
    }
    for (i, sub) in map
        .get("anyOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        property_names(sub, &format!("{path}|{i}"), names);
    }
}

fn all_property_names(request: &Value) -> Vec<String> {
    let mut names = Vec::new();
    for tool in request["tools"].as_array().into_iter().flatten() {
        let schema = tool
            .get("input_schema")
            .unwrap_or(&tool["function"]["parameters"]);
        property_names(schema, "", &mut names);
    }
    names
}

proptest! {
    #![proptest_config(config(256))]

    /// The shortcuts for `*` and `*family*` globs agree with the general matcher, case and
    /// all, on patterns and names from a small alphabet where they often meet.
    #[test]
    fn glob_shortcuts_agree_with_the_general_match(
        pattern in "[*?aAbB-]{0,6}",
        name in "[aAbBcC-]{0,10}",
    ) {
        prop_assume!(!pattern.trim().is_empty());
        let glob = super::rules::Glob::try_from(pattern.clone()).unwrap();
        let general = super::rules::glob_match(pattern.to_ascii_lowercase().as_bytes(), name.as_bytes());
        prop_assert_eq!(glob.matches(&name), general, "{} against {}", pattern, name);
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn sanitising_settles_and_keeps_properties(original in request()) {
        let mut once = original.clone();
        let report = sanitize_request(&mut once);
        prop_assert_eq!(report.is_empty(), once == original);
        let mut twice = once.clone();
        prop_assert!(sanitize_request(&mut twice).is_empty());
        prop_assert_eq!(&twice, &once);
        prop_assert_eq!(all_property_names(&once), all_property_names(&original));
        // `stream_options` belongs to the model rules: the general pass keeps it.
        prop_assert_eq!(once.get("stream_options"), original.get("stream_options"));

        // Whatever the text rules left, no empty text and no empty non-tool message remains.
        for message in once["messages"].as_array().unwrap() {
            if message["role"] != "tool" {
                let has_calls = message.get("tool_calls").is_some();
                let empty = match &message["content"] {
                    Value::String(t) => t.trim().is_empty(),
                    Value::Array(blocks) => blocks.is_empty(),
                    _ => true,
                };
                prop_assert!(!empty || has_calls, "{}", message);
            }
            for block in message["content"].as_array().into_iter().flatten() {
                if block["type"] == "text" {
                    prop_assert!(!block["text"].as_str().unwrap().trim().is_empty());
                }
            }
        }

        let bytes = serde_json::to_vec(&original).unwrap();
        let outcome = sanitize_request_bytes(&bytes);
        prop_assert_eq!(&outcome.report, &report);
        match outcome.body {
            None => prop_assert!(report.is_empty()),
            Some(body) => {
                let parsed: Value = serde_json::from_slice(&body).unwrap();
                prop_assert_eq!(parsed, once);
            }
        }
    }

    #[test]
    fn sanitising_bytes_never_panics(body in prop::collection::vec(any::<u8>(), 0..200)) {
        let outcome = sanitize_request_bytes(&body);
        if let Some(new_body) = outcome.body {
            prop_assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&new_body).is_ok());
            if serde_json::from_slice::<Value>(&body).is_ok() {
                prop_assert!(serde_json::from_slice::<Value>(&new_body).is_ok());
            }
        }
    }
}

/// JSON text as written, so that an object may give a key twice (a `Value` keeps the last).
#[derive(Clone, Debug)]
pub(crate) enum Json {
    Leaf(Value),
    Array(Vec<Json>),
    Object(Vec<(&'static str, Json)>),
}

impl Json {
    fn write(&self, out: &mut String) {
        self.write_spaced(out, "");
    }

    /// [`Json::write`], with `space` after every bracket, comma and colon and before every
    /// closing bracket.
    pub(crate) fn write_spaced(&self, out: &mut String, space: &str) {
        match self {
            Json::Leaf(value) => out.push_str(&value.to_string()),
            Json::Array(items) => {
                out.push('[');
                out.push_str(space);
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        out.push_str(space);
                    }
                    item.write_spaced(out, space);
                }
                out.push_str(space);
                out.push(']');
            }
            Json::Object(entries) => {
                out.push('{');
                out.push_str(space);
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        out.push_str(space);
                    }
                    out.push_str(&json!(key).to_string());
                    out.push_str(space);
                    out.push(':');
                    out.push_str(space);
                    value.write_spaced(out, space);
                }
                out.push_str(space);
                out.push('}');
            }
        }
    }
}

/// The keys of a message and its blocks and calls that the rules read.
pub(crate) const MESSAGE_KEYS: &[&str] = &[
    "role",
    "content",
    "type",
    "text",
    "id",
    "tool_use_id",
    "tool_call_id",
    "tool_calls",
    "function_call",
];

/// Any JSON made of the words the rules look at, so that the shapes the rules care about turn
/// up in every odd combination: a key where a value is expected, `null` for a list, a key
/// given twice, and so on.
pub(crate) fn vocabulary_json() -> impl Strategy<Value = Json> {
    const TOOL_KEYS: &[&str] = &[
        "function",
        "name",
        "parameters",
        "input_schema",
        "properties",
        "required",
        "items",
        "anyOf",
        "patternProperties",
        "$defs",
        "not",
        "$schema",
        "$id",
        "additionalProperties",
        "default",
        "messages",
        "system",
        "tools",
        "stream_options",
    ];
    let keys: Vec<&str> = MESSAGE_KEYS.iter().chain(TOOL_KEYS).copied().collect();
    const WORDS: &[&str] = &[
        "",
        " ",
        "x",
        "user",
        "assistant",
        "tool",
        "function",
        "text",
        "tool_use",
        "tool_result",
        "c1",
        "c2",
        "a",
        "#/a",
        "other",
    ];
    let leaf = prop_oneof![
        3 => prop::sample::select(WORDS).prop_map(|w| Json::Leaf(json!(w))),
        1 => Just(Json::Leaf(Value::Null)),
        1 => any::<bool>().prop_map(|b| Json::Leaf(Value::Bool(b))),
        1 => (0..3u8).prop_map(|n| Json::Leaf(json!(n))),
    ];
    leaf.prop_recursive(5, 64, 5, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Json::Array),
            prop::collection::vec((prop::sample::select(keys.clone()), inner), 0..5)
                .prop_map(Json::Object),
        ]
    })
}

fn vocabulary_request() -> impl Strategy<Value = String> {
    prop::collection::vec(
        (
            prop::sample::select(&["messages", "system", "tools", "stream_options", "model"][..]),
            vocabulary_json(),
        ),
        0..4,
    )
    .prop_map(|entries| {
        let mut text = String::new();
        Json::Object(entries).write(&mut text);
        text
    })
}

/// Tool-call exchanges where an object may give `role`, `id` or `tool_call_id` twice: which
/// message is the assistant one, and which calls it made, is then up to the last one given.
fn duplicate_key_request() -> impl Strategy<Value = String> {
    let message = (
        0..3u8,
        prop::collection::vec((0..3u8, prop::option::of(0..3u8)), 0..3),
        0..3u8,
        prop::option::of(0..3u8),
        prop::option::of(0..3u8),
    )
        .prop_map(|(role, calls, result, second_result, second_role)| {
            let roles = ["user", "assistant", "tool"];
            let string = |s: String| Json::Leaf(Value::String(s));
            let mut entries = vec![("role", string(roles[usize::from(role)].to_owned()))];
            if let Some(second) = second_role {
                entries.push(("role", string(roles[usize::from(second)].to_owned())));
            }
            match role {
                1 => {
                    let calls = calls
                        .into_iter()
                        .map(|(id, second_id)| {
                            let mut call = vec![("id", string(format!("c{id}")))];
                            if let Some(second) = second_id {
                                call.push(("id", string(format!("c{second}"))));
                            }
                            Json::Object(call)
                        })
                        .collect();
                    entries.push(("content", string("a".to_owned())));
                    entries.push(("tool_calls", Json::Array(calls)));
                }
                2 => {
                    entries.push(("tool_call_id", string(format!("c{result}"))));
                    if let Some(second) = second_result {
                        entries.push(("tool_call_id", string(format!("c{second}"))));
                    }
                    entries.push(("content", string("r".to_owned())));
                }
                _ => entries.push(("content", string("q".to_owned()))),
            }
            Json::Object(entries)
        });
    prop::collection::vec(message, 0..8).prop_map(|messages| {
        let mut text = String::new();
        Json::Object(vec![("messages", Json::Array(messages))]).write(&mut text);
        text
    })
}

/// The raw-body paths against the rules on a parsed `Value`: the quick check calls a request
/// clean only when the rules change nothing, and [`sanitize_request_bytes`] and a
/// [`RequestSanitizer`] (asked twice, so the second answer comes from what it remembers) give
/// the same report, tools and request as the rules.
fn check_raw_paths(bytes: &[u8]) -> Result<(), TestCaseError> {
    let original: &Value = &serde_json::from_slice(bytes).unwrap();
    let mut full = original.clone();
    let report = sanitize_request(&mut full);
    let tools = ToolContext::from_request(original);
    if let Some(quick) = clean_request(bytes) {
        prop_assert!(
            report.is_empty(),
            "called clean, but {:?}: {}",
            report,
            original
        );
        prop_assert_eq!(&quick, &tools);
    }
    let sanitizer = RequestSanitizer::new();
    for outcome in [
        sanitize_request_bytes(bytes),
        sanitizer.sanitize(bytes),
        sanitizer.sanitize(bytes),
    ] {
        prop_assert_eq!(&outcome.report, &report, "{}", original);
        prop_assert_eq!(&outcome.tools, &tools);
        let sent = match &outcome.body {
            Some(body) => serde_json::from_slice::<Value>(body).unwrap(),
            None => original.clone(),
        };
        prop_assert_eq!(outcome.body.is_none(), report.is_empty());
        // Key order included: the request goes out in the order it came.
        prop_assert_eq!(
            serde_json::to_string(&sent).unwrap(),
            serde_json::to_string(&full).unwrap()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn raw_paths_agree_with_the_rules(original in request()) {
        check_raw_paths(&serde_json::to_vec(&original).unwrap())?;
        // And every request the rules have settled takes the quick path.
        let mut settled = original;
        sanitize_request(&mut settled);
        prop_assert!(
            clean_request(&serde_json::to_vec(&settled).unwrap()).is_some(),
            "settled but not quick: {}", settled
        );
    }

    #[test]
    fn raw_paths_agree_on_odd_shapes(original in vocabulary_request()) {
        check_raw_paths(original.as_bytes())?;
    }
}

proptest! {
    // Cheap cases, and the combinations that matter are rare: run many.
    #![proptest_config(config(3000))]

    #[test]
    fn raw_paths_agree_with_keys_given_twice(original in duplicate_key_request()) {
        check_raw_paths(original.as_bytes())?;
    }
}

/// A chat request as agents send it to a given model, with the fields the built-in rules know
/// of here and there: `stream`, `stream_options`, `reasoning_effort`, `verbosity`, and
/// `reasoning_content` on assistant messages.
fn ruled_request() -> impl Strategy<Value = (Value, &'static str)> {
    (
        request(),
        prop::sample::select(
            &[
                "databricks-gemini-2-5-pro",
                "databricks-claude-sonnet-4-5",
                "databricks-gpt-5",
                "databricks-meta-llama-3-3-70b-instruct",
            ][..],
        ),
        any::<(bool, bool, bool, bool)>(),
    )
        .prop_map(
            |(mut request, model, (stream, effort, verbosity, reasoning))| {
                request["model"] = json!(model);
                if stream {
                    request["stream"] = json!(true);
                }
                if effort {
                    request["reasoning_effort"] = json!("high");
                }
                if verbosity {
                    request["verbosity"] = json!("low");
                }
                if reasoning {
                    for message in request["messages"].as_array_mut().unwrap() {
                        if message["role"] == "assistant" {
                            message["reasoning_content"] = json!("thought");
                        }
                    }
                }
                (request, model)
            },
        )
}

proptest! {
    #![proptest_config(config(128))]

    /// The model rules on raw bytes agree with the rules on a parsed request: what a matching
    /// rule names is gone, everything else is as the general pass leaves it, usage is asked for
    /// exactly when the request streams without it and the model keeps `stream_options`, and a
    /// second pass changes nothing.
    #[test]
    fn model_rules_remove_what_they_name_and_settle(
        (original, model) in ruled_request(),
        inject in any::<bool>(),
    ) {
        use super::{Mode, ModelRules, RequestContext};
        let rules = ModelRules::builtin();
        let context = RequestContext { inject_stream_usage: inject, ..RequestContext::new(Mode::Chat) };
        let sanitizer = RequestSanitizer::new();
        let bytes = serde_json::to_vec(&original).unwrap();
        let outcome = sanitizer.sanitize_for(&bytes, &rules, &context);
        let sent: Value = match &outcome.body {
            Some(body) => serde_json::from_slice(body).unwrap(),
            None => original.clone(),
        };
        prop_assert_eq!(outcome.body.is_none(), outcome.report.is_empty());

        // The same rules on the parsed request, then the general pass.
        let removals = rules.removals(Mode::Chat, Some(model));
        let mut expected = original.clone();
        let mut report = super::FilterReport::default();
        super::rules::apply_to_value(expected.as_object_mut().unwrap(), &removals, inject, &mut report);
        report.merge(&sanitize_request(&mut expected));
        prop_assert_eq!(&sent, &expected);
        prop_assert_eq!(&outcome.report, &report);

        let gemini = model.contains("gemini");
        prop_assert_eq!(
            sent.get("stream_options").is_some(),
            !gemini && (original.get("stream_options").is_some()
                || (inject && original.get("stream") == Some(&json!(true))))
        );
        if model.contains("claude") {
            prop_assert!(sent.get("reasoning_effort").is_none());
        } else {
            prop_assert_eq!(sent.get("reasoning_effort"), original.get("reasoning_effort"));
        }
        if !model.contains("gpt-5") {
            prop_assert!(sent.get("verbosity").is_none());
        }
        if !model.contains("llama") {
            for message in sent["messages"].as_array().unwrap() {
                prop_assert!(message.get("reasoning_content").is_none());
            }
        }

        let again = sanitizer.sanitize_for(&serde_json::to_vec(&sent).unwrap(), &rules, &context);
        prop_assert!(again.body.is_none(), "not settled: {:?}", again.report);
    }

    /// Gemini's native requests lose exactly the `id` of their function calls and responses.
    #[test]
    fn gemini_native_requests_lose_only_function_ids(
        ids in prop::collection::vec(any::<(bool, bool)>(), 0..6),
        text in "[a-z ]{0,8}",
    ) {
        use super::{Mode, ModelRules, RequestContext};
        let parts: Vec<Value> = ids
            .iter()
            .enumerate()
            .map(|(i, &(call, with_id))| {
                let key = if call { "functionCall" } else { "functionResponse" };
                let mut inner = json!({"name": format!("f{i}"), "args": {"id": i}});
                if with_id {
                    inner["id"] = json!(format!("c{i}"));
                }
                json!({ key: inner })
            })
            .chain([json!({"text": text})])
            .collect();
        let original = json!({"contents": [{"role": "model", "parts": parts}], "generationConfig": {}});
        let bytes = serde_json::to_vec(&original).unwrap();
        let context = RequestContext { model: Some("databricks-gemini-2-5-pro"), ..RequestContext::new(Mode::Gemini) };
        let outcome = RequestSanitizer::new().sanitize_for(&bytes, &ModelRules::builtin(), &context);
        let with_id = ids.iter().filter(|(_, with_id)| *with_id).count() as u64;
        prop_assert_eq!(outcome.report.get(FilterAction::ModelFieldRemoved), with_id);
        let sent: Value = match outcome.body {
            Some(body) => serde_json::from_slice(&body).unwrap(),
            None => original.clone(),
        };
        let mut expected = original;
        for part in expected["contents"][0]["parts"].as_array_mut().unwrap() {
            for key in ["functionCall", "functionResponse"] {
                if let Some(inner) = part.get_mut(key).and_then(Value::as_object_mut) {
                    inner.shift_remove("id");
                }
            }
        }
        prop_assert_eq!(sent, expected);
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// However a stream is cut into chunks, and whatever line ends it uses, the usage read from
    /// it is the same, and it is the usage its events report.
    #[test]
    fn usage_does_not_depend_on_chunking(
        input in 0u64..100_000,
        cached in 0u64..1000,
        deltas in prop::collection::vec(0u64..5000, 1..6),
        eol in prop::sample::select(&["\n", "\r\n", "\r"][..]),
        points in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        use super::{Mode, Usage, UsageScanner};
        let mut events = vec![
            format!("event: message_start{eol}data: {}", json!({"type": "message_start",
                "message": {"usage": {"input_tokens": input, "cache_read_input_tokens": cached, "output_tokens": 1}}})),
            format!("event: ping{eol}data: {}", json!({"type": "ping"})),
        ];
        let mut output = 0;
        for delta in &deltas {
            output += delta;
            events.push(format!("event: message_delta{eol}data: {}",
                json!({"type": "message_delta", "delta": {}, "usage": {"output_tokens": output}})));
        }
        events.push(format!("event: message_stop{eol}data: {}", json!({"type": "message_stop"})));
        let stream: String = events.iter().map(|e| format!("{e}{eol}{eol}")).collect();
        let bytes = stream.as_bytes();
        let mut cuts: Vec<usize> = points.iter().map(|i| i.index(bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut scanner = UsageScanner::new(Mode::Anthropic);
        let mut from = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            scanner.push(&bytes[from..cut]);
            from = cut;
        }
        prop_assert_eq!(
            scanner.finish(),
            Some(Usage { input: input + cached, output, cached })
        );
    }
}

/// JSON whose strings hold what a structural scan could trip on: quotes, backslashes,
/// brackets, commas and escapes.
fn tricky_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        "[\\[\\]{}\",\\\\ a\n\u{e9}:]{0,6}".prop_map(Value::String),
        any::<i32>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |x| x.is_finite())
            .prop_map(|x| json!(x)),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec(("[a-z\\]\"]{0,3}", inner), 0..5)
                .prop_map(|entries| Value::Object(entries.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config(512))]

    /// The structural scan cuts a list exactly where serde_json does, however it is spaced.
    #[test]
    fn elements_agree_with_the_parser(
        items in prop::collection::vec(tricky_json(), 0..6),
        pretty in any::<bool>(),
    ) {
        let list = Value::Array(items);
        let text = if pretty {
            serde_json::to_string_pretty(&list).unwrap()
        } else {
            serde_json::to_string(&list).unwrap()
        };
        let raw: &serde_json::value::RawValue = serde_json::from_str(&text).unwrap();
        let parsed: Vec<&serde_json::value::RawValue> = serde_json::from_str(&text).unwrap();
        let parsed: Vec<&str> = parsed.iter().map(|raw| raw.get()).collect();
        prop_assert_eq!(elements(raw.get()), Some(parsed));
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Taking apart an object serde_json has checked, without checking it again, gives what
    /// serde_json gives: the same keys, unescaped, and the same values; and neither takes an
    /// object that gives a key twice.
    #[test]
    fn checked_members_agree_with_the_parser(
        vocabulary in vocabulary_json(),
        tricky in tricky_json(),
        space in prop::sample::select(&["", " ", "\n\t "][..]),
        escape_keys in any::<bool>(),
    ) {
        let mut written = String::new();
        vocabulary.write_spaced(&mut written, space);
        let tricky = if space.is_empty() {
            tricky.to_string()
        } else {
            serde_json::to_string_pretty(&tricky).unwrap()
        };
        for mut text in [written, tricky] {
            if escape_keys {
                text = text.replace("\"role\"", "\"\\u0072ole\"");
            }
            let parsed = members(text.as_bytes()).map(|members| {
                members.into_iter().map(|(key, raw)| (key, raw.get())).collect::<Vec<_>>()
            });
            prop_assert_eq!(checked_members(&text), parsed, "{}", text);
        }
    }

    /// Whether a string holds more than whitespace, read from its JSON text, is what serde's
    /// unescaping and `trim` say, escapes and all.
    #[test]
    fn is_text_agrees_with_the_parser(
        text in "[ \t\n\u{a0}\u{2003}\u{8}\u{c}\u{1}\"\\\\/ax]{0,4}",
        spaces_as_escapes in any::<bool>(),
    ) {
        let mut json = serde_json::to_string(&text).unwrap();
        if spaces_as_escapes {
            json = json.replace(' ', "\\u0020");
        }
        prop_assert_eq!(is_text(&json), !text.trim().is_empty(), "{}", json);
    }
}

/// JSON made of the words usage is read from, in every odd combination: counts that are not
/// integers, `null` where an object is expected, an object inside a count, a key given twice.
fn usage_json() -> impl Strategy<Value = Json> {
    const KEYS: &[&str] = &[
        "usage",
        "response",
        "message",
        "usageMetadata",
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "prompt_tokens_details",
        "input_tokens_details",
        "cached_tokens",
        "promptTokenCount",
        "candidatesTokenCount",
        "thoughtsTokenCount",
        "cachedContentTokenCount",
        "choices",
    ];
    let leaf = prop_oneof![
        4 => (0..50u64).prop_map(|n| Json::Leaf(json!(n))),
        1 => Just(Json::Leaf(Value::Null)),
        1 => any::<bool>().prop_map(|b| Json::Leaf(Value::Bool(b))),
        1 => (-3..0i64).prop_map(|n| Json::Leaf(json!(n))),
        1 => Just(Json::Leaf(json!(2.5))),
        1 => prop::sample::select(&["usage", "7"][..]).prop_map(|w| Json::Leaf(json!(w))),
    ];
    leaf.prop_recursive(4, 48, 5, |inner| {
        prop_oneof![
            1 => prop::collection::vec(inner.clone(), 0..3).prop_map(Json::Array),
            4 => prop::collection::vec((prop::sample::select(KEYS), inner), 0..6)
                .prop_map(Json::Object),
        ]
    })
}

/// A member of an answer shaped the way usage is found in one most of the time: counts, an
/// object holding counts as its `usage`, or `null`; and at times any shape at all.
fn usage_member() -> impl Strategy<Value = Json> {
    const COUNT_KEYS: &[&str] = &[
        "prompt_tokens",
        "completion_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "prompt_tokens_details",
        "input_tokens_details",
        "promptTokenCount",
        "candidatesTokenCount",
        "thoughtsTokenCount",
        "cachedContentTokenCount",
    ];
    let count = prop_oneof![
        4 => (0..50u64).prop_map(|n| Json::Leaf(json!(n))),
        1 => Just(Json::Leaf(Value::Null)),
        1 => (0..50u64).prop_map(|n| Json::Object(vec![("cached_tokens", Json::Leaf(json!(n)))])),
    ];
    let counts = prop::collection::vec((prop::sample::select(COUNT_KEYS), count), 0..5)
        .prop_map(Json::Object);
    let nested_usage = prop_oneof![
        3 => counts.clone(),
        1 => Just(Json::Leaf(Value::Null)),
        1 => Just(Json::Leaf(json!("usage"))),
    ];
    let nested = prop::collection::vec(
        (prop::sample::select(&["usage", "id"][..]), nested_usage),
        0..3,
    )
    .prop_map(Json::Object);
    prop_oneof![
        3 => counts,
        3 => nested,
        2 => Just(Json::Leaf(Value::Null)),
        1 => usage_json(),
    ]
}

/// Usage as it was read through a `serde_json::Value` of the members that can hold it: the
/// reference [`super::usage_of_json`] must agree with.
pub(crate) fn usage_through_a_value(mode: super::Mode, body: &[u8]) -> Option<super::Usage> {
    use super::{Mode, Usage};

    #[derive(serde::Deserialize)]
    struct UsageMembers {
        usage: Option<Value>,
        response: Option<Value>,
        message: Option<Value>,
        #[serde(rename = "usageMetadata")]
        usage_metadata: Option<Value>,
    }
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    if !contains(b"usage") && !contains(b"\\u") {
        return None;
    }
    let members: UsageMembers = serde_json::from_slice(body).ok()?;
    let value: Value = Value::Object(
        [
            ("usage", members.usage),
            ("response", members.response),
            ("message", members.message),
            ("usageMetadata", members.usage_metadata),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_owned(), value?)))
        .collect(),
    );
    let openai = |usage: &Value| {
        let usage = usage.as_object()?;
        let count = |name: &str| usage.get(name).and_then(Value::as_u64);
        let input = count("prompt_tokens").or_else(|| count("input_tokens"))?;
        let output = count("completion_tokens")
            .or_else(|| count("output_tokens"))
            .unwrap_or(0);
        let cached = ["prompt_tokens_details", "input_tokens_details"]
            .iter()
            .find_map(|details| usage.get(*details)?.get("cached_tokens")?.as_u64())
            .unwrap_or(0);
        Some(Usage {
            input,
            output,
            cached,
        })
    };
    match mode {
        Mode::Chat | Mode::Responses => value
            .get("usage")
            .or_else(|| value.get("response")?.get("usage"))
            .and_then(openai),
        Mode::Anthropic => {
            let usage = value
                .get("message")
                .and_then(|message| message.get("usage"))
                .or_else(|| value.get("usage"));
            let Some(Value::Object(usage)) = usage else {
                return None;
            };
            let count = |name: &str| usage.get(name).and_then(Value::as_u64);
            let mut current = Usage::default();
            let parts = [
                count("input_tokens"),
                count("cache_creation_input_tokens"),
                count("cache_read_input_tokens"),
            ];
            if parts.iter().any(Option::is_some) {
                current.input = parts.iter().flatten().sum();
                current.cached = parts[2].unwrap_or(0);
            }
            if let Some(output) = count("output_tokens") {
                current.output = output;
            }
            Some(current)
        }
        Mode::Gemini => {
            let usage = value.get("usageMetadata")?;
            let count = |name: &str| usage.get(name).and_then(Value::as_u64);
            Some(Usage {
                input: count("promptTokenCount")?,
                output: count("candidatesTokenCount").unwrap_or(0)
                    + count("thoughtsTokenCount").unwrap_or(0),
                cached: count("cachedContentTokenCount").unwrap_or(0),
            })
        }
        Mode::Passthrough => None,
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// Usage read without building a `Value` is the usage a `Value` of the same answer gives,
    /// in every mode, for any shape of the members it is read from, keys escaped or not.
    #[test]
    fn usage_agrees_with_reading_a_value(
        members in prop::collection::vec(prop::option::of(usage_member()), 4),
        again in prop::option::of((
            prop::sample::select(&["usage", "response", "message", "usageMetadata"][..]),
            usage_member(),
        )),
        escape_keys in any::<bool>(),
    ) {
        use super::{Mode, usage_of_json};
        let keys = ["usage", "response", "message", "usageMetadata"];
        let mut entries: Vec<(&'static str, Json)> = vec![("id", Json::Leaf(json!("x")))];
        entries.extend(keys.into_iter().zip(members).filter_map(|(key, member)| Some((key, member?))));
        // At times a key given twice, which no reader takes.
        entries.extend(again);
        let mut text = String::new();
        Json::Object(entries).write(&mut text);
        if escape_keys {
            text = text
                .replace("\"usage\"", "\"\\u0075sage\"")
                .replace("\"output_tokens\"", "\"\\u006futput_tokens\"");
        }
        for mode in [Mode::Chat, Mode::Responses, Mode::Anthropic, Mode::Gemini, Mode::Passthrough] {
            prop_assert_eq!(
                usage_of_json(mode, text.as_bytes()),
                usage_through_a_value(mode, text.as_bytes()),
                "{} {}", mode, text
            );
        }
    }
}
