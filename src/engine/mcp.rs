//! Deciding a request to an MCP endpoint: identity → scopes → the JSON-RPC
//! request (headers agreeing with the body) → Cedar action, resource and
//! typed `context.input` → policy. An allowed `tools/list` leaves a note so
//! that its answer can be filtered ([`Engine::tools_list_filter`]).

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use cedar_policy::{Context, EntityId, EntityTypeName, EntityUid, Request, RequestBuilder};
use serde_json::{Value, json};

use super::Engine;
use crate::agents::caller_context::Claims;
use crate::decision::{Decision, Outcome, Reason};
use crate::identity::{Principal, PrincipalKind};
use crate::mcp::envoy_metadata;
use crate::mcp::request::{self as mcp_request, HEADERS_REQUIRED_FROM, McpError, McpRequest};
use crate::mcp::typing::{self, ToolTypes};
use crate::mcp::{McpConfig, McpFacts, McpServerConfig, Permit};
use crate::policy::Snapshot;
use crate::policy::evaluate::evaluate;
use crate::request::HttpRequest;

/// Input types by namespace, and the policy version they were read from.
type TypesByVersion = Option<(String, Arc<HashMap<String, ToolTypes>>)>;

/// The MCP side of the engine.
pub struct McpState {
    config: McpConfig,
    /// Input types per namespace, for one policy version.
    types: Mutex<TypesByVersion>,
    /// Allowed `tools/list` requests waiting for their answer, by request id.
    lists: moka::sync::Cache<String, PendingList>,
    /// `iss` of the JWT issuers configured with `relaxed_audience`.
    relaxed_issuers: std::collections::HashSet<String>,
}

/// An allowed `tools/list` whose answer is to be filtered.
#[derive(Clone)]
struct PendingList {
    principal: Principal,
    server: usize,
}

impl McpState {
    /// From `[mcp]` and the JWT issuers (for their `relaxed_audience`).
    pub fn new(config: &McpConfig, issuers: &[crate::identity::jwt::IssuerConfig]) -> Self {
        Self {
            relaxed_issuers: issuers
                .iter()
                .filter(|i| i.relaxed_audience)
                .map(|i| i.issuer.clone())
                .collect(),
            config: config.clone(),
            types: Mutex::new(None),
            lists: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(std::time::Duration::from_secs(
                    config.list_filter_ttl_secs.max(1),
                ))
                .build(),
        }
    }

    fn types(&self, snapshot: &Snapshot) -> Arc<HashMap<String, ToolTypes>> {
        let mut cached = match self.types.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((version, types)) = cached.as_ref()
            && *version == snapshot.version
        {
            return types.clone();
        }
        let mut by_ns = HashMap::new();
        for s in &self.config.servers {
            by_ns.entry(s.namespace.clone()).or_insert_with(|| {
                ToolTypes::from_schema_text(&snapshot.schema_text, &s.namespace)
            });
        }
        let types = Arc::new(by_ns);
        *cached = Some((snapshot.version.clone(), types.clone()));
        types
    }
}

fn uid_in(namespace: &str, ty: &str, id: &str) -> Result<EntityUid, String> {
    let name =
        EntityTypeName::from_str(&format!("{namespace}::{ty}")).map_err(|e| e.to_string())?;
    Ok(EntityUid::from_type_name_and_id(name, EntityId::new(id)))
}

fn refused(e: &McpError) -> Outcome {
    Outcome::Invalid(match e {
        McpError::Malformed(_) | McpError::MethodCase(_) => Reason::MalformedMcp,
        McpError::Batch(_) => Reason::McpBatchRefused,
        McpError::HeaderMismatch(_) => Reason::McpHeaderMismatch,
        McpError::BadToolName => Reason::InvalidToolName,
        McpError::BadArguments(_) => Reason::InvalidArguments,
    })
}

impl Engine {
    /// The MCP endpoint at `path`, if any.
    pub(super) fn mcp_server(&self, path: &str) -> Option<usize> {
        self.mcp.config.servers.iter().position(|s| s.path == path)
    }

    /// Whether a raw `:path` (with query) is an MCP endpoint.
    pub fn is_mcp_path(&self, raw_path: &str) -> bool {
        crate::path::canonicalize(raw_path)
            .ok()
            .and_then(|p| self.mcp_server(&p.path))
            .is_some()
    }

    /// The MCP configuration (for the admin listener's metadata documents).
    pub fn mcp_config(&self) -> &McpConfig {
        &self.mcp.config
    }

