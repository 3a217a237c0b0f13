//! Sanitising chat requests before they go upstream.

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::lean::{self, Aside};
use super::report::{FilterAction, FilterReport};
use super::response::ToolContext;
use super::rules::{self, FieldPath, Mode, ModelRules, RequestContext};
use super::schema::strip_schema;
use super::view::{self, Messages, Verdict};

/// A generous bound on passes: one pass settles every cascade the rules know of, and the next
/// confirms nothing is left to change.
const MAX_PASSES: usize = 8;

/// The result of [`sanitize_request_bytes`].
#[derive(Clone, Debug, Default)]
pub struct RequestOutcome {
    /// The re-serialised request, only when the filter changed something. `None` means: forward
    /// the original bytes untouched.
    pub body: Option<Vec<u8>>,
    /// What was changed.
    pub report: FilterReport,
    /// The tools the request declared, for fixing its response.
    pub tools: ToolContext,
    /// The model the request is for: the one [`RequestContext`] named, or else the body's
    /// `model`. Only [`RequestSanitizer::sanitize_for`] fills it in, from the body's members as
    /// it reads them for the rules, so that a caller needs no second read to learn it.
    pub model: Option<String>,
}

impl RequestOutcome {
    /// Nothing changed: forward the original bytes.
    fn unchanged(tools: ToolContext) -> Self {
        RequestOutcome {
            body: None,
            report: FilterReport::default(),
            tools,
            model: None,
        }
    }

    /// The request went out rewritten as `body`.
    fn changed(body: Vec<u8>, report: FilterReport, tools: ToolContext) -> Self {
        RequestOutcome {
            body: Some(body),
            report,
            tools,
            model: None,
        }
    }
}

/// Sanitises a parsed chat request in place, to a fixed point, and reports what changed.
///
/// Handles the OpenAI (`messages[].content` as a string or parts, `tool_calls`, `tool` messages)
/// and Anthropic (`text`/`tool_use`/`tool_result`/`thinking` blocks, `system` blocks) shapes.
/// Anything that is not a JSON object is left alone.
pub fn sanitize_request(value: &mut Value) -> FilterReport {
    let mut report = FilterReport::default();
    if let Some(request) = value.as_object_mut() {
        for _ in 0..MAX_PASSES {
            if !sanitize_pass(request, &mut report) {
                break;
            }
        }
    }
    report
}

/// [`sanitize_request`] on a raw body. Bodies that are not a JSON object come back with no body
/// and an empty report; a request the filter did not change is not re-serialised.
///
/// Only the members that need a change are parsed into a `Value` and written anew; every other
/// member is copied as it came. A proxy that sees the same `tools` on every request should use
/// a [`RequestSanitizer`], which also remembers them.
pub fn sanitize_request_bytes(body: &[u8]) -> RequestOutcome {
    sanitize_bytes(body, None)
}

/// Sanitises raw request bodies like [`sanitize_request_bytes`], and remembers the outcome for
/// the last few `tools` arrays it saw.
///
/// An agent sends the same tool declarations on every request of a session, often with schema
/// keywords that have to go. Remembering them by their exact bytes saves parsing, cleaning and
/// writing them again each time. Arrays over 256 KiB are not remembered, and at most eight are.
pub struct RequestSanitizer {
    recent: Mutex<VecDeque<Arc<CleanTools>>>,
}

/// One remembered `tools` array: its bytes as sent, what to send instead (when it changes), and
/// what cleaning it did.
struct CleanTools {
    raw: Box<str>,
    replacement: Member,
    report: FilterReport,
    tools: ToolContext,
}

const CACHED_TOOLS: usize = 8;
const CACHED_TOOLS_MAX_BYTES: usize = 256 * 1024;

impl RequestSanitizer {
    /// A sanitizer that remembers nothing yet.
    pub fn new() -> Self {
        RequestSanitizer {
            recent: Mutex::new(VecDeque::with_capacity(CACHED_TOOLS)),
        }
    }

    /// [`sanitize_request_bytes`], remembering `tools` arrays.
    pub fn sanitize(&self, body: &[u8]) -> RequestOutcome {
        sanitize_bytes(body, Some(self))
    }

    /// The model rules for the request's API and model first, then (for the APIs whose shape
    /// it knows, [`Mode::sanitizes`]) [`RequestSanitizer::sanitize`]. Passthrough requests
    /// come back untouched.
    pub fn sanitize_for(
        &self,
        body: &[u8],
        rules: &ModelRules,
        context: &RequestContext<'_>,
    ) -> RequestOutcome {
        if context.mode == Mode::Passthrough {
            return RequestOutcome::default();
        }
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return RequestOutcome::default();
        }
        // The body's members are read once, for the model, the rules and the sanitising.
        let members = view::members(body);
        let model = match context.model {
            Some(model) => Some(model.to_owned()),
            None => model_in(body, members.as_deref()),
        };
        let mut outcome =
            self.sanitize_members_for(body, members, rules, context, model.as_deref());
        outcome.model = model;
        outcome
    }

    /// [`Self::sanitize_for`] once the model is known.
    fn sanitize_members_for(
        &self,
        body: &[u8],
        members: Option<Vec<(Cow<'_, str>, &RawValue)>>,
        rules: &ModelRules,
        context: &RequestContext<'_>,
        model: Option<&str>,
    ) -> RequestOutcome {
        let removals = rules.removals(context.mode, model);
        let inject = context.inject_stream_usage && context.mode == Mode::Chat;
        let (ruled, mut report) = apply_rules(body, members.as_deref(), &removals, inject);
        if !context.mode.sanitizes() {
            return match ruled {
                Some(body) => RequestOutcome::changed(body, report, ToolContext::default()),
                None => RequestOutcome::unchanged(ToolContext::default()),
            };
        }
        let mut outcome = match (&ruled, members) {
            (Some(ruled), _) => sanitize_bytes(ruled, Some(self)),
            (None, Some(members)) => sanitize_members(body, members, Some(self)),
            (None, None) => sanitize_whole(body),
        };
        report.merge(&outcome.report);
        outcome.report = report;
        if outcome.body.is_none() {
            outcome.body = ruled;
        }
        outcome
    }

    fn recall(&self, raw: &str) -> Option<Arc<CleanTools>> {
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let at = recent.iter().position(|entry| &*entry.raw == raw)?;
        let entry = recent.remove(at)?;
        recent.push_front(Arc::clone(&entry));
        Some(entry)
    }

    fn remember(&self, entry: Arc<CleanTools>) {
        if entry.raw.len() > CACHED_TOOLS_MAX_BYTES {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        recent.truncate(CACHED_TOOLS - 1);
        recent.push_front(entry);
    }
}

impl Default for RequestSanitizer {
    fn default() -> Self {
        RequestSanitizer::new()
    }
}

impl fmt::Debug for RequestSanitizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let remembered = self
            .recent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        f.debug_struct("RequestSanitizer")
            .field("remembered_tools", &remembered)
            .finish()
    }
}

