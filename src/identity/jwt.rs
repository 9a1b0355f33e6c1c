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

pub mod fetch;
pub mod keyset;
pub mod token;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use serde_json::{Map, Value};

use self::keyset::KeySet;
use self::token::Parts;
use super::{Authentication, Authenticator, Principal, PrincipalKind, SourceKind};
use crate::decision::Reason;
use crate::metrics::Metrics;
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

/// First wait before retrying a failed fetch; doubles up to `retry_max_secs`.
const FIRST_RETRY: Duration = Duration::from_millis(500);

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

/// Why a JWKS fetch did not install keys. The last good keys keep serving.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("{0}")]
    Url(String),
    #[error("cannot read {path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Get(#[from] fetch::GetError),
    #[error("fetch took longer than fetch_timeout_ms = {0}")]
    Timeout(u64),
    #[error("discovery document: {0}")]
    Discovery(String),
    #[error(
        "discovery document names issuer {found:?}, not the configured {expected:?} (OIDC Discovery §4.3)"
    )]
    IssuerMismatch { expected: String, found: String },
    #[error(transparent)]
    KeySet(#[from] keyset::KeySetError),
    #[error(
        "the fetched JWKS drops every key that verified a token in the last key_in_use_secs; kept the last good keys"
    )]
    DropsKeysInUse,
}

impl JwksError {
    /// The `result` label of `tollgate_jwks_fetches_total`.
    fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Get(fetch::GetError::TooLarge { .. }) => "too_large",
            Self::KeySet(_) => "unparsable",
            Self::IssuerMismatch { .. } => "issuer_mismatch",
            Self::DropsKeysInUse => "drops_keys_in_use",
            _ => "failed",
        }
    }
}

/// A trusted issuer at run time.
pub struct Issuer {
    config: IssuerConfig,
    algorithms: Vec<Algorithm>,
    keys: ArcSwapOption<KeySet>,
    /// Held during any fetch: one at a time per issuer.
    fetching: tokio::sync::Mutex<()>,
    /// When the last unknown-kid refresh was started.
    last_on_demand: Mutex<Option<Instant>>,
    /// Bumped after every fetch attempt; requests waiting on a refresh
    /// watch it.
    attempts: tokio::sync::watch::Sender<u64>,
    http: reqwest::Client,
    metrics: OnceLock<Arc<Metrics>>,
}

