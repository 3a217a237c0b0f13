//! Messages parsed for the rules with only the members the rules read built as a `Value`.
//!
//! A `Value` costs several times the JSON it is parsed from, and far more for many small values
//! (a number is 2 bytes of JSON and 32 of `Value`, before the array's spare capacity): one
//! message holding a long list of numbers took 38 times its size. The rules read a message's
//! `role`, `tool_call_id`, `content`, `tool_calls` and `function_call`, and of a content block
//! its `type`, `text`, `id`, `tool_use_id` and `content`. Every other member stands in the
//! `Value` as a placeholder string naming its raw text, and [`write_spliced`] writes that text back
//! in its place, byte for byte.

use serde_json::{Map, Value};

use super::{Needle, view};

/// Begins every placeholder. JSON can only produce a NUL in a string through the escape
/// `\u0000`, so a body without that text cannot hold a string that looks like one.
const MARKER: &str = "\u{0}fresh-filter-raw:";

/// Whether placeholders are safe for this text: nothing in it can be mistaken for one.
pub(crate) fn usable_for(text: &str) -> bool {
    static NUL: Needle = Needle::new(r"\u0000");
    !NUL.is_in(text.as_bytes())
}

/// The raw members set aside while parsing, indexed by their placeholders.
#[derive(Default)]
pub(crate) struct Aside<'a>(Vec<&'a str>);

/// What an object is to the rules, and so which of its members they read.
#[derive(Clone, Copy)]
enum Kind {
    /// A message: `role`, `tool_call_id`, `content`, `tool_calls` and `function_call`.
    Message,
    /// A content block: `type`, `text`, `id`, `tool_use_id` and `content`.
    Block,
    /// A tool call: only its `id`. Its arguments may be a whole file.
    Call,
}

impl Kind {
    /// Whether the rules read this member as a whole value.
    fn reads(self, key: &str) -> bool {
        match self {
            Kind::Message => matches!(key, "role" | "tool_call_id" | "function_call"),
            Kind::Block => matches!(key, "type" | "text" | "id" | "tool_use_id"),
            Kind::Call => key == "id",
        }
    }
}

/// One message for the rules, or `None` when it is not an object the view reads (a key given
/// twice): then only a full parse gives what a `Value` would hold.
pub(crate) fn message<'a>(raw: &'a str, aside: &mut Aside<'a>) -> Option<Value> {
    object(raw, Kind::Message, aside)
}

fn object<'a>(raw: &'a str, kind: Kind, aside: &mut Aside<'a>) -> Option<Value> {
    let members = view::checked_members(raw)?;
    let mut map = Map::with_capacity(members.len());
    for (key, value) in members {
        let value = match (kind, &*key) {
            // A `content` or block `text` string with more than whitespace in it is neither
            // changed nor judged by its words: it is copied as it came rather than parsed and
            // written anew.
            (Kind::Message | Kind::Block, "content") | (Kind::Block, "text")
                if view::is_text(value) =>
            {
                set_aside(value, aside)
            }
            (Kind::Message | Kind::Block, "content") => list(value, Kind::Block, aside)?,
            (Kind::Message, "tool_calls") => list(value, Kind::Call, aside)?,
            (kind, key) if kind.reads(key) => serde_json::from_str(value).ok()?,
            _ => set_aside(value, aside),
        };
        map.insert(key.into_owned(), value);
    }
    Some(Value::Object(map))
}

/// The placeholder for `raw`, which is kept to be written back as it came.
fn set_aside<'a>(raw: &'a str, aside: &mut Aside<'a>) -> Value {
    aside.0.push(raw);
    Value::String(format!("{MARKER}{}", aside.0.len() - 1))
}

/// A list whose objects are read as [`object`] reads a `kind`; anything but a list whole.
fn list<'a>(raw: &'a str, kind: Kind, aside: &mut Aside<'a>) -> Option<Value> {
    let Some(items) = view::elements(raw) else {
        return serde_json::from_str(raw).ok();
    };
    items
        .into_iter()
        .map(|item| {
            if item.starts_with('{') {
                object(item, kind, aside)
            } else {
                serde_json::from_str(item).ok()
            }
        })
        .collect::<Option<Vec<_>>>()
        .map(Value::Array)
}

