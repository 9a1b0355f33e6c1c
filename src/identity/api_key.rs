//! API key authentication.
//!
//! The key is parsed first (prefix, id, checksum): a malformed key is refused
//! without touching any store. The record is found by the key's public id in
//! every source (keys file and Redis, through a short-lived cache) and
//! combined by [`effective`]: a revocation anywhere wins, and a record that
//! does not parse refuses the key (`invalid_key_record`). The key's
//! SHA-256 is compared with the stored one in constant time. API keys are
//! long random strings, so a fast hash is the right storage (a password KDF
//! buys nothing against 190 bits of entropy).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use subtle::ConstantTimeEq;

use super::keys::{Effective, KeySource, effective, now_secs, sha256};
use super::{Authentication, Authenticator, SourceKind};
use crate::decision::Reason;
use crate::request::HttpRequest;

/// API keys from one or more sources.
pub struct ApiKeyAuthenticator {
    sources: Vec<Arc<dyn KeySource>>,
    /// Records (or their absence) by id, for `cache_ttl`: the bound on how
    /// long a revocation takes to reach every replica.
    cache: moka::future::Cache<String, Arc<Effective>>,
    max_len: usize,
    lookups: AtomicU64,
}

impl ApiKeyAuthenticator {
    /// Looks keys up in `sources`, in order.
    pub fn new(sources: Vec<Arc<dyn KeySource>>, cache_ttl: Duration, max_len: usize) -> Self {
        Self {
            sources,
            cache: moka::future::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(cache_ttl.max(Duration::from_millis(1)))
                .build(),
            max_len,
            lookups: AtomicU64::new(0),
        }
    }

    /// How many times a store was asked (for operators and tests: a
    /// malformed key must never cause one).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(Ordering::Relaxed)
    }

    /// Forgets cached records (after a keys file reload).
    pub fn invalidate(&self) {
        self.cache.invalidate_all();
    }

    async fn record(&self, id: &str) -> Result<Arc<Effective>, Reason> {
        if let Some(hit) = self.cache.get(id).await {
            return Ok(hit);
        }
        self.lookups.fetch_add(1, Ordering::Relaxed);
        // Every source is asked, not the first that knows the id: a
        // revocation stored in Redis must win over the keys file's record.
        let mut found = Vec::new();
        for source in &self.sources {
            match source.get(id).await {
                Ok(Some(stored)) => found.push((source.name(), stored)),
                Ok(None) => {}
                Err(e) => {
                    // Fail closed, and do not cache the failure.
                    tracing::warn!(key_id = id, error = %e, "api key source failed");
                    return Err(Reason::Unavailable);
                }
            }
        }
        let combined = Arc::new(effective(&found));
        if let Effective::Invalid(message) = combined.as_ref() {
            // Reported once per cache period, and counted as
            // `tollgate_decisions_total{reason="invalid_key_record"}`.
            tracing::warn!(key_id = id, problem = %message, "api key record refused; fix the record");
        }
        self.cache.insert(id.to_string(), combined.clone()).await;
        Ok(combined)
    }
}

/// The presented API key: `x-api-key`, or an `Authorization: Bearer` value
/// in Tollgate's key format (other bearer tokens belong to other sources).
fn presented(request: &HttpRequest) -> Option<&str> {
    if let Some(v) = request.header("x-api-key") {
        return Some(v);
    }
    let (scheme, value) = request.header("authorization")?.split_once(' ')?;
    (scheme.eq_ignore_ascii_case("bearer")
        && value.trim_start().starts_with(super::key_format::PREFIX))
    .then_some(value.trim_start())
}

#[tonic::async_trait]
impl Authenticator for ApiKeyAuthenticator {
    fn kind(&self) -> SourceKind {
        SourceKind::ApiKey
    }

    fn claims(&self, request: &HttpRequest) -> bool {
        presented(request).is_some()
    }

    async fn authenticate(&self, request: &HttpRequest) -> Authentication {
        let Some(key) = presented(request) else {
            return Authentication::NotPresent;
        };
        // Envoy joins duplicate headers with ','; never pick one of them.
        if key.contains(',') {
            return Authentication::Rejected(Reason::AmbiguousCredential);
        }
        if key.len() > self.max_len {
            return Authentication::Rejected(Reason::MalformedCredential);
        }
        let Some(id) = super::key_format::parse(key.trim()) else {
            return Authentication::Rejected(Reason::MalformedCredential);
        };
        let found = match self.record(id).await {
            Ok(found) => found,
            Err(reason) => return Authentication::Rejected(reason),
        };
        let record = match found.as_ref() {
            Effective::Record(r) => r,
            Effective::Unknown => return Authentication::Rejected(Reason::InvalidCredential),
            Effective::Invalid(_) => return Authentication::Rejected(Reason::InvalidKeyRecord),
        };
        if !bool::from(sha256(key.trim()).ct_eq(&record.hash)) {
            return Authentication::Rejected(Reason::InvalidCredential);
        }
        let now = now_secs();
        if record.disabled || record.grace_until.is_some_and(|g| now >= g) {
            return Authentication::Rejected(Reason::RevokedCredential);
        }
        if record.expires_at.is_some_and(|e| now >= e) {
            return Authentication::Rejected(Reason::ExpiredCredential);
        }
        // Checked after the secret: only the key's holder learns where it
        // may be used from.
        if !record.allowed_cidrs.is_empty()
            && !request
                .source_ip
                .is_some_and(|ip| record.allowed_cidrs.iter().any(|n| n.contains(&ip)))
        {
            return Authentication::Rejected(Reason::SourceNotAllowed);
        }
        Authentication::Authenticated(record.principal())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::key_format::generate;
    use crate::identity::keys::{KeyIndex, key_hash};

    struct Fixed(KeyIndex);

    #[tonic::async_trait]
    impl KeySource for Fixed {
        fn name(&self) -> &'static str {
            "fixed"
        }

        async fn get(
            &self,
            id: &str,
        ) -> Result<Option<super::super::keys::Stored>, super::super::keys::SourceError> {
            Ok(self.0.lookup(id).map(super::super::keys::Stored::Record))
        }
    }

