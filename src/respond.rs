//! Decisions → protocol responses, in one place.
//!
//! [`status_of`] is the one table pairing each outcome with its HTTP status
//! and gRPC code; [`check_response`] builds Envoy's ext_authz answer.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::service::auth::v3::{
    CheckResponse, DeniedHttpResponse, OkHttpResponse, check_response::HttpResponse,
};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status;

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitResponse;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{
    Code as RlsCode, DescriptorStatus, RateLimit as EnvoyRateLimit,
};

use crate::config::{HeaderStyle, ResponseConfig};
use crate::decision::{Decision, Outcome, QuotaReport, Reason};
use crate::quota::rls::RlsAnswer;

/// HTTP status and gRPC code of an outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusPair {
    pub http: u16,
    pub grpc: tonic::Code,
}

/// The one outcome → status table.
pub fn status_of(outcome: Outcome) -> StatusPair {
    let (http, grpc) = match outcome {
        Outcome::Allow => (200, tonic::Code::Ok),
        Outcome::Unauthenticated(_) => (401, tonic::Code::Unauthenticated),
        Outcome::Forbidden(_) => (403, tonic::Code::PermissionDenied),
        Outcome::Invalid(_) => (400, tonic::Code::InvalidArgument),
        Outcome::Unavailable(_) | Outcome::Defer(_) => (503, tonic::Code::Unavailable),
        Outcome::OverQuota(_) => (429, tonic::Code::ResourceExhausted),
    };
    StatusPair { http, grpc }
}

/// The JSON body of a denied request: a stable reason code and the request
/// id, never policy text or internal detail.
pub fn deny_body(decision: &Decision) -> String {
    let mut error = serde_json::json!({
        "code": decision.outcome.reason().code(),
        "request_id": decision.request_id,
    });
    if let (Outcome::OverQuota(_), Some(q)) = (decision.outcome, &decision.quota) {
        error["rule"] = serde_json::json!(q.rule);
    }
    if let Some(tool) = &decision.agent.tool {
        error["tool"] = serde_json::json!(tool);
    }
    serde_json::json!({ "error": error }).to_string()
}

/// Whole seconds, rounded up (a client retrying after it must find room).
fn ceil_secs(d: std::time::Duration) -> u64 {
    d.as_millis().div_ceil(1000).try_into().unwrap_or(u64::MAX)
}

/// Rate limit headers for a counter, in the configured style.
pub fn rate_limit_headers(style: HeaderStyle, q: &QuotaReport) -> Vec<(&'static str, String)> {
    let reset = ceil_secs(q.reset);
    match style {
        HeaderStyle::None => Vec::new(),
        HeaderStyle::Draft03 => vec![
            ("ratelimit-limit", q.limit.to_string()),
            ("ratelimit-remaining", q.remaining.to_string()),
            ("ratelimit-reset", reset.to_string()),
        ],
        HeaderStyle::Ietf => {
            // A quoted string (RFC 9651): no quote, backslash or control
            // character may end or break it.
            let name: String = q
                .rule
                .chars()
                .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
                .collect();
            vec![
                (
                    "ratelimit-policy",
                    format!("\"{name}\";q={};w={}", q.limit, q.unit_secs.max(1)),
                ),
                (
                    "ratelimit",
                    format!("\"{name}\";r={};t={reset}", q.remaining),
                ),
            ]
        }
    }
}

/// `WWW-Authenticate` for a 401 (RFC 6750).
fn www_authenticate(reason: Reason, realm: &str) -> String {
    match reason {
        Reason::MissingCredential => format!("Bearer realm=\"{realm}\""),
        _ => format!("Bearer realm=\"{realm}\", error=\"invalid_token\""),
    }
}

/// `WWW-Authenticate` of a refused MCP request: a 401 names the protected
/// resource metadata (RFC 9728 §5.1) so the client can discover the
/// authorization server; a 403 for a missing scope says
/// `error="insufficient_scope"` with every scope the endpoint needs
/// (RFC 6750 §3.1).
fn mcp_www_authenticate(
    outcome: Outcome,
    facts: &crate::mcp::McpFacts,
    realm: &str,
) -> Option<String> {
    let metadata = facts
        .resource_metadata
        .as_deref()
        .map(|m| format!(", resource_metadata=\"{m}\""))
        .unwrap_or_default();
    match outcome {
        Outcome::Unauthenticated(reason) => {
            Some(format!("{}{metadata}", www_authenticate(reason, realm)))
        }
        Outcome::Forbidden(Reason::InsufficientScope) => Some(format!(
            "Bearer realm=\"{realm}\", error=\"insufficient_scope\", scope=\"{}\"{metadata}",
            facts.scopes.join(" ")
        )),
        _ => None,
    }
}

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_string(),
            value: value.to_string(),
            raw_value: Vec::new(),
        }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

