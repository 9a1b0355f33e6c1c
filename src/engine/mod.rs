//! The one decision core every transport adapter calls.
//!
//! For an HTTP request: canonical path → identity → route → body → Cedar
//! request → policy verdict → [`Decision`]. For a direct Cedar query (the
//! `tollgate.v1` API, `tollgate check`, policy tests): Cedar request → verdict.

pub mod body;
pub mod context;
pub mod principal;

use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use cedar_policy::{Authorizer, Context, Entities, EntityUid, Request};
use serde_json::Value;

use crate::config::{Config, ContextConfig, OnEvaluationError};
use crate::decision::{Decision, Outcome, QuotaReport, Reason};
use crate::identity::{IdentityChain, Principal, SourceKind};
use crate::metrics::{Api, Metrics};
use crate::path::CanonicalPath;
use crate::policy::evaluate::{Verdict, evaluate};
use crate::policy::{Expectations, PolicyStore, Snapshot};
use crate::quota::limits::LimitsStore;
use crate::quota::rls::{RlsAnswer, RlsRequest};
use crate::quota::rules::{Planned, QuotaRule};
use crate::quota::{FailureMode, QuotaDecision, QuotaEngine};
use crate::request::HttpRequest;
use crate::routes::{ResourceTemplate, RouteMatch, RouteTable, TemplateVars};

/// What the policy loader must check for this configuration.
pub fn expectations(config: &Config, routes: &RouteTable) -> Expectations {
    let mut actions: Vec<String> = routes.actions().map(str::to_string).collect();
    actions.sort();
    actions.dedup();
    let principals = principal::probes()
        .into_iter()
        .filter(|e| {
            let ty = e.uid().type_name().to_string();
            match ty.as_str() {
                "ApiKey" => config.identity.api_keys_file.is_some(),
                "Service" => config.identity.mtls,
                _ => true,
            }
        })
        .collect();
    Expectations {
        actions,
        contexts: context::probes(&config.context),
        principals,
    }
}

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

/// The decision core.
pub struct Engine {
    policies: Arc<PolicyStore>,
    identity: IdentityChain,
    routes: RouteTable,
    context: ContextConfig,
    on_error: OnEvaluationError,
    authorizer: Authorizer,
    metrics: Arc<Metrics>,
    entity_cache: moka::sync::Cache<(String, Principal), Arc<Entities>>,
    quota: Arc<QuotaEngine>,
    rules: Vec<QuotaRule>,
    limits: Arc<LimitsStore>,
}

/// The quota side of the engine: the store engine and the limits.
pub struct QuotaParts {
    pub engine: Arc<QuotaEngine>,
    pub limits: Arc<LimitsStore>,
}

impl Engine {
    /// Assembles the engine from its parts.
    pub fn new(
        config: &Config,
        routes: RouteTable,
        policies: Arc<PolicyStore>,
        identity: IdentityChain,
        metrics: Arc<Metrics>,
        quota: QuotaParts,
    ) -> Self {
        Self {
            policies,
            identity,
            routes,
            context: config.context.clone(),
            on_error: config.policy.on_evaluation_error,
            authorizer: Authorizer::new(),
            metrics,
            entity_cache: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(std::time::Duration::from_secs(300))
                .build(),
            quota: quota.engine,
            rules: config.quota.rules.clone(),
            limits: quota.limits,
        }
    }

    /// The policy store behind this engine.
    pub fn policies(&self) -> &Arc<PolicyStore> {
        &self.policies
    }

    /// The metrics this engine records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The live rate limit service limits.
    pub fn limits(&self) -> &Arc<LimitsStore> {
        &self.limits
    }

    /// The quota engine.
    pub fn quota(&self) -> &Arc<QuotaEngine> {
        &self.quota
    }