    fn auth(records: &str) -> ApiKeyAuthenticator {
        let index = KeyIndex::parse(records, "keys.toml").expect("parse");
        ApiKeyAuthenticator::new(vec![Arc::new(Fixed(index))], Duration::from_secs(1), 512)
    }

    fn record(id: &str, key: &str, extra: &str) -> String {
        format!(
            "[[keys]]\nid = \"{id}\"\nhash = \"{}\"\ntenant = \"acme\"\ntier = \"paid\"\n{extra}\n",
            key_hash(key)
        )
    }

    fn with(name: &str, value: &str) -> HttpRequest {
        let mut req = HttpRequest::default();
        req.headers.insert(name.into(), value.into());
        req
    }

    async fn outcome(a: &ApiKeyAuthenticator, name: &str, value: &str) -> Result<String, Reason> {
        match a.authenticate(&with(name, value)).await {
            Authentication::Authenticated(p) => Ok(p.id),
            Authentication::Rejected(r) => Err(r),
            Authentication::NotPresent => Err(Reason::MissingCredential),
        }
    }

    #[tokio::test]
    async fn credential_table() {
        let good = generate("k1").expect("key");
        let expired = generate("old").expect("key");
        let disabled = generate("off").expect("key");
        let unknown = generate("nobody").expect("key");
        let other_secret = generate("k1").expect("key");
        let a = auth(&format!(
            "{}{}{}",
            record("k1", &good, ""),
            record("old", &expired, "expires_at = \"2001-01-01T00:00:00Z\""),
            record("off", &disabled, "disabled = true"),
        ));
        let cases = [
            ("x-api-key", good.clone(), Ok("k1".to_string())),
            ("authorization", format!("Bearer {good}"), Ok("k1".into())),
            ("x-api-key", other_secret, Err(Reason::InvalidCredential)),
            ("x-api-key", unknown, Err(Reason::InvalidCredential)),
            ("x-api-key", expired, Err(Reason::ExpiredCredential)),
            ("x-api-key", disabled, Err(Reason::RevokedCredential)),
            (
                "x-api-key",
                format!("{good},{good}"),
                Err(Reason::AmbiguousCredential),
            ),
            (
                "x-api-key",
                "tg_k1_short".into(),
                Err(Reason::MalformedCredential),
            ),
            (
                "x-api-key",
                "k".repeat(1 << 20),
                Err(Reason::MalformedCredential),
            ),
            (
                "authorization",
                "Bearer eyJhbGciOi.x.y".into(),
                Err(Reason::MissingCredential),
            ),
        ];
        for (name, value, want) in cases {
            assert_eq!(
                outcome(&a, name, &value).await,
                want,
                "{name}: {}",
                &value[..value.len().min(40)]
            );
        }
    }

    #[tokio::test]
    async fn malformed_keys_never_reach_a_store() {
        let a = auth("");
        let before = a.lookups();
        for bad in [
            "tg_k1_nope",
            "sk-live-123",
            "tg_",
            "tg_K1_0000000000000000000000000000000000000000",
        ] {
            assert_eq!(
                outcome(&a, "x-api-key", bad).await,
                Err(Reason::MalformedCredential)
            );
        }
        assert_eq!(a.lookups(), before);
        let _ = outcome(&a, "x-api-key", &generate("real").expect("key")).await;
        assert_eq!(a.lookups(), before + 1, "a well-formed key is looked up");
    }

    #[tokio::test]
    async fn rotation_grace_applies_to_the_replaced_key() {
        let old = generate("old").expect("key");
        let new = generate("new").expect("key");
        let open = auth(&format!(
            "{}{}",
            record("old", &old, ""),
            record(
                "new",
                &new,
                "replaces = \"old\"\ngrace_until = \"2999-01-01T00:00:00Z\""
            )
        ));
        assert_eq!(outcome(&open, "x-api-key", &old).await, Ok("old".into()));
        let closed = auth(&format!(
            "{}{}",
            record("old", &old, ""),
            record(
                "new",
                &new,
                "replaces = \"old\"\ngrace_until = \"2001-01-01T00:00:00Z\""
            )
        ));
        assert_eq!(
            outcome(&closed, "x-api-key", &old).await,
            Err(Reason::RevokedCredential)
        );
        assert_eq!(outcome(&closed, "x-api-key", &new).await, Ok("new".into()));
    }
}
