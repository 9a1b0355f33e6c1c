//! AuthZEN request bodies (Authorization API 1.0 §5–§8), read from untyped
//! JSON so that every missing or mistyped member gets its own 400 message and
//! every unknown member is ignored (§10.1.1: forward compatibility).

use serde_json::{Map, Value};

/// A request the spec says to refuse with `400 Bad Request`; the message names
/// the member (`subject.type: missing`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

fn bad(field: &str, message: &str) -> BadRequest {
    BadRequest(format!("{field}: {message}"))
}

/// A Subject or Resource (§4.1, §4.2). `id` is `None` only for the searched-for
/// entity of a search, whose id the spec says to ignore.
#[derive(Debug, Clone, PartialEq)]
pub struct EntityRef {
    pub ty: String,
    pub id: Option<String>,
    pub properties: Map<String, Value>,
}

/// An Action (§4.3).
#[derive(Debug, Clone, PartialEq)]
pub struct ActionRef {
    pub name: String,
    pub properties: Map<String, Value>,
}

/// One complete access evaluation (§6.1).
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    pub subject: EntityRef,
    pub action: ActionRef,
    pub resource: EntityRef,
    pub context: Map<String, Value>,
}

/// `options.evaluations_semantic` (§7.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Semantic {
    ExecuteAll,
    DenyOnFirstDeny,
    PermitOnFirstPermit,
}

/// An Access Evaluations request (§7.1): top-level defaults, the items as
/// sent (each is checked on its own, so one bad item does not fail the rest).
#[derive(Debug, Clone)]
pub struct Evaluations {
    pub subject: Option<EntityRef>,
    pub action: Option<ActionRef>,
    pub resource: Option<EntityRef>,
    pub context: Option<Map<String, Value>>,
    pub items: Vec<Value>,
    pub semantic: Semantic,
}

fn object<'a>(value: &'a Value, field: &str) -> Result<&'a Map<String, Value>, BadRequest> {
    value
        .as_object()
        .ok_or_else(|| bad(field, "must be a JSON object"))
}

fn string(map: &Map<String, Value>, parent: &str, key: &str) -> Result<String, BadRequest> {
    let field = format!("{parent}.{key}");
    match map.get(key) {
        None | Some(Value::Null) => Err(bad(&field, "missing")),
        Some(Value::String(s)) if s.is_empty() => Err(bad(&field, "must not be empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(bad(&field, "must be a string")),
    }
}

/// `properties` / `context`: an object if present. Members whose value is
/// `null` are dropped: the spec (§12.5) says such members should be omitted,
/// and Cedar has no null.
fn optional_object(
    map: &Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Map<String, Value>, BadRequest> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()),
        Some(_) => Err(bad(field, "must be a JSON object")),
    }
}

/// Reads a Subject or Resource at `field`; `need_id` is false for a search's
/// target, whose `id` is ignored.
pub fn entity(value: &Value, field: &str, need_id: bool) -> Result<EntityRef, BadRequest> {
    let map = object(value, field)?;
    let ty = string(map, field, "type")?;
    let id = if need_id {
        Some(string(map, field, "id")?)
    } else {
        None
    };
    let properties = optional_object(map, "properties", &format!("{field}.properties"))?;
    Ok(EntityRef { ty, id, properties })
}

/// Reads an Action at `field`.
pub fn action(value: &Value, field: &str) -> Result<ActionRef, BadRequest> {
    let map = object(value, field)?;
    Ok(ActionRef {
        name: string(map, field, "name")?,
        properties: optional_object(map, "properties", &format!("{field}.properties"))?,
    })
}

/// The request's `context`, `{}` when absent.
pub fn context(body: &Map<String, Value>) -> Result<Map<String, Value>, BadRequest> {
    optional_object(body, "context", "context")
}

fn required<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a Value, BadRequest> {
    match body.get(key) {
        None | Some(Value::Null) => Err(bad(key, "missing")),
        Some(v) => Ok(v),
    }
}

/// An Access Evaluation request (§6.1): `subject`, `action`, `resource`
/// required, `context` optional.
pub fn evaluation(body: &Map<String, Value>) -> Result<Evaluation, BadRequest> {
    Ok(Evaluation {
        subject: entity(required(body, "subject")?, "subject", true)?,
        action: action(required(body, "action")?, "action")?,
        resource: entity(required(body, "resource")?, "resource", true)?,
        context: context(body)?,
    })
}

