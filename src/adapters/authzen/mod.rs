//! OpenID AuthZEN Authorization API 1.0 over HTTPS/JSON (§10 of the spec):
//! Access Evaluation, Access Evaluations, Subject / Resource / Action Search
//! and PDP metadata, served on `server.authzen_listen`.
//!
//! The adapter only converts: JSON → [`crate::engine::CedarQuery`] (through
//! [`mapping`]), asks [`Engine::decide_on`] — the same path as `tollgate.v1`
//! Check — and writes the decision back as JSON. Transport rules it keeps:
//! `Content-Type: application/json` required, unknown members ignored, a
//! missing or mistyped required member is `400` with a one-line text body,
//! `X-Request-ID` echoed on every answer.

mod caller;
mod config;
pub mod mapping;
pub mod model;
pub mod search;

pub use config::{AuthzenConfig, AuthzenConfigError, ReasonsMode};

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Map, Value, json};

use crate::engine::Engine;
use crate::metrics::Api;
use crate::policy::Snapshot;
use mapping::{OverlayCache, SchemaShape, TypeMap};
use model::{BadRequest, Evaluation, Semantic};
use search::{Bounds, Searcher, Target};

/// Default paths (§10.1, table "API Endpoint Overview").
pub const EVALUATION_PATH: &str = "/access/v1/evaluation";
pub const EVALUATIONS_PATH: &str = "/access/v1/evaluations";
pub const SEARCH_SUBJECT_PATH: &str = "/access/v1/search/subject";
pub const SEARCH_RESOURCE_PATH: &str = "/access/v1/search/resource";
pub const SEARCH_ACTION_PATH: &str = "/access/v1/search/action";
pub const METADATA_PATH: &str = "/.well-known/authzen-configuration";

/// The AuthZEN adapter's shared state.
pub struct Authzen {
    engine: Arc<Engine>,
    config: AuthzenConfig,
    pdp: Option<String>,
    types: TypeMap,
    /// MAC key of search page tokens; fresh per process, so tokens do not
    /// outlive a restart or cross replicas.
    token_key: [u8; 32],
    /// Schema shapes, rebuilt when the policy version changes.
    shape: Mutex<Option<(String, Arc<SchemaShape>)>>,
}

impl Authzen {
    /// Builds the adapter; fails on an unusable `[authzen]` section.
    pub fn new(engine: Arc<Engine>, config: AuthzenConfig) -> Result<Self, AuthzenConfigError> {
        let pdp = config.check()?;
        let mut token_key = [0u8; 32];
        getrandom::fill(&mut token_key).map_err(|e| AuthzenConfigError {
            key: "page_token".into(),
            message: format!("no randomness from the OS for the page token key: {e}"),
        })?;
        Ok(Self {
            engine,
            types: TypeMap {
                types: config.types.clone(),
                action_type: config.action_type.clone(),
            },
            config,
            pdp,
            token_key,
            shape: Mutex::new(None),
        })
    }

    /// The router, for `axum::serve`.
    pub fn router(self: Arc<Self>) -> Router {
        let limit = self.config.max_body_bytes;
        Router::new()
            .route(EVALUATION_PATH, post(evaluation))
            .route(EVALUATIONS_PATH, post(evaluations))
            .route(SEARCH_SUBJECT_PATH, post(search_subject))
            .route(SEARCH_RESOURCE_PATH, post(search_resource))
            .route(SEARCH_ACTION_PATH, post(search_action))
            // Metadata stays public: PEPs read it before they call.
            .route_layer(middleware::from_fn_with_state(
                self.clone(),
                caller::require_caller,
            ))
            .route(METADATA_PATH, get(metadata))
            .layer(DefaultBodyLimit::max(limit))
            .layer(middleware::from_fn(echo_request_id))
            .with_state(self)
    }

