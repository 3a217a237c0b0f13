//! Model rules: which request fields go, for which models (name globs) and which APIs.
//!
//! Served models differ in what they accept: one family refuses `stream_options`, another
//! knows nothing of `reasoning_effort`. Those differences are data, not code: a rules file
//! (JSON) lists them, [`ModelRules::builtin`] holds the one shipped with the filter
//! (`rules.json`, documented rule by rule in docs/FILTER.md), and a proxy may load another in
//! its place. A new model quirk then needs a rules change, not a release.
//!
//! ```
//! use fresh_filter::{Mode, ModelRules, RequestContext, RequestSanitizer};
//!
//! let rules = ModelRules::parse(r#"{"rules": [{
//!     "name": "no-stream-options-for-gemini",
//!     "models": ["*gemini*"], "modes": ["chat"], "remove": ["stream_options"]}]}"#)?;
//! let sanitizer = RequestSanitizer::new();
//! let body = br#"{"model": "databricks-gemini-2-5-pro", "stream": true,
//!     "stream_options": {"include_usage": true}, "messages": []}"#;
//! let outcome = sanitizer.sanitize_for(body, &rules, &RequestContext::new(Mode::Chat));
//! let sent: serde_json::Value = serde_json::from_slice(&outcome.body.unwrap()).unwrap();
//! assert!(sent.get("stream_options").is_none());
//!
//! // Another model keeps it, and with it the usage of its streamed answers.
//! let body = br#"{"model": "databricks-claude-sonnet-4-5", "stream": true,
//!     "stream_options": {"include_usage": true}, "messages": []}"#;
//! assert!(sanitizer.sanitize_for(body, &rules, &RequestContext::new(Mode::Chat)).body.is_none());
//! # Ok::<(), fresh_filter::RulesError>(())
//! ```

use std::fmt;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::report::{FilterAction, FilterReport};

/// How a route's requests and answers are handled; rules name the modes they apply to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// OpenAI chat completions: the content filter, the model rules, the response fixes.
    Chat,
    /// OpenAI Responses: the content filter and model rules; answers pass unchanged.
    Responses,
    /// Anthropic Messages: the content filter and model rules; answers pass unchanged.
    Anthropic,
    /// Gemini's native API: the model rules only; answers pass unchanged.
    Gemini,
    /// No filtering at all (managed MCP servers and anything that is not a model call).
    Passthrough,
}

impl Mode {
    /// Every mode.
    pub const ALL: [Mode; 5] = [
        Mode::Chat,
        Mode::Responses,
        Mode::Anthropic,
        Mode::Gemini,
        Mode::Passthrough,
    ];

    /// The name used in the routes and rules files.
    pub const fn as_str(self) -> &'static str {
        match self {
            Mode::Chat => "chat",
            Mode::Responses => "responses",
            Mode::Anthropic => "anthropic",
            Mode::Gemini => "gemini",
            Mode::Passthrough => "passthrough",
        }
    }

    /// Whether the content filter (empty text, orphaned tool results, schema keywords) reads
    /// this API's requests. Gemini's native shape is not one it knows.
    pub const fn sanitizes(self) -> bool {
        matches!(self, Mode::Chat | Mode::Responses | Mode::Anthropic)
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The rules file shipped with the filter.
pub const BUILTIN_RULES: &str = include_str!("../rules.json");

/// A parsed rules file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelRules {
    rules: Vec<Rule>,
}

/// One rule of a rules file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// What the rule is called in logs and docs.
    pub name: String,
    /// Why it exists (free text; the evidence is in docs/FILTER.md).
    #[serde(default)]
    pub why: String,
    /// Model name globs (`*` any run of characters, `?` one), matched case-insensitively.
    pub models: Vec<Glob>,
    /// Model globs the rule never applies to, even when `models` matches.
    #[serde(default)]
    pub except_models: Vec<Glob>,
    /// The APIs the rule applies to.
    pub modes: Vec<Mode>,
    /// Fields to remove: `stream_options`, `messages[].reasoning_content`,
    /// `contents[].parts[].functionCall.id` (`[]`: every element of an array).
    pub remove: Vec<FieldPath>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesFile {
    rules: Vec<Rule>,
}

/// A rules file that does not parse: where, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesError {
    /// 1-based line of the problem.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for RulesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

impl std::error::Error for RulesError {}

impl ModelRules {
    /// The rules shipped with the filter ([`BUILTIN_RULES`]).
    pub fn builtin() -> Self {
        Self::parse(BUILTIN_RULES).expect("the built-in rules parse")
    }

