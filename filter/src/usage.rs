//! Token usage read from answers: whole JSON bodies and event streams, for every API.
//!
//! The counts mean the same on every API: `input` is every prompt token (cached ones
//! included), `cached` the part of it served from a prompt cache, `output` every generated
//! token. The APIs spell them differently:
//!
//! | API | input | cached | output |
//! |---|---|---|---|
//! | chat completions | `prompt_tokens` | `prompt_tokens_details.cached_tokens` | `completion_tokens` |
//! | Responses | `input_tokens` | `input_tokens_details.cached_tokens` | `output_tokens` |
//! | Anthropic Messages | `input_tokens` + `cache_creation_input_tokens` + `cache_read_input_tokens` | `cache_read_input_tokens` | `output_tokens` |
//! | Gemini | `promptTokenCount` | `cachedContentTokenCount` | `candidatesTokenCount` + `thoughtsTokenCount` |
//!
//! In a stream, usage comes in the last chunk (chat, with `stream_options.include_usage`), in
//! `response.completed` (Responses), split between `message_start` and the cumulative
//! `message_delta` (Anthropic), or in every chunk, cumulatively (Gemini). [`UsageScanner`] reads
//! a stream's bytes as they pass without changing them, holding at most one line.
//!
//! ```
//! use fresh_filter::{Mode, Usage, UsageScanner};
//!
//! let mut scanner = UsageScanner::new(Mode::Anthropic);
//! scanner.push(b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":");
//! scanner.push(b"{\"input_tokens\":25,\"cache_read_input_tokens\":100,\"output_tokens\":1}}}\n\n");
//! scanner.push(b"event: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":15}}\n\n");
//! assert_eq!(scanner.finish(), Some(Usage { input: 125, output: 15, cached: 100 }));
//! ```

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

use super::Needle;
use super::rules::Mode;
use super::view::Obj;

/// Tokens one answer used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input: u64,
    /// Generated tokens.
    pub output: u64,
    /// Prompt tokens served from a cache.
    pub cached: u64,
}

/// The usage a whole JSON answer reports, if any.
pub fn usage_of_json(mode: Mode, body: &[u8]) -> Option<Usage> {
    if !may_name_usage(body) {
        return None;
    }
    let members = usage_members(body)?;
    let mut state = State::default();
    state.read(mode, &members);
    state.usage
}

/// The members of a JSON object that [`State::read`] looks at, read into the counts they hold;
/// the rest (an answer's text, its tool calls) is skipped over without being kept. `None`: not
/// a JSON object, or one that gives one of these keys twice.
fn usage_members(body: &[u8]) -> Option<UsageMembers> {
    serde_json::from_slice(body).ok()
}

/// At the top of an answer, `null` counts as absent (serde reads it as `None`); inside a
/// member it is a value that is not an object, as in a `Value`.
#[derive(Default, Deserialize)]
struct UsageMembers {
    #[serde(default)]
    usage: Option<Obj<Counts>>,
    #[serde(default)]
    response: Option<Obj<Nested>>,
    #[serde(default)]
    message: Option<Obj<Nested>>,
    #[serde(default, rename = "usageMetadata")]
    usage_metadata: Option<Obj<Counts>>,
}

/// What `obj` holds when it is an object.
fn object<T>(obj: &Obj<T>) -> Option<&T> {
    match obj {
        Obj::Map(inner) => Some(inner),
        Obj::Absent | Obj::Other => None,
    }
}

/// A count: a non-negative integer, or nothing for any other value.
#[derive(Clone, Copy, Default)]
struct Count(Option<u64>);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct CountVisitor;

        impl<'de> Visitor<'de> for CountVisitor {
            type Value = Count;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_u64<E>(self, n: u64) -> Result<Count, E> {
                Ok(Count(Some(n)))
            }

            fn visit_unit<E>(self) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_bool<E>(self, _: bool) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_i64<E>(self, _: i64) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_f64<E>(self, _: f64) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_str<E>(self, _: &str) -> Result<Count, E> {
                Ok(Count(None))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Count, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| Count(None))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Count, A::Error> {
                IgnoredAny.visit_map(map).map(|_| Count(None))
            }
        }

        deserializer.deserialize_any(CountVisitor)
    }
}

