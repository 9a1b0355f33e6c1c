//! Quota rules charged inside ext_authz `Check`, after the policy allowed.
//!
//! ```toml
//! [[quota.rules]]
//! name = "key-per-minute"
//! per = ["key"]                 # key, tenant, model, tier; empty = one global counter
//! unit = "minute"
//! tiers = { free = 20, paid = 600, enterprise = 6000 }
//! requests_per_unit = 100       # for tiers not listed (optional)
//! ```

use std::collections::BTreeMap;

use serde::Deserialize;

use super::{Algorithm, Charge, CounterKey, FailureMode, Unit};
use crate::identity::Principal;

/// The counter domain of ext_authz quota rules (as seen by `tollgate quota`).
pub const DOMAIN: &str = "tollgate.authz";

/// What a rule's counter is kept per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Per {
    /// The authenticated principal (API key id, service id, …).
    Key,
    Tenant,
    /// The request's resource (the model).
    Model,
    Tier,
}

/// What a request costs. Only requests for now; tokens come with the LLM
/// accounting work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cost {
    #[default]
    Requests,
}

/// One quota rule.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuotaRule {
    pub name: String,
    #[serde(default)]
    pub per: Vec<Per>,
    pub unit: Unit,
    /// The limit for principals whose tier is not in `tiers`.
    #[serde(default)]
    pub requests_per_unit: Option<u64>,
    /// Tier profile: the limit for each tier.
    #[serde(default)]
    pub tiers: BTreeMap<String, u64>,
    #[serde(default)]
    pub algorithm: Algorithm,
    #[serde(default)]
    pub failure_mode: FailureMode,
    #[serde(default)]
    pub shadow: bool,
    /// Only these actions (empty: all).
    #[serde(default)]
    pub actions: Vec<String>,
    #[serde(default)]
    pub cost: Cost,
}

/// A charge with what the engine needs to report and fail it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub charge: Charge,
    pub failure_mode: FailureMode,
    /// Rule name or limit path, for reason codes, logs and headers.
    pub label: String,
}

impl QuotaRule {
    /// Checks the rule; the message names it.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("quota.rules: a rule has an empty name".into());
        }
        if self.requests_per_unit.is_none() && self.tiers.is_empty() {
            return Err(format!(
                "quota.rules {:?}: set requests_per_unit or tiers",
                self.name
            ));
        }
        Ok(())
    }

    /// The limit for `principal`, if the rule applies to it.
    fn limit_for(&self, principal: &Principal) -> Option<u64> {
        principal
            .tier
            .as_ref()
            .and_then(|t| self.tiers.get(t).copied())
            .or(self.requests_per_unit)
    }

    /// The charge this rule makes for a request, if it applies.
    pub fn plan(&self, principal: &Principal, action: &str, resource_id: &str) -> Option<Planned> {
        if !self.actions.is_empty() && !self.actions.iter().any(|a| a == action) {
            return None;
        }
        let limit = self.limit_for(principal)?;
        let tenant = principal.tenant.as_deref().unwrap_or("-");
        let mut entries = vec![("rule".to_string(), self.name.clone())];
        for per in &self.per {
            let (k, v) = match per {
                Per::Key => ("principal", principal.uid()),
                Per::Tenant => ("tenant", tenant.to_string()),
                Per::Model => ("model", resource_id.to_string()),
                Per::Tier => ("tier", principal.tier.clone().unwrap_or_else(|| "-".into())),
            };
            entries.push((k.to_string(), v));
        }
        // The hash-slot group must follow from the counter alone: a tenant's
        // (and its keys') counters share their tenant's slot.
        let group = if self.per.iter().any(|p| matches!(p, Per::Key | Per::Tenant)) {
            format!("tenant:{tenant}")
        } else {
            entries
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        Some(Planned {
            charge: Charge {
                key: CounterKey::new(DOMAIN, &entries, &group),
                limit,
                unit: self.unit,
                algorithm: self.algorithm,
                cost: 1,
                shadow: self.shadow,
                mode: super::ChargeMode::Admission,
            },
            failure_mode: self.failure_mode,
            label: self.name.clone(),
        })
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
            unit: Unit::Minute,
            requests_per_unit: None,
            tiers: [("free".to_string(), 10), ("enterprise".to_string(), 1000)].into(),
            algorithm: Algorithm::FixedWindow,
            failure_mode: FailureMode::Deny,
            shadow: false,
            actions: vec![],
            cost: Cost::Requests,
        }
    }

    #[test]
    fn the_tier_picks_the_limit_and_keys_get_their_own_counters() {
        let r = rule();
        let free = r
            .plan(&key("a", "acme", "free"), "chat", "m")
            .expect("applies");
        let ent = r
            .plan(&key("b", "acme", "enterprise"), "chat", "m")
            .expect("applies");
        assert_eq!((free.charge.limit, ent.charge.limit), (10, 1000));
        assert_ne!(free.charge.key, ent.charge.key);
        assert_eq!(
            free.charge.key.group(),
            ent.charge.key.group(),
            "one tenant, one slot"
        );
        assert!(
            r.plan(&key("c", "acme", "paid"), "chat", "m").is_none(),
            "unlisted tier, no default"
        );
    }

    #[test]
    fn invalid_rules_are_named() {
        let mut r = rule();
        r.tiers.clear();
        assert!(r.validate().expect_err("no limits").contains("per-key"));
        // 0 is a valid limit: it refuses every request (a blocked tier).
        r.requests_per_unit = Some(0);
        assert!(r.validate().is_ok());
    }
}
