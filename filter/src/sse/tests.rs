use serde_json::json;

use super::*;
use crate::test_support::*;

fn declared() -> ToolContext {
    ToolContext::new(["read_file", "bash"])
}

fn counts(report: &FilterReport) -> Vec<(&'static str, u64)> {
    report.iter().collect()
}

/// A streamed `databricks-tool-call` whose arguments start with `"name"`.
fn streamed_call(fragments: &[&str]) -> String {
    let mut stream = sse(&content_chunk("Let me look."));
    stream += &sse(&call_open(0, DATABRICKS_TOOL_CALL, ""));
    for fragment in fragments {
        stream += &sse(&call_args(0, fragment));
    }
    stream += &sse(&finish_chunk("stop"));
    stream += DONE;
    stream
}

#[test]
fn unchanged_streams_pass_byte_for_byte() {
    let openai = [
        sse(&content_chunk("Hello")),
        ": keep-alive\r\n\r\n".to_owned(),
        "event: message\r\nid: 7\r\nretry: 1000\r\ndata: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}]}\r\n\r\n".to_owned(),
        "data:{\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\r\r".to_owned(),
        "\n\n".to_owned(),
        DONE.to_owned(),
    ]
    .concat();
    let anthropic = [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"m\",\"role\":\"assistant\",\"content\":[]}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"tool_use\",\"id\":\"t\",\"name\":\"databricks-tool-call\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"name\\\": \\\"bash\\\"}\"}}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"stop\"}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    ]
    .concat();
    let not_json =
        "data: hello\ndata: \"tool_calls\" databricks-tool-call\n\nevent: ping\n\n\n\ndata\n\n";
    for stream in [openai.as_str(), anthropic.as_str(), not_json] {
        let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
        assert_eq!(String::from_utf8(out).unwrap(), stream);
        assert!(report.is_empty(), "{report:?}");
    }
}

#[test]
fn unchanged_events_go_out_as_soon_as_complete() {
    let mut rewriter = SseRewriter::new(declared(), SseLimits::default());
    let mut out = Vec::new();
    let first = sse(&content_chunk("a"));
    rewriter.push(first.as_bytes(), &mut out);
    assert_eq!(out, first.as_bytes());
    rewriter.push(b"data: {\"choices\":[]}\n", &mut out);
    assert_eq!(out, first.as_bytes(), "incomplete until the blank line");
    rewriter.push(b"\n", &mut out);
    assert_eq!(out.len(), first.len() + 22);
}

#[test]
fn streamed_call_is_remapped_once_its_name_is_known() {
    let stream = streamed_call(&["{\"name\": \"read_", "file\", \"pa", "th\": \"/x\"}"]);
    let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    let view = client_view(&out);
    assert_eq!(view.text, "Let me look.");
    assert_eq!(
        view.calls[&(0, 0)],
        ("read_file".to_owned(), "{ \"path\": \"/x\"}".to_owned())
    );
    assert_eq!(view.finish_reasons, ["tool_calls"]);
    assert!(view.done && view.after_done == 0 && view.renamed == 0);
    assert_eq!(
        counts(&report),
        [("tool_name_remapped", 1), ("finish_reason_fixed", 1)]
    );
    // The content chunk before the call is untouched, and the fragments after the name are
    // forwarded as they came.
    let out = String::from_utf8(out).unwrap();
    assert!(out.starts_with(&sse(&content_chunk("Let me look."))));
    assert!(out.contains(&sse(&call_args(0, "th\": \"/x\"}"))));
}

#[test]
fn held_events_are_released_as_soon_as_the_name_is_decided() {
    let mut rewriter = SseRewriter::new(declared(), SseLimits::default());
    let mut out = Vec::new();
    rewriter.push(
        sse(&call_open(0, DATABRICKS_TOOL_CALL, "")).as_bytes(),
        &mut out,
    );
    rewriter.push(
        sse(&call_args(0, "{\"name\": \"bash\"")).as_bytes(),
        &mut out,
    );
    assert!(out.is_empty(), "held until the character after the name");
    rewriter.push(sse(&call_args(0, ", ")).as_bytes(), &mut out);
    assert_eq!(
        client_view(&out).calls[&(0, 0)],
        ("bash".to_owned(), "{ ".to_owned())
    );
    let before = out.len();
    let tail = sse(&call_args(0, "\"cmd\": \"ls\"}"));
    rewriter.push(tail.as_bytes(), &mut out);
    assert_eq!(&out[before..], tail.as_bytes());
    assert_eq!(client_view(&out).calls[&(0, 0)].1, "{ \"cmd\": \"ls\"}");
}

/// Python defect: tool arguments were sent twice (held fragments replayed after the merged
/// delta). A client must see each argument byte exactly once.
#[test]
fn regression_arguments_are_not_duplicated() {
    let fragments = ["{\"na", "me\": \"bash\", \"cmd\": ", "\"echo hi\"", "}"];
    let stream = streamed_call(&fragments);
    let (out, _) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    let view = client_view(&out);
    assert_eq!(
        view.calls[&(0, 0)],
        ("bash".to_owned(), "{ \"cmd\": \"echo hi\"}".to_owned())
    );
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.matches("echo hi").count(), 1);
    assert_eq!(text.matches("\"name\":\"bash\"").count(), 1);
}

