//! Finding the real tool name inside the arguments text of a `databricks-tool-call`.
//!
//! Works on text rather than a parsed value so that the arguments that stay keep their exact
//! bytes, and so that a prefix of streamed arguments can be judged before the rest arrives.

use std::ops::Range;

/// What the start of an arguments text says about its top-level `"name"` member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameScan {
    /// The text ends before a decision can be made.
    Incomplete,
    /// The text is not a JSON object whose top level holds a string `"name"`.
    Absent,
    /// The object's first top-level `"name"` is the string `name`; removing `cut` from the text
    /// removes that member and one adjacent comma, leaving the other members intact.
    Found { name: String, cut: Range<usize> },
}

/// Why scanning stopped early.
enum Stop {
    Incomplete,
    Invalid,
}

struct Cursor<'a> {
    text: &'a str,
    pos: usize,
}

impl Cursor<'_> {
    fn bytes(&self) -> &[u8] {
        self.text.as_bytes()
    }

    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.bytes().get(self.pos) {
            self.pos += 1;
        }
    }

    fn peek(&self) -> Result<u8, Stop> {
        self.bytes().get(self.pos).copied().ok_or(Stop::Incomplete)
    }

    /// At a `"`: moves past the closing quote.
    fn skip_string(&mut self) -> Result<(), Stop> {
        let bytes = self.text.as_bytes();
        let mut i = self.pos + 1;
        loop {
            match bytes.get(i) {
                None => return Err(Stop::Incomplete),
                Some(b'"') => {
                    self.pos = i + 1;
                    return Ok(());
                }
                Some(b'\\') => i += 2,
                Some(_) => i += 1,
            }
        }
    }

    /// At a `"`: moves past the string and returns its decoded value.
    fn read_string(&mut self) -> Result<String, Stop> {
        let start = self.pos;
        self.skip_string()?;
        let token = &self.text[start..self.pos];
        let inner = &token[1..token.len() - 1];
        if inner.contains('\\') {
            serde_json::from_str(token).map_err(|_| Stop::Invalid)
        } else {
            Ok(inner.to_owned())
        }
    }

    /// Moves past one value. Nested values are skipped by bracket depth only: the members that
    /// stay are passed on as they are, so they need not be validated here.
    fn skip_value(&mut self) -> Result<(), Stop> {
        match self.peek()? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.pos += 1;
                                return Ok(());
                            }
                        }
                        _ => {}
                    }
                    self.pos += 1;
                }
            }
            _ => {
                let start = self.pos;
                while let Some(&b) = self.bytes().get(self.pos) {
                    if matches!(b, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        return if self.pos > start {
                            Ok(())
                        } else {
                            Err(Stop::Invalid)
                        };
                    }
                    self.pos += 1;
                }
                // A number or literal may still go on.
                Err(Stop::Incomplete)
            }
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), Stop> {
        if self.peek()? == byte {
            self.pos += 1;
            Ok(())
        } else {
            Err(Stop::Invalid)
        }
    }

    fn scan(&mut self) -> Result<NameScan, Stop> {
        self.skip_ws();
        self.expect(b'{')?;
        let mut prev_comma = None;
        loop {
            self.skip_ws();
            match self.peek()? {
                b'"' => {}
                b'}' => return Ok(NameScan::Absent),
                _ => return Err(Stop::Invalid),
            }
            let key_start = self.pos;
            let key = self.read_string()?;
            self.skip_ws();
            self.expect(b':')?;
            self.skip_ws();
            if key == "name" {
                if self.peek()? != b'"' {
                    return Ok(NameScan::Absent);
                }
                let name = self.read_string()?;
                let value_end = self.pos;
                self.skip_ws();
                let cut = match self.peek()? {
                    // Whitespace after the comma stays: whether it has arrived yet depends on
                    // how the arguments were streamed, and the result must not.
                    b',' => key_start..self.pos + 1,
                    b'}' => prev_comma.unwrap_or(key_start)..value_end,
                    _ => return Err(Stop::Invalid),
                };
                return Ok(NameScan::Found { name, cut });
            }
            self.skip_value()?;
            self.skip_ws();
            match self.peek()? {
                b',' => {
                    prev_comma = Some(self.pos);
                    self.pos += 1;
                }
                b'}' => return Ok(NameScan::Absent),
                _ => return Err(Stop::Invalid),
            }
        }
    }
}

