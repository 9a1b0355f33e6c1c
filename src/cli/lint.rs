//! `tollgate lint envoy FILE`: checks an Envoy bootstrap for the settings
//! Tollgate's guarantees depend on. The file is read generically (YAML or
//! JSON into a JSON tree), so any Envoy version's layout is walked, and each
//! problem names the listener, filter chain or route it is in.
//!
//! What is checked, per HTTP connection manager:
//! - an ext_authz filter is present, not `disabled`, not enabled for only a
//!   share of requests (`filter_enabled`, `filter_enabled_metadata`), and
//!   `failure_mode_allow` is not true (fail closed);
//! - `with_request_body` states `max_request_bytes` and
//!   `allow_partial_message` (what happens to a longer body is a choice);
//! - a rate limit filter states `failure_mode_deny` (Envoy's default lets
//!   every request through when the rate limit service is unreachable);
//! - no route or virtual host disables ext_authz (`ExtAuthzPerRoute`
//!   `disabled: true`), except health routes;
//! - on TLS filter chains: `require_client_certificate: true` and
//!   `forward_client_cert_details: SANITIZE_SET`;
//! - and nowhere `trust_chain_verification: ACCEPT_UNTRUSTED`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::Value;

/// Gateway configurations `tollgate lint` can check.
#[derive(Debug, Subcommand)]
pub enum LintCommand {
    /// Check an Envoy bootstrap (YAML or JSON) for ext_authz, rate limit and
    /// TLS settings Tollgate depends on; exit status 1 on any error.
    Envoy { file: PathBuf },
}

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Breaks a guarantee (fail-open, bypass, forged identity).
    Error,
    /// Works, but probably not as intended.
    Warning,
}

/// One problem in a configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// Where: listener, filter chain, filter or route.
    pub place: String,
    /// What is wrong and what to set instead.
    pub message: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}: {}", self.place, self.message)
    }
}

/// Runs a lint command, printing findings; 1 when there is an error.
pub fn run(command: LintCommand) -> ExitCode {
    let LintCommand::Envoy { file } = command;
    match lint_envoy_file(&file) {
        Ok(findings) => {
            for f in &findings {
                println!("{}: {f}", file.display());
            }
            let errors = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            println!(
                "{}: {errors} errors, {} warnings",
                file.display(),
                findings.len() - errors
            );
            if errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{}: {e}", file.display());
            ExitCode::FAILURE
        }
    }
}

/// Reads and lints an Envoy bootstrap file.
pub fn lint_envoy_file(path: &Path) -> Result<Vec<Finding>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read: {e}"))?;
    let config: Value =
        serde_saphyr::from_str(&text).map_err(|e| format!("not YAML or JSON: {e}"))?;
    Ok(lint_envoy(&config))
}

fn type_ends(v: &Value, suffix: &str) -> bool {
    v.get("@type")
        .and_then(Value::as_str)
        .is_some_and(|t| t.ends_with(suffix))
}

fn is_true(v: Option<&Value>) -> bool {
    v.and_then(Value::as_bool) == Some(true)
}

fn name_of(v: &Value) -> &str {
    v.get("name").and_then(Value::as_str).unwrap_or("")
}

fn array<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> {
    v.get(key).and_then(Value::as_array).into_iter().flatten()
}

/// Tollgate's default `context.max_body_bytes`.
const DEFAULT_MAX_BODY_BYTES: u64 = 1024 * 1024;

/// Paths of health-check routes, the only ones that may skip ext_authz.
const HEALTH_PATHS: &[&str] = &[
    "/health", "/healthz", "/ready", "/readyz", "/live", "/livez", "/ping",
];

