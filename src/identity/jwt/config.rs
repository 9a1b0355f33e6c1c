//! How an issuer is configured (`[[identity.jwt_issuers]]`), with its
//! defaults and the checks made when the config loads.

use std::path::PathBuf;

use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::{fetch, token};

/// Claim names mapped onto the principal.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimMap {
    pub subject: String,
    pub tenant: String,
    pub tier: String,
    /// A space-separated string (`scope`) or an array (`scp`); both are read.
    pub scopes: Vec<String>,
    pub groups: String,
}

impl Default for ClaimMap {
    fn default() -> Self {
        Self {
            subject: "sub".into(),
            tenant: "tenant".into(),
            tier: "tier".into(),
            scopes: vec!["scope".into(), "scp".into()],
            groups: "groups".into(),
        }
    }
}

/// The `User` principal a verified token's (or an introspection answer's)
/// `claims` describe, mapped by `m`. The subject is the `m.subject` claim,
/// else the `fallback_subject` claim when given (an introspection answer for
/// a client-credentials token has `client_id` but no `sub`); a principal
/// without either is refused (`invalid_credential`).
pub fn principal_of(
    m: &ClaimMap,
    claims: &serde_json::Value,
    fallback_subject: Option<&str>,
) -> Result<crate::identity::Principal, crate::decision::Reason> {
    use serde_json::Value;
    let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
    let subject = text(&m.subject)
        .or_else(|| fallback_subject.and_then(text))
        .filter(|s| !s.is_empty())
        .ok_or(crate::decision::Reason::InvalidCredential)?;
    let mut scopes = Vec::new();
    for name in &m.scopes {
        match claims.get(name) {
            Some(Value::String(s)) => scopes.extend(s.split_whitespace().map(str::to_string)),
            Some(Value::Array(a)) => {
                scopes.extend(a.iter().filter_map(Value::as_str).map(str::to_string))
            }
            _ => {}
        }
    }
    let groups = match claims.get(&m.groups) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    Ok(crate::identity::Principal {
        kind: crate::identity::PrincipalKind::User,
        id: subject,
        tenant: text(&m.tenant),
        tier: text(&m.tier),
        scopes,
        groups,
        models: Vec::new(),
    })
}

/// One trusted issuer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// A short name for logs, metrics and readiness.
    pub name: String,
    /// The exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values; a token must name one.
    pub audiences: Vec<String>,
    /// For identity providers that leave `aud` out of access tokens: a
    /// token of this issuer without `aud` is accepted, and at an MCP
    /// endpoint a token whose `aud` does not name the endpoint's resource
    /// (RFC 8707) is accepted too. Each such acceptance is logged
    /// (`audience relaxed`). Default false: `aud` is required.
    #[serde(default)]
    pub relaxed_audience: bool,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// HTTPS URL of the JWKS (plain HTTP only for a loopback IP literal or
    /// `localhost`; see [`fetch::checked_url`]).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// OIDC discovery document URL; its `jwks_uri` is used, and its `issuer`
    /// must equal [`IssuerConfig::issuer`] exactly.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// File holding an HS256 secret. Only for an issuer without public keys.
    #[serde(default)]
    pub hs256_secret_file: Option<PathBuf>,
    /// Allowed algorithms: RS256, PS256, ES256, EdDSA (or HS256 with a secret).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
    #[serde(default = "default_min_refresh")]
    pub min_refresh_interval_secs: u64,
    #[serde(default = "default_staleness")]
    pub max_staleness_secs: u64,
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    #[serde(default)]
    pub claims: ClaimMap,
    /// Trust payloads Envoy's `jwt_authn` filter verified for this issuer,
    /// found in the CheckRequest's metadata under this key. Only then.
    #[serde(default)]
    pub envoy_payload_key: Option<String>,
    /// Accepted header `typ` values, compared case-insensitively with any
    /// `application/` prefix dropped (RFC 7515 §4.1.9): so `at+jwt` also
    /// accepts `application/at+jwt`. ID, refresh, logout and security-event
    /// types can never be listed.
    #[serde(default = "default_token_types")]
    pub token_types: Vec<String>,
    /// Refuse a token without `typ` (RFC 9068 access tokens always have one;
    /// many IdPs still send none).
    #[serde(default)]
    pub require_token_type: bool,
    /// Payload claims whose presence marks an ID token (OIDC Core §2, §3.3.2.11).
    #[serde(default = "default_id_token_claims")]
    pub id_token_claims: Vec<String>,
    /// Longest a JWKS fetch (discovery document included) may take, in ms.
    #[serde(default = "default_fetch_timeout")]
    pub fetch_timeout_ms: u64,
    /// Largest JWKS or discovery document accepted, in bytes.
    #[serde(default = "default_max_jwks_bytes")]
    pub max_jwks_bytes: usize,
    /// Longest a request with an unknown `kid` waits for the refresh it
    /// started, in ms; after that it is refused and the refresh goes on.
    #[serde(default = "default_refresh_wait")]
    pub refresh_wait_ms: u64,
    /// Longest wait between fetch retries while fetches fail, in seconds.
    #[serde(default = "default_retry_max")]
    pub retry_max_secs: u64,
    /// A key that verified a token within this many seconds is "in use": a
    /// fetched set that drops every key in use is not installed.
    #[serde(default = "default_key_in_use")]
    pub key_in_use_secs: u64,
}

