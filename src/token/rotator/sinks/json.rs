//! JSON sinks: the member at a JSON pointer.

use super::SinkEdit;

/// Set the member at JSON pointer `pointer` to the string `value`, creating missing objects
/// on the way. The rest of the text is kept as it was.
pub fn set_json(text: &str, pointer: &str, value: &str) -> Result<SinkEdit, String> {
    let segments: Vec<String> = pointer
        .split('/')
        .skip(1)
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect();
    let original: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Object(serde_json::Map::new())
    } else {
        serde_json::from_str(text)
            .map_err(|e| format!("not valid JSON (line {}, column {})", e.line(), e.column()))?
    };
    let mut expected = original;
    set_json_value(&mut expected, &segments, value)?;
    let source = if text.trim().is_empty() { "{}\n" } else { text };
    let edited = edit_json_text(source, &segments, value);
    if let Some(edited) = edited
        && serde_json::from_str::<serde_json::Value>(&edited)
            .ok()
            .as_ref()
            == Some(&expected)
    {
        return Ok(SinkEdit::InPlace(edited));
    }
    let mut whole = serde_json::to_string_pretty(&expected).map_err(|e| e.to_string())?;
    whole.push('\n');
    Ok(SinkEdit::Rewritten(whole))
}

fn set_json_value(
    doc: &mut serde_json::Value,
    segments: &[String],
    value: &str,
) -> Result<(), String> {
    let mut node = doc;
    for (i, segment) in segments.iter().enumerate() {
        let last = i + 1 == segments.len();
        node = match node {
            serde_json::Value::Object(map) => {
                let entry = map
                    .entry(segment.clone())
                    .or_insert_with(|| serde_json::Value::Object(serde_json::Map::new()));
                if last {
                    *entry = serde_json::Value::String(value.to_owned());
                    return Ok(());
                }
                entry
            }
            serde_json::Value::Array(items) => {
                let item = segment
                    .parse::<usize>()
                    .ok()
                    .and_then(|index| items.get_mut(index))
                    .ok_or_else(|| format!("array index {segment:?} is out of range"))?;
                if last {
                    *item = serde_json::Value::String(value.to_owned());
                    return Ok(());
                }
                item
            }
            _ => return Err(format!("cannot descend into a non-object at {segment:?}")),
        };
        if last {
            continue;
        }
        if node.is_null() {
            *node = serde_json::Value::Object(serde_json::Map::new());
        } else if !(node.is_object() || node.is_array()) {
            return Err(format!("{segment:?} holds a value that is not an object"));
        }
    }
    Ok(())
}

/// The in-place edit: replace the value's bytes, or insert a member into the deepest existing
/// object. `None` when the text has a shape this does not handle.
fn edit_json_text(text: &str, segments: &[String], value: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut at = skip_ws(bytes, 0);
    for (depth, segment) in segments.iter().enumerate() {
        match bytes.get(at)? {
            b'{' => match find_member(bytes, at, segment)? {
                Some(value_at) => at = value_at,
                None => return Some(insert_member(text, at, &segments[depth..], value)),
            },
            b'[' => at = find_item(bytes, at, segment.parse().ok()?)?,
            _ => return None,
        }
    }
    let end = skip_value(bytes, at)?;
    let literal = serde_json::to_string(value).ok()?;
    Some(format!("{}{literal}{}", &text[..at], &text[end..]))
}

fn insert_member(text: &str, open: usize, segments: &[String], value: &str) -> String {
    let bytes = text.as_bytes();
    let mut nested = serde_json::Value::String(value.to_owned());
    for segment in segments[1..].iter().rev() {
        let mut map = serde_json::Map::new();
        map.insert(segment.clone(), nested);
        nested = serde_json::Value::Object(map);
    }
    let member = format!(
        "{}: {}",
        serde_json::Value::String(segments[0].clone()),
        nested
    );
    let first = skip_ws(bytes, open + 1);
    let empty = bytes.get(first) == Some(&b'}');
    let pretty = text[open + 1..first].contains('\n');
    let line_start = text[..open].rfind('\n').map_or(0, |i| i + 1);
    let outer_indent: String = text[line_start..open]
        .chars()
        .take_while(|c| c.is_whitespace())
        .collect();
    let inner_indent = if pretty && !empty {
        let gap = &text[open + 1..first];
        gap[gap.rfind('\n').map_or(0, |i| i + 1)..].to_owned()
    } else {
        format!("{outer_indent}  ")
    };
    let insertion = match (empty, pretty || empty) {
        (true, _) => format!("\n{inner_indent}{member}\n{outer_indent}"),
        (false, true) => format!("\n{inner_indent}{member},"),
        (false, false) => format!("{member}, "),
    };
    let rest = if empty { first } else { open + 1 };
    format!("{}{insertion}{}", &text[..open + 1], &text[rest..])
}