    /// No rules at all.
    pub fn none() -> Self {
        Self { rules: Vec::new() }
    }

    /// Parses a rules file.
    pub fn parse(text: &str) -> Result<Self, RulesError> {
        let file: RulesFile = serde_json::from_str(text).map_err(|err| {
            let message = err.to_string();
            // serde_json appends " at line L column C"; the line is reported on its own.
            let message = message
                .rsplit_once(" at line ")
                .map_or(message.as_str(), |(head, _)| head)
                .to_owned();
            RulesError {
                line: err.line().max(1),
                column: err.column(),
                message,
            }
        })?;
        Ok(Self { rules: file.rules })
    }

    /// Every rule, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The fields to remove from a request of `mode` for `model` (`None`: no model named, and
    /// then only rules for every model, `*`, apply).
    pub fn removals(&self, mode: Mode, model: Option<&str>) -> Vec<&FieldPath> {
        self.rules
            .iter()
            .filter(|rule| rule.applies(mode, model))
            .flat_map(|rule| &rule.remove)
            .collect()
    }
}

impl Rule {
    /// Whether this rule applies to a request of `mode` for `model`.
    pub fn applies(&self, mode: Mode, model: Option<&str>) -> bool {
        if !self.modes.contains(&mode) {
            return false;
        }
        match model {
            Some(model) => {
                self.models.iter().any(|glob| glob.matches(model))
                    && !self.except_models.iter().any(|glob| glob.matches(model))
            }
            None => self.models.iter().any(|glob| glob.0 == "*") && self.except_models.is_empty(),
        }
    }
}

/// A model name pattern: `*` matches any run of characters, `?` one; case-insensitive.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct Glob(String);

impl TryFrom<String> for Glob {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        if text.trim().is_empty() {
            return Err("a model glob must not be empty".to_owned());
        }
        Ok(Glob(text.to_ascii_lowercase()))
    }
}

impl Glob {
    /// Whether `name` matches.
    pub fn matches(&self, name: &str) -> bool {
        let (pattern, text) = (self.0.as_bytes(), name.as_bytes());
        // The usual shapes, `*` and `*family*`, are checked without backtracking: every
        // request is matched against every rule.
        match pattern {
            [b'*'] => true,
            [b'*', inner @ .., b'*'] if !inner.contains(&b'*') && !inner.contains(&b'?') => {
                contains_ignoring_case(text, inner)
            }
            _ => glob_match(pattern, text),
        }
    }
}

/// Whether `text` holds `lower` (lower case already), compared without case: memchr finds
/// where the first letter is, in either case, and only there is the rest compared.
fn contains_ignoring_case(text: &[u8], lower: &[u8]) -> bool {
    let Some((&first, rest)) = lower.split_first() else {
        return true;
    };
    let Some(last_start) = text.len().checked_sub(lower.len()) else {
        return false;
    };
    memchr::memchr2_iter(first, first.to_ascii_uppercase(), &text[..=last_start]).any(|at| {
        text[at + 1..at + lower.len()]
            .iter()
            .zip(rest)
            .all(|(t, l)| t.to_ascii_lowercase() == *l)
    })
}

/// Iterative wildcard match with one backtrack point: linear in practice, never exponential.
/// `pattern` is lower case already; `text` is compared without case.
pub(crate) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t].to_ascii_lowercase() => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// A field to remove: member names separated by `.`, a name followed by `[]` standing for
/// every element of the array it holds.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct FieldPath {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Segment {
    name: String,
    each: bool,
}

impl TryFrom<String> for FieldPath {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        let mut segments = Vec::new();
        for part in text.split('.') {
            let (name, each) = match part.strip_suffix("[]") {
                Some(name) => (name, true),
                None => (part, false),
            };
            if name.is_empty() || name.contains(['[', ']']) {
                return Err(format!(
                    "field path {text:?}: each part is a member name, optionally followed by []"
                ));
            }
            segments.push(Segment {
                name: name.to_owned(),
                each,
            });
        }
        if segments.last().is_some_and(|last| last.each) {
            return Err(format!(
                "field path {text:?} must end in a member name, not []"
            ));
        }
        Ok(FieldPath { text, segments })
    }
}

impl FieldPath {
    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The top-level member this path starts at.
    pub fn head(&self) -> &str {
        &self.segments[0].name
    }

    /// The name of the member it removes.
    pub fn leaf(&self) -> &str {
        &self.segments[self.segments.len() - 1].name
    }

    /// Whether it removes a top-level member.
    pub fn is_top_level(&self) -> bool {
        self.segments.len() == 1
    }