/// Reads an object's members by key, the last of a key given twice winning (as in a
/// `serde_json::Value`); keys not named are skipped.
macro_rules! last_wins {
    ($(#[$meta:meta])* struct $name:ident { $($field:ident: $ty:ty = $key:literal,)* }) => {
        $(#[$meta])*
        #[derive(Default)]
        struct $name {
            $($field: $ty,)*
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                /// A key, unescaped: one of the members read, or any other.
                #[allow(non_camel_case_types)]
                enum Field {
                    $($field,)*
                    Other,
                }

                impl<'de> Deserialize<'de> for Field {
                    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                        struct FieldVisitor;

                        impl Visitor<'_> for FieldVisitor {
                            type Value = Field;

                            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                                f.write_str("an object key")
                            }

                            fn visit_str<E>(self, key: &str) -> Result<Field, E> {
                                Ok(match key {
                                    $($key => Field::$field,)*
                                    _ => Field::Other,
                                })
                            }
                        }

                        deserializer.deserialize_str(FieldVisitor)
                    }
                }

                struct MapVisitor;

                impl<'de> Visitor<'de> for MapVisitor {
                    type Value = $name;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("an object")
                    }

                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$name, A::Error> {
                        let mut read = $name::default();
                        while let Some(field) = map.next_key::<Field>()? {
                            match field {
                                $(Field::$field => read.$field = map.next_value()?,)*
                                Field::Other => {
                                    map.next_value::<IgnoredAny>()?;
                                }
                            }
                        }
                        Ok(read)
                    }
                }

                deserializer.deserialize_map(MapVisitor)
            }
        }
    };
}

last_wins! {
    /// The counts of a `usage` or `usageMetadata` object, in every API's spelling.
    struct Counts {
        prompt_tokens: Count = "prompt_tokens",
        completion_tokens: Count = "completion_tokens",
        input_tokens: Count = "input_tokens",
        output_tokens: Count = "output_tokens",
        cache_creation_input_tokens: Count = "cache_creation_input_tokens",
        cache_read_input_tokens: Count = "cache_read_input_tokens",
        prompt_tokens_details: Obj<Details> = "prompt_tokens_details",
        input_tokens_details: Obj<Details> = "input_tokens_details",
        prompt_token_count: Count = "promptTokenCount",
        candidates_token_count: Count = "candidatesTokenCount",
        thoughts_token_count: Count = "thoughtsTokenCount",
        cached_content_token_count: Count = "cachedContentTokenCount",
    }
}

last_wins! {
    /// `prompt_tokens_details` or `input_tokens_details`.
    struct Details {
        cached_tokens: Count = "cached_tokens",
    }
}

last_wins! {
    /// An object that holds a `usage` of its own: a Responses event's `response`, an
    /// Anthropic `message_start`'s `message`.
    struct Nested {
        usage: Obj<Counts> = "usage",
    }
}

#[derive(Default)]
struct State {
    usage: Option<Usage>,
}

impl State {
    /// One JSON document (a whole answer or one event) of `mode`.
    fn read(&mut self, mode: Mode, members: &UsageMembers) {
        match mode {
            Mode::Chat | Mode::Responses => {
                // Responses events carry the answer in `response`; whole answers at the top.
                let usage = match (&members.usage, &members.response) {
                    (Some(usage), _) => object(usage),
                    (None, Some(Obj::Map(response))) => object(&response.usage),
                    (None, _) => None,
                };
                if let Some(usage) = usage.and_then(openai_usage) {
                    self.usage = Some(usage);
                }
            }
            Mode::Anthropic => self.read_anthropic(members),
            Mode::Gemini => {
                if let Some(usage) = members.usage_metadata.as_ref().and_then(object)
                    && let Some(usage) = gemini_usage(usage)
                {
                    self.usage = Some(usage);
                }
            }
            Mode::Passthrough => {}
        }
    }

    fn read_anthropic(&mut self, members: &UsageMembers) {
        // `message_start` holds the message (input counts, a first output count); a whole
        // answer and `message_delta` hold `usage` at the top, the delta's counts cumulative.
        let usage = match &members.message {
            Some(Obj::Map(message)) if !matches!(message.usage, Obj::Absent) => {
                object(&message.usage)
            }
            _ => members.usage.as_ref().and_then(object),
        };
        let Some(usage) = usage else {
            return;
        };
        let current = self.usage.get_or_insert_with(Usage::default);
        let parts = [
            usage.input_tokens.0,
            usage.cache_creation_input_tokens.0,
            usage.cache_read_input_tokens.0,
        ];
        if parts.iter().any(Option::is_some) {
            current.input = parts.iter().flatten().sum();
            current.cached = parts[2].unwrap_or(0);
        }
        if let Some(output) = usage.output_tokens.0 {
            current.output = output;
        }
    }
}