/// The decision as Envoy dynamic metadata (namespace
/// `envoy.filters.http.ext_authz`), for the access log.
fn metadata(decision: &Decision) -> Struct {
    let mut fields = HashMap::new();
    let mut put = |k: &str, v: &str| {
        fields.insert(k.to_string(), string_value(v));
    };
    put("decision", decision.outcome.verdict());
    put("reason", decision.outcome.reason().code());
    put("request_id", &decision.request_id);
    put("policy_version", &decision.policy_version);
    put("policies", &decision.policies.join(","));
    if let Some(p) = &decision.principal {
        put("principal", &p.uid());
        if let Some(t) = &p.tenant {
            put("tenant", t);
        }
    }
    if let Some(a) = &decision.action {
        put("action", a);
    }
    // The caller chain of an agent hop, and the tool a deny names.
    let agent = &decision.agent;
    for (k, v) in [
        ("agent", &agent.agent),
        ("via", &agent.via),
        ("tool", &agent.tool),
    ] {
        if let Some(v) = v {
            put(k, v);
        }
    }
    Struct { fields }
}

/// Whether `value` may be sent as an HTTP field value (RFC 9110 §5.5):
/// visible ASCII, space and tab inside, and obs-text (bytes 0x80–0xFF, so
/// UTF-8 text passes); no CR, LF, NUL or other control character, and no
/// leading or trailing whitespace (which a gateway would strip, making the
/// upstream see another value than the one decided on).
pub fn is_field_value(value: &str) -> bool {
    let bytes = value.as_bytes();
    let edge_ws = |b: Option<&u8>| matches!(b, Some(b' ' | b'\t'));
    !edge_ws(bytes.first())
        && !edge_ws(bytes.last())
        && bytes
            .iter()
            .all(|&b| b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80)
}

/// Whether every value of `principal` that Tollgate passes on in a header
/// (its id, tenant and tier) is a valid field value. A principal that is
/// not is refused with [`Reason::InvalidClaim`].
pub fn principal_is_expressible(principal: &crate::identity::Principal) -> bool {
    is_field_value(&principal.id)
        && principal.tenant.as_deref().is_none_or(is_field_value)
        && principal.tier.as_deref().is_none_or(is_field_value)
}

