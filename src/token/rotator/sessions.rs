//! Whether anyone is using the proxy: `PAT_SESSIONS_URL`, or recent proxied traffic.

use std::time::{Duration, SystemTime};

use crate::token::status::Activity;

use super::schedule::Sessions;

/// How long the sessions URL may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the session signal comes from.
#[derive(Clone, Debug)]
pub enum SessionProbe {
    /// `GET` a JSON document with an integer `active_sessions`.
    Url {
        /// HTTP client.
        client: reqwest::Client,
        /// The document's URL.
        url: String,
    },
    /// Proxied traffic within `idle_after` counts as an active session.
    Traffic {
        /// When the proxy last forwarded a request.
        activity: Activity,
        /// How long after the last request the proxy counts as idle.
        idle_after: Duration,
    },
}

impl SessionProbe {
    /// The session state at `now`. An unreachable or malformed sessions document is
    /// [`Sessions::Unknown`], which the scheduler treats as active.
    pub async fn probe(&self, now: SystemTime) -> Sessions {
        match self {
            Self::Traffic {
                activity,
                idle_after,
            } => traffic_sessions(activity.last(), *idle_after, now),
            Self::Url { client, url } => {
                let answer = async {
                    let response = client.get(url).timeout(PROBE_TIMEOUT).send().await.ok()?;
                    if !response.status().is_success() {
                        return None;
                    }
                    let body = response.bytes().await.ok()?;
                    parse_sessions(&body)
                };
                answer.await.unwrap_or(Sessions::Unknown)
            }
        }
    }
}

/// Sessions from the time of the last proxied request. Pure.
pub fn traffic_sessions(
    last: Option<SystemTime>,
    idle_after: Duration,
    now: SystemTime,
) -> Sessions {
    match last {
        Some(last) if now.duration_since(last).unwrap_or_default() < idle_after => Sessions::Active,
        _ => Sessions::Idle,
    }
}

/// Sessions from a sessions document: `{"active_sessions": n, ...}`. Pure.
pub fn parse_sessions(body: &[u8]) -> Option<Sessions> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    match doc.get("active_sessions")?.as_u64()? {
        0 => Some(Sessions::Idle),
        _ => Some(Sessions::Active),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn sessions_document() {
        let cases: &[(&str, Option<Sessions>)] = &[
            (
                r#"{"active_sessions": 2, "status": "ok"}"#,
                Some(Sessions::Active),
            ),
            (r#"{"active_sessions": 0}"#, Some(Sessions::Idle)),
            (r#"{"active_sessions": "2"}"#, None),
            (r#"{"active_sessions": -1}"#, None),
            (r#"{}"#, None),
            ("not json", None),
        ];
        for (body, expected) in cases {
            assert_eq!(parse_sessions(body.as_bytes()), *expected, "{body}");
        }
    }

    #[test]
    fn traffic_table() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let idle_after = Duration::from_secs(3600);
        let ago = |s| Some(now - Duration::from_secs(s));
        assert_eq!(traffic_sessions(None, idle_after, now), Sessions::Idle);
        assert_eq!(traffic_sessions(ago(10), idle_after, now), Sessions::Active);
        assert_eq!(traffic_sessions(ago(3600), idle_after, now), Sessions::Idle);
    }
}
