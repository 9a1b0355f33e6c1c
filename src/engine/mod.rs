//! The one decision core every transport adapter calls.
//!
//! For an HTTP request: canonical path → identity → route → body → Cedar
//! request → policy verdict → [`Decision`]. For a direct Cedar query (the
//! `tollgate.v1` API, `tollgate check`, policy tests): Cedar request → verdict.

mod agents;
pub mod body;
pub mod context;
pub mod decision_cache;
mod guard;
mod mcp;
pub mod model;
pub mod principal;
mod query;
mod quota;
mod usage;

pub use query::{CedarAnswer, CedarQuery, QueryError, decide_query, parse_uid};
pub use quota::{StreamCutoff, UsageError};

use std::sync::Arc;
use std::time::Instant;

use cedar_policy::{Authorizer, Entities, Request};

use crate::config::{Config, ContextConfig, OnEvaluationError};
use crate::decision::{Decision, Outcome, Reason};
use crate::identity::{IdentityChain, Principal, SourceKind};
use crate::metrics::{Api, Metrics};
use crate::path::CanonicalPath;
use crate::policy::evaluate::evaluate;
use crate::policy::{Expectations, PolicyStore, Snapshot};
use crate::quota::QuotaEngine;
use crate::quota::limits::LimitsStore;
use crate::quota::rules::QuotaRule;
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
    let mut contexts = context::probes(&config.context);
    if config.usage != crate::usage::catalog::UsageConfig::default() {
        contexts.extend(context::usage_probes());
    }
    Expectations {
        actions,
        contexts,
        principals,
    }
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
    entity_cache: arc_swap::ArcSwap<EntityCache>,
    quota: Arc<QuotaEngine>,
    rules: Vec<QuotaRule>,
    limits: Arc<LimitsStore>,
    unknown_domain_warning: crate::metrics::Throttle,
    prices: crate::usage::Prices,
    /// The model catalog (`[usage]`), encoders built.
    catalog: crate::usage::catalog::Catalog,
    reservation_ttl: std::time::Duration,
    /// What unsettled reservations cost (`quota.on_*`).
    fates: Fates,
    audit: std::sync::OnceLock<Arc<crate::audit::AuditTrail>>,
    shadow: std::sync::OnceLock<Arc<PolicyStore>>,
    lockout: std::sync::OnceLock<Arc<crate::identity::lockout::Lockout>>,
    mcp: mcp::McpState,
    agents: agents::AgentState,
    /// `[policy] decision_cache`; `None` when off.
    decision_cache: Option<decision_cache::DecisionCache>,
    /// Per admitted request id: where its stream is cut (`on_exceed`).
    stream_cutoffs: moka::sync::Cache<String, quota::StreamCutoff>,
}