/// Builds the ext_authz answer. Every path sets `status` explicitly: Envoy
/// reads a CheckResponse without one as OK, so an empty response would be an
/// allow.
///
/// On allow, Tollgate's identity headers overwrite any client copies, and
/// every other client header under the reserved prefix is removed, so the
/// upstream never sees a forged one.
pub fn check_response(
    decision: &Decision,
    client_headers: &HashMap<String, String>,
    config: &ResponseConfig,
    style: HeaderStyle,
) -> CheckResponse {
    // The engine refuses such principals; this keeps an allow from ever
    // carrying a header value the gateway would refuse or split.
    if decision.outcome.is_allow()
        && decision
            .principal
            .as_ref()
            .is_some_and(|p| !principal_is_expressible(p))
    {
        let mut refused = decision.clone();
        refused.outcome = Outcome::Unauthenticated(Reason::InvalidClaim);
        return check_response(&refused, client_headers, config, style);
    }
    let quota_headers: Vec<HeaderValueOption> = decision
        .quota
        .as_ref()
        .map(|q| rate_limit_headers(style, q))
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| header(k, &v, HeaderAppendAction::OverwriteIfExistsOrAdd))
        .collect();
    let pair = status_of(decision.outcome);
    let status = Some(Status {
        code: pair.grpc as i32,
        message: String::new(),
        details: Vec::new(),
    });
    let http_response = if decision.outcome.is_allow() {
        let principal = decision.principal.as_ref();
        let set = [
            (&config.principal_header, principal.map(|p| p.uid())),
            (
                &config.tenant_header,
                principal.and_then(|p| p.tenant.clone()),
            ),
            (&config.tier_header, principal.and_then(|p| p.tier.clone())),
        ];
        let mut headers = Vec::new();
        let mut headers_to_remove = Vec::new();
        for (name, value) in set {
            match value {
                Some(v) => {
                    headers.push(header(name, &v, HeaderAppendAction::OverwriteIfExistsOrAdd))
                }
                None => headers_to_remove.push(name.clone()),
            }
        }
        // The signed caller context for the agent runtime (replacing any
        // client copy, which the prefix strip below would also remove).
        let issued = decision.agent.caller_context.as_ref();
        if let Some((name, token)) = issued {
            headers.push(header(
                name,
                token,
                HeaderAppendAction::OverwriteIfExistsOrAdd,
            ));
        }
        if let Some(facts) = &decision.mcp {
            if facts.method.as_deref() == Some("tools/list") {
                headers.push(header(
                    crate::mcp::LIST_MARK_HEADER,
                    "1",
                    HeaderAppendAction::OverwriteIfExistsOrAdd,
                ));
            } else {
                headers_to_remove.push(crate::mcp::LIST_MARK_HEADER.to_string());
            }
        }
        // The MCP server never sees the client's token (it was issued for
        // this resource, not for the server's own upstreams).
        if config.strip_credentials || decision.mcp.is_some() {
            for name in ["authorization", "x-api-key"] {
                if client_headers.contains_key(name) {
                    headers_to_remove.push(name.to_string());
                }
            }
        }
        if !config.strip_prefix.is_empty() {
            for name in client_headers.keys() {
                let ours = set_names(config).any(|n| n == name)
                    || issued.is_some_and(|(issued, _)| issued == name);
                if !ours && name.starts_with(&config.strip_prefix) {
                    headers_to_remove.push(name.clone());
                }
            }
        }
        let mut response_headers_to_add = quota_headers;
        if decision.quota_fail_open && !config.quota_fail_open_header.is_empty() {
            response_headers_to_add.push(header(
                &config.quota_fail_open_header,
                "store_unavailable",
                HeaderAppendAction::OverwriteIfExistsOrAdd,
            ));
        }
        HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove,
            response_headers_to_add,
            ..Default::default()
        })
    } else {
        let mut headers = vec![header(
            "content-type",
            "application/json",
            HeaderAppendAction::OverwriteIfExistsOrAdd,
        )];
        let challenge = match (&decision.mcp, decision.outcome) {
            (Some(facts), outcome) => mcp_www_authenticate(outcome, facts, &config.realm),
            (None, Outcome::Unauthenticated(reason)) => {
                Some(www_authenticate(reason, &config.realm))
            }
            _ => None,
        };
        if let Some(challenge) = challenge {
            headers.push(header(
                "www-authenticate",
                &challenge,
                HeaderAppendAction::OverwriteIfExistsOrAdd,
            ));
        }
        if let (Outcome::OverQuota(_), Some(q)) = (decision.outcome, &decision.quota) {
            headers.push(header(
                "retry-after",
                &ceil_secs(q.reset).max(1).to_string(),
                HeaderAppendAction::OverwriteIfExistsOrAdd,
            ));
            headers.extend(quota_headers);
        }
        HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(pair.http),
            }),
            headers,
            body: match &decision.mcp {
                Some(facts) => crate::mcp::error_body(decision, facts),
                None => deny_body(decision),
            },
        })
    };
    CheckResponse {
        status,
        http_response: Some(http_response),
        dynamic_metadata: Some(metadata(decision)),
    }
}

