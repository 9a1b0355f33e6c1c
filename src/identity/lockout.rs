//! Brute-force lockout: repeated authentication failures from one source
//! within a window refuse that source for a cool-down.
//!
//! A *source* is always tied to the client address the gateway reports
//! (`context.http.source_ip`, after [`crate::request::client_ip`]):
//!
//! - `address` — every counted failure from the address;
//! - `key` — an API key id presented **with a wrong secret** from the
//!   address (`<key id> @ <address>`);
//! - `subject` — the `sub` of a refused bearer JWT from the address
//!   (`<sub> @ <address>`; the claim is read without verification, only to
//!   name the counter).
//!
//! Keying on the address is the anti-spray rule: an attacker who sprays a
//! victim's key id from elsewhere locks only *their own* address (and
//! their own `key id @ address`), never the victim's key everywhere. The
//! price: a distributed attacker with many addresses gets
//! `key_failures` guesses per address (against 190-bit keys, harmless).
//!
//! Failures are counted in the quota store ([`QuotaStore::charge`], sliding
//! window, usage mode) and a lock is a record kept for the cool-down
//! ([`QuotaStore::put_record`]), so every replica sharing the store
//! agrees. Counter and record names are hashed before they reach Redis.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;

use crate::decision::Reason;
use crate::quota::memory::{Clock, SystemClock};
use crate::quota::{Algorithm, Charge, ChargeMode, CounterKey, QuotaStore, Unit};
use crate::request::HttpRequest;

/// What to do when the quota store cannot answer a lockout question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Refuse the request (503 `quota_unavailable`). The default.
    #[default]
    Deny,
    /// Decide as if no lock applied.
    Allow,
}

/// `[identity.lockout]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LockoutConfig {
    /// Off by default: no store round trip is added to any request.
    pub enabled: bool,
    /// The sliding window failures are counted in.
    pub window: Unit,
    /// Failures from one address within the window that lock the address.
    pub address_failures: u64,
    /// Wrong secrets for one key id from one address that lock that pair.
    pub key_failures: u64,
    /// Refused tokens of one JWT subject from one address that lock that
    /// pair.
    pub subject_failures: u64,
    /// How long a lock lasts, in seconds.
    pub cooldown_secs: u64,
    /// Addresses never counted nor locked (health checkers, a NAT gateway
    /// of your own), as CIDRs (`10.0.0.0/8`, `::1/128`).
    pub exempt_cidrs: Vec<ipnet::IpNet>,
    /// `deny` (default) or `allow` when the store cannot answer.
    pub on_store_error: OnStoreError,
}

impl Default for LockoutConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            window: Unit::Minute,
            address_failures: 20,
            key_failures: 5,
            subject_failures: 5,
            cooldown_secs: 300,
            exempt_cidrs: Vec::new(),
            on_store_error: OnStoreError::Deny,
        }
    }
}

impl LockoutConfig {
    /// Checks the limits; the message names the key to fix.
    pub fn validate(&self) -> Result<(), String> {
        for (key, value) in [
            ("address_failures", self.address_failures),
            ("key_failures", self.key_failures),
            ("subject_failures", self.subject_failures),
            ("cooldown_secs", self.cooldown_secs),
        ] {
            if value == 0 {
                return Err(format!(
                    "identity.lockout.{key} must be at least 1 (0 would lock on the first failure or never unlock)"
                ));
            }
        }
        Ok(())
    }
}

/// Which kind of source a lock is on; the `kind` label of the lockout
/// metrics and the `quota_rule` (`lockout:<kind>`) of the decision log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockKind {
    Address,
    Key,
    Subject,
}

impl LockKind {
    /// `address`, `key`, `subject`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Key => "key",
            Self::Subject => "subject",
        }
    }
}

/// A source that is locked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locked {
    pub kind: LockKind,
    /// The failure limit of that source (for the RateLimit headers).
    pub limit: u64,
    /// Until the lock ends (at least one second).
    pub retry_after: Duration,
}

