//! Direct Cedar questions: the `tollgate.v1` decision API, `tollgate check`
//! and policy tests ask with entity UIDs and a JSON context instead of an
//! HTTP request.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Instant;

use cedar_policy::{Authorizer, Context, Entities, EntityUid, Request};
use serde_json::Value;

use super::{Engine, principal};
use crate::config::OnEvaluationError;
use crate::decision::Reason;
use crate::metrics::Api;
use crate::policy::Snapshot;
use crate::policy::evaluate::{Verdict, evaluate};

/// A direct Cedar question, as the decision API and the CLI ask it.
#[derive(Debug, Clone, Default)]
pub struct CedarQuery {
    /// (type, id) pairs.
    pub principal: (String, String),
    pub action: (String, String),
    pub resource: (String, String),
    /// A JSON object for the context; `None` means `{}`.
    pub context: Option<Value>,
    /// A JSON array of extra entities; `None` means none.
    pub entities: Option<Value>,
}

/// A query that is not well formed; `field` names the culprit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct QueryError {
    pub field: String,
    pub message: String,
}

/// A direct query's answer.
#[derive(Debug, Clone)]
pub struct CedarAnswer {
    pub verdict: Verdict,
    pub policy_version: String,
}

impl Engine {
    /// Decides direct Cedar queries against one snapshot. A malformed query
    /// fails the whole batch, with its index. `traceparent` is the caller's
    /// W3C trace context (gRPC metadata), continued by the batch's
    /// `tollgate.decision` span and recorded as each answer's trace id.
    pub fn decide_queries(
        &self,
        queries: &[CedarQuery],
        traceparent: Option<&str>,
    ) -> Result<Vec<CedarAnswer>, (usize, QueryError)> {
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "tollgate.decision",
            otel.kind = "server",
            queries = queries.len(),
        );
        crate::telemetry::continue_trace(&span, traceparent);
        let trace_id = crate::telemetry::trace_id(&span, traceparent);
        let _entered = span.enter();
        let snapshot = self.policies.snapshot();
        let mut answers = Vec::with_capacity(queries.len());
        for (i, q) in queries.iter().enumerate() {
            answers.push(
                self.decide_traced(&snapshot, q, None, Api::DecisionApi, trace_id.as_deref())
                    .map_err(|e| (i, e))?,
            );
        }
        Ok(answers)
    }

    /// Decides one direct query against `snapshot`, which the caller holds so
    /// that every query of one API call sees the same policy version; logs and
    /// counts it under `api`. `entities`, when given, is used instead of the
    /// snapshot's entities plus `q.entities` (the AuthZEN adapter overlays
    /// request properties on stored entities itself).
    pub fn decide_on(
        &self,
        snapshot: &Snapshot,
        q: &CedarQuery,
        entities: Option<&Entities>,
        api: Api,
    ) -> Result<CedarAnswer, QueryError> {
        self.decide_traced(snapshot, q, entities, api, None)
    }

    fn decide_traced(
        &self,
        snapshot: &Snapshot,
        q: &CedarQuery,
        entities: Option<&Entities>,
        api: Api,
        trace_id: Option<&str>,
    ) -> Result<CedarAnswer, QueryError> {
        let _policy =
            tracing::info_span!(target: crate::telemetry::TARGET, "tollgate.policy").entered();
        let started = Instant::now();
        let verdict = match entities {
            Some(entities) => {
                let request = cedar_request(snapshot, q)?;
                evaluate(
                    &self.authorizer,
                    snapshot,
                    &request,
                    entities,
                    self.on_error,
                )
            }
            None => decide_query(&self.authorizer, snapshot, q, self.on_error)?,
        };
        let shadow = self.shadow_query(q, entities, verdict.allow);
        tracing::info!(
            target: "tollgate::decision",
            api = api.label(),
            principal = %format!("{}::{:?}", q.principal.0, q.principal.1),
            action = %format!("{}::{:?}", q.action.0, q.action.1),
            resource = %format!("{}::{:?}", q.resource.0, q.resource.1),
            decision = if verdict.allow { "allow" } else { "deny" },
            policies = %verdict.policies.join(","),
            policy_version = %snapshot.version,
            trace_id = trace_id.unwrap_or("-"),
            shadow = shadow.as_ref().map_or("-", |s| s.direction),
            "decision"
        );
        let (outcome, reason) = if verdict.allow {
            ("allow", Reason::Allowed.code())
        } else if verdict.errors.is_empty() {
            ("deny", Reason::PolicyDenied.code())
        } else {
            ("deny", Reason::PolicyError.code())
        };
        self.metrics
            .decision(api, outcome, reason, started.elapsed().as_secs_f64());
        if let Some(trail) = self.audit.get() {
            let mut record = query_record(q, &verdict, &snapshot.version, started, api);
            record.trace_id = trace_id.map(str::to_string);
            record.shadow = shadow;
            trail.submit(record);
        }
        Ok(CedarAnswer {
            verdict,
            policy_version: snapshot.version.clone(),
        })
    }
}

