//! The quota side of the engine: quota rules charged after an allow, and
//! Envoy rate limit service requests.

use std::time::Instant;

use super::Engine;
use super::query::parse_uid;
use crate::decision::{Decision, Outcome, QuotaReport, Reason};
use crate::quota::rls::{RlsAnswer, RlsRequest};
use crate::quota::rules::Planned;
use crate::quota::{FailureMode, QuotaDecision};

impl Engine {
    /// Charges the quota rules that apply to an allowed decision.
    pub(super) async fn charge_rules(&self, decision: &mut Decision) {
        if self.rules.is_empty() {
            return;
        }
        let (Some(principal), Some(action), Some(resource)) =
            (&decision.principal, &decision.action, &decision.resource)
        else {
            return;
        };
        let action_id = uid_id(action);
        let resource_id = uid_id(resource);
        let plans: Vec<Planned> = self
            .rules
            .iter()
            .filter_map(|r| r.plan(principal, &action_id, &resource_id))
            .collect();
        if plans.is_empty() {
            return;
        }
        match self.quota.charge(&plans).await {
            QuotaDecision::Allowed { usage } => {
                decision.quota = plans
                    .iter()
                    .zip(&usage)
                    .filter(|(p, _)| !p.charge.shadow)
                    .filter_map(|(p, u)| u.as_ref().map(|u| (p, u)))
                    .min_by_key(|(p, u)| u.remaining(p.charge.limit))
                    .map(|(p, u)| report(p, u));
            }
            QuotaDecision::OverLimit { usage, blocking } => {
                // The headers of a 429 are those of the limit that refused.
                decision.quota = plans
                    .get(blocking)
                    .zip(usage.get(blocking).copied().flatten())
                    .map(|(p, u)| report(p, &u));
                decision.outcome = Outcome::OverQuota(Reason::OverQuota);
            }
            QuotaDecision::Failed { error, mode } => {
                tracing::warn!(request_id = %decision.request_id, %error, ?mode, "quota store failed");
                self.metrics.quota_store_error(self.quota.store().kind());
                if mode == FailureMode::Allow {
                    for p in plans.iter().filter(|p| !p.charge.shadow) {
                        self.metrics.quota_fail_open(&p.label);
                    }
                    decision.quota_fail_open = true;
                }
                decision.outcome = match mode {
                    FailureMode::Allow => Outcome::Allow,
                    FailureMode::Deny => Outcome::Unavailable(Reason::QuotaUnavailable),
                    FailureMode::Gateway => Outcome::Defer(Reason::QuotaUnavailable),
                };
            }
        }
    }

    /// Decides an Envoy rate limit service request.
    pub async fn should_rate_limit(&self, request: &RlsRequest) -> RlsAnswer {
        let started = Instant::now();
        let limits = self.limits.current();
        if !limits.has_domain(&request.domain) {
            // The domain comes from the caller: counted without a label, and
            // logged at most once a minute.
            self.metrics.rate_limit_unknown_domain();
            self.unknown_domain_warning.warn(|| {
                tracing::warn!(
                    domain = %request.domain.escape_debug(),
                    "rate limit request for a domain no limits file defines; answered OK"
                );
            });
        }
        let answer = crate::quota::rls::decide(&limits, &self.quota, request).await;
        if answer.store_failed {
            self.metrics.quota_store_error(self.quota.store().kind());
            if !answer.over && !answer.defer {
                for s in &answer.statuses {
                    if let (Some(label), Some(_)) = (&s.label, &s.limit) {
                        self.metrics.quota_fail_open(label);
                    }
                }
            }
        }
        let outcome = if answer.defer {
            "defer"
        } else if answer.over {
            "over_limit"
        } else {
            "ok"
        };
        for s in answer.statuses.iter().filter(|s| s.detailed) {
            // The label is the limit's path in the limits file: bounded by
            // the operator's config, never by what callers send.
            let Some(label) = &s.label else { continue };
            let outcome = if s.over {
                "over_limit"
            } else if s.shadow_over {
                "shadow_over"
            } else if s.unlimited {
                "unlimited"
            } else if s.remaining.is_some() {
                "within_limit"
            } else if answer.store_failed {
                "store_failed"
            } else {
                continue;
            };
            self.metrics.limit_decision(label, outcome);
        }
        let shadow_over = answer.statuses.iter().filter(|s| s.shadow_over).count();
        tracing::info!(
            target: "tollgate::decision",
            api = "ratelimit",
            domain = %request.domain,
            descriptors = request.descriptors.len(),
            decision = outcome,
            shadow_over,
            store_failed = answer.store_failed,
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "rate limit decision"
        );
        self.metrics
            .rate_limit(outcome, shadow_over, started.elapsed().as_secs_f64());
        if let Some(trail) = self.audit.get() {
            trail.submit(self.rls_record(request, &answer, started));
        }
        answer
    }
}

impl Engine {
    /// The audit record of a rate limit answer: the domain and the limit
    /// that refused (else the tightest counted one), never descriptor
    /// values (a gateway may put anything in them).
    fn rls_record(
        &self,
        request: &RlsRequest,
        answer: &RlsAnswer,
        started: Instant,
    ) -> crate::audit::AuditRecord {
        let outcome = if answer.defer {
            Outcome::Defer(Reason::QuotaUnavailable)
        } else if answer.over && answer.store_failed {
            Outcome::Unavailable(Reason::QuotaUnavailable)
        } else if answer.over {
            Outcome::OverQuota(Reason::OverQuota)
        } else {
            Outcome::Allow
        };
        let mut decision = Decision::early(
            uuid::Uuid::new_v4().to_string(),
            outcome,
            self.policies.snapshot().version.clone(),
        );
        decision.quota = answer
            .statuses
            .iter()
            .filter_map(|s| Some((s, s.label.as_ref()?, s.limit.as_ref()?, s.remaining?)))
            .min_by_key(|(s, _, _, remaining)| (!s.over, *remaining))
            .map(|(s, label, limit, remaining)| QuotaReport {
                rule: label.clone(),
                limit: limit.requests_per_unit,
                remaining,
                reset: s.reset.unwrap_or_default(),
                unit_secs: limit.unit.millis() / 1000,
            });
        decision.quota_fail_open = answer.store_failed && !answer.over && !answer.defer;
        let mut record = crate::audit::AuditRecord::of(
            &decision,
            &crate::request::HttpRequest::default(),
            started.elapsed(),
        );
        record.api = "ratelimit";
        record.domain = Some(request.domain.clone());
        record
    }
}

/// The id of a `Type::"id"` string.
fn uid_id(uid: &str) -> String {
    parse_uid(uid).map(|(_, id)| id).unwrap_or_default()
}

fn report(plan: &Planned, usage: &crate::quota::Usage) -> QuotaReport {
    QuotaReport {
        rule: plan.label.clone(),
        limit: plan.charge.limit,
        remaining: usage.remaining(plan.charge.limit),
        reset: usage.reset,
        unit_secs: plan.charge.unit.millis() / 1000,
    }
}