/// Why a request is refused before authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Locked(Locked),
    /// The store could not answer and `on_store_error = "deny"`.
    StoreFailed,
}

/// One counted source of a request.
struct Source {
    kind: LockKind,
    /// `<kind>\0<identifier>`: the counter's descriptor and the lock's name.
    name: String,
    limit: u64,
}

/// The lockout guard over a quota store.
pub struct Lockout {
    config: LockoutConfig,
    store: Arc<dyn QuotaStore>,
    deadline: Duration,
    clock: Arc<dyn Clock>,
    /// Locks this replica has seen, with their end (ms): a flood from a
    /// locked source stops costing store round trips.
    known: moka::sync::Cache<String, u64>,
    metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Lockout {
    /// A guard counting in `store`, waiting at most `deadline` for it.
    pub fn new(config: LockoutConfig, store: Arc<dyn QuotaStore>, deadline: Duration) -> Self {
        let ttl = Duration::from_secs(config.cooldown_secs.max(1));
        Self {
            config,
            store,
            deadline,
            clock: Arc::new(SystemClock),
            known: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            metrics: None,
        }
    }

    /// Counts locks and refusals into `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Uses `clock` for lock ends (tests).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    fn exempt(&self, ip: IpAddr) -> bool {
        self.config.exempt_cidrs.iter().any(|n| n.contains(&ip))
    }

    /// The sources of `request`: none without a client address or from an
    /// exempt one.
    fn sources(&self, request: &HttpRequest) -> Vec<Source> {
        let Some(ip) = request.source_ip.filter(|ip| !self.exempt(*ip)) else {
            return Vec::new();
        };
        let mut out = vec![Source {
            kind: LockKind::Address,
            name: format!("address\0{ip}"),
            limit: self.config.address_failures,
        }];
        if let Some(id) = presented_key_id(request) {
            out.push(Source {
                kind: LockKind::Key,
                name: format!("key\0{id}\0{ip}"),
                limit: self.config.key_failures,
            });
        }
        if let Some(sub) = unverified_subject(request) {
            out.push(Source {
                kind: LockKind::Subject,
                name: format!("subject\0{sub}\0{ip}"),
                limit: self.config.subject_failures,
            });
        }
        out
    }

    fn retry_after(&self, until_ms: u64) -> Duration {
        let left = until_ms.saturating_sub(self.clock.now_ms());
        Duration::from_millis(left)
            .clamp(Duration::from_secs(1), self.cooldown())
            .max(Duration::from_secs(1))
    }

    fn cooldown(&self) -> Duration {
        Duration::from_secs(self.config.cooldown_secs.max(1))
    }

    fn refuse(&self, source: &Source, until_ms: u64) -> Refusal {
        if let Some(m) = &self.metrics {
            m.lockout_refusal(source.kind.label());
        }
        Refusal::Locked(Locked {
            kind: source.kind,
            limit: source.limit,
            retry_after: self.retry_after(until_ms),
        })
    }

    fn store_failed(&self, error: &str) -> Result<(), Refusal> {
        tracing::warn!(error, "lockout: quota store did not answer");
        match self.config.on_store_error {
            OnStoreError::Deny => Err(Refusal::StoreFailed),
            OnStoreError::Allow => Ok(()),
        }
    }

    /// Refuses `request` if one of its sources is locked. Asked before the
    /// credential is verified, so a locked source cannot keep guessing.
    pub async fn check(&self, request: &HttpRequest) -> Result<(), Refusal> {
        let now = self.clock.now_ms();
        for source in self.sources(request) {
            if let Some(until) = self.known.get(&source.name).filter(|u| *u > now) {
                return Err(self.refuse(&source, until));
            }
            let record = match tokio::time::timeout(
                self.deadline,
                self.store.get_record(&lock_name(&source.name)),
            )
            .await
            {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return self.store_failed(&e.to_string()),
                Err(_) => return self.store_failed("timeout"),
            };
            if let Some(record) = record {
                // A record that does not parse still locks, for the cool-down.
                let until = record
                    .parse::<u64>()
                    .unwrap_or_else(|_| now.saturating_add(self.config.cooldown_secs * 1000));
                self.known.insert(source.name.clone(), until);
                return Err(self.refuse(&source, until));
            }
        }
        Ok(())
    }