fn default_algorithms() -> Vec<String> {
    ["RS256", "PS256", "ES256", "EdDSA"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_leeway() -> u64 {
    30
}
fn default_refresh() -> u64 {
    300
}
fn default_min_refresh() -> u64 {
    30
}
fn default_staleness() -> u64 {
    86_400
}
fn default_max_token() -> usize {
    8192
}
fn default_token_types() -> Vec<String> {
    vec!["at+jwt".into(), "JWT".into()]
}
fn default_id_token_claims() -> Vec<String> {
    ["nonce", "at_hash", "c_hash", "s_hash"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn default_fetch_timeout() -> u64 {
    2000
}
fn default_max_jwks_bytes() -> usize {
    64 * 1024
}
fn default_refresh_wait() -> u64 {
    200
}
fn default_retry_max() -> u64 {
    30
}
fn default_key_in_use() -> u64 {
    900
}

pub(super) fn parse_alg(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "PS256" => Some(Algorithm::PS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        "HS256" => Some(Algorithm::HS256),
        _ => None,
    }
}

impl IssuerConfig {
    /// Checks the issuer; the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        let at = |m: String| format!("identity.jwt_issuers {:?}: {m}", self.name);
        if self.audiences.is_empty() {
            return Err(at(
                "audiences is empty; tokens for any audience would pass".into()
            ));
        }
        for a in &self.algorithms {
            if parse_alg(a).is_none() {
                return Err(at(format!(
                    "algorithm {a:?} is not allowed; use RS256, PS256, ES256, EdDSA or HS256"
                )));
            }
        }
        let public = [
            &self.jwks_file.as_ref().map(|_| ()),
            &self.jwks_url.as_ref().map(|_| ()),
            &self.discovery_url.as_ref().map(|_| ()),
        ]
        .iter()
        .filter(|x| x.is_some())
        .count();
        let hs = self.algorithms.iter().any(|a| a == "HS256");
        match (public, self.hs256_secret_file.is_some()) {
            (0, false) => {
                return Err(at(
                    "set one of jwks_file, jwks_url, discovery_url (or hs256_secret_file)".into(),
                ));
            }
            (n, _) if n > 1 => {
                return Err(at(
                    "set only one of jwks_file, jwks_url, discovery_url".into()
                ));
            }
            (1, true) => {
                return Err(at(
                    "HS256 secrets are never used for an issuer with public keys".into(),
                ));
            }
            (0, true) if self.algorithms != ["HS256"] => {
                return Err(at(
                    "with hs256_secret_file, algorithms must be [\"HS256\"]".into()
                ));
            }
            (1, false) if hs => {
                return Err(at("HS256 needs hs256_secret_file and no public keys".into()));
            }
            _ => {}
        }
        for (key, url) in [
            ("jwks_url", &self.jwks_url),
            ("discovery_url", &self.discovery_url),
        ] {
            if let Some(url) = url {
                fetch::checked_url(url).map_err(|e| at(format!("{key}: {e}")))?;
            }
        }
        for t in &self.token_types {
            if token::REFUSED_TYPES.contains(&token::normalize_type(t).as_str()) {
                return Err(at(format!(
                    "token_types: {t:?} is not an access token type and cannot be accepted"
                )));
            }
        }
        if self.fetch_timeout_ms == 0 || self.max_jwks_bytes == 0 {
            return Err(at(
                "fetch_timeout_ms and max_jwks_bytes must be at least 1".into()
            ));
        }
        Ok(())
    }
}
