//! The route table: which Cedar action and resource an HTTP request means.
//!
//! A route is `method` + `path` pattern (`/v1/models/{model}`: literal
//! segments and single-segment captures) → `action` and a `resource` written
//! as a Cedar UID whose id is a template: `Model::"{body.model}"`,
//! `Model::"{path.model}"`, `Tenant::"{route.tenant}"`.

use serde::Deserialize;

use crate::path::CanonicalPath;

/// One route as written in the config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Shown in logs and in `context.route.name`; defaults to the path.
    #[serde(default)]
    pub name: Option<String>,
    /// HTTP method, or `*` for any.
    pub method: String,
    /// Path pattern.
    pub path: String,
    /// Cedar action id (of type `Action`).
    pub action: String,
    /// Cedar resource UID template, e.g. `Model::"{body.model}"`.
    pub resource: String,
    /// Identity sources this route accepts, in order (default: all
    /// configured).
    #[serde(default)]
    pub identity: Option<Vec<crate::identity::SourceKind>>,
}

impl RouteSpec {
    fn new(method: &str, path: &str, action: &str, resource: &str) -> Self {
        Self {
            name: None,
            method: method.into(),
            path: path.into(),
            action: action.into(),
            resource: resource.into(),
            identity: None,
        }
    }

    /// The built-in table for an OpenAI-style LLM gateway.
    pub fn openai_defaults() -> Vec<Self> {
        vec![
            Self::new(
                "POST",
                "/v1/chat/completions",
                "chat",
                r#"Model::"{body.model}""#,
            ),
            Self::new(
                "POST",
                "/v1/completions",
                "complete",
                r#"Model::"{body.model}""#,
            ),
            Self::new(
                "POST",
                "/v1/embeddings",
                "embed",
                r#"Model::"{body.model}""#,
            ),
            Self::new(
                "POST",
                "/v1/fine_tuning/jobs",
                "finetune",
                r#"Model::"{body.model}""#,
            ),
            Self::new("GET", "/v1/models", "list_models", r#"Endpoint::"models""#),
            Self::new(
                "GET",
                "/v1/models/{model}",
                "get_model",
                r#"Model::"{path.model}""#,
            ),
        ]
    }
}

/// A route table that could not be compiled.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("routes[{index}] ({method} {path}): {message}")]
pub struct RouteTableError {
    pub index: usize,
    pub method: String,
    pub path: String,
    pub message: String,
}

/// A piece of an id template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    BodyModel,
    PathParam(String),
    RouteTenant,
}

/// A resource UID whose id is filled in per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceTemplate {
    /// Cedar entity type, e.g. `Model`.
    pub type_name: String,
    parts: Vec<Part>,
}

/// Values a template may draw on.
#[derive(Debug, Default, Clone, Copy)]
pub struct TemplateVars<'a> {
    pub path_params: &'a [(String, String)],
    pub body_model: Option<&'a str>,
    pub route_tenant: Option<&'a str>,
}

impl ResourceTemplate {
    /// Parses `Type::"id template"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (type_name, rest) = text
            .split_once("::")
            .ok_or_else(|| format!("resource {text:?} is not of the form Type::\"id\""))?;
        let valid_type = !type_name.is_empty()
            && type_name.split("::").all(|p| {
                p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            });
        if !valid_type {
            return Err(format!(
                "resource {text:?}: {type_name:?} is not a Cedar type name"
            ));
        }
        let id = rest
            .strip_prefix('"')
            .and_then(|r| r.strip_suffix('"'))
            .ok_or_else(|| format!("resource {text:?}: the id must be in double quotes"))?;
        Ok(Self {
            type_name: type_name.to_string(),
            parts: parse_template(id)?,
        })
    }

    /// Names of the path captures this template needs.
    fn path_params(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::PathParam(n) => Some(n.as_str()),
            _ => None,
        })
    }

    /// Whether the template reads the request body.
    pub fn needs_body(&self) -> bool {
        self.parts.contains(&Part::BodyModel)
    }

    /// Fills the template; `Err` names the missing variable.
    pub fn render(&self, vars: &TemplateVars<'_>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            let value = match part {
                Part::Literal(s) => Some(s.as_str()),
                Part::BodyModel => vars.body_model,
                Part::PathParam(name) => vars
                    .path_params
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, v)| v.as_str()),
                Part::RouteTenant => vars.route_tenant,
            };
            match value {
                Some(v) if !v.is_empty() => out.push_str(v),
                _ => return Err(part_name(part)),
            }
        }
        Ok(out)
    }
}

