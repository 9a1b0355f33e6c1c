//! The Cedar entity of an authenticated principal.
//!
//! `ApiKey::"k1"` gets attributes `tenant` (a `Tenant` entity), `tier` and
//! `scopes`, and its tenant and groups as parents, so that both
//! `principal in Tenant::"acme"` and `resource.owner == principal.tenant`
//! work. A principal already defined in `entities.json` (a `Service` with its
//! tenant, say) is taken from there as written.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use cedar_policy::{Entity, EntityId, EntityTypeName, EntityUid, RestrictedExpression};

use crate::identity::{Principal, PrincipalKind};

/// A principal's UID.
pub fn uid(principal: &Principal) -> Result<EntityUid, String> {
    Ok(EntityUid::from_type_name_and_id(
        known_type(principal.kind.entity_type())?,
        EntityId::new(&principal.id),
    ))
}

/// An `Action::"id"` UID.
pub fn action_uid(id: &str) -> Result<EntityUid, String> {
    Ok(EntityUid::from_type_name_and_id(
        known_type("Action")?,
        EntityId::new(id),
    ))
}

/// The type names Tollgate itself produces, parsed once.
fn known_type(name: &'static str) -> Result<EntityTypeName, String> {
    use std::sync::OnceLock;
    static TYPES: OnceLock<Vec<(&'static str, EntityTypeName)>> = OnceLock::new();
    let types = TYPES.get_or_init(|| {
        ["ApiKey", "User", "Service", "Anonymous", "Action"]
            .into_iter()
            .filter_map(|n| EntityTypeName::from_str(n).ok().map(|t| (n, t)))
            .collect()
    });
    match types.iter().find(|(n, _)| *n == name) {
        Some((_, t)) => Ok(t.clone()),
        None => {
            EntityTypeName::from_str(name).map_err(|e| format!("invalid entity type {name:?}: {e}"))
        }
    }
}

/// `Type::"id"` from parts.
pub fn entity_uid(type_name: &str, id: &str) -> Result<EntityUid, String> {
    let ty = EntityTypeName::from_str(type_name)
        .map_err(|e| format!("invalid entity type {type_name:?}: {e}"))?;
    Ok(EntityUid::from_type_name_and_id(ty, EntityId::new(id)))
}

/// Builds the principal's entity.
pub fn entity(principal: &Principal) -> Result<Entity, String> {
    let uid = uid(principal)?;
    let mut parents = HashSet::new();
    let mut attrs = HashMap::new();
    match principal.kind {
        PrincipalKind::Anonymous => {}
        PrincipalKind::ApiKey | PrincipalKind::User => {
            let tenant = entity_uid("Tenant", principal.tenant.as_deref().unwrap_or_default())?;
            parents.insert(tenant.clone());
            attrs.insert(
                "tenant".into(),
                RestrictedExpression::new_entity_uid(tenant),
            );
            attrs.insert(
                "tier".into(),
                RestrictedExpression::new_string(principal.tier.clone().unwrap_or_default()),
            );
            attrs.insert("scopes".into(), string_set(&principal.scopes));
            if principal.kind == PrincipalKind::ApiKey {
                let models = principal
                    .models
                    .iter()
                    .map(|m| entity_uid("Model", m).map(RestrictedExpression::new_entity_uid))
                    .collect::<Result<Vec<_>, _>>()?;
                attrs.insert("models".into(), RestrictedExpression::new_set(models));
            }
        }
        PrincipalKind::Service => {
            attrs.insert(
                "trust_domain".into(),
                RestrictedExpression::new_string(trust_domain(&principal.id).to_string()),
            );
            if let Some(t) = &principal.tenant {
                parents.insert(entity_uid("Tenant", t)?);
            }
        }
    }
    for group in &principal.groups {
        parents.insert(entity_uid("Group", group)?);
    }
    Entity::new(uid, attrs, parents).map_err(|e| e.to_string())
}

fn string_set(items: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(items.iter().cloned().map(RestrictedExpression::new_string))
}

/// The trust domain of a SPIFFE id (`spiffe://acme.example/...` →
/// `acme.example`); empty for anything else.
pub fn trust_domain(id: &str) -> &str {
    id.strip_prefix("spiffe://")
        .and_then(|rest| rest.split('/').next())
        .unwrap_or("")
}

/// One principal of each kind, for the loader's schema check.
pub fn probes() -> Vec<Entity> {
    let key = Principal {
        kind: PrincipalKind::ApiKey,
        id: "probe".into(),
        tenant: Some("probe".into()),
        tier: Some("free".into()),
        scopes: vec!["s".into()],
        groups: vec!["g".into()],
        models: vec!["m".into()],
    };
    let user = Principal {
        kind: PrincipalKind::User,
        models: Vec::new(),
        ..key.clone()
    };
    let service = Principal {
        kind: PrincipalKind::Service,
        id: "spiffe://probe/x".into(),
        ..Principal::anonymous()
    };
    [key, user, service, Principal::anonymous()]
        .iter()
        .filter_map(|p| entity(p).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_trust_domain() {
        assert_eq!(
            trust_domain("spiffe://acme.example/ns/a/sa/b"),
            "acme.example"
        );
        assert_eq!(trust_domain("CN=foo"), "");
    }

    #[test]
    fn api_key_entity_has_tenant_parent() {
        let e = entity(&Principal {
            kind: PrincipalKind::ApiKey,
            id: "k1".into(),
            tenant: Some("acme".into()),
            tier: Some("free".into()),
            scopes: vec!["llm:generate".into()],
            groups: vec!["admins".into()],
            models: vec![],
        })
        .expect("entity");
        let json = e.to_json_value().expect("json");
        let parents = json["parents"].as_array().expect("parents");
        assert!(
            parents
                .iter()
                .any(|p| p["type"] == "Tenant" && p["id"] == "acme")
        );
        assert!(
            parents
                .iter()
                .any(|p| p["type"] == "Group" && p["id"] == "admins")
        );
        assert_eq!(json["attrs"]["tier"], "free");
    }
}
