//! Token usage by model and agent: `fresh_proxy_tokens_total{model, agent, kind}`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use fresh_filter::Usage;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::proxy::Agent;

/// At most this many model names become labels; later ones are counted as `other`. Model names
/// come from clients, and only answered requests count, so a workspace's own endpoints fit.
pub(crate) const MAX_MODELS: usize = 64;

/// Every `kind` label.
pub(crate) const TOKEN_KINDS: [&str; 3] = ["input", "output", "cached"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    model: String,
    agent: &'static str,
    kind: &'static str,
}

/// The token counters and the model names admitted as labels.
#[derive(Clone, Debug, Default)]
pub(crate) struct TokenUsage {
    tokens: Family<TokenLabels, Counter>,
    models: Arc<Mutex<HashSet<String>>>,
}

impl TokenUsage {
    pub(crate) fn register(&self, registry: &mut Registry) {
        registry.register(
            "tokens",
            "Tokens used by answered model calls, by model, agent and kind (input includes cached)",
            self.tokens.clone(),
        );
    }

    /// Count one answer's usage.
    pub(crate) fn record(&self, model: &str, agent: Agent, usage: Usage) {
        let model = self.label_for(model);
        for (kind, count) in TOKEN_KINDS
            .into_iter()
            .zip([usage.input, usage.output, usage.cached])
        {
            self.tokens
                .get_or_create(&TokenLabels {
                    model: model.clone(),
                    agent: agent.as_str(),
                    kind,
                })
                .inc_by(count);
        }
    }

    fn label_for(&self, model: &str) -> String {
        let mut models = self.models.lock().unwrap_or_else(PoisonError::into_inner);
        if models.contains(model) {
            return model.to_owned();
        }
        // Printable, bounded names only: a label is no place for arbitrary client bytes.
        let fits =
            !model.is_empty() && model.len() <= 128 && model.chars().all(|c| c.is_ascii_graphic());
        if fits && models.len() < MAX_MODELS {
            models.insert(model.to_owned());
            return model.to_owned();
        }
        "other".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(usage: &TokenUsage) -> String {
        let mut registry = Registry::with_prefix("fresh_proxy");
        usage.register(&mut registry);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        out
    }

    #[test]
    fn usage_is_counted_by_model_agent_and_kind() {
        let usage = TokenUsage::default();
        let one = Usage {
            input: 12,
            output: 9,
            cached: 4,
        };
        usage.record("databricks-claude-sonnet-4-5", Agent::ClaudeCode, one);
        usage.record("databricks-claude-sonnet-4-5", Agent::ClaudeCode, one);
        usage.record(
            "databricks-gpt-5",
            Agent::Codex,
            Usage {
                input: 1,
                output: 2,
                cached: 0,
            },
        );
        let text = render(&usage);
        for line in [
            r#"fresh_proxy_tokens_total{model="databricks-claude-sonnet-4-5",agent="claude-code",kind="input"} 24"#,
            r#"fresh_proxy_tokens_total{model="databricks-claude-sonnet-4-5",agent="claude-code",kind="output"} 18"#,
            r#"fresh_proxy_tokens_total{model="databricks-claude-sonnet-4-5",agent="claude-code",kind="cached"} 8"#,
            r#"fresh_proxy_tokens_total{model="databricks-gpt-5",agent="codex",kind="output"} 2"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn model_labels_are_bounded() {
        let usage = TokenUsage::default();
        let one = Usage {
            input: 1,
            output: 1,
            cached: 0,
        };
        for i in 0..MAX_MODELS + 10 {
            usage.record(&format!("model-{i}"), Agent::Other, one);
        }
        usage.record("bad\"name\n", Agent::Other, one);
        let text = render(&usage);
        let models: HashSet<&str> = text
            .lines()
            .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(models.len(), MAX_MODELS + 1, "{models:?}");
        assert!(models.contains("other"));
        assert!(
            text.contains(r#"model="other",agent="other",kind="input"} 11"#),
            "{text}"
        );
    }
}
