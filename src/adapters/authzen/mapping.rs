//! AuthZEN entities → Cedar: types through the configured map, `properties`
//! typed by the schema and laid over stored entities, action properties and
//! `context` into the Cedar context.
//!
//! The merge rule (documented in the README): a subject's or resource's
//! `properties` replace the stored entity's attributes of the same name, one
//! top-level attribute at a time; its other attributes and its parents stay.
//! An entity Tollgate does not store gets only the request's properties and
//! no parents. Members the schema does not declare are dropped (policies are
//! validated against the schema, so no policy can read them); a declared
//! member of the wrong type makes the entity fail the schema and the
//! evaluation deny.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use cedar_policy::{Entities, Entity, EntityTypeName};
use serde_json::{Map, Value};

use super::model::{ActionRef, EntityRef, Evaluation};
use crate::engine::CedarQuery;
use crate::policy::Snapshot;

/// The context key action `properties` are placed under.
pub const ACTION_PROPERTIES_KEY: &str = "action";

/// How deep nested records are followed when dropping undeclared members.
const MAX_TYPE_DEPTH: usize = 32;

/// The declared attribute types of a schema, read from its JSON form
/// (`cedar_policy::Schema` does not expose them).
#[derive(Debug, Default)]
pub struct SchemaShape {
    /// Entity type name → its `shape` (a JSON-schema Record type).
    entities: HashMap<String, Value>,
    /// Action UID text (`Action::"read"`) → its context type.
    contexts: HashMap<String, Value>,
    /// Common type name (qualified and unqualified) → type.
    common: HashMap<String, Value>,
    /// False when the schema text could not be read as JSON schema; then
    /// nothing a request sends can be typed, and requests carrying
    /// properties or context deny instead of losing them silently.
    complete: bool,
}

impl SchemaShape {
    /// Reads the shapes of `schema_text` (Cedar schema syntax). A schema that
    /// loaded as a `Schema` parses here too; if it somehow does not, the
    /// shape is marked incomplete (see [`map_evaluation`]).
    pub fn parse(schema_text: &str) -> Self {
        let Ok((json, _)) = cedar_policy::schema_str_to_json_with_resolved_types(schema_text)
        else {
            return Self::default();
        };
        let mut shape = Self::default();
        let Some(namespaces) = json.as_object() else {
            return shape;
        };
        shape.complete = true;
        for (ns, body) in namespaces {
            let qualify = |name: &str| {
                if ns.is_empty() {
                    name.to_string()
                } else {
                    format!("{ns}::{name}")
                }
            };
            if let Some(common) = body.get("commonTypes").and_then(Value::as_object) {
                for (name, ty) in common {
                    shape.common.insert(qualify(name), ty.clone());
                    shape.common.entry(name.clone()).or_insert(ty.clone());
                }
            }
            if let Some(types) = body.get("entityTypes").and_then(Value::as_object) {
                for (name, def) in types {
                    if let Some(s) = def.get("shape") {
                        shape.entities.insert(qualify(name), s.clone());
                    }
                }
            }
            if let Some(actions) = body.get("actions").and_then(Value::as_object) {
                let action_type = qualify("Action");
                for (name, def) in actions {
                    if let Some(ctx) = def.pointer("/appliesTo/context") {
                        shape
                            .contexts
                            .insert(format!("{action_type}::{name:?}"), ctx.clone());
                    }
                }
            }
        }
        shape
    }

    /// Keeps the members of `value` that `ty` declares, recursively.
    fn filter(&self, ty: &Value, value: &Value, depth: usize) -> Value {
        if depth > MAX_TYPE_DEPTH {
            return value.clone();
        }
        let kind = ty.get("type").and_then(Value::as_str).unwrap_or_default();
        match (kind, value) {
            ("Record", Value::Object(map)) => {
                let declared = ty.get("attributes").and_then(Value::as_object);
                Value::Object(
                    map.iter()
                        .filter(|(_, v)| !v.is_null())
                        .filter_map(|(k, v)| {
                            let attr = declared?.get(k)?;
                            Some((k.clone(), self.filter(attr, v, depth + 1)))
                        })
                        .collect(),
                )
            }
            ("Set", Value::Array(items)) => match ty.get("element") {
                Some(element) => Value::Array(
                    items
                        .iter()
                        .map(|v| self.filter(element, v, depth + 1))
                        .collect(),
                ),
                None => value.clone(),
            },
            _ => {
                // A reference to a common type, by name.
                let name = ty.get("name").and_then(Value::as_str).unwrap_or(kind);
                match self.common.get(name) {
                    Some(common) if common != ty => self.filter(common, value, depth + 1),
                    _ => value.clone(),
                }
            }
        }
    }

