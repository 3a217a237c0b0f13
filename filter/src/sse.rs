//! Incremental rewriting of chat-completion server-sent-event streams.
//!
//! Events are cut from the byte stream as the SSE format defines them (LF, CRLF or CR line ends,
//! `data:` with or without a space, several `data:` lines joined with `\n`). An event that needs
//! no change is copied out byte for byte as soon as its blank line arrives; only `data:`
//! payloads that may need a change are parsed. Hand-written rather than an SSE parser crate,
//! because those yield decoded events and lose the original bytes this forwards.

use std::mem;

use serde_json::{Map, Value};

use super::arguments::{NameScan, scan_name, without};
use super::report::{FilterAction, FilterReport};
use super::response::{ToolContext, fix_finish_reason};
use super::{DATABRICKS_TOOL_CALL, STOP, TOOL_CALL_PLACEHOLDER, TOOL_CALLS};

/// Bounds on what an [`SseRewriter`] keeps in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SseLimits {
    /// Bytes of complete events held back while a `databricks-tool-call` waits for its name.
    pub max_held_bytes: usize,
    /// Complete events held back while a `databricks-tool-call` waits for its name.
    pub max_held_events: usize,
    /// Line content of a single event; a larger event is copied through unparsed.
    pub max_event_bytes: usize,
}

impl Default for SseLimits {
    fn default() -> Self {
        SseLimits {
            max_held_bytes: 64 * 1024,
            max_held_events: 64,
            max_event_bytes: 8 * 1024 * 1024,
        }
    }
}

/// Rewrites one SSE response stream, chunk by chunk.
///
/// Fixes what [`fix_response`](super::fix_response) fixes in JSON bodies: a streamed tool call
/// named `databricks-tool-call` is held back until its arguments reveal `"name"`, then goes out
/// as one delta with the real name and the arguments received so far minus that member; later
/// argument deltas pass unchanged. `finish_reason: "stop"` becomes `"tool_calls"` on a choice
/// that made tool calls. Nothing is emitted after `data: [DONE]`.
///
/// ```
/// use fresh_filter::{SseLimits, SseRewriter, ToolContext};
///
/// let mut rewriter = SseRewriter::new(ToolContext::new(["bash"]), SseLimits::default());
/// let mut out = Vec::new();
/// rewriter.push(b"data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,", &mut out);
/// rewriter.push(b"\"function\":{\"name\":\"databricks-tool-call\",", &mut out);
/// rewriter.push(b"\"arguments\":\"{\\\"name\\\":\\\"bash\\\",\\\"cmd\\\":\\\"ls\\\"}\"}}]}}]}\n\n", &mut out);
/// rewriter.push(b"data: [DONE]\n\ndata: ignored\n\n", &mut out);
/// rewriter.finish(&mut out);
/// assert_eq!(
///     String::from_utf8(out).unwrap(),
///     "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":\
///      {\"name\":\"bash\",\"arguments\":\"{\\\"cmd\\\":\\\"ls\\\"}\"}}]}}]}\n\ndata: [DONE]\n\n"
/// );
/// assert!(rewriter.is_done());
/// ```
#[derive(Debug)]
pub struct SseRewriter {
    tools: ToolContext,
    limits: SseLimits,
    report: FilterReport,
    event: EventState,
    /// Where an LF goes when it arrives right after a CR that ended the previous push.
    pending_lf: Option<LfSink>,
    calls: CallState,
    held: Vec<HeldEvent>,
    held_bytes: usize,
    done: bool,
    ended: bool,
}

/// The event being received.
#[derive(Debug, Default)]
struct EventState {
    /// Its bytes so far, when it spans pushes: complete lines, then a partial line.
    buf: Vec<u8>,
    /// Where the partial line starts in `buf`.
    line_start: usize,
    /// Where the value of its first `data:` line is, from the start of the event. Nearly every
    /// event has one `data:` line, which is read where it lies, not copied.
    first_data: Option<std::ops::Range<usize>>,
    /// Its `data:` values joined with `\n`, once a second `data:` line arrives.
    data: Vec<u8>,
    /// Bytes of line content so far, for the event bound.
    content_len: usize,
    /// Set while an event over the bound is copied through; whether its current line has
    /// content, so that a line end right after a push boundary is not taken for a blank line.
    passthrough: Option<bool>,
}

impl EventState {
    fn reset(&mut self) {
        self.line_start = 0;
        self.first_data = None;
        self.data.clear();
        self.content_len = 0;
    }
}

