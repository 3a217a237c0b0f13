//! `PAT_SINKS`: other files that must hold the current token after each rotation.
//!
//! Each sink changes one value in place and keeps the rest of the file byte for byte (other
//! keys, order, comments, formatting). The edit is checked by parsing the result: it must equal
//! the original document with only that value set. Should an in-place edit not be possible
//! (a YAML flow mapping, say), the document is written back whole from the parsed value,
//! which keeps the data but not the comments, and a warning says so.

use std::fmt;
use std::io;
use std::path::PathBuf;

use fresh_token::Token;

/// The format of a sink file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// `KEY=value` lines (`export KEY=value` too).
    Dotenv,
    /// A JSON document; the key is a JSON pointer (`/env/ANTHROPIC_AUTH_TOKEN`).
    Json,
    /// A YAML document; the key is a dotted path of mapping keys (`model.api_key`).
    Yaml,
}

impl SinkKind {
    fn name(self) -> &'static str {
        match self {
            Self::Dotenv => "dotenv",
            Self::Json => "json",
            Self::Yaml => "yaml",
        }
    }
}

/// One `KIND:PATH:KEY` entry of `PAT_SINKS`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sink {
    /// File format.
    pub kind: SinkKind,
    /// The file (a leading `~/` is expanded from `HOME`).
    pub path: PathBuf,
    /// Where in the file the token goes.
    pub key: String,
}

impl fmt::Display for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}",
            self.kind.name(),
            self.path.display(),
            self.key
        )
    }
}

/// A `PAT_SINKS` value that cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("PAT_SINKS: entry {index} `{entry}`: {reason}")]
pub struct SinkSpecError {
    /// 1-based position of the entry.
    pub index: usize,
    /// The entry as written.
    pub entry: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Parse `PAT_SINKS`: `;`-separated `KIND:PATH:KEY` entries. Empty entries are ignored. The
/// path may itself hold `:`; the kind ends at the first `:` and the key starts after the last.
pub fn parse_sinks(spec: &str) -> Result<Vec<Sink>, SinkSpecError> {
    spec.split(';')
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .enumerate()
        .map(|(i, entry)| {
            parse_entry(entry).map_err(|reason| SinkSpecError {
                index: i + 1,
                entry: entry.to_owned(),
                reason,
            })
        })
        .collect()
}

fn parse_entry(entry: &str) -> Result<Sink, String> {
    let (kind, rest) = entry.split_once(':').ok_or("expected KIND:PATH:KEY")?;
    let (path, key) = rest.rsplit_once(':').ok_or("expected KIND:PATH:KEY")?;
    let kind = match kind.trim().to_ascii_lowercase().as_str() {
        "dotenv" => SinkKind::Dotenv,
        "json" => SinkKind::Json,
        "yaml" | "yml" => SinkKind::Yaml,
        other => {
            return Err(format!(
                "unknown kind {other:?}: expected dotenv, json or yaml"
            ));
        }
    };
    let (path, key) = (path.trim(), key.trim());
    if path.is_empty() {
        return Err("the path is empty".to_owned());
    }
    match kind {
        SinkKind::Dotenv => {
            let valid = key
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                return Err(format!("{key:?} is not a variable name"));
            }
        }
        SinkKind::Json => {
            if !key.starts_with('/') || key.len() < 2 {
                return Err(format!(
                    "{key:?} is not a JSON pointer to a member (such as /env/ANTHROPIC_AUTH_TOKEN)"
                ));
            }
        }
        SinkKind::Yaml => {
            if key.is_empty() || key.split('.').any(str::is_empty) {
                return Err(format!(
                    "{key:?} is not a dotted key path (such as model.api_key)"
                ));
            }
        }
    }
    Ok(Sink {
        kind,
        path: expand_home(path),
        key: key.to_owned(),
    })
}

fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// What writing a sink did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkOutcome {
    /// The value was changed in place.
    Written,
    /// The file was rewritten whole from its parsed value: the data is kept, comments are not.
    Rewritten,
    /// The file does not exist: skipped.
    Missing,
}

/// Why a sink could not be written. Never holds the token or the file's contents.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The file is not a document the token can be put in.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Sink {
    /// Put `token` in the file: atomically, keeping the file's mode. A missing file is skipped.
    pub fn write(&self, token: &Token) -> Result<SinkOutcome, SinkError> {
        let target = match std::fs::symlink_metadata(&self.path) {
            Ok(meta) if meta.file_type().is_symlink() => {
                std::fs::canonicalize(&self.path).map_err(|source| self.io(source))?
            }
            Ok(_) => self.path.clone(),
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(SinkOutcome::Missing),
            Err(err) => return Err(self.io(err)),
        };
        let text = match std::fs::read_to_string(&target) {
            Ok(text) => text,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(SinkOutcome::Missing),
            Err(err) => return Err(self.io(err)),
        };
        let value = token.expose_secret();
        let edit = match self.kind {
            SinkKind::Dotenv => SinkEdit::InPlace(set_dotenv(&text, &self.key, value)),
            SinkKind::Json => set_json(&text, &self.key, value).map_err(|r| self.format(r))?,
            SinkKind::Yaml => {
                let path: Vec<&str> = self.key.split('.').collect();
                set_yaml(&text, &path, value).map_err(|r| self.format(r))?
            }
        };
        let (updated, outcome) = match edit {
            SinkEdit::InPlace(text) => (text, SinkOutcome::Written),
            SinkEdit::Rewritten(text) => (text, SinkOutcome::Rewritten),
        };
        if updated != text {
            fresh_token::databrickscfg::write_atomic(&target, updated.as_bytes(), None)
                .map_err(|source| self.io(source))?;
        }
        Ok(outcome)
    }

    fn io(&self, source: io::Error) -> SinkError {
        SinkError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn format(&self, reason: String) -> SinkError {
        SinkError::Format {
            path: self.path.clone(),
            reason,
        }
    }
}

