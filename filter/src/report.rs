//! What the filter changed, counted by kind.

use std::fmt;

/// One kind of change the filter makes. [`FilterAction::as_str`] is the label used in metrics
/// and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FilterAction {
    /// An empty or whitespace-only text block or text content was dropped from a request.
    EmptyTextDropped,
    /// A `tool_result` block or `tool` message answered no tool call of the preceding assistant
    /// message and was dropped.
    OrphanToolResultDropped,
    /// A message with no content left (and no tool calls) was dropped.
    EmptyMessageDropped,
    /// A JSON-Schema keyword was removed from a tool's parameter schema.
    SchemaKeywordRemoved,
    /// A `required` entry naming no declared property was removed from a tool's schema.
    SchemaRequiredPruned,
    /// A model rule removed the top-level `stream_options` from a request.
    StreamOptionsRemoved,
    /// A `databricks-tool-call` tool call was renamed to the tool named in its arguments.
    ToolNameRemapped,
    /// A `finish_reason` of `stop` on a choice that made tool calls became `tool_calls`.
    FinishReasonFixed,
    /// Held SSE events passed the hold bound and were flushed without remapping.
    SseFlushUnchangedOverBound,
    /// One SSE event was larger than the event bound and was copied through unparsed.
    SseEventOverBound,
    /// A model rule removed a field other than `stream_options` (`reasoning_effort`, ...).
    ModelFieldRemoved,
    /// `stream_options.include_usage` was added to a streamed chat request
    /// (`PROXY_STREAM_USAGE=inject`).
    StreamUsageRequested,
}

impl FilterAction {
    /// Every kind, in a stable order.
    pub const ALL: [FilterAction; 12] = [
        FilterAction::EmptyTextDropped,
        FilterAction::OrphanToolResultDropped,
        FilterAction::EmptyMessageDropped,
        FilterAction::SchemaKeywordRemoved,
        FilterAction::SchemaRequiredPruned,
        FilterAction::StreamOptionsRemoved,
        FilterAction::ToolNameRemapped,
        FilterAction::FinishReasonFixed,
        FilterAction::SseFlushUnchangedOverBound,
        FilterAction::SseEventOverBound,
        FilterAction::ModelFieldRemoved,
        FilterAction::StreamUsageRequested,
    ];

    /// The snake_case label of this kind, as reported in metrics and logs.
    pub const fn as_str(self) -> &'static str {
        match self {
            FilterAction::EmptyTextDropped => "empty_text_dropped",
            FilterAction::OrphanToolResultDropped => "orphan_tool_result_dropped",
            FilterAction::EmptyMessageDropped => "empty_message_dropped",
            FilterAction::SchemaKeywordRemoved => "schema_keyword_removed",
            FilterAction::SchemaRequiredPruned => "schema_required_pruned",
            FilterAction::StreamOptionsRemoved => "stream_options_removed",
            FilterAction::ToolNameRemapped => "tool_name_remapped",
            FilterAction::FinishReasonFixed => "finish_reason_fixed",
            FilterAction::SseFlushUnchangedOverBound => "sse_flush_unchanged_over_bound",
            FilterAction::SseEventOverBound => "sse_event_over_bound",
            FilterAction::ModelFieldRemoved => "model_field_removed",
            FilterAction::StreamUsageRequested => "stream_usage_requested",
        }
    }

    const fn slot(self) -> usize {
        self as usize
    }
}

impl fmt::Display for FilterAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts of what the filter changed, by [`FilterAction`].
///
/// An empty report means the input was left exactly as it came.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct FilterReport {
    counts: [u64; FilterAction::ALL.len()],
}

impl FilterReport {
    /// True when nothing was changed.
    pub fn is_empty(&self) -> bool {
        self.counts.iter().all(|&n| n == 0)
    }

    /// The non-zero counts as `(kind label, count)`, in the order of [`FilterAction::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        FilterAction::ALL
            .iter()
            .map(|&action| (action.as_str(), self.get(action)))
            .filter(|&(_, n)| n > 0)
    }

    /// The count for one kind.
    pub fn get(&self, action: FilterAction) -> u64 {
        self.counts[action.slot()]
    }

    /// Adds `n` to the count for one kind.
    pub fn add(&mut self, action: FilterAction, n: u64) {
        let slot = &mut self.counts[action.slot()];
        *slot = slot.saturating_add(n);
    }

    /// Adds every count of `other` to this report.
    pub fn merge(&mut self, other: &FilterReport) {
        for (mine, theirs) in self.counts.iter_mut().zip(other.counts) {
            *mine = mine.saturating_add(theirs);
        }
    }

    /// The sum of all counts.
    pub fn total(&self) -> u64 {
        self.counts.iter().fold(0, |acc, &n| acc.saturating_add(n))
    }

    pub(crate) fn bump(&mut self, action: FilterAction) {
        self.add(action, 1);
    }
}

impl fmt::Debug for FilterReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_in_slot_order() {
        for (i, action) in FilterAction::ALL.iter().enumerate() {
            assert_eq!(action.slot(), i);
        }
        let mut labels: Vec<_> = FilterAction::ALL.iter().map(|a| a.as_str()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), FilterAction::ALL.len());
    }

    #[test]
    fn counts_merge_and_iterate_non_zero() {
        let mut a = FilterReport::default();
        assert!(a.is_empty());
        a.bump(FilterAction::EmptyTextDropped);
        let mut b = FilterReport::default();
        b.add(FilterAction::EmptyTextDropped, 2);
        b.add(FilterAction::FinishReasonFixed, 1);
        a.merge(&b);
        assert!(!a.is_empty());
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [("empty_text_dropped", 3), ("finish_reason_fixed", 1)]
        );
        assert_eq!(a.total(), 4);
        assert_eq!(
            format!("{a:?}"),
            r#"{"empty_text_dropped": 3, "finish_reason_fixed": 1}"#
        );
    }
}