/// Python defect: replayed events were merged into one malformed event. Every event that goes
/// out is one JSON document, and held events flushed unchanged keep their own boundaries.
#[test]
fn regression_replayed_events_stay_separate_and_well_formed() {
    let remapped = streamed_call(&["{\"name\": \"bash\", ", "\"cmd\": \"ls\"}"]);
    // A name no declared tool has: the held events go out unchanged.
    let kept = streamed_call(&["{\"name\": \"Ada\", ", "\"age\": 36}"]);
    for (stream, events_out) in [(remapped, 5), (kept, 6)] {
        let (out, _) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
        let events = events(&out);
        assert_eq!(events.len(), events_out);
        for data in &events[..events.len() - 1] {
            serde_json::from_slice::<Value>(data).expect("one JSON document per event");
        }
    }
    let kept = streamed_call(&["{\"name\": \"Ada\", ", "\"age\": 36}"]);
    let (out, report) = rewrite(kept.as_bytes(), &declared(), SseLimits::default());
    assert_eq!(
        String::from_utf8(out).unwrap(),
        kept.replace(
            &sse(&finish_chunk("stop")),
            &sse(&finish_chunk("tool_calls"))
        )
    );
    assert_eq!(counts(&report), [("finish_reason_fixed", 1)]);
}

/// Python defect: a tool call whose name and arguments came in one chunk was never remapped.
#[test]
fn regression_call_in_one_chunk_is_remapped() {
    for tools in [declared(), ToolContext::default()] {
        let stream = sse(&call_open(
            0,
            DATABRICKS_TOOL_CALL,
            "{\"name\":\"read_file\",\"path\":\"/x\"}",
        )) + &sse(&finish_chunk("stop"))
            + DONE;
        let (out, report) = rewrite(stream.as_bytes(), &tools, SseLimits::default());
        let view = client_view(&out);
        assert_eq!(
            view.calls[&(0, 0)],
            ("read_file".to_owned(), "{\"path\":\"/x\"}".to_owned())
        );
        assert_eq!(view.finish_reasons, ["tool_calls"]);
        assert_eq!(report.get(FilterAction::ToolNameRemapped), 1);
    }
}