fn part_name(part: &Part) -> String {
    match part {
        Part::Literal(s) => s.clone(),
        Part::BodyModel => "body.model".into(),
        Part::PathParam(n) => format!("path.{n}"),
        Part::RouteTenant => "route.tenant".into(),
    }
}

fn parse_template(id: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = id;
    while let Some(start) = rest.find('{') {
        if start > 0 {
            parts.push(Part::Literal(rest[..start].to_string()));
        }
        let end = rest[start..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {id:?}"))?;
        let var = &rest[start + 1..start + end];
        parts.push(match var {
            "body.model" => Part::BodyModel,
            "route.tenant" => Part::RouteTenant,
            v => match v.strip_prefix("path.") {
                Some(name) if !name.is_empty() => Part::PathParam(name.to_string()),
                _ => {
                    return Err(format!(
                        "unknown placeholder {{{var}}}; use body.model, path.NAME or route.tenant"
                    ));
                }
            },
        });
        rest = &rest[start + end + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Literal(rest.to_string()));
    }
    Ok(parts)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Capture(String),
}

/// A compiled route.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    method: Option<String>,
    segments: Vec<Segment>,
    pub action: String,
    pub resource: ResourceTemplate,
    pub identity: Option<Vec<crate::identity::SourceKind>>,
}

/// A route that matched, with its captures.
#[derive(Debug, Clone)]
pub struct RouteMatch<'a> {
    pub route: &'a Route,
    pub params: Vec<(String, String)>,
}

/// Routes in the order they were written; the first match wins.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compiles and checks every route.
    pub fn compile(specs: &[RouteSpec]) -> Result<Self, RouteTableError> {
        let mut routes = Vec::with_capacity(specs.len());
        for (index, spec) in specs.iter().enumerate() {
            let err = |message: String| RouteTableError {
                index,
                method: spec.method.clone(),
                path: spec.path.clone(),
                message,
            };
            let method = match spec.method.as_str() {
                "*" => None,
                m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
                    Some(m.to_string())
                }
                m => return Err(err(format!("method {m:?} must be upper case or '*'"))),
            };
            let segments = compile_pattern(&spec.path).map_err(err)?;
            let resource = ResourceTemplate::parse(&spec.resource).map_err(err)?;
            for param in resource.path_params() {
                if !segments.contains(&Segment::Capture(param.to_string())) {
                    return Err(err(format!(
                        "resource uses {{path.{param}}} but the path has no {{{param}}}"
                    )));
                }
            }
            if spec.action.is_empty() {
                return Err(err("action is empty".into()));
            }
            routes.push(Route {
                name: spec.name.clone().unwrap_or_else(|| spec.path.clone()),
                method,
                segments,
                action: spec.action.clone(),
                resource,
                identity: spec.identity.clone(),
            });
        }
        Ok(Self { routes })
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// Every action the table can produce.
    pub fn actions(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.action.as_str())
    }

    /// The first route matching the method and canonical path.
    pub fn find(&self, method: &str, path: &CanonicalPath) -> Option<RouteMatch<'_>> {
        let segments: Vec<&str> = path.segments().collect();
        self.routes.iter().find_map(|route| {
            if route.method.as_deref().is_some_and(|m| m != method) {
                return None;
            }
            if route.segments.len() != segments.len() {
                return None;
            }
            let mut params = Vec::new();
            for (pattern, actual) in route.segments.iter().zip(&segments) {
                match pattern {
                    Segment::Literal(l) if l == actual => {}
                    Segment::Literal(_) => return None,
                    Segment::Capture(name) => params.push((name.clone(), (*actual).to_string())),
                }
            }
            Some(RouteMatch { route, params })
        })
    }
}

