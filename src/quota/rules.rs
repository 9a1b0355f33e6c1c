//! Quota rules charged inside ext_authz `Check`, after the policy allowed.
//!
//! ```toml
//! [[quota.rules]]
//! name = "key-per-minute"
//! per = ["key"]                 # key, tenant, group, model, tier, action (tool), caller_context; empty = one global counter
//! unit = "minute"
//! tiers = { free = 20, paid = 600, enterprise = 6000 }
//! requests_per_unit = 100       # for tiers not listed (optional)
//! cost = "requests"             # or tokens, input_tokens, output_tokens, usd
//! ```
//!
//! A rule whose `cost` is not `requests` is a **budget**: the request's
//! estimated usage is reserved when it is admitted (all-or-nothing with every
//! other rule), and settled from the actual usage reported afterwards
//! ([`crate::quota::reserve`]). Limits of `usd` rules are in US dollars (held
//! as integer micro-dollars); the others count whole units.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Algorithm, Charge, ChargeMode, CounterKey, FailureMode, Unit};
use crate::identity::Principal;
use crate::usage::{Estimate, Prices, TokenUsage};

/// The counter domain of ext_authz quota rules (as seen by `tollgate quota`).
pub const DOMAIN: &str = "tollgate.authz";

/// What a rule's counter is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// The authenticated principal (API key id, service id, …).
    Key,
    Tenant,
    /// Each group (team) the principal belongs to: one counter per group, all
    /// charged. A principal in no group is not limited by the rule.
    Group,
    /// The request's resource (the model).
    Model,
    Tier,
    /// The request's Cedar action id: for an MCP `tools/call`, the tool
    /// (`tool` is an alias), so one rule keeps a counter per tool.
    #[serde(alias = "tool")]
    Action,
    /// The originating request of a verified signed caller context (its
    /// `rid`): with `tool`, "at most N calls of this tool per originating
    /// request", whichever hop makes them. A request without a caller
    /// context is not limited by the rule.
    CallerContext,
}

/// What a request costs against a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Cost {
    /// One per request.
    #[default]
    Requests,
    /// Input plus output tokens.
    Tokens,
    InputTokens,
    OutputTokens,
    /// US dollars by `quota.prices`, counted in micro-dollars.
    Usd,
    /// Requests in flight: a slot taken at admission and released when the
    /// request is settled (or its reservation's TTL passes). No window.
    Concurrent,
}

impl Cost {
    /// The amount `usage` costs in this measure (micro-dollars for `usd`);
    /// `None` when the model has no price.
    pub fn amount(self, usage: &TokenUsage, model: Option<&str>, prices: &Prices) -> Option<u64> {
        Some(match self {
            Self::Requests | Self::Concurrent => 1,
            Self::Tokens => usage.input.saturating_add(usage.output),
            Self::InputTokens => usage.input,
            Self::OutputTokens => usage.output,
            Self::Usd => prices.price(model)?.cost_micros(usage),
        })
    }

    /// Whether a request's usage must be estimated and settled.
    pub fn is_usage(self) -> bool {
        !matches!(self, Self::Requests | Self::Concurrent)
    }

    /// The metric / log name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
            Self::Usd => "usd",
            Self::Concurrent => "concurrent",
        }
    }
}

