//! YAML sinks: a mapping key at a dotted path.

use super::SinkEdit;

/// Set the nested mapping key `path` to the string `value`, creating missing mappings.
pub fn set_yaml(text: &str, path: &[&str], value: &str) -> Result<SinkEdit, String> {
    use serde_norway::{Mapping, Value};
    let original: Value = if text.trim().is_empty() {
        Value::Mapping(Mapping::new())
    } else {
        serde_norway::from_str(text).map_err(|e| match e.location() {
            Some(at) => format!(
                "not valid YAML (line {}, column {})",
                at.line(),
                at.column()
            ),
            None => "not valid YAML".to_owned(),
        })?
    };
    let mut expected = original;
    let mut node = &mut expected;
    for (i, key) in path.iter().enumerate() {
        if node.is_null() {
            *node = Value::Mapping(Mapping::new());
        }
        let Value::Mapping(map) = node else {
            return Err(format!("`{}` is not a mapping", path[..i].join(".")));
        };
        let key = Value::String((*key).to_owned());
        if i + 1 == path.len() {
            map.insert(key, Value::String(value.to_owned()));
            break;
        }
        node = map.entry(key).or_insert(Value::Null);
    }
    if let Some(edited) = edit_yaml_text(text, path, value)
        && serde_norway::from_str::<Value>(&edited).ok().as_ref() == Some(&expected)
    {
        return Ok(SinkEdit::InPlace(edited));
    }
    serde_norway::to_string(&expected)
        .map(SinkEdit::Rewritten)
        .map_err(|_| "cannot serialise the document".to_owned())
}

struct YamlLine<'a> {
    text: &'a str,
    indent: usize,
    /// Not blank, not only a comment, not a document marker.
    content: bool,
}

fn yaml_lines(text: &str) -> Vec<YamlLine<'_>> {
    text.split_inclusive('\n')
        .map(|line| {
            let trimmed = line.trim_start_matches(' ');
            let rest = trimmed.trim_end();
            YamlLine {
                text: line,
                indent: line.len() - trimmed.len(),
                content: !(rest.is_empty()
                    || rest.starts_with('#')
                    || rest == "---"
                    || rest == "..."),
            }
        })
        .collect()
}

/// The key of a `key: value` line (after its indent) and where its value starts.
fn yaml_key(line: &str) -> Option<(String, usize)> {
    let (key, after) = match line.as_bytes().first()? {
        q @ (b'"' | b'\'') => {
            let close = line[1..].find(*q as char)? + 1;
            (line[1..close].to_owned(), close + 1)
        }
        _ => {
            let colon = line.find(": ").or_else(|| {
                let body = line.trim_end();
                body.ends_with(':').then(|| body.len() - 1)
            })?;
            (line[..colon].trim_end().to_owned(), colon)
        }
    };
    let rest = &line[after..];
    let colon = rest.find(':')?;
    if !rest[..colon].trim().is_empty() || key.starts_with(['-', '?', '#']) {
        return None;
    }
    Some((key, after + colon + 1))
}

