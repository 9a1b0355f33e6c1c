//! Policy slicing and the tenant index.
//!
//! **Slices**: per (principal type, action), the policies whose scope can
//! match. Cedar builds and evaluates every policy's condition on every
//! request, scope included; a policy whose scope cannot match contributes
//! neither a decision nor an error, so leaving it out changes no answer and
//! saves its cost.
//!
//! **Tenant index**: inside a slice, a policy whose condition *starts* with
//! `principal.tenant == Tenant::"x"` (see [`tenant_of`]) is filed under
//! `Tenant::"x"`; every other policy is *unplaced* and always evaluated. A
//! request whose principal carries a `tenant` entity attribute evaluates the
//! unplaced policies plus those filed under its tenant. For any other tenant's
//! policy Cedar would evaluate `principal.tenant == Tenant::"x"` first (the
//! scope cannot error, and `&&` stops at the first false), get `false`
//! without an error, and skip it: leaving it out changes neither the
//! decision, nor its reasons, nor its errors. A principal without a readable
//! `tenant` attribute (missing from the entities, say, where
//! `principal.tenant` would be an error) is evaluated against the whole set.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{
    ActionConstraint, EntityId, EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint,
    Schema,
};

/// The principal attribute the tenant index reads.
pub const TENANT_ATTRIBUTE: &str = "tenant";

/// One slice: the policies of one (principal type, action).
#[derive(Debug, Default)]
pub struct Slice {
    /// Policies the tenant index cannot place: always evaluated.
    pub unplaced: PolicySet,
    /// Policies that can only apply to principals of one tenant.
    pub by_tenant: HashMap<EntityUid, PolicySet>,
}

/// Slices of one policy set.
#[derive(Debug, Default)]
pub struct Slices {
    by_scope: HashMap<(EntityTypeName, EntityUid), Slice>,
    placed: usize,
}

/// More slices than this and the full set is used instead (memory bound).
const MAX_SLICES: usize = 10_000;

impl Slices {
    /// Slices `policies` for every principal type and action in `schema`,
    /// each policy with the tenant the index files it under (if any).
    /// Linear in the number of policies times the number of slices each
    /// policy's scope admits.
    pub fn build<'a>(
        policies: impl IntoIterator<Item = (&'a Policy, Option<&'a EntityUid>)>,
        schema: &Schema,
    ) -> Self {
        let principals: Vec<EntityTypeName> = schema.entity_types().cloned().collect();
        let actions: Vec<EntityUid> = schema.actions().cloned().collect();
        if principals.len().saturating_mul(actions.len()) > MAX_SLICES {
            return Self::default();
        }
        let action_entities = schema.action_entities().ok();
        let lineages: Vec<HashSet<EntityUid>> = actions
            .iter()
            .map(|a| {
                let mut set: HashSet<EntityUid> = action_entities
                    .as_ref()
                    .and_then(|e| e.ancestors(a))
                    .map(|it| it.cloned().collect())
                    .unwrap_or_default();
                set.insert(a.clone());
                set
            })
            .collect();
        let mut by_scope: HashMap<(EntityTypeName, EntityUid), Slice> = HashMap::new();
        for action in &actions {
            for principal in &principals {
                by_scope.insert((principal.clone(), action.clone()), Slice::default());
            }
        }
        let mut placed = 0;
        for (policy, tenant) in policies {
            placed += usize::from(tenant.is_some());
            // Each constraint is built once per policy, not per slice.
            let (scope_principal, scope_action) =
                (policy.principal_constraint(), policy.action_constraint());
            let principals: Vec<&EntityTypeName> = principals
                .iter()
                .filter(|p| principal_may_apply(&scope_principal, p))
                .collect();
            for (action, lineage) in actions.iter().zip(&lineages) {
                if !action_may_apply(&scope_action, action, lineage) {
                    continue;
                }
                for &principal in &principals {
                    let Some(slice) = by_scope.get_mut(&(principal.clone(), action.clone())) else {
                        continue;
                    };
                    let set = match tenant {
                        Some(t) => slice.by_tenant.entry(t.clone()).or_default(),
                        None => &mut slice.unplaced,
                    };
                    if set.add(policy.clone()).is_err() {
                        // Cannot happen (ids are unique in the source set);
                        // fall back to no slicing rather than a wrong answer.
                        return Self::default();
                    }
                }
            }
        }
        Self { by_scope, placed }
    }

    /// The slice for this principal type and action, if sliced.
    pub fn get(&self, principal_type: &EntityTypeName, action: &EntityUid) -> Option<&Slice> {
        // Build the key without cloning when the map is empty.
        if self.by_scope.is_empty() {
            return None;
        }
        self.by_scope.get(&(principal_type.clone(), action.clone()))
    }

    /// How many policies the tenant index placed under a tenant.
    pub fn placed(&self) -> usize {
        self.placed
    }
}

