//! Token lookup cost on the hot path: `cargo bench -p fresh-token --bench lookup`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use fresh_token::{ConfigFileToken, SharedToken, Token, TokenSource};

fn lookups(c: &mut Criterion) {
    let shared =
        SharedToken::with_token(Token::new("dapi0123456789abcdef0123456789abcdef").unwrap());
    c.bench_function("shared_token_current", |b| {
        b.iter(|| black_box(&shared).current())
    });

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(".databrickscfg");
    std::fs::write(
        &path,
        "[DEFAULT]\nhost = https://example.cloud.databricks.com\ntoken = dapi0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let file = ConfigFileToken::new(&path, "DEFAULT");
    assert!(file.current().is_some());
    c.bench_function("config_file_token_current_cached", |b| {
        b.iter(|| black_box(&file).current())
    });
    assert_eq!(
        file.reads(),
        1,
        "the cached lookup must not re-read the file"
    );

    let stat_always = ConfigFileToken::new(&path, "DEFAULT").stat_interval(Duration::ZERO);
    c.bench_function("config_file_token_current_stat_every_lookup", |b| {
        b.iter(|| black_box(&stat_always).current())
    });
}

criterion_group!(benches, lookups);
criterion_main!(benches);