    /// `properties` with members the entity type does not declare dropped.
    fn attributes(&self, cedar_type: &str, properties: &Map<String, Value>) -> Map<String, Value> {
        let empty = Value::Object(Map::new());
        let Some(shape) = self.entities.get(cedar_type) else {
            return Map::new();
        };
        match self.filter(shape, &Value::Object(properties.clone()), 0) {
            Value::Object(m) => m,
            _ => empty.as_object().cloned().unwrap_or_default(),
        }
    }

    /// `context` with members the action's context type does not declare
    /// dropped.
    fn context(&self, action_uid: &str, context: Map<String, Value>) -> Map<String, Value> {
        let Some(ty) = self.contexts.get(action_uid) else {
            return Map::new();
        };
        match self.filter(ty, &Value::Object(context), 0) {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }
}

/// The configured AuthZEN → Cedar naming.
#[derive(Debug, Clone)]
pub struct TypeMap {
    /// AuthZEN type → Cedar entity type; unmapped types are used as written.
    pub types: BTreeMap<String, String>,
    /// Cedar entity type of actions.
    pub action_type: String,
}

impl TypeMap {
    /// The Cedar entity type an AuthZEN type maps to.
    pub fn cedar_type<'a>(&'a self, authzen: &'a str) -> &'a str {
        self.types.get(authzen).map_or(authzen, String::as_str)
    }

    /// The Cedar type, if the schema declares it (searches of an unknown type
    /// answer with no results, §C.4.6).
    pub fn declared_type(&self, snapshot: &Snapshot, authzen: &str) -> Option<EntityTypeName> {
        let ty = EntityTypeName::from_str(self.cedar_type(authzen)).ok()?;
        snapshot
            .schema
            .entity_types()
            .any(|t| t == &ty)
            .then_some(ty)
    }
}

/// A failure to put an evaluation into Cedar terms; the evaluation denies.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Untyped(pub String);

/// One evaluation in Cedar terms: the query and the entities to decide it
/// with (the snapshot's own, or a copy with the request's properties laid
/// over).
pub struct Mapped<'s> {
    pub query: CedarQuery,
    pub entities: Cow<'s, Entities>,
}

/// Maps `eval` against `snapshot`. `overlays` caches entity sets built for
/// identical property overlays within one API call.
pub fn map_evaluation<'s>(
    types: &TypeMap,
    shape: &SchemaShape,
    snapshot: &'s Snapshot,
    eval: &Evaluation,
    overlays: &mut OverlayCache,
) -> Result<Mapped<'s>, Untyped> {
    let carries_data = !eval.subject.properties.is_empty()
        || !eval.resource.properties.is_empty()
        || !eval.action.properties.is_empty()
        || !eval.context.is_empty();
    if !shape.complete && carries_data {
        return Err(Untyped(
            "the schema's attribute types are unavailable, so properties and context cannot be typed".into(),
        ));
    }
    let subject = uid_parts(types, &eval.subject);
    let resource = uid_parts(types, &eval.resource);
    let action = (types.action_type.clone(), eval.action.name.clone());
    let context = cedar_context(shape, &action, &eval.action, &eval.context);
    let entities = overlay(
        shape,
        snapshot,
        &[(&subject, &eval.subject), (&resource, &eval.resource)],
        overlays,
    )?;
    Ok(Mapped {
        query: CedarQuery {
            principal: subject,
            action,
            resource,
            context: Some(Value::Object(context)),
            entities: None,
        },
        entities,
    })
}

/// (Cedar type, id) of an AuthZEN entity.
pub fn uid_parts(types: &TypeMap, e: &EntityRef) -> (String, String) {
    (
        types.cedar_type(&e.ty).to_string(),
        e.id.clone().unwrap_or_default(),
    )
}