fn edit_yaml_text(text: &str, path: &[&str], value: &str) -> Option<String> {
    let lines = yaml_lines(text);
    let (mut start, mut end) = (0, lines.len());
    let mut parent_indent: Option<usize> = None;
    for (depth, key) in path.iter().enumerate() {
        let child_indent = lines[start..end]
            .iter()
            .find(|l| l.content)
            .map(|l| l.indent);
        if child_indent.is_some_and(|indent| parent_indent.is_some_and(|p| indent <= p)) {
            return None;
        }
        let found = lines[start..end].iter().enumerate().find_map(|(i, line)| {
            if !line.content || Some(line.indent) != child_indent {
                return None;
            }
            let (name, value_at) = yaml_key(&line.text[line.indent..])?;
            (name == *key).then_some((start + i, line.indent + value_at))
        });
        let Some((index, value_at)) = found else {
            let indent = child_indent.unwrap_or_else(|| parent_indent.map_or(0, |p| p + 2));
            let last_content = lines[start..end].iter().rposition(|l| l.content);
            let insert_at = last_content.map_or(start, |i| start + i + 1);
            let mut inserted = String::new();
            for (i, key) in path[depth..].iter().enumerate() {
                let pad = " ".repeat(indent + 2 * i);
                if depth + i + 1 == path.len() {
                    inserted.push_str(&format!(
                        "{pad}{}: {}\n",
                        yaml_key_text(key),
                        yaml_scalar(value, None)
                    ));
                } else {
                    inserted.push_str(&format!("{pad}{}:\n", yaml_key_text(key)));
                }
            }
            let mut out: String = lines[..insert_at].iter().map(|l| l.text).collect();
            if !out.is_empty() && !out.ends_with('\n') {
                out.push('\n');
            }
            out.push_str(&inserted);
            out.extend(lines[insert_at..].iter().map(|l| l.text));
            return Some(out);
        };
        let line = lines[index].text;
        let indent = lines[index].indent;
        let block_end = lines[index + 1..end]
            .iter()
            .position(|l| l.content && l.indent <= indent)
            .map_or(end, |i| index + 1 + i);
        let has_children = lines[index + 1..block_end].iter().any(|l| l.content);
        let rest = line[value_at..].trim_end_matches(['\n', '\r']);
        let value_text = rest.trim_start();
        let value_empty = value_text.is_empty() || value_text.starts_with('#');
        if depth + 1 < path.len() {
            if !value_empty {
                return None;
            }
            start = index + 1;
            end = block_end;
            parent_indent = Some(indent);
            continue;
        }
        if has_children || value_text.starts_with(['|', '>', '&', '*', '!', '{', '[']) {
            return None;
        }
        let value_start = value_at + (rest.len() - value_text.len());
        let (quote, value_len) = match value_text.chars().next() {
            Some(q @ ('"' | '\'')) => (Some(q), value_text[1..].find(q)? + 2),
            _ if value_empty => (None, 0),
            _ => (
                None,
                value_text
                    .find(" #")
                    .unwrap_or(value_text.len())
                    .min(value_text.trim_end().len()),
            ),
        };
        let separator = if value_empty && value_start == value_at {
            " "
        } else {
            ""
        };
        let mut out: String = lines[..index].iter().map(|l| l.text).collect();
        out.push_str(&line[..value_start]);
        out.push_str(separator);
        out.push_str(&yaml_scalar(value, quote));
        if value_empty && !value_text.is_empty() {
            out.push(' ');
        }
        out.push_str(&line[value_start + value_len..]);
        out.extend(lines[index + 1..].iter().map(|l| l.text));
        return Some(out);
    }
    None
}

fn yaml_key_text(key: &str) -> String {
    if key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
    {
        key.to_owned()
    } else {
        format!("\"{}\"", key.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// A YAML scalar for `value`, in the quote style the old value had; plain when that is safe.
fn yaml_scalar(value: &str, quote: Option<char>) -> String {
    let plain_safe = value.starts_with(|c: char| c.is_ascii_alphabetic())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    match quote {
        Some('\'') => format!("'{}'", value.replace('\'', "''")),
        None if plain_safe => value.to_owned(),
        _ => format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\"")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_in_place_table() {
        let cases: &[(&str, &str, &str)] = &[
            ("", "api_key", "api_key: new\n"),
            (
                "# top\nmodel:\n  name: m # the model\n  api_key: old # rotated\nother: 1\n",
                "model.api_key",
                "# top\nmodel:\n  name: m # the model\n  api_key: new # rotated\nother: 1\n",
            ),
            (
                "model:\n    name: m\n\n# tail\nother: 1\n",
                "model.api_key",
                "model:\n    name: m\n    api_key: new\n\n# tail\nother: 1\n",
            ),
            ("a: 1\n", "b.c.d", "a: 1\nb:\n  c:\n    d: new\n"),
            ("key: \"old\"\n", "key", "key: \"new\"\n"),
            ("key: 'old'\n", "key", "key: 'new'\n"),
            ("key:\nnext: 1\n", "key", "key: new\nnext: 1\n"),
            (
                "\"quoted key\": old\n",
                "quoted key",
                "\"quoted key\": new\n",
            ),
        ];
        for (text, path, expected) in cases {
            let path: Vec<&str> = path.split('.').collect();
            assert_eq!(
                set_yaml(text, &path, "new").unwrap(),
                SinkEdit::InPlace((*expected).to_owned()),
                "{text:?}"
            );
        }
    }

    #[test]
    fn yaml_falls_back_to_a_whole_rewrite() {
        let edit = set_yaml(
            "model: {name: m, api_key: old}\n",
            &["model", "api_key"],
            "new",
        )
        .unwrap();
        let SinkEdit::Rewritten(text) = edit else {
            panic!("expected a rewrite: {edit:?}")
        };
        let doc: serde_norway::Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(doc["model"]["api_key"].as_str(), Some("new"));
        assert_eq!(doc["model"]["name"].as_str(), Some("m"));
        assert!(set_yaml("a: [1, 2\n", &["a"], "new").is_err());
        assert!(set_yaml("a: 1\n", &["a", "b"], "new").is_err());
    }
}
