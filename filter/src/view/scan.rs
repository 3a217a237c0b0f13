//! Reading messages by a structural scan instead of serde.
//!
//! The text read here has already been checked by serde_json (it is part of a body the view has
//! split), so its structure can be followed by strings and nesting alone. [`messages`] cuts a
//! list and reads each message exactly as `serde_json::from_str::<Obj<Message>>` reads it, or
//! gives `None` for a message only the parser can tell about: a key or a compared string
//! written with an escape, a `\u` escape among the whitespace a text starts with, a key given
//! twice (serde's derive refuses it), or deep nesting. The caller then asks the parser, so the
//! scan never changes an answer, it only saves one. [`elements`] cuts a list and
//! [`object_members`] an object the same way.

use std::borrow::Cow;

use serde::de::IgnoredAny;

use super::{Block, Call, Message, Obj, Shape, Str};

/// Nesting past this is left to the parser, which has its own limit.
const MAX_DEPTH: usize = 64;

/// One message of a list as raw text, and what the scan read of it.
pub(super) type Scanned<'a> = (&'a str, Option<Obj<Message<'a>>>);

/// The elements of the list `text` (JSON serde_json has checked) as raw text, each with its
/// message as serde would read it, or `None` where only serde can tell; `None` when `text` is
/// not a list. One pass, where [`elements`] and a serde read of each message would take two.
pub(super) fn messages(text: &str) -> Option<Vec<Scanned<'_>>> {
    let mut scan = Scan { text, i: 0 };
    if scan.peek()? != b'[' {
        return None;
    }
    scan.items(|scan| {
        let start = scan.i;
        let view = scan.obj(0, Scan::message);
        if view.is_none() {
            scan.i = start;
            scan.skip()?;
        }
        Some((trim_json_end(&text[start..scan.i]), view))
    })
}

/// The elements of the list `text` (JSON serde_json has checked) as raw text; `None` when
/// `text` is not a list.
pub(super) fn elements(text: &str) -> Option<Vec<&str>> {
    let mut scan = Scan { text, i: 0 };
    if scan.peek()? != b'[' {
        return None;
    }
    scan.items(|scan| {
        let start = scan.i;
        scan.skip()?;
        Some(&text[start..scan.i])
    })
}

/// The members of the JSON object `text` (checked by serde_json), cut where serde_json cuts
/// them: each key as written, quotes included, and its value; `None` when `text` is not an
/// object.
pub(super) fn object_members(text: &str) -> Option<Vec<(&str, &str)>> {
    let mut scan = Scan { text, i: 0 };
    scan.space();
    if scan.peek()? != b'{' {
        return None;
    }
    let mut members = Vec::new();
    scan.each_member(|scan, key| {
        let start = scan.i;
        scan.skip()?;
        members.push((key, &text[start..scan.i]));
        Some(())
    })?;
    Some(members)
}