    /// Decides an HTTP request — policy, then quota rules if the policy
    /// allowed — and records the decision log line and metrics.
    pub async fn decide_http(&self, request: &HttpRequest) -> Decision {
        let started = Instant::now();
        let snapshot = self.policies.snapshot();
        let early = |outcome| {
            Decision::early(
                request.request_id.clone(),
                outcome,
                snapshot.version.clone(),
            )
        };
        let mut decision = match crate::path::canonicalize(&request.raw_path) {
            Err(_) => early(Outcome::Invalid(Reason::AmbiguousPath)),
            Ok(path) => {
                let matched = self.routes.find(&request.method, &path);
                match self.authenticate(request, matched.as_ref()).await {
                    Ok(principal) => {
                        self.decide_with(&snapshot, request, &path, matched, principal)
                    }
                    Err(outcome) => early(outcome),
                }
            }
        };
        if decision.outcome.is_allow() {
            self.charge_rules(&mut decision).await;
        }
        crate::audit::record(&decision, started.elapsed());
        self.metrics.decision(
            Api::ExtAuthz,
            decision.outcome.verdict(),
            decision.outcome.reason().code(),
            started.elapsed().as_secs_f64(),
        );
        decision
    }

    fn decide_with(
        &self,
        snapshot: &Snapshot,
        request: &HttpRequest,
        path: &CanonicalPath,
        matched: Option<RouteMatch<'_>>,
        principal: Principal,
    ) -> Decision {
        let early = |outcome| {
            Decision::early(
                request.request_id.clone(),
                outcome,
                snapshot.version.clone(),
            )
        };
        let mut decision = early(Outcome::Forbidden(Reason::UnknownRoute));
        decision.principal = Some(principal.clone());

        let hints = &request.route_hints;
        let action = hints
            .action
            .clone()
            .or_else(|| matched.as_ref().map(|m| m.route.action.clone()));
        let hinted_resource = match hints.resource.as_deref().map(ResourceTemplate::parse) {
            Some(Ok(t)) => Some(t),
            Some(Err(_)) => return decision.with(Outcome::Unavailable(Reason::Unavailable)),
            None => None,
        };
        let resource_template = hinted_resource
            .as_ref()
            .or_else(|| matched.as_ref().map(|m| &m.route.resource));
        let (Some(action), Some(template)) = (action, resource_template) else {
            return decision;
        };

        let body = match body::inspect(request, self.context.max_body_bytes) {
            Ok(b) => b,
            Err(reason) => return decision.with(Outcome::Invalid(reason)),
        };
        let no_params = Vec::new();
        let vars = TemplateVars {
            path_params: matched.as_ref().map_or(&no_params, |m| &m.params),
            body_model: body.model.as_deref(),
            route_tenant: hints.tenant.as_deref(),
        };
        let Ok(resource_id) = template.render(&vars) else {
            return decision.with(Outcome::Invalid(Reason::MissingResource));
        };
        let uids = (
            principal::uid(&principal),
            principal::entity_uid("Action", &action),
            principal::entity_uid(&template.type_name, &resource_id),
        );
        let (Ok(principal_uid), Ok(action_uid), Ok(resource_uid)) = uids else {
            return decision.with(Outcome::Invalid(Reason::MissingResource));
        };
        decision.action = Some(action_uid.to_string());
        decision.resource = Some(resource_uid.to_string());

        let context_json = context::build(
            &self.context,
            &context::ContextInputs {
                request,
                path,
                body: &body,
                route_name: matched.as_ref().map(|m| m.route.name.as_str()),
                route_tenant: hints.tenant.as_deref(),
                authn: principal.kind.authn(),
            },
        );
        let cedar = build_request(principal_uid, action_uid, resource_uid, &context_json)
            .and_then(|req| Ok((req, self.entities_with(snapshot, &principal)?)));
        let (cedar_request, entities) = match cedar {
            Ok(pair) => pair,
            Err(message) => {
                // The loader checked the schema accepts what we build, so this
                // is a request the schema rejects (an undeclared action from a
                // context extension, say): deny, and say why in the log.
                tracing::warn!(request_id = %request.request_id, error = %message, "request does not fit the schema");
                return decision.with(Outcome::Forbidden(Reason::PolicyError));
            }
        };
        let verdict = evaluate(
            &self.authorizer,
            snapshot,
            &cedar_request,
            &entities,
            self.on_error,
        );
        decision.policies = verdict.policies;
        decision.errors = verdict.errors;
        decision.outcome = if verdict.allow {
            Outcome::Allow
        } else if !decision.errors.is_empty() && self.on_error == OnEvaluationError::Deny {
            Outcome::Forbidden(Reason::PolicyError)
        } else if principal.kind == crate::identity::PrincipalKind::Anonymous {
            // With a credential this might have been allowed: ask for one.
            Outcome::Unauthenticated(Reason::MissingCredential)
        } else {
            Outcome::Forbidden(Reason::PolicyDenied)
        };
        decision
    }