/// Where the LF of a CRLF split across pushes belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LfSink {
    /// The event still being received.
    Event,
    /// Straight out, after the bytes already emitted.
    Out,
    /// The last held event.
    Held,
    /// Nowhere: the event went out rewritten, with its own line ends.
    Drop,
}

/// Per-stream tool call bookkeeping; calls are keyed by (choice index, tool call index).
#[derive(Debug, Default)]
struct CallState {
    /// Choices that made tool calls.
    tool_choices: Vec<u64>,
    /// `databricks-tool-call` calls whose events are held.
    pending: Vec<PendingCall>,
    /// Calls that were decided, with the name they were given if remapped.
    decided: Vec<(u64, u64, Option<String>)>,
}

#[derive(Debug)]
struct PendingCall {
    choice: u64,
    index: u64,
    /// The arguments text received so far.
    args: String,
    /// Position in `held` of the event that opened the call.
    first_event: usize,
    resolution: Option<Resolution>,
}

#[derive(Debug)]
enum Resolution {
    Remap {
        name: String,
        cut: std::ops::Range<usize>,
    },
    Keep,
}

#[derive(Debug)]
struct HeldEvent {
    raw: Vec<u8>,
    /// The parsed payload, for events that were parsed.
    value: Option<Value>,
    /// The payload was changed: render it instead of copying `raw`.
    modified: bool,
    /// Tool call deltas were moved out of it into an earlier event.
    merged: bool,
}

impl SseRewriter {
    /// A rewriter for one response stream to a request that declared `tools`.
    pub fn new(tools: ToolContext, limits: SseLimits) -> Self {
        SseRewriter {
            tools,
            limits,
            report: FilterReport::default(),
            event: EventState::default(),
            pending_lf: None,
            calls: CallState::default(),
            held: Vec::new(),
            held_bytes: 0,
            done: false,
            ended: false,
        }
    }

