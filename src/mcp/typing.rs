//! Typed tool arguments: the declared `input` type of each tool action, read
//! from the loaded Cedar schema, and the conversion of a call's JSON
//! `arguments` into the Cedar JSON `context.input` for that type.
//!
//! Conversion rules: `Long` takes JSON integers, `String` strings, `Bool`
//! booleans, `decimal` any JSON number with at most four fractional digits
//! (Cedar's precision), `Set<T>` arrays, records objects. An argument the
//! type does not declare is left out (JSON Schema allows extra properties,
//! and a validated policy cannot name it); `null` counts as absent. A
//! missing required argument or a value of another type is an error: the
//! call is refused rather than decided on a guess.

use std::collections::HashMap;

use cedar_policy::SchemaFragment;
use serde_json::{Map, Value, json};

/// A declared type, as far as arguments need it.
#[derive(Debug, Clone, PartialEq)]
pub enum Ty {
    Long,
    Str,
    Bool,
    Decimal,
    Set(Box<Ty>),
    Record(Vec<Attr>),
    /// A type arguments cannot carry (an entity, another extension).
    Other,
}

/// One record attribute.
#[derive(Debug, Clone, PartialEq)]
pub struct Attr {
    pub name: String,
    pub required: bool,
    pub ty: Ty,
    /// `@mcp_header("Name")`: mirrored in the `Mcp-Param-Name` header.
    pub header: Option<String>,
}

/// The input types of one namespace's tool actions.
#[derive(Debug, Clone, Default)]
pub struct ToolTypes {
    /// Action id → its `input` record.
    pub tools: HashMap<String, Ty>,
    /// Action ids the namespace declares (tools and method actions).
    pub actions: std::collections::HashSet<String>,
    /// Action ids whose context declares `agent` and `via`: the only ones a
    /// hop (signed caller context, token carrier) can be decided on.
    pub hop_actions: std::collections::HashSet<String>,
}

impl ToolTypes {
    /// Reads the actions of `namespace` from a schema's text; an unreadable
    /// schema gives no tools (every call then refused as unknown).
    pub fn from_schema_text(text: &str, namespace: &str) -> Self {
        let Ok((fragment, _)) = SchemaFragment::from_cedarschema_str(text) else {
            return Self::default();
        };
        let Ok(json) = fragment.to_json_value() else {
            return Self::default();
        };
        let Some(ns) = json.get(namespace) else {
            return Self::default();
        };
        let common = ns
            .get("commonTypes")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        let mut out = Self::default();
        for (name, action) in ns
            .get("actions")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            out.actions.insert(name.clone());
            let attrs = match action
                .pointer("/appliesTo/context")
                .map(|c| resolve(c, &common, namespace, 0))
            {
                Some(Ty::Record(attrs)) => attrs,
                _ => Vec::new(),
            };
            let declares = |n: &str| attrs.iter().any(|a| a.name == n && a.ty == Ty::Str);
            if declares("agent") && declares("via") {
                out.hop_actions.insert(name.clone());
            }
            let input = attrs.into_iter().find(|a| a.name == "input");
            if let Some(attr) = input {
                out.tools.insert(name.clone(), attr.ty);
            }
        }
        out
    }
}

fn resolve(t: &Value, common: &Map<String, Value>, ns: &str, depth: usize) -> Ty {
    if depth > 32 {
        return Ty::Other;
    }
    let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
    let named = |name: &str| -> Ty {
        let short = name
            .strip_prefix(ns)
            .and_then(|r| r.strip_prefix("::"))
            .unwrap_or(name);
        match short {
            "Long" => Ty::Long,
            "String" => Ty::Str,
            "Bool" | "Boolean" => Ty::Bool,
            "decimal" => Ty::Decimal,
            other => common
                .get(other)
                .map_or(Ty::Other, |c| resolve(c, common, ns, depth + 1)),
        }
    };
    match kind {
        "Long" => Ty::Long,
        "String" => Ty::Str,
        "Boolean" | "Bool" => Ty::Bool,
        "Set" => Ty::Set(Box::new(
            t.get("element")
                .map_or(Ty::Other, |e| resolve(e, common, ns, depth + 1)),
        )),
        "Record" => Ty::Record(
            t.get("attributes")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .map(|(name, a)| Attr {
                    name: name.clone(),
                    required: a.get("required").and_then(Value::as_bool).unwrap_or(true),
                    ty: resolve(a, common, ns, depth + 1),
                    header: a
                        .pointer("/annotations/mcp_header")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                })
                .collect(),
        ),
        "Extension" | "EntityOrCommon" => {
            named(t.get("name").and_then(Value::as_str).unwrap_or(""))
        }
        "Entity" => Ty::Other,
        other => named(other),
    }
}

