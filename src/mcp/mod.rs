//! Model Context Protocol (MCP) facts: JSON-RPC requests as policy input,
//! typed tool arguments, the Cedar schema fragment of a server's tools, the
//! filtering of `tools/list` answers, and the OAuth protected resource
//! metadata (RFC 9728) Tollgate serves for each MCP endpoint.
//!
//! The Cedar model (README "Agents and MCP"): principal = the authenticated
//! caller; action = `<namespace>::Action::"<tool>"` for `tools/call` (in the
//! group `"tools/call"`), `<namespace>::Action::"<method>"` for other
//! methods; resource = `<namespace>::McpServer::"<server>"`; a tool's typed
//! arguments are `context.input`.

pub mod envoy_metadata;
pub mod json;
pub mod request;
pub mod schema;
pub mod tools_list;
pub mod typing;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::decision::{Decision, Outcome, Reason};

/// `[mcp]`: which HTTP paths are MCP endpoints, and how they are decided.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// What a `ping` gets: `allow` (no policy) or `deny`.
    pub ping: Permit,
    /// What `notifications/*` get: `allow` (no policy) or `deny`.
    pub notifications: Permit,
    /// Largest `params.arguments`, in bytes of JSON.
    pub max_argument_bytes: usize,
    /// Deepest nesting (objects and arrays) of an MCP body.
    pub max_depth: usize,
    /// How long an allowed `tools/list` waits for its answer to be filtered
    /// (the ext_proc side), in seconds.
    pub list_filter_ttl_secs: u64,
    /// The MCP endpoints.
    pub servers: Vec<McpServerConfig>,
}

impl Default for McpConfig {
    fn default() -> Self {
        Self {
            ping: Permit::Allow,
            notifications: Permit::Allow,
            max_argument_bytes: 64 * 1024,
            max_depth: 16,
            list_filter_ttl_secs: 60,
            servers: Vec::new(),
        }
    }
}

/// Allowed without a policy, or refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Permit {
    Allow,
    Deny,
}

/// One MCP endpoint (`[[mcp.servers]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// The endpoint's path, exactly (`/mcp`); every method on it is MCP.
    pub path: String,
    /// Entity id of the server: the resource is `<namespace>::McpServer::"<server>"`.
    pub server: String,
    /// Cedar namespace of the server's actions (default `Mcp`).
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// The canonical URI of this protected resource (RFC 8707 §2, RFC 9728
    /// `resource`), e.g. `https://mcp.example.com/mcp`. When set, Tollgate
    /// serves its metadata and names it in `WWW-Authenticate`.
    #[serde(default)]
    pub resource: Option<String>,
    /// RFC 9728 `authorization_servers`.
    #[serde(default)]
    pub authorization_servers: Vec<String>,
    /// Scopes every request must carry (all of them); also `scopes_supported`.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Scopes a `tools/call` of a tool needs besides `scopes` (tool name →
    /// scopes, all required). A call without them is refused 403
    /// `insufficient_scope` naming every scope the call needs.
    #[serde(default)]
    pub tool_scopes: std::collections::BTreeMap<String, Vec<String>>,
    /// Identity sources this endpoint accepts (default: all configured).
    #[serde(default)]
    pub identity: Option<Vec<crate::identity::SourceKind>>,
}

fn default_namespace() -> String {
    "Mcp".into()
}

impl McpConfig {
    /// Load-time checks; the message names the server entry.
    pub fn check(&self) -> Result<(), String> {
        for (i, s) in self.servers.iter().enumerate() {
            let at = format!("mcp.servers[{i}] ({})", s.path);
            if !s.path.starts_with('/') || s.path.contains(['?', '#']) {
                return Err(format!("{at}: path must be an absolute path without query"));
            }
            if s.server.is_empty() {
                return Err(format!("{at}: server (the entity id) is empty"));
            }
            if !s.namespace.split("::").all(|p| {
                p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            }) {
                return Err(format!(
                    "{at}: namespace {:?} is not a Cedar namespace",
                    s.namespace
                ));
            }
            if let Some(r) = &s.resource {
                canonical_resource(r).map_err(|e| format!("{at}: resource {r:?}: {e}"))?;
            }
            if self.servers[..i].iter().any(|o| o.path == s.path) {
                return Err(format!("{at}: another server has the same path"));
            }
        }
        if self.max_depth == 0 || self.max_depth > 64 {
            return Err("mcp.max_depth must be 1..=64".into());
        }
        Ok(())
    }

    /// The server whose path is `path` (canonical, without query).
    pub fn server_for(&self, path: &str) -> Option<&McpServerConfig> {
        self.servers.iter().find(|s| s.path == path)
    }