    /// Takes the next bytes of the upstream stream and appends to `out` whatever can be sent
    /// to the client now.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        let mut chunk = chunk;
        if let Some(sink) = self.pending_lf.take() {
            match chunk {
                [] => {
                    self.pending_lf = Some(sink);
                    return;
                }
                [b'\n', rest @ ..] => {
                    self.sink_lf(sink, out);
                    chunk = rest;
                }
                _ => {}
            }
        }
        if self.done || chunk.is_empty() {
            return;
        }
        if self.event.buf.is_empty() {
            // Complete events are taken straight from the chunk; only a cut-off tail is copied.
            let tail = self.feed(chunk, 0, out);
            self.event.buf.extend_from_slice(&chunk[tail..]);
        } else {
            let mut buf = mem::take(&mut self.event.buf);
            buf.extend_from_slice(chunk);
            let tail = self.feed(&buf, self.event.line_start, out);
            buf.drain(..tail);
            // Kept only while an event is cut off: an idle stream holds no buffer.
            if buf.is_empty() {
                buf = Vec::new();
            }
            self.event.buf = buf;
        }
    }

    /// Ends the stream: flushes held events, then an event cut off by the end of the stream as
    /// it came (clients discard such an event as they would have without the proxy). Nothing
    /// is emitted after `[DONE]`, and later pushes are ignored.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if self.ended {
            return;
        }
        self.ended = true;
        self.pending_lf = None;
        if self.done {
            return;
        }
        self.flush(out);
        out.append(&mut self.event.buf);
        self.event.reset();
    }

    /// What was changed so far.
    pub fn report(&self) -> &FilterReport {
        &self.report
    }

    /// Whether `data: [DONE]` was seen.
    pub fn is_done(&self) -> bool {
        self.done
    }

    fn sink_lf(&mut self, sink: LfSink, out: &mut Vec<u8>) {
        match sink {
            LfSink::Event => {
                self.event.buf.push(b'\n');
                self.event.line_start += 1;
            }
            LfSink::Out => out.push(b'\n'),
            LfSink::Held => {
                if let Some(last) = self.held.last_mut() {
                    last.raw.push(b'\n');
                }
            }
            LfSink::Drop => {}
        }
    }

    /// Parses `bytes`, whose lines before `pos` are already parsed lines of the current event,
    /// and dispatches every event completed in it. Returns where the incomplete event starts
    /// (`bytes.len()` when nothing is left to keep) and sets `line_start` relative to it.
    fn feed(&mut self, bytes: &[u8], mut pos: usize, out: &mut Vec<u8>) -> usize {
        let mut event_start = 0;
        loop {
            if self.done {
                return bytes.len();
            }
            if self.event.passthrough.is_some() {
                pos = self.pass_through(bytes, pos, out);
                if self.event.passthrough.is_some() {
                    return bytes.len();
                }
                event_start = pos;
                continue;
            }
            let Some(line) = next_line(bytes, pos) else {
                break;
            };
            if line.is_blank() {
                let sink = self.dispatch(&bytes[event_start..line.next], out);
                if line.cr_at_end {
                    self.pending_lf = Some(sink);
                }
                event_start = line.next;
            } else {
                let content = &bytes[pos..line.end];
                self.event.content_len += content.len();
                self.take_field(&bytes[event_start..line.end], pos - event_start);
                let over = self.event.content_len > self.limits.max_event_bytes;
                if over {
                    self.begin_pass_through(&bytes[event_start..line.next], false, out);
                }
                if line.cr_at_end {
                    self.pending_lf = Some(if over { LfSink::Out } else { LfSink::Event });
                }
            }
            pos = line.next;
        }
        let partial = bytes.len() - pos;
        if partial > 0 && self.event.content_len + partial > self.limits.max_event_bytes {
            self.begin_pass_through(&bytes[event_start..], true, out);
            return bytes.len();
        }
        self.event.line_start = pos - event_start;
        event_start
    }

    /// Records one non-blank line of the current event: `event[line_start..]`, where `event`
    /// holds the event so far from its start.
    fn take_field(&mut self, event: &[u8], line_start: usize) {
        let line = &event[line_start..];
        let (name, value) = match line.iter().position(|&b| b == b':') {
            Some(0) => return,
            Some(colon) => {
                let mut value = line_start + colon + 1;
                if event.get(value) == Some(&b' ') {
                    value += 1;
                }
                (&line[..colon], value..event.len())
            }
            None => (line, event.len()..event.len()),
        };
        if name == b"data" {
            let Some(first) = &self.event.first_data else {
                self.event.first_data = Some(value);
                return;
            };
            if self.event.data.is_empty() {
                self.event.data.extend_from_slice(&event[first.clone()]);
            }
            self.event.data.push(b'\n');
            self.event.data.extend_from_slice(&event[value]);
        }
    }

    fn begin_pass_through(&mut self, raw: &[u8], line_has_content: bool, out: &mut Vec<u8>) {
        self.report.bump(FilterAction::SseEventOverBound);
        // Held events came first and must go out first.
        self.flush(out);
        out.extend_from_slice(raw);
        self.event.reset();
        self.event.passthrough = Some(line_has_content);
    }

    /// Copies an oversized event through until its blank line. Returns the position after it,
    /// or `bytes.len()` with pass-through still on.
    fn pass_through(&mut self, bytes: &[u8], mut pos: usize, out: &mut Vec<u8>) -> usize {
        let mut line_has_content = self.event.passthrough.unwrap_or(false);
        while let Some(line) = next_line(bytes, pos) {
            let blank = line.is_blank() && !line_has_content;
            out.extend_from_slice(&bytes[pos..line.next]);
            if line.cr_at_end {
                self.pending_lf = Some(LfSink::Out);
            }
            pos = line.next;
            line_has_content = false;
            if blank {
                self.event.passthrough = None;
                return pos;
            }
        }
        if pos < bytes.len() {
            line_has_content = true;
            out.extend_from_slice(&bytes[pos..]);
        }
        self.event.passthrough = Some(line_has_content);
        bytes.len()
    }

    /// Handles one complete event. Returns where the LF of a split CRLF after it belongs.
    fn dispatch(&mut self, raw: &[u8], out: &mut Vec<u8>) -> LfSink {
        let joined = mem::take(&mut self.event.data);
        let data = match self.event.first_data.take() {
            Some(_) if !joined.is_empty() => Some(&joined[..]),
            Some(first) => raw.get(first),
            None => None,
        };
        self.event.reset();
        let sink = self.dispatch_event(raw, data, out);
        // A joined payload is rare: its buffer is not kept for the next event.
        sink
    }

    fn dispatch_event(&mut self, raw: &[u8], data: Option<&[u8]>, out: &mut Vec<u8>) -> LfSink {
        let Some(data) = data else {
            return self.forward(raw, out);
        };
        if data.trim_ascii() == b"[DONE]" {
            // Held events go out before [DONE]; nothing goes out after it.
            self.flush(out);
            out.extend_from_slice(raw);
            self.done = true;
            return LfSink::Out;
        }
        if !self.worth_parsing(data) {
            return self.forward(raw, out);
        }
        let mut value = match serde_json::from_slice::<Value>(data) {
            Ok(value @ Value::Object(_)) => value,
            _ => return self.forward(raw, out),
        };
        let modified = self.inspect(&mut value);
        if self.calls.pending.is_empty() {
            return if modified {
                render(raw, &value, out);
                LfSink::Drop
            } else {
                out.extend_from_slice(raw);
                LfSink::Out
            };
        }
        self.hold(raw, Some(value), modified, out)
    }

    /// Whether a payload may need a change or carry tool call state; everything else is only
    /// copied. The tokens are searched in the JSON text, where they cannot hide inside strings.
    fn worth_parsing(&self, data: &[u8]) -> bool {
        // JSON is UTF-8: anything else is forwarded as it came.
        let Ok(text) = std::str::from_utf8(data) else {
            return false;
        };
        let text = text.as_bytes();
        if !self.calls.pending.is_empty() {
            return TOOL_CALLS.is_in(text) || STOP.is_in(text);
        }
        TOOL_CALLS.is_in(text)
            || TOOL_CALL_PLACEHOLDER.is_in(text)
            || (!self.calls.tool_choices.is_empty() && STOP.is_in(text))
    }

    /// Emits an event unchanged, or holds it behind held events.
    fn forward(&mut self, raw: &[u8], out: &mut Vec<u8>) -> LfSink {
        if self.calls.pending.is_empty() {
            out.extend_from_slice(raw);
            LfSink::Out
        } else {
            self.hold(raw, None, false, out)
        }
    }

    /// Tracks the tool calls in a chunk, opens pending calls, renames calls already decided,
    /// and fixes `finish_reason`. Returns whether the chunk changed.
    fn inspect(&mut self, value: &mut Value) -> bool {
        let Some(choices) = value.get_mut("choices").and_then(Value::as_array_mut) else {
            return false;
        };
        let mut modified = false;
        for (position, choice) in choices.iter_mut().enumerate() {
            let Some(choice) = choice.as_object_mut() else {
                continue;
            };
            let c = index_of(choice, position);
            if let Some(calls) = tool_calls_mut(choice) {
                if !calls.is_empty() && !self.calls.tool_choices.contains(&c) {
                    self.calls.tool_choices.push(c);
                }
                for (position, call) in calls.iter_mut().enumerate() {
                    let Some(call) = call.as_object_mut() else {
                        continue;
                    };
                    let t = index_of(call, position);
                    let Some(function) = call.get_mut("function").and_then(Value::as_object_mut)
                    else {
                        continue;
                    };
                    modified |= self.track_call(c, t, function);
                }
            }
            if self.calls.tool_choices.contains(&c) && fix_finish_reason(choice) {
                self.report.bump(FilterAction::FinishReasonFixed);
                modified = true;
            }
        }
        modified
    }

    fn track_call(&mut self, c: u64, t: u64, function: &mut Map<String, Value>) -> bool {
        let is_placeholder =
            function.get("name").and_then(Value::as_str) == Some(DATABRICKS_TOOL_CALL);
        let fragment = function
            .get("arguments")
            .and_then(Value::as_str)
            .unwrap_or("");
        let calls = &mut self.calls;
        if let Some(pending) = calls
            .pending
            .iter_mut()
            .find(|p| p.choice == c && p.index == t)
        {
            pending.args.push_str(fragment);
        } else if let Some((_, _, decided)) = calls
            .decided
            .iter()
            .find(|(dc, dt, _)| *dc == c && *dt == t)
        {
            // Some servers repeat the name in every delta of a call.
            if let (true, Some(name)) = (is_placeholder, decided) {
                function.insert("name".to_owned(), Value::String(name.clone()));
                return true;
            }
        } else if is_placeholder && self.tools.remaps_databricks_calls() {
            calls.pending.push(PendingCall {
                choice: c,
                index: t,
                args: fragment.to_owned(),
                first_event: self.held.len(),
                resolution: None,
            });
        }
        false
    }

    /// Holds an event, then flushes when every pending call is decided or the bound is passed.
    fn hold(
        &mut self,
        raw: &[u8],
        value: Option<Value>,
        modified: bool,
        out: &mut Vec<u8>,
    ) -> LfSink {
        // The LF of a CRLF is not counted, so that the bound does not depend on whether that
        // LF came in the same push.
        self.held_bytes += raw.len() - usize::from(raw.ends_with(b"\r\n"));
        self.held.push(HeldEvent {
            raw: raw.to_vec(),
            value,
            modified,
            merged: false,
        });
        for call in &mut self.calls.pending {
            if call.resolution.is_none() {
                call.resolution = match scan_name(&call.args) {
                    NameScan::Incomplete => None,
                    NameScan::Found { name, cut } if self.tools.accepts(&name) => {
                        Some(Resolution::Remap { name, cut })
                    }
                    NameScan::Found { .. } | NameScan::Absent => Some(Resolution::Keep),
                };
            }
        }
        if self.calls.pending.iter().all(|c| c.resolution.is_some()) {
            return self.flush(out);
        }
        if self.held_bytes > self.limits.max_held_bytes
            || self.held.len() > self.limits.max_held_events
        {
            self.report.bump(FilterAction::SseFlushUnchangedOverBound);
            return self.flush(out);
        }
        LfSink::Held
    }

    /// Emits every held event: remapped calls rewritten, undecided ones unchanged. Returns the
    /// LF sink of the last event emitted.
    fn flush(&mut self, out: &mut Vec<u8>) -> LfSink {
        let mut held = mem::take(&mut self.held);
        self.held_bytes = 0;
        for call in mem::take(&mut self.calls.pending) {
            let name = match call.resolution {
                Some(Resolution::Remap { name, cut }) => {
                    let args = without(&call.args, cut);
                    merge_call(
                        &mut held[call.first_event..],
                        call.choice,
                        call.index,
                        &name,
                        args,
                    );
                    self.report.bump(FilterAction::ToolNameRemapped);
                    Some(name)
                }
                Some(Resolution::Keep) | None => None,
            };
            self.calls.decided.push((call.choice, call.index, name));
        }
        let mut sink = LfSink::Out;
        for event in &held {
            sink = match &event.value {
                Some(value) if event.modified => {
                    if !(event.merged && carries_nothing(value)) {
                        render(&event.raw, value, out);
                    }
                    LfSink::Drop
                }
                _ => {
                    out.extend_from_slice(&event.raw);
                    LfSink::Out
                }
            };
        }
        sink
    }
}