/// Lints a parsed Envoy bootstrap.
pub fn lint_envoy(config: &Value) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut listeners = Vec::new();
    let mut untrusted = Vec::new();
    // Walk the whole tree without recursion: listeners may sit under
    // static_resources or elsewhere (LDS snapshots), and ACCEPT_UNTRUSTED is
    // wrong wherever it is.
    let mut stack = vec![(config, String::new())];
    while let Some((v, path)) = stack.pop() {
        match v {
            Value::Object(map) => {
                if map.get("filter_chains").is_some_and(Value::is_array) {
                    listeners.push(v);
                }
                if map.get("trust_chain_verification").and_then(Value::as_str)
                    == Some("ACCEPT_UNTRUSTED")
                {
                    untrusted.push(path.clone());
                }
                stack.extend(map.iter().map(|(k, x)| (x, format!("{path}.{k}"))));
            }
            Value::Array(items) => {
                stack.extend(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, x)| (x, format!("{path}[{i}]"))),
                );
            }
            _ => {}
        }
    }
    untrusted.sort();
    for path in untrusted {
        out.push(Finding {
            severity: Severity::Error,
            place: path.trim_start_matches('.').to_string(),
            message: "trust_chain_verification: ACCEPT_UNTRUSTED accepts client certificates from any CA; remove it".into(),
        });
    }
    // The walk found listeners last-first.
    listeners.reverse();
    for listener in listeners {
        let lname = name_of(listener);
        let chains = array(listener, "filter_chains")
            .chain(listener.get("default_filter_chain"))
            .enumerate();
        for (i, chain) in chains {
            let place = format!("listener {lname:?}, filter chain {i}");
            lint_chain(chain, &place, &mut out);
        }
    }
    out
}

fn lint_chain(chain: &Value, place: &str, out: &mut Vec<Finding>) {
    let tls = chain.get("transport_socket").and_then(|ts| {
        let typed = ts.get("typed_config")?;
        (type_ends(typed, "DownstreamTlsContext") || name_of(ts) == "envoy.transport_sockets.tls")
            .then_some(typed)
    });
    if let Some(tls) = tls
        && !is_true(tls.get("require_client_certificate"))
    {
        out.push(Finding {
            severity: Severity::Error,
            place: place.to_string(),
            message: "TLS listener without require_client_certificate: true; set it so only clients with a certificate from the trusted CA connect".into(),
        });
    }
    for filter in array(chain, "filters") {
        let Some(hcm) = filter
            .get("typed_config")
            .filter(|t| type_ends(t, "HttpConnectionManager"))
        else {
            continue;
        };
        let place = format!("{place}, {}", name_of(filter));
        if tls.is_some()
            && hcm
                .get("forward_client_cert_details")
                .and_then(Value::as_str)
                != Some("SANITIZE_SET")
        {
            out.push(Finding {
                severity: Severity::Error,
                place: place.clone(),
                message: "TLS listener: set forward_client_cert_details: SANITIZE_SET so a client-sent x-forwarded-client-cert never reaches Tollgate or the upstream".into(),
            });
        }
        lint_hcm(hcm, &place, out);
    }
}

fn lint_hcm(hcm: &Value, place: &str, out: &mut Vec<Finding>) {
    let mut error = |place: String, message: String| {
        out.push(Finding {
            severity: Severity::Error,
            place,
            message,
        })
    };
    let mut warnings = Vec::new();
    let mut ext_authz_names = Vec::new();
    for filter in array(hcm, "http_filters") {
        let name = name_of(filter);
        let Some(typed) = filter.get("typed_config") else {
            continue;
        };
        let here = format!("{place}, http filter {name:?}");
        if type_ends(typed, "ext_authz.v3.ExtAuthz") {
            ext_authz_names.push(name.to_string());
            if is_true(filter.get("disabled")) {
                error(
                    here.clone(),
                    "ext_authz is disabled; remove disabled: true".into(),
                );
            }
            if let Some(share) = enabled_share(typed.get("filter_enabled"))
                && share < 1.0
            {
                error(
                    here.clone(),
                    format!(
                        "filter_enabled runs ext_authz on only {:.4}% of requests; remove filter_enabled",
                        share * 100.0
                    ),
                );
            }
            if typed.get("filter_enabled_metadata").is_some() {
                error(here.clone(), "filter_enabled_metadata skips ext_authz for requests whose metadata does not match; remove it".into());
            }
            if is_true(typed.get("failure_mode_allow")) {
                error(here.clone(), "failure_mode_allow: true lets every request through when Tollgate is unreachable; set it to false".into());
            }
            match typed.get("with_request_body") {
                None => warnings.push((here.clone(), "no with_request_body: Tollgate cannot read model, max_tokens, stream or tools, so policies on them cannot be satisfied".to_string())),
                Some(body) => {
                    let max = body.get("max_request_bytes").and_then(Value::as_u64);
                    if max.is_none_or(|m| m == 0) {
                        error(here.clone(), "with_request_body without max_request_bytes; state the bound (e.g. 65536)".into());
                    }
                    if let Some(m) = max.filter(|m| *m > DEFAULT_MAX_BODY_BYTES) {
                        warnings.push((here.clone(), format!("max_request_bytes {m} is above Tollgate's default context.max_body_bytes ({DEFAULT_MAX_BODY_BYTES}); larger bodies are not parsed, so body policies deny them unless context.max_body_bytes is raised too")));
                    }
                    if body.get("allow_partial_message").and_then(Value::as_bool).is_none() {
                        error(here.clone(), "with_request_body does not state allow_partial_message: true sends longer bodies cut and marked partial (body policies then deny), false makes Envoy answer 413; choose one".into());
                    }
                }
            }
        } else if type_ends(typed, "ratelimit.v3.RateLimit") {
            match typed.get("failure_mode_deny").and_then(Value::as_bool) {
                None => error(here, "rate limit filter does not state failure_mode_deny; Envoy's default (false) lets every request through when the rate limit service is unreachable".into()),
                Some(false) => warnings.push((here, "failure_mode_deny: false lets every request through when the rate limit service is unreachable".to_string())),
                Some(true) => {}
            }
        }
    }
    if ext_authz_names.is_empty() {
        error(
            place.to_string(),
            "no ext_authz filter: requests reach the upstream without a decision".into(),
        );
    }
    let route_config = hcm.get("route_config");
    for vhost in route_config
        .into_iter()
        .flat_map(|r| array(r, "virtual_hosts"))
    {
        let vname = name_of(vhost);
        if disables_ext_authz(vhost, &ext_authz_names) {
            error(
                format!("{place}, virtual host {vname:?}"),
                "ext_authz is disabled for the whole virtual host; disable it only on health routes".into(),
            );
        }
        for (i, route) in array(vhost, "routes").enumerate() {
            if disables_ext_authz(route, &ext_authz_names) && !is_health(route) {
                let m = route.get("match").map(Value::to_string).unwrap_or_default();
                error(
                    format!("{place}, virtual host {vname:?}, route {i} {m}"),
                    format!(
                        "ext_authz is disabled on a route that is not a health check ({}) or RFC 9728 metadata; only those may skip it",
                        HEALTH_PATHS.join(", ")
                    ),
                );
            }
        }
    }
    out.extend(warnings.into_iter().map(|(place, message)| Finding {
        severity: Severity::Warning,
        place,
        message,
    }));
}