    /// Counts a refused credential (`reason`) against the request's sources
    /// and locks each source whose count reaches its limit. Reasons that
    /// are not a failed guess (no credential, store down, a bad key record,
    /// a source not allowed) are not counted. Store errors are logged, not
    /// returned: the request is refused anyway.
    pub async fn failed(&self, request: &HttpRequest, reason: Reason) {
        if !counted(reason) {
            return;
        }
        for source in self.sources(request) {
            let counts_here = match source.kind {
                LockKind::Address | LockKind::Subject => true,
                // Only a wrong secret counts against a key id.
                LockKind::Key => reason == Reason::InvalidCredential,
            };
            if counts_here && let Err(e) = self.count(&source).await {
                tracing::warn!(error = %e, kind = source.kind.label(), "lockout: failure not counted");
            }
        }
    }

    async fn count(&self, source: &Source) -> Result<(), String> {
        let charge = Charge {
            key: CounterKey::new(
                "tollgate.lockout",
                &[("source".to_string(), source.name.clone())],
                &source.name,
            ),
            limit: source.limit,
            unit: self.config.window,
            algorithm: Algorithm::SlidingWindow,
            cost: 1,
            shadow: false,
            mode: ChargeMode::Always,
        };
        let result = tokio::time::timeout(self.deadline, self.store.charge(&[charge]))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let used = result
            .usage
            .first()
            .and_then(|u| u.as_ref())
            .map_or(0, |u| u.used);
        if used < source.limit {
            return Ok(());
        }
        let until = self
            .clock
            .now_ms()
            .saturating_add(self.config.cooldown_secs.saturating_mul(1000));
        let placed = tokio::time::timeout(
            self.deadline,
            self.store.put_record(
                &lock_name(&source.name),
                &until.to_string(),
                self.cooldown(),
            ),
        )
        .await
        .map_err(|_| "timeout".to_string())?
        .map_err(|e| e.to_string())?;
        if placed {
            // The counter starts over, so the source gets a fresh window after
            // its cool-down rather than being locked again at once.
            let _ = self.store.reset(&counter_key(&source.name)).await;
            tracing::warn!(
                kind = source.kind.label(),
                cooldown_secs = self.config.cooldown_secs,
                "lockout: source locked after repeated authentication failures"
            );
            if let Some(m) = &self.metrics {
                m.lockout_started(source.kind.label());
            }
        }
        self.known.insert(source.name.clone(), until);
        Ok(())
    }
}

fn counter_key(name: &str) -> CounterKey {
    CounterKey::new(
        "tollgate.lockout",
        &[("source".to_string(), name.to_string())],
        name,
    )
}

fn lock_name(name: &str) -> String {
    format!("tollgate.lockout\0{name}")
}

/// Whether a refusal is a failed authentication attempt.
fn counted(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::InvalidCredential
            | Reason::MalformedCredential
            | Reason::AmbiguousCredential
            | Reason::ExpiredCredential
            | Reason::RevokedCredential
            | Reason::NotYetValid
            | Reason::WrongTokenType
            | Reason::InvalidClaim
    )
}

/// The key id of a well-formed API key in the request (`x-api-key` or a
/// bearer value in Tollgate's key format).
fn presented_key_id(request: &HttpRequest) -> Option<String> {
    let key = request
        .header("x-api-key")
        .or_else(|| bearer(request).filter(|b| b.starts_with(super::key_format::PREFIX)))?;
    super::key_format::parse(key.trim()).map(str::to_string)
}

fn bearer(request: &HttpRequest) -> Option<&str> {
    let (scheme, value) = request.header("authorization")?.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(value.trim())
}