/// An Access Evaluations request (§7.1). Top-level members that are present
/// must be well formed (a bad default fails the whole payload); items are
/// checked later, one by one.
pub fn evaluations(body: &Map<String, Value>) -> Result<Evaluations, BadRequest> {
    let present = |key: &str| body.get(key).filter(|v| !v.is_null());
    let items = match present("evaluations") {
        None => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => return Err(bad("evaluations", "must be a JSON array")),
    };
    let semantic = match present("options") {
        None => Semantic::ExecuteAll,
        Some(options) => match object(options, "options")?.get("evaluations_semantic") {
            None | Some(Value::Null) => Semantic::ExecuteAll,
            Some(Value::String(s)) if s == "execute_all" => Semantic::ExecuteAll,
            Some(Value::String(s)) if s == "deny_on_first_deny" => Semantic::DenyOnFirstDeny,
            Some(Value::String(s)) if s == "permit_on_first_permit" => {
                Semantic::PermitOnFirstPermit
            }
            Some(_) => {
                return Err(bad(
                    "options.evaluations_semantic",
                    "must be one of execute_all, deny_on_first_deny, permit_on_first_permit",
                ));
            }
        },
    };
    Ok(Evaluations {
        subject: present("subject")
            .map(|v| entity(v, "subject", true))
            .transpose()?,
        action: present("action").map(|v| action(v, "action")).transpose()?,
        resource: present("resource")
            .map(|v| entity(v, "resource", true))
            .transpose()?,
        context: present("context").map(|_| context(body)).transpose()?,
        items,
        semantic,
    })
}

impl Evaluations {
    /// Item `i` with the top-level defaults filled in (§7.1.1): a member the
    /// item carries replaces the default whole; there is no merging inside a
    /// subject, action, resource or context.
    pub fn item(&self, i: usize) -> Result<Evaluation, BadRequest> {
        let field = format!("evaluations[{i}]");
        let value = self
            .items
            .get(i)
            .ok_or_else(|| bad(&field, "out of range"))?;
        let map = object(value, &field)?;
        let own = |key: &str| map.get(key).filter(|v| !v.is_null());
        let missing = |key: &str| {
            bad(
                &format!("{field}.{key}"),
                "missing, and no top-level default",
            )
        };
        let subject = match own("subject") {
            Some(v) => entity(v, &format!("{field}.subject"), true)?,
            None => self.subject.clone().ok_or_else(|| missing("subject"))?,
        };
        let action = match own("action") {
            Some(v) => action(v, &format!("{field}.action"))?,
            None => self.action.clone().ok_or_else(|| missing("action"))?,
        };
        let resource = match own("resource") {
            Some(v) => entity(v, &format!("{field}.resource"), true)?,
            None => self.resource.clone().ok_or_else(|| missing("resource"))?,
        };
        let context = match own("context") {
            Some(_) => optional_object(map, "context", &format!("{field}.context"))?,
            None => self.context.clone().unwrap_or_default(),
        };
        Ok(Evaluation {
            subject,
            action,
            resource,
            context,
        })
    }

    /// The request as a single Access Evaluation, for an absent or empty
    /// `evaluations` array (§7.1: backwards compatible).
    pub fn single(&self) -> Result<Evaluation, BadRequest> {
        Ok(Evaluation {
            subject: self
                .subject
                .clone()
                .ok_or_else(|| bad("subject", "missing"))?,
            action: self
                .action
                .clone()
                .ok_or_else(|| bad("action", "missing"))?,
            resource: self
                .resource
                .clone()
                .ok_or_else(|| bad("resource", "missing"))?,
            context: self.context.clone().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn every_missing_or_mistyped_member_is_named() {
        let ok = json!({"subject": {"type": "user", "id": "a"}, "action": {"name": "read"},
                        "resource": {"type": "record", "id": "r", "properties": {}}});
        assert!(evaluation(&map(ok.clone())).is_ok());
        let cases = [
            ("/subject", Value::Null, "subject: missing"),
            ("/subject", json!("alice"), "subject: must be a JSON object"),
            ("/subject/type", Value::Null, "subject.type: missing"),
            ("/subject/id", json!(7), "subject.id: must be a string"),
            ("/action/name", json!(123), "action.name: must be a string"),
            ("/resource/id", Value::Null, "resource.id: missing"),
            (
                "/resource/properties",
                json!([1]),
                "resource.properties: must be a JSON object",
            ),
        ];
        for (pointer, value, message) in cases {
            let mut body = ok.clone();
            if let Some(slot) = body.pointer_mut(pointer) {
                *slot = value;
            }
            let err = evaluation(&map(body)).expect_err(pointer);
            assert_eq!(err.0, message);
        }
    }

    #[test]
    fn item_members_replace_defaults_whole() {
        let body = json!({
            "subject": {"type": "user", "id": "alice"},
            "action": {"name": "write"},
            "resource": {"type": "record", "id": "r1", "properties": {"status": "active"}},
            "context": {"a": 1},
            "evaluations": [{}, {"resource": {"type": "record", "id": "r2"}, "context": {"b": 2}}, 5]
        });
        let e = evaluations(&map(body)).expect("valid");
        let first = e.item(0).expect("inherits everything");
        assert_eq!(
            first.resource.properties.get("status"),
            Some(&json!("active"))
        );
        assert_eq!(first.context.get("a"), Some(&json!(1)));
        let second = e.item(1).expect("overrides");
        assert!(second.resource.properties.is_empty());
        assert_eq!(second.context.get("a"), None);
        assert_eq!(
            e.item(2).expect_err("not an object").0,
            "evaluations[2]: must be a JSON object"
        );
    }
}