/// The Cedar context: the request's `context`, with the action's
/// `properties` under [`ACTION_PROPERTIES_KEY`] (they win over a context
/// member of that name), filtered to what the action's context type declares.
pub fn cedar_context(
    shape: &SchemaShape,
    action: &(String, String),
    act: &ActionRef,
    context: &Map<String, Value>,
) -> Map<String, Value> {
    let mut merged = context.clone();
    if !act.properties.is_empty() {
        merged.insert(
            ACTION_PROPERTIES_KEY.to_string(),
            Value::Object(act.properties.clone()),
        );
    }
    shape.context(&format!("{}::{:?}", action.0, action.1), merged)
}

/// Entity sets built within one API call, keyed by their overlay's JSON.
pub type OverlayCache = HashMap<String, Entities>;

/// The entities to decide with: the snapshot's, or, when any of `inputs`
/// carries declared properties, a copy with those entities replaced.
pub fn overlay<'s>(
    shape: &SchemaShape,
    snapshot: &'s Snapshot,
    inputs: &[(&(String, String), &EntityRef)],
    cache: &mut OverlayCache,
) -> Result<Cow<'s, Entities>, Untyped> {
    let mut replacements = Vec::new();
    for ((ty, id), e) in inputs {
        if e.properties.is_empty() {
            continue;
        }
        let declared = shape.attributes(ty, &e.properties);
        if declared.is_empty() {
            continue;
        }
        let uid = crate::engine::principal::entity_uid(ty, id).map_err(Untyped)?;
        let (mut attrs, parents) = match snapshot.entities.get(&uid) {
            Some(stored) => stored_parts(stored),
            None => (Map::new(), Value::Array(Vec::new())),
        };
        attrs.extend(declared);
        replacements.push(serde_json::json!({
            "uid": {"type": ty, "id": id},
            "attrs": attrs,
            "parents": parents,
        }));
    }
    if replacements.is_empty() {
        return Ok(Cow::Borrowed(&snapshot.entities));
    }
    let key = Value::Array(replacements.clone()).to_string();
    if let Some(hit) = cache.get(&key) {
        return Ok(Cow::Owned(hit.clone()));
    }
    let mut parsed = Vec::with_capacity(replacements.len());
    for r in replacements {
        let entity = Entity::from_json_value(r, Some(&snapshot.schema))
            .map_err(|e| Untyped(format!("properties do not fit the schema: {e}")))?;
        parsed.push(entity);
    }
    let merged = snapshot
        .entities
        .clone()
        .upsert_entities(parsed, Some(&snapshot.schema))
        .map_err(|e| Untyped(format!("properties do not fit the schema: {e}")))?;
    if cache.len() < 64 {
        cache.insert(key, merged.clone());
    }
    Ok(Cow::Owned(merged))
}

