//! One backoff for every call to Databricks: the token API, the OAuth endpoints and the CLI.
//!
//! Exponential with "equal jitter", raised to a server's `Retry-After` when it gives one. The
//! numbers are the caller's: the rotator scales them to the token lifetime, as OAuth does.

use std::time::{Duration, SystemTime};

/// Exponential backoff with jitter between failed attempts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// The delay before the first retry, before jitter.
    pub base: Duration,
    /// No delay exceeds this (before `Retry-After`).
    pub cap: Duration,
}

impl Backoff {
    /// The delay after failed attempt number `attempt` (0 for the first failure), with
    /// `fraction` in `[0, 1)` drawn at random: `d = min(cap, base * 2^attempt)`, then a delay
    /// in `[d/2, d)` ("equal jitter", so instances that failed together spread out but never
    /// hammer the API). A `Retry-After` from the server raises the delay to at least that.
    pub fn delay(&self, attempt: u32, fraction: f64, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .base
            .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.cap)
            .min(self.cap);
        let jittered = exp / 2 + exp.mul_f64(fraction.clamp(0.0, 1.0) / 2.0);
        match retry_after {
            Some(after) => jittered.max(after),
            None => jittered,
        }
    }
}

/// The delay the `Retry-After` header of `headers` asks for at `now`, if any.
pub fn retry_after(headers: &http::HeaderMap, now: SystemTime) -> Option<Duration> {
    headers
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, now))
}

/// The delay a `Retry-After` header asks for at `now`: delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn backoff_sequence() {
        let backoff = Backoff {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
        };
        let cases: &[(u32, f64, Option<u64>, Duration)] = &[
            (0, 0.0, None, Duration::from_millis(500)),
            (0, 0.999_999, None, Duration::from_millis(1_000)),
            (1, 0.0, None, Duration::from_secs(1)),
            (2, 0.5, None, Duration::from_secs(3)),
            (3, 0.0, None, Duration::from_secs(4)),
            (6, 0.0, None, Duration::from_secs(30)),
            (7, 0.0, None, Duration::from_secs(30)),
            (40, 1.0, None, Duration::from_secs(60)),
            (0, 0.0, Some(7), Duration::from_secs(7)),
            (6, 0.0, Some(7), Duration::from_secs(30)),
        ];
        for (attempt, fraction, retry_after, expected) in cases {
            let got = backoff.delay(*attempt, *fraction, retry_after.map(secs));
            let diff = got.abs_diff(*expected);
            assert!(
                diff < Duration::from_millis(1),
                "attempt {attempt} fraction {fraction}: {got:?} != {expected:?}"
            );
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(1_445_412_480);
        assert_eq!(parse_retry_after("120", now), Some(secs(120)));
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now),
            Some(secs(10))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
