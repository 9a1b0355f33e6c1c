//! Policy slicing: per (principal type, action), the policies whose scope can
//! match. Cedar builds and evaluates every policy's condition on every
//! request, scope included; a policy whose scope cannot match contributes
//! neither a decision nor an error, so leaving it out changes no answer and
//! saves its cost.

use std::collections::{HashMap, HashSet};

use cedar_policy::{
    ActionConstraint, EntityTypeName, EntityUid, Policy, PolicySet, PrincipalConstraint, Schema,
};

/// Slices of one policy set.
#[derive(Debug, Default)]
pub struct Slices {
    by_scope: HashMap<(EntityTypeName, EntityUid), PolicySet>,
}

/// More slices than this and the full set is used instead (memory bound).
const MAX_SLICES: usize = 10_000;

impl Slices {
    /// Slices `policies` for every principal type and action in `schema`.
    pub fn build(policies: &PolicySet, schema: &Schema) -> Self {
        let principals: Vec<EntityTypeName> = schema.entity_types().cloned().collect();
        let actions: Vec<EntityUid> = schema.actions().cloned().collect();
        if principals.len().saturating_mul(actions.len()) > MAX_SLICES {
            return Self::default();
        }
        let action_entities = schema.action_entities().ok();
        let lineage = |a: &EntityUid| -> HashSet<EntityUid> {
            let mut set: HashSet<EntityUid> = action_entities
                .as_ref()
                .and_then(|e| e.ancestors(a))
                .map(|it| it.cloned().collect())
                .unwrap_or_default();
            set.insert(a.clone());
            set
        };
        let mut by_scope = HashMap::new();
        for action in &actions {
            let lineage = lineage(action);
            for principal in &principals {
                let mut slice = PolicySet::new();
                for policy in policies.policies() {
                    if may_apply(policy, principal, action, &lineage)
                        && slice.add(policy.clone()).is_err()
                    {
                        // Cannot happen (ids are unique in the source set);
                        // fall back to no slicing rather than a wrong answer.
                        return Self::default();
                    }
                }
                by_scope.insert((principal.clone(), action.clone()), slice);
            }
        }
        Self { by_scope }
    }

    /// The policies that can apply to this principal type and action, if
    /// sliced.
    pub fn get(&self, principal_type: &EntityTypeName, action: &EntityUid) -> Option<&PolicySet> {
        // Build the key without cloning when the map is empty.
        if self.by_scope.is_empty() {
            return None;
        }
        self.by_scope.get(&(principal_type.clone(), action.clone()))
    }
}

fn may_apply(
    policy: &Policy,
    principal: &EntityTypeName,
    action: &EntityUid,
    lineage: &HashSet<EntityUid>,
) -> bool {
    let principal_ok = match policy.principal_constraint() {
        PrincipalConstraint::Any | PrincipalConstraint::In(_) => true,
        PrincipalConstraint::Eq(uid) => uid.type_name() == principal,
        PrincipalConstraint::Is(ty) | PrincipalConstraint::IsIn(ty, _) => &ty == principal,
    };
    let action_ok = match policy.action_constraint() {
        ActionConstraint::Any => true,
        ActionConstraint::Eq(uid) => &uid == action,
        ActionConstraint::In(uids) => uids.iter().any(|u| lineage.contains(u)),
    };
    principal_ok && action_ok
}