fn skip_ws(bytes: &[u8], mut at: usize) -> usize {
    while bytes.get(at).is_some_and(|b| b.is_ascii_whitespace()) {
        at += 1;
    }
    at
}

/// In the object opening at `open`, the start of the value of member `name`: `Some(None)` when
/// there is no such member.
fn find_member(bytes: &[u8], open: usize, name: &str) -> Option<Option<usize>> {
    let mut at = skip_ws(bytes, open + 1);
    if bytes.get(at) == Some(&b'}') {
        return Some(None);
    }
    loop {
        let key_end = skip_string(bytes, at)?;
        let key: String = serde_json::from_slice(&bytes[at..key_end]).ok()?;
        at = skip_ws(bytes, key_end);
        if bytes.get(at) != Some(&b':') {
            return None;
        }
        let value_at = skip_ws(bytes, at + 1);
        if key == name {
            return Some(Some(value_at));
        }
        at = skip_ws(bytes, skip_value(bytes, value_at)?);
        match bytes.get(at)? {
            b',' => at = skip_ws(bytes, at + 1),
            b'}' => return Some(None),
            _ => return None,
        }
    }
}

fn find_item(bytes: &[u8], open: usize, index: usize) -> Option<usize> {
    let mut at = skip_ws(bytes, open + 1);
    for _ in 0..index {
        at = skip_ws(bytes, skip_value(bytes, at)?);
        if bytes.get(at) != Some(&b',') {
            return None;
        }
        at = skip_ws(bytes, at + 1);
    }
    (bytes.get(at) != Some(&b']')).then_some(at)
}

fn skip_string(bytes: &[u8], at: usize) -> Option<usize> {
    if bytes.get(at) != Some(&b'"') {
        return None;
    }
    let mut i = at + 1;
    loop {
        match bytes.get(i)? {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
}

/// The end of the JSON value starting at `at`.
fn skip_value(bytes: &[u8], at: usize) -> Option<usize> {
    match bytes.get(at)? {
        b'"' => skip_string(bytes, at),
        open @ (b'{' | b'[') => {
            let close = if *open == b'{' { b'}' } else { b']' };
            let mut depth = 0usize;
            let mut i = at;
            loop {
                match bytes.get(i)? {
                    b'"' => {
                        i = skip_string(bytes, i)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return (bytes[i] == close).then_some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
        }
        _ => {
            let mut i = at;
            while bytes
                .get(i)
                .is_some_and(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
            {
                i += 1;
            }
            (i > at).then_some(i)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_table() {
        let cases: &[(&str, &str, &str)] = &[
            (
                "{\n  \"z\": 1,\n  \"env\": {\n    \"TOKEN\": \"old\",\n    \"A\": \"b\"\n  }\n}\n",
                "/env/TOKEN",
                "{\n  \"z\": 1,\n  \"env\": {\n    \"TOKEN\": \"new\",\n    \"A\": \"b\"\n  }\n}\n",
            ),
            (
                "{\n  \"z\": 1,\n  \"env\": {\n    \"A\": \"b\"\n  }\n}\n",
                "/env/TOKEN",
                "{\n  \"z\": 1,\n  \"env\": {\n    \"TOKEN\": \"new\",\n    \"A\": \"b\"\n  }\n}\n",
            ),
            (
                "{\n  \"z\": 1\n}\n",
                "/env/TOKEN",
                "{\n  \"env\": {\"TOKEN\":\"new\"},\n  \"z\": 1\n}\n",
            ),
            ("{}", "/TOKEN", "{\n  \"TOKEN\": \"new\"\n}"),
            ("", "/TOKEN", "{\n  \"TOKEN\": \"new\"\n}\n"),
            (
                "{\"a\":[{\"t\":null}]}",
                "/a/0/t",
                "{\"a\":[{\"t\":\"new\"}]}",
            ),
            (
                "{\"a/b\":{\"x\":1}}",
                "/a~1b/x",
                "{\"a/b\":{\"x\":\"new\"}}",
            ),
        ];
        for (text, pointer, expected) in cases {
            assert_eq!(
                set_json(text, pointer, "new").unwrap(),
                SinkEdit::InPlace((*expected).to_owned()),
                "{text:?}"
            );
        }
        assert!(set_json("{\"a\": [1]}", "/a/5", "new").is_err());
        assert!(set_json("{\"a\": 1}", "/a/b", "new").is_err());
        // A null on the way has no in-place edit: the document is written back whole, keys in
        // their original order.
        let SinkEdit::Rewritten(whole) =
            set_json("{\"z\": 1, \"a\": null}", "/a/b", "new").unwrap()
        else {
            panic!("expected a rewrite")
        };
        assert_eq!(
            whole,
            "{\n  \"z\": 1,\n  \"a\": {\n    \"b\": \"new\"\n  }\n}\n"
        );
        let err = set_json("{\"secret\": \"dapi-old\"", "/x", "new").unwrap_err();
        assert!(!err.contains("dapi-old"), "{err}");
    }
}
