//! Chain heads ("seals"): a line the writer adds to a file when it closes
//! it (on rotation and on shutdown), stating the chain head — the hash of
//! the last line before it (`prev`), its `seq`, and how many records it
//! covers — optionally signed with Ed25519 (RFC 8032).
//!
//! A seal is chained like a record (`seq`, `prev`, `hash`), so the next
//! file's first line links to it and `tollgate audit verify` checks it with
//! the rest of the chain. Its line starts `{"v":1,"kind":"seal",`; readers
//! of records skip it. Without a key (`audit.signing_key` unset) the seal
//! is hashed only: it shows where a file ended, and `records` is checked.
//! With a key, `sig` is the Ed25519 signature of [`message`], so anyone
//! holding the public key (`tollgate audit verify --public-key PUB.pem`)
//! can tell the chain up to each seal was written by the key's holder: a
//! chain re-hashed after an edit no longer carries valid signatures.
//!
//! Keys are PEM files as OpenSSL makes them: `openssl genpkey -algorithm
//! ed25519 -out audit-signing.pem` (PKCS#8, RFC 8410) and `openssl pkey -in
//! audit-signing.pem -pubout -out audit-signing.pub.pem` (SPKI).

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::pkcs8::spki::DecodePublicKey;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// How every seal line begins (and no record line does).
pub const SEAL_PREFIX: &str = "{\"v\":1,\"kind\":\"seal\",";

/// Bytes a rotating file keeps free for its seal line (a signed seal is
/// about 400 bytes).
pub(crate) const SEAL_ROOM: u64 = 640;

/// Why a key cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read the key: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: not an Ed25519 {what} PEM ({detail}); make one with `openssl genpkey -algorithm ed25519` (private) or `openssl pkey -pubout` (public)"
    )]
    Parse {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
}

/// The private key that signs seals (`audit.signing_key`).
pub struct SealKey {
    /// Boxed: the expanded key is a few hundred bytes.
    key: Box<SigningKey>,
    id: String,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("SealKey").field("id", &self.id).finish()
    }
}

impl SealKey {
    /// Reads a PKCS#8 PEM Ed25519 private key.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let pem = read(path)?;
        let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Parse {
            path: path.to_path_buf(),
            what: "private key (PKCS#8)",
            detail: e.to_string(),
        })?;
        let id = key_id(&key.verifying_key());
        Ok(Self {
            key: Box::new(key),
            id,
        })
    }

    /// The key id seals carry: see [`key_id`].
    pub fn id(&self) -> &str {
        &self.id
    }
}

/// Reads an SPKI PEM Ed25519 public key (`tollgate audit verify
/// --public-key`).
pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let pem = read(path)?;
    VerifyingKey::from_public_key_pem(&pem).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        what: "public key (SPKI)",
        detail: e.to_string(),
    })
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// A public key's id: the first 16 hex digits of the SHA-256 of its 32
/// bytes, so a reader sees which key signed without holding it.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// The bytes a seal's `sig` signs: `tollgate.audit.seal/1`, the seal's
/// `seq`, `prev` (the chain head: it commits to every line before), the
/// number of records it covers and its `time`, joined by `\n`.
pub fn message(seq: u64, prev: &str, records: u64, time: &str) -> String {
    format!("tollgate.audit.seal/1\n{seq}\n{prev}\n{records}\n{time}")
}

/// A seal before the writer chains it (`seq`, `prev`, `hash` follow).
#[derive(Debug, Serialize)]
pub(crate) struct Seal {
    v: u32,
    kind: &'static str,
    /// RFC 3339, UTC, milliseconds.
    time: String,
    /// Records (not seals) since the previous seal or the start of the
    /// chain.
    records: u64,
    /// `rotation` or `shutdown`.
    reason: &'static str,
    key_id: Option<String>,
    /// Lowercase hex Ed25519 signature of [`message`]; `null` unsigned.
    sig: Option<String>,
}

impl Seal {
    /// The seal at chain position (`seq`, `prev`) covering `records`.
    pub(crate) fn new(
        seq: u64,
        prev: &str,
        records: u64,
        reason: &'static str,
        key: Option<&SealKey>,
    ) -> Self {
        let time = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let sig = key.map(|k| {
            hex::encode(
                k.key
                    .sign(message(seq, prev, records, &time).as_bytes())
                    .to_bytes(),
            )
        });
        Self {
            v: 1,
            kind: "seal",
            time,
            records,
            reason,
            key_id: key.map(|k| k.id.clone()),
            sig,
        }
    }
}

/// A seal as read back.
#[derive(Debug)]
pub(crate) struct ReadSeal {
    pub records: u64,
    time: String,
    sig: Option<String>,
}

impl ReadSeal {
    /// The seal fields of a parsed line, if it is a seal.
    pub(crate) fn of(value: &serde_json::Value) -> Option<Self> {
        (value["kind"] == "seal").then(|| Self {
            records: value["records"].as_u64().unwrap_or(u64::MAX),
            time: value["time"].as_str().unwrap_or_default().to_string(),
            sig: value["sig"].as_str().map(str::to_string),
        })
    }

    /// Checks the signature at chain position (`seq`, `prev`) against `key`.
    pub(crate) fn check(&self, seq: u64, prev: &str, key: &VerifyingKey) -> Result<(), String> {
        let Some(sig) = &self.sig else {
            return Err("the seal is not signed, but a public key was given".into());
        };
        let bytes = hex::decode(sig)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
            .ok_or("the seal's \"sig\" is not 64 bytes of hex")?;
        key.verify(
            message(seq, prev, self.records, &self.time).as_bytes(),
            &Signature::from_bytes(&bytes),
        )
        .map_err(|_| {
            format!(
                "the seal's signature does not verify with key {}: the chain before it was rewritten or signed by another key",
                key_id(key)
            )
        })
    }
}