/// Python defect: buffered events were emitted after `data: [DONE]`.
#[test]
fn regression_held_events_go_out_before_done_and_nothing_after() {
    let stream = sse(&call_open(0, DATABRICKS_TOOL_CALL, ""))
        + &sse(&call_args(0, "{\"na"))
        + DONE
        + &sse(&content_chunk("late"))
        + "data: [DONE]\n\n";
    let (out, _) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    let text = String::from_utf8(out).unwrap();
    assert!(text.ends_with(DONE), "{text}");
    assert_eq!(text.matches("[DONE]").count(), 1);
    assert!(!text.contains("late"));
    let view = client_view(text.as_bytes());
    assert_eq!(view.after_done, 0);
    assert_eq!(
        view.calls[&(0, 0)],
        (DATABRICKS_TOOL_CALL.to_owned(), "{\"na".to_owned())
    );

    let mut rewriter = SseRewriter::new(declared(), SseLimits::default());
    let mut out = Vec::new();
    rewriter.push(b"data: [DONE]\n\n", &mut out);
    assert!(rewriter.is_done());
    rewriter.push(b"data: {}\n\n", &mut out);
    rewriter.finish(&mut out);
    rewriter.push(b"data: {}\n\n", &mut out);
    assert_eq!(out, b"data: [DONE]\n\n");
}

/// Python defect: buffering had no bound.
#[test]
fn regression_holding_is_bounded() {
    // The name comes last, after more arguments than the bound allows.
    let fragments: Vec<String> = std::iter::once("{\"content\": \"".to_owned())
        .chain((0..10).map(|i| format!("line {i} ")))
        .chain(["\", \"name\": \"bash\"}".to_owned()])
        .collect();
    let fragments: Vec<&str> = fragments.iter().map(String::as_str).collect();
    let stream = streamed_call(&fragments);
    for limits in [
        SseLimits {
            max_held_events: 4,
            ..SseLimits::default()
        },
        SseLimits {
            max_held_bytes: 600,
            ..SseLimits::default()
        },
    ] {
        let (out, report) = rewrite(stream.as_bytes(), &declared(), limits);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            stream.replace(
                &sse(&finish_chunk("stop")),
                &sse(&finish_chunk("tool_calls"))
            ),
            "{limits:?}"
        );
        assert_eq!(
            counts(&report),
            [
                ("finish_reason_fixed", 1),
                ("sse_flush_unchanged_over_bound", 1)
            ]
        );
    }
    // With room to hold, the same stream is remapped.
    let (out, _) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    assert_eq!(client_view(&out).calls[&(0, 0)].0, "bash");

    let mut rewriter = SseRewriter::new(
        declared(),
        SseLimits {
            max_held_events: 3,
            ..SseLimits::default()
        },
    );
    let mut out = Vec::new();
    rewriter.push(
        sse(&call_open(0, DATABRICKS_TOOL_CALL, "{\"x\": \"")).as_bytes(),
        &mut out,
    );
    for _ in 0..3 {
        assert!(out.is_empty());
        rewriter.push(sse(&content_chunk("held")).as_bytes(), &mut out);
    }
    assert_eq!(
        events(&out).len(),
        4,
        "flushed when the fourth event would be held"
    );
}

/// Python defect: `data:` without a space and multi-line events were ignored.
#[test]
fn regression_data_without_space_and_multi_line_events() {
    let open = call_open(
        0,
        DATABRICKS_TOOL_CALL,
        "{\"name\": \"bash\", \"cmd\": \"ls\"}",
    );
    let pretty = serde_json::to_string_pretty(&open).unwrap();
    let multi_line: String = pretty.lines().map(|l| format!("data:{l}\r\n")).collect();
    let compact = open.to_string();
    for stream in [
        format!("data:{open}\n\n{DONE}"),
        format!("{multi_line}\r\n{DONE}"),
        format!(
            "event: chunk\rdata:{}\rdata: {}\r\r{DONE}",
            &compact[..10],
            &compact[10..]
        ),
    ] {
        let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
        let view = client_view(&out);
        assert_eq!(
            view.calls[&(0, 0)],
            ("bash".to_owned(), "{ \"cmd\": \"ls\"}".to_owned()),
            "{stream}"
        );
        assert_eq!(report.get(FilterAction::ToolNameRemapped), 1);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("event: chunk\ndata: {") || text.starts_with("data: {"));
    }
}