fn openai_usage(usage: &Counts) -> Option<Usage> {
    let input = usage.prompt_tokens.0.or(usage.input_tokens.0)?;
    let output = usage
        .completion_tokens
        .0
        .or(usage.output_tokens.0)
        .unwrap_or(0);
    let cached = [&usage.prompt_tokens_details, &usage.input_tokens_details]
        .into_iter()
        .find_map(|details| object(details)?.cached_tokens.0)
        .unwrap_or(0);
    Some(Usage {
        input,
        output,
        cached,
    })
}

fn gemini_usage(usage: &Counts) -> Option<Usage> {
    let input = usage.prompt_token_count.0?;
    Some(Usage {
        input,
        output: usage.candidates_token_count.0.unwrap_or(0)
            + usage.thoughts_token_count.0.unwrap_or(0),
        cached: usage.cached_content_token_count.0.unwrap_or(0),
    })
}

/// The longest line kept while looking for usage; a longer one is skipped (the bytes still pass
/// to the client, unchanged).
const MAX_LINE: usize = 1 << 20;

/// Reads the usage of an event stream from its bytes, in chunks as they arrive.
#[derive(Debug)]
pub struct UsageScanner {
    mode: Mode,
    line: Vec<u8>,
    /// The current line grew past [`MAX_LINE`]: ignore it up to its end.
    skipping: bool,
    /// The last chunk ended in `\r`: a `\n` starting the next one ends no further line.
    after_cr: bool,
    data: Vec<u8>,
    usage: Option<Usage>,
}

impl UsageScanner {
    /// A scanner for a stream of `mode`.
    pub fn new(mode: Mode) -> Self {
        UsageScanner {
            mode,
            line: Vec::new(),
            skipping: false,
            after_cr: false,
            data: Vec::new(),
            usage: None,
        }
    }

    /// The next bytes of the stream.
    pub fn push(&mut self, mut chunk: &[u8]) {
        if std::mem::take(&mut self.after_cr) && chunk.first() == Some(&b'\n') {
            chunk = &chunk[1..];
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\n' || b == b'\r') {
            if self.skipping {
            } else if self.line.is_empty() {
                // A whole line in this chunk is read where it lies.
                self.on_line(&chunk[..end]);
            } else {
                self.line.extend_from_slice(&chunk[..end]);
                let line = std::mem::take(&mut self.line);
                self.on_line(&line);
            }
            self.line.clear();
            self.skipping = false;
            // `\r\n` ends one line, not two.
            let skip = if chunk[end] == b'\r' && chunk.get(end + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
            if skip == 1 && chunk[end] == b'\r' && end + 1 == chunk.len() {
                self.after_cr = true;
            }
            chunk = &chunk[end + skip..];
        }
        if !self.skipping {
            self.line.extend_from_slice(chunk);
            if self.line.len() > MAX_LINE {
                self.line.clear();
                self.skipping = true;
            }
        }
        // Kept only while a line or an event is cut off: a stream between events holds no
        // buffer.
        if self.line.is_empty() {
            self.line = Vec::new();
        }
        if self.data.is_empty() {
            self.data = Vec::new();
        }
    }

    /// The usage the stream reported, counting an event its end cut off (no blank line after
    /// it) if it is whole.
    pub fn finish(mut self) -> Option<Usage> {
        if !self.skipping && !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.on_line(&line);
        }
        self.dispatch();
        self.usage
    }

    fn on_line(&mut self, line: &[u8]) {
        if line.is_empty() {
            self.dispatch();
            return;
        }
        if let Some(value) = line.strip_prefix(b"data:") {
            let value = value.strip_prefix(b" ").unwrap_or(value);
            if self.data.len() + value.len() > MAX_LINE {
                self.data.clear();
                return;
            }
            if !self.data.is_empty() {
                self.data.push(b'\n');
            }
            self.data.extend_from_slice(value);
        }
    }