impl Engine {
    /// Decides `q` with the shadow policy set too; `Some` when it disagrees
    /// with the live verdict. A query the shadow schema cannot type is not
    /// compared.
    fn shadow_query(
        &self,
        q: &CedarQuery,
        entities: Option<&Entities>,
        live_allow: bool,
    ) -> Option<crate::policy::shadow::ShadowVerdict> {
        let shadow = self.shadow.get()?;
        let snapshot = shadow.snapshot();
        let verdict = match entities {
            Some(entities) => cedar_request(&snapshot, q).ok().map(|request| {
                evaluate(
                    &self.authorizer,
                    &snapshot,
                    &request,
                    entities,
                    self.on_error,
                )
            }),
            None => decide_query(&self.authorizer, &snapshot, q, self.on_error).ok(),
        }?;
        self.shadow_outcome(live_allow, &verdict, &snapshot.version)
    }
}

/// The audit record of a direct query: UIDs and verdict, never the
/// context (it may carry request content).
fn query_record(
    q: &CedarQuery,
    verdict: &Verdict,
    version: &str,
    started: Instant,
    api: Api,
) -> crate::audit::AuditRecord {
    use crate::decision::{Decision, Outcome};
    let uid = |(ty, id): &(String, String)| format!("{ty}::{id:?}");
    let outcome = if verdict.allow {
        Outcome::Allow
    } else if verdict.errors.is_empty() {
        Outcome::Forbidden(Reason::PolicyDenied)
    } else {
        Outcome::Forbidden(Reason::PolicyError)
    };
    let mut decision = Decision::early(
        uuid::Uuid::new_v4().to_string(),
        outcome,
        version.to_string(),
    );
    decision.action = Some(uid(&q.action));
    decision.resource = Some(uid(&q.resource));
    decision.policies = verdict.policies.clone();
    decision.errors = verdict.errors.clone();
    let mut record = crate::audit::AuditRecord::of(
        &decision,
        &crate::request::HttpRequest::default(),
        started.elapsed(),
    );
    record.api = api.label();
    record.caller = Some(crate::audit::Caller {
        principal: uid(&q.principal),
        tenant: None,
        tier: None,
        authn: "query",
        key_id: None,
    });
    record
}

/// Evaluates one direct query against `snapshot`.
pub fn decide_query(
    authorizer: &Authorizer,
    snapshot: &Snapshot,
    q: &CedarQuery,
    on_error: OnEvaluationError,
) -> Result<Verdict, QueryError> {
    let request = cedar_request(snapshot, q)?;
    let entities =
        match &q.entities {
            None => Cow::Borrowed(&snapshot.entities),
            Some(extra) => {
                let extra = Entities::from_json_value(extra.clone(), Some(&snapshot.schema))
                    .map_err(|e| QueryError {
                        field: "entities".into(),
                        message: e.to_string(),
                    })?;
                let merged = snapshot.entities.iter().chain(extra.iter()).cloned();
                Cow::Owned(
                    Entities::from_entities(merged, Some(&snapshot.schema)).map_err(|e| {
                        QueryError {
                            field: "entities".into(),
                            message: e.to_string(),
                        }
                    })?,
                )
            }
        };
    Ok(evaluate(
        authorizer, snapshot, &request, &entities, on_error,
    ))
}

/// The Cedar request of `q`, typed by the snapshot's schema.
fn cedar_request(snapshot: &Snapshot, q: &CedarQuery) -> Result<Request, QueryError> {
    let uid = |field: &str, (ty, id): &(String, String)| {
        principal::entity_uid(ty, id).map_err(|message| QueryError {
            field: format!("{field}.type"),
            message,
        })
    };
    let principal = uid("principal", &q.principal)?;
    let action = uid("action", &q.action)?;
    let resource = uid("resource", &q.resource)?;
    let context = q
        .context
        .clone()
        .unwrap_or_else(|| Value::Object(Default::default()));
    let context =
        Context::from_json_value(context, Some((&snapshot.schema, &action))).map_err(|e| {
            QueryError {
                field: "context".into(),
                message: e.to_string(),
            }
        })?;
    Request::new(principal, action, resource, context, Some(&snapshot.schema)).map_err(|e| {
        QueryError {
            field: "request".into(),
            message: e.to_string(),
        }
    })
}

impl FromStr for CedarQuery {
    type Err = QueryError;

    /// Parses a JSON query `{principal, action, resource, context?,
    /// entities?}` with UIDs written as `Type::"id"`.
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let value: Value = serde_json::from_str(text).map_err(|e| QueryError {
            field: "query".into(),
            message: e.to_string(),
        })?;
        let field = |name: &str| -> Result<(String, String), QueryError> {
            let s = value
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| QueryError {
                    field: name.into(),
                    message: "missing; write Type::\"id\"".into(),
                })?;
            parse_uid(s).map_err(|message| QueryError {
                field: name.into(),
                message,
            })
        };
        Ok(Self {
            principal: field("principal")?,
            action: field("action")?,
            resource: field("resource")?,
            context: value.get("context").cloned(),
            entities: value.get("entities").cloned(),
        })
    }
}

/// Splits `Type::"id"` into its parts, validating with Cedar's parser.
pub fn parse_uid(text: &str) -> Result<(String, String), String> {
    let uid = EntityUid::from_str(text)
        .map_err(|e| format!("{text:?} is not an entity UID like Type::\"id\": {e}"))?;
    Ok((
        uid.type_name().to_string(),
        uid.id().unescaped().to_string(),
    ))
}