/// Python defect: a non-UTF-8 body crashed the handler.
#[test]
fn regression_non_utf8_passes_unchanged() {
    let mut stream = b"data: {\"choices\":[{\"delta\":{\"content\":\"\xff\xfe\"}}]}\n\n".to_vec();
    stream.extend_from_slice(
        b"data: {\"tool_calls\":\"\xc3\x28\", \"databricks-tool-call\"}\n\n\xff\r\n\x80: \n\n",
    );
    stream.extend_from_slice(DONE.as_bytes());
    let (out, report) = rewrite(&stream, &declared(), SseLimits::default());
    assert_eq!(out, stream);
    assert!(report.is_empty());
}

#[test]
fn finish_reason_follows_tool_calls_per_choice() {
    let two_choices = |reason0: &str, reason1: &str| {
        json!({"choices": [
            {"index": 0, "delta": {}, "finish_reason": reason0},
            {"index": 1, "delta": {}, "finish_reason": reason1}]})
    };
    let stream = sse(&content_chunk("hi"))
        + &sse(&json!({"choices": [{"index": 1, "delta": {"tool_calls": [
            {"index": 0, "id": "c", "type": "function", "function": {"name": "bash", "arguments": "{}"}}]}}]}))
        + &sse(&two_choices("stop", "stop"))
        + DONE;
    let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    assert_eq!(client_view(&out).finish_reasons, ["stop", "tool_calls"]);
    assert_eq!(counts(&report), [("finish_reason_fixed", 1)]);
    // Only the event that changed was rewritten.
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with(&(sse(&content_chunk("hi")))));

    let plain = sse(&content_chunk("hi")) + &sse(&finish_chunk("stop")) + DONE;
    let (out, report) = rewrite(plain.as_bytes(), &declared(), SseLimits::default());
    assert_eq!(out, plain.as_bytes());
    assert!(report.is_empty());
}

#[test]
fn name_after_other_arguments_is_waited_for() {
    let stream = streamed_call(&[
        "{\"path\": \"/x\", ",
        "\"line\": 3, \"na",
        "me\": \"read_file\"",
        "}",
    ]);
    let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    assert_eq!(
        client_view(&out).calls[&(0, 0)],
        (
            "read_file".to_owned(),
            "{\"path\": \"/x\", \"line\": 3}".to_owned()
        )
    );
    assert_eq!(report.get(FilterAction::ToolNameRemapped), 1);
}

#[test]
fn undeclared_or_absent_names_are_not_remapped() {
    let cases = [
        // A real argument called name, not a declared tool.
        (streamed_call(&["{\"name\": \"Ada\"}"]), declared()),
        // No name at all.
        (streamed_call(&["{\"path\": \"/x\"}"]), declared()),
        // Not an object.
        (streamed_call(&["[1, 2]"]), ToolContext::default()),
        // The request declared databricks-tool-call itself.
        (
            streamed_call(&["{\"name\": \"bash\"}"]),
            ToolContext::new([DATABRICKS_TOOL_CALL, "bash"]),
        ),
    ];
    for (stream, tools) in cases {
        let (out, report) = rewrite(stream.as_bytes(), &tools, SseLimits::default());
        let view = client_view(&out);
        assert_eq!(view.calls[&(0, 0)].0, DATABRICKS_TOOL_CALL);
        assert_eq!(counts(&report), [("finish_reason_fixed", 1)], "{stream}");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            stream.replace(
                &sse(&finish_chunk("stop")),
                &sse(&finish_chunk("tool_calls"))
            )
        );
    }
}

