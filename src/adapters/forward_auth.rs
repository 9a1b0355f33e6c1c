//! HTTP forward-auth: the subrequest conventions of nginx `auth_request`,
//! Traefik `forwardAuth` and Caddy `forward_auth`.
//!
//! The gateway sends Tollgate a request describing the client's request;
//! this adapter turns it into the domain [`HttpRequest`], asks the same
//! [`Engine::decide_http`] the ext_authz adapter asks, and answers through
//! [`respond::http_answer`]: 2xx with the identity headers to copy upstream,
//! else 401 / 403 / 429 / 400 / 503.
//!
//! Which headers describe the original request is the listener's
//! [`ForwardAuthTrust`] (`server.forward_auth_trust`):
//!
//! - `none` (default): the auth request's own method, target and `Host` are
//!   the request decided on, the TCP peer is the client; any
//!   forwarded-request header (`X-Original-Method`, `X-Original-URI`,
//!   `X-Forwarded-Method`, `X-Forwarded-Uri`, `X-Forwarded-Host`) refuses
//!   the request with 400 `untrusted_forwarded_header`, so a client-forged
//!   one can never change a decision.
//! - `original` (nginx): `X-Original-Method` and `X-Original-URI` are
//!   required, the host is `Host`, the client address `X-Real-IP`.
//!   `X-Forwarded-*` are never read.
//! - `forwarded` (Traefik, Caddy): `X-Forwarded-Method`, `-Uri` and `-Host`
//!   are required, `X-Forwarded-Proto: https` means TLS, the client address
//!   is the rightmost `X-Forwarded-For` entry (the one the trusted hop
//!   appended). `X-Original-*` are never read.
//!
//! A required header missing or sent twice is 400 `missing_forwarded_header`.
//! In the trusted modes a request whose original method may carry a body
//! (anything but GET, HEAD, OPTIONS) and whose body the gateway did not
//! forward has unknown body facts (`context.body.complete == false`), so
//! policies that need the body deny.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, request::Parts};
use axum::response::{IntoResponse, Response};

use crate::config::{ForwardAuthTrust, HeaderStyle, ResponseConfig};
use crate::decision::{Decision, Outcome, Reason};
use crate::engine::Engine;
use crate::request::{HttpRequest, parse_source_ip};
use crate::respond;

/// Headers that describe the original request in some convention.
const ORIGINAL: [&str; 2] = ["x-original-method", "x-original-uri"];
const FORWARDED: [&str; 3] = ["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"];

/// The forward-auth service behind its own listener.
pub struct ForwardAuth {
    engine: Arc<Engine>,
    response: ResponseConfig,
    headers: HeaderStyle,
    trust: ForwardAuthTrust,
    max_body_bytes: usize,
}

impl ForwardAuth {
    /// Serves decisions from `engine`, believing the `trust` convention;
    /// bodies longer than `max_body_bytes` are treated as unread.
    pub fn new(
        engine: Arc<Engine>,
        response: ResponseConfig,
        headers: HeaderStyle,
        trust: ForwardAuthTrust,
        max_body_bytes: usize,
    ) -> Self {
        Self {
            engine,
            response,
            headers,
            trust,
            max_body_bytes,
        }
    }

    /// The router: every method and path is an auth request (in `none` mode
    /// the path is the one decided on).
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(check).with_state(self)
    }
}

async fn check(
    State(fa): State<Arc<ForwardAuth>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    // Read one byte past the limit: a longer body is unread, not cut.
    let body = axum::body::to_bytes(body, fa.max_body_bytes.saturating_add(1))
        .await
        .ok()
        .filter(|b| b.len() <= fa.max_body_bytes);
    let decision = match to_http_request(&parts, body, peer, fa.trust) {
        Ok(http) => fa.engine.decide_http(&http).await,
        Err(refused) => {
            let (http, reason) = *refused;
            tracing::info!(request_id = %http.request_id, reason = reason.code(), "forward-auth request refused");
            let version = fa.engine.policies().snapshot().version.clone();
            let decision =
                Decision::early(http.request_id.clone(), Outcome::Invalid(reason), version);
            fa.engine.record_refused(&decision, &http);
            decision
        }
    };
    answer(&decision, &fa.response, fa.headers)
}