/// One quota rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    pub name: String,
    #[serde(default)]
    pub per: Vec<Per>,
    /// The window; required except for `concurrent` rules, which have none.
    #[serde(default)]
    pub unit: Option<Unit>,
    /// The limit for principals whose tier is not in `tiers`, in the rule's
    /// `cost` measure (US dollars for `usd`). `limit` is an alias.
    #[serde(default, alias = "limit")]
    pub requests_per_unit: Option<f64>,
    /// Tier profile: the limit for each tier.
    #[serde(default)]
    pub tiers: BTreeMap<String, f64>,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Counted and reported, never denies (an `audit` budget).
    #[serde(default, alias = "audit")]
    pub shadow: bool,
    /// Only these actions (empty: all).
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub cost: Cost,
    /// Budgets: the output part of a reservation is at most this share of
    /// the limit (0 < share ≤ 1), so a large `max_tokens` alone does not lock
    /// a caller out while its usage is low. Settlement charges what was
    /// actually used either way. Unset: the whole `max_tokens`.
    #[serde(default)]
    pub max_output_share: Option<f64>,
    /// Budgets: the output tokens reserved when the request names no
    /// `max_tokens`. Unset: such a request cannot be estimated.
    #[serde(default)]
    pub default_output_tokens: Option<u64>,
    /// Budgets: what a request whose usage cannot be estimated (unreadable
    /// body, no `max_tokens` and no `default_output_tokens`) reserves, in the
    /// rule's measure. Unset (the default): it is refused (`over_budget`),
    /// never let through free.
    #[serde(default)]
    pub unestimated_reserve: Option<f64>,
    /// Budgets: what a reservation never settled costs when its TTL passes
    /// (`charge` or `release`). Unset: `quota.on_expiry`.
    #[serde(default)]
    pub on_expiry: Option<super::reserve::Fate>,
    /// Token budgets: what happens when a streamed response that ext_proc
    /// watches outgrows what was reserved for it plus the budget's headroom
    /// left at admission (`end_stream`: the stream is cut at an event
    /// boundary with a final `event: error`). Unset: `continue`.
    #[serde(default)]
    pub on_exceed: Option<OnExceed>,
}

/// What a streamed response does when it crosses a hard token budget
/// mid-stream (`on_exceed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceed {
    /// The stream completes; settlement charges the excess (the default).
    #[default]
    Continue,
    /// The stream ends after the last complete event that fits, with a final
    /// SSE `event: error` (`{"error":{"code":"over_budget","rule":…}}`).
    EndStream,
}

/// A charge with what the engine needs to report and fail it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub charge: Charge,
    pub failure_mode: FailureMode,
    /// Rule name or limit path, for reason codes, logs and headers.
    pub label: String,
    /// What the charge counts; anything but requests is reserved and settled.
    pub measure: Cost,
}

/// Why a budget cannot be planned for a request; the request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("quota rule {rule:?}: the request's usage cannot be estimated")]
    Unestimated { rule: String },
    #[error("quota rule {rule:?}: model {model:?} has no price and unknown models are denied")]
    Unpriced { rule: String, model: String },
}

/// What a rule needs to know about a request.
pub struct PlanInput<'a> {
    pub principal: &'a Principal,
    pub action: &'a str,
    pub resource_id: &'a str,
    pub estimate: &'a Estimate,
    pub prices: &'a Prices,
    /// The originating request id of the request's verified caller context.
    pub caller_context: Option<&'a str>,
}

