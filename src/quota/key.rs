//! Counter identities.
//!
//! A counter is named by its domain and descriptor entries. The name that is
//! stored is a SHA-256 of an injective encoding of them (every part
//! length-prefixed), so distinct descriptor tuples cannot collide — `a:b` +
//! `c` and `a` + `b:c` encode differently — and a descriptor value that is a
//! credential never reaches Redis or a log in the clear.

use sha2::{Digest, Sha256};

/// A counter's identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CounterKey {
    digest: [u8; 32],
    tag: [u8; 8],
}

fn put(hasher: &mut Sha256, part: &str) {
    hasher.update((part.len() as u64).to_be_bytes());
    hasher.update(part.as_bytes());
}

impl CounterKey {
    /// The counter for `entries` in `domain`. `group` chooses the Redis
    /// Cluster hash slot: counters charged together in one request must share
    /// it (see [`crate::quota::redis`]).
    pub fn new(domain: &str, entries: &[(String, String)], group: &str) -> Self {
        let mut hasher = Sha256::new();
        put(&mut hasher, domain);
        hasher.update((entries.len() as u64).to_be_bytes());
        for (k, v) in entries {
            put(&mut hasher, k);
            put(&mut hasher, v);
        }
        let digest: [u8; 32] = hasher.finalize().into();
        let mut tag_hasher = Sha256::new();
        put(&mut tag_hasher, group);
        let tag_full: [u8; 32] = tag_hasher.finalize().into();
        let mut tag = [0u8; 8];
        tag.copy_from_slice(&tag_full[..8]);
        Self { digest, tag }
    }

    /// 16 bytes identifying the counter in memory.
    pub fn short(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out.copy_from_slice(&self.digest[..16]);
        out
    }

    /// The Redis key prefix of this counter: `<prefix>{<group>}:<digest>`.
    /// Window suffixes are appended inside the script; they keep the hash tag,
    /// so every window of every counter of a group lives in one slot.
    pub fn redis_base(&self, prefix: &str) -> String {
        format!(
            "{prefix}{{{}}}:{}",
            hex::encode(self.tag),
            hex::encode(self.digest)
        )
    }

    /// The hash-slot group, for splitting charges by slot.
    pub fn group(&self) -> [u8; 8] {
        self.tag
    }

    /// A printable form (80 hex digits: digest then tag) that
    /// [`CounterKey::from_hex`] reads back, for reservation records.
    pub fn to_hex(&self) -> String {
        format!("{}{}", hex::encode(self.digest), hex::encode(self.tag))
    }

    /// Reads [`CounterKey::to_hex`]'s form.
    pub fn from_hex(text: &str) -> Option<Self> {
        let bytes = hex::decode(text).ok()?;
        if bytes.len() != 40 {
            return None;
        }
        let mut digest = [0u8; 32];
        let mut tag = [0u8; 8];
        digest.copy_from_slice(&bytes[..32]);
        tag.copy_from_slice(&bytes[32..]);
        Some(Self { digest, tag })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn encoding_is_injective_on_boundaries() {
        let cases = [
            ("d", e(&[("a:b", "c")]), "d", e(&[("a", "b:c")])),
            ("d", e(&[("a", "bc")]), "d", e(&[("ab", "c")])),
            ("d", e(&[("a", "")]), "d", e(&[("a", ""), ("", "")])),
            ("da", e(&[("b", "c")]), "d", e(&[("ab", "c")])),
        ];
        for (d1, e1, d2, e2) in cases {
            assert_ne!(
                CounterKey::new(d1, &e1, "g"),
                CounterKey::new(d2, &e2, "g"),
                "{e1:?} vs {e2:?}"
            );
        }
    }

    #[test]
    fn redis_names_never_carry_values_and_share_the_group_tag() {
        let secret = "tg_live_supersecret";
        let a = CounterKey::new("llm", &e(&[("api_key", secret)]), "acme");
        let b = CounterKey::new("llm", &e(&[("tenant", "acme")]), "acme");
        let (na, nb) = (a.redis_base("tg:"), b.redis_base("tg:"));
        assert!(!na.contains(secret) && !na.contains("acme"));
        let tag = |s: &str| s[s.find('{').unwrap_or(0)..=s.find('}').unwrap_or(0)].to_string();
        assert_eq!(tag(&na), tag(&nb));
        assert_ne!(na, nb);
    }

    proptest::proptest! {
        /// Distinct descriptor tuples never share a counter.
        #[test]
        fn distinct_tuples_get_distinct_keys(
            tuples in proptest::collection::vec(
                ("[a-c:_]{0,3}", proptest::collection::vec(("[a-c:_=]{0,3}", "[a-c:_=]{0,3}"), 0..4)),
                1..40,
            )
        ) {
            let mut seen = std::collections::HashMap::new();
            for (domain, entries) in tuples {
                let key = CounterKey::new(&domain, &entries, "g");
                if let Some(previous) = seen.insert(key, (domain.clone(), entries.clone())) {
                    proptest::prop_assert_eq!(previous, (domain, entries));
                }
            }
        }
    }
}
