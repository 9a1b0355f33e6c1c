//! The audit record: what one decision leaves in the trail.
//!
//! Schema `tollgate.audit/2` (field `v: 2`), one JSON object per line, keys
//! in this order; optional values are `null`, never absent. Version 2 adds
//! `mcp` (after `shadow`); a reader of version 1 records sees no other
//! change. The writer adds
//! `seq`, `prev` and `hash` (see [`super::trail`]). Documented in README.md,
//! "Audit record schema".

use std::time::{Duration, SystemTime};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::decision::{Decision, Outcome, Reason};
use crate::identity::PrincipalKind;
use crate::request::HttpRequest;

/// The `v` of every record this version writes.
pub const SCHEMA_VERSION: u32 = 2;

/// Who asked: never a credential, only what the credential resolved to.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Caller {
    /// Cedar UID, `ApiKey::"demo-paid"`.
    pub principal: String,
    pub tenant: Option<String>,
    pub tier: Option<String>,
    /// `api_key`, `jwt`, `mtls` or `none` (as `context.authn`).
    pub authn: &'static str,
    /// The API key's id (the part before the secret), for API keys only.
    pub key_id: Option<String>,
}

/// What the quota side did.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct QuotaOutcome {
    /// `charged`, `over`, `fail_open`, `unavailable` or `none`.
    pub outcome: &'static str,
    /// The reported rule (the refusing one, else the tightest).
    pub rule: Option<String>,
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
}

/// One identity in the chain of who is acting: the principal decided on,
/// and (filled by the caller-context and delegation features) the agent
/// runtime or the service that carried the principal's credential.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ChainLink {
    /// `principal`, `agent` (the runtime acting for the principal) or
    /// `via` (a service that carried the principal's token).
    pub role: &'static str,
    /// Cedar UID, `User::"alice"`.
    pub identity: String,
}

/// What an MCP request was (a decision on an MCP endpoint only).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct McpAudit {
    /// The JSON-RPC method, when the request was read.
    pub method: Option<String>,
    /// The tool, for `tools/call`.
    pub tool: Option<String>,
    /// The MCP server entity, `Mcp::McpServer::"bank"`.
    pub server: Option<String>,
    /// Who acts, the principal first: `[{role, identity}]`.
    pub caller_chain: Vec<ChainLink>,
    /// Lowercase hex SHA-256 of each top-level argument's value as compact
    /// JSON (object members sorted), by argument name. Never the values.
    /// Empty when `audit.hash_key` keys the hashes.
    pub argument_sha256: std::collections::BTreeMap<String, String>,
    /// The same as HMAC-SHA256 (RFC 2104) under `audit.hash_key`; only
    /// present when that key is set.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub argument_hmac_sha256: std::collections::BTreeMap<String, String>,
}

/// What a usage report settled (`api = usage`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UsageFacts {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cached_input_tokens: u64,
    /// `settled`, `already_settled` or `unknown_request`.
    pub result: &'static str,
}

/// What the upstream answered, as Envoy's ext_proc showed it (`api =
/// response`): the body's hash and size, never its content.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ResponseFacts {
    /// The upstream's HTTP status (`:status`); 0 when it was not readable.
    pub status: u16,
    /// Lowercase hex SHA-256 of the response body as the upstream sent it
    /// (before any change Tollgate makes, such as `tools/list` filtering);
    /// `null` without a body.
    pub body_sha256: Option<String>,
    pub body_bytes: u64,
    /// False when the stream ended before the body did (the client went
    /// away): the hash covers what was seen.
    pub complete: bool,
}

/// One audit record, before the writer chains it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub v: u32,
    /// RFC 3339, UTC, milliseconds: when the decision was made.
    pub time: String,
    pub request_id: String,
    /// W3C trace id (32 lowercase hex digits) of the decision: its span's
    /// when tracing is on, else the caller's `traceparent`'s.
    pub trace_id: Option<String>,
    /// Which question: `http` (ext_authz, forward-auth), `decision_api`
    /// (tollgate.v1: `caller.principal` is the principal the query names,
    /// `authn` is `query`) or `ratelimit` (Envoy RLS: no caller; `quota`
    /// and `domain` say what was counted).
    pub api: &'static str,
    /// The rate limit domain (`api = ratelimit` only).
    pub domain: Option<String>,
    /// `null` when authentication did not get that far.
    pub caller: Option<Caller>,
    pub method: Option<String>,
    /// The request path without its query (a query may carry secrets).
    pub path: Option<String>,
    pub action: Option<String>,
    pub resource: Option<String>,
    pub model: Option<String>,
    /// `allow` or `deny`.
    pub decision: &'static str,
    /// The stable reason code.
    pub reason: &'static str,
    /// The HTTP status the decision maps to.
    pub status: u16,
    /// Ids of the policies that determined the decision.
    pub policies: Vec<String>,
    pub errored_policies: Vec<String>,
    pub policy_version: String,
    pub quota: QuotaOutcome,
    /// Lowercase hex SHA-256 of the request body as received; `null`
    /// without a body.
    pub body_sha256: Option<String>,
    pub body_bytes: Option<u64>,
    /// The downstream client address as the gateway reported it.
    pub client_address: Option<String>,
    pub latency_us: u64,
    /// Token usage settled by a usage report (`api = usage` only).
    pub usage: Option<UsageFacts>,
    /// What the shadow policy set (`policy.shadow_dir`) would have decided,
    /// only when it disagrees with the live set: `{decision, direction,
    /// policies, errored_policies, policy_version}`.
    pub shadow: Option<crate::policy::shadow::ShadowVerdict>,
    /// MCP facts (v2): method, tool, server, caller chain and argument
    /// hashes; `null` off MCP endpoints. The determining policies and the
    /// quota outcome of a tool decision are `policies` and `quota` above.
    pub mcp: Option<McpAudit>,
    /// Who acts when more than the principal does (v2): `[{role, identity}]`,
    /// the principal first, then the agent runtime of a signed caller
    /// context (`agent`) and the service that carried the principal's token
    /// (`via`); `null` when the principal acted alone.
    pub caller_chain: Option<Vec<ChainLink>>,
    /// The upstream's answer (`api = response` only); joined to the
    /// decision and the settlement by `request_id`.
    pub response: Option<ResponseFacts>,
}

