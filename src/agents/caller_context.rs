//! The signed caller context: a compact JWS (RFC 7515) signed with Ed25519
//! (`alg: "EdDSA"`, RFC 8037) that Tollgate adds to an allowed request for
//! the agent runtime, and accepts back when the runtime calls a tool
//! through the gateway, so that the original caller stays the principal.
//!
//! Header `{"alg":"EdDSA","kid":"…","typ":"tollgate-caller-context"}`;
//! claims [`Claims`]. Verification is strict: exactly three base64url
//! segments, a header of exactly those fields (`crit`, `jku`, `x5u`, `none`
//! … are refused), a `kid` naming a key that still verifies, a valid
//! signature, `exp` in the future. Keys rotate with overlap: the newest key
//! without `retire_at` signs; a key with `retire_at` verifies until then and
//! is published in the JWKS until then, never after.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ed25519_dalek::{Signature, Signer as _, SigningKey};
use serde::{Deserialize, Serialize};

use crate::identity::{Principal, PrincipalKind};

/// The JWS `typ` of a caller context.
pub const TYP: &str = "tollgate-caller-context";

/// Longest token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// A keys file that cannot be used; the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read caller-context keys {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("caller-context keys {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Why a presented caller context is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("not a compact JWS")]
    Malformed,
    #[error("algorithm {0:?} is not EdDSA")]
    Algorithm(String),
    #[error("no key with this kid verifies (unknown, or retired past its overlap)")]
    UnknownKey,
    #[error("signature does not verify")]
    Signature,
    #[error("expired")]
    Expired,
    #[error("issued in the future")]
    NotYetValid,
}

/// What a caller context says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The principal's entity type (`ApiKey`, `User`, `Service`).
    pub kind: String,
    /// The principal's entity id.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub models: Vec<String>,
    /// The request id of the allowed request that issued it (the replay
    /// counter's key).
    pub rid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Tools the caller may call (`call_tool` permitted when issued).
    #[serde(default)]
    pub tools: Vec<String>,
    /// Seconds since the epoch.
    pub iat: u64,
    pub exp: u64,
}

impl Claims {
    /// The claims for `principal`'s allowed request.
    pub fn for_request(
        principal: &Principal,
        request_id: &str,
        model: Option<&str>,
        tools: Vec<String>,
        now: SystemTime,
        ttl: Duration,
    ) -> Self {
        let iat = secs(now);
        Self {
            kind: principal.kind.entity_type().to_string(),
            sub: principal.id.clone(),
            tenant: principal.tenant.clone(),
            tier: principal.tier.clone(),
            scopes: principal.scopes.clone(),
            groups: principal.groups.clone(),
            models: principal.models.clone(),
            rid: request_id.to_string(),
            model: model.map(str::to_string),
            tools,
            iat,
            exp: iat.saturating_add(ttl.as_secs()),
        }
    }

    /// The original caller; `None` for a kind that cannot be one.
    pub fn principal(&self) -> Option<Principal> {
        let kind = match self.kind.as_str() {
            "ApiKey" => PrincipalKind::ApiKey,
            "User" => PrincipalKind::User,
            "Service" => PrincipalKind::Service,
            _ => return None,
        };
        Some(Principal {
            kind,
            id: self.sub.clone(),
            tenant: self.tenant.clone(),
            tier: self.tier.clone(),
            scopes: self.scopes.clone(),
            groups: self.groups.clone(),
            models: self.models.clone(),
        })
    }
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    kid: String,
    typ: String,
}

struct Key {
    kid: String,
    signing: SigningKey,
    retire_at: Option<SystemTime>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    keys: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    kid: String,
    /// The 32-byte Ed25519 seed, base64 (standard or URL-safe).
    seed: String,
    /// RFC 3339; the key stops signing now and verifying then.
    retire_at: Option<String>,
}

/// The Ed25519 keys: one signs, every key not past its `retire_at`
/// verifies.
pub struct KeyRing {
    keys: Vec<Key>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self.keys.iter().map(|k| k.kid.as_str()).collect();
        f.debug_struct("KeyRing").field("kids", &kids).finish()
    }
}