/// What reservations that are not settled from usage cost.
#[derive(Debug, Clone, Copy)]
struct Fates {
    on_expiry: crate::quota::reserve::Fate,
    on_disconnect: crate::quota::reserve::DisconnectFate,
    on_upstream_error: crate::quota::reserve::Fate,
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
            entity_cache: arc_swap::ArcSwap::from_pointee(EntityCache::new(String::new())),
            quota: quota.engine,
            rules: config.quota.rules.clone(),
            limits: quota.limits,
            unknown_domain_warning: crate::metrics::Throttle::new(std::time::Duration::from_secs(
                60,
            )),
            prices: config.prices(),
            catalog: crate::usage::catalog::Catalog::build(&config.usage),
            reservation_ttl: std::time::Duration::from_secs(config.quota.reservation_ttl_secs),
            fates: Fates {
                on_expiry: config.quota.on_expiry,
                on_disconnect: config.quota.on_disconnect,
                on_upstream_error: config.quota.on_upstream_error,
            },
            audit: std::sync::OnceLock::new(),
            shadow: std::sync::OnceLock::new(),
            lockout: std::sync::OnceLock::new(),
            mcp: mcp::McpState::new(&config.mcp, &config.identity.jwt_issuers),
            stream_cutoffs: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(
                    config.quota.reservation_ttl_secs.max(1),
                ))
                .build(),
            agents: agents::AgentState::new(&config.agents),
            decision_cache: config
                .policy
                .decision_cache
                .map(|c| decision_cache::DecisionCache::new(c, &config.context)),
        }
    }

    /// Starts the bounded background sweep of reservations past their TTL
    /// (every `interval`, at most 1000 a tick); it ends with the engine.
    pub fn spawn_sweeper(engine: &Arc<Self>, interval: std::time::Duration) {
        let weak = Arc::downgrade(engine);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let Some(engine) = weak.upgrade() else { return };
                if let Err(e) = engine.sweep_reservations(1000).await {
                    tracing::debug!(error = %e, "reservation sweep failed; the next one retries");
                }
            }
        });
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

    /// Sends every later decision to `trail` as well; false if one is
    /// attached already.
    pub fn attach_audit(&self, trail: Arc<crate::audit::AuditTrail>) -> bool {
        self.audit.set(trail).is_ok()
    }

    /// Evaluates every later request against `shadow` too (see
    /// [`crate::policy::shadow`]); false if one is attached already.
    pub fn attach_shadow(&self, shadow: Arc<PolicyStore>) -> bool {
        self.shadow.set(shadow).is_ok()
    }

    /// The shadow policy set, when `policy.shadow_dir` is set.
    pub fn shadow(&self) -> Option<&Arc<PolicyStore>> {
        self.shadow.get()
    }

    /// Guards authentication with `lockout` (`identity.lockout`); false if
    /// one is attached already.
    pub fn attach_lockout(&self, lockout: Arc<crate::identity::lockout::Lockout>) -> bool {
        self.lockout.set(lockout).is_ok()
    }

    /// The attached audit trail.
    pub fn audit(&self) -> Option<&Arc<crate::audit::AuditTrail>> {
        self.audit.get()
    }

    /// Logs and audits a decision an adapter reached without the engine
    /// (a request it could not even read).
    pub fn record_refused(&self, decision: &Decision, request: &HttpRequest) {
        crate::audit::record(decision, std::time::Duration::ZERO);
        self.audit_trail(decision, request, std::time::Duration::ZERO);
    }

    fn audit_trail(
        &self,
        decision: &Decision,
        request: &HttpRequest,
        elapsed: std::time::Duration,
    ) {
        if let Some(trail) = self.audit.get() {
            trail.submit(crate::audit::AuditRecord::of(decision, request, elapsed));
        }
    }

    /// The quota engine.
    pub fn quota(&self) -> &Arc<QuotaEngine> {
        &self.quota
    }

    /// Decides an HTTP request — policy, then quota rules if the policy
    /// allowed — and records the decision log line and metrics. The work is
    /// one `tollgate.decision` span continuing the request's `traceparent`.
    pub async fn decide_http(&self, request: &HttpRequest) -> Decision {
        use tracing::Instrument as _;
        let started = Instant::now();
        let span = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "tollgate.decision",
            otel.kind = "server",
            request_id = %request.request_id,
            decision = tracing::field::Empty,
            reason = tracing::field::Empty,
        );
        let traceparent = request.header("traceparent");
        crate::telemetry::continue_trace(&span, traceparent);
        let mut decision = self
            .decide_http_traced(request)
            .instrument(span.clone())
            .await;
        decision.trace_id = crate::telemetry::trace_id(&span, traceparent);
        span.record("decision", decision.outcome.verdict());
        span.record("reason", decision.outcome.reason().code());
        crate::audit::record(&decision, started.elapsed());
        self.audit_trail(&decision, request, started.elapsed());
        self.metrics.decision(
            Api::ExtAuthz,
            decision.outcome.verdict(),
            decision.outcome.reason().code(),
            started.elapsed().as_secs_f64(),
        );
        decision
    }

    async fn decide_http_traced(&self, request: &HttpRequest) -> Decision {
        use tracing::Instrument as _;
        let snapshot = self.policies.snapshot();
        let early = |outcome| {
            Decision::early(
                request.request_id.clone(),
                outcome,
                snapshot.version.clone(),
            )
        };
        // The host feeds `context.http.host`: a policy on it must never see
        // one of several values.
        let host = crate::request::check_host(request);
        let canonical = crate::path::canonicalize(&request.raw_path);
        let mcp_index = canonical
            .as_ref()
            .ok()
            .and_then(|p| self.mcp_server(&p.path));
        let mut decision = match (canonical, mcp_index) {
            _ if host.is_err() => early(Outcome::Invalid(Reason::AmbiguousHost)),
            (Err(_), _) => early(Outcome::Invalid(Reason::AmbiguousPath)),
            // An MCP endpoint: the JSON-RPC body says what is asked.
            (Ok(_), Some(index)) => self.decide_mcp(&snapshot, request, index).await,
            (Ok(path), None) => {
                let matched = self.routes.find(&request.method, &path);
                let identity =
                    tracing::info_span!(target: crate::telemetry::TARGET, "tollgate.identity");
                match self
                    .guarded_authenticate(request, matched.as_ref())
                    .instrument(identity)
                    .await
                {
                    Ok(caller) => match self.agent_hop(request, caller).await {
                        Ok(hop) => {
                            let mut d = self.decide_with(
                                &snapshot,
                                request,
                                &path,
                                matched,
                                hop.principal.clone(),
                                &hop.facts,
                            );
                            if d.outcome.is_allow() {
                                let claims = hop.claims.as_ref();
                                self.decide_agent_parts(
                                    &snapshot,
                                    request,
                                    &hop.principal,
                                    claims,
                                    &mut d,
                                );
                            }
                            d
                        }
                        Err(outcome) => early(outcome),
                    },
                    Err((outcome, quota)) => {
                        let mut d = early(outcome);
                        d.quota = quota;
                        d
                    }
                }
            }
        };
        if decision.outcome.is_allow() {
            let quota = tracing::info_span!(target: crate::telemetry::TARGET, "tollgate.quota");
            self.charge_rules(&mut decision, request)
                .instrument(quota)
                .await;
        }
        // Shared only once the request is finally allowed: an attempt the
        // quota refused must not leave a record that its retry (same
        // request id, kept first) would find with an earlier expiry.
        if decision.outcome.is_allow() {
            self.share_tool_call_check(&request.request_id).await;
        }
        decision
    }

    fn decide_with(
        &self,
        snapshot: &Snapshot,
        request: &HttpRequest,
        path: &CanonicalPath,
        matched: Option<RouteMatch<'_>>,
        principal: Principal,
        agent: &crate::agents::AgentFacts,
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
        decision.agent = agent.clone();

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
        if let Err(reason) = model::check_single(
            request,
            path,
            matched.as_ref().map_or(&no_params, |m| &m.params),
            body.model.as_deref(),
            &self.context.model_headers,
        ) {
            return decision.with(Outcome::Invalid(reason));
        }
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
            principal::action_uid(&action),
            principal::entity_uid(&template.type_name, &resource_id),
        );
        let (Ok(principal_uid), Ok(action_uid), Ok(resource_uid)) = uids else {
            return decision.with(Outcome::Invalid(Reason::MissingResource));
        };
        // check_single made sure the places that name a model agree.
        decision.model = body.model.clone().or_else(|| {
            vars.path_params
                .iter()
                .find(|(name, _)| name == "model")
                .map(|(_, v)| v.clone())
        });
        decision.action = Some(action_uid.to_string());
        decision.resource = Some(resource_uid.to_string());
        if self.catalog.is_configured() || self.rules.iter().any(|r| r.cost.is_usage()) {
            let estimate = self.estimate(request, &body, decision.model.as_deref());
            let exceeded = self.context_window_exceeded(&estimate);
            decision.estimate = Some(estimate);
            if exceeded {
                return decision.with(Outcome::Invalid(Reason::ContextWindowExceeded));
            }
        }
        let usage_facts = self
            .catalog
            .is_configured()
            .then(|| self.usage_facts(decision.estimate.as_ref()))
            .flatten();

        let _policy =
            tracing::info_span!(target: crate::telemetry::TARGET, "tollgate.policy").entered();
        let inputs = context::ContextInputs {
            request,
            path,
            body: &body,
            route_name: matched.as_ref().map(|m| m.route.name.as_str()),
            route_tenant: hints.tenant.as_deref(),
            authn: principal.kind.authn(),
            usage: usage_facts.as_ref(),
        };
        // The shadow comparison needs the evaluated request: no cache then.
        let cached = match &self.decision_cache {
            Some(cache) if self.shadow.get().is_none() => {
                cache.generation(snapshot, &self.context).map(|generation| {
                    let key = decision_cache::Key {
                        principal: principal.clone(),
                        action: action_uid.to_string(),
                        resource: resource_uid.to_string(),
                        context: decision_cache::project(
                            &self.context,
                            &inputs,
                            generation.wanted(),
                        ),
                        hop: (agent.agent.clone(), agent.via.clone()),
                    };
                    (generation, key)
                })
            }
            _ => None,
        };
        if let Some((generation, key)) = &cached {
            if let Some(verdict) = generation.get(key) {
                self.metrics.decision_cache(true);
                return self.apply_verdict(decision, &verdict, &principal);
            }
            self.metrics.decision_cache(false);
        }
        let cedar_context = context::build_cedar(&self.context, &inputs);
        let cedar = cedar_context
            .and_then(|ctx| Self::with_agent_facts(ctx, agent))
            .and_then(|ctx| {
                Request::new(principal_uid, action_uid, resource_uid, ctx, None)
                    .map_err(|e| e.to_string())
            })
            .and_then(|req| Ok((req, self.entities_with(snapshot, &principal)?)));
        // No per-request schema validation: the loader checked that the
        // schema accepts every context and principal shape Tollgate builds
        // ([`expectations`]), and validating again here would cost more than
        // the policy evaluation itself.
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
        decision.shadow = self.shadow_http(&cedar_request, &principal, verdict.allow);
        if let Some((generation, key)) = cached {
            generation.insert(key, Arc::new(verdict.clone()));
        }
        self.apply_verdict(decision, &verdict, &principal)
    }

    /// `decision` with the policy verdict's outcome, reasons and errors.
    fn apply_verdict(
        &self,
        mut decision: Decision,
        verdict: &crate::policy::evaluate::Verdict,
        principal: &Principal,
    ) -> Decision {
        decision.policies.clone_from(&verdict.policies);
        decision.errors.clone_from(&verdict.errors);
        decision.outcome = self.outcome_of(verdict.allow, !verdict.errors.is_empty(), principal);
        decision
    }

    /// The outcome of a policy verdict for `principal`.
    fn outcome_of(&self, allow: bool, errors: bool, principal: &Principal) -> Outcome {
        if allow {
            Outcome::Allow
        } else if errors && self.on_error == OnEvaluationError::Deny {
            Outcome::Forbidden(Reason::PolicyError)
        } else if principal.kind == crate::identity::PrincipalKind::Anonymous {
            // With a credential this might have been allowed: ask for one.
            Outcome::Unauthenticated(Reason::MissingCredential)
        } else {
            Outcome::Forbidden(Reason::PolicyDenied)
        }
    }

    /// Authenticates the caller of an API Tollgate serves itself (the AuthZEN
    /// listener) with the `allowed` identity sources; no credential is the
    /// anonymous principal.
    pub async fn authenticate_caller(
        &self,
        request: &HttpRequest,
        allowed: &[SourceKind],
    ) -> Result<Principal, Reason> {
        self.identity.authenticate(request, Some(allowed)).await
    }

    /// Authenticates the caller with the sources the route accepts (the
    /// gateway's `identity` hint, else the route's list, else all).
    pub(super) async fn authenticate(
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
        let principal = self
            .identity
            .authenticate(request, allowed.as_deref())
            .await
            .map_err(|reason| match reason {
                Reason::Unavailable => Outcome::Unavailable(reason),
                Reason::SourceNotAllowed => Outcome::Forbidden(reason),
                _ => Outcome::Unauthenticated(reason),
            })?;
        // What the credential says is passed on in headers (principal,
        // tenant, tier): a value that is not a valid HTTP field value would
        // be refused by the gateway after we allowed, or inject a header.
        if !crate::respond::principal_is_expressible(&principal) {
            tracing::info!(request_id = %request.request_id, "credential carries a value that cannot be a header value");
            return Err(Outcome::Unauthenticated(Reason::InvalidClaim));
        }
        Ok(principal)
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
        let mut cache = self.entity_cache.load_full();
        if cache.version != snapshot.version {
            // A reload: the old snapshot's entries can never be asked again.
            cache = Arc::new(EntityCache::new(snapshot.version.clone()));
            self.entity_cache.store(cache.clone());
        }
        if let Some(hit) = cache.by_principal.get(principal) {
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
        cache
            .by_principal
            .insert(principal.clone(), entities.clone());
        Ok(entities)
    }
}