    /// The server whose protected resource metadata lives at `path`
    /// (`/.well-known/oauth-protected-resource` + the resource's path).
    pub fn server_for_metadata(&self, path: &str) -> Option<&McpServerConfig> {
        self.servers
            .iter()
            .find(|s| s.metadata_path().as_deref() == Some(path))
    }

    /// The argument bounds.
    pub fn limits(&self) -> request::Limits {
        request::Limits {
            max_argument_bytes: self.max_argument_bytes,
            max_depth: self.max_depth,
        }
    }
}

/// Whether a token's `aud` (a string or an array of strings) names the
/// protected resource `resource`, compared as RFC 8707 canonical URIs
/// ([`canonical_resource`]; a trailing `/` on the path is not significant,
/// as the MCP authorization spec lets clients send either form). An `aud`
/// value that is not a valid resource indicator names nothing.
pub fn audience_names(aud: Option<&Value>, resource: &str) -> bool {
    let canonical = |u: &str| canonical_resource(u).map(|c| c.trim_end_matches('/').to_string());
    let Ok(want) = canonical(resource) else {
        return false;
    };
    let names = |v: &Value| {
        v.as_str()
            .is_some_and(|a| canonical(a).is_ok_and(|a| a == want))
    };
    match aud {
        Some(Value::Array(list)) => list.iter().any(names),
        Some(v) => names(v),
        None => false,
    }
}

/// Checks an RFC 8707 resource indicator: an absolute `https` (or `http`
/// for loopback) URI without fragment, and returns it canonical (lowercase
/// scheme and host, no default port, no trailing slash on a bare origin).
pub fn canonical_resource(uri: &str) -> Result<String, String> {
    let url = url::Url::parse(uri).map_err(|e| e.to_string())?;
    if url.fragment().is_some() {
        return Err("a resource indicator has no fragment".into());
    }
    let loopback = matches!(url.host_str(), Some("localhost" | "127.0.0.1" | "[::1]"));
    if url.scheme() != "https" && !(url.scheme() == "http" && loopback) {
        return Err("the scheme must be https (http only for loopback)".into());
    }
    let mut text = url.to_string();
    if url.path() == "/" && url.query().is_none() && !uri.ends_with('/') {
        text.pop();
    }
    Ok(text)
}

impl McpServerConfig {
    /// Path of this server's metadata document on the resource's origin.
    pub fn metadata_path(&self) -> Option<String> {
        let url = url::Url::parse(self.resource.as_deref()?).ok()?;
        let path = url.path().trim_end_matches('/');
        Some(format!("/.well-known/oauth-protected-resource{path}"))
    }

    /// Absolute URL of the metadata document (for `resource_metadata`).
    pub fn metadata_url(&self) -> Option<String> {
        let url = url::Url::parse(self.resource.as_deref()?).ok()?;
        let mut origin = url.origin().ascii_serialization();
        origin.push_str(&self.metadata_path()?);
        Some(origin)
    }

    /// The RFC 9728 metadata document.
    pub fn metadata(&self) -> Value {
        let resource = self
            .resource
            .as_deref()
            .map(|r| canonical_resource(r).unwrap_or_else(|_| r.to_string()));
        json!({
            "resource": resource,
            "authorization_servers": self.authorization_servers,
            "scopes_supported": self.scopes,
            "bearer_methods_supported": ["header"],
        })
    }
}

/// Request header ext_authz sets (overwriting any client copy) on an
/// allowed `tools/list` and removes on every other allowed MCP request, so
/// the external processor knows which answers must be filtered even when
/// it cannot find the allow it remembered (expired, another replica):
/// such an answer then lists no tools.
pub const LIST_MARK_HEADER: &str = "x-tollgate-mcp-list";

/// MCP facts a decision carries to the response table.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct McpFacts {
    /// The JSON-RPC id to answer under (`null` when unknown).
    pub id: Value,
    /// `resource_metadata` for `WWW-Authenticate`.
    pub resource_metadata: Option<String>,
    /// The scopes the endpoint needs (for `insufficient_scope`).
    pub scopes: Vec<String>,
    /// The method decided, when the body was read.
    pub method: Option<String>,
    /// The tool called, for `tools/call`.
    pub tool: Option<String>,
    /// The MCP server entity (`Mcp::McpServer::"bank"`).
    pub server: Option<String>,
    /// Lowercase hex SHA-256 of each top-level argument's value, by
    /// argument name ([`argument_hashes`]); never the values. Empty when
    /// the hashes are keyed.
    pub argument_sha256: std::collections::BTreeMap<String, String>,
    /// The same, HMAC-SHA256 under `audit.hash_key`, when it is set.
    pub argument_hmac_sha256: std::collections::BTreeMap<String, String>,
}