/// Gives the call's opening delta the real name and all its arguments, and takes the call's
/// deltas out of the later events, so that no argument text goes out twice.
fn merge_call(held: &mut [HeldEvent], c: u64, t: u64, name: &str, args: String) {
    let Some((first, later)) = held.split_first_mut() else {
        return;
    };
    if let Some(value) = &mut first.value {
        let mut args = Some(args);
        retain_call_deltas(value, c, t, |function| {
            let Some(args) = args.take() else {
                return false;
            };
            function.insert("name".to_owned(), Value::String(name.to_owned()));
            function.insert("arguments".to_owned(), Value::String(args));
            true
        });
        first.modified = true;
    }
    for event in later {
        if let Some(value) = &mut event.value
            && retain_call_deltas(value, c, t, |_| false)
        {
            event.modified = true;
            event.merged = true;
        }
    }
}

/// Runs `keep` on the function of each delta of call (c, t) and removes the deltas it rejects,
/// and `tool_calls` when emptied. Returns whether any delta was removed.
fn retain_call_deltas(
    value: &mut Value,
    c: u64,
    t: u64,
    mut keep: impl FnMut(&mut Map<String, Value>) -> bool,
) -> bool {
    let mut removed = false;
    let Some(choices) = value.get_mut("choices").and_then(Value::as_array_mut) else {
        return false;
    };
    for (position, choice) in choices.iter_mut().enumerate() {
        let Some(choice) = choice.as_object_mut() else {
            continue;
        };
        if index_of(choice, position) != c {
            continue;
        }
        let Some(calls) = tool_calls_mut(choice) else {
            continue;
        };
        let mut position = 0;
        calls.retain_mut(|call| {
            let this = position;
            position += 1;
            let Some(call) = call.as_object_mut() else {
                return true;
            };
            if index_of(call, this) != t {
                return true;
            }
            let kept = call
                .get_mut("function")
                .and_then(Value::as_object_mut)
                .is_some_and(&mut keep);
            removed |= !kept;
            kept
        });
        if calls.is_empty()
            && let Some(delta) = choice.get_mut("delta").and_then(Value::as_object_mut)
        {
            delta.shift_remove("tool_calls");
        }
    }
    removed
}