    /// Authenticates the caller with the sources the route accepts (the
    /// gateway's `identity` hint, else the route's list, else all).
    async fn authenticate(
        &self,
        request: &HttpRequest,
        matched: Option<&RouteMatch<'_>>,
    ) -> Result<Principal, Outcome> {
        let from_hint: Option<Vec<SourceKind>> = request
            .route_hints
            .identity
            .as_deref()
            .map(|list| list.split(',').filter_map(SourceKind::parse).collect());
        let allowed = from_hint.or_else(|| matched.and_then(|m| m.route.identity.clone()));
        self.identity
            .authenticate(request, allowed.as_deref())
            .await
            .map_err(|reason| match reason {
                Reason::Unavailable => Outcome::Unavailable(reason),
                _ => Outcome::Unauthenticated(reason),
            })
    }

    /// Charges the quota rules that apply to an allowed decision.
    async fn charge_rules(&self, decision: &mut Decision) {
        let (Some(principal), Some(action), Some(resource)) =
            (&decision.principal, &decision.action, &decision.resource)
        else {
            return;
        };
        let action_id = uid_id(action);
        let resource_id = uid_id(resource);
        let plans: Vec<Planned> = self
            .rules
            .iter()
            .filter_map(|r| r.plan(principal, &action_id, &resource_id))
            .collect();
        if plans.is_empty() {
            return;
        }
        match self.quota.charge(&plans).await {
            QuotaDecision::Allowed { usage } => {
                decision.quota = plans
                    .iter()
                    .zip(&usage)
                    .filter(|(p, _)| !p.charge.shadow)
                    .min_by_key(|(p, u)| u.remaining(p.charge.limit))
                    .map(|(p, u)| report(p, u));
            }
            QuotaDecision::OverLimit { usage, blocking } => {
                decision.quota = plans
                    .get(blocking)
                    .zip(usage.get(blocking))
                    .map(|(p, u)| report(p, u));
                decision.outcome = Outcome::OverQuota(Reason::OverQuota);
            }
            QuotaDecision::Failed { error, mode } => {
                tracing::warn!(request_id = %decision.request_id, %error, ?mode, "quota store failed");
                self.metrics.quota_store_error(self.quota.store().kind());
                decision.outcome = match mode {
                    FailureMode::Allow => Outcome::Allow,
                    FailureMode::Deny => Outcome::Unavailable(Reason::QuotaUnavailable),
                    FailureMode::Gateway => Outcome::Defer(Reason::QuotaUnavailable),
                };
            }
        }
    }

    /// Decides an Envoy rate limit service request.
    pub async fn should_rate_limit(&self, request: &RlsRequest) -> RlsAnswer {
        let started = Instant::now();
        let limits = self.limits.current();
        let answer = crate::quota::rls::decide(&limits, &self.quota, request).await;
        if answer.store_failed {
            self.metrics.quota_store_error(self.quota.store().kind());
        }
        let outcome = if answer.defer {
            "defer"
        } else if answer.over {
            "over_limit"
        } else {
            "ok"
        };
        let shadow_over = answer.statuses.iter().filter(|s| s.shadow_over).count();
        tracing::info!(
            target: "tollgate::decision",
            api = "ratelimit",
            domain = %request.domain,
            descriptors = request.descriptors.len(),
            decision = outcome,
            shadow_over,
            store_failed = answer.store_failed,
            latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
            "rate limit decision"
        );
        self.metrics
            .rate_limit(outcome, shadow_over, started.elapsed().as_secs_f64());
        answer
    }