struct Scan<'a> {
    text: &'a str,
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.i).copied()
    }

    fn space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// Past `byte` and the space after it, if it comes next.
    fn eat(&mut self, byte: u8) -> bool {
        self.space();
        let here = self.peek() == Some(byte);
        if here {
            self.i += 1;
            self.space();
        }
        here
    }

    /// A string's contents as written, escapes and all; the scan stands on its opening quote.
    fn string(&mut self) -> Option<&'a str> {
        let start = self.i + 1;
        let end = after_string(self.text.as_bytes(), start)?;
        self.i = end;
        self.text.get(start..end - 1)
    }

    /// Past the value the scan stands on.
    fn skip(&mut self) -> Option<()> {
        let bytes = self.text.as_bytes();
        match *bytes.get(self.i)? {
            b'"' => self.i = after_string(bytes, self.i + 1)?,
            b'[' | b'{' => {
                let mut depth = 0usize;
                loop {
                    match *bytes.get(self.i)? {
                        b'"' => {
                            self.i = after_string(bytes, self.i + 1)?;
                            continue;
                        }
                        b'[' | b'{' => depth += 1,
                        b']' | b'}' => {
                            depth = depth.checked_sub(1)?;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            // A number or a literal runs to the next delimiter.
            _ => {
                let start = self.i;
                while let Some(b) = self.peek() {
                    if matches!(b, b',' | b']' | b'}' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
                if self.i == start {
                    return None;
                }
            }
        }
        Some(())
    }

    /// The members of the object the scan stands on. `field` reads the value of a key it knows
    /// and gives that field's number; for any other key it gives `None`, and the value is
    /// skipped. A key written with an escape, and a field given twice, are left to serde (whose
    /// derive refuses the second).
    fn members(
        &mut self,
        mut field: impl FnMut(&mut Self, &'a str) -> Option<Option<u32>>,
    ) -> Option<()> {
        let mut seen = 0u32;
        self.each_member(|scan, quoted| {
            let key = &quoted[1..quoted.len() - 1];
            if key.contains('\\') {
                return None;
            }
            match field(scan, key)? {
                Some(n) if seen & (1 << n) != 0 => return None,
                Some(n) => seen |= 1 << n,
                None => scan.skip()?,
            }
            Some(())
        })
    }

    /// Walks the object the scan stands on: `member` is given each key as written, quotes
    /// included, with the scan on its value, and must step past the value.
    fn each_member(
        &mut self,
        mut member: impl FnMut(&mut Self, &'a str) -> Option<()>,
    ) -> Option<()> {
        self.i += 1;
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            self.space();
            if self.peek()? != b'"' {
                return None;
            }
            let start = self.i;
            self.string()?;
            let key = &self.text[start..self.i];
            if !self.eat(b':') {
                return None;
            }
            member(self, key)?;
            if self.eat(b'}') {
                return Some(());
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// The items of the list the scan stands on.
    fn items<T>(&mut self, mut item: impl FnMut(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        self.i += 1;
        let mut out = Vec::new();
        if self.eat(b']') {
            return Some(out);
        }
        loop {
            self.space();
            out.push(item(self)?);
            if self.eat(b']') {
                return Some(out);
            }
            if !self.eat(b',') {
                return None;
            }
        }
    }

    /// `Obj<T>`: an object read by `read`, anything else `Other`.
    fn obj<T>(&mut self, depth: usize, read: fn(&mut Self, usize) -> Option<T>) -> Option<Obj<T>> {
        self.space();
        if self.peek()? == b'{' {
            return read(self, depth + 1).map(Obj::Map);
        }
        self.skip()?;
        Some(Obj::Other)
    }

    /// `Str`: a string without escapes, borrowed as serde borrows it.
    fn str(&mut self) -> Option<Str<'a>> {
        if self.peek()? != b'"' {
            self.skip()?;
            return Some(Str::Other);
        }
        let text = self.string()?;
        (!text.contains('\\')).then_some(Str::Text(Cow::Borrowed(text)))
    }

    /// `Shape<T>`, with a list read by `list`.
    fn shape<T>(
        &mut self,
        depth: usize,
        list: impl FnOnce(&mut Self, usize) -> Option<T>,
    ) -> Option<Shape<T>> {
        if depth > MAX_DEPTH {
            return None;
        }
        Some(match self.peek()? {
            b'"' => {
                if blank(self.string()?)? {
                    Shape::Blank
                } else {
                    Shape::Text
                }
            }
            b'[' => Shape::List(list(self, depth + 1)?),
            b'n' => {
                self.skip()?;
                Shape::Null
            }
            _ => {
                self.skip()?;
                Shape::Other
            }
        })
    }

    fn blocks(&mut self, depth: usize) -> Option<Vec<Obj<Block<'a>>>> {
        self.items(|scan| scan.obj(depth, Scan::block))
    }

    fn message(&mut self, depth: usize) -> Option<Message<'a>> {
        let mut message = Message::default();
        self.members(|scan, key| {
            let field = match key {
                "role" => {
                    message.role = scan.str()?;
                    0
                }
                "tool_call_id" => {
                    message.tool_call_id = scan.str()?;
                    1
                }
                "content" => {
                    message.content = scan.shape(depth, Scan::blocks)?;
                    2
                }
                "tool_calls" => {
                    message.tool_calls = scan.shape(depth, |scan, depth| {
                        scan.items(|s| s.obj(depth, Scan::call))
                    })?;
                    3
                }
                "function_call" => {
                    message.function_call = match scan.peek()? {
                        b'{' => Obj::Map(IgnoredAny),
                        _ => Obj::Other,
                    };
                    scan.skip()?;
                    4
                }
                _ => return Some(None),
            };
            Some(Some(field))
        })?;
        Some(message)
    }

    fn block(&mut self, depth: usize) -> Option<Block<'a>> {
        let mut block = Block::default();
        self.members(|scan, key| {
            let field = match key {
                "type" => {
                    block.kind = scan.str()?;
                    0
                }
                "text" => {
                    block.text = scan.shape(depth, |scan, _| scan.skip().map(|()| IgnoredAny))?;
                    1
                }
                "id" => {
                    block.id = scan.str()?;
                    2
                }
                "tool_use_id" => {
                    block.tool_use_id = scan.str()?;
                    3
                }
                "content" => {
                    block.content = scan.shape(depth, Scan::blocks)?;
                    4
                }
                _ => return Some(None),
            };
            Some(Some(field))
        })?;
        Some(block)
    }

    fn call(&mut self, _depth: usize) -> Option<Call<'a>> {
        let mut call = Call::default();
        self.members(|scan, key| {
            if key != "id" {
                return Some(None);
            }
            call.id = scan.str()?;
            Some(Some(0))
        })?;
        Some(call)
    }
}

/// Whether a string, as written between its quotes, holds only whitespace once unescaped (what
/// `Shape` asks of it); `None` for a `\u` escape among the whitespace.
pub(super) fn blank(written: &str) -> Option<bool> {
    let mut chars = written.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next()? {
                // `\n`, `\r`, `\t` and `\f` unescape to whitespace; `\b`, `\"`, `\\` and `\/`
                // do not.
                'n' | 'r' | 't' | 'f' => continue,
                'u' => return None,
                _ => return Some(false),
            }
        }
        if !c.is_whitespace() {
            return Some(false);
        }
    }
    Some(true)
}

/// Where a string whose contents start at `from` ends: just past its closing quote.
///
/// The search is for quotes alone, past any other escape (source code in a tool result has a
/// `\n` every line); a quote is the end unless an odd run of backslashes escapes it.
fn after_string(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    loop {
        i += memchr::memchr(b'"', bytes.get(i..)?)?;
        let backslashes = bytes[from..i]
            .iter()
            .rev()
            .take_while(|&&b| b == b'\\')
            .count();
        if backslashes % 2 == 0 {
            return Some(i + 1);
        }
        i += 1;
    }
}

fn trim_json_end(text: &str) -> &str {
    text.trim_end_matches([' ', '\t', '\n', '\r'])
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use serde_json::{Value, json};

    use super::*;
    use crate::proptests::{Json, MESSAGE_KEYS, config, vocabulary_json};

    /// Checks the scan of the list `text` against serde: the same elements, and where the scan
    /// reads a message, what serde reads. Returns how many messages the scan read.
    fn check(text: &str) -> Result<usize, TestCaseError> {
        let scanned = messages(text).expect("a list");
        let elements: Vec<&RawValue> = serde_json::from_str(text).unwrap();
        let raw: Vec<&str> = scanned.iter().map(|(raw, _)| *raw).collect();
        let want: Vec<&str> = elements.iter().map(|raw| raw.get()).collect();
        prop_assert_eq!(raw, want, "{}", text);
        let mut read = 0;
        for (raw, view) in scanned {
            if let Some(view) = view {
                let parsed = serde_json::from_str::<Obj<Message<'_>>>(raw).ok();
                prop_assert_eq!(Some(view), parsed, "{}", raw);
                read += 1;
            }
        }
        Ok(read)
    }

    #[test]
    fn messages_as_agents_send_them_are_scanned_as_serde_reads_them() {
        let list = json!([
            {"role": "system", "content": "You are a coding agent."},
            {"role": "user", "content": [{"type": "text", "text": "Fix the tests."}]},
            {"role": "assistant", "content": "Reading.", "tool_calls": [
                {"id": "toolu_01", "type": "function",
                 "function": {"name": "read", "arguments": "{\"path\":\"src/a.rs\"}"}}]},
            {"role": "tool", "tool_call_id": "toolu_01",
             "content": "fn main() {\n    println!(\"hi\");\n}\n"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "…", "signature": "c2ln"},
                {"type": "tool_use", "id": "toolu_02", "name": "ls", "input": {"dir": "."}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_02",
                 "content": [{"type": "text", "text": "a.rs\nb.rs"}]},
                {"type": "text", "text": " \n\t"}]},
            {"role": "assistant", "content": "", "function_call": {"name": "f"}},
            {"role": "assistant", "content": null, "tool_calls": []},
            {"role": "user", "content": "\u{a0}\n"},
            "not an object",
            [1, {"role": "user"}],
            -1.5e3
        ]);
        let count = list.as_array().unwrap().len();
        for text in [
            list.to_string(),
            serde_json::to_string_pretty(&list).unwrap(),
        ] {
            assert_eq!(check(&text).unwrap(), count, "every message read: {text}");
        }
    }

    #[test]
    fn what_only_serde_can_tell_is_left_to_it() {
        let cases = [
            // A key written with an escape is still `role`.
            r#"{"\u0072ole": "assistant", "content": "a"}"#,
            // A compared string with an escape.
            r#"{"role": "tool", "tool_call_id": "c\u0031", "content": "r"}"#,
            // Blank or not depends on what `\u00a0` is.
            r#"{"role": "user", "content": " \u00a0"}"#,
            // serde's derive refuses a field given twice.
            r#"{"role": "user", "role": "assistant", "content": "a"}"#,
            r#"{"role": "user", "content": [{"type": "text", "type": "text", "text": "a"}]}"#,
        ];
        for message in cases {
            let text = format!("[{message}, {{\"role\": \"user\", \"content\": \"q\"}}]");
            let scanned = messages(&text).unwrap();
            assert_eq!(scanned.len(), 2, "{text}");
            assert_eq!(scanned[0].0, message);
            assert!(scanned[0].1.is_none(), "{text}");
            assert!(scanned[1].1.is_some(), "{text}");
        }
    }

    #[test]
    fn blank_is_trim_on_the_unescaped_text() {
        let cases = [
            ("", Some(true)),
            ("  ", Some(true)),
            (r"\n\r\t\f ", Some(true)),
            ("\u{a0}\u{2003}", Some(true)),
            (r"\b", Some(false)),
            (r#"\""#, Some(false)),
            (r"\\", Some(false)),
            (r"\/", Some(false)),
            (r" \n x", Some(false)),
            (r"\u0020", None),
            (r"x\u0020", Some(false)),
        ];
        for (written, want) in cases {
            assert_eq!(blank(written), want, "{written:?}");
            if let Some(want) = want {
                let unescaped: String = serde_json::from_str(&format!("\"{written}\"")).unwrap();
                assert_eq!(unescaped.trim().is_empty(), want, "{written:?}");
            }
        }
    }

    /// Messages made of the words and shapes the verdicts look at, with strings that hold
    /// escapes, whitespace and quotes.
    fn message_json() -> impl Strategy<Value = Json> {
        let keys: Vec<&str> = MESSAGE_KEYS.iter().copied().chain(["other"]).collect();
        let string = prop_oneof![
            prop::sample::select(
                &[
                    "user",
                    "assistant",
                    "tool",
                    "text",
                    "tool_result",
                    "tool_use",
                    "c1"
                ][..]
            )
            .prop_map(|w| Json::Leaf(json!(w))),
            "[ \t\n\u{a0}\u{8}\u{c}\u{1}\"\\\\/a]{0,3}".prop_map(|s| Json::Leaf(Value::String(s))),
        ];
        let leaf = prop_oneof![
            4 => string,
            1 => Just(Json::Leaf(Value::Null)),
            1 => any::<bool>().prop_map(|b| Json::Leaf(Value::Bool(b))),
            1 => prop_oneof![Just(json!(0)), Just(json!(-12)), Just(json!(1.5e3))].prop_map(Json::Leaf),
        ];
        let message = leaf.prop_recursive(5, 48, 5, move |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::vec((prop::sample::select(keys.clone()), inner), 0..6)
                    .prop_map(Json::Object),
            ]
        });
        prop_oneof![message, vocabulary_json()]
    }

    proptest! {
        #![proptest_config(config(2000))]

        /// Where the scan reads a message, serde reads the same; where serde cannot read it,
        /// the scan does not either; and the list is cut where serde cuts it.
        #[test]
        fn the_scan_reads_messages_as_serde_does(
            list in prop::collection::vec(message_json(), 0..4),
            space in prop::sample::select(&["", " ", "\n\t "][..]),
            escape_keys in any::<bool>(),
        ) {
            let mut text = String::new();
            Json::Array(list).write_spaced(&mut text, space);
            if escape_keys {
                text = text.replace("\"role\"", "\"\\u0072ole\"");
            }
            check(&text)?;
        }
    }
}
