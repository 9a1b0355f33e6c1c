//! Agents on LLM routes, in the engine: each offered tool decided as
//! `offer_tool` for the caller (a forbidden one denies the request, naming
//! it), the tools the caller may call (`call_tool`) remembered for the
//! response check in ext_proc, a signed caller context issued on allow; and
//! on a later hop, the caller context verified and counted, so the hop is
//! decided as the original caller with `context.agent` = the runtime.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cedar_policy::{Context, Request, RestrictedExpression};
use serde_json::json;

use super::Engine;
use crate::agents::caller_context::{Claims, KeyRing};
use crate::agents::tools::{self, OfferedTool};
use crate::agents::{AgentFacts, AgentsConfig};
use crate::decision::{Decision, Outcome, Reason};
use crate::identity::{Principal, PrincipalKind};
use crate::policy::Snapshot;
use crate::policy::evaluate::evaluate;
use crate::quota::engine::QuotaDecision;
use crate::request::HttpRequest;

/// The agents side of the engine.
pub struct AgentState {
    config: AgentsConfig,
    /// The caller-context keys; swapped whole when their file changes.
    keys: Arc<arc_swap::ArcSwapOption<KeyRing>>,
    /// The keys file and the text last loaded from it, when keys came
    /// from a file (see [`Engine::reload_caller_context`]).
    keys_file: std::sync::Mutex<Option<(std::path::PathBuf, String)>>,
    /// Tools each allowed request may call, by request id, until its
    /// response is checked.
    checks: moka::sync::Cache<String, Arc<HashSet<String>>>,
}

impl AgentState {
    /// From `[agents]`.
    pub fn new(config: &AgentsConfig) -> Self {
        Self {
            config: config.clone(),
            keys: Arc::new(arc_swap::ArcSwapOption::empty()),
            keys_file: std::sync::Mutex::new(None),
            checks: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(config.tools.check_ttl_secs.max(1)))
                .build(),
        }
    }
}

/// The quota store record name of a request's tool-call check: the request
/// id hashed (SHA-256, hex), as request ids come from callers.
fn tool_check_record(request_id: &str) -> String {
    use sha2::{Digest, Sha256};
    format!(
        "tool-check:{}",
        hex::encode(Sha256::digest(request_id.as_bytes()))
    )
}

/// A verified caller context on a hop: who the original caller is and what
/// the context binds.
pub(super) struct Hop {
    pub principal: Principal,
    pub facts: AgentFacts,
    pub claims: Option<Claims>,
}

impl Engine {
    /// Loads the caller-context keys file (TOML `[[keys]] kid, seed,
    /// retire_at?`) and attaches its keys; [`Engine::reload_caller_context`]
    /// re-reads it. Errors name the file and what is wrong with it.
    pub fn attach_caller_context_file(
        &self,
        path: &std::path::Path,
    ) -> Result<(), crate::agents::caller_context::KeysError> {
        let (keys, text) = KeyRing::load_with_text(path)?;
        self.agents.keys.store(Some(Arc::new(keys)));
        *self
            .agents
            .keys_file
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((path.to_path_buf(), text));
        Ok(())
    }

    /// Re-reads the caller-context keys file: `Ok(true)` when its keys were
    /// swapped in (the next token is signed, and the JWK Set served, from
    /// them), `Ok(false)` when the text is unchanged or no file is
    /// configured, `Err` when it cannot be read or parsed — the last good
    /// keys keep signing and verifying.
    pub fn reload_caller_context(&self) -> Result<bool, crate::agents::caller_context::KeysError> {
        let mut file = self
            .agents
            .keys_file
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some((path, last)) = file.as_mut() else {
            return Ok(false);
        };
        let text = KeyRing::read(path)?;
        if text == *last {
            return Ok(false);
        }
        let keys = KeyRing::parse_file(path, &text)?;
        self.agents.keys.store(Some(Arc::new(keys)));
        *last = text;
        Ok(true)
    }

