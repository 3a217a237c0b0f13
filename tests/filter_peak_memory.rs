//! Peak memory of filtering one large request body, per body shape, as a multiple of its size.
//! Ignored by default (it takes a minute and wants the machine to itself):
//!
//! ```text
//! cargo test --release --test filter_peak_memory -- --ignored --nocapture
//! ```
//!
//! Linux only: each shape runs in a child process of its own (this test binary again), which
//! builds the body, resets its high-water mark (`/proc/self/clear_refs`), filters the body and
//! reads `VmHWM` from `/proc/self/status`. The extra memory is the high-water mark less the
//! resident size before filtering (which already holds the body); the proxy holds the body
//! besides, so its peak per filtered body is the body plus that extra. The test fails when a
//! shape's peak passes four times the body.
//!
//! A second test sends four 26 MiB requests at once through the real binary and reads its own
//! high-water mark: `PROXY_BODY_BUDGET` keeps it near the budget.

mod common;

use std::process::Command;
use std::time::Duration;

use common::binary::{ProxyProcess, command};
use common::fake_workspace::{Behaviour, FakeWorkspace};
use common::http_client;
use fresh_filter::RequestSanitizer;
use serde_json::{Value, json};

const SHAPES: [&str; 4] = ["clean", "dirty-end", "dirty-start", "tiny-values"];
const MIB: usize = 26;
const MAX_PEAK: f64 = 4.0;

