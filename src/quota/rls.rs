//! Deciding a rate limit service request: descriptors → limits (reference
//! matching, `replaces`, `unlimited`, overrides) → one all-or-nothing charge
//! → a status per descriptor.

use std::sync::Arc;
use std::time::Duration;

use super::engine::QuotaDecision;
use super::limits::{LimitDef, LimitSet};
use super::rules::Planned;
use super::{Algorithm, Charge, ChargeMode, CounterKey, FailureMode, QuotaEngine, Unit};

/// Bounds on what one request may ask, so garbage costs bounded work and
/// never a store call.
pub const MAX_DESCRIPTORS: usize = 64;
/// Entries per descriptor.
pub const MAX_ENTRIES: usize = 16;
/// Bytes per key or value.
pub const MAX_PART_BYTES: usize = 1024;

/// One descriptor as asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RlsDescriptor {
    pub entries: Vec<(String, String)>,
    /// Per-descriptor hits; `Some(0)` only checks.
    pub hits_addend: Option<u64>,
    /// A limit the gateway supplies instead of the configured one.
    pub limit_override: Option<LimitOverride>,
}

/// A per-request limit from the gateway (`RateLimitDescriptor.limit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitOverride {
    /// `requests_per_unit` per `unit`; 0 refuses every request.
    Limit(u64, Unit),
    /// An override Tollgate cannot honour (`UNKNOWN` or an undefined unit):
    /// the descriptor is answered OVER_LIMIT, never treated as unlimited.
    Unusable,
}

/// A rate limit request in domain terms.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RlsRequest {
    pub domain: String,
    pub descriptors: Vec<RlsDescriptor>,
    /// Request-level hits (the protocol's 0 already mapped to 1).
    pub hits_addend: u64,
}

/// Why a request is refused unread.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RlsError {
    #[error("domain is empty")]
    EmptyDomain,
    #[error("more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("descriptor {0} has no entries or more than {MAX_ENTRIES}")]
    BadEntryCount(usize),
    #[error("descriptor {0} has an empty key")]
    EmptyKey(usize),
    #[error("descriptor {0} has a key or value longer than {MAX_PART_BYTES} bytes")]
    TooLong(usize),
    #[error("descriptor {0} has a control character")]
    ControlCharacter(usize),
}

impl RlsRequest {
    /// Checks the bounds.
    pub fn validate(&self) -> Result<(), RlsError> {
        if self.domain.is_empty() {
            return Err(RlsError::EmptyDomain);
        }
        if self.descriptors.len() > MAX_DESCRIPTORS {
            return Err(RlsError::TooManyDescriptors);
        }
        for (i, d) in self.descriptors.iter().enumerate() {
            if d.entries.is_empty() || d.entries.len() > MAX_ENTRIES {
                return Err(RlsError::BadEntryCount(i));
            }
            for (k, v) in &d.entries {
                if k.is_empty() {
                    return Err(RlsError::EmptyKey(i));
                }
                if k.len() > MAX_PART_BYTES || v.len() > MAX_PART_BYTES {
                    return Err(RlsError::TooLong(i));
                }
                if k.chars().chain(v.chars()).any(char::is_control) {
                    return Err(RlsError::ControlCharacter(i));
                }
            }
        }
        Ok(())
    }
}

/// The limit shown for a descriptor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShownLimit {
    pub name: Option<String>,
    pub requests_per_unit: u64,
    pub unit: Unit,
}

/// The answer for one descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescriptorAnswer {
    pub over: bool,
    pub limit: Option<ShownLimit>,
    /// The limit's path in the limits file (`llm.tenant`), for metrics.
    pub label: Option<String>,
    /// What the store said is left; `None` when the store was not asked or
    /// failed (then no number is reported, rather than an invented one).
    pub remaining: Option<u64>,
    pub reset: Option<Duration>,
    /// Matched an `unlimited` limit.
    pub unlimited: bool,
    /// Over its limit, but the limit is in shadow mode.
    pub shadow_over: bool,
    /// The limit asked for per-limit metrics (`detailed_metric: true`).
    pub detailed: bool,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RlsAnswer {
    pub over: bool,
    pub statuses: Vec<DescriptorAnswer>,
    /// The store failed and a limit's failure mode is `gateway`.
    pub defer: bool,
    /// The store failed (whatever the failure mode decided).
    pub store_failed: bool,
}

