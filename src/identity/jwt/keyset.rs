//! An issuer's verification keys, read from a JWKS (RFC 7517) the way RFC
//! 7515/7517/7518 require: only signature keys, RSA of at least 2048 bits,
//! each key matched to a token by `kid` *and* algorithm, and one malformed
//! member skipped and reported rather than spoiling the set.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// At most this many keys are tried for one token (a token without `kid`,
/// or a `kid` several keys share), as Envoy's `jwt_authn` bounds it: each
/// try is a signature check, so the bound caps what one token can cost.
pub const MAX_CANDIDATES: usize = 4;

/// Smallest RSA modulus accepted (RFC 7518 §3.3).
pub const MIN_RSA_BITS: usize = 2048;

/// The kind of key, which decides the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    EcP256,
    Ed25519,
    Hmac,
}

impl Family {
    fn verifies(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (Self::Rsa, Algorithm::RS256 | Algorithm::PS256)
                | (Self::EcP256, Algorithm::ES256)
                | (Self::Ed25519, Algorithm::EdDSA)
                | (Self::Hmac, Algorithm::HS256)
        )
    }
}

/// One usable verification key.
pub struct Key {
    kid: Option<String>,
    family: Family,
    /// The JWK's own `alg`, when it names one: then only that algorithm.
    alg: Option<Algorithm>,
    /// Key type and public parameters: the same key across two fetches.
    fingerprint: String,
    /// Seconds since the Unix epoch this key last verified a token; 0 never.
    last_used: AtomicU64,
    /// A configured HS256 secret matches any `kid`.
    any_kid: bool,
    pub decoding: DecodingKey,
}

