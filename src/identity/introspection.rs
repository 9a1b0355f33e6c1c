//! OAuth 2.0 token introspection (RFC 7662) for opaque bearer tokens
//! (`[identity.introspection]`, source `introspection`).
//!
//! A bearer value that is neither a JWT (three dot-separated parts) nor a
//! Tollgate API key is POSTed (`token=…&token_type_hint=access_token`) to
//! the endpoint with the client's credentials (`client_secret_basic`, RFC
//! 6749 §2.3.1). The answer is read bounded in time and size: only a JSON
//! object with `"active": true`, an `exp` in the future (when present) and,
//! where configured, a matching `iss` and `aud` authenticates. Claims map
//! onto a `User` principal like JWT claims ([`ClaimMap`]); without `sub` the
//! `client_id` is the subject.
//!
//! Answers are cached by the token's SHA-256: active ones until `exp` or
//! `cache_max_secs`, whichever is first; inactive ones for
//! `negative_cache_secs`. Concurrent requests with one token share one
//! introspection (moka's `try_get_with`). At most `max_requests_per_sec`
//! introspections leave per second; beyond that, and whenever the endpoint
//! fails (down, slow, non-2xx, too large, not JSON, no boolean `active`),
//! the request is refused as `unavailable` (503) and nothing is cached:
//! never an allow. A failure also makes Tollgate unready until an answer
//! comes back (a probe every `probe_secs` checks).

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::jwt::ClaimMap;
use super::{Authentication, Authenticator, Principal, SourceKind};
use crate::decision::Reason;
use crate::request::HttpRequest;

/// `[identity.introspection]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// A short name for logs and readiness.
    #[serde(default = "default_name")]
    pub name: String,
    /// The introspection endpoint: https (plain http only on loopback).
    pub endpoint: String,
    /// This resource server's client id at the authorization server.
    pub client_id: String,
    /// File holding the client secret (never inline in the config).
    pub client_secret_file: PathBuf,
    /// When set, the answer's `iss` must equal it.
    #[serde(default)]
    pub issuer: Option<String>,
    /// When non-empty, the answer's `aud` must name one of these.
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub claims: ClaimMap,
    /// Longest an introspection may take, in ms.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Largest answer accepted, in bytes.
    #[serde(default = "default_max_response")]
    pub max_response_bytes: usize,
    /// Longest an active answer is reused, in seconds (also bounded by the
    /// token's `exp`).
    #[serde(default = "default_cache_max")]
    pub cache_max_secs: u64,
    /// How long an inactive answer is reused, in seconds.
    #[serde(default = "default_negative")]
    pub negative_cache_secs: u64,
    /// Introspections sent per second at most (cache misses beyond it are
    /// refused as `unavailable`).
    #[serde(default = "default_rate")]
    pub max_requests_per_sec: u64,
    /// Longest opaque token sent; longer ones are refused unread.
    #[serde(default = "default_max_token")]
    pub max_token_bytes: usize,
    /// Seconds between readiness probes.
    #[serde(default = "default_probe")]
    pub probe_secs: u64,
}

fn default_name() -> String {
    "introspection".into()
}
fn default_timeout() -> u64 {
    1000
}
fn default_max_response() -> usize {
    64 * 1024
}
fn default_cache_max() -> u64 {
    300
}
fn default_negative() -> u64 {
    30
}
fn default_rate() -> u64 {
    100
}
fn default_max_token() -> usize {
    4096
}
fn default_probe() -> u64 {
    10
}

impl IntrospectionConfig {
    /// Checks the endpoint and bounds; the message names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        super::jwt::fetch::checked_url(&self.endpoint)
            .map_err(|e| format!("identity.introspection.endpoint: {e}"))?;
        if self.client_id.is_empty() {
            return Err("identity.introspection.client_id is empty".into());
        }
        for (key, v) in [
            ("timeout_ms", self.timeout_ms),
            ("max_requests_per_sec", self.max_requests_per_sec),
            ("probe_secs", self.probe_secs),
            ("max_response_bytes", self.max_response_bytes as u64),
        ] {
            if v == 0 {
                return Err(format!("identity.introspection.{key} must be at least 1"));
            }
        }
        Ok(())
    }
}