/// Set `key` in dotenv text: every `KEY=` (or `export KEY=`) line gets `value`, in the quotes
/// it had; without such a line, one is appended. Everything else stays as it was.
pub fn set_dotenv(text: &str, key: &str, value: &str) -> String {
    let mut found = false;
    let mut out = String::with_capacity(text.len() + value.len() + key.len() + 2);
    for line in text.split_inclusive('\n') {
        let body = line.trim_end_matches(['\n', '\r']);
        let ending = &line[body.len()..];
        let indent_len = body.len() - body.trim_start().len();
        let rest = &body[indent_len..];
        let (export, rest) = match rest.strip_prefix("export") {
            Some(after) if after.starts_with([' ', '\t']) => {
                let name_start = after.len() - after.trim_start().len();
                (&rest[..6 + name_start], after.trim_start())
            }
            _ => ("", rest),
        };
        let assigned = rest
            .strip_prefix(key)
            .map(str::trim_start)
            .and_then(|r| r.strip_prefix('='));
        match assigned {
            Some(old) => {
                found = true;
                let old = old.trim_start();
                let quote = match old.chars().next() {
                    Some(q @ ('"' | '\'')) => q.to_string(),
                    _ => String::new(),
                };
                out.push_str(&body[..indent_len]);
                out.push_str(export);
                out.push_str(&format!("{key}={quote}{value}{quote}"));
                out.push_str(ending);
            }
            None => out.push_str(line),
        }
    }
    if !found {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("{key}={value}\n"));
    }
    out
}

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

/// The result of [`set_json`] and [`set_yaml`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkEdit {
    /// Changed in place: comments and layout kept.
    InPlace(String),
    /// Written back whole from the parsed document: comments lost.
    Rewritten(String),
}

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
    fn parse_sinks_table() {
        let ok = parse_sinks(
            " dotenv:/a/.env:ANTHROPIC_AUTH_TOKEN ; json:/b/settings.json:/env/TOKEN;yaml:/c:d/x.yaml:model.api_key;",
        )
        .unwrap();
        assert_eq!(
            ok,
            vec![
                Sink {
                    kind: SinkKind::Dotenv,
                    path: "/a/.env".into(),
                    key: "ANTHROPIC_AUTH_TOKEN".into()
                },
                Sink {
                    kind: SinkKind::Json,
                    path: "/b/settings.json".into(),
                    key: "/env/TOKEN".into()
                },
                Sink {
                    kind: SinkKind::Yaml,
                    path: "/c:d/x.yaml".into(),
                    key: "model.api_key".into()
                },
            ]
        );
        assert_eq!(parse_sinks("").unwrap(), vec![]);
        let bad: &[(&str, &str)] = &[
            ("toml:/a:KEY", "unknown kind"),
            ("dotenv:/a", "expected KIND:PATH:KEY"),
            ("dotenv", "expected KIND:PATH:KEY"),
            ("dotenv::KEY", "path is empty"),
            ("dotenv:/a:1KEY", "not a variable name"),
            ("json:/a:env.TOKEN", "not a JSON pointer"),
            ("yaml:/a:model..key", "not a dotted key path"),
        ];
        for (spec, reason) in bad {
            let err = parse_sinks(&format!("dotenv:/ok:OK;{spec}")).unwrap_err();
            assert_eq!(err.index, 2, "{spec}");
            let text = err.to_string();
            assert!(text.starts_with("PAT_SINKS: entry 2"), "{text}");
            assert!(text.contains(reason), "{spec}: {text}");
        }
    }

    #[test]
    fn dotenv_table() {
        let cases: &[(&str, &str)] = &[
            ("", "TOKEN=new\n"),
            ("A=1", "A=1\nTOKEN=new\n"),
            ("# c\nTOKEN=old\nB=2\n", "# c\nTOKEN=new\nB=2\n"),
            ("export TOKEN=\"old\"\n", "export TOKEN=\"new\"\n"),
            (
                "  TOKEN = 'old'\r\nTOKENX=keep\n",
                "  TOKEN='new'\r\nTOKENX=keep\n",
            ),
            ("TOKEN=a\nTOKEN=b\n", "TOKEN=new\nTOKEN=new\n"),
        ];
        for (text, expected) in cases {
            assert_eq!(set_dotenv(text, "TOKEN", "new"), *expected, "{text:?}");
        }
    }

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

    #[cfg(unix)]
    #[test]
    fn write_keeps_mode_and_skips_missing_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".env");
        std::fs::write(&path, "A=1\nTOKEN=old\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        let sink = Sink {
            kind: SinkKind::Dotenv,
            path: path.clone(),
            key: "TOKEN".to_owned(),
        };
        let token = Token::new("dapi-new").unwrap();
        assert_eq!(sink.write(&token).unwrap(), SinkOutcome::Written);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "A=1\nTOKEN=dapi-new\n"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        let missing = Sink {
            path: dir.path().join("absent.env"),
            ..sink
        };
        assert_eq!(missing.write(&token).unwrap(), SinkOutcome::Missing);
        assert!(!missing.path.exists());
    }
}
