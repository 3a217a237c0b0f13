//! Prometheus metrics, served as text at `/metrics`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use fresh_filter::{FilterAction, FilterReport};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// The `result` label of `fresh_proxy_rotations_total`: how one attempt to get a new token
/// ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RotationResult {
    /// A PAT was minted and published.
    Ok,
    /// Minting failed (network, server error, or the new token could not be saved).
    Failed,
    /// The workspace refused to mint (401, 403, quota).
    Refused,
    /// No rotation: the held token had already expired, so the API was not called with it.
    SkippedExpired,
    /// An OAuth token was fetched.
    OauthOk,
    /// An OAuth token fetch failed.
    OauthFailed,
    /// A `databricks-cli`, `env-oidc` or `file-oidc` token was refreshed.
    RefreshOk,
    /// Such a refresh failed.
    RefreshFailed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

/// What became of an upstream 429 (or of a request held back by one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitOutcome {
    /// The proxy waited and sent the request again; the client never saw the 429.
    Absorbed,
    /// The client got a 429: the request could not be replayed, the wait ran out, or waiting
    /// is off.
    Passed,
}

impl RateLimitOutcome {
    /// Every outcome, in a stable order.
    pub const ALL: [Self; 2] = [Self::Absorbed, Self::Passed];

    /// The `outcome` label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Absorbed => "absorbed",
            Self::Passed => "passed",
        }
    }
}

impl RotationResult {
    /// Every result, in the order `/metrics` lists them.
    pub const ALL: [RotationResult; 8] = [
        Self::Ok,
        Self::Failed,
        Self::Refused,
        Self::SkippedExpired,
        Self::OauthOk,
        Self::OauthFailed,
        Self::RefreshOk,
        Self::RefreshFailed,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Failed => "failed",
            Self::Refused => "refused",
            Self::SkippedExpired => "skipped_expired",
            Self::OauthOk => "oauth_ok",
            Self::OauthFailed => "oauth_failed",
            Self::RefreshOk => "refresh_ok",
            Self::RefreshFailed => "refresh_failed",
        }
    }
}

/// The `class` label of `fresh_proxy_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StatusClass {
    /// 1xx
    Informational,
    /// 2xx
    Success,
    /// 3xx
    Redirection,
    /// 4xx
    ClientError,
    /// 5xx, and anything out of range
    ServerError,
}

impl StatusClass {
    /// Every class, in the order `/metrics` lists them.
    pub const ALL: [StatusClass; 5] = [
        Self::Informational,
        Self::Success,
        Self::Redirection,
        Self::ClientError,
        Self::ServerError,
    ];

    /// The class of an HTTP status code.
    pub fn of(status: u16) -> Self {
        match status {
            100..=199 => Self::Informational,
            200..=299 => Self::Success,
            300..=399 => Self::Redirection,
            400..=499 => Self::ClientError,
            _ => Self::ServerError,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "1xx",
            Self::Success => "2xx",
            Self::Redirection => "3xx",
            Self::ClientError => "4xx",
            Self::ServerError => "5xx",
        }
    }
}

/// Every metric the proxy exports. Cheap to clone: one shared handle.
///
/// Each labelled counter is resolved from its family once, here, so that counting on the
/// request path is one atomic add: no lock, no hashing of a label set.
#[derive(Clone)]
pub struct Metrics(Arc<Handles>);