impl Engine {
    /// Evaluates the request the live set just decided against the shadow
    /// set; `Some` when the two disagree (counted here).
    fn shadow_http(
        &self,
        request: &Request,
        principal: &Principal,
        live_allow: bool,
    ) -> Option<crate::policy::shadow::ShadowVerdict> {
        let shadow = self.shadow.get()?;
        let _span = tracing::info_span!(target: crate::telemetry::TARGET, "tollgate.shadow_policy")
            .entered();
        let snapshot = shadow.snapshot();
        let entities = match self.entities_with(&snapshot, principal) {
            Ok(entities) => entities,
            Err(error) => {
                tracing::warn!(%error, "shadow policy set cannot take this principal; not compared");
                return None;
            }
        };
        let verdict = evaluate(
            &self.authorizer,
            &snapshot,
            request,
            &entities,
            self.on_error,
        );
        self.shadow_outcome(live_allow, &verdict, &snapshot.version)
    }

    fn shadow_outcome(
        &self,
        live_allow: bool,
        verdict: &crate::policy::evaluate::Verdict,
        version: &str,
    ) -> Option<crate::policy::shadow::ShadowVerdict> {
        let disagreement = crate::policy::shadow::compare(live_allow, verdict, version)?;
        self.metrics.shadow_disagreement(disagreement.direction);
        Some(disagreement)
    }
}

/// The entity sets built for principals under one snapshot version: looked
/// up by the principal alone (no key to build per request), replaced whole
/// when the version changes.
struct EntityCache {
    version: String,
    by_principal: moka::sync::Cache<Principal, Arc<Entities>>,
}

impl EntityCache {
    fn new(version: String) -> Self {
        Self {
            version,
            by_principal: moka::sync::Cache::builder()
                .max_capacity(10_000)
                .time_to_idle(std::time::Duration::from_secs(300))
                .build(),
        }
    }
}

impl Decision {
    fn with(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }
}