fn stored_parts(stored: &Entity) -> (Map<String, Value>, Value) {
    let json = stored.to_json_value().unwrap_or(Value::Null);
    let attrs = json
        .get("attrs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let parents = json
        .get("parents")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    (attrs, parents)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapters::authzen::model::{ActionRef, EntityRef, Evaluation};
    use serde_json::json;

    const SCHEMA: &str = r#"
        type Addr = { city: String, zip?: String };
        entity User = { role?: String, home?: Addr, tags?: Set<{ k: String }> };
        entity Doc;
        action read appliesTo { principal: [User], resource: [Doc], context: { ip?: String, action?: { soft?: Bool } } };
    "#;

    #[test]
    fn an_unreadable_schema_denies_requests_with_data() {
        let shape = SchemaShape::parse("this is not a schema");
        assert!(!shape.complete);
        let (_dir, snapshot) = snapshot();
        let types = TypeMap {
            types: BTreeMap::new(),
            action_type: "Action".into(),
        };
        let mut eval = Evaluation {
            subject: EntityRef {
                ty: "User".into(),
                id: Some("u".into()),
                properties: Map::new(),
            },
            action: ActionRef {
                name: "read".into(),
                properties: Map::new(),
            },
            resource: EntityRef {
                ty: "Doc".into(),
                id: Some("d".into()),
                properties: Map::new(),
            },
            context: Map::new(),
        };
        let mut cache = OverlayCache::new();
        assert!(map_evaluation(&types, &shape, &snapshot, &eval, &mut cache).is_ok());
        eval.subject
            .properties
            .insert("role".into(), json!("admin"));
        assert!(map_evaluation(&types, &shape, &snapshot, &eval, &mut cache).is_err());
    }

    #[test]
    fn undeclared_members_are_dropped_at_every_level() {
        let shape = SchemaShape::parse(SCHEMA);
        let props = json!({"role": "admin", "dept": "x", "home": {"city": "c", "street": "s"},
                           "tags": [{"k": "a", "extra": 1}]});
        let kept = shape.attributes("User", props.as_object().expect("object"));
        assert_eq!(
            Value::Object(kept),
            json!({"role": "admin", "home": {"city": "c"}, "tags": [{"k": "a"}]})
        );
        assert!(
            shape
                .attributes("Doc", props.as_object().expect("object"))
                .is_empty()
        );
        assert!(
            shape
                .attributes("Nope", props.as_object().expect("object"))
                .is_empty()
        );
        let ctx = shape.context(
            "Action::\"read\"",
            json!({"ip": "1", "time": "t", "action": {"soft": true, "method": "GET"}})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        );
        assert_eq!(
            Value::Object(ctx),
            json!({"ip": "1", "action": {"soft": true}})
        );
    }

    fn arb_json() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (-1e300f64..1e300).prop_map(|f| json!(f)),
            "[a-z]{0,6}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    "(role|home|tags|city|k|zip|x|soft|action|ip|__entity|__extn)",
                    inner,
                    0..5
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn snapshot() -> (tempfile::TempDir, Snapshot) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("s.cedarschema"), SCHEMA).expect("schema");
        std::fs::write(
            dir.path().join("p.cedar"),
            "permit (principal, action, resource) when { principal has role && principal.role == \"admin\" };",
        )
        .expect("policy");
        let snapshot =
            Snapshot::load(dir.path(), &crate::policy::Expectations::default()).expect("loads");
        (dir, snapshot)
    }

    proptest::proptest! {
        /// Any properties and context: mapped or refused with a message,
        /// never a panic; what reaches Cedar holds only declared members.
        #[test]
        fn any_request_data_maps_to_declared_members_only(
            props in proptest::collection::btree_map("(role|home|tags|dept)", arb_json(), 0..4),
            action_props in proptest::collection::btree_map("(soft|method)", arb_json(), 0..3),
            context in proptest::collection::btree_map("(ip|time|action)", arb_json(), 0..3),
        ) {
            let (_dir, snapshot) = snapshot();
            let shape = SchemaShape::parse(&snapshot.schema_text);
            let props: Map<String, Value> = props.into_iter().collect();
            let kept = shape.attributes("User", &props);
            proptest::prop_assert!(kept.keys().all(|k| ["role", "home", "tags"].contains(&k.as_str())));
            let types = TypeMap { types: BTreeMap::from([("user".to_string(), "User".to_string())]), action_type: "Action".into() };
            let eval = Evaluation {
                subject: EntityRef { ty: "user".into(), id: Some("u".into()), properties: props },
                action: ActionRef { name: "read".into(), properties: action_props.into_iter().collect() },
                resource: EntityRef { ty: "Doc".into(), id: Some("d".into()), properties: Map::new() },
                context: context.into_iter().collect(),
            };
            let mut cache = OverlayCache::new();
            if let Ok(mapped) = map_evaluation(&types, &shape, &snapshot, &eval, &mut cache) {
                let ctx = mapped.query.context.clone().unwrap_or(Value::Null);
                let ctx = ctx.as_object().cloned().unwrap_or_default();
                proptest::prop_assert!(ctx.keys().all(|k| k == "ip" || k == "action"));
                let uid = crate::engine::principal::entity_uid("User", "u").expect("uid");
                if let Some(user) = mapped.entities.get(&uid) {
                    let json = user.to_json_value().expect("json");
                    let attrs = json["attrs"].as_object().cloned().unwrap_or_default();
                    proptest::prop_assert!(attrs.keys().all(|k| ["role", "home", "tags"].contains(&k.as_str())));
                }
            }
        }
    }
}