#[test]
#[ignore = "measures memory for a minute; run alone with --ignored"]
fn peak_memory_per_filtered_body_stays_within_four_times_its_size() {
    if let Ok(shape) = std::env::var("FILTER_PEAK_SHAPE") {
        measure(&shape);
        return;
    }
    let exe = std::env::current_exe().expect("this test binary");
    println!("| body | size | extra while filtering | peak per body (body + extra) |");
    println!("|---|---|---|---|");
    let mut over = Vec::new();
    for shape in SHAPES {
        let out = Command::new(&exe)
            .args([
                "--exact",
                "peak_memory_per_filtered_body_stays_within_four_times_its_size",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FILTER_PEAK_SHAPE", shape)
            .output()
            .expect("run the measurement");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shape}: {stdout}");
        // The test harness may print its own words before it on the same line.
        let line = stdout
            .lines()
            .find_map(|l| l.find("| ").map(|at| &l[at..]))
            .unwrap_or_else(|| panic!("{shape}: no result in {stdout}"));
        println!("{line}");
        let peak: f64 = line
            .rsplit('|')
            .nth(1)
            .and_then(|cell| cell.trim().trim_end_matches('×').parse().ok())
            .expect("a peak factor");
        if peak > MAX_PEAK {
            over.push(format!("{shape}: {peak}×"));
        }
    }
    assert!(over.is_empty(), "peak above {MAX_PEAK}×: {over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "sends 104 MiB through the proxy; run alone with --ignored"]
async fn four_concurrent_26_mib_requests_stay_within_the_body_budget() {
    const BUDGET_MIB: u64 = 256;
    let ws = FakeWorkspace::start().await;
    let pat = ws.mint(Duration::from_secs(600));
    let home = tempfile::tempdir().unwrap();
    std::fs::write(
        home.path().join(".databrickscfg"),
        format!("[DEFAULT]\nhost = {}\ntoken = {}\n", ws.url(), pat.value),
    )
    .unwrap();
    let mut cmd = command(home.path());
    cmd.env("PAT_ROTATION", "off");
    let proxy = tokio::task::spawn_blocking(move || ProxyProcess::start(cmd))
        .await
        .unwrap();
    let body = bytes::Bytes::from(build("dirty-end", MIB << 20));
    let url = format!("{}/{}/invocations", proxy.url(), Behaviour::Chat.name());
    let sends: Vec<_> = (0..4)
        .map(|_| {
            http_client()
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .timeout(Duration::from_secs(120))
                .send()
        })
        .collect();
    let mut statuses = Vec::new();
    for answer in futures_util::future::join_all(sends).await {
        let answer = answer.expect("an answer");
        let status = answer.status().as_u16();
        if status == 503 {
            assert_eq!(answer.headers()["retry-after"], "2");
        }
        statuses.push(status);
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
    let peak_mib = status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmHWM")
        / 1024;
    println!("statuses {statuses:?}, proxy peak {peak_mib} MiB");
    // On a loaded machine the fake workspace (in this process) has once dropped a connection
    // (502); the budget is about what the proxy holds, whatever the upstream answered.
    if statuses.iter().any(|s| *s != 200 && *s != 503) {
        println!("{}", proxy.logs());
    }
    assert!(statuses.contains(&200), "{statuses:?}");
    // The budget bounds request bodies; the process itself takes some tens of MiB besides.
    assert!(peak_mib <= BUDGET_MIB + 48, "peak {peak_mib} MiB");
}

fn measure(shape: &str) {
    let body = build(shape, MIB << 20);
    let sanitizer = RequestSanitizer::new();
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM (Linux only)");
    let before = status_kib("VmRSS");
    let outcome = sanitizer.sanitize(&body);
    let peak = status_kib("VmHWM");
    let changed = outcome.body.is_some();
    drop(outcome);
    let size = body.len() as f64;
    let extra = (peak.saturating_sub(before) * 1024) as f64;
    println!(
        "| {shape}{} | {:.1} MB | {:.0} MB ({:.1}×) | {:.1}× |",
        if changed { "" } else { " (unchanged)" },
        size / 1e6,
        extra / 1e6,
        extra / size,
        1.0 + extra / size,
    );
}

/// A field of `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS/VmHWM line")
}

/// A chat request of about `size` bytes: an agent's long session of turns (user text, an
/// assistant tool call, its result), with an empty text block at the end, at the start, or
/// nowhere; or one user message holding many tiny values beside an empty text block. Written
/// message by message, so that building it leaves no large freed heap behind for the filter
/// to reuse unseen.
fn build(shape: &str, size: usize) -> Vec<u8> {
    let mut body = Vec::with_capacity(size + 4096);
    body.extend_from_slice(br#"{"model":"databricks-claude-sonnet-4","messages":["#);
    push(
        &mut body,
        &json!({"role": "system", "content": "You are a coding agent."}),
    );
    let empty = json!({"role": "user", "content": [{"type": "text", "text": " "}]});
    if shape == "dirty-start" {
        push(&mut body, &empty);
    }
    if shape == "tiny-values" {
        body.extend_from_slice(
            br#",{"role":"user","content":[{"type":"text","text":" "},{"type":"data","values":["#,
        );
        let mut i = 0;
        while body.len() < size {
            if i > 0 {
                body.push(b',');
            }
            body.push(b'0' + (i % 10) as u8);
            i += 1;
        }
        body.extend_from_slice(b"]}]}");
    } else {
        let output = "fn main() {\n    println!(\"hello\");\n}\n".repeat(40);
        let mut turn = 0;
        while body.len() < size {
            let id = format!("call_{turn}");
            push(
                &mut body,
                &json!({"role": "user", "content": [
                {"type": "text", "text": format!("Step {turn}: read the next file and fix it.")}]}),
            );
            push(
                &mut body,
                &json!({"role": "assistant", "content": "Reading it.", "tool_calls": [
                {"id": id, "type": "function",
                 "function": {"name": "read_file", "arguments": "{\"path\": \"src/main.rs\"}"}}]}),
            );
            push(
                &mut body,
                &json!({"role": "tool", "tool_call_id": id, "content": output}),
            );
            turn += 1;
        }
        if shape == "dirty-end" {
            push(&mut body, &empty);
        }
    }
    body.extend_from_slice(br#"],"tools":[{"type":"function","function":{"name":"read_file","parameters":{"type":"object","properties":{"path":{"type":"string"}}}}}]}"#);
    body
}

/// Appends one message to the list being written.
fn push(body: &mut Vec<u8>, message: &Value) {
    if body.last() != Some(&b'[') {
        body.push(b',');
    }
    serde_json::to_writer(body, message).expect("serialise");
}