/// Scans `text`, the (possibly partial) arguments of a tool call, for its top-level `"name"`.
///
/// `Found` is only returned once the character after the name's value is known, so that the
/// comma to remove with it is known too. The cut never depends on text after that character.
pub(crate) fn scan_name(text: &str) -> NameScan {
    let mut cursor = Cursor { text, pos: 0 };
    match cursor.scan() {
        Ok(scan) => scan,
        Err(Stop::Incomplete) => NameScan::Incomplete,
        Err(Stop::Invalid) => NameScan::Absent,
    }
}

/// `text` without the bytes in `cut`.
pub(crate) fn without(text: &str, cut: Range<usize>) -> String {
    let mut rest = String::with_capacity(text.len() - cut.len());
    rest.push_str(&text[..cut.start]);
    rest.push_str(&text[cut.end..]);
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remapped(text: &str) -> Option<(String, String)> {
        match scan_name(text) {
            NameScan::Found { name, cut } => Some((name, without(text, cut))),
            _ => None,
        }
    }

    #[test]
    fn name_member_is_cut_with_one_comma() {
        let cases = [
            (r#"{"name":"read","path":"/x"}"#, "read", r#"{"path":"/x"}"#),
            (
                r#"{"name": "read", "path": "/x"}"#,
                "read",
                r#"{ "path": "/x"}"#,
            ),
            (r#"{"path":"/x","name":"read"}"#, "read", r#"{"path":"/x"}"#),
            (
                r#"{"a":1,"name":"read","b":[2]}"#,
                "read",
                r#"{"a":1,"b":[2]}"#,
            ),
            (r#"{"name":"read"}"#, "read", "{}"),
            (r#" { "name" : "read" } "#, "read", " {  } "),
            (r#"{"na\u006de":"r\u0065ad","x":1}"#, "read", r#"{"x":1}"#),
            (
                r#"{"q":{"name":"inner"},"s":"}\"","name":"outer"}"#,
                "outer",
                r#"{"q":{"name":"inner"},"s":"}\""}"#,
            ),
        ];
        for (text, name, rest) in cases {
            let (got_name, got_rest) = remapped(text).unwrap_or_else(|| panic!("{text}"));
            assert_eq!(got_name, name, "{text}");
            assert_eq!(got_rest, rest, "{text}");
            serde_json::from_str::<serde_json::Value>(&got_rest).unwrap();
        }
    }

    #[test]
    fn prefixes_are_incomplete_until_the_next_character_is_known() {
        let text = r#"{"name": "read_file", "path": "/x"}"#;
        let decided = text.find(',').unwrap() + 1;
        for end in 0..decided {
            assert_eq!(scan_name(&text[..end]), NameScan::Incomplete, "{end}");
        }
        for end in decided..=text.len() {
            assert!(
                matches!(scan_name(&text[..end]), NameScan::Found { .. }),
                "{end}"
            );
        }
        let last = r#"{"path": 12, "name": "x"}"#;
        assert_eq!(scan_name(&last[..last.len() - 1]), NameScan::Incomplete);
        assert_eq!(scan_name(r#"{"n": 12"#), NameScan::Incomplete);
    }

    #[test]
    fn no_usable_name_is_absent() {
        for text in [
            r#"{"path":"/x"}"#,
            r#"{"name":5,"x":1}"#,
            r#"{"name":null}"#,
            r#"["name","x"]"#,
            r#""name""#,
            "nonsense",
            r#"{"a" 1}"#,
            r#"{"q":{"name":"inner"}}"#,
            "{}",
        ] {
            assert_eq!(scan_name(text), NameScan::Absent, "{text}");
        }
    }
}