    /// Decides a request to MCP endpoint `index`.
    pub(super) async fn decide_mcp(
        &self,
        snapshot: &Snapshot,
        request: &HttpRequest,
        index: usize,
    ) -> Decision {
        let Some(server) = self.mcp.config.servers.get(index) else {
            return Decision::early(
                request.request_id.clone(),
                Outcome::Unavailable(Reason::Unavailable),
                snapshot.version.clone(),
            );
        };
        let mut decision = Decision::early(
            request.request_id.clone(),
            Outcome::Forbidden(Reason::PolicyDenied),
            snapshot.version.clone(),
        );
        let mut facts = McpFacts {
            id: Value::Null,
            resource_metadata: server.metadata_url(),
            scopes: server.scopes.clone(),
            server: uid_in(&server.namespace, "McpServer", &server.server)
                .ok()
                .map(|u| u.to_string()),
            ..McpFacts::default()
        };
        let principal = match self
            .identity
            .authenticate(request, server.identity.as_deref())
            .await
        {
            Ok(p) if !crate::respond::principal_is_expressible(&p) => {
                Err(Outcome::Unauthenticated(Reason::InvalidClaim))
            }
            Ok(p) => self.check_audience(request, server, &p).map(|()| p),
            Err(Reason::Unavailable) => Err(Outcome::Unavailable(Reason::Unavailable)),
            Err(r) => Err(Outcome::Unauthenticated(r)),
        };
        // The runtime (mTLS) presenting a caller context is decided as the
        // original caller, with `context.agent`: the same hop as on an HTTP
        // route (verification, use count, then the tool binding below).
        let hop = match principal {
            Ok(caller) => self.agent_hop(request, caller).await,
            Err(outcome) => Err(outcome),
        };
        let outcome = match hop {
            Ok(hop) => {
                decision.principal = Some(hop.principal.clone());
                decision.agent = hop.facts;
                self.mcp_verdict(
                    snapshot,
                    request,
                    server,
                    index,
                    (&hop.principal, hop.claims.as_ref()),
                    &mut decision,
                    &mut facts,
                )
            }
            Err(outcome) => outcome,
        };
        decision.outcome = outcome;
        decision.mcp = Some(facts);
        decision
    }

