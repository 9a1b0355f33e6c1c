//! Prometheus metrics for operators, served on the admin listener's
//! `/metrics`. Names and labels use the README's words.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    api: &'static str,
    outcome: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReloadLabels {
    source: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: String,
}

/// Which API a decision was asked through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    ExtAuthz,
    DecisionApi,
}

impl Api {
    fn label(self) -> &'static str {
        match self {
            Self::ExtAuthz => "ext_authz",
            Self::DecisionApi => "decision_api",
        }
    }
}

/// Every metric Tollgate exports.
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    decision_seconds: Family<ApiLabel, Histogram>,
    reloads: Family<ReloadLabels, Counter>,
    policy_version: Family<VersionLabels, Gauge>,
    rate_limits: Family<OutcomeLabel, Counter>,
    shadow_over: Counter,
    store_errors: Family<StoreLabel, Counter>,
    jwks_fetches: Family<JwksLabels, Counter>,
    jwks_keys_refused: Family<IssuerLabel, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JwksLabels {
    issuer: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabel {
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    store: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    api: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tollgate");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Decisions by API, outcome (allow/deny) and reason code",
            decisions.clone(),
        );
        let decision_seconds = Family::<ApiLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
                0.01, 0.025, 0.1,
            ])
        });
        registry.register(
            "decision_duration_seconds",
            "Time to decide one request inside Tollgate (excluding transport)",
            decision_seconds.clone(),
        );
        let reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "reloads",
            "Reload attempts by source (policies, keys, limits) and result (swapped, unchanged, rejected)",
            reloads.clone(),
        );
        let policy_version = Family::<VersionLabels, Gauge>::default();
        registry.register(
            "policy_version_info",
            "1 for the policy set version being served",
            policy_version.clone(),
        );
        let rate_limits = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "rate_limit_decisions",
            "Rate limit service answers by outcome (ok/over_limit/defer)",
            rate_limits.clone(),
        );
        let shadow_over = Counter::default();
        registry.register(
            "rate_limit_shadow_over",
            "Descriptors over a shadow-mode limit (counted, not denied)",
            shadow_over.clone(),
        );
        let store_errors = Family::<StoreLabel, Counter>::default();
        registry.register(
            "quota_store_errors",
            "Quota charges the store could not answer in time; failure modes decided",
            store_errors.clone(),
        );
        let jwks_fetches = Family::<JwksLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "JWKS fetches by issuer and result (swapped, timeout, too_large, unparsable, issuer_mismatch, drops_keys_in_use, failed); only swapped installs keys",
            jwks_fetches.clone(),
        );
        let jwks_keys_refused = Family::<IssuerLabel, Counter>::default();
        registry.register(
            "jwks_keys_refused",
            "JWKS members skipped as malformed or too weak (RSA under 2048 bits), by issuer",
            jwks_keys_refused.clone(),
        );
        Self {
            registry,
            decisions,
            decision_seconds,
            reloads,
            policy_version,
            rate_limits,
            shadow_over,
            store_errors,
            jwks_fetches,
            jwks_keys_refused,
        }
    }

    /// Counts one decision and its latency.
    pub fn decision(&self, api: Api, outcome: &'static str, reason: &'static str, seconds: f64) {
        self.decisions
            .get_or_create(&DecisionLabels {
                api: api.label(),
                outcome,
                reason,
            })
            .inc();
        self.decision_seconds
            .get_or_create(&ApiLabel { api: api.label() })
            .observe(seconds);
    }

    /// Counts one rate limit service answer.
    pub fn rate_limit(&self, outcome: &'static str, shadow_over: usize, seconds: f64) {
        self.rate_limits
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
        self.shadow_over.inc_by(shadow_over as u64);
        self.decision_seconds
            .get_or_create(&ApiLabel { api: "ratelimit" })
            .observe(seconds);
    }

    /// Counts a quota store failure.
    pub fn quota_store_error(&self, store: &'static str) {
        self.store_errors.get_or_create(&StoreLabel { store }).inc();
    }

    /// Counts a reload attempt of `source` (`policies`, `keys`).
    pub fn reload(&self, source: &'static str, result: &'static str) {
        self.reloads
            .get_or_create(&ReloadLabels { source, result })
            .inc();
    }

    /// Marks `version` as the one being served.
    pub fn policy_version(&self, version: &str) {
        self.policy_version.clear();
        self.policy_version
            .get_or_create(&VersionLabels {
                version: version.to_string(),
            })
            .set(1);
    }

    /// Counts one JWKS fetch of `issuer` (its configured name) by result.
    pub fn jwks_fetch(&self, issuer: &str, result: &'static str) {
        self.jwks_fetches
            .get_or_create(&JwksLabels {
                issuer: issuer.to_string(),
                result,
            })
            .inc();
    }

    /// Counts `n` JWKS members of `issuer` skipped as malformed or too weak.
    pub fn jwks_keys_refused(&self, issuer: &str, n: u64) {
        self.jwks_keys_refused
            .get_or_create(&IssuerLabel {
                issuer: issuer.to_string(),
            })
            .inc_by(n);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