/// A hash of each argument's value as compact JSON with object members in
/// sorted order (serde_json's map is ordered), so the same value hashes the
/// same whatever order the client sent: lowercase hex, by argument name.
///
/// Without `key`, plain SHA-256 (FIPS 180-4): these hash low-entropy values
/// too (an amount of `5` can be found by trying), so they let whoever reads
/// the trail compare calls, not keep values secret. With `key`
/// (`audit.hash_key`), HMAC-SHA256 (RFC 2104) under it: a guess can only be
/// checked by whoever holds the key.
pub fn argument_hashes(
    arguments: &serde_json::Map<String, Value>,
    key: Option<&[u8]>,
) -> std::collections::BTreeMap<String, String> {
    use hmac::{Hmac, Mac};
    use sha2::{Digest, Sha256};
    arguments
        .iter()
        .map(|(k, v)| {
            let text = serde_json::to_vec(v).unwrap_or_default();
            let digest = match key.and_then(|key| Hmac::<Sha256>::new_from_slice(key).ok()) {
                Some(mut mac) => {
                    mac.update(&text);
                    hex::encode(mac.finalize().into_bytes())
                }
                None => hex::encode(Sha256::digest(&text)),
            };
            (k.clone(), digest)
        })
        .collect()
}

/// The JSON-RPC error code of a refused MCP request. `-32001` is the
/// 2026-07-28 revision's HeaderMismatch; `-32600`/`-32602`/`-32603` are
/// JSON-RPC's own; the rest are Tollgate's, in the server-defined range.
pub fn error_code(outcome: Outcome) -> i64 {
    match outcome {
        Outcome::Invalid(Reason::McpHeaderMismatch) => -32001,
        Outcome::Invalid(Reason::InvalidArguments | Reason::InvalidToolName) => -32602,
        Outcome::Invalid(_) => -32600,
        Outcome::Unauthenticated(_) => -32011,
        Outcome::Forbidden(_) => -32003,
        Outcome::OverQuota(_) => -32029,
        Outcome::Unavailable(_) | Outcome::Defer(_) | Outcome::Allow => -32603,
    }
}

/// The body of a refused MCP request: a JSON-RPC error under the request's
/// id, naming the reason and request id (never policy text or arguments).
pub fn error_body(decision: &Decision, facts: &McpFacts) -> String {
    let reason = decision.outcome.reason().code();
    let mut data = json!({"reason": reason, "request_id": decision.request_id});
    if let Some(tool) = &facts.tool {
        data["tool"] = json!(tool);
    }
    if let (Outcome::OverQuota(_), Some(q)) = (decision.outcome, &decision.quota) {
        data["rule"] = json!(q.rule);
    }
    json!({
        "jsonrpc": "2.0",
        "id": facts.id,
        "error": {"code": error_code(decision.outcome), "message": reason, "data": data},
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_uris_are_checked_and_metadata_placed() {
        assert_eq!(
            canonical_resource("HTTPS://MCP.Example.com:443").as_deref(),
            Ok("https://mcp.example.com")
        );
        assert!(canonical_resource("http://mcp.example.com/mcp").is_err());
        assert!(canonical_resource("https://mcp.example.com/mcp#x").is_err());
        assert!(canonical_resource("http://127.0.0.1:8080/mcp").is_ok());
        let s = McpServerConfig {
            path: "/mcp".into(),
            server: "bank".into(),
            namespace: "Mcp".into(),
            resource: Some("https://mcp.example.com/mcp".into()),
            authorization_servers: vec!["https://idp.example.com".into()],
            scopes: vec!["mcp:tools".into()],
            tool_scopes: Default::default(),
            identity: None,
        };
        assert_eq!(
            s.metadata_url().as_deref(),
            Some("https://mcp.example.com/.well-known/oauth-protected-resource/mcp")
        );
        assert_eq!(
            s.metadata()["resource"],
            json!("https://mcp.example.com/mcp")
        );
    }

    #[test]
    fn audiences_are_compared_as_canonical_resource_uris() {
        let r = "https://mcp.example.com/mcp";
        for (aud, names) in [
            (json!("https://mcp.example.com/mcp"), true),
            (json!("HTTPS://MCP.Example.com:443/mcp"), true),
            (json!("https://mcp.example.com/mcp/"), true),
            (json!(["tollgate", "https://mcp.example.com/mcp"]), true),
            (json!("https://mcp.example.com/other"), false),
            (json!("https://mcp.example.com/MCP"), false),
            (json!("https://mcp.example.com:8443/mcp"), false),
            (json!("http://mcp.example.com/mcp"), false),
            (json!("https://mcp.example.com/mcp#x"), false),
            (json!("tollgate"), false),
            (json!(["tollgate"]), false),
            (json!(7), false),
        ] {
            assert_eq!(audience_names(Some(&aud), r), names, "{aud}");
        }
        assert!(!audience_names(None, r));
    }
}
