//! Tollgate's own `tollgate.v1.DecisionService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::engine::{CedarAnswer, CedarQuery, Engine, QueryError};
use crate::proto::{self, decision_service_server::DecisionService};

/// The decision API gRPC service.
pub struct DecisionApi {
    engine: Arc<Engine>,
}

impl DecisionApi {
    /// Serves decisions from `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    fn decide(
        &self,
        requests: Vec<proto::CheckRequest>,
        batch: bool,
        traceparent: Option<&str>,
    ) -> Result<Vec<proto::CheckResponse>, Status> {
        let invalid = |i: usize, e: QueryError| {
            let field = if batch {
                format!("requests[{i}].{}", e.field)
            } else {
                e.field
            };
            Status::invalid_argument(format!("{field}: {}", e.message))
        };
        let queries = requests
            .into_iter()
            .enumerate()
            .map(|(i, r)| to_query(r).map_err(|e| invalid(i, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let answers = self
            .engine
            .decide_queries(&queries, traceparent)
            .map_err(|(i, e)| invalid(i, e))?;
        Ok(answers.into_iter().map(to_response).collect())
    }
}

#[tonic::async_trait]
impl DecisionService for DecisionApi {
    async fn check(
        &self,
        request: Request<proto::CheckRequest>,
    ) -> Result<Response<proto::CheckResponse>, Status> {
        let traceparent = traceparent(&request);
        let mut responses =
            self.decide(vec![request.into_inner()], false, traceparent.as_deref())?;
        let response = responses
            .pop()
            .ok_or_else(|| Status::internal("no answer"))?;
        Ok(Response::new(response))
    }

    async fn batch_check(
        &self,
        request: Request<proto::BatchCheckRequest>,
    ) -> Result<Response<proto::BatchCheckResponse>, Status> {
        let traceparent = traceparent(&request);
        let proto::BatchCheckRequest { requests } = request.into_inner();
        if requests.len() > 1000 {
            return Err(Status::invalid_argument("requests: at most 1000 per batch"));
        }
        let responses = self.decide(requests, true, traceparent.as_deref())?;
        Ok(Response::new(proto::BatchCheckResponse { responses }))
    }

    async fn report_usage(
        &self,
        request: Request<proto::ReportUsageRequest>,
    ) -> Result<Response<proto::ReportUsageResponse>, Status> {
        use crate::engine::UsageError;
        use crate::quota::reserve::Settled;
        use proto::report_usage_response::Result as R;
        let proto::ReportUsageRequest {
            request_id,
            input_tokens,
            output_tokens,
            cached_input_tokens,
        } = request.into_inner();
        let usage = crate::usage::TokenUsage {
            input: input_tokens,
            output: output_tokens,
            cached_input: cached_input_tokens,
        };
        let result = match self.engine.report_usage(&request_id, usage).await {
            Ok(Settled::Now) => R::Settled,
            Ok(Settled::Already) => R::AlreadySettled,
            Ok(Settled::Unknown) => R::UnknownRequest,
            Err(e @ (UsageError::NoRequestId | UsageError::Absurd)) => {
                return Err(Status::invalid_argument(e.to_string()));
            }
            // Maybe applied (a timeout after the script ran): a retry is safe,
            // the settled marker written by the same script makes it a no-op.
            Err(e) => return Err(Status::unavailable(e.to_string())),
        };
        Ok(Response::new(proto::ReportUsageResponse {
            result: result as i32,
        }))
    }
}

/// The caller's W3C `traceparent` gRPC metadata, if readable.
fn traceparent<T>(request: &Request<T>) -> Option<String> {
    let value = request.metadata().get("traceparent")?;
    value.to_str().ok().map(str::to_string)
}

/// Deepest `context_json` / `entities_json` accepted.
const MAX_JSON_DEPTH: usize = 32;

fn to_query(request: proto::CheckRequest) -> Result<CedarQuery, QueryError> {
    let proto::CheckRequest {
        principal,
        action,
        resource,
        context_json,
        entities_json,
    } = request;
    let uid = |field: &str, uid: Option<proto::EntityUid>| {
        let uid = uid.ok_or_else(|| QueryError {
            field: field.into(),
            message: "missing".into(),
        })?;
        if uid.r#type.is_empty() {
            return Err(QueryError {
                field: format!("{field}.type"),
                message: "empty".into(),
            });
        }
        Ok((uid.r#type, uid.id))
    };
    let json = |field: &str, text: String| -> Result<Option<serde_json::Value>, QueryError> {
        if text.trim().is_empty() {
            return Ok(None);
        }
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| QueryError {
            field: field.into(),
            message: format!("not valid JSON: {e}"),
        })?;
        // Cedar converts JSON recursively on this request thread; serde_json
        // stops at 128 levels, which is still too deep for a small stack.
        if crate::policy::guard::json_depth(&value) > MAX_JSON_DEPTH {
            return Err(QueryError {
                field: field.into(),
                message: format!("nests deeper than {MAX_JSON_DEPTH} levels"),
            });
        }
        Ok(Some(value))
    };
    Ok(CedarQuery {
        principal: uid("principal", principal)?,
        action: uid("action", action)?,
        resource: uid("resource", resource)?,
        context: json("context_json", context_json)?,
        entities: json("entities_json", entities_json)?,
    })
}

fn to_response(answer: CedarAnswer) -> proto::CheckResponse {
    let decision = if answer.verdict.allow {
        proto::Decision::Allow
    } else {
        proto::Decision::Deny
    };
    proto::CheckResponse {
        decision: decision as i32,
        determining_policies: answer.verdict.policies,
        errors: answer
            .verdict
            .errors
            .into_iter()
            .map(|e| proto::EvaluationError {
                policy_id: e.policy_id,
                message: e.message,
            })
            .collect(),
        policy_version: answer.policy_version,
    }
}