/// Whether a chunk whose call deltas were merged away says nothing any more: no delta content,
/// no finish_reason, no usage, nothing unknown.
fn carries_nothing(value: &Value) -> bool {
    let Some(chunk) = value.as_object() else {
        return false;
    };
    let metadata = |key: &str, v: &Value| {
        matches!(
            key,
            "id" | "object" | "created" | "model" | "system_fingerprint" | "service_tier"
        ) || (key == "usage" && v.is_null())
    };
    let empty = |v: &Value| v.is_null() || v.as_str() == Some("");
    let choice_is_empty = |choice: &Value| {
        choice.as_object().is_some_and(|choice| {
            choice.iter().all(|(key, v)| match key.as_str() {
                "index" => true,
                "delta" => v.as_object().is_some_and(|delta| delta.values().all(empty)),
                "finish_reason" | "logprobs" => v.is_null(),
                _ => false,
            })
        })
    };
    chunk.iter().all(|(key, v)| match key.as_str() {
        "choices" => v
            .as_array()
            .is_some_and(|choices| choices.iter().all(choice_is_empty)),
        _ => metadata(key, v),
    })
}

fn tool_calls_mut(choice: &mut Map<String, Value>) -> Option<&mut Vec<Value>> {
    choice
        .get_mut("delta")?
        .get_mut("tool_calls")?
        .as_array_mut()
}

