//! The `[authzen]` config section.

use std::collections::BTreeMap;
use std::str::FromStr;

use serde::Deserialize;

use crate::identity::SourceKind;
use crate::quota::Unit;

/// When decision `context` carries the determining policies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ReasonsMode {
    /// Never.
    Never,
    /// When the request sets `options.reasons: true`.
    #[default]
    OnRequest,
    /// Always.
    Always,
}

/// The `[authzen]` config section.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthzenConfig {
    /// The PDP identifier published in metadata (`https://pdp.example.com`):
    /// the URL callers reach, usually a TLS-terminating proxy in front.
    /// Unset: `http://` + the request's `Host`.
    pub policy_decision_point: Option<String>,
    /// AuthZEN subject / resource `type` → Cedar entity type. Types not
    /// listed are used as written.
    pub types: BTreeMap<String, String>,
    /// Cedar entity type of actions (`Action` → `Action::"read"`).
    pub action_type: String,
    /// When decisions carry reasons (determining policy ids).
    pub reasons: ReasonsMode,
    /// Largest request body; larger gets 413.
    pub max_body_bytes: usize,
    /// Most items in one Access Evaluations request; more gets 400.
    pub max_evaluations: usize,
    /// Search: results per page when `page.limit` is absent.
    pub search_page_size: usize,
    /// Search: the largest `page.limit` honoured.
    pub search_max_page_size: usize,
    /// Search: most candidates evaluated per request (the rest come on later
    /// pages).
    pub search_max_candidates: usize,
    /// Search: how long a page token stays valid, in seconds.
    pub page_token_ttl_secs: u64,
    /// Identity sources a calling PEP must authenticate with (`api_key`,
    /// `jwt`); empty: no authentication (anyone who reaches the listener).
    pub caller_sources: Vec<SourceKind>,
    /// Principals allowed to call (`ApiKey::"pep-1"`); empty: any
    /// authenticated caller.
    pub allowed_callers: Vec<String>,
    /// API calls one caller may make per `caller_quota_unit` (counted in the
    /// configured quota store, per authenticated principal; all
    /// unauthenticated callers share one counter). Unset: no quota.
    pub caller_requests_per_unit: Option<u64>,
    pub caller_quota_unit: Unit,
}

impl Default for AuthzenConfig {
    fn default() -> Self {
        Self {
            policy_decision_point: None,
            types: BTreeMap::new(),
            action_type: "Action".into(),
            reasons: ReasonsMode::OnRequest,
            max_body_bytes: 1 << 20,
            max_evaluations: 1000,
            search_page_size: 100,
            search_max_page_size: 1000,
            search_max_candidates: 10_000,
            page_token_ttl_secs: 600,
            caller_sources: Vec::new(),
            allowed_callers: Vec::new(),
            caller_requests_per_unit: None,
            caller_quota_unit: Unit::Minute,
        }
    }
}

/// An `[authzen]` setting that cannot work; the message says what to fix.
#[derive(Debug, Clone, thiserror::Error)]
#[error("authzen.{key}: {message}")]
pub struct AuthzenConfigError {
    pub key: String,
    pub message: String,
}

impl AuthzenConfig {
    /// Checks names and bounds; returns the normalized PDP identifier.
    pub fn check(&self) -> Result<Option<String>, AuthzenConfigError> {
        let err = |key: &str, message: String| AuthzenConfigError {
            key: key.into(),
            message,
        };
        for (from, to) in &self.types {
            cedar_policy::EntityTypeName::from_str(to).map_err(|e| {
                err(
                    &format!("types.{from}"),
                    format!("{to:?} is not a Cedar entity type name: {e}"),
                )
            })?;
        }
        cedar_policy::EntityTypeName::from_str(&self.action_type).map_err(|e| {
            err(
                "action_type",
                format!(
                    "{:?} is not a Cedar entity type name: {e}",
                    self.action_type
                ),
            )
        })?;
        for (key, v) in [
            ("max_body_bytes", self.max_body_bytes),
            ("max_evaluations", self.max_evaluations),
            ("search_page_size", self.search_page_size),
            ("search_max_page_size", self.search_max_page_size),
            ("search_max_candidates", self.search_max_candidates),
        ] {
            if v == 0 {
                return Err(err(key, "must be at least 1".into()));
            }
        }
        if self.caller_sources.contains(&SourceKind::Mtls) {
            return Err(err(
                "caller_sources",
                "mtls is not available on the AuthZEN listener (plain HTTP); use api_key or jwt"
                    .into(),
            ));
        }
        if !self.allowed_callers.is_empty() && self.caller_sources.is_empty() {
            return Err(err(
                "allowed_callers",
                "needs authzen.caller_sources, or no caller is ever identified".into(),
            ));
        }
        let Some(pdp) = &self.policy_decision_point else {
            return Ok(None);
        };
        let pdp = pdp.trim_end_matches('/');
        let ok_scheme = pdp.starts_with("https://") || pdp.starts_with("http://");
        if !ok_scheme
            || pdp.contains(['?', '#'])
            || pdp.split("://").nth(1).is_none_or(str::is_empty)
        {
            return Err(err(
                "policy_decision_point",
                format!(
                    "{pdp:?} must be an https:// URL without query or fragment, e.g. \"https://pdp.example.com\""
                ),
            ));
        }
        Ok(Some(pdp.to_string()))
    }
}