#[test]
fn parallel_calls_and_repeated_names() {
    let repeat = |t: u64, args: &str| {
        json!({"choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": t, "function": {"name": DATABRICKS_TOOL_CALL, "arguments": args}}]}}]})
    };
    let stream = sse(&call_open(0, DATABRICKS_TOOL_CALL, "{\"name\":"))
        + &sse(&call_open(1, DATABRICKS_TOOL_CALL, "{\"name\":\"bash\","))
        + ": holding\n\n"
        + &sse(&content_chunk("between"))
        + &sse(&repeat(0, "\"read_file\", \"path\""))
        + &sse(&repeat(1, "\"cmd\":\"ls\"}"))
        + &sse(&repeat(0, ": \"/x\"}"))
        + &sse(&finish_chunk("stop"))
        + DONE;
    let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    let view = client_view(&out);
    assert_eq!(
        view.calls[&(0, 0)],
        ("read_file".to_owned(), "{ \"path\": \"/x\"}".to_owned())
    );
    assert_eq!(
        view.calls[&(0, 1)],
        ("bash".to_owned(), "{\"cmd\":\"ls\"}".to_owned())
    );
    assert_eq!(view.text, "between");
    assert_eq!(view.renamed, 0);
    assert_eq!(view.finish_reasons, ["tool_calls"]);
    assert_eq!(
        counts(&report),
        [("tool_name_remapped", 2), ("finish_reason_fixed", 1)]
    );
    // The comment and the content chunk kept their place between the two calls.
    let text = String::from_utf8(out).unwrap();
    let comment = text.find(": holding").unwrap();
    assert!(text.find("call_1").unwrap() < comment);
    assert!(comment < text.find("between").unwrap());
}

#[test]
fn oversized_event_is_copied_through() {
    let limits = SseLimits {
        max_event_bytes: 300,
        ..SseLimits::default()
    };
    let big = call_open(
        0,
        DATABRICKS_TOOL_CALL,
        &format!("{{\"name\":\"bash\",\"cmd\":\"{}\"}}", "x".repeat(400)),
    );
    let stream = sse(&call_open(1, DATABRICKS_TOOL_CALL, ""))
        + "data: "
        + &big.to_string()
        + "\r\nid: 1\r\n\r\n"
        + &sse(&content_chunk("after"))
        + DONE;
    let (out, report) = rewrite(stream.as_bytes(), &declared(), limits);
    assert_eq!(String::from_utf8(out).unwrap(), stream);
    assert_eq!(counts(&report), [("sse_event_over_bound", 1)]);
}

#[test]
fn finish_flushes_held_and_cut_off_events() {
    let stream = sse(&call_open(0, DATABRICKS_TOOL_CALL, "{\"na")) + "data: {\"choices\"";
    let (out, report) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    assert_eq!(String::from_utf8(out).unwrap(), stream);
    assert!(report.is_empty());
}

#[test]
fn rewritten_events_keep_their_other_fields() {
    let stream = format!(
        "id: 41\nevent: chunk\n: note\ndata: {}\nretry: 5\n\n",
        call_open(0, DATABRICKS_TOOL_CALL, "{\"name\":\"bash\"}")
    );
    let (out, _) = rewrite(stream.as_bytes(), &declared(), SseLimits::default());
    let text = String::from_utf8(out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[..3], ["id: 41", "event: chunk", ": note"]);
    assert!(lines[3].starts_with("data: {"));
    assert_eq!(lines[4..], ["retry: 5", ""]);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    #[test]
    fn line_end_search_matches_a_plain_scan(bytes in proptest::collection::vec(
        proptest::prop_oneof![
            8 => proptest::prelude::any::<u8>(),
            1 => proptest::prelude::Just(b'\n'),
            1 => proptest::prelude::Just(b'\r'),
        ],
        0..64,
    )) {
        let plain = bytes.iter().position(|&b| b == b'\n' || b == b'\r');
        proptest::prop_assert_eq!(find_line_end(&bytes), plain);
    }
}

#[test]
fn rewriter_and_context_cross_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<SseRewriter>();
    send_sync::<ToolContext>();
    send_sync::<FilterReport>();
}