struct Handles {
    requests: [Counter; StatusClass::ALL.len()],
    upstream_latency: Histogram,
    retries: Counter,
    rotations: [Counter; RotationResult::ALL.len()],
    token_expiry: Gauge<f64, AtomicU64>,
    filter_actions: [Counter; FilterAction::ALL.len()],
    persist_failures: Counter,
    rate_limited: [Counter; RateLimitOutcome::ALL.len()],
    usage: super::usage::TokenUsage,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `fresh_proxy` prefix.
    pub fn new() -> Self {
        let requests = Family::<ClassLabel, Counter>::default();
        let upstream_latency = Histogram::new(exponential_buckets(0.001, 2.0, 18));
        let retries = Counter::default();
        let rotations = Family::<ResultLabel, Counter>::default();
        let token_expiry = Gauge::<f64, AtomicU64>::default();
        let filter_actions = Family::<KindLabel, Counter>::default();
        let rate_limited = Family::<OutcomeLabel, Counter>::default();
        // Every labelled series exists from the start, at 0: a series that appears only with
        // its first event makes `rate()` and "absent" alerts misread the time before it.
        let requests_by_class = StatusClass::ALL.map(|class| {
            requests.get_or_create_owned(&ClassLabel {
                class: class.as_str(),
            })
        });
        let rotations_by_result = RotationResult::ALL.map(|result| {
            rotations.get_or_create_owned(&ResultLabel {
                result: result.as_str(),
            })
        });
        let filter_actions_by_kind = FilterAction::ALL.map(|action| {
            filter_actions.get_or_create_owned(&KindLabel {
                kind: action.as_str(),
            })
        });
        let persist_failures = Counter::default();
        let rate_limited_by_outcome = RateLimitOutcome::ALL.map(|outcome| {
            rate_limited.get_or_create_owned(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
        });
        let mut registry = Registry::with_prefix("fresh_proxy");
        registry.register(
            "persist_failures",
            "Attempts to save a new token (config file, state file, sinks) that failed",
            persist_failures.clone(),
        );
        registry.register(
            "requests",
            "Proxied requests by response status class",
            requests,
        );
        registry.register(
            "upstream_latency_seconds",
            "Time until upstream response headers",
            upstream_latency.clone(),
        );
        registry.register(
            "retries",
            "Requests replayed once with a refreshed token after a 401 or 403",
            retries.clone(),
        );
        registry.register(
            "rotations",
            "Token rotations (and OAuth refreshes) by result",
            rotations,
        );
        registry.register(
            "token_seconds_to_expiry",
            "Seconds until the current token expires (negative once expired, NaN when unknown)",
            token_expiry.clone(),
        );
        registry.register(
            "filter_actions",
            "Content filter changes by kind",
            filter_actions,
        );
        registry.register(
            "rate_limited",
            "Upstream 429s by outcome: absorbed (waited out and replayed) or passed to the client",
            rate_limited,
        );
        let usage = super::usage::TokenUsage::default();
        usage.register(&mut registry);
        Self(Arc::new(Handles {
            usage,
            requests: requests_by_class,
            upstream_latency,
            retries,
            rotations: rotations_by_result,
            token_expiry,
            filter_actions: filter_actions_by_kind,
            persist_failures,
            rate_limited: rate_limited_by_outcome,
            registry,
        }))
    }

    /// Count a response by its status class (`2xx`, `4xx`, ...).
    pub fn request(&self, status: u16) {
        self.0.requests[StatusClass::of(status) as usize].inc();
    }

    /// Record how long the upstream took to send response headers.
    pub fn upstream_latency(&self, seconds: f64) {
        self.0.upstream_latency.observe(seconds);
    }

    /// Count one retry after an upstream 401 or 403.
    pub fn retry(&self) {
        self.0.retries.inc();
    }

    /// Count one rotation attempt by its result.
    pub fn rotation(&self, result: RotationResult) {
        self.0.rotations[result as usize].inc();
    }

    /// Count `count` filter changes of one kind.
    pub fn filter_action(&self, action: FilterAction, count: u64) {
        // `FilterAction` is another crate's non-exhaustive enum: no `as usize`.
        if let Some(slot) = FilterAction::ALL.iter().position(|a| *a == action) {
            self.0.filter_actions[slot].inc_by(count);
        }
    }

    /// Count every change a filter report holds.
    pub fn filter_report(&self, report: &FilterReport) {
        if report.is_empty() {
            return;
        }
        for (action, counter) in FilterAction::ALL.iter().zip(&self.0.filter_actions) {
            let count = report.get(*action);
            if count > 0 {
                counter.inc_by(count);
            }
        }
    }

    /// Count one failed attempt to save a new token to the config file, the state file or a
    /// sink.
    pub fn persist_failure(&self) {
        self.0.persist_failures.inc();
    }

    /// Count one 429 by what became of it.
    pub fn rate_limited(&self, outcome: RateLimitOutcome) {
        self.0.rate_limited[outcome as usize].inc();
    }

    /// Count the tokens one answered model call used.
    pub fn token_usage(&self, model: &str, agent: crate::proxy::Agent, usage: fresh_filter::Usage) {
        self.0.usage.record(model, agent, usage);
    }

    /// Prometheus text exposition, with the token gauge set to `seconds_to_expiry`. An unknown
    /// expiry is NaN, so that no threshold alert mistakes it for "expires now".
    pub fn render(&self, seconds_to_expiry: Option<i64>) -> String {
        self.0
            .token_expiry
            .set(seconds_to_expiry.map_or(f64::NAN, |secs| secs as f64));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &self.0.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_labelled_series_is_there_from_the_start() {
        let text = Metrics::new().render(None);
        let kinds = FilterAction::ALL.map(|a| a.as_str());
        let lines = StatusClass::ALL
            .iter()
            .map(|class| {
                let class = class.as_str();
                format!("fresh_proxy_requests_total{{class=\"{class}\"}} 0")
            })
            .chain(RotationResult::ALL.iter().map(|result| {
                let result = result.as_str();
                format!("fresh_proxy_rotations_total{{result=\"{result}\"}} 0")
            }))
            .chain(
                kinds
                    .iter()
                    .map(|kind| format!("fresh_proxy_filter_actions_total{{kind=\"{kind}\"}} 0")),
            )
            .chain(RateLimitOutcome::ALL.iter().map(|outcome| {
                format!(
                    "fresh_proxy_rate_limited_total{{outcome=\"{}\"}} 0",
                    outcome.as_str()
                )
            }));
        for line in lines {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn each_label_enum_indexes_its_handles_in_all_order() {
        // The handle arrays are indexed by discriminant and built in `ALL` order.
        for (i, class) in StatusClass::ALL.iter().enumerate() {
            assert_eq!(*class as usize, i, "{class:?}");
        }
        for (i, result) in RotationResult::ALL.iter().enumerate() {
            assert_eq!(*result as usize, i, "{result:?}");
        }
        for (i, outcome) in RateLimitOutcome::ALL.iter().enumerate() {
            assert_eq!(*outcome as usize, i, "{outcome:?}");
        }
        // And each count lands on its own series.
        let metrics = Metrics::new();
        for (n, class) in StatusClass::ALL.iter().enumerate() {
            let status = [100, 200, 300, 400, 500][n];
            assert_eq!(StatusClass::of(status), *class);
            for _ in 0..=n {
                metrics.request(status);
            }
        }
        for (n, result) in RotationResult::ALL.iter().enumerate() {
            for _ in 0..=n {
                metrics.rotation(*result);
            }
        }
        for (n, action) in FilterAction::ALL.iter().enumerate() {
            metrics.filter_action(*action, n as u64 + 1);
        }
        let text = metrics.render(None);
        let lines = StatusClass::ALL
            .iter()
            .enumerate()
            .map(|(n, class)| {
                format!(
                    "fresh_proxy_requests_total{{class=\"{}\"}} {}",
                    class.as_str(),
                    n + 1
                )
            })
            .chain(RotationResult::ALL.iter().enumerate().map(|(n, result)| {
                format!(
                    "fresh_proxy_rotations_total{{result=\"{}\"}} {}",
                    result.as_str(),
                    n + 1
                )
            }))
            .chain(FilterAction::ALL.iter().enumerate().map(|(n, action)| {
                format!(
                    "fresh_proxy_filter_actions_total{{kind=\"{}\"}} {}",
                    action.as_str(),
                    n + 1
                )
            }));
        for line in lines {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }

    #[test]
    fn render_reports_what_was_counted() {
        let metrics = Metrics::new();
        metrics.request(200);
        metrics.request(204);
        metrics.request(503);
        metrics.retry();
        metrics.rotation(RotationResult::Ok);
        metrics.filter_action(FilterAction::EmptyTextDropped, 3);
        metrics.upstream_latency(0.004);
        metrics.persist_failure();
        metrics.rate_limited(RateLimitOutcome::Absorbed);
        metrics.rate_limited(RateLimitOutcome::Absorbed);
        metrics.rate_limited(RateLimitOutcome::Passed);
        let text = metrics.render(Some(812));
        for line in [
            "fresh_proxy_requests_total{class=\"2xx\"} 2",
            "fresh_proxy_requests_total{class=\"5xx\"} 1",
            "fresh_proxy_retries_total 1",
            "fresh_proxy_rotations_total{result=\"ok\"} 1",
            "fresh_proxy_filter_actions_total{kind=\"empty_text_dropped\"} 3",
            "fresh_proxy_token_seconds_to_expiry 812.0",
            "fresh_proxy_upstream_latency_seconds_count 1",
            "fresh_proxy_persist_failures_total 1",
            "fresh_proxy_rate_limited_total{outcome=\"absorbed\"} 2",
            "fresh_proxy_rate_limited_total{outcome=\"passed\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
