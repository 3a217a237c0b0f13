//! The SSE rewriter on arbitrary bytes: it never panics, and chunking never changes its output.

#![no_main]

use fresh_filter::{SseLimits, SseRewriter, ToolContext};
use libfuzzer_sys::fuzz_target;

fn rewrite(chunks: &[&[u8]], tools: &ToolContext, limits: SseLimits) -> Vec<u8> {
    let mut rewriter = SseRewriter::new(tools.clone(), limits);
    let mut out = Vec::new();
    for chunk in chunks {
        rewriter.push(chunk, &mut out);
    }
    rewriter.finish(&mut out);
    let report = rewriter.report();
    // Nothing changed: the output is the input, at most cut after [DONE].
    if report.is_empty() {
        let input: Vec<u8> = chunks.concat();
        assert!(input.starts_with(&out));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    // The first two bytes choose the tools, the limits and where the chunks are cut.
    let [control, cut, stream @ ..] = data else {
        return;
    };
    let tools = match control % 3 {
        0 => ToolContext::default(),
        1 => ToolContext::new(["bash", "read_file"]),
        _ => ToolContext::new(["databricks-tool-call"]),
    };
    let limits = if control & 4 == 0 {
        SseLimits::default()
    } else {
        SseLimits {
            max_held_bytes: 256,
            max_held_events: 3,
            max_event_bytes: 512,
        }
    };
    let whole = rewrite(&[stream], &tools, limits);
    let step = usize::from(*cut).max(1);
    let chunks: Vec<&[u8]> = stream.chunks(step).collect();
    assert_eq!(rewrite(&chunks, &tools, limits), whole);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(rewrite(&bytes, &tools, limits), whole);
});
