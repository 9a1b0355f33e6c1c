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
    /// The OpenID AuthZEN Authorization API 1.0 listener.
    Authzen,
}

impl Api {
    /// The `api` label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::ExtAuthz => "ext_authz",
            Self::DecisionApi => "decision_api",
            Self::Authzen => "authzen",
        }
    }
}

/// Lets a log line through at most once per interval, so a value a caller
/// controls cannot flood the log.
#[derive(Debug)]
pub struct Throttle {
    interval_ms: u64,
    last_ms: std::sync::atomic::AtomicU64,
}

impl Throttle {
    /// At most once per `interval`.
    pub fn new(interval: std::time::Duration) -> Self {
        Self {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Runs `log` unless it ran less than the interval ago.
    pub fn warn(&self, log: impl FnOnce()) {
        use std::sync::atomic::Ordering;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let last = self.last_ms.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= self.interval_ms)
            && self
                .last_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            log();
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
    fail_open: Family<RuleLabel, Counter>,
    settlements: Family<ResultLabel, Counter>,
    usage_charged: Family<UsageLabels, Counter>,
    concurrency: Family<ConcurrencyLabels, Counter>,
    reservations_expired: Counter,
    usage_tenants: BoundedValues,
    usage_tiers: BoundedValues,
    unknown_domain: Counter,
    invalidations: Family<KindLabel, Counter>,
    store: std::sync::Arc<StoreMetrics>,
    audit_records: Family<ResultLabel, Counter>,
    limit_decisions: Family<LimitLabels, Counter>,
    lockouts: Family<KindLabel, Counter>,
    introspections: Family<ResultLabel, Counter>,
    lockout_refusals: Family<KindLabel, Counter>,
    listener: std::sync::Arc<crate::listener::ListenerMetrics>,
    shadow_disagreements: Family<DirectionLabel, Counter>,
    decision_cache_hits: Counter,
    decision_cache_misses: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RuleLabel {
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConcurrencyLabels {
    rule: String,
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    rule: String,
    unit: &'static str,
    model: String,
    tenant: String,
    tier: String,
}

/// The values a label the traffic chooses (tenant, tier) may take: the
/// first `max` distinct ones seen, then `other`, so a flood of names cannot
/// grow the series count; `none` without a value.
#[derive(Debug)]
struct BoundedValues {
    seen: std::sync::Mutex<std::collections::HashSet<String>>,
    max: usize,
}

impl BoundedValues {
    fn new(max: usize) -> Self {
        Self {
            seen: std::sync::Mutex::new(std::collections::HashSet::new()),
            max,
        }
    }

    fn label(&self, value: Option<&str>) -> String {
        let Some(value) = value else {
            return "none".into();
        };
        let Ok(mut seen) = self.seen.lock() else {
            return "other".into();
        };
        if seen.contains(value) {
            return value.to_string();
        }
        if seen.len() < self.max {
            seen.insert(value.to_string());
            return value.to_string();
        }
        "other".into()
    }
}

/// Distinct tenants (and tiers) `tollgate_usage_charged_total` labels
/// before the rest count as `other`.
pub const MAX_TENANT_LABELS: usize = 200;
pub const MAX_TIER_LABELS: usize = 32;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// Metrics a quota store records itself (connection health and clock), shared
/// with the registry: `tollgate_quota_store_reconnects_total{reason}` and
/// `tollgate_quota_store_clock_offset_seconds`.
#[derive(Debug, Default)]
pub struct StoreMetrics {
    reconnects: Family<ReasonLabel, Counter>,
    clock_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl StoreMetrics {
    /// Counts a connection dropped for `reason` (see
    /// [`crate::redis_conn::PoisonReason::label`]).
    pub fn reconnect(&self, reason: &'static str) {
        self.reconnects.get_or_create(&ReasonLabel { reason }).inc();
    }

    /// Records the store clock minus the local clock, in milliseconds.
    pub fn clock_offset_ms(&self, offset_ms: i64) {
        self.clock_offset.set(offset_ms as f64 / 1000.0);
    }
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
        let fail_open = Family::<RuleLabel, Counter>::default();
        registry.register(
            "quota_fail_open",
            "Requests allowed because the quota store failed and the limit's failure mode is allow, by rule or limit",
            fail_open.clone(),
        );
        let settlements = Family::<ResultLabel, Counter>::default();
        registry.register(
            "usage_settlements",
            "Usage reports by result (settled, already_settled, unknown_request, refused, record_lost)",
            settlements.clone(),
        );
        let usage_charged = Family::<UsageLabels, Counter>::default();
        registry.register(
            "usage_charged",
            "Settled usage charged to budgets, by rule, unit (tokens, input_tokens, output_tokens, usd_micros), model (models outside the catalog and price table are \"other\"), tenant and tier (the first 200 tenants and 32 tiers seen, then \"other\"; \"none\" without one)",
            usage_charged.clone(),
        );
        let concurrency = Family::<ConcurrencyLabels, Counter>::default();
        registry.register(
            "concurrency_slots",
            "Concurrency slots by rule and event (acquired on this replica, released by a settlement on this replica, refused); slots released by a TTL sweep are counted in reservations_expired",
            concurrency.clone(),
        );
        let reservations_expired = Counter::default();
        registry.register(
            "reservations_expired",
            "Reservations never settled that met their TTL fate in a sweep run by this replica",
            reservations_expired.clone(),
        );
        let unknown_domain = Counter::default();
        registry.register(
            "rate_limit_unknown_domain",
            "Rate limit requests for a domain no limits file defines (answered OK)",
            unknown_domain.clone(),
        );
        let invalidations = Family::<KindLabel, Counter>::default();
        registry.register(
            "invalidations",
            "Invalidation messages applied, by kind (quota_reset, limits, key, all)",
            invalidations.clone(),
        );
        let store = std::sync::Arc::new(StoreMetrics::default());
        registry.register(
            "quota_store_reconnects",
            "Quota store connections dropped and remade, by reason (timeout, unattributed_reply, io, node_unavailable)",
            store.reconnects.clone(),
        );
        registry.register(
            "quota_store_clock_offset_seconds",
            "The quota store's clock minus this replica's clock (Redis TIME); a warning is logged above 5 s",
            store.clock_offset.clone(),
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
        let limit_decisions = Family::<LimitLabels, Counter>::default();
        registry.register(
            "rate_limit_limit_decisions",
            "Rate limit service answers per limit (only limits with detailed_metric: true), by outcome: within_limit, over_limit, shadow_over, unlimited, store_failed",
            limit_decisions.clone(),
        );
        let audit_records = Family::<ResultLabel, Counter>::default();
        registry.register(
            "audit_records",
            "Audit trail records by result: written, dropped (queue full), failed (sink error)",
            audit_records.clone(),
        );
        let lockouts = Family::<KindLabel, Counter>::default();
        registry.register(
            "lockouts",
            "Sources locked out after repeated authentication failures, by kind (address, key, subject)",
            lockouts.clone(),
        );
        let lockout_refusals = Family::<KindLabel, Counter>::default();
        registry.register(
            "lockout_refusals",
            "Requests refused because their source is locked out (locked_out), by kind",
            lockout_refusals.clone(),
        );
        let introspections = Family::<ResultLabel, Counter>::default();
        registry.register(
            "introspections",
            "Token introspections (RFC 7662) by result: active, inactive, error (endpoint down, slow, unreadable), rate_limited",
            introspections.clone(),
        );
        let listener = std::sync::Arc::new(crate::listener::ListenerMetrics::default());
        listener.register(&mut registry);
        let shadow_disagreements = Family::<DirectionLabel, Counter>::default();
        registry.register(
            "shadow_disagreements",
            "Decisions where the shadow policy set (policy.shadow_dir) would have answered otherwise, by direction: allow_to_deny, deny_to_allow",
            shadow_disagreements.clone(),
        );
        let decision_cache_hits = Counter::default();
        registry.register(
            "decision_cache_hits",
            "Policy verdicts served from the decision cache (policy.decision_cache)",
            decision_cache_hits.clone(),
        );
        let decision_cache_misses = Counter::default();
        registry.register(
            "decision_cache_misses",
            "Policy verdicts the decision cache did not hold (evaluated, then cached)",
            decision_cache_misses.clone(),
        );
        Self {
            listener,
            shadow_disagreements,
            decision_cache_hits,
            decision_cache_misses,
            introspections,
            lockouts,
            lockout_refusals,
            fail_open,
            settlements,
            concurrency,
            reservations_expired,
            usage_charged,
            usage_tenants: BoundedValues::new(MAX_TENANT_LABELS),
            usage_tiers: BoundedValues::new(MAX_TIER_LABELS),
            unknown_domain,
            invalidations,
            store,
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
            audit_records,
            limit_decisions,
        }
    }

    /// The listeners' connection metrics (see [`crate::listener`]).
    pub fn listener(&self) -> std::sync::Arc<crate::listener::ListenerMetrics> {
        self.listener.clone()
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

    /// Counts a request allowed only because the store failed (fail-open).
    pub fn quota_fail_open(&self, rule: &str) {
        self.fail_open
            .get_or_create(&RuleLabel {
                rule: rule.to_string(),
            })
            .inc();
    }

    /// Counts a usage report by result (`settled`, `already_settled`,
    /// `unknown_request`, `refused`, `record_lost`).
    pub fn usage_settlement(&self, result: &'static str) {
        self.settlements
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// A concurrency slot of `rule` (from the config) was taken.
    pub fn concurrency_acquired(&self, rule: &str) {
        self.concurrency_event(rule, "acquired");
    }

    /// A settlement released a concurrency slot of `rule`.
    pub fn concurrency_released(&self, rule: &str) {
        self.concurrency_event(rule, "released");
    }

    /// A request was refused for lack of a slot of `rule`.
    pub fn concurrency_refused(&self, rule: &str) {
        self.concurrency_event(rule, "refused");
    }

    fn concurrency_event(&self, rule: &str, event: &'static str) {
        self.concurrency
            .get_or_create(&ConcurrencyLabels {
                rule: rule.to_string(),
                event,
            })
            .inc();
    }

    /// `n` reservations met their TTL fate in a sweep.
    pub fn reservations_expired(&self, n: u64) {
        self.reservations_expired.inc_by(n);
    }

    /// Adds settled usage charged to budget `rule`, in `unit` (micro-dollars
    /// for `usd_micros`). `rule` comes from the config and `model` must be
    /// bounded by the caller (a catalog or price-table model, else "other").
    /// `(tenant, tier)` are the caller's; bounded here ([`MAX_TENANT_LABELS`],
    /// [`MAX_TIER_LABELS`]).
    pub fn usage_charged(
        &self,
        rule: &str,
        unit: &'static str,
        model: &str,
        (tenant, tier): (Option<&str>, Option<&str>),
        amount: u64,
    ) {
        self.usage_charged
            .get_or_create(&UsageLabels {
                rule: rule.to_string(),
                unit,
                model: model.to_string(),
                tenant: self.usage_tenants.label(tenant),
                tier: self.usage_tiers.label(tier),
            })
            .inc_by(amount);
    }

    /// Counts a rate limit request for a domain without limits.
    pub fn rate_limit_unknown_domain(&self) {
        self.unknown_domain.inc();
    }

    /// Counts an applied invalidation of `kind`.
    pub fn invalidation(&self, kind: &'static str) {
        self.invalidations.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts one descriptor's answer for a `detailed_metric` limit
    /// (`limit` is its path in the limits file).
    pub fn limit_decision(&self, limit: &str, outcome: &'static str) {
        self.limit_decisions
            .get_or_create(&LimitLabels {
                limit: limit.to_string(),
                outcome,
            })
            .inc();
    }

    /// Counts an audit record by `result` (`written`, `dropped`, `failed`).
    pub fn audit_record(&self, result: &'static str) {
        self.audit_records
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts a lock placed on a source of `kind` (`address`, `key`,
    /// `subject`).
    pub fn lockout_started(&self, kind: &'static str) {
        self.lockouts.get_or_create(&KindLabel { kind }).inc();
    }

    /// Counts one token introspection by `result`.
    pub fn introspection(&self, result: &'static str) {
        self.introspections
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts a request refused by a lock on a source of `kind`.
    pub fn lockout_refusal(&self, kind: &'static str) {
        self.lockout_refusals
            .get_or_create(&KindLabel { kind })
            .inc();
    }

    /// Counts a shadow policy disagreement (`allow_to_deny` when the live
    /// set allows and the shadow set would deny, `deny_to_allow` the other way).
    pub fn shadow_disagreement(&self, direction: &'static str) {
        self.shadow_disagreements
            .get_or_create(&DirectionLabel { direction })
            .inc();
    }

    /// Counts one decision cache lookup: a hit or a miss.
    pub fn decision_cache(&self, hit: bool) {
        if hit {
            self.decision_cache_hits.inc();
        } else {
            self.decision_cache_misses.inc();
        }
    }

    /// The quota store's own metrics.
    pub fn store(&self) -> std::sync::Arc<StoreMetrics> {
        self.store.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chosen_labels_stay_bounded() {
        let tenants = BoundedValues::new(2);
        assert_eq!(tenants.label(Some("acme")), "acme");
        assert_eq!(tenants.label(Some("globex")), "globex");
        assert_eq!(tenants.label(Some("initech")), "other");
        assert_eq!(tenants.label(Some("acme")), "acme");
        assert_eq!(tenants.label(None), "none");
        let metrics = Metrics::new();
        for i in 0..(MAX_TENANT_LABELS + 50) {
            let tenant = format!("t{i}");
            metrics.usage_charged("r", "tokens", "m", (Some(&tenant), Some("paid")), 1);
        }
        let series = metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("tollgate_usage_charged_total{"))
            .count();
        assert_eq!(
            series,
            MAX_TENANT_LABELS + 1,
            "one series per kept tenant, plus other"
        );
        assert!(
            metrics
                .encode()
                .contains("tenant=\"other\",tier=\"paid\"} 50")
        );
    }
}
