//! dotenv sinks: `KEY=value` lines.

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