fn compile_pattern(pattern: &str) -> Result<Vec<Segment>, String> {
    let rest = pattern
        .strip_prefix('/')
        .ok_or_else(|| "path must start with '/'".to_string())?;
    if rest.is_empty() {
        return Ok(vec![Segment::Literal(String::new())]);
    }
    rest.split('/')
        .map(|seg| {
            if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                if name.is_empty() || name.contains(['{', '}']) {
                    return Err(format!("bad capture {seg:?}"));
                }
                Ok(Segment::Capture(name.to_string()))
            } else if seg.is_empty() || seg == "." || seg == ".." || seg.contains(['{', '}', '%']) {
                Err(format!("segment {seg:?} can never match a canonical path"))
            } else {
                Ok(Segment::Literal(seg.to_string()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::path::canonicalize;

    fn table() -> RouteTable {
        RouteTable::compile(&RouteSpec::openai_defaults()).expect("defaults compile")
    }

    #[test]
    fn matching_table() {
        let t = table();
        type Want<'a> = Option<(&'a str, &'a [(&'a str, &'a str)])>;
        let cases: &[(&str, &str, Want)] = &[
            ("POST", "/v1/chat/completions", Some(("chat", &[]))),
            ("GET", "/v1/chat/completions", None),
            ("GET", "/v1/models", Some(("list_models", &[]))),
            (
                "GET",
                "/v1/models/llama-3-8b",
                Some(("get_model", &[("model", "llama-3-8b")])),
            ),
            ("GET", "/v1/models/a/b", None),
            ("POST", "/v1/unknown", None),
            ("POST", "/V1/chat/completions", None),
        ];
        for (method, path, want) in cases {
            let canonical = canonicalize(path).expect("canonical");
            let got = t.find(method, &canonical);
            match (got, want) {
                (None, None) => {}
                (Some(m), Some((action, params))) => {
                    assert_eq!(m.route.action, *action, "{method} {path}");
                    let params: Vec<(String, String)> = params
                        .iter()
                        .map(|(a, b)| (a.to_string(), b.to_string()))
                        .collect();
                    assert_eq!(m.params, params, "{method} {path}");
                }
                (got, want) => panic!("{method} {path}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn templates_render_and_report_missing_vars() {
        let t = ResourceTemplate::parse(r#"Model::"{route.tenant}/{body.model}""#).expect("parse");
        assert!(t.needs_body());
        let vars = TemplateVars {
            body_model: Some("ft-1"),
            route_tenant: Some("acme"),
            ..Default::default()
        };
        assert_eq!(t.render(&vars), Ok("acme/ft-1".to_string()));
        assert_eq!(
            t.render(&TemplateVars::default()),
            Err("route.tenant".to_string())
        );
    }

    #[test]
    fn bad_routes_are_refused_with_their_index() {
        let bad = [
            RouteSpec::new("post", "/x", "a", r#"Model::"m""#),
            RouteSpec::new("POST", "x", "a", r#"Model::"m""#),
            RouteSpec::new("POST", "/x", "a", r#"Model::"{path.model}""#),
            RouteSpec::new("POST", "/x", "a", r#"Model::"{body.nope}""#),
            RouteSpec::new("POST", "/x", "a", "Model::m"),
            RouteSpec::new("POST", "/x/../y", "a", r#"Model::"m""#),
        ];
        for spec in bad {
            let err = RouteTable::compile(std::slice::from_ref(&spec)).expect_err("must fail");
            assert_eq!(err.index, 0, "{spec:?}");
        }
    }
}
