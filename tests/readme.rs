//! The documentation against the code: the README's quick start, its configuration table against
//! the clap definitions, its dependency tables against `Cargo.toml`, the examples, local links,
//! and the reference pages in `docs/` against the metrics and error answers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use fresh_filter::FilterAction;
use fresh_proxy::config::Cli;
use fresh_proxy::health::metrics::{Metrics, RotationResult};
use fresh_proxy::proxy::ProxyError;

/// The command that runs the proxy, exactly as the README gives it.
const RUN_COMMAND: &str = "DATABRICKS_HOST=https://<workspace>.cloud.databricks.com DATABRICKS_TOKEN=<pat> cargo run --release";
/// The command that tests it, which must be the README's first line starting with `cargo test`.
const TEST_COMMAND: &str = "cargo test --workspace";
/// Variables read from the environment only: the secrets.
const ENVIRONMENT_ONLY: [&str; 4] = [
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
    "PROXY_CLIENT_KEY",
    "PAT_ETCD_PASSWORD",
];
/// Variables that hold secrets and so must never have a flag.
const SECRETS: [&str; 4] = [
    "DATABRICKS_TOKEN",
    "DATABRICKS_CLIENT_SECRET",
    "PROXY_CLIENT_KEY",
    "PAT_ETCD_PASSWORD",
];
/// The pages in `docs/` that these tests check; the others have their own owners.
const CHECKED_DOCS: [&str; 4] = [
    "docs/ARCHITECTURE.md",
    "docs/DEPLOYMENT.md",
    "docs/FAILURE_MODES.md",
    "docs/METRICS.md",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every Markdown table whose header cells are `header`, as rows of trimmed cells.
fn tables(text: &str, header: &[&str]) -> Vec<Vec<Vec<String>>> {
    let mut found = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if cells(line)
            .iter()
            .map(String::as_str)
            .ne(header.iter().copied())
        {
            continue;
        }
        lines.next(); // the |---|---| line
        let mut rows = Vec::new();
        while let Some(row) = lines.next_if(|l| l.trim_start().starts_with('|')) {
            let row = cells(row);
            assert_eq!(
                row.len(),
                header.len(),
                "a row of the {header:?} table: {row:?}"
            );
            rows.push(row);
        }
        found.push(rows);
    }
    found
}

fn cells(line: &str) -> Vec<String> {
    let line = line.trim();
    if !line.starts_with('|') || !line.ends_with('|') || line.len() < 2 {
        return Vec::new();
    }
    line[1..line.len() - 1]
        .split('|')
        .map(|cell| cell.trim().to_owned())
        .collect()
}