    fn shape_for(&self, snapshot: &Snapshot) -> Arc<SchemaShape> {
        let mut cached = self.shape.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((version, shape)) = cached.as_ref()
            && *version == snapshot.version
        {
            return shape.clone();
        }
        let shape = Arc::new(SchemaShape::parse(&snapshot.schema_text));
        *cached = Some((snapshot.version.clone(), shape.clone()));
        shape
    }

    fn wants_reasons(&self, body: &Map<String, Value>) -> bool {
        match self.config.reasons {
            ReasonsMode::Never => false,
            ReasonsMode::Always => true,
            ReasonsMode::OnRequest => body
                .get("options")
                .and_then(|o| o.get("reasons"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
        }
    }

    /// One decision object: `{"decision": bool, "context"?: {...}}`. Anything
    /// that cannot be put in Cedar terms denies, with the cause in `context`.
    fn decide(
        &self,
        snapshot: &Snapshot,
        shape: &SchemaShape,
        eval: &Evaluation,
        reasons: bool,
        overlays: &mut OverlayCache,
    ) -> Value {
        let mapped = match mapping::map_evaluation(&self.types, shape, snapshot, eval, overlays) {
            Ok(m) => m,
            Err(e) => return item_error(&e.to_string()),
        };
        match self.engine.decide_on(
            snapshot,
            &mapped.query,
            Some(&mapped.entities),
            Api::Authzen,
        ) {
            Ok(answer) if reasons => {
                let mut context = json!({
                    "determining_policies": answer.verdict.policies,
                    "policy_version": answer.policy_version,
                });
                if !answer.verdict.errors.is_empty() {
                    context["errors"] = json!(
                        answer
                            .verdict
                            .errors
                            .iter()
                            .map(|e| json!({"policy_id": e.policy_id, "message": e.message}))
                            .collect::<Vec<_>>()
                    );
                }
                json!({"decision": answer.verdict.allow, "context": context})
            }
            Ok(answer) => json!({"decision": answer.verdict.allow}),
            // The schema cannot type the request (unknown type or action,
            // context of the wrong shape): the spec's closed default.
            Err(e) => item_error(&e.to_string()),
        }
    }
}

/// A denied decision carrying why (§7.2.1: errors in individual evaluations).
fn item_error(message: &str) -> Value {
    json!({"decision": false, "context": {"error": {"status": 400, "message": message}}})
}

/// Why a whole request is refused (§10.1.2).
#[derive(Debug)]
enum ApiError {
    BadRequest(String),
    Internal(String),
}

impl From<BadRequest> for ApiError {
    fn from(e: BadRequest) -> Self {
        Self::BadRequest(e.0)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, m),
        };
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            message,
        )
            .into_response()
    }
}

fn ok_json(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// The request body as a JSON object, after the transport checks.
fn read_body(headers: &HeaderMap, body: &Bytes) -> Result<Map<String, Value>, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media = content_type.split(';').next().unwrap_or_default().trim();
    if !media.eq_ignore_ascii_case("application/json") {
        return Err(ApiError::BadRequest(format!(
            "content-type must be application/json, got {:?}",
            content_type.chars().take(64).collect::<String>()
        )));
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest("request body is empty".into()));
    }
    // serde_json stops at 128 levels of nesting, so a deeply nested body is
    // a 400, not a stack overflow.
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "request body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!("malformed JSON: {e}"))),
    }
}

/// Runs `work` off the async threads: a batch or a search evaluates many
/// policies.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| ApiError::Internal("evaluation did not complete".into()))?
}

async fn evaluation(
    State(az): State<Arc<Authzen>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, &body)?;
    let eval = model::evaluation(&body)?;
    let reasons = az.wants_reasons(&body);
    let decision = blocking(move || {
        let snapshot = az.engine.policies().snapshot();
        let shape = az.shape_for(&snapshot);
        Ok(az.decide(&snapshot, &shape, &eval, reasons, &mut OverlayCache::new()))
    })
    .await?;
    Ok(ok_json(decision))
}