/// Whether `holder` (a route or virtual host) turns ext_authz off, by
/// `ExtAuthzPerRoute { disabled: true }` or a `FilterConfig` with
/// `disabled: true` under an ext_authz filter's name.
fn disables_ext_authz(holder: &Value, names: &[String]) -> bool {
    let Some(per_filter) = holder
        .get("typed_per_filter_config")
        .and_then(Value::as_object)
    else {
        return false;
    };
    per_filter.iter().any(|(key, cfg)| {
        let ext_authz = type_ends(cfg, "ExtAuthzPerRoute") || names.iter().any(|n| n == key);
        ext_authz && is_true(cfg.get("disabled"))
    })
}

/// The share of requests a `RuntimeFractionalPercent` enables (1.0 = all).
fn enabled_share(fraction: Option<&Value>) -> Option<f64> {
    let default = fraction?.get("default_value")?;
    let numerator = default
        .get("numerator")
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    let denominator = match default.get("denominator").and_then(Value::as_str) {
        Some("TEN_THOUSAND") => 10_000.0,
        Some("MILLION") => 1_000_000.0,
        _ => 100.0,
    };
    Some(numerator / denominator)
}

fn is_health(route: &Value) -> bool {
    let Some(m) = route.get("match") else {
        return false;
    };
    ["path", "prefix", "path_separated_prefix"].iter().any(|k| {
        m.get(*k)
            .and_then(Value::as_str)
            .map(|p| p.trim_end_matches('/'))
            .is_some_and(|p| HEALTH_PATHS.contains(&p) || p.starts_with(RESOURCE_METADATA))
    })
}

/// RFC 9728 protected resource metadata must be readable without a token
/// (an MCP client fetches it after a 401), so its routes may skip ext_authz.
const RESOURCE_METADATA: &str = "/.well-known/oauth-protected-resource";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_routes_are_told_apart() {
        let route = |m: Value| serde_json::json!({ "match": m });
        assert!(is_health(&route(serde_json::json!({"path": "/healthz"}))));
        assert!(is_health(&route(serde_json::json!({"prefix": "/ready/"}))));
        assert!(!is_health(&route(serde_json::json!({"prefix": "/"}))));
        assert!(!is_health(&route(
            serde_json::json!({"prefix": "/healthz-and-more"})
        )));
    }
}