/// A cached answer.
#[derive(Debug, Clone)]
enum Answer {
    /// Active, with the principal and how long the answer may be reused.
    Active(Principal, Duration),
    Inactive,
}

struct AnswerExpiry {
    negative: Duration,
}

impl moka::Expiry<[u8; 32], Arc<Answer>> for AnswerExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Arc<Answer>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(match value.as_ref() {
            Answer::Active(_, ttl) => *ttl,
            Answer::Inactive => self.negative,
        })
    }
}

/// Opaque bearer tokens, introspected.
pub struct Introspector {
    config: IntrospectionConfig,
    endpoint: url::Url,
    authorization: String,
    http: reqwest::Client,
    cache: moka::future::Cache<[u8; 32], Arc<Answer>>,
    /// Introspections sent in the current second: (second, count).
    window: std::sync::Mutex<(u64, u64)>,
    healthy: AtomicBool,
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
}

impl Introspector {
    /// Reads the client secret and builds the client; errors name the key.
    pub fn new(config: IntrospectionConfig) -> Result<Self, String> {
        config.validate()?;
        let endpoint = super::jwt::fetch::checked_url(&config.endpoint)?;
        let secret = std::fs::read_to_string(&config.client_secret_file).map_err(|e| {
            format!(
                "identity.introspection.client_secret_file {}: {e}",
                config.client_secret_file.display()
            )
        })?;
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let authorization = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!(
                "{}:{}",
                enc(&config.client_id),
                enc(secret.trim())
            ))
        );
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("identity.introspection: {e}"))?;
        Ok(Self {
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .expire_after(AnswerExpiry {
                    negative: Duration::from_secs(config.negative_cache_secs),
                })
                .build(),
            config,
            endpoint,
            authorization,
            http,
            window: std::sync::Mutex::new((0, 0)),
            healthy: AtomicBool::new(false),
            metrics: std::sync::OnceLock::new(),
        })
    }

    /// Counts introspections into `metrics`
    /// (`tollgate_introspections_total{result}`).
    pub fn report_to(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The configured name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the endpoint's last answer (to a request or a probe) was a
    /// readable one.
    pub fn ready(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    fn count(&self, result: &'static str) {
        if let Some(m) = self.metrics.get() {
            m.introspection(result);
        }
    }

    /// Probes the endpoint now and every `probe_secs`, keeping [`Self::ready`]
    /// current while no requests come.
    pub async fn keep_probing(self: Arc<Self>) {
        loop {
            let _ = self.ask("tollgate-readiness-probe").await;
            tokio::time::sleep(Duration::from_secs(self.config.probe_secs)).await;
        }
    }

    /// Whether one more introspection fits in this second's budget.
    fn admit(&self) -> bool {
        let second = now_secs();
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.0 != second {
            *w = (second, 0);
        }
        if w.1 >= self.config.max_requests_per_sec {
            return false;
        }
        w.1 += 1;
        true
    }

    /// One introspection, bounded by `timeout_ms` overall. `Err` for any
    /// answer that is not a readable RFC 7662 response.
    async fn ask(&self, token: &str) -> Result<Value, String> {
        let body: String = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("token", token)
            .append_pair("token_type_hint", "access_token")
            .finish();
        let call = async {
            let resp = self
                .http
                .post(self.endpoint.clone())
                .header("authorization", &self.authorization)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("accept", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| super::jwt::fetch::transport_error(&self.endpoint, e))?;
            super::jwt::fetch::read_bounded(resp, &self.endpoint, self.config.max_response_bytes)
                .await
        };
        let result =
            match tokio::time::timeout(Duration::from_millis(self.config.timeout_ms), call).await {
                Err(_) => Err("no answer within timeout_ms".to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Ok(Ok(bytes)) => match serde_json::from_slice::<Value>(&bytes) {
                    Ok(v) if v.get("active").is_some_and(Value::is_boolean) => Ok(v),
                    Ok(_) => Err("answer has no boolean \"active\"".to_string()),
                    Err(_) => Err("answer is not JSON".to_string()),
                },
            };
        self.healthy.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    /// What the endpoint says of `token`, as a cacheable answer.
    async fn answer(&self, token: &str) -> Result<Arc<Answer>, Reason> {
        if !self.admit() {
            self.count("rate_limited");
            tracing::warn!(
                introspection = %self.config.name,
                "introspection rate bound reached; request refused"
            );
            return Err(Reason::Unavailable);
        }
        let claims = self.ask(token).await.map_err(|e| {
            self.count("error");
            tracing::warn!(introspection = %self.config.name, error = %e, "token introspection failed; request refused");
            Reason::Unavailable
        })?;
        let answer = self.judge(&claims);
        self.count(match answer {
            Answer::Active(..) => "active",
            Answer::Inactive => "inactive",
        });
        Ok(Arc::new(answer))
    }

    /// An active answer that is current, from the configured issuer and for
    /// a configured audience, with a subject; anything else is inactive.
    fn judge(&self, claims: &Value) -> Answer {
        if claims.get("active") != Some(&Value::Bool(true)) {
            return Answer::Inactive;
        }
        let now = now_secs();
        let exp = match claims.get("exp") {
            None => None,
            Some(v) => match v.as_u64() {
                Some(e) if e > now => Some(e),
                _ => return Answer::Inactive,
            },
        };
        if let Some(iss) = &self.config.issuer
            && claims.get("iss").and_then(Value::as_str) != Some(iss.as_str())
        {
            return Answer::Inactive;
        }
        if !self.config.audiences.is_empty() {
            let named = |a: &str| self.config.audiences.iter().any(|x| x == a);
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => named(a),
                Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).any(named),
                _ => false,
            };
            if !ok {
                return Answer::Inactive;
            }
        }
        let Ok(principal) =
            super::jwt::config::principal_of(&self.config.claims, claims, Some("client_id"))
        else {
            return Answer::Inactive;
        };
        let ceiling = Duration::from_secs(self.config.cache_max_secs);
        let ttl = exp.map_or(ceiling, |e| Duration::from_secs(e - now).min(ceiling));
        Answer::Active(principal, ttl)
    }
}

/// An opaque bearer value: not a JWT, not a Tollgate key.
fn bearer_opaque(request: &HttpRequest) -> Option<&str> {
    let (scheme, value) = request.header("authorization")?.split_once(' ')?;
    let value = value.trim();
    (scheme.eq_ignore_ascii_case("bearer")
        && !value.is_empty()
        && value.matches('.').count() != 2
        && !value.starts_with(super::key_format::PREFIX))
    .then_some(value)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[tonic::async_trait]
impl Authenticator for Introspector {
    fn kind(&self) -> SourceKind {
        SourceKind::Introspection
    }

    fn claims(&self, request: &HttpRequest) -> bool {
        bearer_opaque(request).is_some()
    }

    async fn authenticate(&self, request: &HttpRequest) -> Authentication {
        let Some(token) = bearer_opaque(request) else {
            return Authentication::NotPresent;
        };
        if token.contains(',') {
            return Authentication::Rejected(Reason::AmbiguousCredential);
        }
        if token.len() > self.config.max_token_bytes || !token.bytes().all(|b| b.is_ascii_graphic())
        {
            return Authentication::Rejected(Reason::MalformedCredential);
        }
        let key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        // One introspection per token at a time; failures are not cached.
        match self.cache.try_get_with(key, self.answer(token)).await {
            Ok(answer) => match answer.as_ref() {
                Answer::Active(p, _) => Authentication::Authenticated(p.clone()),
                Answer::Inactive => Authentication::Rejected(Reason::InvalidCredential),
            },
            Err(reason) => Authentication::Rejected(*reason),
        }
    }
}