/// `value` written as compact JSON (as `serde_json::to_writer` writes it), with every
/// placeholder replaced by the raw text it stands for.
pub(crate) fn write_spliced(value: &Value, aside: &Aside<'_>, out: &mut Vec<u8>) {
    match value {
        Value::String(text) => match text
            .strip_prefix(MARKER)
            .and_then(|n| n.parse::<usize>().ok())
            .and_then(|n| aside.0.get(n))
        {
            Some(raw) => out.extend_from_slice(raw.as_bytes()),
            None => write_str(text, out),
        },
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_spliced(item, aside, out);
            }
            out.push(b']');
        }
        Value::Object(members) => {
            out.push(b'{');
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_str(key, out);
                out.push(b':');
                write_spliced(value, aside, out);
            }
            out.push(b'}');
        }
        // Writing a `Value` into a `Vec` cannot fail.
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

fn write_str(text: &str, out: &mut Vec<u8>) {
    // Writing a `str` into a `Vec` cannot fail.
    let _ = serde_json::to_writer(&mut *out, text);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(text: &str) -> (Value, String) {
        let mut aside = Aside::default();
        let value = message(text, &mut aside).unwrap();
        let mut written = Vec::new();
        write_spliced(&value, &aside, &mut written);
        (value, String::from_utf8(written).unwrap())
    }

    #[test]
    fn members_the_rules_do_not_read_are_set_aside_and_written_back_as_they_came() {
        let text = r#"{"role":"user","x":[1,2.50,{"a":null}],"content":[{"type":"text","text":" ","cache_control":{"type":"ephemeral"}},{"type":"image","source":{"data":"AAAA"}},"s",{"type":"tool_result","tool_use_id":"t","content":[{"type":"text","text":"ok\u00e9\n","extra":1e3},{"type":"text","text":"\t "}]}],"tool_calls":[{"id":"c","function":{"name":"f","arguments":"{\"a\": 1}"}},"raw"]}"#;
        let (value, written) = round_trip(text);
        assert_eq!(written, text);
        assert_eq!(value["role"], "user");
        // Blank text is read: the rules drop it.
        assert_eq!(value["content"][0]["text"], " ");
        assert_eq!(value["content"][3]["content"][1]["text"], "\t ");
        assert_eq!(value["content"][2], "s");
        assert_eq!(value["content"][3]["tool_use_id"], "t");
        assert_eq!(value["tool_calls"][0]["id"], "c");
        assert_eq!(value["tool_calls"][1], "raw");
        for set_aside in [
            &value["x"],
            &value["content"][0]["cache_control"],
            &value["content"][1]["source"],
            // Text with words in it is never changed: copied, escapes and all.
            &value["content"][3]["content"][0]["text"],
            &value["content"][3]["content"][0]["extra"],
            // Of a tool call, only the id is read.
            &value["tool_calls"][0]["function"],
        ] {
            assert!(
                set_aside.as_str().unwrap().starts_with(MARKER),
                "{set_aside}"
            );
        }
    }

    #[test]
    fn string_content_is_read_only_when_blank() {
        let (value, written) =
            round_trip(r#"{"role":"assistant","content":" \n","tool_calls":[]}"#);
        assert_eq!(value["content"], " \n");
        assert_eq!(
            written,
            r#"{"role":"assistant","content":" \n","tool_calls":[]}"#
        );
        let text = r#"{"role":"tool","tool_call_id":"c","content":"fn main() {}\n"}"#;
        let (value, written) = round_trip(text);
        assert!(value["content"].as_str().unwrap().starts_with(MARKER));
        assert_eq!(written, text);
    }

    #[test]
    fn keys_given_twice_and_bodies_with_nul_escapes_are_not_read_this_way() {
        assert!(message(r#"{"role":"user","role":"tool"}"#, &mut Aside::default()).is_none());
        assert!(!usable_for(r#"{"a":"\u0000fresh"}"#));
        assert!(usable_for(r#"{"a":"x\n"}"#));
    }
}
