//! The Cedar context Tollgate builds for an HTTP request.
//!
//! Its shape is part of Tollgate's contract with policy authors (README,
//! "The request context") and the example schema declares it as
//! `RequestContext`:
//!
//! ```text
//! { http:  { method, path, host, tls, headers: {..}, query: {..}, source_ip? },
//!   body:  { present, complete, size, model?, max_tokens?, stream?, has_tools? },
//!   route: { name?, tenant? },
//!   authn: "api_key" | "jwt" | "mtls" | "none" }
//! ```

use cedar_policy::{Context, RestrictedExpression};
use serde_json::{Map, Value, json};

use super::body::BodyFacts;
use crate::config::ContextConfig;
use crate::path::CanonicalPath;
use crate::request::HttpRequest;

/// Inputs to the context, gathered by the engine.
pub struct ContextInputs<'a> {
    pub request: &'a HttpRequest,
    pub path: &'a CanonicalPath,
    pub body: &'a BodyFacts,
    pub route_name: Option<&'a str>,
    pub route_tenant: Option<&'a str>,
    pub authn: &'a str,
}

/// Builds the context JSON.
pub fn build(config: &ContextConfig, inputs: &ContextInputs<'_>) -> Value {
    let req = inputs.request;
    let mut headers = Map::new();
    for name in &config.headers {
        if let Some(v) = req.header(name) {
            headers.insert(name.clone(), Value::String(v.to_string()));
        }
    }
    let mut query = Map::new();
    for name in &config.query_params {
        if let Some(v) = inputs.path.query.get(name) {
            query.insert(name.clone(), Value::String(v.clone()));
        }
    }
    let mut http = json!({
        "method": req.method,
        "path": inputs.path.path,
        "host": normalize_host(&req.host),
        "tls": req.tls,
        "headers": headers,
        "query": query,
    });
    if let Some(ip) = req.source_ip {
        http["source_ip"] = json!({"__extn": {"fn": "ip", "arg": ip.to_string()}});
    }
    let b = inputs.body;
    let mut body = json!({
        "present": b.present,
        "complete": b.complete,
        "size": i64::try_from(b.size).unwrap_or(i64::MAX),
    });
    if let Some(m) = &b.model {
        body["model"] = json!(m);
    }
    if let Some(t) = b.max_tokens {
        body["max_tokens"] = json!(t);
    }
    if let Some(s) = b.stream {
        body["stream"] = json!(s);
    }
    if let Some(t) = b.has_tools {
        body["has_tools"] = json!(t);
    }
    let mut route = Map::new();
    if let Some(n) = inputs.route_name {
        route.insert("name".into(), json!(n));
    }
    if let Some(t) = inputs.route_tenant {
        route.insert("tenant".into(), json!(t));
    }
    json!({ "http": http, "body": body, "route": route, "authn": inputs.authn })
}

/// Converts a context built by [`build`] into a Cedar [`Context`] without
/// going through Cedar's JSON parser, which costs several times the whole
/// rest of a decision. Only the forms [`build`] produces are handled: the
/// loader has already checked them against the schema.
pub fn to_cedar(value: &Value) -> Result<Context, String> {
    let Value::Object(fields) = value else {
        return Err("context must be a JSON object".into());
    };
    let pairs = fields
        .iter()
        .map(|(k, v)| Ok((k.clone(), restricted(v)?)))
        .collect::<Result<Vec<_>, String>>()?;
    Context::from_pairs(pairs).map_err(|e| e.to_string())
}

fn restricted(value: &Value) -> Result<RestrictedExpression, String> {
    Ok(match value {
        Value::Bool(b) => RestrictedExpression::new_bool(*b),
        Value::String(s) => RestrictedExpression::new_string(s.clone()),
        Value::Number(n) => {
            RestrictedExpression::new_long(n.as_i64().ok_or_else(|| format!("{n} is not a Long"))?)
        }
        Value::Array(items) => RestrictedExpression::new_set(
            items
                .iter()
                .map(restricted)
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Value::Object(fields) => match fields.get("__extn") {
            Some(ext) if ext["fn"] == "ip" => {
                RestrictedExpression::new_ip(ext["arg"].as_str().ok_or("ip() needs a string")?)
            }
            Some(ext) => return Err(format!("unsupported extension value {ext}")),
            None => RestrictedExpression::new_record(
                fields
                    .iter()
                    .map(|(k, v)| Ok((k.clone(), restricted(v)?)))
                    .collect::<Result<Vec<_>, String>>()?,
            )
            .map_err(|e| e.to_string())?,
        },
        Value::Null => return Err("null has no Cedar form".into()),
    })
}

/// Lowercase, without port and trailing dot.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => host,
        }
    };
    without_port.trim_end_matches('.').to_ascii_lowercase()
}

/// The context of an empty GET with nothing optional set: the base that
/// policy tests and `tollgate check` merge their own context onto.
pub fn base() -> Value {
    json!({
        "http": {"method": "GET", "path": "/", "host": "", "tls": false, "headers": {}, "query": {}},
        "body": {"present": false, "complete": true, "size": 0},
        "route": {},
        "authn": "none",
    })
}

/// The smallest and the fullest context Tollgate can build with `config`;
/// the policy loader checks that the schema accepts both.
pub fn probes(config: &ContextConfig) -> Vec<Value> {
    let mut full = base();
    for name in &config.headers {
        full["http"]["headers"][name] = json!("x");
    }
    for name in &config.query_params {
        full["http"]["query"][name] = json!("x");
    }
    full["http"]["source_ip"] = json!({"__extn": {"fn": "ip", "arg": "127.0.0.1"}});
    full["body"] = json!({
        "present": true, "complete": true, "size": 1,
        "model": "m", "max_tokens": 1, "stream": false, "has_tools": false,
    });
    full["route"] = json!({"name": "r", "tenant": "t"});
    vec![base(), full]
}

/// Deep-merges `overlay` onto `base` (objects merge, anything else replaces).
pub fn merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        for (raw, want) in [
            ("API.Example.com", "api.example.com"),
            ("api.example.com:8443", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("API.example.com.:443", "api.example.com"),
            ("[::1]:8080", "::1"),
        ] {
            assert_eq!(normalize_host(raw), want, "{raw}");
        }
    }

    #[test]
    fn cedar_conversion_matches_cedar_json_parsing() {
        for probe in probes(&ContextConfig::default()) {
            let ours = to_cedar(&probe).expect("converts");
            let theirs = Context::from_json_value(probe.clone(), None).expect("cedar parses");
            assert_eq!(format!("{ours:?}"), format!("{theirs:?}"));
        }
    }

    #[test]
    fn merge_overlays_nested_objects() {
        let mut b = base();
        merge(
            &mut b,
            &json!({"http": {"method": "POST"}, "body": {"model": "m"}}),
        );
        assert_eq!(b["http"]["method"], "POST");
        assert_eq!(b["http"]["path"], "/");
        assert_eq!(b["body"]["model"], "m");
        assert_eq!(b["body"]["present"], false);
    }
}