/// Envoy's answer to ShouldRateLimit. `overall_code` is always OK or
/// OVER_LIMIT, never UNKNOWN: Envoy reads UNKNOWN as "not limited".
///
/// A descriptor whose count the store did not report (it failed, or was not
/// asked) gets no `current_limit` and no remaining count: Envoy would turn
/// them into `x-ratelimit-remaining: 0` headers that nothing counted.
/// `fail_open_header` (empty: none) marks answers allowed because the store
/// failed.
pub fn rate_limit_response(
    answer: &RlsAnswer,
    style: HeaderStyle,
    fail_open_header: &str,
) -> RateLimitResponse {
    let code = |over: bool| if over { RlsCode::OverLimit } else { RlsCode::Ok } as i32;
    let clamp = |n: u64| u32::try_from(n).unwrap_or(u32::MAX);
    let statuses = answer
        .statuses
        .iter()
        .map(|s| DescriptorStatus {
            code: code(s.over),
            current_limit: s.limit.as_ref().filter(|_| s.remaining.is_some()).map(|l| {
                EnvoyRateLimit {
                    name: l.name.clone().unwrap_or_default(),
                    requests_per_unit: clamp(l.requests_per_unit),
                    unit: l.unit.envoy_code(),
                }
            }),
            limit_remaining: if s.unlimited {
                u32::MAX
            } else {
                s.remaining.map_or(0, clamp)
            },
            duration_until_reset: s
                .reset
                .map(|d| envoy_types::pb::google::protobuf::Duration {
                    seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
                    nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
                }),
            ..Default::default()
        })
        .collect();
    // Headers describe the limit that refused, else the most restrictive
    // counted one; never a limit whose count is unknown.
    let tightest = answer
        .statuses
        .iter()
        .filter_map(|s| Some((s, s.limit.as_ref()?, s.remaining?)))
        .min_by_key(|(s, _, remaining)| (!s.over, *remaining));
    let mut response_headers_to_add: Vec<HeaderValue> = tightest
        .map(|(s, l, remaining)| {
            let report = QuotaReport {
                rule: l.name.clone().unwrap_or_else(|| "limit".into()),
                limit: l.requests_per_unit,
                remaining,
                reset: s.reset.unwrap_or_default(),
                unit_secs: l.unit.millis() / 1000,
            };
            rate_limit_headers(style, &report)
        })
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| HeaderValue {
            key: k.to_string(),
            value: v,
            raw_value: Vec::new(),
        })
        .collect();
    if answer.store_failed && !answer.over && !fail_open_header.is_empty() {
        response_headers_to_add.push(HeaderValue {
            key: fail_open_header.to_string(),
            value: "store_unavailable".into(),
            raw_value: Vec::new(),
        });
    }
    RateLimitResponse {
        overall_code: code(answer.over),
        statuses,
        response_headers_to_add,
        ..Default::default()
    }
}

/// A decision as a plain HTTP answer (the forward-auth listener's): status,
/// headers (lowercase names) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

/// Builds the HTTP answer for a gateway that reads a status: 2xx with the
/// identity headers to copy upstream on allow (an absent value is sent as
/// an empty header so the gateway overwrites any client copy with nothing);
/// on deny the status of [`status_of`] with `WWW-Authenticate` (401),
/// `Retry-After` and RateLimit headers (429) and [`deny_body`].
pub fn http_answer(decision: &Decision, config: &ResponseConfig, style: HeaderStyle) -> HttpAnswer {
    // Same guard as `check_response`: an allow never carries a value that
    // is not a valid field value.
    if decision.outcome.is_allow()
        && decision
            .principal
            .as_ref()
            .is_some_and(|p| !principal_is_expressible(p))
    {
        let mut refused = decision.clone();
        refused.outcome = Outcome::Unauthenticated(Reason::InvalidClaim);
        return http_answer(&refused, config, style);
    }
    let quota: Vec<(String, String)> = decision
        .quota
        .as_ref()
        .map(|q| rate_limit_headers(style, q))
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let status = status_of(decision.outcome).http;
    let mut headers = Vec::new();
    if decision.outcome.is_allow() {
        let principal = decision.principal.as_ref();
        for (name, value) in [
            (&config.principal_header, principal.map(|p| p.uid())),
            (
                &config.tenant_header,
                principal.and_then(|p| p.tenant.clone()),
            ),
            (&config.tier_header, principal.and_then(|p| p.tier.clone())),
        ] {
            headers.push((name.clone(), value.unwrap_or_default()));
        }
        headers.extend(quota);
        if decision.quota_fail_open && !config.quota_fail_open_header.is_empty() {
            headers.push((
                config.quota_fail_open_header.clone(),
                "store_unavailable".into(),
            ));
        }
        return HttpAnswer {
            status,
            headers,
            body: String::new(),
        };
    }
    headers.push(("content-type".into(), "application/json".into()));
    if let Outcome::Unauthenticated(reason) = decision.outcome {
        headers.push((
            "www-authenticate".into(),
            www_authenticate(reason, &config.realm),
        ));
    }
    if let (Outcome::OverQuota(_), Some(q)) = (decision.outcome, &decision.quota) {
        headers.push(("retry-after".into(), ceil_secs(q.reset).max(1).to_string()));
        headers.extend(quota);
    }
    HttpAnswer {
        status,
        headers,
        body: deny_body(decision),
    }
}

