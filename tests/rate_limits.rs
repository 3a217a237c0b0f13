//! Upstream 429s (`REQUEST_LIMIT_EXCEEDED`) against the fake workspace's rate-limited serving:
//! the proxy holds replayable requests behind one cooldown per endpoint and lets them out
//! gradually, within `PROXY_RATE_LIMIT_WAIT`.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake_workspace::{Behaviour, CHAT_REPLY, FakeWorkspace, ServingAttempt};
use common::harness::{RunningProxy, serve_with, settings};
use common::{JsonBody, http_client};
use fresh_token::{SharedToken, Token, TokenSource};
use serde_json::{Value, json};

const AGENTS: usize = 32;
const LIMITED: u32 = 20;

async fn proxy_with_wait(ws: &FakeWorkspace, wait: Duration) -> RunningProxy {
    let pat = ws.mint(Duration::from_secs(600));
    let source: Arc<dyn TokenSource> =
        Arc::new(SharedToken::with_token(Token::new(&pat.value).unwrap()));
    let mut settings = settings(&ws.serving_base());
    settings.rate_limit_wait = wait;
    serve_with(settings, source).await
}

/// One chat request as agent `agent`; its status, `Retry-After` and JSON body.
async fn chat(proxy: &RunningProxy, agent: usize, stream: bool) -> (u16, Option<String>, Value) {
    let res = http_client()
        .post(format!(
            "{}/{}/invocations",
            proxy.url(),
            Behaviour::Chat.name()
        ))
        .header("x-fake-agent", agent.to_string())
        .json_body(&json!({"messages": [{"role": "user", "content": "hi"}], "stream": stream}))
        .send()
        .await
        .expect("send");
    let status = res.status().as_u16();
    let retry_after = res
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = res.text().await.expect("body");
    let body = if stream {
        Value::String(text)
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, retry_after, body)
}

async fn agents_at_once(proxy: &Arc<RunningProxy>, n: usize) -> Vec<(u16, Option<String>, Value)> {
    let tasks: Vec<_> = (0..n)
        .map(|agent| {
            let proxy = Arc::clone(proxy);
            tokio::spawn(async move { chat(&proxy, agent, false).await })
        })
        .collect();
    let mut answers = Vec::new();
    for task in tasks {
        answers.push(task.await.expect("agent task"));
    }
    answers
}

fn metric(proxy: &RunningProxy, outcome: &str) -> u64 {
    let line = format!("fresh_proxy_rate_limited_total{{outcome=\"{outcome}\"}} ");
    let text = proxy.state.metrics().render(None);
    text.lines()
        .find_map(|l| l.strip_prefix(&line))
        .unwrap_or_else(|| panic!("no {line} in\n{text}"))
        .parse()
        .unwrap()
}