impl KeyRing {
    /// Loads a keys file (TOML `[[keys]] kid, seed, retire_at?`).
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        Self::load_with_text(path).map(|(keys, _)| keys)
    }

    /// [`KeyRing::load`], with the text it was parsed from.
    pub fn load_with_text(path: &Path) -> Result<(Self, String), KeysError> {
        let text = Self::read(path)?;
        Ok((Self::parse_file(path, &text)?, text))
    }

    /// The keys file's text.
    pub fn read(path: &Path) -> Result<String, KeysError> {
        std::fs::read_to_string(path).map_err(|source| KeysError::Read {
            path: path.display().to_string(),
            source,
        })
    }

    /// [`KeyRing::parse`], with errors naming the file `text` came from.
    pub fn parse_file(path: &Path, text: &str) -> Result<Self, KeysError> {
        Self::parse(text).map_err(|message| KeysError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses the keys file text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeysFile = toml::from_str(text).map_err(|e| e.message().to_string())?;
        let mut keys: Vec<Key> = Vec::new();
        for entry in file.keys {
            if entry.kid.is_empty() || !entry.kid.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!("kid {:?} must be printable ASCII", entry.kid));
            }
            if keys.iter().any(|k| k.kid == entry.kid) {
                return Err(format!("kid {:?} is listed twice", entry.kid));
            }
            let seed = STANDARD
                .decode(entry.seed.trim())
                .or_else(|_| URL_SAFE_NO_PAD.decode(entry.seed.trim()))
                .map_err(|_| format!("key {:?}: seed is not base64", entry.kid))?;
            let seed: [u8; 32] = seed.try_into().map_err(|_| {
                format!(
                    "key {:?}: seed must be 32 bytes (openssl rand -base64 32)",
                    entry.kid
                )
            })?;
            let retire_at = entry
                .retire_at
                .map(|t| {
                    humantime::parse_rfc3339(&t)
                        .map_err(|e| format!("key {:?}: retire_at {t:?}: {e}", entry.kid))
                })
                .transpose()?;
            keys.push(Key {
                kid: entry.kid,
                signing: SigningKey::from_bytes(&seed),
                retire_at,
            });
        }
        if !keys.iter().any(|k| k.retire_at.is_none()) {
            return Err("no key without retire_at to sign with".into());
        }
        Ok(Self { keys })
    }

    fn verifies(key: &Key, now: SystemTime) -> bool {
        key.retire_at.is_none_or(|t| now < t)
    }

    /// Signs `claims` with the newest key that is not retiring.
    pub fn sign(&self, claims: &Claims) -> Option<String> {
        let key = self.keys.iter().rev().find(|k| k.retire_at.is_none())?;
        let header = Header {
            alg: "EdDSA".into(),
            kid: key.kid.clone(),
            typ: TYP.into(),
        };
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).ok()?);
        let p = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).ok()?);
        let input = format!("{h}.{p}");
        let sig = key.signing.sign(input.as_bytes());
        Some(format!(
            "{input}.{}",
            URL_SAFE_NO_PAD.encode(sig.to_bytes())
        ))
    }

    /// Verifies a presented token at `now`.
    pub fn verify(&self, token: &str, now: SystemTime) -> Result<Claims, VerifyError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(VerifyError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        let decode = |seg: &str| {
            URL_SAFE_NO_PAD
                .decode(seg)
                .map_err(|_| VerifyError::Malformed)
        };
        let header: Header =
            serde_json::from_slice(&decode(h)?).map_err(|_| VerifyError::Malformed)?;
        if header.alg != "EdDSA" {
            return Err(VerifyError::Algorithm(header.alg));
        }
        if header.typ != TYP {
            return Err(VerifyError::Malformed);
        }
        let key = self
            .keys
            .iter()
            .find(|k| k.kid == header.kid && Self::verifies(k, now))
            .ok_or(VerifyError::UnknownKey)?;
        let sig: [u8; 64] = decode(s)?.try_into().map_err(|_| VerifyError::Signature)?;
        key.signing
            .verifying_key()
            .verify_strict(format!("{h}.{p}").as_bytes(), &Signature::from_bytes(&sig))
            .map_err(|_| VerifyError::Signature)?;
        let claims: Claims =
            serde_json::from_slice(&decode(p)?).map_err(|_| VerifyError::Malformed)?;
        let now = secs(now);
        if now >= claims.exp {
            return Err(VerifyError::Expired);
        }
        if claims.iat > now.saturating_add(60) {
            return Err(VerifyError::NotYetValid);
        }
        Ok(claims)
    }

    /// The public keys that verify at `now`, as a JWK Set (RFC 7517, OKP
    /// keys per RFC 8037).
    pub fn jwks(&self, now: SystemTime) -> serde_json::Value {
        let keys: Vec<serde_json::Value> = self
            .keys
            .iter()
            .filter(|k| Self::verifies(k, now))
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP",
                    "crv": "Ed25519",
                    "kid": k.kid,
                    "alg": "EdDSA",
                    "use": "sig",
                    "x": URL_SAFE_NO_PAD.encode(k.signing.verifying_key().to_bytes()),
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=";
    const B: &str = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=";

    fn ring(text: &str) -> KeyRing {
        KeyRing::parse(text).unwrap()
    }

    fn claims(now: SystemTime) -> Claims {
        let p = Principal {
            kind: PrincipalKind::ApiKey,
            id: "demo-paid".into(),
            tenant: Some("acme".into()),
            tier: Some("paid".into()),
            scopes: vec![],
            groups: vec![],
            models: vec![],
        };
        Claims::for_request(
            &p,
            "rid-1",
            Some("m"),
            vec!["get_weather".into()],
            now,
            Duration::from_secs(300),
        )
    }

    #[test]
    fn a_signed_context_verifies_until_it_expires() {
        let now = SystemTime::now();
        let r = ring(&format!("[[keys]]\nkid = \"k1\"\nseed = \"{A}\"\n"));
        let token = r.sign(&claims(now)).unwrap();
        let c = r.verify(&token, now).unwrap();
        assert_eq!(c.principal().unwrap().id, "demo-paid");
        assert_eq!(
            r.verify(&token, now + Duration::from_secs(301)),
            Err(VerifyError::Expired)
        );
    }

    #[test]
    fn tampered_none_other_key_and_wrong_kid_are_refused() {
        let now = SystemTime::now();
        let r = ring(&format!(
            "[[keys]]\nkid = \"k1\"\nseed = \"{A}\"\n[[keys]]\nkid = \"k2\"\nseed = \"{B}\"\n"
        ));
        let other = ring(&format!("[[keys]]\nkid = \"k2\"\nseed = \"{A}\"\n"));
        let token = r.sign(&claims(now)).unwrap();
        let (h, rest) = token.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        // Tampered payload: another tenant.
        let mut c = claims(now);
        c.tenant = Some("globex".into());
        let p2 = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        assert_eq!(
            r.verify(&format!("{h}.{p2}.{s}"), now),
            Err(VerifyError::Signature)
        );
        // alg none, no signature.
        let none =
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none","kid":"k2","typ":"tollgate-caller-context"}"#);
        assert!(matches!(
            r.verify(&format!("{none}.{p}."), now),
            Err(VerifyError::Algorithm(_))
        ));
        // Signed by a key we do not hold, under our kid.
        let forged = other.sign(&claims(now)).unwrap();
        assert_eq!(r.verify(&forged, now), Err(VerifyError::Signature));
        // Our signature (k2) relabelled with the other key's kid (k1).
        let k1 = URL_SAFE_NO_PAD
            .encode(br#"{"alg":"EdDSA","kid":"k1","typ":"tollgate-caller-context"}"#);
        assert_eq!(
            r.verify(&format!("{k1}.{p}.{s}"), now),
            Err(VerifyError::Signature)
        );
        let unknown = URL_SAFE_NO_PAD
            .encode(br#"{"alg":"EdDSA","kid":"k9","typ":"tollgate-caller-context"}"#);
        assert_eq!(
            r.verify(&format!("{unknown}.{p}.{s}"), now),
            Err(VerifyError::UnknownKey)
        );
        let crit = URL_SAFE_NO_PAD
            .encode(br#"{"alg":"EdDSA","kid":"k2","typ":"tollgate-caller-context","crit":["x"]}"#);
        assert_eq!(
            r.verify(&format!("{crit}.{p}.{s}"), now),
            Err(VerifyError::Malformed)
        );
        for bad in [
            "",
            "a.b",
            "a.b.c.d",
            &format!("{token},{token}"),
            &format!("{h}.{p}.{s}="),
        ] {
            assert!(r.verify(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn rotation_overlaps_then_retires() {
        let now = SystemTime::now();
        let old = ring(&format!("[[keys]]\nkid = \"old\"\nseed = \"{A}\"\n"));
        let token = old.sign(&claims(now)).unwrap();
        let retire = humantime::format_rfc3339_seconds(now + Duration::from_secs(60));
        let rotated = ring(&format!(
            "[[keys]]\nkid = \"old\"\nseed = \"{A}\"\nretire_at = \"{retire}\"\n[[keys]]\nkid = \"new\"\nseed = \"{B}\"\n"
        ));
        // In the overlap: the old token verifies, new ones are signed by "new".
        assert!(rotated.verify(&token, now).is_ok());
        assert_eq!(rotated.jwks(now)["keys"].as_array().unwrap().len(), 2);
        let fresh = rotated.sign(&claims(now)).unwrap();
        let header = URL_SAFE_NO_PAD
            .decode(fresh.split('.').next().unwrap())
            .unwrap();
        assert!(
            String::from_utf8(header)
                .unwrap()
                .contains(r#""kid":"new""#)
        );
        // Past the overlap: refused, and no longer published.
        let later = now + Duration::from_secs(120);
        assert_eq!(rotated.verify(&token, later), Err(VerifyError::UnknownKey));
        assert_eq!(rotated.jwks(later)["keys"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn bad_key_files_say_what_to_fix() {
        for (text, needle) in [
            ("[[keys]]\nkid = \"a\"\nseed = \"AAAA\"\n", "32 bytes"),
            ("[[keys]]\nkid = \"a\"\nseed = \"!!\"\n", "not base64"),
            (
                &format!(
                    "[[keys]]\nkid = \"a\"\nseed = \"{A}\"\n[[keys]]\nkid = \"a\"\nseed = \"{B}\"\n"
                ),
                "twice",
            ),
            (
                &format!(
                    "[[keys]]\nkid = \"a\"\nseed = \"{A}\"\nretire_at = \"2020-01-01T00:00:00Z\"\n"
                ),
                "sign with",
            ),
        ] {
            let e = KeyRing::parse(text).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
    }
}
