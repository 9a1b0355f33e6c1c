//! The admin HTTP listener: `/healthz`, `/readyz`, `/metrics`, `/policy`,
//! and the OAuth protected resource metadata (RFC 9728) of each MCP
//! endpoint at `/.well-known/oauth-protected-resource<resource path>`
//! (route that path of the MCP origin here, without ext_authz).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::metrics::Metrics;
use crate::policy::PolicyStore;
use crate::quota::QuotaEngine;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    pub policies: Arc<PolicyStore>,
    pub metrics: Arc<Metrics>,
    pub quota: Arc<QuotaEngine>,
    /// JWT issuers; one without usable keys makes Tollgate unready.
    pub issuers: Vec<Arc<crate::identity::jwt::Issuer>>,
    /// The token introspection endpoint; down makes Tollgate unready.
    pub introspection: Option<Arc<crate::identity::introspection::Introspector>>,
    /// Cleared when draining, so load balancers stop sending traffic.
    pub ready: Arc<AtomicBool>,
    /// Readiness requires a connected quota store.
    pub store_required: bool,
    /// MCP endpoints, for their metadata documents.
    pub mcp: Arc<crate::mcp::McpConfig>,
    /// Caller-context signing keys (live: swapped when their file is
    /// reloaded), whose public halves are served as a JWK Set at
    /// [`CALLER_CONTEXT_JWKS`]; empty when none are configured.
    pub caller_context: Arc<arc_swap::ArcSwapOption<crate::agents::caller_context::KeyRing>>,
    /// The audit trail, when on: its write failures are reported on
    /// `/readyz` (they never make Tollgate unready: the trail is a side
    /// channel that never refuses a decision).
    pub audit: Option<Arc<crate::audit::AuditTrail>>,
}

/// The admin routes, every one of them.
pub fn router(state: AdminState) -> Router {
    router_exposing(state, &[AdminEndpoint::Metrics, AdminEndpoint::Policy])
}

/// An admin endpoint that shows more than health, served only when listed
/// in `server.admin_endpoints`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdminEndpoint {
    /// `/metrics` (Prometheus text).
    Metrics,
    /// `/policy` (the policy set's version and reload status).
    Policy,
}

/// The admin routes: `/healthz` and `/readyz` always, `/metrics` and
/// `/policy` only when in `exposed` (404 otherwise).
pub fn router_exposing(state: AdminState, exposed: &[AdminEndpoint]) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(WELL_KNOWN, get(resource_metadata))
        .route(&format!("{WELL_KNOWN}/{{*rest}}"), get(resource_metadata))
        .route(CALLER_CONTEXT_JWKS, get(caller_context_jwks));
    if exposed.contains(&AdminEndpoint::Metrics) {
        router = router.route("/metrics", get(metrics));
    }
    if exposed.contains(&AdminEndpoint::Policy) {
        router = router.route("/policy", get(policy));
    }
    router.with_state(state)
}

/// Where the caller-context public keys are served (404 without keys).
pub const CALLER_CONTEXT_JWKS: &str = "/.well-known/tollgate-caller-context-jwks.json";

/// The caller-context public keys that verify now (RFC 7517 JWK Set).
async fn caller_context_jwks(State(state): State<AdminState>) -> axum::response::Response {
    match state.caller_context.load_full() {
        Some(keys) => (
            [(header::CACHE_CONTROL, "max-age=60")],
            Json(keys.jwks(std::time::SystemTime::now())),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

const WELL_KNOWN: &str = "/.well-known/oauth-protected-resource";

/// RFC 9728 §3: the metadata of the MCP endpoint whose resource path
/// follows the well-known prefix; 404 for any other path.
async fn resource_metadata(
    State(state): State<AdminState>,
    uri: axum::http::Uri,
) -> axum::response::Response {
    match state.mcp.server_for_metadata(uri.path()) {
        Some(server) => (
            [(header::CACHE_CONTROL, "max-age=300")],
            Json(server.metadata()),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

fn policy_status(state: &AdminState) -> serde_json::Value {
    let snapshot = state.policies.snapshot();
    let status = state.policies.status();
    let loaded_at = snapshot
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    json!({
        "version": snapshot.version,
        "policies": snapshot.policy_count(),
        "loaded_at": loaded_at,
        "dir": state.policies.dir().display().to_string(),
        "reloads": status.reloads,
        "failed_reloads": status.failed_reloads,
        "last_reload_error": status.last_error,
        "last_reload_error_at": status.last_error_at,
    })
}

/// What `/readyz` answers: serving (not draining), every JWT issuer has
/// usable keys, and a Redis quota store has a writable connection (not yet
/// connected and set up, or dropped after `READONLY` and the like, is not
/// ready) unless `quota.ready_requires_store = false`.
pub fn is_ready(state: &AdminState) -> bool {
    let store_ready = !state.store_required || state.quota.store().connected();
    let introspection_ready = state.introspection.as_ref().is_none_or(|i| i.ready());
    state.ready.load(Ordering::Relaxed)
        && state.issuers.iter().all(|i| i.ready())
        && introspection_ready
        && store_ready
}

/// How often gRPC health re-reads readiness.
const HEALTH_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Keeps gRPC health (`grpc.health.v1`, the overall `""` service and each of
/// `services`) saying what `/readyz` says: a load balancer or Envoy health
/// check on either sees the same answer. Sets it once now, then follows
/// changes until aborted.
pub async fn follow_readiness(
    state: AdminState,
    health: tonic_health::server::HealthReporter,
    services: Vec<&'static str>,
) {
    let mut last = None;
    loop {
        let ready = is_ready(&state);
        if last != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            for name in std::iter::once("").chain(services.iter().copied()) {
                health.set_service_status(name, status).await;
            }
            last = Some(ready);
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    let ready = is_ready(&state);
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = policy_status(&state);
    body["ready"] = json!(ready);
    body["jwt_issuers"] = state
        .issuers
        .iter()
        .map(|i| (i.name().to_string(), json!({ "keys": i.ready() })))
        .collect::<serde_json::Map<_, _>>()
        .into();
    if let Some(i) = &state.introspection {
        body["introspection"] = json!({ "name": i.name(), "endpoint_up": i.ready() });
    }
    body["quota_store"] = json!({
        "kind": state.quota.store().kind(),
        "connected": state.quota.store().connected(),
        "clock_offset_ms": state.quota.store().clock_offset_ms(),
    });
    if let Some(trail) = &state.audit {
        body["audit"] = json!({
            "written": trail.written(),
            "dropped": trail.dropped(),
            "failed": trail.failed(),
            "failing": trail.failing(),
        });
    }
    (code, Json(body))
}

async fn policy(State(state): State<AdminState>) -> impl IntoResponse {
    Json(policy_status(&state))
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
