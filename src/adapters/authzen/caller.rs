//! Who may ask: the calling PEP's credential (through the identity layer)
//! and its quota on this API (through the quota store).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Authzen;
use crate::decision::Reason;
use crate::identity::{Principal, PrincipalKind};
use crate::quota::rules::{Cost, Planned};
use crate::quota::{Algorithm, Charge, ChargeMode, CounterKey, FailureMode, QuotaDecision};
use crate::request::HttpRequest;

/// Admits the calling PEP: authenticated when `authzen.caller_sources` is
/// set (§12.3: a missing or bad credential is 401 with `WWW-Authenticate`),
/// then charged one call against `authzen.caller_requests_per_unit`.
pub(super) async fn require_caller(
    State(az): State<Arc<Authzen>>,
    request: Request,
    next: Next,
) -> Response {
    let caller = if az.config.caller_sources.is_empty() {
        Principal::anonymous()
    } else {
        let http = caller_request(&request);
        match authenticate(&az, &http).await {
            Ok(p) => p,
            Err(refusal) => return refusal,
        }
    };
    if let Some(limit) = az.config.caller_requests_per_unit
        && let Some(refusal) = charge_caller(&az, &caller.uid(), limit).await
    {
        return refusal;
    }
    next.run(request).await
}

fn plain(status: StatusCode, message: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        message.to_string(),
    )
        .into_response()
}

/// One call against the caller's quota; `Some` is the refusal.
async fn charge_caller(az: &Authzen, caller: &str, limit: u64) -> Option<Response> {
    let plan = Planned {
        charge: Charge {
            key: CounterKey::new(
                "authzen",
                &[("caller".to_string(), caller.to_string())],
                caller,
            ),
            limit,
            unit: az.config.caller_quota_unit,
            algorithm: Algorithm::FixedWindow,
            cost: 1,
            shadow: false,
            mode: ChargeMode::Admission,
        },
        failure_mode: FailureMode::Deny,
        label: "authzen.caller_requests_per_unit".into(),
        measure: Cost::Requests,
    };
    match az.engine.quota().charge(std::slice::from_ref(&plan)).await {
        QuotaDecision::Allowed { .. } => None,
        QuotaDecision::OverLimit { usage, .. } => {
            let retry = usage
                .first()
                .and_then(Option::as_ref)
                .map_or(1, |u| u.reset.as_secs().saturating_add(1));
            let mut r = plain(
                StatusCode::TOO_MANY_REQUESTS,
                "this caller's AuthZEN quota is spent; retry after Retry-After seconds",
            );
            if let Ok(v) = HeaderValue::from_str(&retry.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            Some(r)
        }
        // Fail closed: the quota store cannot say whether this call fits.
        QuotaDecision::Failed { .. } => Some(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "the quota store is unavailable; retry",
        )),
    }
}

/// What the identity layer reads of a call: method, path, host, headers.
fn caller_request(request: &Request) -> HttpRequest {
    let headers = request
        .headers()
        .iter()
        .filter_map(|(n, v)| Some((n.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    HttpRequest {
        method: request.method().as_str().to_string(),
        raw_path: request.uri().path().to_string(),
        host: request
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        headers,
        ..HttpRequest::default()
    }
}

/// The authenticated caller, or the 401 / 403 / 503 answer.
async fn authenticate(az: &Authzen, http: &HttpRequest) -> Result<Principal, Response> {
    let unauthorized = |message: &str| {
        (
            StatusCode::UNAUTHORIZED,
            [
                (header::WWW_AUTHENTICATE, "Bearer realm=\"authzen\""),
                (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            ],
            message.to_string(),
        )
            .into_response()
    };
    match az
        .engine
        .authenticate_caller(http, &az.config.caller_sources)
        .await
    {
        Ok(p) if p.kind == PrincipalKind::Anonymous => Err(unauthorized(
            "a credential is required: Authorization: Bearer <token> or x-api-key",
        )),
        Ok(p) => {
            if !az.config.allowed_callers.is_empty()
                && !az.config.allowed_callers.contains(&p.uid())
            {
                return Err(plain(
                    StatusCode::FORBIDDEN,
                    "this caller may not use the AuthZEN API",
                ));
            }
            Ok(p)
        }
        Err(Reason::Unavailable) => Err(plain(
            StatusCode::SERVICE_UNAVAILABLE,
            "cannot verify the credential now; retry",
        )),
        Err(reason) => Err(unauthorized(&format!(
            "credential refused: {}",
            reason.code()
        ))),
    }
}
