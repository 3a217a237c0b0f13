//! Parsing `PAT_SINKS`.

use std::path::PathBuf;

use super::{Sink, SinkKind};

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
}