/// The counter of a descriptor. Its hash-slot group is the domain and the
/// descriptor's first entry, so descriptors nested under one top-level entry
/// (a tenant, say) share a slot in a Redis Cluster.
pub fn counter_key(domain: &str, entries: &[(String, String)]) -> CounterKey {
    let group = entries
        .first()
        .map(|(k, v)| format!("{domain}|{k}={v}"))
        .unwrap_or_default();
    CounterKey::new(domain, entries, &group)
}

/// Decides `request` against `limits`, charging through `quota`.
pub async fn decide(limits: &LimitSet, quota: &QuotaEngine, request: &RlsRequest) -> RlsAnswer {
    // Find each descriptor's limit.
    let mut found: Vec<Option<Arc<LimitDef>>> = request
        .descriptors
        .iter()
        .map(|d| {
            let configured = limits.lookup(&request.domain, &d.entries);
            match d.limit_override {
                None => configured,
                // An override keeps the configured limit's way of charging and
                // failing; its value and unit replace the configured ones.
                Some(o) => {
                    let (requests_per_unit, unit) = match o {
                        LimitOverride::Limit(rpu, unit) => (rpu, unit),
                        LimitOverride::Unusable => (0, Unit::Second),
                    };
                    Some(Arc::new(LimitDef {
                        full_key: format!("{}.override", request.domain),
                        name: None,
                        unit,
                        requests_per_unit,
                        unlimited: false,
                        shadow: false,
                        detailed_metric: false,
                        algorithm: Algorithm::FixedWindow,
                        failure_mode: configured
                            .as_ref()
                            .map_or(FailureMode::Deny, |c| c.failure_mode),
                        charge: configured
                            .as_ref()
                            .map_or(ChargeMode::Admission, |c| c.charge),
                        replaces: Vec::new(),
                    }))
                }
            }
        })
        .collect();
    // `replaces`: a limit named by another applying limit is dropped.
    let replaced: Vec<String> = found
        .iter()
        .flatten()
        .flat_map(|l| l.replaces.clone())
        .collect();
    for slot in &mut found {
        if slot
            .as_ref()
            .and_then(|l| l.name.as_ref())
            .is_some_and(|n| replaced.contains(n))
        {
            *slot = None;
        }
    }

    let mut plans = Vec::new();
    let mut plan_of = vec![None; found.len()];
    for (i, (d, limit)) in request.descriptors.iter().zip(&found).enumerate() {
        let Some(limit) = limit.as_ref().filter(|l| !l.unlimited) else {
            continue;
        };
        plan_of[i] = Some(plans.len());
        plans.push(Planned {
            charge: Charge {
                key: counter_key(&request.domain, &d.entries),
                limit: limit.requests_per_unit,
                unit: limit.unit,
                algorithm: limit.algorithm,
                cost: d.hits_addend.unwrap_or(request.hits_addend),
                shadow: limit.shadow,
                mode: limit.charge,
            },
            failure_mode: limit.failure_mode,
            label: limit.full_key.clone(),
            measure: super::rules::Cost::Requests,
        });
    }

    let decision = quota.charge(&plans).await;
    let mut answer = RlsAnswer::default();
    for (i, limit) in found.iter().enumerate() {
        let mut status = DescriptorAnswer::default();
        if let Some(l) = limit {
            status.unlimited = l.unlimited;
            status.label = Some(l.full_key.clone());
            status.detailed = l.detailed_metric;
            if !l.unlimited {
                status.limit = Some(ShownLimit {
                    name: l.name.clone(),
                    requests_per_unit: l.requests_per_unit,
                    unit: l.unit,
                });
            }
        }
        if let Some(p) = plan_of[i] {
            let plan = &plans[p];
            match &decision {
                QuotaDecision::Allowed { usage } | QuotaDecision::OverLimit { usage, .. } => {
                    if let Some(u) = usage.get(p).copied().flatten() {
                        status.remaining = Some(u.remaining(plan.charge.limit));
                        status.reset = Some(u.reset);
                        if !u.fits {
                            if plan.charge.shadow {
                                status.shadow_over = true;
                            } else {
                                status.over = true;
                            }
                        }
                    }
                }
                QuotaDecision::Failed { mode, .. } => {
                    answer.store_failed = true;
                    status.over = *mode == FailureMode::Deny && !plan.charge.shadow;
                    answer.defer |= *mode == FailureMode::Gateway;
                }
            }
        }
        answer.over |= status.over;
        answer.statuses.push(status);
    }
    answer
}