/// The HTTP response for a decision. Never a 2xx unless the decision is an
/// allow and every header could be set.
fn answer(decision: &Decision, config: &ResponseConfig, style: HeaderStyle) -> Response {
    let plan = respond::http_answer(decision, config, style);
    let mut headers = HeaderMap::new();
    for (name, value) in &plan.headers {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            // Validated when the config and the principal were loaded; if one
            // still cannot be sent, fail closed.
            tracing::error!(request_id = %decision.request_id, header = %name, "response header cannot be sent; refusing");
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        };
        headers.append(name, value);
    }
    let status = StatusCode::from_u16(plan.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    (status, headers, Body::from(plan.body)).into_response()
}

/// Converts the auth request. On refusal returns what is known of the
/// request (its id, client address) with the reason.
fn to_http_request(
    parts: &Parts,
    body: Option<axum::body::Bytes>,
    peer: SocketAddr,
    trust: ForwardAuthTrust,
) -> Result<HttpRequest, Box<(HttpRequest, Reason)>> {
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && respond::is_field_value(v))
        .map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    let mut http = HttpRequest {
        request_id,
        ..Default::default()
    };
    let refuse = |http: &HttpRequest, reason| Err(Box::new((http.clone(), reason)));
    let mut headers: HashMap<String, String> = HashMap::new();
    for (name, value) in &parts.headers {
        let Ok(value) = value.to_str() else {
            return refuse(&http, Reason::MalformedRequest);
        };
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push(',');
                v.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    // Exactly one value of a header the convention requires.
    let one = |name: &str| -> Result<String, Reason> {
        let mut values = parts.headers.get_all(name).iter();
        match (values.next(), values.next()) {
            (Some(v), None) => v
                .to_str()
                .ok()
                .filter(|v| !v.is_empty())
                .map(str::to_string)
                .ok_or(Reason::MissingForwardedHeader),
            _ => Err(Reason::MissingForwardedHeader),
        }
    };
    let own_host = || {
        headers
            .get("host")
            .cloned()
            .or_else(|| parts.uri.authority().map(|a| a.to_string()))
            .unwrap_or_default()
    };
    let (method, target, host) = match trust {
        ForwardAuthTrust::None => {
            if ORIGINAL
                .iter()
                .chain(&FORWARDED)
                .any(|h| headers.contains_key(*h))
            {
                http.source_ip = Some(peer.ip().to_canonical());
                return refuse(&http, Reason::UntrustedForwardedHeader);
            }
            http.source_ip = Some(peer.ip().to_canonical());
            (parts.method.to_string(), parts.uri.to_string(), own_host())
        }
        ForwardAuthTrust::Original => {
            let address = headers.get("x-real-ip").map_or("", String::as_str);
            match parse_source_ip(address) {
                Ok(ip) => http.source_ip = ip,
                Err(_) => return refuse(&http, Reason::MalformedRequest),
            }
            match (one(ORIGINAL[0]), one(ORIGINAL[1])) {
                (Ok(m), Ok(u)) => (m, u, own_host()),
                (Err(r), _) | (_, Err(r)) => return refuse(&http, r),
            }
        }
        ForwardAuthTrust::Forwarded => {
            let rightmost = headers
                .get("x-forwarded-for")
                .and_then(|v| v.rsplit(',').next())
                .unwrap_or("");
            match parse_source_ip(rightmost) {
                Ok(ip) => http.source_ip = ip,
                Err(_) => return refuse(&http, Reason::MalformedRequest),
            }
            http.tls = headers
                .get("x-forwarded-proto")
                .is_some_and(|p| p.trim().eq_ignore_ascii_case("https"));
            // The auth request's own Host names Tollgate (or the auth
            // address), not the client's target: it must not be compared.
            headers.remove("host");
            match (one(FORWARDED[0]), one(FORWARDED[1]), one(FORWARDED[2])) {
                (Ok(m), Ok(u), Ok(h)) => (m, u, h),
                (Err(r), _, _) | (_, Err(r), _) | (_, _, Err(r)) => return refuse(&http, r),
            }
        }
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
        return refuse(&http, Reason::MalformedRequest);
    }
    let method = method.to_ascii_uppercase();
    let bodiless = matches!(method.as_str(), "GET" | "HEAD" | "OPTIONS");
    let declared_size = headers.get("content-length").and_then(|v| v.parse().ok());
    http.body_partial = match &body {
        // Too long to read: unknown.
        None => true,
        // The gateway described another request than this one: its body
        // arrives only if the gateway forwards it.
        Some(b) if b.is_empty() => trust != ForwardAuthTrust::None && !bodiless,
        Some(_) => false,
    };
    http.body = body.filter(|b| !b.is_empty()).map(|b| b.to_vec());
    http.declared_size = declared_size;
    http.method = method;
    http.raw_path = target;
    http.host = host;
    http.headers = headers;
    Ok(http)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = axum::http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).expect("request").into_parts().0
    }

    fn convert(p: &Parts, trust: ForwardAuthTrust) -> Result<HttpRequest, Reason> {
        let peer: SocketAddr = "10.0.0.9:4000".parse().expect("addr");
        to_http_request(p, Some(Default::default()), peer, trust).map_err(|e| e.1)
    }

    #[test]
    fn untrusted_forwarded_headers_refuse() {
        for h in [
            "x-original-uri",
            "x-forwarded-uri",
            "x-forwarded-method",
            "x-forwarded-host",
        ] {
            let p = parts("GET", "/v1/models", &[("host", "a"), (h, "/admin")]);
            assert_eq!(
                convert(&p, ForwardAuthTrust::None).err(),
                Some(Reason::UntrustedForwardedHeader),
                "{h}"
            );
        }
        let p = parts(
            "GET",
            "/v1/models?x=1",
            &[("host", "a"), ("x-forwarded-for", "1.2.3.4")],
        );
        let r = convert(&p, ForwardAuthTrust::None).expect("own line");
        assert_eq!(
            (r.method.as_str(), r.raw_path.as_str()),
            ("GET", "/v1/models?x=1")
        );
        assert_eq!(r.source_ip, Some("10.0.0.9".parse().expect("ip")));
    }

    #[test]
    fn each_convention_reads_only_its_own_headers() {
        let nginx = parts(
            "GET",
            "/_auth",
            &[
                ("host", "llm.example.com"),
                ("x-original-method", "post"),
                ("x-original-uri", "/v1/chat/completions"),
                ("x-forwarded-uri", "/v1/models"),
                ("x-forwarded-method", "GET"),
                ("x-real-ip", "192.0.2.7"),
            ],
        );
        let r = convert(&nginx, ForwardAuthTrust::Original).expect("nginx");
        assert_eq!(
            (r.method.as_str(), r.raw_path.as_str()),
            ("POST", "/v1/chat/completions")
        );
        assert_eq!(r.source_ip, Some("192.0.2.7".parse().expect("ip")));
        assert!(
            r.body_partial,
            "a POST body nginx did not forward is unknown"
        );

        let traefik = parts(
            "GET",
            "/",
            &[
                ("host", "tollgate:9191"),
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/v1/models"),
                ("x-forwarded-host", "llm.example.com"),
                ("x-forwarded-proto", "https"),
                ("x-forwarded-for", "203.0.113.1, 198.51.100.2"),
                ("x-original-uri", "/admin"),
            ],
        );
        let r = convert(&traefik, ForwardAuthTrust::Forwarded).expect("traefik");
        assert_eq!(r.raw_path, "/v1/models");
        assert_eq!(r.host, "llm.example.com");
        assert!(r.tls);
        assert_eq!(r.source_ip, Some("198.51.100.2".parse().expect("ip")));
        assert!(!r.body_partial);
    }

    #[test]
    fn required_headers_missing_or_doubled_refuse() {
        let missing = parts("GET", "/", &[("x-original-method", "GET")]);
        assert_eq!(
            convert(&missing, ForwardAuthTrust::Original).err(),
            Some(Reason::MissingForwardedHeader)
        );
        let doubled = parts(
            "GET",
            "/",
            &[
                ("x-forwarded-method", "GET"),
                ("x-forwarded-uri", "/v1/models"),
                ("x-forwarded-uri", "/admin"),
                ("x-forwarded-host", "a"),
            ],
        );
        assert_eq!(
            convert(&doubled, ForwardAuthTrust::Forwarded).err(),
            Some(Reason::MissingForwardedHeader)
        );
        let bad_method = parts(
            "GET",
            "/",
            &[
                ("x-original-method", "GET /x"),
                ("x-original-uri", "/v1/models"),
            ],
        );
        assert_eq!(
            convert(&bad_method, ForwardAuthTrust::Original).err(),
            Some(Reason::MalformedRequest)
        );
    }
}
