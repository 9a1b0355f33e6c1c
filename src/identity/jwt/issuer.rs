//! A trusted issuer at run time: its keys, how they are fetched and kept
//! fresh, and how one token is checked against them.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::config::{IssuerConfig, parse_alg};
use super::keyset::{self, KeySet};
use super::{fetch, token};
use crate::decision::Reason;
use crate::identity::Principal;
use crate::metrics::Metrics;

/// First wait before retrying a failed fetch; doubles up to `retry_max_secs`.
const FIRST_RETRY: Duration = Duration::from_millis(500);

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
            Self::Timeout(_) | Self::Get(fetch::GetError::Timeout { .. }) => "timeout",
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
    pub(super) config: IssuerConfig,
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
    pub(super) fn check_token_type(
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

    pub(super) fn check_payload_type(&self, payload: &Map<String, Value>) -> Result<(), Reason> {
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

    pub(super) async fn verify(
        self: &Arc<Self>,
        token: &str,
        alg: Algorithm,
        kid: Option<&str>,
        has_aud: bool,
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
        if self.config.relaxed_audience && !has_aud {
            // The issuer is configured as one that omits `aud`.
            tracing::warn!(issuer = %self.config.name, "audience relaxed: token without aud accepted");
            v.validate_aud = false;
            v.set_required_spec_claims(&["exp", "iss"]);
        } else {
            v.set_audience(&self.config.audiences);
            v.set_required_spec_claims(&["exp", "iss", "aud"]);
        }
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

    pub(super) fn principal(&self, claims: &Value) -> Result<Principal, Reason> {
        super::config::principal_of(&self.config.claims, claims, None)
    }
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