fn principal_may_apply(scope: &PrincipalConstraint, principal: &EntityTypeName) -> bool {
    match scope {
        PrincipalConstraint::Any | PrincipalConstraint::In(_) => true,
        PrincipalConstraint::Eq(uid) => uid.type_name() == principal,
        PrincipalConstraint::Is(ty) | PrincipalConstraint::IsIn(ty, _) => ty == principal,
    }
}

fn action_may_apply(
    scope: &ActionConstraint,
    action: &EntityUid,
    lineage: &HashSet<EntityUid>,
) -> bool {
    match scope {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => uid == action,
        ActionConstraint::In(uids) => uids.iter().any(|u| lineage.contains(u)),
    }
}

/// The tenant a policy can only apply to, read from its JSON form
/// ([`Policy::to_json`]): the first condition is a `when`, and the leftmost
/// operand of its top-level `&&` chain is `principal.tenant == E` or
/// `E == principal.tenant` with `E` an entity literal. Being leftmost and
/// first, that comparison is the first thing Cedar evaluates after the
/// scope, so a principal of another tenant stops there with `false` and no
/// error. Anything else (the comparison elsewhere, under `||`, in an
/// `unless`, `principal in Tenant::"x"`) leaves the policy unplaced.
pub fn tenant_of(policy_json: &serde_json::Value) -> Option<EntityUid> {
    let first = policy_json.get("conditions")?.as_array()?.first()?;
    if first.get("kind")?.as_str()? != "when" {
        return None;
    }
    let mut expr = first.get("body")?;
    while let Some(and) = expr.get("&&") {
        expr = and.get("left")?;
    }
    let eq = expr.get("==")?;
    let (left, right) = (eq.get("left")?, eq.get("right")?);
    let literal = if is_principal_tenant(left) {
        right
    } else if is_principal_tenant(right) {
        left
    } else {
        return None;
    };
    let entity = literal.get("Value")?.get("__entity")?;
    let type_name = EntityTypeName::from_str(entity.get("type")?.as_str()?).ok()?;
    let id = EntityId::new(entity.get("id")?.as_str()?);
    Some(EntityUid::from_type_name_and_id(type_name, id))
}

fn is_principal_tenant(expr: &serde_json::Value) -> bool {
    expr.get(".").is_some_and(|dot| {
        dot.get("attr").and_then(|a| a.as_str()) == Some(TENANT_ATTRIBUTE)
            && dot
                .get("left")
                .and_then(|l| l.get("Var"))
                .and_then(|v| v.as_str())
                == Some("principal")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(text: &str) -> Option<String> {
        let policy = Policy::from_str(text).expect("parses");
        tenant_of(&policy.to_json().expect("json")).map(|uid| uid.to_string())
    }

    #[test]
    fn the_index_reads_a_leading_tenant_comparison_only() {
        let at = Some("Tenant::\"x\"".to_string());
        for text in [
            r#"permit (principal, action, resource) when { principal.tenant == Tenant::"x" };"#,
            r#"permit (principal, action, resource) when { Tenant::"x" == principal.tenant && context.a };"#,
            r#"forbid (principal, action, resource) when { principal.tenant == Tenant::"x" && context.a && context.b } unless { context.c };"#,
            r#"permit (principal, action, resource) when { (principal.tenant == Tenant::"x" && context.a) && context.b };"#,
        ] {
            assert_eq!(placed(text), at, "{text}");
        }
        for text in [
            r#"permit (principal, action, resource) when { context.a && principal.tenant == Tenant::"x" };"#,
            r#"permit (principal, action, resource) when { principal.tenant == Tenant::"x" || context.a };"#,
            r#"permit (principal, action, resource) when { context.a } when { principal.tenant == Tenant::"x" };"#,
            r#"permit (principal, action, resource) unless { principal.tenant == Tenant::"x" };"#,
            r#"permit (principal, action, resource) unless { context.a } when { principal.tenant == Tenant::"x" };"#,
            r#"permit (principal, action, resource) when { principal.tenant != Tenant::"x" };"#,
            r#"permit (principal, action, resource) when { resource.tenant == Tenant::"x" };"#,
            r#"permit (principal, action, resource) when { principal.owner == Tenant::"x" };"#,
            r#"permit (principal, action, resource) when { principal.tenant == context.t };"#,
            r#"permit (principal in Tenant::"x", action, resource);"#,
            r#"permit (principal, action, resource);"#,
        ] {
            assert_eq!(placed(text), None, "{text}");
        }
    }
}