    #[allow(clippy::too_many_arguments)]
    fn mcp_verdict(
        &self,
        snapshot: &Snapshot,
        request: &HttpRequest,
        server: &McpServerConfig,
        index: usize,
        (principal, hop): (&Principal, Option<&Claims>),
        decision: &mut Decision,
        facts: &mut McpFacts,
    ) -> Outcome {
        let anonymous = principal.kind == PrincipalKind::Anonymous;
        // GET opens the server's event stream and DELETE ends a session:
        // both are session-level, decided as `initialize`.
        let (method, context, mcp) = match request.method.as_str() {
            "GET" | "DELETE" => ("initialize".to_string(), json!({}), None),
            "POST" => {
                let parsed = match self.read_mcp(request) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::info!(request_id = %request.request_id, error = %e, "MCP request refused");
                        return refused(&e);
                    }
                };
                facts.id = parsed.id.clone().unwrap_or(Value::Null);
                facts.method = Some(parsed.method.clone());
                (parsed.method.clone(), json!({}), Some(parsed))
            }
            _ => return Outcome::Invalid(Reason::MalformedMcp),
        };
        // After reading the body, so the refusal carries the request's id.
        // A tool's own scopes join the endpoint's: the challenge names every
        // scope the operation needs.
        if let Some(r) = &mcp
            && r.method == "tools/call"
            && let Some(extra) = r.name.as_ref().and_then(|n| server.tool_scopes.get(n))
        {
            for scope in extra {
                if !facts.scopes.contains(scope) {
                    facts.scopes.push(scope.clone());
                }
            }
        }
        if !anonymous && !facts.scopes.iter().all(|s| principal.scopes.contains(s)) {
            return Outcome::Forbidden(Reason::InsufficientScope);
        }
        let mut context = context;
        let mut action = method.clone();
        if let Some(r) = &mcp {
            if method == "ping" || method.starts_with("notifications/") {
                let permit = if method == "ping" {
                    self.mcp.config.ping
                } else {
                    self.mcp.config.notifications
                };
                return match permit {
                    Permit::Allow => Outcome::Allow,
                    Permit::Deny => Outcome::Forbidden(Reason::PolicyDenied),
                };
            }
            let types = self.mcp.types(snapshot);
            let Some(declared) = types.get(&server.namespace) else {
                return Outcome::Forbidden(Reason::UnknownTool);
            };
            match method.as_str() {
                "tools/call" => {
                    let name = r.name.clone().unwrap_or_default();
                    facts.tool = Some(name.clone());
                    match self.audit().and_then(|t| t.hash_key()) {
                        Some(key) => {
                            facts.argument_hmac_sha256 =
                                crate::mcp::argument_hashes(&r.arguments, Some(key));
                        }
                        None => {
                            facts.argument_sha256 = crate::mcp::argument_hashes(&r.arguments, None);
                        }
                    }
                    let Some(ty) = declared.tools.get(&name) else {
                        return Outcome::Forbidden(Reason::UnknownTool);
                    };
                    if request.body.is_none() && !envoy_metadata::flat_input(ty) {
                        tracing::info!(request_id = %request.request_id, tool = %name, "tool has nested arguments, which Envoy's MCP filter metadata cannot carry; send the body to ext_authz");
                        return Outcome::Invalid(Reason::InvalidArguments);
                    }
                    let required = r
                        .protocol_version
                        .as_deref()
                        .is_some_and(|v| v >= HEADERS_REQUIRED_FROM);
                    if let Err(e) =
                        typing::check_param_headers(ty, &r.arguments, &r.param_headers, required)
                    {
                        tracing::info!(request_id = %request.request_id, error = %e, "MCP header mismatch");
                        return Outcome::Invalid(Reason::McpHeaderMismatch);
                    }
                    match typing::convert(&Value::Object(r.arguments.clone()), ty, "") {
                        Ok(input) => context = json!({ "input": input }),
                        Err(e) => {
                            tracing::info!(request_id = %request.request_id, tool = %name, error = %e, "tool arguments refused");
                            return Outcome::Invalid(Reason::InvalidArguments);
                        }
                    }
                    action = name;
                }
                "resources/read" | "resources/subscribe" | "resources/unsubscribe" => {
                    context = json!({ "uri": r.uri.clone().unwrap_or_default() });
                }
                "prompts/get" => context = json!({ "name": r.name.clone().unwrap_or_default() }),
                _ => {}
            }
            if !declared.actions.contains(&action) {
                return Outcome::Forbidden(Reason::UnknownTool);
            }
        }
        if let Some(claims) = hop {
            let tool = facts.tool.clone();
            if let Err(outcome) = super::agents::bound_by(claims, tool.as_deref(), decision) {
                return outcome;
            }
        }
        let acting = [
            ("agent", &decision.agent.agent),
            ("via", &decision.agent.via),
        ];
        if acting.iter().any(|(_, v)| v.is_some()) {
            // A schema whose action context has no `agent` / `via` could not
            // let a policy see who acts for the principal: refuse the hop
            // rather than decide it as a direct call.
            let types = self.mcp.types(snapshot);
            if !types
                .get(&server.namespace)
                .is_some_and(|t| t.hop_actions.contains(&action))
            {
                tracing::warn!(request_id = %request.request_id, %action, "the schema's MCP action context declares no agent/via; regenerate it with `tollgate mcp schema`");
                return Outcome::Forbidden(Reason::PolicyError);
            }
            for (k, v) in acting {
                if let Some(v) = v {
                    context[k] = json!(v);
                }
            }
        }
        let uids = (
            super::principal::uid(principal),
            uid_in(&server.namespace, "Action", &action),
            uid_in(&server.namespace, "McpServer", &server.server),
        );
        let (Ok(p), Ok(a), Ok(res)) = uids else {
            return Outcome::Forbidden(Reason::PolicyError);
        };
        decision.action = Some(a.to_string());
        decision.resource = Some(res.to_string());
        let cedar_context = match Context::from_json_value(context, Some((&snapshot.schema, &a))) {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(request_id = %request.request_id, error = %e, "MCP context does not fit the schema");
                return Outcome::Invalid(Reason::InvalidArguments);
            }
        };
        let cedar_request = match Request::new(p, a, res, cedar_context, Some(&snapshot.schema)) {
            Ok(r) => r,
            // The schema does not let this principal type call the action.
            Err(_) if anonymous => return Outcome::Unauthenticated(Reason::MissingCredential),
            Err(_) => return Outcome::Forbidden(Reason::PolicyDenied),
        };
        let entities = match self.entities_with(snapshot, principal) {
            Ok(e) => e,
            Err(message) => {
                tracing::warn!(request_id = %request.request_id, error = %message, "principal entity does not fit the schema");
                return Outcome::Forbidden(Reason::PolicyError);
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
        let outcome = self.outcome_of(verdict.allow, !decision.errors.is_empty(), principal);
        if outcome.is_allow() && method == "tools/list" {
            self.mcp.lists.insert(
                request.request_id.clone(),
                PendingList {
                    principal: principal.clone(),
                    server: index,
                },
            );
        }
        outcome
    }

    /// The JSON-RPC request of a POST: from the body, from Envoy's MCP
    /// filter metadata when only that came, and from the body checked
    /// against the metadata when both came.
    fn read_mcp(&self, request: &HttpRequest) -> Result<McpRequest, McpError> {
        let limits = self.mcp.config.limits();
        let alone = request.body.is_none();
        let from_metadata = request
            .mcp_metadata
            .as_ref()
            .map(|m| envoy_metadata::parse(m, &request.headers, limits, alone))
            .transpose()?;
        let from_body = match (&request.body, request.body_partial) {
            (Some(b), false) => Some(mcp_request::parse(b, &request.headers, limits)?),
            (Some(_), true) => {
                return Err(McpError::Malformed("the body was cut at the limit".into()));
            }
            (None, _) => None,
        };
        match (from_metadata, from_body) {
            (Some(m), Some(b)) => envoy_metadata::agree(&m, &b).map(|()| b),
            (None, Some(b)) => Ok(b),
            (Some(m), None) => Ok(m),
            (None, None) => Err(McpError::Malformed("no body and no MCP metadata".into())),
        }
    }

    /// RFC 8707 / MCP authorization: a bearer token used at an endpoint
    /// with a `resource` must name that resource in `aud`. An issuer with
    /// `relaxed_audience` is let through without it, and logged.
    fn check_audience(
        &self,
        request: &HttpRequest,
        server: &McpServerConfig,
        principal: &Principal,
    ) -> Result<(), Outcome> {
        let Some(resource) = server.resource.as_deref() else {
            return Ok(());
        };
        if principal.kind != PrincipalKind::User {
            return Ok(());
        }
        // The token the identity chain just verified: its payload is read
        // again here only for `iss` and `aud`.
        let claims = match request.jwt_authn_payloads.values().next() {
            Some(payload) => payload.as_object().cloned(),
            None => request
                .header("authorization")
                .and_then(|a| a.split_once(' '))
                .and_then(|(_, token)| {
                    crate::identity::jwt::token::Parts::decode(token.trim()).ok()
                })
                .map(|p| p.payload),
        };
        let Some(claims) = claims else {
            return Err(Outcome::Unauthenticated(Reason::WrongAudience));
        };
        if crate::mcp::audience_names(claims.get("aud"), resource) {
            return Ok(());
        }
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        if self.mcp.relaxed_issuers.contains(iss) {
            tracing::warn!(request_id = %request.request_id, issuer = %iss, %resource, "audience relaxed: token does not name this MCP resource");
            return Ok(());
        }
        tracing::info!(request_id = %request.request_id, issuer = %iss, %resource, "token audience is not this MCP resource");
        Err(Outcome::Unauthenticated(Reason::WrongAudience))
    }

    /// For an allowed `tools/list` (by request id, once): which listed tools
    /// the caller may call. A tool is kept when its name is valid, the
    /// schema declares its action, and Cedar's partial evaluation with
    /// `context` unknown does not come to a deny — a residual (a condition
    /// on `context.input`) keeps it, since some arguments may be permitted;
    /// the call itself is decided on its actual arguments.
    pub fn tools_list_filter(&self, request_id: &str) -> Option<impl Fn(&Value) -> bool + use<>> {
        let pending = self.mcp.lists.remove(request_id)?;
        let server = self.mcp.config.servers.get(pending.server)?.clone();
        let snapshot = self.policies.snapshot();
        let types = self.mcp.types(&snapshot);
        let declared = types.get(&server.namespace).cloned().unwrap_or_default();
        let entities = self.entities_with(&snapshot, &pending.principal).ok();
        let principal = super::principal::uid(&pending.principal).ok();
        let resource = uid_in(&server.namespace, "McpServer", &server.server).ok();
        let authorizer = cedar_policy::Authorizer::new();
        Some(move |tool: &Value| {
            let Some(name) = tool.get("name").and_then(Value::as_str) else {
                return false;
            };
            let (Some(entities), Some(p), Some(r)) = (&entities, &principal, &resource) else {
                return false;
            };
            if !mcp_request::valid_tool_name(name) || !declared.tools.contains_key(name) {
                return false;
            }
            let Ok(a) = uid_in(&server.namespace, "Action", name) else {
                return false;
            };
            let request = RequestBuilder::default()
                .principal(p.clone())
                .action(a)
                .resource(r.clone())
                .build();
            let answer = authorizer.is_authorized_partial(&request, &snapshot.policies, entities);
            answer.decision() != Some(cedar_policy::Decision::Deny)
        })
    }
}