    /// The caller-context keys file, when keys came from one.
    pub fn caller_context_keys_file(&self) -> Option<std::path::PathBuf> {
        self.agents
            .keys_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(path, _)| path.clone())
    }

    /// The caller-context keys now, when attached.
    pub fn caller_context_keys(&self) -> Option<Arc<KeyRing>> {
        self.agents.keys.load_full()
    }

    /// The live caller-context keys, for readers that outlive a reload
    /// (the admin JWK Set).
    pub fn caller_context_keys_handle(&self) -> Arc<arc_swap::ArcSwapOption<KeyRing>> {
        self.agents.keys.clone()
    }

    /// The tools the allowed request `request_id` may call (once), with the
    /// largest response to check: the ext_proc side of the tool-call check.
    /// Looked up in this replica first, then, with a shared quota store
    /// (Redis, Cluster), in the record the deciding replica kept there
    /// ([`Engine::share_tool_call_check`]): Envoy's ext_authz and ext_proc
    /// calls of one request may reach different replicas.
    pub async fn tool_call_check(&self, request_id: &str) -> Option<(Arc<HashSet<String>>, usize)> {
        let max = self.agents.config.tools.max_response_bytes;
        if let Some(callable) = self.agents.checks.remove(request_id) {
            return Some((callable, max));
        }
        if !self.tool_checks_shared() {
            return None;
        }
        match self
            .quota()
            .store()
            .get_record(&tool_check_record(request_id))
            .await
        {
            Ok(Some(text)) => match serde_json::from_str::<Vec<String>>(&text) {
                Ok(tools) => Some((Arc::new(tools.into_iter().collect()), max)),
                Err(e) => {
                    tracing::warn!(request_id, error = %e, "unreadable shared tool-call check; the model's tool calls are all refused");
                    Some((Arc::new(HashSet::new()), max))
                }
            },
            Ok(None) => None,
            Err(e) => {
                // Unsure which tools were callable: none are.
                tracing::warn!(request_id, error = %e, "shared tool-call check unavailable; the model's tool calls are all refused");
                Some((Arc::new(HashSet::new()), max))
            }
        }
    }

    /// Whether tool-call checks go through the quota store: tools are
    /// checked and the store is shared between replicas (not memory).
    fn tool_checks_shared(&self) -> bool {
        self.agents.config.tools.enabled && self.quota().store().kind() != "memory"
    }

    /// Keeps the tool-call check of the allowed request `request_id` (kept
    /// in this replica by the decision) in a shared quota store as well,
    /// for `agents.tools.check_ttl_secs`, so that any replica's ext_proc
    /// finds it. One store round trip, only for requests decided with
    /// `agents.tools.enabled` on a shared store. A store error is logged:
    /// the check then lives only in this replica.
    pub(super) async fn share_tool_call_check(&self, request_id: &str) {
        if !self.tool_checks_shared() {
            return;
        }
        let Some(callable) = self.agents.checks.get(request_id) else {
            return;
        };
        let mut tools: Vec<&str> = callable.iter().map(String::as_str).collect();
        tools.sort_unstable();
        let Ok(text) = serde_json::to_string(&tools) else {
            return;
        };
        let ttl = Duration::from_secs(self.agents.config.tools.check_ttl_secs.max(1));
        if let Err(e) = self
            .quota()
            .store()
            .put_record(&tool_check_record(request_id), &text, ttl)
            .await
        {
            tracing::warn!(request_id, error = %e, "tool-call check not shared; only this replica's ext_proc can apply it");
        }
    }

    /// Who the request is decided as. Without a caller-context header: the
    /// authenticated caller (a service carrying a user's token must be a
    /// configured carrier, and is `context.via`). With one: the original
    /// caller it names, once verified and counted, with `context.agent` =
    /// the runtime presenting it over mTLS.
    pub(super) async fn agent_hop(
        &self,
        request: &HttpRequest,
        caller: Principal,
    ) -> Result<Hop, Outcome> {
        let config = &self.agents.config;
        // Without keys the header means nothing (it is removed on allow, as
        // every `x-tollgate-` header a client sends).
        let keys = self.agents.keys.load_full();
        let Some((token, keys)) = keys.and_then(|k| {
            request
                .header(&config.caller_context.header)
                .map(|t| (t, k))
        }) else {
            let mut facts = AgentFacts::default();
            if caller.kind == PrincipalKind::User
                && let Some(carriers) = &config.token_carriers
                && let Some(peer) = self.identity.mtls_peer(request).await
            {
                if !carriers.contains(&peer.id) {
                    tracing::info!(request_id = %request.request_id, service = %peer.id, "service may not carry user tokens");
                    return Err(Outcome::Forbidden(Reason::TokenCarrierNotAllowed));
                }
                facts.via = Some(peer.id);
            }
            return Ok(Hop {
                principal: caller,
                facts,
                claims: None,
            });
        };
        // The runtime proves who it is by its certificate; a caller context
        // beside another credential (or none) is not a hop.
        if caller.kind != PrincipalKind::Service {
            tracing::info!(request_id = %request.request_id, "caller context without the runtime's mTLS identity");
            return Err(Outcome::Forbidden(Reason::CallerContextRefused));
        }
        // Envoy joins a repeated header with ','; a JWS never has one.
        let claims = match keys.verify(token.trim(), SystemTime::now()) {
            Ok(c) if !token.contains(',') => c,
            Ok(_) => return Err(Outcome::Unauthenticated(Reason::InvalidCallerContext)),
            Err(e) => {
                tracing::info!(request_id = %request.request_id, error = %e, "caller context refused");
                return Err(Outcome::Unauthenticated(Reason::InvalidCallerContext));
            }
        };
        let Some(original) = claims.principal() else {
            return Err(Outcome::Unauthenticated(Reason::InvalidCallerContext));
        };
        self.count_use(&claims).await?;
        Ok(Hop {
            principal: original,
            facts: AgentFacts {
                agent: Some(caller.id),
                origin_request: Some(claims.rid.clone()),
                ..AgentFacts::default()
            },
            claims: Some(claims),
        })
    }

    /// Counts one use of a caller context in the quota store (shared by
    /// replicas): at most `max_uses` per issuing request id. The counter is a
    /// day window, so a context alive across midnight UTC may be used up to
    /// twice `max_uses` times.
    async fn count_use(&self, claims: &Claims) -> Result<(), Outcome> {
        use crate::quota::rules::{Cost, Planned};
        use crate::quota::{Algorithm, Charge, ChargeMode, CounterKey, FailureMode, Unit};
        let plan = Planned {
            charge: Charge {
                key: CounterKey::new(
                    "caller_context",
                    &[("rid".to_string(), claims.rid.clone())],
                    &claims.rid,
                ),
                limit: self.agents.config.caller_context.max_uses,
                unit: Unit::Day,
                algorithm: Algorithm::FixedWindow,
                cost: 1,
                shadow: false,
                mode: ChargeMode::Admission,
            },
            failure_mode: FailureMode::Deny,
            label: "caller_context".into(),
            measure: Cost::Requests,
        };
        match self.quota.charge(&[plan]).await {
            QuotaDecision::Allowed { .. } => Ok(()),
            QuotaDecision::OverLimit { .. } => {
                tracing::info!(rid = %claims.rid, "caller context used up (replay)");
                Err(Outcome::Forbidden(Reason::CallerContextRefused))
            }
            QuotaDecision::Failed { error, .. } => {
                tracing::warn!(%error, "caller context use could not be counted");
                Err(Outcome::Unavailable(Reason::QuotaUnavailable))
            }
        }
    }

    /// `context.agent` and `context.via`, added to a request's context.
    pub(super) fn with_agent_facts(
        context: Context,
        facts: &AgentFacts,
    ) -> Result<Context, String> {
        let extra: Vec<(String, RestrictedExpression)> =
            [("agent", &facts.agent), ("via", &facts.via)]
                .into_iter()
                .filter_map(|(k, v)| {
                    v.as_ref()
                        .map(|v| (k.to_string(), RestrictedExpression::new_string(v.clone())))
                })
                .collect();
        if extra.is_empty() {
            return Ok(context);
        }
        context.merge(extra).map_err(|e| e.to_string())
    }

    /// After the route's policy allowed: what a caller context binds (tool,
    /// model), each offered tool, the response check, the caller context to
    /// issue. Changes `decision` to a deny when something is refused.
    pub(super) fn decide_agent_parts(
        &self,
        snapshot: &Snapshot,
        request: &HttpRequest,
        principal: &Principal,
        hop: Option<&Claims>,
        decision: &mut Decision,
    ) {
        let tool = decision
            .resource
            .as_deref()
            .and_then(|r| r.strip_prefix("Tool::\""))
            .and_then(|r| r.strip_suffix('"'))
            .map(str::to_string);
        if let Some(claims) = hop
            && let Err(outcome) = bound_by(claims, tool.as_deref(), decision)
        {
            decision.outcome = outcome;
            return;
        }
        let config = &self.agents.config;
        if !config.tools.enabled && self.agents.keys.load().is_none() {
            return;
        }
        let json = super::body::is_json(request.header("content-type"));
        let offered = match request.body.as_deref().filter(|b| !b.is_empty()) {
            None => Vec::new(),
            Some(_) if !config.tools.enabled => Vec::new(),
            // A cut JSON body may hide tools past the cut: refuse rather
            // than let the upstream read tools nobody decided.
            Some(b) if json && (request.body_partial || b.len() > self.context.max_body_bytes) => {
                tracing::info!(request_id = %request.request_id, "body not read whole; offered tools cannot be checked");
                decision.outcome = Outcome::Invalid(Reason::MalformedBody);
                return;
            }
            Some(body) => match tools::offered(body) {
                Ok(t) => t,
                Err(tools::ToolError::BadName) => {
                    decision.outcome = Outcome::Invalid(Reason::InvalidToolName);
                    return;
                }
                // Not JSON at all under another content type (a multipart
                // upload): it offers no tools.
                Err(_) if !json => Vec::new(),
                Err(e) => {
                    tracing::info!(request_id = %request.request_id, error = %e, "offered tools refused");
                    decision.outcome = Outcome::Invalid(Reason::MalformedBody);
                    return;
                }
            },
        };
        let mut callable = HashSet::new();
        for tool in &offered {
            if !self.tool_permitted(snapshot, request, principal, "offer_tool", tool, decision) {
                tracing::info!(request_id = %request.request_id, tool = %tool.name, "offered tool forbidden");
                decision.outcome = Outcome::Forbidden(Reason::ToolForbidden);
                decision.agent.tool = Some(tool.name.clone());
                return;
            }
            if self.tool_permitted(snapshot, request, principal, "call_tool", tool, decision) {
                callable.insert(tool.name.clone());
            }
        }
        if config.tools.enabled {
            self.agents
                .checks
                .insert(request.request_id.clone(), Arc::new(callable.clone()));
        }
        let action = decision.action.as_deref().unwrap_or_default();
        let issue = config
            .caller_context
            .issue_for
            .iter()
            .any(|a| action == format!("Action::\"{a}\""));
        if let (Some(keys), true) = (self.agents.keys.load_full(), issue) {
            let mut tools: Vec<String> = callable.into_iter().collect();
            tools.sort();
            let claims = Claims::for_request(
                principal,
                &request.request_id,
                decision.model.as_deref(),
                tools,
                SystemTime::now(),
                Duration::from_secs(config.caller_context.ttl_secs),
            );
            decision.agent.caller_context = keys
                .sign(&claims)
                .map(|t| (config.caller_context.header.clone(), t));
        }
    }

    /// Whether `principal` may `action` (`offer_tool`, `call_tool`) `tool`.
    /// Any error (an undeclared action, a context the schema refuses) is a
    /// no.
    fn tool_permitted(
        &self,
        snapshot: &Snapshot,
        request: &HttpRequest,
        principal: &Principal,
        action: &str,
        tool: &OfferedTool,
        decision: &Decision,
    ) -> bool {
        let mut context = json!({ "kind": tool.kind.as_str() });
        if let Some(m) = &decision.model {
            context["model"] = json!(m);
        }
        for (k, v) in [
            ("agent", &decision.agent.agent),
            ("via", &decision.agent.via),
        ] {
            if let Some(v) = v {
                context[k] = json!(v);
            }
        }
        let built = (|| {
            let p = super::principal::uid(principal)?;
            let a = super::principal::action_uid(action)?;
            let r = super::principal::entity_uid("Tool", &tool.name)?;
            let ctx = Context::from_json_value(context, Some((&snapshot.schema, &a)))
                .map_err(|e| e.to_string())?;
            let req =
                Request::new(p, a, r, ctx, Some(&snapshot.schema)).map_err(|e| e.to_string())?;
            Ok::<_, String>((req, self.entities_with(snapshot, principal)?))
        })();
        match built {
            Ok((req, entities)) => {
                evaluate(&self.authorizer, snapshot, &req, &entities, self.on_error).allow
            }
            Err(error) => {
                tracing::info!(request_id = %request.request_id, action, %error, "tool decision cannot be built; denied");
                false
            }
        }
    }
}

/// What a hop's caller context binds: the tool called (a `Tool` resource
/// on an HTTP route, the `params.name` of an MCP `tools/call`) must be one
/// of its tools, and a model the hop names must be its model.
pub(super) fn bound_by(
    claims: &Claims,
    tool: Option<&str>,
    decision: &mut Decision,
) -> Result<(), Outcome> {
    if let Some(tool) = tool
        && !claims.tools.iter().any(|t| t == tool)
    {
        decision.agent.tool = Some(tool.to_string());
        return Err(Outcome::Forbidden(Reason::ToolForbidden));
    }
    if let (Some(m), Some(bound)) = (&decision.model, &claims.model)
        && m != bound
    {
        return Err(Outcome::Forbidden(Reason::CallerContextRefused));
    }
    Ok(())
}
