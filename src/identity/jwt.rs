//! JWT / OAuth 2.0 bearer tokens, verified against each issuer's JWKS.
//!
//! `jsonwebtoken` checks signatures and, only when told to, `nbf`, `aud` and
//! `iss`: every issuer here always requires `exp`, `iss` and `aud`, checks
//! `nbf`, and allows only its configured algorithms. `alg: none` cannot even
//! be parsed. A token's header fields `jku`, `x5u`, `jwk` and `x5c` are never
//! read: keys come only from the issuer's configured JWKS.
//!
//! JWKS are fetched, cached and refreshed periodically; an unknown `kid`
//! triggers at most one refresh per `min_refresh_interval_secs` per issuer
//! (concurrent requests share it), and the last good keys keep serving
//! through an outage for `max_staleness_secs`. An issuer that has no keys
//! (none yet at boot, or stale) refuses its tokens and readiness says so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;

use super::{Authentication, Authenticator, Principal, PrincipalKind, SourceKind};
use crate::decision::Reason;
use crate::request::HttpRequest;

/// Where Envoy's `jwt_authn` filter puts verified payloads.
pub const JWT_AUTHN_NAMESPACE: &str = "envoy.filters.http.jwt_authn";

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
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    /// HTTPS URL of the JWKS (plain HTTP only for loopback addresses).
    #[serde(default)]
    pub jwks_url: Option<String>,
    /// OIDC discovery document URL; its `jwks_uri` is used.
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

fn parse_alg(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "PS256" => Some(Algorithm::PS256),
        "ES256" => Some(Algorithm::ES256),
        "EdDSA" => Some(Algorithm::EdDSA),
        "HS256" => Some(Algorithm::HS256),
        _ => None,
    }
}

fn loopback(url: &str) -> bool {
    let rest = url.strip_prefix("http://").unwrap_or("");
    ["127.", "localhost:", "localhost/", "[::1]"]
        .iter()
        .any(|p| rest.starts_with(p))
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
        for url in [&self.jwks_url, &self.discovery_url].into_iter().flatten() {
            if !url.starts_with("https://") && !loopback(url) {
                return Err(at(format!(
                    "{url:?} must be https:// (plain http only on loopback)"
                )));
            }
        }
        Ok(())
    }
}

struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    /// Keys without a `kid`, tried when a token has none.
    unnamed: Vec<DecodingKey>,
    fetched: Instant,
}

/// A trusted issuer at run time.
pub struct Issuer {
    config: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: ArcSwapOption<Keys>,
    /// Held during any fetch; holds the time of the last unknown-kid refresh.
    refresh: tokio::sync::Mutex<Option<Instant>>,
    http: reqwest::Client,
}