impl Issuer {
    /// Prepares an issuer; keys are loaded by [`Issuer::refresh_now`] or
    /// [`Issuer::keep_fresh`].
    pub fn new(config: IssuerConfig) -> Result<Self, String> {
        config.validate()?;
        let algorithms = config
            .algorithms
            .iter()
            .filter_map(|a| parse_alg(a))
            .collect();
        let timeout = Duration::from_millis(config.fetch_timeout_ms);
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            config,
            algorithms,
            keys: ArcSwapOption::empty(),
            fetching: tokio::sync::Mutex::new(()),
            last_on_demand: Mutex::new(None),
            attempts: tokio::sync::watch::Sender::new(0),
            http,
            metrics: OnceLock::new(),
        })
    }

    /// Counts fetch results in `metrics` from now on.
    pub fn report_to(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
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

    async fn read_source(&self) -> Result<Vec<u8>, JwksError> {
        let max = self.config.max_jwks_bytes;
        if let Some(path) = &self.config.jwks_file {
            return tokio::fs::read(path).await.map_err(|e| JwksError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            });
        }
        let url = match (&self.config.jwks_url, &self.config.discovery_url) {
            (Some(u), _) => fetch::checked_url(u).map_err(JwksError::Url)?,
            (None, Some(d)) => {
                let d = fetch::checked_url(d).map_err(JwksError::Url)?;
                let body = fetch::get_bounded(&self.http, &d, max).await?;
                let doc: Value = serde_json::from_slice(&body)
                    .map_err(|e| JwksError::Discovery(format!("not JSON: {e}")))?;
                // The mix-up defence: a document for another issuer (a
                // wrong URL, a shared host) must not lend us its keys.
                let found = doc["issuer"].as_str().unwrap_or_default();
                if found != self.config.issuer {
                    return Err(JwksError::IssuerMismatch {
                        expected: self.config.issuer.clone(),
                        found: found.to_string(),
                    });
                }
                let uri = doc["jwks_uri"]
                    .as_str()
                    .ok_or_else(|| JwksError::Discovery("no jwks_uri".into()))?;
                fetch::checked_url(uri)
                    .map_err(|e| JwksError::Discovery(format!("jwks_uri {e}")))?
            }
            (None, None) => return Err(JwksError::Url("no key source".into())),
        };
        Ok(fetch::get_bounded(&self.http, &url, max).await?)
    }

    async fn load(&self) -> Result<KeySet, JwksError> {
        if let Some(path) = &self.config.hs256_secret_file {
            let secret = tokio::fs::read(path).await.map_err(|e| JwksError::File {
                path: path.display().to_string(),
                message: e.to_string(),
            })?;
            let secret = String::from_utf8_lossy(&secret).trim().as_bytes().to_vec();
            return Ok(KeySet::secret(&secret));
        }
        let body = self.read_source().await?;
        let (keys, skipped) = KeySet::from_jwks(&body)?;
        for why in &skipped.refused {
            tracing::warn!(issuer = %self.config.name, key = %why, "JWKS member skipped");
        }
        if !skipped.ignored.is_empty() {
            tracing::debug!(issuer = %self.config.name, keys = ?skipped.ignored, "JWKS members not used for signatures");
        }
        if let Some(m) = self.metrics.get() {
            m.jwks_keys_refused(&self.config.name, skipped.refused.len() as u64);
        }
        Ok(keys)
    }

    /// Fetches keys now, within `fetch_timeout_ms`, and installs them unless
    /// they would drop every key in use. On any failure the last good keys
    /// keep serving; the failure is logged and counted.
    pub async fn refresh_now(&self) -> Result<(), JwksError> {
        let _one_at_a_time = self.fetching.lock().await;
        let limit = Duration::from_millis(self.config.fetch_timeout_ms);
        let result = match tokio::time::timeout(limit, self.load()).await {
            Ok(r) => r,
            Err(_) => Err(JwksError::Timeout(self.config.fetch_timeout_ms)),
        }
        .and_then(|next| self.install(next));
        self.attempts.send_modify(|n| *n += 1);
        let label = match &result {
            Ok(()) => "swapped",
            Err(e) => {
                tracing::warn!(issuer = %self.config.name, error = %e, "cannot refresh JWKS; keeping the last good keys");
                e.label()
            }
        };
        if let Some(m) = self.metrics.get() {
            m.jwks_fetch(&self.config.name, label);
        }
        result
    }

    fn install(&self, next: KeySet) -> Result<(), JwksError> {
        // Files are the operator's own edits: installed as they are. Sets
        // fetched over the network must keep a key in use.
        let fetched = self.config.jwks_url.is_some() || self.config.discovery_url.is_some();
        if let Some(old) = self.keys.load_full() {
            if fetched && old.drops_every_key_in_use(&next, self.config.key_in_use_secs) {
                return Err(JwksError::DropsKeysInUse);
            }
            old.carry_usage_to(&next);
        }
        self.keys.store(Some(Arc::new(next)));
        Ok(())
    }

    /// Loads keys and keeps them fresh, forever: every `refresh_secs` after a
    /// success; after a failure, retries from 0.5 s, doubling up to
    /// `retry_max_secs` (never longer than `refresh_secs`), so an IdP that is
    /// down at boot is picked up soon after it comes back.
    pub async fn keep_fresh(self: Arc<Self>) {
        let cap =
            Duration::from_secs(self.config.retry_max_secs.max(1)).min(self.refresh_interval());
        let mut backoff = FIRST_RETRY.min(cap);
        loop {
            match self.refresh_now().await {
                Ok(()) => {
                    backoff = FIRST_RETRY.min(cap);
                    tokio::time::sleep(self.refresh_interval()).await;
                }
                Err(_) => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(cap);
                }
            }
        }
    }

    /// For an unknown `kid`: starts one background refresh per
    /// `min_refresh_interval_secs` (concurrent callers share it) and waits
    /// for it, or for one already running, at most `refresh_wait_ms`.
    async fn refresh_for_unknown_kid(self: &Arc<Self>) {
        let mut attempts = self.attempts.subscribe();
        let start = {
            let Ok(mut last) = self.last_on_demand.lock() else {
                return;
            };
            let due = last.is_none_or(|t| {
                t.elapsed() >= Duration::from_secs(self.config.min_refresh_interval_secs)
            });
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if start {
            let me = self.clone();
            tokio::spawn(async move {
                let _ = me.refresh_now().await;
            });
        } else if self.fetching.try_lock().is_ok() {
            return; // Rate-limited and nothing in flight to wait for.
        }
        let wait = Duration::from_millis(self.config.refresh_wait_ms);
        let _ = tokio::time::timeout(wait, attempts.changed()).await;
    }

    fn current_keys(&self) -> Option<Arc<KeySet>> {
        self.keys
            .load_full()
            .filter(|k| k.fetched.elapsed() <= Duration::from_secs(self.config.max_staleness_secs))
    }

    /// Refuses a token that is not an access token: a header `typ` this
    /// issuer does not accept (or none, when one is required), or a payload
    /// that marks an ID, refresh or logout token. `azp` alone never refuses:
    /// several IdPs (Keycloak, Google) put it in access tokens too.
    fn check_token_type(
        &self,
        typ: Option<&str>,
        payload: &Map<String, Value>,
    ) -> Result<(), Reason> {
        match typ {
            None if self.config.require_token_type => return Err(Reason::WrongTokenType),
            None => {}
            Some(t) => {
                let t = token::normalize_type(t);
                if !self
                    .config
                    .token_types
                    .iter()
                    .any(|a| token::normalize_type(a) == t)
                {
                    return Err(Reason::WrongTokenType);
                }
            }
        }
        self.check_payload_type(payload)
    }

    fn check_payload_type(&self, payload: &Map<String, Value>) -> Result<(), Reason> {
        if self
            .config
            .id_token_claims
            .iter()
            .any(|c| payload.contains_key(c))
            || token::payload_says_not_access(payload)
        {
            return Err(Reason::WrongTokenType);
        }
        Ok(())
    }

    async fn verify(
        self: &Arc<Self>,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
    ) -> Result<Value, Reason> {
        if !self.algorithms.contains(&alg) {
            return Err(Reason::InvalidCredential);
        }
        let has_candidates = |k: &Option<Arc<KeySet>>| {
            k.as_ref()
                .is_some_and(|k| !k.candidates(kid, alg).is_empty())
        };
        let mut keys = self.current_keys();
        if !has_candidates(&keys) {
            self.refresh_for_unknown_kid().await;
            keys = self.current_keys();
        }
        let keys = keys.ok_or(Reason::InvalidCredential)?;
        let mut v = Validation::new(alg);
        v.algorithms = vec![alg];
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&self.config.audiences);
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        v.validate_nbf = true;
        v.leeway = self.config.leeway_secs;
        let mut outcome = Err(Reason::InvalidCredential);
        for key in keys.candidates(kid, alg) {
            match jsonwebtoken::decode::<Value>(token, &key.decoding, &v) {
                Ok(d) => {
                    key.mark_used();
                    outcome = Ok(d.claims);
                    break;
                }
                // Not this key: try the next candidate.
                Err(e) if is_key_mismatch(e.kind()) => {}
                Err(e) => {
                    // The signature held; a claim did not.
                    key.mark_used();
                    outcome = Err(match e.kind() {
                        ErrorKind::ExpiredSignature => Reason::ExpiredCredential,
                        ErrorKind::ImmatureSignature => Reason::NotYetValid,
                        _ => Reason::InvalidCredential,
                    });
                    break;
                }
            }
        }
        let claims = outcome?;
        // `iat` in the future (beyond the leeway) is a token from a clock or
        // issuer that cannot be trusted; jsonwebtoken does not look at it.
        match claims.get("iat") {
            None => {}
            Some(Value::Number(n)) => {
                let now = jsonwebtoken::get_current_timestamp() as f64;
                if n.as_f64()
                    .is_none_or(|iat| iat > now + self.config.leeway_secs as f64)
                {
                    return Err(Reason::InvalidCredential);
                }
            }
            Some(_) => return Err(Reason::InvalidCredential),
        }
        Ok(claims)
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

/// Errors meaning "this key did not verify this token", after which the
/// next candidate key is tried; any other error means the signature held
/// and a claim failed.
fn is_key_mismatch(kind: &ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::InvalidSignature
            | ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidRsaKey(_)
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::Provider(_)
    )
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