/// The contents of the `code spans` in `text`.
fn code_spans(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

fn without_backticks(text: &str) -> String {
    text.replace('`', "")
}

#[test]
fn quick_start_has_the_two_commands() {
    let readme = read("README.md");
    assert!(
        readme.lines().any(|line| line.trim() == RUN_COMMAND),
        "README lacks the run command line {RUN_COMMAND:?}"
    );
    let first_test_line = readme.lines().find(|line| line.starts_with("cargo test"));
    assert_eq!(
        first_test_line,
        Some(TEST_COMMAND),
        "the first README line starting with `cargo test` must be {TEST_COMMAND:?}"
    );
}

#[test]
fn configuration_table_matches_the_flag_definitions() {
    let readme = read("README.md");
    let found = tables(&readme, &["variable", "flag", "default", "meaning"]);
    assert_eq!(found.len(), 1, "README has one configuration table");
    let mut documented = BTreeMap::new();
    for row in &found[0] {
        let names = code_spans(&row[0]);
        assert_eq!(names.len(), 1, "one variable per row: {row:?}");
        assert!(
            documented.insert(names[0].clone(), row).is_none(),
            "{} is in the table twice",
            names[0]
        );
    }

    let mut problems = Vec::new();
    let command = Cli::command();
    for arg in command.get_arguments() {
        let Some(env) = arg.get_env() else { continue };
        let env = env.to_string_lossy().into_owned();
        let Some(row) = documented.remove(&env) else {
            problems.push(format!("{env} is not in the table"));
            continue;
        };
        let flag = format!(
            "--{}",
            arg.get_long().expect("every variable has a long flag")
        );
        if code_spans(&row[1]) != [flag.clone()] {
            problems.push(format!(
                "{env}: flag is {flag}, the table says {:?}",
                row[1]
            ));
        }
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| v.to_string_lossy().into_owned())
            .collect();
        let cell = &row[2];
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        let described = help
            .split_once("[default: ")
            .and_then(|(_, rest)| rest.split_once(']'))
            .map(|(text, _)| without_backticks(text));
        match (defaults.as_slice(), described) {
            ([value], _) => {
                if code_spans(cell).first() != Some(value) {
                    problems.push(format!(
                        "{env}: default is `{value}`, the table says {cell:?}"
                    ));
                }
            }
            ([], Some(text)) => {
                if !without_backticks(cell).contains(&text) {
                    problems.push(format!(
                        "{env}: the help says the default is {text:?}, the table says {cell:?}"
                    ));
                }
            }
            ([], None) => {
                if !cell.starts_with("unset") {
                    problems.push(format!("{env}: no default, the table says {cell:?}"));
                }
            }
            (many, _) => problems.push(format!("{env}: several defaults {many:?}")),
        }
    }
    for (env, row) in documented {
        if !ENVIRONMENT_ONLY.contains(&env.as_str()) {
            problems.push(format!(
                "{env} is in the table but not a setting of the binary"
            ));
        } else if row[1] != "—" {
            problems.push(format!(
                "{env} is read from the environment only: flag cell must be —"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "README configuration table is out of date:\n{}",
        problems.join("\n")
    );
}

#[test]
fn secrets_have_no_flag() {
    for arg in Cli::command().get_arguments() {
        let env = arg.get_env().map(|e| e.to_string_lossy().into_owned());
        assert!(
            !SECRETS.contains(&env.as_deref().unwrap_or_default()),
            "{env:?} is a secret and must not be a flag"
        );
    }
}

/// Dependency names of one `[section]` of a Cargo manifest.
fn dependency_names(manifest: &str, section: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut inside = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            // `[target.'cfg(unix)'.dependencies]` counts as `[dependencies]`, and so on.
            let kind = section.trim_start_matches('[');
            inside = line == section
                || (line.starts_with("[target.") && line.ends_with(&format!(".{kind}")));
            continue;
        }
        if !inside || line.is_empty() || line.starts_with('#') {
            continue;
        }
        let key = line.split('=').next().unwrap_or_default().trim();
        names.insert(key.trim_end_matches(".workspace").to_owned());
    }
    names
}

#[test]
fn dependency_tables_list_exactly_the_declared_dependencies() {
    // Each crate of the workspace says in its README why each of its dependencies is there.
    for (manifest, readme) in [
        ("Cargo.toml", "README.md"),
        ("middleware/Cargo.toml", "middleware/README.md"),
        ("filter/Cargo.toml", "filter/README.md"),
        ("test-support/Cargo.toml", "test-support/README.md"),
    ] {
        let manifest_text = read(manifest);
        let declared: BTreeSet<String> = dependency_names(&manifest_text, "[dependencies]")
            .into_iter()
            .chain(dependency_names(&manifest_text, "[dev-dependencies]"))
            .collect();
        assert!(!declared.is_empty(), "{manifest} declares dependencies");
        let documented: BTreeSet<String> = tables(&read(readme), &["crate", "why"])
            .into_iter()
            .flatten()
            .flat_map(|row| code_spans(&row[0]))
            .collect();
        let missing: Vec<_> = declared.difference(&documented).collect();
        let extra: Vec<_> = documented.difference(&declared).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{readme} dependency tables: say why these are there {missing:?}; remove these {extra:?}"
        );
    }
    let readme = read("README.md");
    for table in [
        "(middleware/README.md#dependencies)",
        "(filter/README.md#dependencies)",
        "(test-support/README.md#dependencies)",
    ] {
        assert!(readme.contains(table), "README links {table}");
    }
}

