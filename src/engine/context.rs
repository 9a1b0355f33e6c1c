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
//!   authn: "api_key" | "jwt" | "mtls" | "none",
//!   usage?: { estimated_input_tokens?, max_output_tokens?,
//!             model: { family?, context_window?, max_output_tokens? } } }
//! ```
//!
//! `usage` is there when `[usage]` configures a model catalog.

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
    /// Usage facts, when the catalog is configured.
    pub usage: Option<&'a UsageFacts<'a>>,
}

/// What `context.usage` says: the request's estimate and its model's
/// catalog entry.
#[derive(Debug, Clone, Copy, Default)]
pub struct UsageFacts<'a> {
    pub estimated_input_tokens: Option<u64>,
    /// The request's `max_tokens`, else the model's `default_output_tokens`.
    pub max_output_tokens: Option<u64>,
    /// The model's family (catalog entry or prefix).
    pub family: Option<&'a str>,
    pub model: Option<&'a crate::usage::catalog::ModelInfo>,
}

impl UsageFacts<'_> {
    /// `(name, value)` pairs of `usage` and of `usage.model`.
    #[allow(clippy::type_complexity)]
    pub(crate) fn fields(
        &self,
    ) -> (
        Vec<(&'static str, i64)>,
        Option<&str>,
        Vec<(&'static str, i64)>,
    ) {
        let long = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let mut top = Vec::new();
        if let Some(v) = self.estimated_input_tokens {
            top.push(("estimated_input_tokens", long(v)));
        }
        if let Some(v) = self.max_output_tokens {
            top.push(("max_output_tokens", long(v)));
        }
        let mut model = Vec::new();
        if let Some(m) = self.model {
            if let Some(v) = m.context_window {
                model.push(("context_window", long(v)));
            }
            if let Some(v) = m.max_output_tokens {
                model.push(("max_output_tokens", long(v)));
            }
        }
        (top, self.family, model)
    }
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
        http["source_ip"] = json!({"__extn": {"fn": "ip", "arg": cedar_ip(ip)}});
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
    let mut context = json!({ "http": http, "body": body, "route": route, "authn": inputs.authn });
    if let Some(u) = inputs.usage {
        let (top, family, model_fields) = u.fields();
        let mut usage: Map<String, Value> =
            top.into_iter().map(|(k, v)| (k.into(), json!(v))).collect();
        let mut model: Map<String, Value> = model_fields
            .into_iter()
            .map(|(k, v)| (k.into(), json!(v)))
            .collect();
        if let Some(f) = family {
            model.insert("family".into(), json!(f));
        }
        usage.insert("model".into(), Value::Object(model));
        context["usage"] = Value::Object(usage);
    }
    context
}

/// Builds the same context as [`build`], directly as a Cedar [`Context`]:
/// the request path's form, with no JSON in between (a unit test checks the
/// two agree).
pub fn build_cedar(config: &ContextConfig, inputs: &ContextInputs<'_>) -> Result<Context, String> {
    use RestrictedExpression as R;
    let req = inputs.request;
    let record = |pairs: Vec<(String, R)>| R::new_record(pairs).map_err(|e| e.to_string());
    let headers: Vec<(String, R)> = config
        .headers
        .iter()
        .filter_map(|name| {
            req.header(name)
                .map(|v| (name.clone(), R::new_string(v.to_string())))
        })
        .collect();
    let query: Vec<(String, R)> = config
        .query_params
        .iter()
        .filter_map(|name| {
            inputs
                .path
                .query
                .get(name)
                .map(|v| (name.clone(), R::new_string(v.clone())))
        })
        .collect();
    let mut http = vec![
        ("method".to_string(), R::new_string(req.method.clone())),
        ("path".to_string(), R::new_string(inputs.path.path.clone())),
        ("host".to_string(), R::new_string(normalize_host(&req.host))),
        ("tls".to_string(), R::new_bool(req.tls)),
        ("headers".to_string(), record(headers)?),
        ("query".to_string(), record(query)?),
    ];
    if let Some(ip) = req.source_ip {
        http.push(("source_ip".to_string(), R::new_ip(cedar_ip(ip))));
    }
    let b = inputs.body;
    let mut body = vec![
        ("present".to_string(), R::new_bool(b.present)),
        ("complete".to_string(), R::new_bool(b.complete)),
        (
            "size".to_string(),
            R::new_long(i64::try_from(b.size).unwrap_or(i64::MAX)),
        ),
    ];
    if let Some(m) = &b.model {
        body.push(("model".to_string(), R::new_string(m.clone())));
    }
    if let Some(t) = b.max_tokens {
        body.push(("max_tokens".to_string(), R::new_long(t)));
    }
    if let Some(s) = b.stream {
        body.push(("stream".to_string(), R::new_bool(s)));
    }
    if let Some(t) = b.has_tools {
        body.push(("has_tools".to_string(), R::new_bool(t)));
    }
    let mut route = Vec::new();
    if let Some(n) = inputs.route_name {
        route.push(("name".to_string(), R::new_string(n.to_string())));
    }
    if let Some(t) = inputs.route_tenant {
        route.push(("tenant".to_string(), R::new_string(t.to_string())));
    }
    let mut pairs = vec![
        ("http".to_string(), record(http)?),
        ("body".to_string(), record(body)?),
        ("route".to_string(), record(route)?),
        ("authn".to_string(), R::new_string(inputs.authn.to_string())),
    ];
    if let Some(u) = inputs.usage {
        let (top, family, model_fields) = u.fields();
        let mut model: Vec<(String, R)> = model_fields
            .into_iter()
            .map(|(k, v)| (k.to_string(), R::new_long(v)))
            .collect();
        if let Some(f) = family {
            model.push(("family".to_string(), R::new_string(f.to_string())));
        }
        let mut usage: Vec<(String, R)> = top
            .into_iter()
            .map(|(k, v)| (k.to_string(), R::new_long(v)))
            .collect();
        usage.push(("model".to_string(), record(model)?));
        pairs.push(("usage".to_string(), record(usage)?));
    }
    Context::from_pairs(pairs).map_err(|e| e.to_string())
}

/// An address in a form Cedar's `ip()` always accepts: dotted IPv4 (mapped
/// IPv6 was already turned into IPv4 by the adapter) or all eight IPv6
/// groups in hex — never the embedded-IPv4 notation (`::ffff:1.2.3.4`) that
/// Cedar refuses and `Display` may print.
pub fn cedar_ip(ip: std::net::IpAddr) -> String {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => v4.to_string(),
        std::net::IpAddr::V6(v6) => v6
            .segments()
            .iter()
            .map(|s| format!("{s:x}"))
            .collect::<Vec<_>>()
            .join(":"),
    }
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

/// The `usage` shapes the catalog adds: the loader checks the schema
/// accepts them when `[usage]` is configured.
pub fn usage_probes() -> Vec<Value> {
    let mut least = base();
    least["usage"] = json!({"model": {}});
    let mut full = base();
    full["usage"] = json!({
        "estimated_input_tokens": 1, "max_output_tokens": 1,
        "model": {"family": "f", "context_window": 1, "max_output_tokens": 1},
    });
    vec![least, full]
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

/// An empty body's facts and a full chat body's, for tests of what is
/// built from them.
#[cfg(test)]
pub(crate) fn bodies() -> [super::body::BodyFacts; 2] {
    use super::body::BodyFacts;
    [
        BodyFacts::default(),
        BodyFacts {
            present: true,
            complete: true,
            size: 90,
            model: Some("m".into()),
            max_tokens: Some(256),
            stream: Some(true),
            has_tools: Some(false),
        },
    ]
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
    fn the_direct_builder_matches_the_json_form() {
        let config = ContextConfig::default();
        let mut request = HttpRequest {
            method: "POST".into(),
            host: "API.example.com:443".into(),
            tls: true,
            source_ip: Some("10.1.2.3".parse().expect("ip")),
            ..Default::default()
        };
        request.headers.insert("x-team".into(), "search".into());
        request
            .headers
            .insert("content-type".into(), "application/json".into());
        let path =
            crate::path::canonicalize("/v1/chat/completions?api-version=1&other=2").expect("path");
        let bodies = bodies();
        let info = crate::usage::catalog::ModelInfo {
            family: Some("f".into()),
            context_window: Some(100),
            max_output_tokens: None,
            default_output_tokens: None,
        };
        let usage = UsageFacts {
            estimated_input_tokens: Some(7),
            max_output_tokens: Some(9),
            family: Some("f"),
            model: Some(&info),
        };
        for (body, usage) in bodies.iter().zip([None, Some(&usage)]) {
            for (route_name, route_tenant) in [(None, None), (Some("chat"), Some("acme"))] {
                let inputs = ContextInputs {
                    usage,
                    request: &request,
                    path: &path,
                    body,
                    route_name,
                    route_tenant,
                    authn: "api_key",
                };
                let direct = build_cedar(&config, &inputs).expect("direct");
                let via_json =
                    Context::from_json_value(build(&config, &inputs), None).expect("json");
                assert_eq!(format!("{direct:?}"), format!("{via_json:?}"));
            }
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
