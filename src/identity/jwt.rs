//! JWT / OAuth 2.0 bearer tokens, verified against each issuer's JWKS.
//!
//! Before any key is touched a token is read strictly ([`token`]): a
//! duplicate member name anywhere, a `crit` header, a `typ` outside the
//! issuer's `token_types` or an ID-token marker (`nonce`, `at_hash`,
//! `token_use: "id"`, …) refuses it (RFC 8725 §3.11, §3.12; RFC 9068).
//! `jsonwebtoken` then checks the signature and `exp`, `iss`, `aud` (always
//! required) and `nbf`; `iat` must not lie in the future beyond the leeway.
//! Only the issuer's configured algorithms are allowed; `alg: none` cannot
//! even be parsed. A token's header fields `jku`, `x5u`, `jwk` and `x5c` are
//! never read: keys come only from the issuer's configured JWKS.
//!
//! JWKS ([`keyset`]) are fetched with a time and size bound ([`fetch`]) and
//! refreshed periodically; while an issuer has no keys, fetches are retried
//! with a capped backoff. An unknown `kid` starts at most one background
//! refresh per `min_refresh_interval_secs` per issuer; a request waits for it
//! at most `refresh_wait_ms` and is otherwise refused (401) while the refresh
//! goes on. The last good keys keep serving through an outage (for
//! `max_staleness_secs`) and when a fetch is slow, oversized, unparsable or
//! drops every key in use. An issuer that has no keys (none yet at boot, or
//! stale) refuses its tokens and readiness says so.

pub mod config;
pub mod fetch;
mod issuer;
pub mod keyset;
pub mod token;

use std::sync::Arc;

use serde_json::{Map, Value};

pub use self::config::{ClaimMap, IssuerConfig};
pub use self::issuer::{Issuer, JwksError};
use self::token::Parts;
use super::{Authentication, Authenticator, SourceKind};
use crate::decision::Reason;
use crate::request::HttpRequest;

/// Where Envoy's `jwt_authn` filter puts verified payloads.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

/// Bearer tokens from the configured issuers.
pub struct JwtAuthenticator {
    issuers: Vec<Arc<Issuer>>,
}

impl JwtAuthenticator {
    /// Verifies tokens of `issuers`.
    pub fn new(issuers: Vec<Arc<Issuer>>) -> Self {
        Self { issuers }
    }
}

/// A bearer value shaped like a JWT (three base64url parts).
fn bearer_jwt(request: &HttpRequest) -> Option<&str> {
    let (scheme, value) = request.header("authorization")?.split_once(' ')?;
    let value = value.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && value.matches('.').count() == 2
        && !value.starts_with(super::key_format::PREFIX))
    .then_some(value)
}

#[tonic::async_trait]
impl Authenticator for JwtAuthenticator {
    fn kind(&self) -> SourceKind {
        SourceKind::Jwt
    }

    fn claims(&self, request: &HttpRequest) -> bool {
        bearer_jwt(request).is_some() || !request.jwt_authn_payloads.is_empty()
    }

    async fn authenticate(&self, request: &HttpRequest) -> Authentication {
        // Payloads Envoy's jwt_authn already verified, where configured.
        for issuer in &self.issuers {
            let Some(key) = &issuer.config.envoy_payload_key else {
                continue;
            };
            if let Some(claims) = request.jwt_authn_payloads.get(key) {
                if claims.get("iss").and_then(Value::as_str) != Some(issuer.config.issuer.as_str())
                {
                    return Authentication::Rejected(Reason::InvalidCredential);
                }
                let no_claims = Map::new();
                if let Err(r) = issuer.check_payload_type(claims.as_object().unwrap_or(&no_claims))
                {
                    return Authentication::Rejected(r);
                }
                return match issuer.principal(claims) {
                    Ok(p) => Authentication::Authenticated(p),
                    Err(r) => Authentication::Rejected(r),
                };
            }
        }
        let Some(token) = bearer_jwt(request) else {
            return Authentication::NotPresent;
        };
        if token.contains(',') {
            return Authentication::Rejected(Reason::AmbiguousCredential);
        }
        let max = self
            .issuers
            .iter()
            .map(|i| i.config.max_token_bytes)
            .max()
            .unwrap_or(8192);
        if token.len() > max {
            return Authentication::Rejected(Reason::MalformedCredential);
        }
        // Both JSON parts strictly (no duplicate member anywhere), before
        // any key is touched.
        let parts = match Parts::decode(token) {
            Ok(p) => p,
            Err(r) => return Authentication::Rejected(r),
        };
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Authentication::Rejected(Reason::MalformedCredential);
        };
        if let Err(r) = parts.check_crit() {
            return Authentication::Rejected(r);
        }
        // The unverified `iss`, only to pick which issuer verifies the token.
        let Some(iss) = parts.payload.get("iss").and_then(Value::as_str) else {
            return Authentication::Rejected(Reason::MalformedCredential);
        };
        let Some(issuer) = self.issuers.iter().find(|i| i.config.issuer == iss) else {
            return Authentication::Rejected(Reason::InvalidCredential);
        };
        let typ = match parts.typ() {
            Ok(t) => t,
            Err(r) => return Authentication::Rejected(r),
        };
        if let Err(r) = issuer.check_token_type(typ, &parts.payload) {
            return Authentication::Rejected(r);
        }
        match issuer
            .verify(
                token,
                header.alg,
                header.kid.as_deref(),
                parts.payload.contains_key("aud"),
            )
            .await
        {
            Ok(claims) => match issuer.principal(&claims) {
                Ok(p) => Authentication::Authenticated(p),
                Err(r) => Authentication::Rejected(r),
            },
            Err(r) => Authentication::Rejected(r),
        }
    }
}