    /// Removes what this path names from `request`; returns how many members went.
    pub fn remove_from(&self, request: &mut Map<String, Value>) -> u64 {
        remove_in_map(request, &self.segments)
    }
}

fn remove_in_map(map: &mut Map<String, Value>, segments: &[Segment]) -> u64 {
    let Some((first, rest)) = segments.split_first() else {
        return 0;
    };
    if rest.is_empty() {
        return u64::from(map.shift_remove(&first.name).is_some());
    }
    match map.get_mut(&first.name) {
        Some(Value::Array(items)) if first.each => items
            .iter_mut()
            .filter_map(Value::as_object_mut)
            .map(|item| remove_in_map(item, rest))
            .sum(),
        Some(Value::Object(inner)) if !first.each => remove_in_map(inner, rest),
        _ => 0,
    }
}

/// What a request is, for the rules.
#[derive(Clone, Debug)]
pub struct RequestContext<'a> {
    /// The API the request is for.
    pub mode: Mode,
    /// The model, when the body does not name it (Gemini names it in the URL path).
    pub model: Option<&'a str>,
    /// Ask for usage on a streamed chat request that did not (`PROXY_STREAM_USAGE=inject`),
    /// unless a rule removes `stream_options` for its model.
    pub inject_stream_usage: bool,
}

impl RequestContext<'_> {
    /// A request of `mode`, its model named in the body, no usage injected.
    pub fn new(mode: Mode) -> Self {
        RequestContext {
            mode,
            model: None,
            inject_stream_usage: false,
        }
    }
}

/// Applies `removals` (and the usage request) to a parsed request; reports what changed.
pub(crate) fn apply_to_value(
    request: &mut Map<String, Value>,
    removals: &[&FieldPath],
    inject_usage: bool,
    report: &mut FilterReport,
) {
    for path in removals {
        let removed = path.remove_from(request);
        if removed > 0 {
            report.add(action_for(path), removed);
        }
    }
    if inject_usage && wants_usage_injected(request, removals) {
        request.insert(
            "stream_options".to_owned(),
            serde_json::json!({"include_usage": true}),
        );
        report.bump(FilterAction::StreamUsageRequested);
    }
}

/// A streamed request without `stream_options`, for a model no rule takes it from.
fn wants_usage_injected(request: &Map<String, Value>, removals: &[&FieldPath]) -> bool {
    request.get("stream") == Some(&Value::Bool(true))
        && !request.contains_key("stream_options")
        && !removals
            .iter()
            .any(|path| path.is_top_level() && path.head() == "stream_options")
}