/// What goes out for one member of the request.
#[derive(Clone)]
enum Member {
    /// The member as it came.
    Keep,
    /// The member's new value, as JSON; shared with what a [`RequestSanitizer`] remembers.
    Replace(Arc<[u8]>),
    /// Nothing: the member is removed.
    Remove,
    /// The `messages` list the rules changed, written straight into the new body.
    Messages,
}

/// The `model` a request body names, if it names one as a string.
pub fn request_model(body: &[u8]) -> Option<String> {
    model_of(body)
}

fn model_of(body: &[u8]) -> Option<String> {
    model_in(body, view::members(body).as_deref())
}

/// The `model` of `body`, whose members (when the view reads it) are `members`.
fn model_in(body: &[u8], members: Option<&[(Cow<'_, str>, &RawValue)]>) -> Option<String> {
    match members {
        Some(members) => members
            .iter()
            .rev()
            .find(|(key, _)| key == "model")
            .and_then(|(_, raw)| serde_json::from_str(raw.get()).ok()),
        None => serde_json::from_slice::<Value>(body)
            .ok()?
            .get("model")?
            .as_str()
            .map(str::to_owned),
    }
}

/// Whether the rules may change anything, read without parsing: a removal needs its first
/// member, and inside it (for a nested path) its last name as a string; the injection needs a
/// `stream` member and no `stream_options`. With the members at hand only the member a path
/// starts from is searched; without them (a key given twice), the whole body.
fn may_apply(
    body: &[u8],
    members: Option<&[(Cow<'_, str>, &RawValue)]>,
    removals: &[&FieldPath],
    inject: bool,
) -> bool {
    let Some(members) = members else {
        let text = String::from_utf8_lossy(body);
        let injectable = inject && names(&text, "stream") && !names(&text, "stream_options");
        return injectable || removals.iter().any(|path| names(&text, path.leaf()));
    };
    let member = |name: &str| members.iter().find(|(key, _)| key == name);
    let injectable = inject && member("stream").is_some() && member("stream_options").is_none();
    injectable
        || removals.iter().any(|path| {
            member(path.head())
                .is_some_and(|(_, raw)| path.is_top_level() || names(raw.get(), path.leaf()))
        })
}

/// Whether `text` holds `name` as a string (a key, or a value that happens to be the same):
/// `"name"`, without building that needle.
fn names(text: &str, name: &str) -> bool {
    let bytes = text.as_bytes();
    memchr::memmem::find_iter(bytes, name.as_bytes())
        .any(|at| at > 0 && bytes[at - 1] == b'"' && bytes.get(at + name.len()) == Some(&b'"'))
}

/// Removes what `removals` name and asks for stream usage when `inject`; only the members a
/// rule touches are parsed and written anew. `None`: nothing changed.
fn apply_rules(
    body: &[u8],
    members: Option<&[(Cow<'_, str>, &RawValue)]>,
    removals: &[&FieldPath],
    inject: bool,
) -> (Option<Vec<u8>>, FilterReport) {
    let mut report = FilterReport::default();
    if !may_apply(body, members, removals, inject) {
        return (None, report);
    }
    let Some(members) = members else {
        // A key given twice: the whole body, parsed.
        let Ok(Value::Object(mut request)) = serde_json::from_slice::<Value>(body) else {
            return (None, report);
        };
        rules::apply_to_value(&mut request, removals, inject, &mut report);
        if report.is_empty() {
            return (None, report);
        }
        return (serde_json::to_vec(&request).ok(), report);
    };
    let mut out = Vec::with_capacity(body.len() + 40);
    out.push(b'{');
    let mut first = true;
    let mut seen = Map::new();
    for (key, raw) in members {
        let paths: Vec<&FieldPath> = removals
            .iter()
            .copied()
            .filter(|path| path.head() == &**key)
            .collect();
        let mut value_out: Option<Vec<u8>> = None;
        if !paths.is_empty() {
            let Ok(value) = serde_json::from_str::<Value>(raw.get()) else {
                return (None, FilterReport::default());
            };
            let mut one = Map::from_iter([(key.to_string(), value)]);
            let before = report.total();
            rules::apply_to_value(&mut one, &paths, false, &mut report);
            if report.total() != before {
                match one.get(&**key) {
                    None => continue,
                    Some(value) => value_out = serde_json::to_vec(value).ok(),
                }
            }
        }
        if key == "stream" || key == "stream_options" {
            seen.insert(
                key.to_string(),
                serde_json::from_str(raw.get()).unwrap_or(Value::Null),
            );
        }
        if !first {
            out.push(b',');
        }
        first = false;
        let _ = serde_json::to_writer(&mut out, &**key);
        out.push(b':');
        match &value_out {
            Some(value) => out.extend_from_slice(value),
            None => out.extend_from_slice(raw.get().as_bytes()),
        }
    }
    if inject {
        // Only `stream` and `stream_options` decide; the rest of the request is not needed.
        let before = report.total();
        rules::apply_to_value(&mut seen, removals, true, &mut report);
        if report.total() != before && seen.contains_key("stream_options") {
            if !first {
                out.push(b',');
            }
            out.extend_from_slice(br#""stream_options":{"include_usage":true}"#);
        }
    }
    out.push(b'}');
    if report.is_empty() {
        return (None, report);
    }
    (Some(out), report)
}

fn sanitize_bytes(body: &[u8], sanitizer: Option<&RequestSanitizer>) -> RequestOutcome {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return RequestOutcome::default();
    }
    match view::members(body) {
        Some(members) => sanitize_members(body, members, sanitizer),
        None => sanitize_whole(body),
    }
}

/// [`sanitize_bytes`] on a body whose members the view has read.
fn sanitize_members(
    body: &[u8],
    members: Vec<(Cow<'_, str>, &RawValue)>,
    sanitizer: Option<&RequestSanitizer>,
) -> RequestOutcome {
    let mut report = FilterReport::default();
    let mut tools = ToolContext::default();
    let mut out: Vec<Member> = Vec::with_capacity(members.len());
    let mut rewritten: Option<RewrittenList<'_>> = None;
    for (key, raw) in &members {
        let member = match &**key {
            "messages" => match view::messages(raw) {
                Messages::List(list) => match sanitize_message_list(list, raw.get(), &mut report) {
                    Some(None) => Member::Keep,
                    Some(Some(list)) => {
                        rewritten = Some(list);
                        Member::Messages
                    }
                    None => sanitize_member(key, raw, &mut report).0,
                },
                Messages::Unreadable => sanitize_member(key, raw, &mut report).0,
                Messages::NotAList => Member::Keep,
            },
            "system" if !view::system_is_clean(raw) => sanitize_member(key, raw, &mut report).0,
            "tools" => {
                let entry = match sanitizer.and_then(|s| s.recall(raw.get())) {
                    Some(entry) => entry,
                    None => {
                        let entry = Arc::new(clean_tools(key, raw));
                        if let Some(sanitizer) = sanitizer {
                            sanitizer.remember(Arc::clone(&entry));
                        }
                        entry
                    }
                };
                report.merge(&entry.report);
                tools = entry.tools.clone();
                entry.replacement.clone()
            }
            _ => Member::Keep,
        };
        out.push(member);
    }
    if report.is_empty() {
        return RequestOutcome::unchanged(tools);
    }
    // A sanitised request is about as large as the original.
    let mut new_body = Vec::with_capacity(body.len());
    new_body.push(b'{');
    let mut first = true;
    for ((key, raw), member) in members.iter().zip(&out) {
        if matches!(member, Member::Remove) {
            continue;
        }
        if !first {
            new_body.push(b',');
        }
        first = false;
        // Writing a `str` as JSON cannot fail.
        let _ = serde_json::to_writer(&mut new_body, &**key);
        new_body.push(b':');
        match member {
            Member::Keep => new_body.extend_from_slice(raw.get().as_bytes()),
            Member::Replace(value) => new_body.extend_from_slice(value),
            Member::Messages => match &rewritten {
                Some(list) if list.write(&mut new_body).is_some() => {}
                _ => return sanitize_whole(body),
            },
            Member::Remove => {}
        }
    }
    new_body.push(b'}');
    RequestOutcome::changed(new_body, report, tools)
}

/// Cleans one `tools` member, reading it through the view first.
fn clean_tools(key: &str, raw: &RawValue) -> CleanTools {
    let mut report = FilterReport::default();
    let (replacement, tools) = match view::tools(raw) {
        Some((true, tools)) => (Member::Keep, tools),
        _ => sanitize_member(key, raw, &mut report),
    };
    CleanTools {
        raw: raw.get().into(),
        replacement,
        report,
        tools,
    }
}

/// Runs the rules on a `messages` list the view has read. Only the messages that may change,
/// and the assistant messages before them that they may be checked against, are parsed into a
/// `Value` (and of those only the members the rules read: [`lean`]); each other message stands
/// in as its index (the rules keep anything that is not an object, and judge no message against
/// it) and is copied as it came. `Some(None)` when nothing changes; `None` if a message the view
/// read cannot be parsed after all.
fn sanitize_message_list<'a>(
    list: Vec<(&'a str, Verdict)>,
    raw_list: &str,
    report: &mut FilterReport,
) -> Option<Option<RewrittenList<'a>>> {
    // Nothing after the last message that may change is judged again, so from there on clean
    // assistant messages stand in by index too.
    let Some(last_dirty) = list
        .iter()
        .rposition(|(_, verdict)| *verdict == Verdict::Dirty)
    else {
        return Some(None);
    };
    // Placeholders only stand in for what these messages hold.
    let lean = lean::usable_for(raw_list);
    let mut aside = Aside::default();
    let mut messages = Vec::with_capacity(list.len());
    for (i, (raw, verdict)) in list.iter().enumerate() {
        let parse = match verdict {
            Verdict::Plain => false,
            Verdict::CleanAssistant => i < last_dirty,
            Verdict::Dirty => true,
        };
        messages.push(if !parse {
            Value::from(i)
        } else if let Some(message) = lean.then(|| lean::message(raw, &mut aside)).flatten() {
            message
        } else {
            serde_json::from_str(raw).ok()?
        });
    }
    let mut request = Value::Object(Map::from_iter([(
        "messages".to_owned(),
        Value::Array(messages),
    )]));
    let changes = sanitize_request(&mut request);
    if changes.is_empty() {
        return Some(None);
    }
    let Some(Value::Array(kept)) = request.as_object_mut()?.shift_remove("messages") else {
        return None;
    };
    report.merge(&changes);
    Some(Some(RewrittenList { list, kept, aside }))
}

/// A `messages` list after the rules: what they kept, each message either parsed (and maybe
/// changed) or the index of one copied as it came.
struct RewrittenList<'a> {
    list: Vec<(&'a str, Verdict)>,
    kept: Vec<Value>,
    aside: Aside<'a>,
}

impl RewrittenList<'_> {
    /// Writes the list into `out`, where the request is being written: building it apart first
    /// would hold the messages twice more.
    fn write(&self, out: &mut Vec<u8>) -> Option<()> {
        out.push(b'[');
        for (n, message) in self.kept.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            match message {
                Value::Number(i) => {
                    out.extend_from_slice(self.list.get(i.as_u64()? as usize)?.0.as_bytes())
                }
                message => lean::write_spliced(message, &self.aside, out),
            }
        }
        out.push(b']');
        Some(())
    }
}

/// Runs the rules on one member alone (they never look across members), and returns what to
/// send for it and the tools it declares, if it is `tools`.
fn sanitize_member(key: &str, raw: &RawValue, report: &mut FilterReport) -> (Member, ToolContext) {
    let Ok(value) = serde_json::from_str::<Value>(raw.get()) else {
        return (Member::Keep, ToolContext::default());
    };
    let mut request = Value::Object(Map::from_iter([(key.to_owned(), value)]));
    let changes = sanitize_request(&mut request);
    let tools = ToolContext::from_request(&request);
    if changes.is_empty() {
        return (Member::Keep, tools);
    }
    let member = match request.get(key).map(serde_json::to_vec) {
        Some(Ok(value)) => Member::Replace(value.into()),
        Some(Err(_)) => return (Member::Keep, tools),
        None => Member::Remove,
    };
    report.merge(&changes);
    (member, tools)
}

/// The rules on the whole parsed body, for the bodies the view does not read (a key given twice).
fn sanitize_whole(body: &[u8]) -> RequestOutcome {
    let Ok(mut value) = serde_json::from_slice::<Value>(body) else {
        return RequestOutcome::default();
    };
    let report = sanitize_request(&mut value);
    let tools = ToolContext::from_request(&value);
    if report.is_empty() {
        return RequestOutcome::unchanged(tools);
    }
    let mut new_body = Vec::with_capacity(body.len());
    match serde_json::to_writer(&mut new_body, &value) {
        Ok(()) => RequestOutcome::changed(new_body, report, tools),
        Err(_) => RequestOutcome::unchanged(tools),
    }
}

/// One pass of every rule. Returns whether anything changed.
fn sanitize_pass(request: &mut Map<String, Value>, report: &mut FilterReport) -> bool {
    let mut changed = false;
    if let Some(Value::Array(system)) = request.get_mut("system")
        && drop_empty_text(system, report)
    {
        changed = true;
        if system.is_empty() {
            request.shift_remove("system");
        }
    }
    if let Some(Value::Array(messages)) = request.get_mut("messages") {
        changed |= sanitize_messages(messages, report);
    }
    if let Some(Value::Array(tools)) = request.get_mut("tools") {
        for tool in tools.iter_mut().filter_map(Value::as_object_mut) {
            if let Some(schema) = parameter_schema(tool) {
                changed |= strip_schema(schema, report);
            }
        }
    }
    changed
}

/// The parameter schema of a declared tool: OpenAI chat (`function.parameters`), Anthropic
/// (`input_schema`) or OpenAI Responses (`parameters` on a `function` tool).
fn parameter_schema(tool: &mut Map<String, Value>) -> Option<&mut Value> {
    if tool.contains_key("function") {
        return tool.get_mut("function")?.get_mut("parameters");
    }
    if tool.contains_key("input_schema") {
        return tool.get_mut("input_schema");
    }
    if tool.get("type").and_then(Value::as_str) == Some("function") {
        return tool.get_mut("parameters");
    }
    None
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Assistant,
    /// OpenAI `tool` (and legacy `function`) results: never dropped for being empty, since the
    /// call they answer would be left without a result.
    ToolResult,
    Other,
}

impl Role {
    fn of(message: &Map<String, Value>) -> Role {
        match message.get("role").and_then(Value::as_str) {
            Some("assistant") => Role::Assistant,
            Some("tool" | "function") => Role::ToolResult,
            _ => Role::Other,
        }
    }
}

/// One forward sweep over the messages, compacting in place. Each message is judged against
/// the nearest earlier assistant message that is kept, so drops cascade within the sweep.
fn sanitize_messages(messages: &mut Vec<Value>, report: &mut FilterReport) -> bool {
    let mut changed = false;
    let mut kept = 0;
    let mut last_assistant: Option<usize> = None;
    for i in 0..messages.len() {
        let (earlier, rest) = messages.split_at_mut(i);
        let preceding = last_assistant.map(|j| &earlier[j]);
        let keep = sanitize_message(&mut rest[0], preceding, report, &mut changed);
        if !keep {
            changed = true;
            continue;
        }
        messages.swap(kept, i);
        if messages[kept].as_object().map(Role::of) == Some(Role::Assistant) {
            last_assistant = Some(kept);
        }
        kept += 1;
    }
    messages.truncate(kept);
    changed
}

/// Sanitises one message. Returns whether to keep it.
fn sanitize_message(
    message: &mut Value,
    preceding: Option<&Value>,
    report: &mut FilterReport,
    changed: &mut bool,
) -> bool {
    let Some(message) = message.as_object_mut() else {
        return true;
    };
    let role = Role::of(message);
    if role == Role::ToolResult {
        if let Some(id) = message.get("tool_call_id").and_then(Value::as_str)
            && !answers(preceding, id)
        {
            report.bump(FilterAction::OrphanToolResultDropped);
            return false;
        }
        return true;
    }
    if let Some(Value::Array(blocks)) = message.get_mut("content") {
        *changed |= sanitize_blocks(blocks, preceding, report);
    }
    let tool_calls = has_tool_calls(message);
    if content_is_empty(message) {
        if !tool_calls {
            report.bump(FilterAction::EmptyMessageDropped);
            return false;
        }
        // OpenAI's form for "no content, only tool calls".
        if let Some(content) = message.get_mut("content")
            && !content.is_null()
        {
            *content = Value::Null;
            report.bump(FilterAction::EmptyTextDropped);
            *changed = true;
        }
    }
    true
}

/// Drops empty text blocks and orphan `tool_result` blocks. Returns whether anything changed.
fn sanitize_blocks(
    blocks: &mut Vec<Value>,
    preceding: Option<&Value>,
    report: &mut FilterReport,
) -> bool {
    let before = blocks.len();
    let mut nested_changed = false;
    blocks.retain_mut(|block| match block.get("type").and_then(Value::as_str) {
        Some("text") if is_empty_text(block) => {
            report.bump(FilterAction::EmptyTextDropped);
            false
        }
        Some("tool_result") => {
            if let Some(id) = block.get("tool_use_id").and_then(Value::as_str)
                && !answers(preceding, id)
            {
                report.bump(FilterAction::OrphanToolResultDropped);
                return false;
            }
            if let Some(Value::Array(inner)) = block.get_mut("content") {
                nested_changed |= drop_empty_text(inner, report);
            }
            true
        }
        _ => true,
    });
    nested_changed || blocks.len() != before
}

/// Drops empty text blocks from a list of blocks. Returns whether anything changed.
fn drop_empty_text(blocks: &mut Vec<Value>, report: &mut FilterReport) -> bool {
    let before = blocks.len();
    blocks.retain(|block| {
        let empty =
            block.get("type").and_then(Value::as_str) == Some("text") && is_empty_text(block);
        if empty {
            report.bump(FilterAction::EmptyTextDropped);
        }
        !empty
    });
    blocks.len() != before
}

fn is_empty_text(block: &Value) -> bool {
    match block.get("text") {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => text.trim().is_empty(),
        Some(_) => false,
    }
}

fn content_is_empty(message: &Map<String, Value>) -> bool {
    match message.get("content") {
        None | Some(Value::Null) => true,
        Some(Value::String(text)) => text.trim().is_empty(),
        Some(Value::Array(blocks)) => blocks.is_empty(),
        Some(_) => false,
    }
}

fn has_tool_calls(message: &Map<String, Value>) -> bool {
    message
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|calls| !calls.is_empty())
        || message.get("function_call").is_some_and(Value::is_object)
}

/// Whether the assistant message `preceding` made the tool call with this id, as an OpenAI
/// `tool_calls` entry or an Anthropic `tool_use` block.
fn answers(preceding: Option<&Value>, id: &str) -> bool {
    let Some(assistant) = preceding else {
        return false;
    };
    let has_id = |item: &Value| item.get("id").and_then(Value::as_str) == Some(id);
    let in_tool_calls = assistant
        .get("tool_calls")
        .and_then(Value::as_array)
        .is_some_and(|calls| calls.iter().any(has_id));
    in_tool_calls
        || assistant
            .get("content")
            .and_then(Value::as_array)
            .is_some_and(|blocks| {
                blocks.iter().any(|block| {
                    block.get("type").and_then(Value::as_str) == Some("tool_use") && has_id(block)
                })
            })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    type Counts = &'static [(&'static str, u64)];

    fn check(input: Value, want: Value, want_report: Counts) {
        let mut got = input.clone();
        let report = sanitize_request(&mut got);
        assert_eq!(got, want, "input: {input}");
        assert_eq!(
            report.iter().collect::<Vec<_>>(),
            want_report,
            "input: {input}"
        );
        let mut again = got.clone();
        assert!(
            sanitize_request(&mut again).is_empty(),
            "idempotent: {input}"
        );
        assert_eq!(again, got, "idempotent: {input}");
    }

    fn messages(list: Value) -> Value {
        json!({"model": "m", "messages": list})
    }

    fn text(t: &str) -> Value {
        json!({"type": "text", "text": t})
    }

    #[test]
    fn names_finds_a_name_only_between_quotes() {
        let cases: &[(&str, &str, bool)] = &[
            (r#"{"reasoning_effort": "low"}"#, "reasoning_effort", true),
            (
                r#"{"effort": "reasoning_effort"}"#,
                "reasoning_effort",
                true,
            ),
            (r#"{"reasoning_effort_x": 1}"#, "reasoning_effort", false),
            (r#"{"x_reasoning_effort": 1}"#, "reasoning_effort", false),
            ("reasoning_effort", "reasoning_effort", false),
            (
                r#"{"a": "stream", "stream_options": {}}"#,
                "stream_options",
                true,
            ),
            (r#"{"a": 1}"#, "stream", false),
        ];
        for (text, name, expected) in cases {
            assert_eq!(names(text, name), *expected, "{name} in {text}");
        }
    }

    #[test]
    fn the_outcome_names_the_model_from_the_context_or_else_the_body() {
        let body = br#"{"messages": [], "model": "databricks-claude-sonnet-4"}"#;
        let sanitizer = RequestSanitizer::new();
        let rules = ModelRules::builtin();
        let cases: &[(Option<&str>, Option<&str>)] = &[
            (None, Some("databricks-claude-sonnet-4")),
            (Some("gemini-2.5-pro"), Some("gemini-2.5-pro")),
        ];
        for (named, expected) in cases {
            let context = RequestContext {
                mode: Mode::Chat,
                model: *named,
                inject_stream_usage: false,
            };
            let outcome = sanitizer.sanitize_for(body, &rules, &context);
            assert_eq!(outcome.model.as_deref(), *expected, "{named:?}");
        }
        let not_an_object = sanitizer.sanitize_for(b"[]", &rules, &RequestContext::new(Mode::Chat));
        assert_eq!(not_an_object.model, None);
    }

    #[test]
    fn empty_text_rules() {
        #[rustfmt::skip]
        let cases: Vec<(Value, Value, Counts)> = vec![
            // OpenAI parts: empty and whitespace-only parts go, the rest stays in order.
            (messages(json!([{"role": "user", "content": [text(""), text("hi"), text(" \n\t"), {"type": "image_url"}]}])),
             messages(json!([{"role": "user", "content": [text("hi"), {"type": "image_url"}]}])),
             &[("empty_text_dropped", 2)]),
            // Anthropic: empty text around thinking (what OpenCode sends) goes, thinking stays.
            (messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [text(""), {"type": "thinking", "thinking": "t", "signature": "s"}, text("\n"), text("a")]}])),
             messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}, text("a")]}])),
             &[("empty_text_dropped", 2)]),
            // A text block without text is empty too.
            (messages(json!([{"role": "user", "content": [{"type": "text"}, text("x")]}])),
             messages(json!([{"role": "user", "content": [text("x")]}])),
             &[("empty_text_dropped", 1)]),
            // Anthropic system blocks.
            (json!({"system": [text(" "), text("be brief")], "messages": []}),
             json!({"system": [text("be brief")], "messages": []}),
             &[("empty_text_dropped", 1)]),
            (json!({"system": [text("")], "messages": []}),
             json!({"messages": []}),
             &[("empty_text_dropped", 1)]),
            // Empty text inside a tool_result's content.
            (messages(json!([
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [text(""), text("out")]}]}])),
             messages(json!([
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [text("out")]}]}])),
             &[("empty_text_dropped", 1)]),
            // Non-empty text, string content: untouched.
            (messages(json!([{"role": "system", "content": "s"}, {"role": "user", "content": [text(" x ")]}])),
             messages(json!([{"role": "system", "content": "s"}, {"role": "user", "content": [text(" x ")]}])),
             &[]),
        ];
        for (input, want, report) in cases {
            check(input, want, report);
        }
    }

    #[test]
    fn empty_message_rules() {
        let call =
            json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
        #[rustfmt::skip]
        let cases: Vec<(Value, Value, Counts)> = vec![
            // Messages left empty go, whatever the role.
            (messages(json!([{"role": "user", "content": "  "}, {"role": "user", "content": "q"}])),
             messages(json!([{"role": "user", "content": "q"}])),
             &[("empty_message_dropped", 1)]),
            (messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": [text(" ")]}])),
             messages(json!([{"role": "user", "content": "q"}])),
             &[("empty_text_dropped", 1), ("empty_message_dropped", 1)]),
            (messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": null},
                             {"role": "assistant", "content": []}, {"role": "assistant"}])),
             messages(json!([{"role": "user", "content": "q"}])),
             &[("empty_message_dropped", 3)]),
            // An assistant message with tool calls stays; its empty content becomes null.
            (messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": call}])),
             messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": call}])),
             &[("empty_text_dropped", 1)]),
            (messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": [text("")], "tool_calls": call}])),
             messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": call}])),
             &[("empty_text_dropped", 2)]),
            (messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": call}])),
             messages(json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": null, "tool_calls": call}])),
             &[]),
            // A tool result is never dropped for being empty: its call would be left unanswered.
            (messages(json!([{"role": "assistant", "content": null, "tool_calls": call},
                             {"role": "tool", "tool_call_id": "c1", "content": ""}])),
             messages(json!([{"role": "assistant", "content": null, "tool_calls": call},
                             {"role": "tool", "tool_call_id": "c1", "content": ""}])),
             &[]),
            // Not an object: left alone.
            (messages(json!(["raw", {"role": "user", "content": "q"}])),
             messages(json!(["raw", {"role": "user", "content": "q"}])),
             &[]),
        ];
        for (input, want, report) in cases {
            check(input, want, report);
        }
    }

    #[test]
    fn orphan_tool_result_rules() {
        let call = |id: &str| json!([{"id": id, "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
        let tool_use = |id: &str| json!({"type": "tool_use", "id": id, "name": "f", "input": {}});
        let result = |id: &str| json!({"type": "tool_result", "tool_use_id": id, "content": "r"});
        #[rustfmt::skip]
        let cases: Vec<(Value, Value, Counts)> = vec![
            // OpenAI: results of the preceding assistant's calls stay, others go.
            (messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": null, "tool_calls": call("c1")},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                {"role": "tool", "tool_call_id": "c0", "content": "stale"}])),
             messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": null, "tool_calls": call("c1")},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}])),
             &[("orphan_tool_result_dropped", 1)]),
            // A result whose call was in an older assistant message (dropped by /compact).
            (messages(json!([
                {"role": "assistant", "content": null, "tool_calls": call("c1")},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                {"role": "assistant", "content": "done"},
                {"role": "tool", "tool_call_id": "c1", "content": "again"}])),
             messages(json!([
                {"role": "assistant", "content": null, "tool_calls": call("c1")},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"},
                {"role": "assistant", "content": "done"}])),
             &[("orphan_tool_result_dropped", 1)]),
            // No assistant message at all.
            (messages(json!([{"role": "tool", "tool_call_id": "c1", "content": "x"}, {"role": "user", "content": "q"}])),
             messages(json!([{"role": "user", "content": "q"}])),
             &[("orphan_tool_result_dropped", 1)]),
            // Anthropic: orphan blocks go; a user message left empty goes with them.
            (messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [text("let me look"), tool_use("t1")]},
                {"role": "user", "content": [result("t1"), result("t9")]},
                {"role": "assistant", "content": [text("ok")]},
                {"role": "user", "content": [result("t1")]},
                {"role": "user", "content": "next"}])),
             messages(json!([
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [text("let me look"), tool_use("t1")]},
                {"role": "user", "content": [result("t1")]},
                {"role": "assistant", "content": [text("ok")]},
                {"role": "user", "content": "next"}])),
             &[("orphan_tool_result_dropped", 2), ("empty_message_dropped", 1)]),
            // Cascade: an empty assistant message between a call and its result is dropped
            // first, so the result then follows its call and stays.
            (messages(json!([
                {"role": "assistant", "content": [tool_use("t1")]},
                {"role": "assistant", "content": [text(" ")]},
                {"role": "user", "content": [result("t1")]}])),
             messages(json!([
                {"role": "assistant", "content": [tool_use("t1")]},
                {"role": "user", "content": [result("t1")]}])),
             &[("empty_text_dropped", 1), ("empty_message_dropped", 1)]),
            // Cascade the other way: the dropped orphan empties its message.
            (messages(json!([
                {"role": "assistant", "content": [tool_use("t1")]},
                {"role": "user", "content": [result("t1"), text("")]},
                {"role": "assistant", "content": [text("")]},
                {"role": "user", "content": [result("t2"), text(" ")]},
                {"role": "user", "content": "q"}])),
             messages(json!([
                {"role": "assistant", "content": [tool_use("t1")]},
                {"role": "user", "content": [result("t1")]},
                {"role": "user", "content": "q"}])),
             &[("empty_text_dropped", 3), ("orphan_tool_result_dropped", 1), ("empty_message_dropped", 2)]),
        ];
        for (input, want, report) in cases {
            check(input, want, report);
        }
    }

    #[test]
    fn tools_and_stream_options_rules() {
        let schema_in = json!({"$schema": "x", "type": "object", "additionalProperties": false,
            "properties": {"pattern": {"type": "string", "minLength": 1}, "minLength": {"type": "integer"}},
            "required": ["pattern", "minLength"]});
        let schema_out = json!({"type": "object",
            "properties": {"pattern": {"type": "string", "minLength": 1}, "minLength": {"type": "integer"}},
            "required": ["pattern", "minLength"]});
        #[rustfmt::skip]
        let cases: Vec<(Value, Value, Counts)> = vec![
            // stream_options is the model rules' business: the general pass keeps it.
            (json!({"stream": true, "stream_options": {"include_usage": true}, "messages": []}),
             json!({"stream": true, "stream_options": {"include_usage": true}, "messages": []}),
             &[]),
            // OpenAI chat tools. Real properties named pattern and minLength survive.
            (json!({"tools": [{"type": "function", "function": {"name": "grep", "parameters": schema_in}}]}),
             json!({"tools": [{"type": "function", "function": {"name": "grep", "parameters": schema_out}}]}),
             &[("schema_keyword_removed", 2)]),
            // Anthropic tools.
            (json!({"tools": [{"name": "grep", "input_schema": schema_in}]}),
             json!({"tools": [{"name": "grep", "input_schema": schema_out}]}),
             &[("schema_keyword_removed", 2)]),
            // OpenAI Responses tools.
            (json!({"tools": [{"type": "function", "name": "grep", "parameters": schema_in}]}),
             json!({"tools": [{"type": "function", "name": "grep", "parameters": schema_out}]}),
             &[("schema_keyword_removed", 2)]),
            // Anything else under tools is not a schema.
            (json!({"tools": [{"type": "web_search", "parameters": {"$schema": "x"}}, "raw"]}),
             json!({"tools": [{"type": "web_search", "parameters": {"$schema": "x"}}, "raw"]}),
             &[]),
            // stream_options only at the top level.
            (messages(json!([{"role": "user", "content": "q", "stream_options": 1}])),
             messages(json!([{"role": "user", "content": "q", "stream_options": 1}])),
             &[]),
        ];
        for (input, want, report) in cases {
            check(input, want, report);
        }
    }

    #[test]
    fn not_an_object_is_left_alone() {
        for mut value in [json!([1, 2]), json!("s"), json!(null), json!(3)] {
            let before = value.clone();
            assert!(sanitize_request(&mut value).is_empty());
            assert_eq!(value, before);
        }
    }

    #[test]
    fn bytes_outcomes() {
        for body in [
            &b""[..],
            b"not json",
            b"[{\"messages\": []}]",
            b"{\"messages\": [",
            b"\xff\xfe{}",
            b"{\"a\": \"\xff\"}",
        ] {
            let outcome = sanitize_request_bytes(body);
            assert!(outcome.body.is_none(), "{body:?}");
            assert!(outcome.report.is_empty(), "{body:?}");
            assert_eq!(outcome.tools, ToolContext::default());
        }

        let unchanged =
            br#" {"messages": [{"role": "user", "content": "q"}], "tools": [{"name": "bash", "input_schema": {}}]}"#;
        let outcome = sanitize_request_bytes(unchanged);
        assert!(outcome.body.is_none() && outcome.report.is_empty());
        assert_eq!(outcome.tools.declared().collect::<Vec<_>>(), ["bash"]);

        let changed = br#"{"stream_options": {}, "messages": [{"role": "user", "content": " "}, {"role": "user", "content": "q"}]}"#;
        let outcome = sanitize_request_bytes(changed);
        let body: Value = serde_json::from_slice(&outcome.body.unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"stream_options": {}, "messages": [{"role": "user", "content": "q"}]})
        );
        assert_eq!(outcome.report.get(FilterAction::EmptyMessageDropped), 1);
    }

    #[test]
    fn only_changed_members_are_written_anew() {
        // Untouched members keep their bytes, spacing and escapes included; the order stays.
        let body = br#"{ "model" : "m\u00e9",  "stream_options": {"include_usage": true} ,
            "messages": [ {"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": "q"}]} ],
            "metadata": {"a" : [1, 2]},
            "tools": [ {"name": "bash", "input_schema": {"$schema": "s", "type": "object"}} ] }"#;
        let outcome = sanitize_request_bytes(body);
        assert_eq!(
            String::from_utf8(outcome.body.unwrap()).unwrap(),
            r#"{"model":"m\u00e9","stream_options":{"include_usage": true},"messages":[{"role":"user","content":[{"type":"text","text":"q"}]}],"metadata":{"a" : [1, 2]},"tools":[{"name":"bash","input_schema":{"type":"object"}}]}"#
        );
        assert_eq!(
            outcome.report.iter().collect::<Vec<_>>(),
            [("empty_text_dropped", 1), ("schema_keyword_removed", 1)]
        );
        assert_eq!(outcome.tools.declared().collect::<Vec<_>>(), ["bash"]);

        // A key given twice is read the way a `Value` reads it: the last one counts.
        let twice = br#"{"messages": [{"role": "user", "content": ""}], "messages": [{"role": "user", "content": "q"}]}"#;
        let outcome = sanitize_request_bytes(twice);
        assert!(outcome.report.is_empty());
        assert!(outcome.body.is_none());
    }

    #[test]
    fn the_sanitizer_remembers_a_bounded_number_of_tools() {
        let sanitizer = RequestSanitizer::new();
        let request = |i: usize| {
            format!(
                r#"{{"messages": [], "tools": [{{"name": "t{i}", "input_schema": {{"$schema": "s"}}}}]}}"#
            )
        };
        let first = sanitizer.sanitize(request(0).as_bytes());
        assert_eq!(
            format!("{sanitizer:?}"),
            "RequestSanitizer { remembered_tools: 1 }"
        );
        let again = sanitizer.sanitize(request(0).as_bytes());
        assert_eq!(again.body, first.body);
        assert_eq!(again.report, first.report);
        assert_eq!(again.report.get(FilterAction::SchemaKeywordRemoved), 1);
        assert_eq!(again.tools.declared().collect::<Vec<_>>(), ["t0"]);
        assert_eq!(
            format!("{sanitizer:?}"),
            "RequestSanitizer { remembered_tools: 1 }"
        );

        for i in 0..20 {
            let outcome = sanitizer.sanitize(request(i).as_bytes());
            assert_eq!(
                outcome.tools.declared().collect::<Vec<_>>(),
                [format!("t{i}")]
            );
        }
        assert_eq!(
            format!("{sanitizer:?}"),
            format!("RequestSanitizer {{ remembered_tools: {CACHED_TOOLS} }}")
        );

        // Very large tool lists are cleaned but not kept.
        let sanitizer = RequestSanitizer::new();
        let description = "d".repeat(CACHED_TOOLS_MAX_BYTES);
        let big = format!(
            r#"{{"tools": [{{"name": "big", "description": "{description}", "input_schema": {{"$id": "x"}}}}]}}"#
        );
        let outcome = sanitizer.sanitize(big.as_bytes());
        assert_eq!(outcome.report.get(FilterAction::SchemaKeywordRemoved), 1);
        assert_eq!(
            format!("{sanitizer:?}"),
            "RequestSanitizer { remembered_tools: 0 }"
        );
    }

    #[test]
    fn numbers_past_f64_are_copied_as_they_came() {
        // Well-formed JSON that a `Value` cannot hold is still filtered; the member it sits in
        // is copied untouched.
        let body = br#"{"seed": 5e55555555, "messages": [{"role": "user", "content": ""}]}"#;
        let outcome = sanitize_request_bytes(body);
        assert_eq!(
            outcome.body.as_deref(),
            Some(&br#"{"seed":5e55555555,"messages":[]}"#[..])
        );
        assert_eq!(outcome.report.get(FilterAction::EmptyMessageDropped), 1);
    }

    #[test]
    fn a_message_given_a_key_twice_is_judged_like_a_value() {
        // The second assistant message gives `id` twice; whichever it answers, the `tool`
        // result after it is checked against it, not against the first assistant.
        let body = br#"{"messages": [
            {"role": "assistant", "content": "a", "tool_calls": [{"id": "c0"}]},
            {"role": "assistant", "content": "b", "tool_calls": [{"id": "c1", "id": "c2"}]},
            {"role": "tool", "tool_call_id": "c0", "content": "r"}]}"#;
        let outcome = sanitize_request_bytes(body);
        assert_eq!(outcome.report.get(FilterAction::OrphanToolResultDropped), 1);
        let sent: Value = serde_json::from_slice(&outcome.body.unwrap()).unwrap();
        assert_eq!(sent["messages"].as_array().unwrap().len(), 2);
    }
}