async fn evaluations(
    State(az): State<Arc<Authzen>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, &body)?;
    let request = model::evaluations(&body)?;
    if request.items.len() > az.config.max_evaluations {
        return Err(ApiError::BadRequest(format!(
            "evaluations: {} items; at most {} per request",
            request.items.len(),
            az.config.max_evaluations
        )));
    }
    let reasons = az.wants_reasons(&body);
    // No items: behave as the single Access Evaluation API (§7.1).
    let single = if request.items.is_empty() {
        Some(request.single()?)
    } else {
        None
    };
    let response = blocking(move || {
        let snapshot = az.engine.policies().snapshot();
        let shape = az.shape_for(&snapshot);
        let mut overlays = OverlayCache::new();
        if let Some(eval) = single {
            return Ok(az.decide(&snapshot, &shape, &eval, reasons, &mut overlays));
        }
        let mut out = Vec::with_capacity(request.items.len());
        for i in 0..request.items.len() {
            let decision = match request.item(i) {
                Ok(eval) => az.decide(&snapshot, &shape, &eval, reasons, &mut overlays),
                Err(e) => item_error(&e.0),
            };
            let allow = decision["decision"].as_bool().unwrap_or(false);
            out.push(decision);
            let stop = match request.semantic {
                Semantic::ExecuteAll => false,
                Semantic::DenyOnFirstDeny => !allow,
                Semantic::PermitOnFirstPermit => allow,
            };
            if stop {
                break;
            }
        }
        Ok(json!({"evaluations": out}))
    })
    .await?;
    Ok(ok_json(response))
}

async fn search(
    az: Arc<Authzen>,
    target: Target,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body = read_body(&headers, &body)?;
    let response = blocking(move || {
        let snapshot = az.engine.policies().snapshot();
        let shape = az.shape_for(&snapshot);
        let searcher = Searcher {
            engine: &az.engine,
            snapshot: &snapshot,
            types: &az.types,
            shape: &shape,
            key: &az.token_key,
            bounds: Bounds {
                default_page: az.config.search_page_size,
                max_page: az.config.search_max_page_size,
                max_candidates: az.config.search_max_candidates,
                token_ttl_secs: az.config.page_token_ttl_secs,
            },
        };
        Ok(searcher.run(target, &body)?)
    })
    .await?;
    Ok(ok_json(response))
}

async fn search_subject(
    State(az): State<Arc<Authzen>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    search(az, Target::Subject, headers, body).await
}

async fn search_resource(
    State(az): State<Arc<Authzen>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    search(az, Target::Resource, headers, body).await
}

async fn search_action(
    State(az): State<Arc<Authzen>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    search(az, Target::Action, headers, body).await
}

/// PDP metadata (§9): only the endpoints this listener serves.
async fn metadata(State(az): State<Arc<Authzen>>, headers: HeaderMap) -> Response {
    let pdp = match &az.pdp {
        Some(p) => p.clone(),
        None => {
            let host = headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .filter(|h| {
                    !h.is_empty()
                        && h.chars()
                            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
                })
                .unwrap_or("localhost");
            format!("http://{host}")
        }
    };
    ok_json(json!({
        "policy_decision_point": pdp,
        "access_evaluation_endpoint": format!("{pdp}{EVALUATION_PATH}"),
        "access_evaluations_endpoint": format!("{pdp}{EVALUATIONS_PATH}"),
        "search_subject_endpoint": format!("{pdp}{SEARCH_SUBJECT_PATH}"),
        "search_resource_endpoint": format!("{pdp}{SEARCH_RESOURCE_PATH}"),
        "search_action_endpoint": format!("{pdp}{SEARCH_ACTION_PATH}"),
    }))
}

/// Echoes `X-Request-ID` on every answer, errors included (§10.1.3).
async fn echo_request_id(request: Request, next: Next) -> Response {
    let id: Option<HeaderValue> = request.headers().get("x-request-id").cloned();
    let mut response = next.run(request).await;
    if let Some(id) = id {
        response.headers_mut().insert("x-request-id", id);
    }
    response
}