pub(crate) fn action_for(path: &FieldPath) -> FilterAction {
    if path.is_top_level() && path.head() == "stream_options" {
        FilterAction::StreamOptionsRemoved
    } else {
        FilterAction::ModelFieldRemoved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn globs_match_as_documented() {
        let cases: &[(&str, &str, bool)] = &[
            ("*gemini*", "databricks-gemini-2-5-pro", true),
            ("*gemini*", "Databricks-GEMINI-3", true),
            ("*gemini*", "databricks-claude-sonnet-4-5", false),
            ("databricks-claude-*", "databricks-claude-opus-4-1", true),
            ("databricks-claude-*", "my-databricks-claude", false),
            ("gpt-?", "gpt-5", true),
            ("gpt-?", "gpt-55", false),
            ("*", "", true),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "aXXbYY", false),
            ("**", "x", true),
        ];
        for (glob, name, expected) in cases {
            let glob = Glob::try_from((*glob).to_owned()).unwrap();
            assert_eq!(glob.matches(name), *expected, "{glob:?} {name}");
        }
    }

    #[test]
    fn field_paths_remove_what_they_name() {
        let cases: &[(&str, Value, Value, u64)] = &[
            (
                "stream_options",
                json!({"stream_options": {"include_usage": true}, "a": 1}),
                json!({"a": 1}),
                1,
            ),
            (
                "messages[].reasoning_content",
                json!({"messages": [{"role": "assistant", "reasoning_content": "x", "content": "y"},
                                    {"role": "user", "content": "z"}, "not an object"]}),
                json!({"messages": [{"role": "assistant", "content": "y"},
                                    {"role": "user", "content": "z"}, "not an object"]}),
                1,
            ),
            (
                "contents[].parts[].functionCall.id",
                json!({"contents": [{"role": "model", "parts": [
                    {"functionCall": {"id": "c1", "name": "ls", "args": {}}},
                    {"text": "id"}]}]}),
                json!({"contents": [{"role": "model", "parts": [
                    {"functionCall": {"name": "ls", "args": {}}},
                    {"text": "id"}]}]}),
                1,
            ),
            // A shape that does not fit is left alone.
            (
                "messages[].reasoning_content",
                json!({"messages": {"reasoning_content": "x"}}),
                json!({"messages": {"reasoning_content": "x"}}),
                0,
            ),
            ("a.b", json!({"a": [{"b": 1}]}), json!({"a": [{"b": 1}]}), 0),
        ];
        for (path, before, after, count) in cases {
            let path = FieldPath::try_from((*path).to_owned()).unwrap();
            let mut value = before.clone();
            let removed = path.remove_from(value.as_object_mut().unwrap());
            assert_eq!(&value, after, "{}", path.as_str());
            assert_eq!(removed, *count, "{}", path.as_str());
        }
    }

    #[test]
    fn bad_field_paths_are_refused() {
        for path in ["", "a..b", "a[]", "a[0].b", "[].a", "a.[]"] {
            assert!(FieldPath::try_from(path.to_owned()).is_err(), "{path:?}");
        }
    }

    #[test]
    fn rules_apply_by_mode_and_model() {
        let rules = ModelRules::parse(
            r#"{"rules": [
                {"name": "a", "models": ["*gemini*"], "modes": ["chat"], "remove": ["stream_options"]},
                {"name": "b", "models": ["*"], "except_models": ["*gpt-5*"], "modes": ["chat", "responses"],
                 "remove": ["verbosity"]}
            ]}"#,
        )
        .unwrap();
        let names = |mode, model| -> Vec<&str> {
            rules
                .removals(mode, model)
                .into_iter()
                .map(FieldPath::as_str)
                .collect()
        };
        assert_eq!(
            names(Mode::Chat, Some("databricks-gemini-2-5-pro")),
            ["stream_options", "verbosity"]
        );
        assert_eq!(
            names(Mode::Chat, Some("databricks-gpt-5")),
            Vec::<&str>::new()
        );
        assert_eq!(
            names(Mode::Responses, Some("databricks-gemini-2-5-pro")),
            ["verbosity"]
        );
        assert_eq!(names(Mode::Anthropic, Some("x")), Vec::<&str>::new());
        // No model named: only rules for every model without exceptions.
        assert_eq!(names(Mode::Chat, None), Vec::<&str>::new());
    }

    #[test]
    fn bad_rules_files_say_which_line() {
        let cases: &[(&str, usize, &str)] = &[
            (
                "{\"rules\": [\n{\"name\": \"a\", \"models\": [\"*\"],\n\"modes\": [\"chats\"], \"remove\": []}]}",
                3,
                "unknown variant `chats`",
            ),
            (
                "{\"rules\": [\n{\"name\": \"a\", \"models\": [\"*\"], \"modes\": [],\n\n\"remove\": [\"a[]\"]}]}",
                4,
                "must end in a member name",
            ),
            (
                "{\"rules\": [\n{\"name\": \"a\",\n\"models\": [\"\"], \"modes\": [], \"remove\": []}]}",
                3,
                "must not be empty",
            ),
            (
                "{\"rules\": [\n{\"name\": \"a\", \"modes\": [], \"remove\": []}\n]}",
                2,
                "missing field `models`",
            ),
            (
                "{\"rules\": [\n{\"name\": \"a\", \"models\": [], \"modes\": [], \"remove\": [],\n \"colour\": 1}]}",
                3,
                "unknown field `colour`",
            ),
            ("{\"rules\": [\n", 2, "EOF"),
        ];
        for (text, line, message) in cases {
            let err = ModelRules::parse(text).unwrap_err();
            assert_eq!(err.line, *line, "{text:?}: {err}");
            assert!(err.message.contains(message), "{text:?}: {err}");
            assert!(!err.message.contains(" at line "), "{err}");
        }
    }

    #[test]
    fn the_builtin_rules_parse_and_each_has_a_reason() {
        let rules = ModelRules::builtin();
        assert!(!rules.rules().is_empty());
        for rule in rules.rules() {
            assert!(!rule.why.trim().is_empty(), "{} says not why", rule.name);
            assert!(!rule.remove.is_empty(), "{} removes nothing", rule.name);
        }
    }

    /// Each built-in rule, on the request it exists for: the field goes for the models and
    /// APIs it names, and stays for the others.
    #[test]
    fn each_builtin_rule_on_its_request() {
        use crate::RequestSanitizer;
        let chat = |model: &str, extra: Value| {
            let mut request =
                json!({"model": model, "messages": [{"role": "user", "content": "q"}]});
            for (key, value) in extra.as_object().unwrap() {
                request[key] = value.clone();
            }
            request
        };
        let replayed = json!({"messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a", "reasoning_content": "thought"},
            {"role": "user", "content": "q2"}]});
        let gemini_native = json!({"contents": [
            {"role": "model", "parts": [{"functionCall": {"id": "c1", "name": "ls", "args": {}}}]},
            {"role": "user", "parts": [{"functionResponse": {"id": "c1", "name": "ls", "response": {}}}]}]});
        let stream_options = json!({"stream": true, "stream_options": {"include_usage": true}});
        type Case<'a> = (&'a str, Mode, Option<&'a str>, Value, &'a [&'a str]);
        #[rustfmt::skip]
        let cases: Vec<Case<'_>> = vec![
            ("gemini-chat-refuses-stream-options", Mode::Chat, None,
             chat("databricks-gemini-2-5-pro", stream_options.clone()), &["stream_options"]),
            ("claude keeps stream_options and its usage", Mode::Chat, None,
             chat("databricks-claude-sonnet-4-5", stream_options.clone()), &[]),
            ("gemini on the Responses API is not the chat rule's business", Mode::Responses, None,
             chat("databricks-gemini-2-5-pro", stream_options), &[]),
            ("claude-chat-has-no-reasoning-effort", Mode::Chat, None,
             chat("databricks-claude-opus-4-1", json!({"reasoning_effort": "high"})), &["reasoning_effort"]),
            ("gpt-5 keeps reasoning_effort", Mode::Chat, None,
             chat("databricks-gpt-5", json!({"reasoning_effort": "high"})), &[]),
            ("verbosity-is-gpt-5-only", Mode::Chat, None,
             chat("databricks-claude-sonnet-4", json!({"verbosity": "low"})), &["verbosity"]),
            ("gpt-5 keeps verbosity", Mode::Chat, None,
             chat("databricks-gpt-5-mini", json!({"verbosity": "low"})), &[]),
            ("replayed-reasoning-content", Mode::Chat, None,
             chat("databricks-claude-sonnet-4-5", replayed.clone()), &["reasoning_content"]),
            ("other families keep reasoning_content", Mode::Chat, None,
             chat("databricks-qwen3-next-80b", replayed), &[]),
            ("gemini-native-function-call-id", Mode::Gemini, Some("databricks-gemini-2-5-pro"),
             gemini_native.clone(), &["\"id\""]),
            ("the Anthropic API keeps ids", Mode::Anthropic, None,
             gemini_native, &[]),
        ];
        let sanitizer = RequestSanitizer::new();
        let rules = ModelRules::builtin();
        for (name, mode, model, request, gone) in cases {
            let body = serde_json::to_vec(&request).unwrap();
            let context = RequestContext {
                model,
                ..RequestContext::new(mode)
            };
            let outcome = sanitizer.sanitize_for(&body, &rules, &context);
            let sent = String::from_utf8(outcome.body.clone().unwrap_or(body.clone())).unwrap();
            if gone.is_empty() {
                assert!(outcome.body.is_none(), "{name}: changed to {sent}");
            }
            for field in gone {
                assert!(!sent.contains(field), "{name}: {field} still in {sent}");
            }
            let original = String::from_utf8(body).unwrap();
            assert!(
                gone.iter().all(|f| original.contains(f)),
                "{name}: a bad case"
            );
        }
    }

    #[test]
    fn usage_is_injected_only_into_streamed_requests_without_it() {
        let stream_options = FieldPath::try_from("stream_options".to_owned()).unwrap();
        let cases: &[(Value, bool, bool)] = &[
            (json!({"stream": true}), false, true),
            (json!({"stream": true, "stream_options": {}}), false, false),
            (json!({"stream": false}), false, false),
            (json!({}), false, false),
            // A model whose rule removes stream_options gets none.
            (json!({"stream": true}), true, false),
        ];
        for (request, removed, injected) in cases {
            let mut request = request.as_object().unwrap().clone();
            let had = request.contains_key("stream_options");
            let removals: Vec<&FieldPath> = if *removed {
                vec![&stream_options]
            } else {
                vec![]
            };
            let mut report = FilterReport::default();
            apply_to_value(&mut request, &removals, true, &mut report);
            assert_eq!(
                report.get(FilterAction::StreamUsageRequested) == 1,
                *injected,
                "{request:?}"
            );
            if *injected {
                assert_eq!(request["stream_options"], json!({"include_usage": true}));
            } else if !had {
                assert!(!request.contains_key("stream_options"));
            }
        }
    }
}