impl Key {
    /// Records that this key verified a token now.
    pub fn mark_used(&self) {
        self.last_used.store(unix_now(), Ordering::Relaxed);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A loaded key set.
pub struct KeySet {
    keys: Vec<Key>,
    pub fetched: Instant,
}

/// What reading a JWKS found besides the usable keys.
#[derive(Debug, Default)]
pub struct Skipped {
    /// Members refused as malformed or too weak: reported (warning, metric).
    pub refused: Vec<String>,
    /// Members that are well-formed but not for us (encryption keys, other
    /// curves, symmetric keys): logged at debug only.
    pub ignored: Vec<String>,
}

/// Why a JWKS gave no key set.
#[derive(Debug, thiserror::Error)]
pub enum KeySetError {
    #[error("JWKS is not JSON: {0}")]
    NotJson(String),
    #[error("JWKS has no \"keys\" array")]
    NoKeysArray,
    #[error("JWKS has no usable signature key ({refused} refused, {ignored} not for signing)")]
    NoUsableKey { refused: usize, ignored: usize },
}

impl KeySet {
    /// A set holding one HS256 secret.
    pub fn secret(secret: &[u8]) -> Self {
        Self {
            keys: vec![Key {
                kid: None,
                family: Family::Hmac,
                alg: Some(Algorithm::HS256),
                fingerprint: String::new(),
                last_used: AtomicU64::new(0),
                any_kid: true,
                decoding: DecodingKey::from_secret(secret),
            }],
            fetched: Instant::now(),
        }
    }

    /// Reads a JWKS document. Each member is read on its own: one that is
    /// malformed (`"kid": 7`, `"key_ops": "verify"`), an RSA key under
    /// 2048 bits, or a key whose `alg` contradicts its type is skipped and
    /// listed in [`Skipped::refused`]; the set fails only when no key is
    /// usable.
    pub fn from_jwks(bytes: &[u8]) -> Result<(Self, Skipped), KeySetError> {
        let doc: Value =
            serde_json::from_slice(bytes).map_err(|e| KeySetError::NotJson(e.to_string()))?;
        let members = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or(KeySetError::NoKeysArray)?;
        let mut keys = Vec::new();
        let mut skipped = Skipped::default();
        for (i, member) in members.iter().enumerate() {
            let label = match member.get("kid").and_then(Value::as_str) {
                Some(kid) => format!("keys[{i}] (kid {kid:?})"),
                None => format!("keys[{i}]"),
            };
            match read_member(member) {
                Ok(Some(key)) => keys.push(key),
                Ok(None) => skipped.ignored.push(label),
                Err(why) => skipped.refused.push(format!("{label}: {why}")),
            }
        }
        if keys.is_empty() {
            return Err(KeySetError::NoUsableKey {
                refused: skipped.refused.len(),
                ignored: skipped.ignored.len(),
            });
        }
        Ok((
            Self {
                keys,
                fetched: Instant::now(),
            },
            skipped,
        ))
    }

    /// The keys that may verify a token with this `kid` and `alg`: a key
    /// type that can do `alg` and the key's own `alg` if it states one; of
    /// those, the keys with the token's `kid` first, then keys without a
    /// `kid` (as Envoy's `jwt_authn` matches them), or every such key when
    /// the token has no `kid`. At most [`MAX_CANDIDATES`].
    pub fn candidates(&self, kid: Option<&str>, alg: Algorithm) -> Vec<&Key> {
        let fits = |k: &&Key| k.family.verifies(alg) && k.alg.is_none_or(|a| a == alg);
        let named = self
            .keys
            .iter()
            .filter(fits)
            .filter(|k| kid.is_none() || (k.kid.is_some() && k.kid.as_deref() == kid));
        let unnamed = self
            .keys
            .iter()
            .filter(fits)
            .filter(|k| kid.is_some() && (k.any_kid || k.kid.is_none()));
        named.chain(unnamed).take(MAX_CANDIDATES).collect()
    }

    /// Whether replacing `self` by `next` would drop every key that verified
    /// a token within the last `window_secs` (and there was one). Such a
    /// replacement is more likely a broken or foreign JWKS than a rotation:
    /// a rotating issuer publishes the new key beside the one in use.
    pub fn drops_every_key_in_use(&self, next: &KeySet, window_secs: u64) -> bool {
        let since = unix_now().saturating_sub(window_secs);
        let mut in_use = self
            .keys
            .iter()
            .filter(|k| k.last_used.load(Ordering::Relaxed) > since)
            .peekable();
        in_use.peek().is_some()
            && in_use.all(|k| next.keys.iter().all(|n| n.fingerprint != k.fingerprint))
    }

    /// Carries "last used" over to `next`'s copies of the same keys.
    pub fn carry_usage_to(&self, next: &KeySet) {
        for k in &self.keys {
            let used = k.last_used.load(Ordering::Relaxed);
            if used == 0 {
                continue;
            }
            for n in next.keys.iter().filter(|n| n.fingerprint == k.fingerprint) {
                n.last_used.fetch_max(used, Ordering::Relaxed);
            }
        }
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set holds no key (never true for a loaded set).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

fn opt_str<'a>(member: &'a Value, name: &str) -> Result<Option<&'a str>, String> {
    match member.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(format!("{name} is not a string")),
    }
}

fn b64(member: &Value, name: &str) -> Result<Vec<u8>, String> {
    let text = opt_str(member, name)?.ok_or_else(|| format!("{name} is missing"))?;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("{name} is not base64url"))
}