    /// Decides direct Cedar queries against one snapshot. A malformed query
    /// fails the whole batch, with its index.
    pub fn decide_queries(
        &self,
        queries: &[CedarQuery],
    ) -> Result<Vec<CedarAnswer>, (usize, QueryError)> {
        let snapshot = self.policies.snapshot();
        let mut answers = Vec::with_capacity(queries.len());
        for (i, q) in queries.iter().enumerate() {
            let started = Instant::now();
            let verdict =
                decide_query(&self.authorizer, &snapshot, q, self.on_error).map_err(|e| (i, e))?;
            tracing::info!(
                target: "tollgate::decision",
                api = "decision_api",
                principal = %format!("{}::{:?}", q.principal.0, q.principal.1),
                action = %format!("{}::{:?}", q.action.0, q.action.1),
                resource = %format!("{}::{:?}", q.resource.0, q.resource.1),
                decision = if verdict.allow { "allow" } else { "deny" },
                policies = %verdict.policies.join(","),
                policy_version = %snapshot.version,
                "decision"
            );
            let (outcome, reason) = if verdict.allow {
                ("allow", Reason::Allowed.code())
            } else if verdict.errors.is_empty() {
                ("deny", Reason::PolicyDenied.code())
            } else {
                ("deny", Reason::PolicyError.code())
            };
            self.metrics.decision(
                Api::DecisionApi,
                outcome,
                reason,
                started.elapsed().as_secs_f64(),
            );
            answers.push(CedarAnswer {
                verdict,
                policy_version: snapshot.version.clone(),
            });
        }
        Ok(answers)
    }
}

impl Engine {
    /// The snapshot's entities plus the principal's, unless the entities file
    /// already defines the principal. Cached per snapshot version and
    /// principal: callers repeat, and rebuilding the entity hierarchy costs
    /// more than evaluating the policies.
    fn entities_with(
        &self,
        snapshot: &Snapshot,
        principal: &Principal,
    ) -> Result<Arc<Entities>, String> {
        let key = (snapshot.version.clone(), principal.clone());
        if let Some(hit) = self.entity_cache.get(&key) {
            return Ok(hit);
        }
        let uid = principal::uid(principal)?;
        let entities = if snapshot.entities.get(&uid).is_some() {
            snapshot.entities.clone()
        } else {
            let entity = principal::entity(principal)?;
            snapshot
                .entities
                .clone()
                .add_entities([entity], Some(&snapshot.schema))
                .map_err(|e| e.to_string())?
        };
        let entities = Arc::new(entities);
        self.entity_cache.insert(key, entities.clone());
        Ok(entities)
    }
}

/// The id of a `Type::"id"` string.
fn uid_id(uid: &str) -> String {
    parse_uid(uid).map(|(_, id)| id).unwrap_or_default()
}

fn report(plan: &Planned, usage: &crate::quota::Usage) -> QuotaReport {
    QuotaReport {
        rule: plan.label.clone(),
        limit: plan.charge.limit,
        remaining: usage.remaining(plan.charge.limit),
        reset: usage.reset,
        unit_secs: plan.charge.unit.millis() / 1000,
    }
}

impl Decision {
    fn with(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}

/// Builds the Cedar request for an HTTP request. No per-request schema
/// validation: the loader checked that the schema accepts every context and
/// principal shape Tollgate builds ([`expectations`]), and validating again
/// here would cost more than the policy evaluation itself.
fn build_request(
    principal: EntityUid,
    action: EntityUid,
    resource: EntityUid,
    context: &Value,
) -> Result<Request, String> {
    let context = context::to_cedar(context)?;
    Request::new(principal, action, resource, context, None).map_err(|e| e.to_string())
}

/// Evaluates one direct query against `snapshot`.
pub fn decide_query(
    authorizer: &Authorizer,
    snapshot: &Snapshot,
    q: &CedarQuery,
    on_error: OnEvaluationError,
) -> Result<Verdict, QueryError> {
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
    let request = Request::new(principal, action, resource, context, Some(&snapshot.schema))
        .map_err(|e| QueryError {
            field: "request".into(),
            message: e.to_string(),
        })?;
    let entities =
        match &q.entities {
            None => snapshot.entities.clone(),
            Some(extra) => {
                let extra = Entities::from_json_value(extra.clone(), Some(&snapshot.schema))
                    .map_err(|e| QueryError {
                        field: "entities".into(),
                        message: e.to_string(),
                    })?;
                let merged = snapshot.entities.iter().chain(extra.iter()).cloned();
                Entities::from_entities(merged, Some(&snapshot.schema)).map_err(|e| QueryError {
                    field: "entities".into(),
                    message: e.to_string(),
                })?
            }
        };
    Ok(evaluate(
        authorizer, snapshot, &request, &entities, on_error,
    ))
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
