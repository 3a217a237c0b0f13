//! Upstream 429s shared across requests: one [`Cooldown`] per upstream endpoint, and the waiting
//! on Tokio's clock.
//!
//! Model serving rate-limits per endpoint (`REQUEST_LIMIT_EXCEEDED`). When every agent gets the
//! 429 and retries on its own, often at once, the storm grows; here the proxy holds the
//! replayable requests instead, all of them behind one cooldown per endpoint, and lets them out
//! gradually when it ends. A request never waits longer than `PROXY_RATE_LIMIT_WAIT` in all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio::time::Instant;

use super::cooldown::{Cooldown, RateLimitPolicy, Turn, parse_retry_after};

/// The cooldowns of every upstream endpoint that answered 429 lately. Cheap to clone.
#[derive(Clone, Debug)]
pub(crate) struct RateLimits {
    policy: RateLimitPolicy,
    endpoints: Arc<Mutex<HashMap<String, Cooldown>>>,
}

/// Why a request does not go out: the endpoint cools down past its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TooLong {
    /// Until the endpoint takes requests again.
    pub(crate) retry_after: Duration,
}

impl RateLimits {
    /// Waiting up to `max_wait` per request; zero turns the waiting off.
    pub(crate) fn new(max_wait: Duration) -> Self {
        Self {
            policy: RateLimitPolicy::new(max_wait),
            endpoints: Arc::default(),
        }
    }

    /// Whether 429s are waited out at all (`PROXY_RATE_LIMIT_WAIT` above 0).
    pub(crate) fn enabled(&self) -> bool {
        !self.policy.max_wait.is_zero()
    }

    /// The latest a request that arrived now may leave.
    pub(crate) fn deadline(&self) -> Instant {
        Instant::now() + self.policy.max_wait
    }

    /// Whether any endpoint is cooling down or has turns queued; when none is, a request need
    /// not work out which endpoint it is for.
    pub(crate) fn any(&self) -> bool {
        !self.lock().is_empty()
    }

    /// Waits until the endpoint `key` takes a request, or says it will not before `deadline`.
    pub(crate) async fn wait_turn(&self, key: &str, deadline: Instant) -> Result<(), TooLong> {
        let mut ticket = None;
        loop {
            let now = Instant::now();
            let turn = {
                let mut endpoints = self.lock();
                forget_idle(&mut endpoints, now);
                let Some(cooldown) = endpoints.get_mut(key) else {
                    return Ok(());
                };
                cooldown.turn(now.into_std(), deadline.into_std(), ticket, &self.policy)
            };
            match turn {
                Turn::Go => return Ok(()),
                Turn::GiveUp { retry_after } => return Err(TooLong { retry_after }),
                Turn::Wait { at, ticket: held } => {
                    ticket = Some(held);
                    tokio::time::sleep_until(Instant::from_std(at)).await;
                }
            }
        }
    }

    /// Records a 429 from `key` carrying `retry_after` (the header's value, if any); returns
    /// the cooldown left from now.
    pub(crate) fn rate_limited(&self, key: &str, retry_after: Option<&str>) -> Duration {
        let now = Instant::now();
        let pause = retry_after.and_then(|value| parse_retry_after(value, SystemTime::now()));
        let mut endpoints = self.lock();
        let cooldown = endpoints.entry(key.to_owned()).or_default();
        let was_cooling = cooldown.is_cooling(now.into_std());
        let until = cooldown.rate_limited(now.into_std(), pause, fastrand::f64(), &self.policy);
        let left = until.saturating_duration_since(now.into_std());
        if !was_cooling {
            // Once per cooldown, not once per held request.
            tracing::info!(
                endpoint = key_path(key),
                cooldown_ms = left.as_millis() as u64,
                retry_after = pause.is_some(),
                "upstream endpoint is rate limited; holding its requests"
            );
        }
        left
    }