/// Converts `value` to Cedar JSON of type `ty`; the error names the
/// argument path (never its value).
pub fn convert(value: &Value, ty: &Ty, path: &str) -> Result<Value, String> {
    let wrong = |what: &str| Err(format!("argument {path:?} must be {what}"));
    match ty {
        Ty::Long => match value.as_i64() {
            Some(_) => Ok(value.clone()),
            None => wrong("an integer"),
        },
        Ty::Str => match value {
            Value::String(_) => Ok(value.clone()),
            _ => wrong("a string"),
        },
        Ty::Bool => match value {
            Value::Bool(_) => Ok(value.clone()),
            _ => wrong("a boolean"),
        },
        Ty::Decimal => {
            let Value::Number(n) = value else {
                return wrong("a number");
            };
            let text = decimal_text(n).ok_or_else(|| {
                format!("argument {path:?} must be a number with at most 4 decimals")
            })?;
            Ok(json!({"__extn": {"fn": "decimal", "arg": text}}))
        }
        Ty::Set(inner) => match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| convert(v, inner, &format!("{path}[{i}]")))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array),
            _ => wrong("an array"),
        },
        Ty::Record(attrs) => {
            let Value::Object(given) = value else {
                return wrong("an object");
            };
            let mut out = Map::new();
            for attr in attrs {
                let here = if path.is_empty() {
                    attr.name.clone()
                } else {
                    format!("{path}.{}", attr.name)
                };
                match given.get(&attr.name) {
                    None | Some(Value::Null) if attr.required => {
                        return Err(format!("argument {here:?} is required"));
                    }
                    None | Some(Value::Null) => {}
                    Some(v) => {
                        out.insert(attr.name.clone(), convert(v, &attr.ty, &here)?);
                    }
                }
            }
            Ok(Value::Object(out))
        }
        Ty::Other => wrong("of a type arguments cannot carry"),
    }
}

/// A JSON number as Cedar decimal text (`12.5`, `3.0`), if representable.
fn decimal_text(n: &serde_json::Number) -> Option<String> {
    if let Some(i) = n.as_i64() {
        return Some(format!("{i}.0"));
    }
    let text = n.to_string();
    if text.contains(['e', 'E']) {
        return None;
    }
    let (_, frac) = text.split_once('.')?;
    (frac.len() <= 4).then_some(text)
}

/// Checks the `Mcp-Param-*` headers against the arguments: every header
/// must name a parameter the tool maps (`@mcp_header`) and carry its value
/// (strings as is, numbers in decimal form, booleans `true`/`false`); with
/// `required`, every mapped argument present in the body must have its
/// header.
pub fn check_param_headers(
    ty: &Ty,
    arguments: &Map<String, Value>,
    headers: &[(String, String)],
    required: bool,
) -> Result<(), String> {
    let Ty::Record(attrs) = ty else {
        return if headers.is_empty() {
            Ok(())
        } else {
            Err("Mcp-Param headers for a tool without mapped parameters".into())
        };
    };
    let mapped: Vec<(String, &Attr)> = attrs
        .iter()
        .filter_map(|a| a.header.as_ref().map(|h| (h.to_ascii_lowercase(), a)))
        .collect();
    for (name, value) in headers {
        let Some((_, attr)) = mapped.iter().find(|(h, _)| h == name) else {
            return Err(format!("Mcp-Param-{name} names no mapped parameter"));
        };
        let body = match arguments.get(&attr.name) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            Some(Value::Bool(b)) => b.to_string(),
            _ => return Err(format!("Mcp-Param-{name} has no matching argument")),
        };
        if body != *value {
            return Err(format!("Mcp-Param-{name} does not match the argument"));
        }
    }
    if required {
        for (h, attr) in &mapped {
            if arguments.get(&attr.name).is_some_and(|v| !v.is_null())
                && !headers.iter().any(|(n, _)| n == h)
            {
                return Err(format!("Mcp-Param-{h} is missing"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: &str = r#"
        entity ApiKey;
        namespace Mcp {
          entity McpServer;
          type transferInput = { "amount": Long, @mcp_header("To") "to": String,
                                 "rate"?: decimal, "tags"?: Set<String>,
                                 "meta"?: { "urgent": Bool } };
          action "tools/call";
          action "transfer" in [Action::"tools/call"] appliesTo {
            principal: [ApiKey], resource: [McpServer], context: { "input": transferInput } };
          action "tools/list" appliesTo { principal: [ApiKey], resource: [McpServer], context: {} };
        }"#;

    #[test]
    fn arguments_convert_by_declared_type() {
        let types = ToolTypes::from_schema_text(SCHEMA, "Mcp");
        assert!(types.actions.contains("tools/list"));
        let ty = types.tools.get("transfer").expect("typed");
        let ok = convert(
            &json!({"amount": 5, "to": "bob", "rate": 1.25, "tags": ["a"], "meta": {"urgent": true}, "extra": [1]}),
            ty,
            "",
        )
        .expect("converts");
        assert_eq!(
            ok["rate"],
            json!({"__extn": {"fn": "decimal", "arg": "1.25"}})
        );
        assert!(ok.get("extra").is_none());
        for bad in [
            json!({"amount": "5", "to": "b"}),
            json!({"amount": 5.5, "to": "b"}),
            json!({"to": "b"}),
            json!({"amount": 1, "to": "b", "rate": 0.123456}),
            json!({"amount": 1, "to": "b", "tags": "a"}),
            json!({"amount": 1, "to": "b", "meta": {"urgent": 1}}),
        ] {
            assert!(convert(&bad, ty, "").is_err(), "{bad}");
        }
        let args = json!({"amount": 5, "to": "bob"});
        let args = args.as_object().expect("object");
        let h = |v: &str| vec![("to".to_string(), v.to_string())];
        assert!(check_param_headers(ty, args, &h("bob"), true).is_ok());
        assert!(check_param_headers(ty, args, &h("eve"), true).is_err());
        assert!(check_param_headers(ty, args, &[], true).is_err());
        assert!(check_param_headers(ty, args, &[], false).is_ok());
        let other = vec![("amount".to_string(), "5".to_string())];
        assert!(check_param_headers(ty, args, &other, false).is_err());
    }
}