impl Issuer {
    /// Prepares an issuer; keys are loaded by [`Issuer::refresh_now`].
    pub fn new(config: IssuerConfig) -> Result<Self, String> {
        config.validate()?;
        let algorithms = config
            .algorithms
            .iter()
            .filter_map(|a| parse_alg(a))
            .collect();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            algorithms,
            keys: ArcSwapOption::empty(),
            refresh: tokio::sync::Mutex::new(None),
            http,
        })
    }

    /// The issuer's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// How often keys are refreshed.
    pub fn refresh_interval(&self) -> Duration {
        Duration::from_secs(self.config.refresh_secs.max(1))
    }

    /// Whether the issuer has usable (not too stale) keys.
    pub fn ready(&self) -> bool {
        self.keys.load().as_ref().is_some_and(|k| {
            k.fetched.elapsed() <= Duration::from_secs(self.config.max_staleness_secs)
        })
    }

    async fn fetch(&self) -> Result<Keys, String> {
        if let Some(path) = &self.config.hs256_secret_file {
            let secret = tokio::fs::read(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let secret = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
            return Ok(Keys {
                by_kid: HashMap::new(),
                unnamed: vec![DecodingKey::from_secret(&secret)],
                fetched: Instant::now(),
            });
        }
        let text = if let Some(path) = &self.config.jwks_file {
            tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?
        } else {
            let url = match (&self.config.jwks_url, &self.config.discovery_url) {
                (Some(u), _) => u.clone(),
                (None, Some(d)) => {
                    let doc: Value = self
                        .get(d)
                        .await
                        .and_then(|t| serde_json::from_str(&t).map_err(|e| e.to_string()))?;
                    let uri = doc["jwks_uri"]
                        .as_str()
                        .ok_or("discovery document has no jwks_uri")?
                        .to_string();
                    if !uri.starts_with("https://") && !loopback(&uri) {
                        return Err(format!("jwks_uri {uri:?} is not https"));
                    }
                    uri
                }
                (None, None) => return Err("no key source".into()),
            };
            self.get(&url).await?
        };
        let set: JwkSet =
            serde_json::from_str(&text).map_err(|e| format!("JWKS does not parse: {e}"))?;
        let mut keys = Keys {
            by_kid: HashMap::new(),
            unnamed: Vec::new(),
            fetched: Instant::now(),
        };
        for jwk in &set.keys {
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            match &jwk.common.key_id {
                Some(kid) => {
                    keys.by_kid.insert(kid.clone(), key);
                }
                None => keys.unnamed.push(key),
            }
        }
        if keys.by_kid.is_empty() && keys.unnamed.is_empty() {
            return Err("JWKS has no usable keys".into());
        }
        Ok(keys)
    }

    async fn get(&self, url: &str) -> Result<String, String> {
        let resp = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        resp.text().await.map_err(|e| e.to_string())
    }

    /// Fetches keys now (boot and periodic refresh), keeping the last good
    /// ones on failure.
    pub async fn refresh_now(&self) {
        // Shares the lock (one fetch at a time) but not the unknown-kid
        // timestamp: a scheduled refresh must not delay a rotation pickup.
        let _one_at_a_time = self.refresh.lock().await;
        match self.fetch().await {
            Ok(keys) => self.keys.store(Some(Arc::new(keys))),
            Err(e) => {
                tracing::warn!(issuer = %self.config.name, error = %e, "cannot refresh JWKS; keeping the last good keys")
            }
        }
    }

    /// Refreshes for an unknown `kid`, at most once per interval; concurrent
    /// callers wait for the one fetch instead of starting their own.
    async fn refresh_for_unknown_kid(&self) {
        let mut last = self.refresh.lock().await;
        if last.is_some_and(|t| {
            t.elapsed() < Duration::from_secs(self.config.min_refresh_interval_secs)
        }) {
            return;
        }
        *last = Some(Instant::now());
        match self.fetch().await {
            Ok(keys) => self.keys.store(Some(Arc::new(keys))),
            Err(e) => tracing::warn!(issuer = %self.config.name, error = %e, "cannot refresh JWKS"),
        }
    }

    fn key_for(&self, kid: Option<&str>) -> Option<DecodingKey> {
        let keys = self.keys.load_full()?;
        if keys.fetched.elapsed() > Duration::from_secs(self.config.max_staleness_secs) {
            return None;
        }
        match kid {
            Some(k) => keys.by_kid.get(k).cloned(),
            None => (keys.unnamed.len() + keys.by_kid.len() == 1)
                .then(|| {
                    keys.unnamed
                        .first()
                        .or_else(|| keys.by_kid.values().next())
                        .cloned()
                })
                .flatten(),
        }
    }

    async fn verify(
        &self,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Value, Reason> {
        if !self.algorithms.contains(&alg) {
            return Err(Reason::InvalidCredential);
        }
        let key = match self.key_for(kid) {
            Some(k) => k,
            None => {
                self.refresh_for_unknown_kid().await;
                self.key_for(kid).ok_or(Reason::InvalidCredential)?
            }
        };
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&self.config.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.config.leeway_secs;
        jsonwebtoken::decode::<Value>(token, &key, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => Reason::ExpiredCredential,
                _ => Reason::InvalidCredential,
            })
    }

    fn principal(&self, claims: &Value) -> Result<Principal, Reason> {
        let m = &self.config.claims;
        let text = |name: &str| claims.get(name).and_then(Value::as_str).map(str::to_string);
        let subject = text(&m.subject)
            .filter(|s| !s.is_empty())
            .ok_or(Reason::InvalidCredential)?;
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
        Ok(Principal {
            kind: PrincipalKind::User,
            id: subject,
            tenant: text(&m.tenant),
            tier: text(&m.tier),
            scopes,
            groups,
            models: Vec::new(),
        })
    }
}

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

/// The unverified `iss`, only to pick which issuer verifies the token.
fn unverified_issuer(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
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
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Authentication::Rejected(Reason::MalformedCredential);
        };
        let Some(iss) = unverified_issuer(token) else {
            return Authentication::Rejected(Reason::MalformedCredential);
        };
        let Some(issuer) = self.issuers.iter().find(|i| i.config.issuer == iss) else {
            return Authentication::Rejected(Reason::InvalidCredential);
        };
        match issuer
            .verify(token, header.alg, header.kid.as_deref())
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