    /// Records an answer other than 429 from `key`.
    pub(crate) fn answered(&self, key: &str) {
        let now = Instant::now();
        let mut endpoints = self.lock();
        if let Some(cooldown) = endpoints.get_mut(key) {
            cooldown.answered();
        }
        forget_idle(&mut endpoints, now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cooldown>> {
        self.endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Drops the cooldowns that are over with nobody queued, so that the table holds only
/// endpoints that answered 429 lately and [`RateLimits::any`] turns false again.
fn forget_idle(endpoints: &mut HashMap<String, Cooldown>, now: Instant) {
    endpoints.retain(|_, cooldown| !cooldown.is_idle(now.into_std()));
}

/// The endpoint a request is for, as the key of its cooldown: the upstream origin and path up
/// to the endpoint name (`/serving-endpoints/NAME`), and the body's `model`, which names the
/// endpoint on the OpenAI-style paths (`/serving-endpoints/chat/completions`). Outside
/// `/serving-endpoints/`, the whole path.
pub(crate) fn endpoint_key(uri: &http::Uri, body: Option<&[u8]>) -> String {
    let path = uri.path();
    let scope = match path.find("/serving-endpoints/") {
        Some(at) => {
            let name_at = at + "/serving-endpoints/".len();
            let name_end = path[name_at..]
                .find('/')
                .map_or(path.len(), |end| name_at + end);
            &path[..name_end]
        }
        None => path,
    };
    let scheme = uri.scheme_str().unwrap_or("http");
    let authority = uri.authority().map_or("", |a| a.as_str());
    let mut key = format!("{scheme}://{authority}{scope}");
    if let Some(model) = body.and_then(model_of) {
        key.push_str("#model=");
        key.push_str(&model);
    }
    key
}

/// The path part of a key, for logs.
fn key_path(key: &str) -> &str {
    key.find("://")
        .and_then(|scheme| {
            key[scheme + 3..]
                .find('/')
                .map(|at| &key[scheme + 3 + at..])
        })
        .unwrap_or(key)
}

/// The top-level `model` of a JSON body, read without building the rest.
fn model_of(body: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Model<'a> {
        #[serde(borrow)]
        model: Option<std::borrow::Cow<'a, str>>,
    }
    let first = body.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    serde_json::from_slice::<Model<'_>>(body)
        .ok()?
        .model
        .map(|model| model.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_name_the_endpoint() {
        let cases: [(&str, Option<&[u8]>, &str); 6] = [
            (
                "https://h.example/serving-endpoints/claude/invocations",
                None,
                "https://h.example/serving-endpoints/claude",
            ),
            (
                "https://h.example/serving-endpoints/claude/invocations?x=1",
                Some(br#"{"messages": []}"#),
                "https://h.example/serving-endpoints/claude",
            ),
            (
                "https://h.example/serving-endpoints/chat/completions",
                Some(br#"{"messages": [], "model": "gpt-oss"}"#),
                "https://h.example/serving-endpoints/chat#model=gpt-oss",
            ),
            (
                "https://h.example/serving-endpoints/chat/completions",
                Some(b"[1, 2]"),
                "https://h.example/serving-endpoints/chat",
            ),
            (
                "http://127.0.0.1:9/api/2.0/mcp/x",
                Some(b"not json"),
                "http://127.0.0.1:9/api/2.0/mcp/x",
            ),
            (
                "http://127.0.0.1:9/serving-endpoints/e",
                None,
                "http://127.0.0.1:9/serving-endpoints/e",
            ),
        ];
        for (url, body, key) in cases {
            assert_eq!(endpoint_key(&url.parse().unwrap(), body), key, "{url}");
        }
        assert_eq!(
            key_path("https://h.example/serving-endpoints/e"),
            "/serving-endpoints/e"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn waiters_go_after_the_cooldown_one_by_one() {
        let limits = RateLimits::new(Duration::from_secs(60));
        let key = "http://h/serving-endpoints/e";
        let t0 = Instant::now();
        assert_eq!(limits.rate_limited(key, Some("2")), Duration::from_secs(2));
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let limits = limits.clone();
                let deadline = limits.deadline();
                tokio::spawn(async move {
                    limits.wait_turn(key, deadline).await.unwrap();
                    Instant::now() - t0
                })
            })
            .collect();
        let mut released = Vec::new();
        for waiter in waiters {
            released.push(waiter.await.unwrap());
        }
        released.sort();
        assert!(released[0] >= Duration::from_secs(2), "{released:?}");
        for pair in released.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_millis(25),
                "{released:?}"
            );
        }
        // Other endpoints never waited, and this one is forgotten once its queue has passed.
        assert!(limits.any());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let other = limits.deadline();
        assert_eq!(
            limits
                .wait_turn("http://h/serving-endpoints/f", other)
                .await,
            Ok(())
        );
        assert!(!limits.any());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cooldown_past_the_deadline_is_refused_at_once() {
        let limits = RateLimits::new(Duration::from_secs(5));
        let key = "k";
        limits.rate_limited(key, Some("30"));
        let started = Instant::now();
        let refused = limits.wait_turn(key, limits.deadline()).await;
        assert_eq!(
            refused,
            Err(TooLong {
                retry_after: Duration::from_secs(30)
            })
        );
        assert_eq!(Instant::now(), started);
    }
}
