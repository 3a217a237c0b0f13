//! Token usage by model and agent: `fresh_proxy_tokens_total{model, agent, kind}`.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, PoisonError, RwLock};

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

/// The token counters, and for each model name admitted as a label its counters by agent and
/// kind, resolved from the family once so that recording an answer allocates nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct TokenUsage {
    tokens: Family<TokenLabels, Counter>,
    models: Arc<RwLock<HashMap<String, Arc<ByAgent>>>>,
}

/// One model's counters by agent (in [`Agent::ALL`] order), each agent's made on its first
/// answer so that only series with counts are listed; then by kind, in [`TOKEN_KINDS`] order.
#[derive(Debug, Default)]
struct ByAgent([OnceLock<[Counter; TOKEN_KINDS.len()]>; Agent::ALL.len()]);

/// The label every model past [`MAX_MODELS`] (or with an unprintable name) shares.
const OTHER_MODEL: &str = "other";

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
        let (label, counters) = self.counters_for(model);
        let by_kind = counters.0[agent as usize].get_or_init(|| {
            TOKEN_KINDS.map(|kind| {
                self.tokens.get_or_create_owned(&TokenLabels {
                    model: label.to_owned(),
                    agent: agent.as_str(),
                    kind,
                })
            })
        });
        for (counter, count) in by_kind
            .iter()
            .zip([usage.input, usage.output, usage.cached])
        {
            counter.inc_by(count);
        }
    }

    /// The counters of `model`'s label: its own while fewer than [`MAX_MODELS`] names are
    /// admitted, else those of `other`.
    fn counters_for<'m>(&self, model: &'m str) -> (&'m str, Arc<ByAgent>) {
        {
            let models = self.models.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(counters) = models.get(model) {
                return (model, Arc::clone(counters));
            }
        }
        let mut models = self.models.write().unwrap_or_else(PoisonError::into_inner);
        // Printable, bounded names only: a label is no place for arbitrary client bytes.
        let fits =
            !model.is_empty() && model.len() <= 128 && model.chars().all(|c| c.is_ascii_graphic());
        let admitted = models.keys().filter(|name| *name != OTHER_MODEL).count();
        let label = if fits && (admitted < MAX_MODELS || models.contains_key(model)) {
            model
        } else {
            OTHER_MODEL
        };
        let counters = models.entry(label.to_owned()).or_default();
        (label, Arc::clone(counters))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

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
    fn each_agent_counts_under_its_own_label() {
        // The counters are indexed by discriminant, in `Agent::ALL` order.
        let usage = TokenUsage::default();
        for (n, agent) in Agent::ALL.iter().enumerate() {
            assert_eq!(*agent as usize, n, "{agent:?}");
            let usage_n = Usage {
                input: n as u64 + 1,
                output: 0,
                cached: 0,
            };
            usage.record("m", *agent, usage_n);
        }
        let text = render(&usage);
        for (n, agent) in Agent::ALL.iter().enumerate() {
            let line = format!(
                r#"fresh_proxy_tokens_total{{model="m",agent="{}",kind="input"}} {}"#,
                agent.as_str(),
                n + 1
            );
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