impl AuditRecord {
    /// The record of `decision` on `request`.
    pub fn of(decision: &Decision, request: &HttpRequest, elapsed: Duration) -> Self {
        let caller = decision.principal.as_ref().map(|p| Caller {
            principal: p.uid(),
            tenant: p.tenant.clone(),
            tier: p.tier.clone(),
            authn: p.kind.authn(),
            key_id: (p.kind == PrincipalKind::ApiKey).then(|| p.id.clone()),
        });
        let quota = decision.quota.as_ref();
        let outcome = match decision.outcome {
            Outcome::OverQuota(_) => "over",
            _ if decision.outcome.reason() == Reason::QuotaUnavailable => "unavailable",
            _ if decision.quota_fail_open => "fail_open",
            _ if quota.is_some() => "charged",
            _ => "none",
        };
        let path = request
            .raw_path
            .split('?')
            .next()
            .filter(|p| !p.is_empty())
            .map(str::to_string);
        let body = request.body.as_deref().filter(|b| !b.is_empty());
        let chain = caller_chain(decision);
        Self {
            v: SCHEMA_VERSION,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            request_id: decision.request_id.clone(),
            trace_id: decision.trace_id.clone(),
            api: "http",
            domain: None,
            caller,
            method: Some(request.method.clone()).filter(|m| !m.is_empty()),
            path,
            action: decision.action.clone(),
            resource: decision.resource.clone(),
            model: decision.model.clone(),
            decision: decision.outcome.verdict(),
            reason: decision.outcome.reason().code(),
            status: crate::respond::status_of(decision.outcome).http,
            policies: decision.policies.clone(),
            errored_policies: decision
                .errors
                .iter()
                .map(|e| e.policy_id.clone())
                .collect(),
            policy_version: decision.policy_version.clone(),
            quota: QuotaOutcome {
                outcome,
                rule: quota.map(|q| q.rule.clone()),
                limit: quota.map(|q| q.limit),
                remaining: quota.map(|q| q.remaining),
            },
            body_sha256: body.map(|b| hex::encode(Sha256::digest(b))),
            body_bytes: body.map(|b| b.len() as u64),
            client_address: request.source_ip.map(|ip| ip.to_string()),
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            usage: None,
            shadow: decision.shadow.clone(),
            mcp: decision.mcp.as_ref().map(|facts| McpAudit {
                method: facts.method.clone(),
                tool: facts.tool.clone(),
                server: facts.server.clone(),
                caller_chain: chain.clone(),
                argument_sha256: facts.argument_sha256.clone(),
                argument_hmac_sha256: facts.argument_hmac_sha256.clone(),
            }),
            caller_chain: (chain.len() > 1).then_some(chain),
            response: None,
        }
    }

    /// The record of the upstream's answer to request `request_id`
    /// (`decision = "response"`, `reason` `complete` or `cut_short`).
    pub fn response(request_id: &str, policy_version: String, facts: ResponseFacts) -> Self {
        let decision = Decision::early(request_id.to_string(), Outcome::Allow, policy_version);
        let mut record = Self::of(&decision, &HttpRequest::default(), Duration::ZERO);
        record.api = "response";
        record.decision = "response";
        record.reason = if facts.complete {
            "complete"
        } else {
            "cut_short"
        };
        record.status = facts.status;
        record.response = Some(facts);
        record
    }
}

/// The principal, then the agent runtime and the carrying service of an
/// agents hop (see [`crate::agents::AgentFacts`]), in that order.
fn caller_chain(decision: &Decision) -> Vec<ChainLink> {
    let principal = decision.principal.iter().map(|p| ChainLink {
        role: "principal",
        identity: p.uid(),
    });
    let agent = decision.agent.agent.iter().map(|id| ChainLink {
        role: "agent",
        identity: id.clone(),
    });
    let via = decision.agent.via.iter().map(|id| ChainLink {
        role: "via",
        identity: id.clone(),
    });
    principal.chain(agent).chain(via).collect()
}