/// The `index` of a choice or tool call delta, else its position in the list.
fn index_of(item: &Map<String, Value>, position: usize) -> u64 {
    item.get("index")
        .and_then(Value::as_u64)
        .unwrap_or(position as u64)
}

/// Writes a rewritten event: its other lines as they were, its `data:` lines replaced by one
/// line holding `value`, LF line ends.
fn render(raw: &[u8], value: &Value, out: &mut Vec<u8>) {
    let mut wrote_data = false;
    let mut pos = 0;
    while let Some(line) = next_line(raw, pos) {
        let content = &raw[pos..line.end];
        pos = line.next;
        if content.is_empty() {
            continue;
        }
        if content.starts_with(b"data") && matches!(content.get(4), None | Some(b':')) {
            if !wrote_data {
                out.extend_from_slice(b"data: ");
                // Writing a Value into a Vec cannot fail.
                let _ = serde_json::to_writer(&mut *out, value);
                out.push(b'\n');
                wrote_data = true;
            }
        } else {
            out.extend_from_slice(content);
            out.push(b'\n');
        }
    }
    out.push(b'\n');
}

/// A line found in a buffer: content up to `end`, the next line at `next`.
struct Line {
    end: usize,
    next: usize,
    /// The line ends with a CR that is the last byte of the buffer: an LF may follow later.
    cr_at_end: bool,
    blank: bool,
}

impl Line {
    fn is_blank(&self) -> bool {
        self.blank
    }
}

/// The complete line starting at `pos`, if its line end is in `bytes`.
fn next_line(bytes: &[u8], pos: usize) -> Option<Line> {
    let offset = find_line_end(&bytes[pos..])?;
    let end = pos + offset;
    let (next, cr_at_end) = match (bytes[end], bytes.get(end + 1)) {
        (b'\r', Some(b'\n')) => (end + 2, false),
        (b'\r', None) => (end + 1, true),
        _ => (end + 1, false),
    };
    Some(Line {
        end,
        next,
        cr_at_end,
        blank: offset == 0,
    })
}

#[cfg(test)]
mod tests;

/// The position of the first CR or LF. Looks at eight bytes at a time: this scan is most of the
/// work for events that pass unchanged.
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    const LF: u64 = u64::from_ne_bytes([b'\n'; 8]);
    const CR: u64 = u64::from_ne_bytes([b'\r'; 8]);
    // Marks the bytes of `word` that are zero; exact for the lowest one, which is all we use.
    let zero_bytes = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let (words, tail) = bytes.as_chunks::<8>();
    for (i, word) in words.iter().enumerate() {
        let word = u64::from_le_bytes(*word);
        let found = zero_bytes(word ^ LF) | zero_bytes(word ^ CR);
        if found != 0 {
            return Some(i * 8 + (found.trailing_zeros() / 8) as usize);
        }
    }
    let offset = words.len() * 8;
    tail.iter()
        .position(|&b| b == b'\n' || b == b'\r')
        .map(|i| offset + i)
}