impl QuotaRule {
    /// Checks the rule; the message names it.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("quota.rules: a rule has an empty name".into());
        }
        match (self.cost, self.unit) {
            (Cost::Concurrent, Some(_)) => {
                return Err(format!(
                    "quota.rules {:?}: a concurrent rule counts requests in flight and has no window; remove unit",
                    self.name
                ));
            }
            (Cost::Concurrent, None) if self.algorithm != Algorithm::FixedWindow => {
                return Err(format!(
                    "quota.rules {:?}: a concurrent rule has no window, so no algorithm",
                    self.name
                ));
            }
            (Cost::Concurrent, None) => {}
            (_, None) => {
                return Err(format!(
                    "quota.rules {:?}: set unit (second, minute, hour, day, week, month, year, calendar_month)",
                    self.name
                ));
            }
            (_, Some(_)) => {}
        }
        if self.on_expiry.is_some() && !self.cost.is_usage() {
            return Err(format!(
                "quota.rules {:?}: on_expiry applies to token and usd budgets (concurrency slots are always released)",
                self.name
            ));
        }
        if self.on_exceed == Some(OnExceed::EndStream)
            && (self.shadow || !matches!(self.cost, Cost::Tokens | Cost::OutputTokens))
        {
            return Err(format!(
                "quota.rules {:?}: on_exceed = \"end_stream\" applies to enforced tokens and output_tokens budgets (not shadow, not {})",
                self.name,
                self.cost.name()
            ));
        }
        if self.requests_per_unit.is_none() && self.tiers.is_empty() {
            return Err(format!(
                "quota.rules {:?}: set requests_per_unit (or limit) or tiers",
                self.name
            ));
        }
        let amounts = self.requests_per_unit.iter().chain(self.tiers.values());
        for &v in amounts.chain(self.unestimated_reserve.iter()) {
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "quota.rules {:?}: limits must be 0 or more, not {v}",
                    self.name
                ));
            }
            if self.cost != Cost::Usd && v.fract() != 0.0 {
                return Err(format!(
                    "quota.rules {:?}: {} limits are whole numbers, not {v}",
                    self.name,
                    self.cost.name()
                ));
            }
        }
        if let Some(share) = self.max_output_share
            && !(share > 0.0 && share <= 1.0)
        {
            return Err(format!(
                "quota.rules {:?}: max_output_share must be in (0, 1], not {share}",
                self.name
            ));
        }
        if !self.cost.is_usage()
            && (self.max_output_share.is_some()
                || self.default_output_tokens.is_some()
                || self.unestimated_reserve.is_some())
        {
            return Err(format!(
                "quota.rules {:?}: max_output_share, default_output_tokens and unestimated_reserve apply to token and usd budgets only",
                self.name
            ));
        }
        Ok(())
    }

    /// A configured amount in counted units (micro-dollars for `usd`).
    fn units(&self, v: f64) -> u64 {
        let v = if self.cost == Cost::Usd { v * 1e6 } else { v };
        // Validated finite and not negative; saturates for absurd values.
        v.round() as u64
    }

    /// The limit for `principal`, if the rule applies to it.
    fn limit_for(&self, principal: &Principal) -> Option<u64> {
        principal
            .tier
            .as_ref()
            .and_then(|t| self.tiers.get(t).copied())
            .or(self.requests_per_unit)
            .map(|v| self.units(v))
    }

    /// What this request reserves against the rule.
    fn reservation(&self, limit: u64, input: &PlanInput<'_>) -> Result<u64, PlanError> {
        let e = input.estimate;
        if !self.cost.is_usage() {
            return Ok(1);
        }
        let output = e.max_output_tokens.or(self.default_output_tokens);
        let (Some(input_tokens), Some(output)) = (e.input_tokens, output) else {
            return self
                .unestimated_reserve
                .map(|v| self.units(v))
                .ok_or_else(|| PlanError::Unestimated {
                    rule: self.name.clone(),
                });
        };
        let output = match self.max_output_share {
            // The cap is in tokens for token rules; for usd it caps the
            // output tokens so their price is at most the share.
            Some(share) if self.cost != Cost::Usd => output.min((limit as f64 * share) as u64),
            _ => output,
        };
        let usage = TokenUsage {
            input: input_tokens,
            output,
            cached_input: 0,
        };
        let amount = self
            .cost
            .amount(&usage, e.model.as_deref(), input.prices)
            .ok_or_else(|| PlanError::Unpriced {
                rule: self.name.clone(),
                model: e.model.clone().unwrap_or_default(),
            })?;
        Ok(match (self.cost, self.max_output_share) {
            (Cost::Usd, Some(share)) => {
                let input_only = self
                    .cost
                    .amount(
                        &TokenUsage { output: 0, ..usage },
                        e.model.as_deref(),
                        input.prices,
                    )
                    .unwrap_or(amount);
                let output_part = amount - input_only.min(amount);
                input_only + output_part.min((limit as f64 * share) as u64)
            }
            _ => amount,
        })
    }

    /// The charges this rule makes for a request: none when it does not
    /// apply, one per group for `per = ["group"]`, else one.
    pub fn plan(&self, input: &PlanInput<'_>) -> Result<Vec<Planned>, PlanError> {
        let principal = input.principal;
        if !self.actions.is_empty() && !self.actions.iter().any(|a| a == input.action) {
            return Ok(Vec::new());
        }
        let Some(limit) = self.limit_for(principal) else {
            return Ok(Vec::new());
        };
        let groups: Vec<Option<&str>> = if self.per.contains(&Per::Group) {
            principal.groups.iter().map(|g| Some(g.as_str())).collect()
        } else {
            vec![None]
        };
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let origin = match (self.per.contains(&Per::CallerContext), input.caller_context) {
            (false, _) => "-",
            (true, Some(rid)) => rid,
            (true, None) => return Ok(Vec::new()),
        };
        let cost = self.reservation(limit, input)?;
        let tenant = principal.tenant.as_deref().unwrap_or("-");
        let mut planned = Vec::with_capacity(groups.len());
        for group_id in groups {
            let mut entries = vec![("rule".to_string(), self.name.clone())];
            for per in &self.per {
                let (k, v) = match per {
                    Per::Key => ("principal", principal.uid()),
                    Per::Tenant => ("tenant", tenant.to_string()),
                    Per::Group => ("group", group_id.unwrap_or("-").to_string()),
                    Per::Model => ("model", input.resource_id.to_string()),
                    Per::Tier => ("tier", principal.tier.clone().unwrap_or_else(|| "-".into())),
                    Per::Action => ("action", input.action.to_string()),
                    Per::CallerContext => ("caller_context", origin.to_string()),
                };
                entries.push((k.to_string(), v));
            }
            // The hash-slot group must follow from the counter alone: a
            // tenant's (and its teams' and keys') counters share their
            // tenant's slot, so a request's budgets are charged atomically.
            let slot = if self
                .per
                .iter()
                .any(|p| matches!(p, Per::Key | Per::Tenant | Per::Group))
            {
                format!("tenant:{tenant}")
            } else {
                entries
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            planned.push(Planned {
                charge: Charge {
                    key: CounterKey::new(DOMAIN, &entries, &slot),
                    limit,
                    // A concurrent rule's counter has no window; the unit is
                    // only what its RateLimit headers say (one second).
                    unit: self.unit.unwrap_or(Unit::Second),
                    algorithm: self.algorithm,
                    cost,
                    shadow: self.shadow,
                    mode: ChargeMode::Admission,
                },
                failure_mode: self.failure_mode,
                label: self.name.clone(),
                measure: self.cost,
            });
        }
        Ok(planned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::PrincipalKind;

    fn key(id: &str, tenant: &str, tier: &str) -> Principal {
        Principal {
            kind: PrincipalKind::ApiKey,
            id: id.into(),
            tenant: Some(tenant.into()),
            tier: Some(tier.into()),
            scopes: vec![],
            groups: vec![],
            models: vec![],
        }
    }

    fn rule() -> QuotaRule {
        QuotaRule {
            name: "per-key".into(),
            per: vec![Per::Key],
            unit: Some(Unit::Minute),
            requests_per_unit: None,
            tiers: [
                ("free".to_string(), 10.0),
                ("enterprise".to_string(), 1000.0),
            ]
            .into(),
            algorithm: Algorithm::FixedWindow,
            failure_mode: FailureMode::Deny,
            shadow: false,
            actions: vec![],
            cost: Cost::Requests,
            max_output_share: None,
            default_output_tokens: None,
            unestimated_reserve: None,
            on_expiry: None,
            on_exceed: None,
        }
    }

    fn plan(r: &QuotaRule, p: &Principal) -> Option<Planned> {
        let estimate = Estimate::default();
        let prices = Prices::default();
        r.plan(&PlanInput {
            principal: p,
            action: "chat",
            resource_id: "m",
            estimate: &estimate,
            prices: &prices,
            caller_context: None,
        })
        .expect("plans")
        .pop()
    }

    #[test]
    fn concurrent_rules_have_no_window_and_take_one_slot() {
        let mut r = rule();
        r.cost = Cost::Concurrent;
        assert!(r.validate().is_err_and(|e| e.contains("remove unit")));
        r.unit = None;
        assert_eq!(r.validate(), Ok(()));
        let p = plan(&r, &key("a", "acme", "free")).expect("applies");
        assert_eq!((p.charge.cost, p.charge.limit), (1, 10));
        assert_eq!(p.measure, Cost::Concurrent);
        r.on_expiry = Some(crate::quota::reserve::Fate::Release);
        assert!(r.validate().is_err(), "slots are always released");
        let mut budget = rule();
        budget.cost = Cost::Tokens;
        budget.unit = None;
        assert!(budget.validate().is_err_and(|e| e.contains("set unit")));
    }

    #[test]
    fn the_tier_picks_the_limit_and_keys_get_their_own_counters() {
        let r = rule();
        let free = plan(&r, &key("a", "acme", "free")).expect("applies");
        let ent = plan(&r, &key("b", "acme", "enterprise")).expect("applies");
        assert_eq!((free.charge.limit, ent.charge.limit), (10, 1000));
        assert_ne!(free.charge.key, ent.charge.key);
        assert_eq!(
            free.charge.key.group(),
            ent.charge.key.group(),
            "one tenant, one slot"
        );
        assert!(
            plan(&r, &key("c", "acme", "paid")).is_none(),
            "unlisted tier, no default"
        );
    }

    #[test]
    fn invalid_rules_are_named() {
        let mut r = rule();
        r.tiers.clear();
        assert!(r.validate().expect_err("no limits").contains("per-key"));
        // 0 is a valid limit: it refuses every request (a blocked tier).
        r.requests_per_unit = Some(0.0);
        assert!(r.validate().is_ok());
        r.requests_per_unit = Some(1.5);
        assert!(r.validate().is_err(), "requests are whole");
        r.cost = Cost::Usd;
        assert!(r.validate().is_ok(), "dollars need not be");
    }

    #[test]
    fn a_group_rule_charges_every_group_of_the_key_and_skips_keys_in_none() {
        let mut r = rule();
        r.per = vec![Per::Group];
        r.requests_per_unit = Some(5.0);
        let mut p = key("a", "acme", "paid");
        assert!(plan(&r, &p).is_none(), "no group, no counter");
        p.groups = vec!["research".into(), "ops".into()];
        let estimate = Estimate::default();
        let prices = Prices::default();
        let plans = r
            .plan(&PlanInput {
                principal: &p,
                action: "chat",
                resource_id: "m",
                estimate: &estimate,
                prices: &prices,
                caller_context: None,
            })
            .expect("plans");
        assert_eq!(plans.len(), 2);
        assert_ne!(plans[0].charge.key, plans[1].charge.key);
        // Another key of the same team shares its counter.
        let mut q = key("b", "acme", "free");
        q.groups = vec!["research".into()];
        assert_eq!(
            plan(&r, &q).expect("applies").charge.key,
            plans[0].charge.key
        );
    }

    #[test]
    fn end_stream_applies_to_enforced_token_budgets_only() {
        let mut r = rule();
        r.on_exceed = Some(OnExceed::EndStream);
        assert!(
            r.validate().is_err_and(|e| e.contains("end_stream")),
            "requests"
        );
        r.cost = Cost::Tokens;
        assert_eq!(r.validate(), Ok(()));
        r.cost = Cost::OutputTokens;
        assert_eq!(r.validate(), Ok(()));
        r.cost = Cost::Usd;
        assert!(r.validate().is_err(), "usd cutoffs are not built");
        r.cost = Cost::Tokens;
        r.shadow = true;
        assert!(r.validate().is_err(), "a shadow budget never ends a stream");
    }

    #[test]
    fn a_caller_context_rule_counts_per_originating_request_and_skips_requests_without_one() {
        let mut r = rule();
        r.per = vec![Per::CallerContext, Per::Action];
        r.requests_per_unit = Some(2.0);
        let p = key("a", "acme", "paid");
        let (estimate, prices) = (Estimate::default(), Prices::default());
        let plan_for = |rid: Option<&str>, action: &str| {
            r.plan(&PlanInput {
                principal: &p,
                action,
                resource_id: "bank",
                estimate: &estimate,
                prices: &prices,
                caller_context: rid,
            })
            .expect("plans")
        };
        assert!(
            plan_for(None, "transfer").is_empty(),
            "no context, no counter"
        );
        let one = plan_for(Some("rid-1"), "transfer");
        let two = plan_for(Some("rid-2"), "transfer");
        assert_eq!((one.len(), one[0].charge.limit), (1, 2));
        assert_ne!(one[0].charge.key, two[0].charge.key);
        assert_ne!(
            one[0].charge.key,
            plan_for(Some("rid-1"), "get_balance")[0].charge.key
        );
        assert_eq!(one, plan_for(Some("rid-1"), "transfer"));
        let parsed: QuotaRule = toml::from_str(
            "name = \"n\"\nper = [\"caller_context\", \"tool\"]\nunit = \"day\"\nlimit = 2\n",
        )
        .expect("parses");
        assert_eq!(parsed.per, [Per::CallerContext, Per::Action]);
    }
}