/// Each agent's attempts, in order of arrival.
fn by_agent(attempts: &[ServingAttempt]) -> HashMap<String, Vec<&ServingAttempt>> {
    let mut agents: HashMap<String, Vec<&ServingAttempt>> = HashMap::new();
    for attempt in attempts {
        let agent = attempt
            .agent
            .clone()
            .expect("every attempt names its agent");
        agents.entry(agent).or_default().push(attempt);
    }
    agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_agents_wait_out_twenty_429s_with_retry_after() {
    let ws = FakeWorkspace::start().await;
    let proxy = Arc::new(proxy_with_wait(&ws, Duration::from_secs(60)).await);
    ws.rate_limit_serving(LIMITED, Some(1));

    let answers = agents_at_once(&proxy, AGENTS).await;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], CHAT_REPLY);
    }

    let attempts = ws.serving_attempts();
    let refused: Vec<_> = attempts
        .iter()
        .filter(|a| a.rate_limited.is_some())
        .collect();
    assert_eq!(refused.len(), LIMITED as usize);
    assert!(refused.iter().all(|a| a.rate_limited == Some(Some(1))));
    // Every 429 is answered by one more attempt at most: bounded, no storm.
    assert!(
        attempts.len() <= AGENTS + LIMITED as usize,
        "{} attempts",
        attempts.len()
    );
    // Nothing but the agents' first attempts (all sent before any 429 came back) reaches the
    // workspace inside the cooldown the first 429 announced.
    let first_refusal = refused[0].at;
    let cooldown_end = first_refusal + Duration::from_secs(1);
    let mut retries: Vec<Instant> = Vec::new();
    for (agent, tries) in by_agent(&attempts) {
        for pair in tries.windows(2) {
            assert!(
                pair[0].rate_limited.is_some(),
                "agent {agent} retried a 200"
            );
            assert!(
                pair[1].at >= pair[0].at + Duration::from_secs(1),
                "agent {agent} came back inside the announced second"
            );
        }
        retries.extend(tries.iter().skip(1).map(|a| a.at));
    }
    assert_eq!(retries.len(), LIMITED as usize);
    retries.sort();
    assert!(retries[0] >= cooldown_end);
    // Let out gradually: one per 25 ms after the cooldown, not all at once.
    let spread = *retries.last().unwrap() - cooldown_end;
    assert!(
        spread >= Duration::from_millis(25) * (LIMITED - 1),
        "retries spread over only {spread:?}"
    );
    assert_eq!(metric(&proxy, "absorbed"), u64::from(LIMITED));
    assert_eq!(metric(&proxy, "passed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_retry_after_all_thirty_two_end_in_200_within_30_s() {
    let ws = FakeWorkspace::start().await;
    let proxy = Arc::new(proxy_with_wait(&ws, Duration::from_secs(60)).await);
    ws.rate_limit_serving(LIMITED, None);

    let started = Instant::now();
    let answers = tokio::time::timeout(Duration::from_secs(30), agents_at_once(&proxy, AGENTS))
        .await
        .expect("all agents answered within 30 s");
    assert!(answers.iter().all(|(status, _, _)| *status == 200));
    assert!(started.elapsed() < Duration::from_secs(30));
    let attempts = ws.serving_attempts();
    assert!(attempts.len() <= AGENTS + LIMITED as usize);
    // The backoff without Retry-After is at least half a second: nobody came straight back.
    let first_refusal = attempts
        .iter()
        .find(|a| a.rate_limited.is_some())
        .unwrap()
        .at;
    for tries in by_agent(&attempts).values() {
        for retry in tries.iter().skip(1) {
            assert!(retry.at >= first_refusal + Duration::from_millis(500));
        }
    }
    assert_eq!(metric(&proxy, "absorbed"), u64::from(LIMITED));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_arriving_during_the_cooldown_waits_for_its_end() {
    let ws = FakeWorkspace::start().await;
    let proxy = Arc::new(proxy_with_wait(&ws, Duration::from_secs(60)).await);
    ws.rate_limit_serving(1, Some(2));
    let first = {
        let proxy = Arc::clone(&proxy);
        tokio::spawn(async move { chat(&proxy, 0, false).await })
    };
    common::wait_until(Duration::from_secs(5), "the first 429", || async {
        !ws.serving_attempts().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another agent, which never saw the 429, is held too.
    let (status, _, _) = chat(&proxy, 1, false).await;
    assert_eq!(status, 200);
    assert_eq!(first.await.unwrap().0, 200);

    let attempts = ws.serving_attempts();
    let refusal = attempts[0].at;
    assert_eq!(attempts[0].agent.as_deref(), Some("0"));
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    for attempt in &attempts[1..] {
        assert!(
            attempt.at >= refusal + Duration::from_secs(2),
            "agent {:?} reached the workspace inside the announced cooldown",
            attempt.agent
        );
    }
}

#[tokio::test]
async fn a_streamed_request_is_replayed_when_the_429_comes_before_any_byte() {
    let ws = FakeWorkspace::start().await;
    let proxy = proxy_with_wait(&ws, Duration::from_secs(60)).await;
    ws.rate_limit_serving(1, Some(1));
    let (status, _, body) = chat(&proxy, 0, true).await;
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    assert!(text.contains("chat.completion.chunk"), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(ws.serving_attempts().len(), 2);
}

#[tokio::test]
async fn with_no_wait_a_429_passes_straight_through() {
    let ws = FakeWorkspace::start().await;
    let proxy = proxy_with_wait(&ws, Duration::ZERO).await;
    ws.rate_limit_serving(1, Some(1));
    let (status, retry_after, body) = chat(&proxy, 0, false).await;
    assert_eq!(status, 429);
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert_eq!(body["error_code"], "REQUEST_LIMIT_EXCEEDED");
    // No cooldown either: the next request goes at once.
    let started = Instant::now();
    assert_eq!(chat(&proxy, 1, false).await.0, 200);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(ws.serving_attempts().len(), 2);
    assert_eq!(metric(&proxy, "passed"), 1);
    assert_eq!(metric(&proxy, "absorbed"), 0);
}

#[tokio::test]
async fn past_the_wait_the_client_gets_the_429_with_retry_after() {
    let ws = FakeWorkspace::start().await;
    let proxy = proxy_with_wait(&ws, Duration::from_secs(1)).await;
    // Without Retry-After: the backoff (half a second or more, then a second or more) runs past
    // the one second the request may wait.
    ws.rate_limit_serving(5, None);
    let started = Instant::now();
    let (status, retry_after, body) = chat(&proxy, 0, false).await;
    assert_eq!(status, 429);
    assert_eq!(body["error_code"], "REQUEST_LIMIT_EXCEEDED");
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&secs), "{secs}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(ws.serving_attempts().len() <= 2);
    assert_eq!(metric(&proxy, "passed"), 1);
}

#[tokio::test]
async fn a_cooldown_longer_than_the_wait_is_answered_without_asking_upstream() {
    let ws = FakeWorkspace::start().await;
    let proxy = proxy_with_wait(&ws, Duration::from_secs(5)).await;
    ws.rate_limit_serving(1, Some(30));
    let (status, retry_after, body) = chat(&proxy, 0, false).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("30")));
    assert_eq!(body["error_code"], "REQUEST_LIMIT_EXCEEDED");
    // The next agent is told at once, by the proxy, and the workspace sees nothing of it.
    let started = Instant::now();
    let (status, retry_after, body) = chat(&proxy, 1, false).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["type"], "rate_limited");
    let secs: u64 = retry_after.expect("Retry-After").parse().unwrap();
    assert!((28..=30).contains(&secs), "{secs}");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(ws.serving_attempts().len(), 1);
    assert_eq!(metric(&proxy, "passed"), 2);
}
