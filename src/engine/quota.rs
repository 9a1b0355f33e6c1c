//! The quota side of the engine: quota rules charged after an allow, and
//! Envoy rate limit service requests.

use std::time::Instant;

use super::Engine;
use super::query::parse_uid;
use crate::decision::{Decision, Outcome, QuotaReport, Reason};
use crate::quota::Reservation;
use crate::quota::reserve::{Budget, SettleHow, SettleReport, Settled, Slot};
use crate::quota::rls::{RlsAnswer, RlsRequest};
use crate::quota::rules::Cost;
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
    #[error("{0}")]
    Store(#[from] StoreError),
}

/// Where a streamed response is cut (`on_exceed = "end_stream"`): decided
/// at admission from what was reserved, so reading the stream needs no
/// store round trip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCutoff {
    /// The budget rule that ends the stream.
    pub rule: String,
    /// Output tokens the stream may generate: the output part of the
    /// request's reservation plus the budget's headroom left after it.
    pub output_tokens: u64,
}

impl Engine {
    /// The stream cutoff of an admitted request (by request id, once).
    pub fn stream_cutoff(&self, request_id: &str) -> Option<StreamCutoff> {
        self.stream_cutoffs.remove(request_id)
    }

    /// Remembers the tightest `end_stream` budget of an admitted request.
    fn remember_cutoff(
        &self,
        request_id: &str,
        plans: &[Planned],
        usage: &[Option<crate::quota::Usage>],
        input_estimate: Option<u64>,
    ) {
        use crate::quota::rules::OnExceed;
        let cutoff = plans
            .iter()
            .zip(usage)
            .filter(|(p, _)| !p.charge.shadow)
            .filter(|(p, _)| {
                self.rules
                    .iter()
                    .any(|r| r.name == p.label && r.on_exceed == Some(OnExceed::EndStream))
            })
            .filter_map(|(p, u)| {
                let reserved = match p.measure {
                    Cost::OutputTokens => p.charge.cost,
                    Cost::Tokens => p.charge.cost.saturating_sub(input_estimate.unwrap_or(0)),
                    _ => return None,
                };
                let headroom = u.as_ref().map_or(0, |u| u.remaining(p.charge.limit));
                Some(StreamCutoff {
                    rule: p.label.clone(),
                    output_tokens: reserved.saturating_add(headroom),
                })
            })
            .min_by_key(|c| c.output_tokens);
        if let Some(c) = cutoff {
            self.stream_cutoffs.insert(request_id.to_string(), c);
        }
    }

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
            caller_context: decision.agent.origin_request.as_deref(),
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
        let reserving = plans
            .iter()
            .any(|p| p.measure.is_usage() || p.measure == Cost::Concurrent);
        let labels = crate::quota::reserve::UsageLabels {
            tenant: principal.tenant.clone(),
            tier: principal.tier.clone(),
        };
        let reservation = reserving
            .then(|| self.reservation_of(&decision.request_id, &plans, &estimate, &labels));
        let answer = match &reservation {
            None => self.quota.charge(&plans).await,
            Some(r) => match self.quota.reserve(&plans, r).await {
                (_, true) => {
                    self.metrics.usage_settlement("duplicate_request_id");
                    tracing::warn!(request_id = %decision.request_id, "a reservation with this request id is already kept; refused (does Envoy let clients choose x-request-id?)");
                    decision.outcome = Outcome::Invalid(Reason::MalformedRequest);
                    return;
                }
                (answer, false) => answer,
            },
        };
        match answer {
            QuotaDecision::Allowed { usage } => {
                if let Some(r) = reservation.as_ref().filter(|r| r.kept()) {
                    self.log_reserved(&decision.request_id, &plans, r);
                    self.remember_cutoff(&decision.request_id, &plans, &usage, r.input_estimate);
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
                let measure = plans.get(blocking).map(|p| p.measure);
                if let Some(p) = plans
                    .get(blocking)
                    .filter(|p| p.measure == Cost::Concurrent)
                {
                    self.metrics.concurrency_refused(&p.label);
                }
                decision.outcome = Outcome::OverQuota(match measure {
                    Some(Cost::Concurrent) => Reason::TooManyConcurrent,
                    Some(m) if m.is_usage() => Reason::OverBudget,
                    _ => Reason::OverQuota,
                });
            }
            QuotaDecision::Failed { error, mode } => {
                tracing::warn!(request_id = %decision.request_id, %error, ?mode, "quota store failed");
                self.metrics.quota_store_error(self.quota.store().kind());
                if mode != FailureMode::Allow && reservation.is_some() {
                    // The script may have run although its answer was lost
                    // (a timeout): the request is refused, so whatever it
                    // reserved is released now rather than at its TTL.
                    let (store, id) = (self.quota.store().clone(), decision.request_id.clone());
                    tokio::spawn(async move {
                        let _ = store.settle(&id, &SettleHow::Release).await;
                    });
                }
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

    /// The reservation of `plans`: windowed charges in plan order, then
    /// the concurrency slots.
    fn reservation_of(
        &self,
        request_id: &str,
        plans: &[Planned],
        estimate: &crate::usage::Estimate,
        labels: &crate::quota::reserve::UsageLabels,
    ) -> Reservation {
        let (slots, charges): (Vec<&Planned>, Vec<&Planned>) =
            plans.iter().partition(|p| p.measure == Cost::Concurrent);
        let fate_of = |label: &str| {
            self.rules
                .iter()
                .find(|r| r.name == label)
                .and_then(|r| r.on_expiry)
                .unwrap_or(self.fates.on_expiry)
        };
        Reservation {
            request_id: request_id.to_string(),
            charges: charges.iter().map(|p| p.charge.clone()).collect(),
            budgets: charges
                .iter()
                .map(|p| {
                    p.measure.is_usage().then(|| Budget {
                        rule: p.label.clone(),
                        measure: p.measure,
                        on_expiry: fate_of(&p.label),
                    })
                })
                .collect(),
            slots: slots
                .iter()
                .map(|p| Slot {
                    key: p.charge.key.clone(),
                    limit: p.charge.limit,
                    shadow: p.charge.shadow,
                    rule: p.label.clone(),
                })
                .collect(),
            model: estimate.model.clone(),
            labels: labels.clone(),
            price: self.prices.price(estimate.model.as_deref()).copied(),
            input_estimate: estimate.input_tokens,
            ttl: self.reservation_ttl,
        }
    }

    /// The decision log's line for a kept reservation.
    fn log_reserved(&self, request_id: &str, plans: &[Planned], r: &Reservation) {
        let amounts: Vec<String> = plans
            .iter()
            .filter(|p| p.measure.is_usage() || p.measure == Cost::Concurrent)
            .map(|p| match p.measure {
                Cost::Usd => format!("{}={}u$", p.label, p.charge.cost),
                Cost::Concurrent => format!("{}=slot", p.label),
                _ => format!("{}={}", p.label, p.charge.cost),
            })
            .collect();
        for s in &r.slots {
            self.metrics.concurrency_acquired(&s.rule);
        }
        tracing::info!(
            target: "tollgate::decision",
            request_id = %request_id,
            reserved = %amounts.join(","),
            ttl_s = r.ttl.as_secs(),
            "usage reserved"
        );
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
        self.settle(
            request_id,
            SettleHow::Usage {
                input: Some(usage.input),
                output: usage.output,
                cached: usage.cached_input,
            },
            "report",
        )
        .await
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
        if observed.output > MAX_TOKENS || observed.input.is_some_and(|i| i > MAX_TOKENS) {
            self.metrics.usage_settlement("refused");
            return Err(UsageError::Absurd);
        }
        self.settle(
            request_id,
            SettleHow::Usage {
                input: observed.input,
                output: observed.output,
                cached: observed.cached_input,
            },
            "response",
        )
        .await
    }

    /// Settles a request whose response did not say what it used: a client
    /// gone mid-stream (`quota.on_disconnect`) or an upstream error
    /// (`quota.on_upstream_error`). `generated` is what the stream showed.
    pub async fn settle_unfinished(
        &self,
        request_id: &str,
        upstream_error: bool,
        generated: crate::usage::response::Observed,
    ) -> Result<Settled, UsageError> {
        use crate::quota::reserve::{DisconnectFate, Fate};
        let how = if upstream_error {
            match self.fates.on_upstream_error {
                Fate::Release => SettleHow::Release,
                Fate::Charge => SettleHow::Keep,
            }
        } else {
            match self.fates.on_disconnect {
                DisconnectFate::Reservation => SettleHow::Keep,
                DisconnectFate::Generated => {
                    return self.settle_observed(request_id, generated).await;
                }
            }
        };
        if request_id.is_empty() {
            return Err(UsageError::NoRequestId);
        }
        let how_label = if upstream_error {
            "upstream_error"
        } else {
            "disconnect"
        };
        self.settle(request_id, how, how_label).await
    }

    /// One settlement: one store call ([`crate::quota::QuotaStore::settle`]).
    async fn settle(
        &self,
        request_id: &str,
        how: SettleHow,
        source: &'static str,
    ) -> Result<Settled, UsageError> {
        let deadline = self.reservation_deadline();
        let report = tokio::time::timeout(deadline, self.quota.store().settle(request_id, &how))
            .await
            .map_err(|_| StoreError::Timeout(deadline))?
            .inspect_err(|_| self.metrics.usage_settlement("store_failed"))?;
        let settled = report.settled;
        // What was reported, when nothing was charged from it (a duplicate,
        // an unknown request): the audit trail still shows the report.
        let usage = match (settled, how) {
            (Settled::Now, _) => report.usage,
            (
                _,
                SettleHow::Usage {
                    input,
                    output,
                    cached,
                },
            ) => TokenUsage {
                input: input.unwrap_or(0),
                output,
                cached_input: cached,
            },
            _ => TokenUsage::default(),
        };
        if settled == Settled::Now {
            // Counters changed under cached answers.
            self.quota.forget_known_over();
            self.count_charged(&report);
        }
        self.metrics.usage_settlement(settled.label());
        self.audit_usage(request_id, &usage, settled);
        tracing::info!(
            target: "tollgate::decision",
            request_id = %request_id,
            input_tokens = usage.input,
            output_tokens = usage.output,
            cached_input_tokens = usage.cached_input,
            slots_released = report.released.len(),
            source,
            result = settled.label(),
            "usage settled"
        );
        Ok(settled)
    }

    /// Applies the TTL fate of reservations past their TTL, at most `max`
    /// (the background sweep; the store's scripts sweep as they go too).
    pub async fn sweep_reservations(&self, max: usize) -> Result<u64, StoreError> {
        let n = tokio::time::timeout(self.reservation_deadline(), self.quota.store().sweep(max))
            .await
            .map_err(|_| StoreError::Timeout(self.reservation_deadline()))??;
        if n > 0 {
            self.metrics.reservations_expired(n);
            self.quota.forget_known_over();
        }
        Ok(n)
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
    /// the catalog and the price table counts as "other".
    fn count_charged(&self, report: &SettleReport) {
        let model = report
            .model
            .as_deref()
            .filter(|m| self.catalog.model(m).is_some() || self.prices.models.contains_key(*m))
            .unwrap_or("other");
        for c in &report.charged {
            let unit = match c.measure {
                Cost::Usd => "usd_micros",
                other => other.name(),
            };
            let labels = (
                report.labels.tenant.as_deref(),
                report.labels.tier.as_deref(),
            );
            self.metrics
                .usage_charged(&c.rule, unit, model, labels, c.amount);
        }
        for rule in &report.released {
            self.metrics.concurrency_released(rule);
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
