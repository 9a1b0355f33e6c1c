//! Agents on LLM routes: the tools a chat request offers and the tool calls
//! the model answers with, decided for the original caller; and the signed
//! caller context that keeps that caller the principal when the agent
//! runtime later calls a tool through the gateway.
//!
//! The Cedar model (README "Agents and MCP", "OpenAI-style tools"):
//! `Action::"offer_tool"` and `Action::"call_tool"` on `Tool::"<name>"`,
//! principal = the caller; context `{ model?, kind }` (`kind` is
//! `"function"` or `"builtin"`). A hop with a caller context carries
//! `context.agent` (the runtime's mTLS identity); a service carrying a
//! user's token carries `context.via`.

pub mod caller_context;
pub mod tools;

use std::path::PathBuf;

use serde::Deserialize;

/// `[agents]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentsConfig {
    /// OpenAI-style tools (`[agents.tools]`).
    pub tools: ToolsConfig,
    /// Signed caller context (`[agents.caller_context]`); off without keys.
    pub caller_context: CallerContextConfig,
    /// SPIFFE ids (or mTLS subjects) of services allowed to present a
    /// user's JWT beside their own mTLS identity; the request is then
    /// decided as the user with `context.via` = the service. Unset: not
    /// checked (the JWT decides, as without `[agents]`); set (even empty):
    /// any other service presenting a JWT is refused
    /// (`token_carrier_not_allowed`).
    pub token_carriers: Option<Vec<String>>,
}

/// `[agents.tools]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ToolsConfig {
    /// Decide each offered tool (`offer_tool`) on allowed requests, and
    /// check the response's tool calls (`call_tool`) through ext_proc.
    pub enabled: bool,
    /// How long an allowed request waits for its response to be checked
    /// (the ext_proc side), in seconds.
    pub check_ttl_secs: u64,
    /// Largest JSON response (or unfinished event) checked, in bytes;
    /// larger is refused, never passed unchecked.
    pub max_response_bytes: usize,
}

impl Default for ToolsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            check_ttl_secs: 300,
            max_response_bytes: 4 * 1024 * 1024,
        }
    }
}

/// `[agents.caller_context]`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CallerContextConfig {
    /// Ed25519 keys (TOML: `[[keys]] kid, seed, retire_at?`); unset: no
    /// caller context is issued or accepted.
    pub keys_file: Option<PathBuf>,
    /// Lifetime of an issued context, in seconds.
    pub ttl_secs: u64,
    /// How many hops one context may authorize (shared by replicas through
    /// the quota store).
    pub max_uses: u64,
    /// Actions on whose allow a context is issued.
    pub issue_for: Vec<String>,
    /// The header carrying the context, to the runtime and back.
    pub header: String,
}

impl Default for CallerContextConfig {
    fn default() -> Self {
        Self {
            keys_file: None,
            ttl_secs: 300,
            max_uses: 16,
            issue_for: vec!["chat".into()],
            header: "x-tollgate-caller-context".into(),
        }
    }
}

impl AgentsConfig {
    /// Checks the section; the message says what to fix.
    pub fn check(&self) -> Result<(), String> {
        if self.tools.check_ttl_secs == 0 {
            return Err("agents.tools.check_ttl_secs must be at least 1".into());
        }
        let cc = &self.caller_context;
        if cc.ttl_secs == 0 || cc.ttl_secs > 86_400 {
            return Err("agents.caller_context.ttl_secs must be 1 … 86400".into());
        }
        if cc.max_uses == 0 {
            return Err("agents.caller_context.max_uses must be at least 1".into());
        }
        if !cc.header.starts_with("x-") || cc.header.to_ascii_lowercase() != cc.header {
            return Err(
                "agents.caller_context.header must be a lowercase header name starting with x-"
                    .into(),
            );
        }
        Ok(())
    }
}

/// What the engine decided about agents on one request: carried on the
/// [`crate::decision::Decision`] to the response mapping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFacts {
    /// The offered tool a deny names.
    pub tool: Option<String>,
    /// A signed caller context to add to the upstream request (header name,
    /// compact JWS).
    pub caller_context: Option<(String, String)>,
    /// The runtime's identity on a hop with a caller context.
    pub agent: Option<String>,
    /// The service carrying a user's token.
    pub via: Option<String>,
    /// The originating request id (`rid`) of a verified caller context:
    /// what `per = ["caller_context"]` quota rules count by.
    pub origin_request: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_parses_and_bad_values_say_what_to_fix() {
        let ok: AgentsConfig = toml::from_str(
            "token_carriers = [\"spiffe://a/b\"]\n[tools]\nenabled = true\n[caller_context]\nkeys_file = \"k.toml\"\nmax_uses = 2\n",
        )
        .expect("parses");
        assert!(ok.tools.enabled && ok.check().is_ok());
        assert_eq!(ok.caller_context.header, "x-tollgate-caller-context");
        assert!(toml::from_str::<AgentsConfig>("[tools]\nenable = true\n").is_err());
        for (text, needle) in [
            ("[caller_context]\nttl_secs = 0\n", "ttl_secs"),
            ("[caller_context]\nmax_uses = 0\n", "max_uses"),
            ("[caller_context]\nheader = \"Authorization\"\n", "header"),
            ("[tools]\ncheck_ttl_secs = 0\n", "check_ttl_secs"),
        ] {
            let c: AgentsConfig = toml::from_str(text).expect("parses");
            assert!(c.check().unwrap_err().contains(needle), "{text}");
        }
    }
}
