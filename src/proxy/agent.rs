//! Which agent sent a request, for the usage metrics: a closed list, so that the label's values
//! are bounded whatever clients send.

use http::HeaderMap;
use http::header::USER_AGENT;

/// The agents usage is counted by. Anything else is [`Agent::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Agent {
    /// Claude Code (`claude-cli/...`).
    ClaudeCode,
    /// OpenAI Codex (`codex_cli_rs/...`, `codex_exec/...`).
    Codex,
    /// OpenCode (`opencode/...`).
    OpenCode,
    /// Gemini CLI (`GeminiCLI/...`).
    GeminiCli,
    /// Hermes (`hermes-agent/...`).
    Hermes,
    /// Cursor.
    Cursor,
    /// Any other client.
    Other,
}

impl Agent {
    /// Every agent, in label order.
    pub const ALL: [Agent; 7] = [
        Agent::ClaudeCode,
        Agent::Codex,
        Agent::OpenCode,
        Agent::GeminiCli,
        Agent::Hermes,
        Agent::Cursor,
        Agent::Other,
    ];

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Agent::ClaudeCode => "claude-code",
            Agent::Codex => "codex",
            Agent::OpenCode => "opencode",
            Agent::GeminiCli => "gemini-cli",
            Agent::Hermes => "hermes",
            Agent::Cursor => "cursor",
            Agent::Other => "other",
        }
    }

    /// `X-Agent-Name` when it names a known agent (`claude-code`, `Claude Code`, `codex`, ...),
    /// else the `User-Agent` family.
    pub fn of(headers: &HeaderMap) -> Agent {
        let header = |name| headers.get(name).and_then(|v| v.to_str().ok());
        if let Some(name) = header("x-agent-name") {
            let name: String = name
                .trim()
                .chars()
                .map(|c| match c {
                    ' ' | '_' => '-',
                    c => c.to_ascii_lowercase(),
                })
                .collect();
            return Agent::ALL
                .into_iter()
                .find(|agent| agent.as_str() == name)
                .unwrap_or(Agent::Other);
        }
        header(USER_AGENT.as_str()).map_or(Agent::Other, Agent::of_user_agent)
    }

    fn of_user_agent(user_agent: &str) -> Agent {
        let ua = user_agent.to_ascii_lowercase();
        let families: [(&[&str], Agent); 6] = [
            (&["claude-cli", "claude-code"], Agent::ClaudeCode),
            (&["codex_cli_rs", "codex_exec", "codex-"], Agent::Codex),
            (&["opencode"], Agent::OpenCode),
            (&["geminicli", "gemini-cli"], Agent::GeminiCli),
            (&["hermes"], Agent::Hermes),
            (&["cursor"], Agent::Cursor),
        ];
        families
            .into_iter()
            .find(|(marks, _)| marks.iter().any(|mark| ua.contains(mark)))
            .map_or(Agent::Other, |(_, agent)| agent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_by_header() {
        let cases: &[(Option<&str>, Option<&str>, Agent)] = &[
            (
                None,
                Some("claude-cli/2.0.14 (external, cli)"),
                Agent::ClaudeCode,
            ),
            (
                None,
                Some("codex_cli_rs/0.46.0 (Ubuntu 24.4.0; x86_64) xterm"),
                Agent::Codex,
            ),
            (
                None,
                Some("opencode/0.15.2 ai-sdk/provider-utils/3.0.9"),
                Agent::OpenCode,
            ),
            (None, Some("GeminiCLI/0.9.0 (linux; x64)"), Agent::GeminiCli),
            (None, Some("hermes-agent/1.2"), Agent::Hermes),
            (None, Some("OpenAI/Python 1.108.0"), Agent::Other),
            (None, None, Agent::Other),
            (
                Some("Claude Code"),
                Some("OpenAI/Python 1.108.0"),
                Agent::ClaudeCode,
            ),
            (Some("gemini_cli"), None, Agent::GeminiCli),
            (Some("codex"), Some("claude-cli/2.0"), Agent::Codex),
            // A name off the list counts as other: it never becomes a label of its own.
            (
                Some("my-own-agent-1234"),
                Some("claude-cli/2.0"),
                Agent::Other,
            ),
        ];
        for (name, user_agent, expected) in cases {
            let mut headers = HeaderMap::new();
            if let Some(name) = name {
                headers.insert("x-agent-name", name.parse().unwrap());
            }
            if let Some(ua) = user_agent {
                headers.insert(USER_AGENT, ua.parse().unwrap());
            }
            assert_eq!(Agent::of(&headers), *expected, "{name:?} {user_agent:?}");
        }
    }

    #[test]
    fn labels_are_distinct() {
        let mut labels: Vec<_> = Agent::ALL.iter().map(|a| a.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Agent::ALL.len());
    }
}