fn set_names(config: &ResponseConfig) -> impl Iterator<Item = &String> {
    [
        &config.principal_header,
        &config.tenant_header,
        &config.tier_header,
    ]
    .into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decision(outcome: Outcome) -> Decision {
        Decision::early("req-1".into(), outcome, "v1".into())
    }

    #[test]
    fn agent_facts_reach_the_deny_body_and_the_access_log_metadata() {
        let mut d = decision(Outcome::Forbidden(Reason::ToolForbidden));
        d.agent.tool = Some("send_email".into());
        d.agent.agent = Some("spiffe://a/runtime".into());
        let body: serde_json::Value = serde_json::from_str(&deny_body(&d)).unwrap();
        assert_eq!(body["error"]["tool"], "send_email");
        assert_eq!(body["error"]["code"], "tool_forbidden");
        let m = metadata(&d);
        assert!(m.fields.contains_key("tool") && m.fields.contains_key("agent"));
        assert!(!m.fields.contains_key("via"));
    }

    #[test]
    fn no_outcome_gives_an_empty_or_statusless_response() {
        let outcomes = [
            Outcome::Allow,
            Outcome::Unauthenticated(Reason::MissingCredential),
            Outcome::Unauthenticated(Reason::InvalidCredential),
            Outcome::Forbidden(Reason::PolicyDenied),
            Outcome::Invalid(Reason::AmbiguousPath),
            Outcome::Unavailable(Reason::Unavailable),
            Outcome::OverQuota(Reason::OverQuota),
        ];
        for outcome in outcomes {
            let r = check_response(
                &decision(outcome),
                &HashMap::new(),
                &ResponseConfig::default(),
                HeaderStyle::Draft03,
            );
            let status = r.status.expect("status is always set");
            assert_eq!(status.code == 0, outcome.is_allow(), "{outcome:?}");
            assert!(r.http_response.is_some(), "{outcome:?}");
            if let Some(HttpResponse::DeniedResponse(d)) = &r.http_response {
                let code = d.status.as_ref().map(|s| s.code).unwrap_or_default();
                assert_eq!(code, i32::from(status_of(outcome).http));
                assert!(d.body.contains(outcome.reason().code()));
                assert!(d.body.contains("req-1"));
            }
        }
    }

    #[test]
    fn allow_strips_forged_prefixed_headers_and_overwrites_ours() {
        let mut client = HashMap::new();
        client.insert(
            "x-tollgate-principal".to_string(),
            "ApiKey::\"admin\"".to_string(),
        );
        client.insert("x-tollgate-debug".to_string(), "1".to_string());
        let r = check_response(
            &decision(Outcome::Allow),
            &client,
            &ResponseConfig::default(),
            HeaderStyle::Draft03,
        );
        let Some(HttpResponse::OkResponse(ok)) = r.http_response else {
            panic!("allow must be an OkResponse");
        };
        assert!(
            ok.headers_to_remove
                .contains(&"x-tollgate-debug".to_string())
        );
        // No principal on this decision: our own header is removed, not set.
        assert!(
            ok.headers_to_remove
                .contains(&"x-tollgate-principal".to_string())
        );
        assert!(ok.headers.is_empty());
    }

    #[test]
    fn credentials_are_stripped_only_when_configured() {
        let mut client = HashMap::new();
        client.insert("authorization".to_string(), "Bearer x".to_string());
        client.insert("x-api-key".to_string(), "tg_x".to_string());
        let removed = |strip: bool| {
            let config = ResponseConfig {
                strip_credentials: strip,
                ..ResponseConfig::default()
            };
            match check_response(
                &decision(Outcome::Allow),
                &client,
                &config,
                HeaderStyle::None,
            )
            .http_response
            {
                Some(HttpResponse::OkResponse(ok)) => ok.headers_to_remove,
                _ => panic!("allow"),
            }
        };
        assert!(!removed(false).contains(&"authorization".to_string()));
        let stripped = removed(true);
        assert!(
            stripped.contains(&"authorization".to_string())
                && stripped.contains(&"x-api-key".to_string())
        );
    }

    #[test]
    fn unauthenticated_carries_www_authenticate() {
        let r = check_response(
            &decision(Outcome::Unauthenticated(Reason::InvalidCredential)),
            &HashMap::new(),
            &ResponseConfig::default(),
            HeaderStyle::Draft03,
        );
        let Some(HttpResponse::DeniedResponse(d)) = r.http_response else {
            panic!("deny");
        };
        assert!(d.headers.iter().any(|h| {
            h.header
                .as_ref()
                .is_some_and(|h| h.key == "www-authenticate" && h.value.contains("invalid_token"))
        }));
    }
}