/// One JWKS member: `Ok(Some)` usable, `Ok(None)` well-formed but not a
/// signature key Tollgate verifies with, `Err` malformed or refused.
fn read_member(member: &Value) -> Result<Option<Key>, String> {
    if !member.is_object() {
        return Err("not a JSON object".into());
    }
    let kid = opt_str(member, "kid")?.map(str::to_string);
    let kty = opt_str(member, "kty")?.ok_or("kty is missing")?;
    let use_ = opt_str(member, "use")?;
    let ops = match member.get("key_ops") {
        None => None,
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|v| v.as_str().ok_or("key_ops is not an array of strings"))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        Some(_) => return Err("key_ops is not an array of strings".into()),
    };
    let alg_name = opt_str(member, "alg")?;
    // RFC 7517 §4.2/§4.3: a key published for encryption, or whose
    // operations do not include `verify`, must never verify a signature.
    if use_.is_some_and(|u| u != "sig") || ops.as_ref().is_some_and(|o| !o.contains(&"verify")) {
        return Ok(None);
    }
    let alg = match alg_name {
        None => None,
        Some("RS256") => Some(Algorithm::RS256),
        Some("PS256") => Some(Algorithm::PS256),
        Some("ES256") => Some(Algorithm::ES256),
        Some("EdDSA") => Some(Algorithm::EdDSA),
        // RS384, ES512, RSA-OAEP, …: nothing Tollgate verifies with.
        Some(_) => return Ok(None),
    };
    let (family, decoding, fingerprint) = match kty {
        "RSA" => {
            let n = b64(member, "n")?;
            b64(member, "e")?;
            let bits = rsa_bits(&n);
            if bits < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {bits} bits; at least {MIN_RSA_BITS} are required (RFC 7518 §3.3)"
                ));
            }
            let (n, e) = (member["n"].as_str(), member["e"].as_str());
            let (Some(n), Some(e)) = (n, e) else {
                return Err("n or e is missing".into());
            };
            let key = DecodingKey::from_rsa_components(n, e)
                .map_err(|_| "n or e is not a valid RSA public key".to_string())?;
            (Family::Rsa, key, format!("RSA:{n}:{e}"))
        }
        "EC" => {
            if opt_str(member, "crv")? != Some("P-256") {
                return Ok(None);
            }
            let (x, y) = (b64(member, "x")?, b64(member, "y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("x and y of a P-256 key must be 32 bytes each".into());
            }
            let (x, y) = (
                member["x"].as_str().unwrap_or_default(),
                member["y"].as_str().unwrap_or_default(),
            );
            let key = DecodingKey::from_ec_components(x, y)
                .map_err(|_| "x, y are not a valid P-256 point".to_string())?;
            (Family::EcP256, key, format!("EC:{x}:{y}"))
        }
        "OKP" => {
            if opt_str(member, "crv")? != Some("Ed25519") {
                return Ok(None);
            }
            if b64(member, "x")?.len() != 32 {
                return Err("x of an Ed25519 key must be 32 bytes".into());
            }
            let x = member["x"].as_str().unwrap_or_default();
            let key = DecodingKey::from_ed_components(x)
                .map_err(|_| "x is not a valid Ed25519 key".to_string())?;
            (Family::Ed25519, key, format!("OKP:{x}"))
        }
        // A symmetric key in a published JWKS is never trusted: anyone who
        // can read the set could sign with it.
        _ => return Ok(None),
    };
    if let Some(a) = alg
        && !family.verifies(a)
    {
        return Err(format!("alg {a:?} does not fit kty {kty:?}"));
    }
    Ok(Some(Key {
        kid,
        family,
        alg,
        fingerprint,
        last_used: AtomicU64::new(0),
        any_kid: false,
        decoding,
    }))
}