#[test]
fn every_example_is_declared_documented_and_run_by_a_test() {
    let manifest = read("Cargo.toml");
    let readme = read("README.md");
    let mut declared = BTreeMap::new();
    for block in manifest.split("[[example]]").skip(1) {
        let block = block.split("\n[").next().unwrap_or_default();
        let value = |key: &str| {
            block.lines().find_map(|line| {
                let (k, v) = line.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_owned())
            })
        };
        let name = value("name").expect("an [[example]] has a name");
        assert_eq!(
            value("test").as_deref(),
            Some("true"),
            "example {name}: `test = true` makes `cargo test` run it"
        );
        declared.insert(name, ());
    }
    let mut files = BTreeSet::new();
    for entry in std::fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            files.insert(path.file_stem().unwrap().to_string_lossy().into_owned());
        }
    }
    assert_eq!(
        declared.keys().cloned().collect::<BTreeSet<_>>(),
        files,
        "each examples/*.rs has an [[example]] entry with test = true"
    );
    for name in &files {
        let source = read(&format!("examples/{name}.rs"));
        assert!(
            source.contains("#[cfg(test)]") && source.contains("async fn runs()"),
            "examples/{name}.rs has a `runs` test"
        );
        assert!(
            readme.contains(&format!("cargo run --example {name}")),
            "README shows how to run example {name}"
        );
    }
}

/// Local link targets of Markdown `[text](target)` links.
fn local_links(text: &str) -> Vec<String> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target.to_owned()))
        .filter(|target| !target.contains("://") && !target.starts_with('#'))
        .map(|target| target.split('#').next().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn local_links_resolve() {
    let mut broken = Vec::new();
    for page in ["README.md"].into_iter().chain(CHECKED_DOCS) {
        let dir = root().join(page);
        let dir = dir.parent().unwrap_or(Path::new("."));
        for target in local_links(&read(page)) {
            if !dir.join(&target).exists() {
                broken.push(format!("{page}: {target}"));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn metrics_page_names_every_exported_metric_and_label() {
    let metrics = Metrics::new();
    metrics.request(200);
    metrics.upstream_latency(0.01);
    metrics.retry();
    metrics.rotation(RotationResult::Ok);
    metrics.filter_action(FilterAction::EmptyTextDropped, 1);
    let usage = fresh_filter::Usage {
        input: 1,
        output: 1,
        cached: 0,
    };
    metrics.token_usage("m", fresh_proxy::proxy::Agent::Other, usage);
    let text = metrics.render(Some(60));
    for outcome in fresh_proxy::health::metrics::RateLimitOutcome::ALL {
        assert!(
            read("docs/METRICS.md").contains(&format!("`{}`", outcome.as_str())),
            "docs/METRICS.md lacks rate limit outcome {}",
            outcome.as_str()
        );
    }
    let exported: BTreeSet<String> = text
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(exported.len() >= 6, "{text}");

    let page = read("docs/METRICS.md");
    let tabled: BTreeSet<String> = tables(&page, &["metric", "type", "labels", "what it counts"])
        .into_iter()
        .flatten()
        .flat_map(|row| code_spans(&row[0]))
        .collect();
    assert_eq!(tabled, exported, "the metrics table of docs/METRICS.md");
    for word in page.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("fresh_proxy_") || word == "fresh_proxy_" {
            continue;
        }
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| word.strip_suffix(suffix))
            .filter(|base| exported.contains(*base))
            .unwrap_or(word);
        assert!(
            exported.contains(family),
            "docs/METRICS.md names {word}, which is not exported"
        );
    }

    for action in FilterAction::ALL {
        assert!(
            page.contains(&format!("`{}`", action.as_str())),
            "docs/METRICS.md lacks filter kind {}",
            action.as_str()
        );
    }
    for result in RotationResult::ALL {
        assert!(
            page.contains(&format!("`{}`", result.as_str())),
            "docs/METRICS.md lacks rotation result {}",
            result.as_str()
        );
    }
}

#[test]
fn failure_page_names_every_error_answer() {
    let page = read("docs/FAILURE_MODES.md");
    let errors = [
        ProxyError::BodyTooLarge { limit: 1 },
        ProxyError::BadRequest("x"),
        ProxyError::UpstreamUnreachable,
        ProxyError::UpstreamTimeout,
        ProxyError::RateLimited { retry_after: 1 },
        ProxyError::BodyBudgetExhausted { budget: 1 },
        ProxyError::TokenApiRefused,
        ProxyError::NoRoute,
    ];
    for error in errors {
        let body = error.body();
        let kind = body["error"]["type"].as_str().unwrap();
        let answer = format!("**{}** `{kind}`", error.status().as_u16());
        assert!(
            page.contains(&answer),
            "docs/FAILURE_MODES.md lacks {answer}"
        );
    }
    let missing: serde_json::Value = serde_json::from_str(fresh_token::MISSING_TOKEN_BODY).unwrap();
    assert_eq!(missing["error"]["type"], "token_unavailable");
    assert!(page.contains("**503** `token_unavailable`"));
}
