//! The quota side of the engine: quota rules charged after an allow, and
//! Envoy rate limit service requests.

use std::time::Instant;

use super::Engine;
use super::query::parse_uid;
use crate::decision::{Decision, Outcome, QuotaReport, Reason};
use crate::quota::reserve::{Record, Settled};
use crate::quota::rls::{RlsAnswer, RlsRequest};
use crate::quota::rules::{PlanInput, Planned};
use crate::quota::{FailureMode, QuotaDecision, StoreError};
use crate::request::HttpRequest;
use crate::usage::{MAX_TOKENS, TokenUsage};

/// A usage report that cannot be settled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UsageError {
    #[error("request_id is empty")]
    NoRequestId,
    #[error(
        "token counts must be at most {MAX_TOKENS}, and cached input tokens at most the input tokens"
    )]
    Absurd,
    #[error("the stored reservation of this request cannot be read")]
    BadRecord,
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl Engine {
    /// Charges the quota rules that apply to an allowed decision; budget
    /// rules reserve the request's estimated usage (see
    /// [`crate::quota::reserve`]).
    pub(super) async fn charge_rules(&self, decision: &mut Decision, _request: &HttpRequest) {
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
        // Estimated once, before the policy (`Engine::estimate`).
        let estimate = decision.estimate.clone().unwrap_or_default();
        let input = PlanInput {
            principal,
            action: &action_id,
            resource_id: &resource_id,
            estimate: &estimate,
            prices: &self.prices,
        };
        let mut plans: Vec<Planned> = Vec::new();
        for rule in &self.rules {
            match rule.plan(&input) {
                Ok(p) => plans.extend(p),
                Err(e) => {
                    tracing::info!(request_id = %decision.request_id, error = %e, "budget cannot be reserved");
                    decision.outcome = Outcome::Invalid(Reason::UsageUnknown);
                    return;
                }
            }
        }
        if plans.is_empty() {
            return;
        }
        match self.quota.charge(&plans).await {
            QuotaDecision::Allowed { usage } => {
                if let Some(mut record) = Record::of(
                    &plans,
                    &usage,
                    estimate.model.as_deref(),
                    estimate.input_tokens,
                ) {
                    record.tenant.clone_from(&principal.tenant);
                    record.tier.clone_from(&principal.tier);
                    self.keep_reservation(&decision.request_id, &record).await;
                }
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
                let budget = plans.get(blocking).is_some_and(|p| p.measure.is_usage());
                decision.outcome = Outcome::OverQuota(if budget {
                    Reason::OverBudget
                } else {
                    Reason::OverQuota
                });
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

    async fn keep_reservation(&self, request_id: &str, record: &Record) {
        let text = match serde_json::to_string(record) {
            Ok(t) => t,
            Err(_) => return,
        };
        let amounts: Vec<String> = record
            .reserved
            .iter()
            .map(|r| {
                format!(
                    "{}={}{}",
                    r.rule,
                    r.amount,
                    if r.measure == crate::quota::rules::Cost::Usd {
                        "u$"
                    } else {
                        ""
                    }
                )
            })
            .collect();
        let kept = tokio::time::timeout(
            self.reservation_deadline(),
            self.quota
                .store()
                .put_reservation(request_id, &text, self.reservation_ttl),
        )
        .await;
        match kept {
            Ok(Ok(true)) => tracing::info!(
                target: "tollgate::decision",
                request_id = %request_id,
                reserved = %amounts.join(","),
                "usage reserved"
            ),
            Ok(Ok(false)) => {
                self.metrics.usage_settlement("duplicate_request_id");
                tracing::warn!(request_id = %request_id, reserved = %amounts.join(","), "a reservation with this request id is already kept; this one stays charged and is never refunded (does Envoy let clients choose x-request-id?)");
            }
            // The reservation stays charged either way; without its record it
            // is never refunded, so the budget errs on the safe side.
            _ => {
                self.metrics.usage_settlement("record_lost");
                tracing::warn!(request_id = %request_id, reserved = %amounts.join(","), "usage reserved, but its record could not be kept; it will not be refunded");
            }
        }
    }

    fn reservation_deadline(&self) -> std::time::Duration {
        std::time::Duration::from_secs(2)
    }

    /// Settles a request's reservation from its actual usage, exactly once
    /// per request id (see [`crate::quota::reserve`]).
    pub async fn report_usage(
        &self,
        request_id: &str,
        usage: TokenUsage,
    ) -> Result<Settled, UsageError> {
        if request_id.is_empty() {
            return Err(UsageError::NoRequestId);
        }
        if usage.input > MAX_TOKENS || usage.output > MAX_TOKENS || usage.cached_input > usage.input
        {
            self.metrics.usage_settlement("refused");
            return Err(UsageError::Absurd);
        }
        self.settle_with(request_id, |_| usage).await
    }

    /// Settles from what a response showed (`ext_proc`): the input the
    /// response did not report is the reservation's estimate.
    pub async fn settle_observed(
        &self,
        request_id: &str,
        observed: crate::usage::response::Observed,
    ) -> Result<Settled, UsageError> {
        if request_id.is_empty() {
            return Err(UsageError::NoRequestId);
        }
        self.settle_with(request_id, |record| {
            observed.usage(record.input_estimate.unwrap_or(0))
        })
        .await
    }

    async fn settle_with(
        &self,
        request_id: &str,
        usage_of: impl FnOnce(&Record) -> TokenUsage,
    ) -> Result<Settled, UsageError> {
        let store = self.quota.store();
        let deadline = self.reservation_deadline();
        let record = tokio::time::timeout(deadline, store.get_reservation(request_id))
            .await
            .map_err(|_| StoreError::Timeout(deadline))??;
        let Some(text) = record else {
            self.metrics.usage_settlement(Settled::Unknown.label());
            let usage = usage_of(&Record {
                v: 1,
                model: None,
                input_estimate: None,
                reserved: Vec::new(),
                tenant: None,
                tier: None,
            });
            self.audit_usage(request_id, &usage, Settled::Unknown);
            return Ok(Settled::Unknown);
        };
        let record: Record = serde_json::from_str(&text).map_err(|_| UsageError::BadRecord)?;
        let usage = usage_of(&record);
        let adjustments = record.adjustments(&usage, &self.prices);
        let applied = tokio::time::timeout(
            deadline,
            store.settle(request_id, &adjustments, self.reservation_ttl),
        )
        .await
        .map_err(|_| StoreError::Timeout(deadline))??;
        let settled = if applied {
            Settled::Now
        } else {
            Settled::Already
        };
        if applied {
            // Counters changed under cached answers.
            self.quota.forget_known_over();
            self.count_charged(&record, &usage);
        }
        self.metrics.usage_settlement(settled.label());
        self.audit_usage(request_id, &usage, settled);
        tracing::info!(
            target: "tollgate::decision",
            request_id = %request_id,
            input_tokens = usage.input,
            output_tokens = usage.output,
            cached_input_tokens = usage.cached_input,
            result = settled.label(),
            "usage settled"
        );
        Ok(settled)
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
    /// `tollgate_usage_charged_total`: what a settlement charged each budget.
    /// The model label is bounded: the request names it, so a model outside
    /// the catalog and the price table counts as "other" (tenant and tier
    /// are bounded in [`crate::metrics`]).
    fn count_charged(&self, record: &Record, usage: &TokenUsage) {
        let model = record
            .model
            .as_deref()
            .filter(|m| self.catalog.model(m).is_some() || self.prices.models.contains_key(*m))
            .unwrap_or("other");
        for r in &record.reserved {
            let Some(amount) = r
                .measure
                .amount(usage, record.model.as_deref(), &self.prices)
            else {
                continue;
            };
            let unit = match r.measure {
                crate::quota::rules::Cost::Usd => "usd_micros",
                other => other.name(),
            };
            self.metrics.usage_charged(
                &r.rule,
                unit,
                model,
                (record.tenant.as_deref(), record.tier.as_deref()),
                amount,
            );
        }
    }

    /// Sends a usage settlement to the audit trail, if one is attached.
    fn audit_usage(&self, request_id: &str, usage: &TokenUsage, settled: Settled) {
        let Some(trail) = self.audit.get() else {
            return;
        };
        let decision = Decision::early(
            request_id.to_string(),
            Outcome::Allow,
            self.policies.snapshot().version.clone(),
        );
        let mut record = crate::audit::AuditRecord::of(
            &decision,
            &crate::request::HttpRequest::default(),
            std::time::Duration::ZERO,
        );
        record.api = "usage";
        record.decision = "settlement";
        record.reason = settled.label();
        record.usage = Some(crate::audit::UsageFacts {
            input_tokens: usage.input,
            output_tokens: usage.output,
            cached_input_tokens: usage.cached_input,
            result: settled.label(),
        });
        trail.submit(record);
    }

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