/// Bit length of a big-endian unsigned modulus.
fn rsa_bits(n: &[u8]) -> usize {
    let n = match n.iter().position(|&b| b != 0) {
        Some(i) => &n[i..],
        None => return 0,
    };
    n.len() * 8 - n[0].leading_zeros() as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rsa_n(bits: usize) -> String {
        let mut n = vec![0xffu8; bits / 8];
        n[0] = 0x80 | 0x01;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n)
    }

    fn set(members: Value) -> Result<(KeySet, Skipped), KeySetError> {
        KeySet::from_jwks(json!({ "keys": members }).to_string().as_bytes())
    }

    proptest::proptest! {
        /// Any JWKS-shaped document: a key set or an error, never a panic.
        #[test]
        fn any_jwks_is_answered(
            kty in "(RSA|EC|OKP|oct|x)",
            n in "[A-Za-z0-9_=-]{0,400}",
            field in "(kid|use|key_ops|alg|crv|x|y|e)",
            value in proptest::prop_oneof![
                proptest::strategy::Just(json!(7)),
                proptest::strategy::Just(json!("verify")),
                proptest::strategy::Just(json!(["verify"])),
                proptest::strategy::Just(json!(null)),
                proptest::strategy::Just(json!({})),
            ],
        ) {
            let mut member = json!({"kty": kty, "n": n, "e": "AQAB", "x": n, "y": n, "crv": "P-256"});
            member[field] = value;
            let _ = set(json!([member]));
        }
    }

    #[test]
    fn modulus_bits() {
        assert_eq!(rsa_bits(&[0, 0x01, 0]), 9);
        assert_eq!(rsa_bits(&[0x80; 256]), 2048);
        assert_eq!(rsa_bits(&[]), 0);
    }

    #[test]
    fn members_are_judged_one_by_one() {
        let good = json!({"kty": "RSA", "kid": "a", "n": rsa_n(2048), "e": "AQAB"});
        let (keys, skipped) = set(json!([
            good,
            {"kty": "RSA", "kid": 7, "n": rsa_n(2048), "e": "AQAB"},
            {"kty": "RSA", "kid": "s", "key_ops": "verify", "n": rsa_n(2048), "e": "AQAB"},
            {"kty": "RSA", "kid": "weak", "n": rsa_n(1024), "e": "AQAB"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": rsa_n(2048), "e": "AQAB"},
            {"kty": "RSA", "kid": "ops", "key_ops": ["encrypt"], "n": rsa_n(2048), "e": "AQAB"},
            {"kty": "oct", "kid": "sym", "k": "c2VjcmV0"},
            {"kty": "RSA", "kid": "mixed", "alg": "ES256", "n": rsa_n(2048), "e": "AQAB"},
            "not an object",
        ]))
        .expect("one usable key");
        assert_eq!(keys.len(), 1);
        assert_eq!(skipped.refused.len(), 5, "{:?}", skipped.refused);
        assert_eq!(skipped.ignored.len(), 3, "{:?}", skipped.ignored);
        assert!(set(json!([{"kty": "RSA", "kid": 7}])).is_err());
        assert!(KeySet::from_jwks(b"{}").is_err());
    }

    #[test]
    fn candidates_match_kid_and_algorithm() {
        let (keys, _) = set(json!([
            {"kty": "RSA", "kid": "k", "n": rsa_n(2048), "e": "AQAB"},
            {"kty": "EC", "kid": "k", "crv": "P-256",
             "x": "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
             "y": "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"},
        ]))
        .expect("keys");
        assert_eq!(keys.candidates(Some("k"), Algorithm::ES256).len(), 1);
        assert_eq!(keys.candidates(Some("k"), Algorithm::RS256).len(), 1);
        assert_eq!(keys.candidates(None, Algorithm::PS256).len(), 1);
        assert_eq!(keys.candidates(Some("other"), Algorithm::RS256).len(), 0);
        assert_eq!(keys.candidates(Some("k"), Algorithm::EdDSA).len(), 0);
        // A key without kid may verify a token with one; named keys first.
        let (keys, _) = set(json!([
            {"kty": "RSA", "n": rsa_n(2048), "e": "AQAB"},
            {"kty": "RSA", "kid": "k", "n": rsa_n(3072), "e": "AQAB"},
        ]))
        .expect("keys");
        let c = keys.candidates(Some("k"), Algorithm::RS256);
        assert_eq!(c.len(), 2);
        assert_eq!(c[0].kid.as_deref(), Some("k"));
        assert_eq!(keys.candidates(Some("x"), Algorithm::RS256).len(), 1);
        // A token without kid is bounded however many keys fit.
        let many: Vec<Value> = (0..10)
            .map(|i| json!({"kty": "RSA", "kid": format!("k{i}"), "n": rsa_n(2048), "e": "AQAB"}))
            .collect();
        let (keys, _) = set(Value::Array(many)).expect("keys");
        assert_eq!(
            keys.candidates(None, Algorithm::RS256).len(),
            MAX_CANDIDATES
        );
    }
}