/// The `sub` of a bearer JWT, read without verification (only to name a
/// counter); `None` for anything that is not a small JWT with a string
/// `sub` of at most 256 bytes.
fn unverified_subject(request: &HttpRequest) -> Option<String> {
    let token = bearer(request)?;
    if token.len() > 16 * 1024 {
        return None;
    }
    let mut parts = token.split('.');
    let (_, payload) = (parts.next()?, parts.next()?);
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let sub = claims.get("sub")?.as_str()?;
    (sub.len() <= 256).then(|| sub.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::memory::{ManualClock, MemoryStore};

    fn guard(clock: Arc<ManualClock>) -> Lockout {
        let config = LockoutConfig {
            enabled: true,
            address_failures: 4,
            key_failures: 2,
            exempt_cidrs: vec!["10.9.0.0/16".parse().expect("cidr")],
            cooldown_secs: 60,
            ..Default::default()
        };
        let store = Arc::new(MemoryStore::new(10_000, clock.clone()));
        Lockout::new(config, store, Duration::from_secs(1)).with_clock(clock)
    }

    fn from(ip: &str, key: &str) -> HttpRequest {
        let mut r = HttpRequest {
            source_ip: Some(ip.parse().expect("ip")),
            ..Default::default()
        };
        r.headers.insert("x-api-key".into(), key.into());
        r
    }

    #[tokio::test]
    async fn a_key_id_sprayed_from_one_address_locks_that_pair_only() {
        let clock = Arc::new(ManualClock::at(1_000_000));
        let g = guard(clock.clone());
        let victim = crate::identity::key_format::generate("victim").expect("key");
        let attacker = from("192.0.2.1", &victim);
        for _ in 0..2 {
            assert_eq!(g.check(&attacker).await, Ok(()));
            g.failed(&attacker, Reason::InvalidCredential).await;
        }
        match g.check(&attacker).await {
            Err(Refusal::Locked(l)) => {
                assert_eq!(l.kind, LockKind::Key);
                assert_eq!(l.retry_after, Duration::from_secs(60));
            }
            other => panic!("not locked: {other:?}"),
        }
        // The victim, elsewhere, is not locked; nor another key from the
        // attacker's address (its address count is below 4).
        assert_eq!(g.check(&from("198.51.100.7", &victim)).await, Ok(()));
        let other = crate::identity::key_format::generate("other").expect("key");
        assert_eq!(g.check(&from("192.0.2.1", &other)).await, Ok(()));
        clock.advance(61_000);
        assert_eq!(g.check(&attacker).await, Ok(()), "the cool-down ends");
    }

    #[tokio::test]
    async fn an_address_locks_and_exempt_ranges_never_do() {
        let clock = Arc::new(ManualClock::at(5_000_000));
        let g = guard(clock.clone());
        for i in 0..4 {
            let key = crate::identity::key_format::generate(&format!("k{i}")).expect("key");
            g.failed(&from("203.0.113.5", &key), Reason::ExpiredCredential)
                .await;
            g.failed(&from("10.9.3.4", &key), Reason::InvalidCredential)
                .await;
        }
        let fresh = crate::identity::key_format::generate("fresh").expect("key");
        assert!(matches!(
            g.check(&from("203.0.113.5", &fresh)).await,
            Err(Refusal::Locked(Locked {
                kind: LockKind::Address,
                ..
            }))
        ));
        assert_eq!(g.check(&from("10.9.3.4", &fresh)).await, Ok(()));
        // Not a guess: never counted.
        for _ in 0..10 {
            g.failed(&from("203.0.113.9", &fresh), Reason::MissingCredential)
                .await;
        }
        assert_eq!(g.check(&from("203.0.113.9", &fresh)).await, Ok(()));
    }

    #[test]
    fn the_subject_is_read_only_from_a_small_jwt() {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = format!("{}.{}.sig", enc("{}"), enc(r#"{"sub":"alice"}"#));
        let mut r = HttpRequest::default();
        r.headers
            .insert("authorization".into(), format!("Bearer {token}"));
        assert_eq!(unverified_subject(&r).as_deref(), Some("alice"));
        r.headers
            .insert("authorization".into(), "Bearer not-a-jwt".into());
        assert_eq!(unverified_subject(&r), None);
    }
}