    fn dispatch(&mut self) {
        if self.data.is_empty() {
            return;
        }
        let data = std::mem::take(&mut self.data);
        if data.first() == Some(&b'{')
            && may_name_usage(&data)
            && let Some(members) = usage_members(&data)
        {
            let mut state = State { usage: self.usage };
            state.read(self.mode, &members);
            self.usage = state.usage;
        }
        self.data = data;
        self.data.clear();
    }
}

/// Whether a payload may hold a `usage` or `usageMetadata` member: most events of a stream
/// hold neither, and are not parsed. A key can only spell `usage` without those letters in a
/// row through `\u` escapes, so a payload with one is parsed too.
fn may_name_usage(data: &[u8]) -> bool {
    static USAGE: Needle = Needle::new("usage");
    static ESCAPE: Needle = Needle::new("\\u");
    USAGE.is_in(data) || ESCAPE.is_in(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_answers() {
        let cases: &[(Mode, &str, Option<Usage>)] = &[
            (
                Mode::Chat,
                r#"{"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 9, "total_tokens": 21,
                    "prompt_tokens_details": {"cached_tokens": 4}}}"#,
                Some(Usage {
                    input: 12,
                    output: 9,
                    cached: 4,
                }),
            ),
            (
                Mode::Responses,
                r#"{"object": "response", "usage": {"input_tokens": 30, "output_tokens": 7,
                    "input_tokens_details": {"cached_tokens": 0}, "total_tokens": 37}}"#,
                Some(Usage {
                    input: 30,
                    output: 7,
                    cached: 0,
                }),
            ),
            (
                Mode::Anthropic,
                r#"{"type": "message", "usage": {"input_tokens": 10, "cache_creation_input_tokens": 5,
                    "cache_read_input_tokens": 20, "output_tokens": 3}}"#,
                Some(Usage {
                    input: 35,
                    output: 3,
                    cached: 20,
                }),
            ),
            (
                Mode::Gemini,
                r#"{"candidates": [], "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 2,
                    "thoughtsTokenCount": 5, "cachedContentTokenCount": 1}}"#,
                Some(Usage {
                    input: 8,
                    output: 7,
                    cached: 1,
                }),
            ),
            (Mode::Chat, r#"{"choices": [], "usage": null}"#, None),
            // Odd shapes read as a `serde_json::Value` of the answer reads them.
            (
                Mode::Responses,
                r#"{"usage": null, "response": {"usage": {"input_tokens": 5, "output_tokens": 1}}}"#,
                Some(Usage {
                    input: 5,
                    output: 1,
                    cached: 0,
                }),
            ),
            (
                Mode::Chat,
                r#"{"usage": "n/a", "response": {"usage": {"prompt_tokens": 5}}}"#,
                None,
            ),
            (
                Mode::Chat,
                r#"{"usage": {"prompt_tokens": 2.0, "input_tokens": 4, "prompt_tokens": -1,
                    "prompt_tokens_details": {"cached_tokens": null},
                    "input_tokens_details": {"cached_tokens": 3}}}"#,
                Some(Usage {
                    input: 4,
                    output: 0,
                    cached: 3,
                }),
            ),
            (
                Mode::Chat,
                r#"{"usage": {"prompt_tokens": 1, "prompt_tokens": 7, "completion_tokens": "2"}}"#,
                Some(Usage {
                    input: 7,
                    output: 0,
                    cached: 0,
                }),
            ),
            (
                Mode::Chat,
                r#"{"usage": {"prompt_tokens": 1}, "usage": {}}"#,
                None,
            ),
            (
                Mode::Anthropic,
                r#"{"message": {"usage": null}, "usage": {"input_tokens": 3}}"#,
                None,
            ),
            (
                Mode::Anthropic,
                r#"{"message": {"id": "msg_1"}, "usage": {"input_tokens": 3}}"#,
                Some(Usage {
                    input: 3,
                    output: 0,
                    cached: 0,
                }),
            ),
            (
                Mode::Gemini,
                r#"{"usageMetadata": {"promptTokenCount": -1, "candidatesTokenCount": 4}}"#,
                None,
            ),
            (Mode::Chat, r#"not json"#, None),
            (
                Mode::Passthrough,
                r#"{"usage": {"prompt_tokens": 1}}"#,
                None,
            ),
        ];
        for (mode, body, expected) in cases {
            assert_eq!(usage_of_json(*mode, body.as_bytes()), *expected, "{body}");
            assert_eq!(
                crate::proptests::usage_through_a_value(*mode, body.as_bytes()),
                *expected,
                "through a Value: {body}"
            );
        }
    }

    /// Streams as the APIs send them; every split of the bytes gives the same usage.
    #[test]
    fn streams_in_any_chunking() {
        let cases: &[(Mode, &str, Option<Usage>)] = &[
            // A key spelled with escapes is still read: only payloads that can hold no
            // `usage` member are left unparsed.
            (
                Mode::Chat,
                concat!(
                    "data: {\"choices\":[{\"delta\":{\"content\":\"usage\"}}]}\n\n",
                    "data: {\"choices\":[],\"\\u0075sage\":{\"prompt_tokens\":3,\"completion_tokens\":2}}\n\n",
                    "data: [DONE]\n\n"
                ),
                Some(Usage {
                    input: 3,
                    output: 2,
                    cached: 0,
                }),
            ),
            (
                Mode::Chat,
                concat!(
                    "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\n",
                    "data: {\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
                    "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":9}}\n\n",
                    "data: [DONE]\n\n"
                ),
                Some(Usage {
                    input: 12,
                    output: 9,
                    cached: 0,
                }),
            ),
            (
                Mode::Chat,
                "data: {\"choices\":[{\"delta\":{\"content\":\"hi\"}}]}\n\ndata: [DONE]\n\n",
                None,
            ),
            (
                Mode::Responses,
                concat!(
                    "event: response.created\r\ndata: {\"type\":\"response.created\",\"sequence_number\":0,\"response\":{\"status\":\"in_progress\",\"usage\":null}}\r\n\r\n",
                    "event: response.output_text.delta\r\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"usage\"}\r\n\r\n",
                    "event: response.completed\r\ndata: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"usage\":{\"input_tokens\":30,\"output_tokens\":7,\"input_tokens_details\":{\"cached_tokens\":10}}}}\r\n\r\n"
                ),
                Some(Usage {
                    input: 30,
                    output: 7,
                    cached: 10,
                }),
            ),
            (
                Mode::Anthropic,
                concat!(
                    "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":25,\"cache_creation_input_tokens\":0,\"cache_read_input_tokens\":0,\"output_tokens\":1}}}\n\n",
                    "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
                    "event: ping\ndata: {\"type\":\"ping\"}\n\n",
                    "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n",
                    "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
                    "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n",
                    "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"
                ),
                Some(Usage {
                    input: 25,
                    output: 15,
                    cached: 0,
                }),
            ),
            (
                Mode::Gemini,
                concat!(
                    "data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":1}}\r\n\r\n",
                    "data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":8,\"candidatesTokenCount\":6}}\r\n\r\n"
                ),
                Some(Usage {
                    input: 8,
                    output: 6,
                    cached: 0,
                }),
            ),
            // Cut off at the end: the last whole event still counts.
            (
                Mode::Chat,
                "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}",
                Some(Usage {
                    input: 1,
                    output: 2,
                    cached: 0,
                }),
            ),
        ];
        for (mode, stream, expected) in cases {
            let bytes = stream.as_bytes();
            for size in [1, 2, 3, 7, 64, bytes.len().max(1)] {
                let mut scanner = UsageScanner::new(*mode);
                for chunk in bytes.chunks(size) {
                    scanner.push(chunk);
                }
                assert_eq!(
                    scanner.finish(),
                    *expected,
                    "{mode} in chunks of {size}: {stream}"
                );
            }
        }
    }

    #[test]
    fn an_overlong_line_is_skipped_and_the_rest_still_read() {
        let mut scanner = UsageScanner::new(Mode::Chat);
        scanner.push(b"data: {\"pad\":\"");
        scanner.push(&vec![b'x'; MAX_LINE + 10]);
        scanner.push(b"\"}\n\n");
        assert!(scanner.line.capacity() <= 2 * MAX_LINE + 64);
        scanner.push(b"data: {\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4}}\n\n");
        assert_eq!(
            scanner.finish(),
            Some(Usage {
                input: 3,
                output: 4,
                cached: 0
            })
        );
    }
}
