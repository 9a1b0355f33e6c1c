//! API keys from a keys file that holds only their SHA-256 hashes.
//!
//! API keys are long random strings, so a fast cryptographic hash is the right
//! storage form (a password KDF buys nothing against 256 bits of entropy):
//! the file never contains a usable key, and lookups hash the presented key
//! and find its record by hash, so no comparison ever touches the secret.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{Authentication, Authenticator, Principal, PrincipalKind};
use crate::config::line_col;
use crate::decision::Reason;
use crate::request::HttpRequest;

/// A keys file that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}:{col}: {message}")]
pub struct KeysFileError {
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeyEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: toml::Spanned<String>,
    /// `sha256:<64 hex digits>` of the full key.
    hash: toml::Spanned<String>,
    tenant: String,
    tier: String,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(default)]
    groups: Vec<String>,
}

/// One key's record: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: String,
    pub tier: String,
    pub scopes: Vec<String>,
    pub groups: Vec<String>,
}

/// Key records indexed by the SHA-256 of the key.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_hash: HashMap<[u8; 32], KeyRecord>,
    /// Content hash of the file, to skip no-op reloads.
    pub version: String,
}

impl KeyIndex {
    /// Parses a keys file's text; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Self, KeysFileError> {
        let err_at = |offset: usize, message: String| {
            let (line, col) = line_col(text, offset);
            KeysFileError {
                file: file.to_string(),
                line,
                col,
                message,
            }
        };
        let parsed: KeysFile = toml::from_str(text).map_err(|e| {
            err_at(
                e.span().map_or(0, |s| s.start),
                e.message().trim().to_string(),
            )
        })?;
        let mut by_hash = HashMap::new();
        let mut ids = HashMap::new();
        for entry in parsed.keys {
            let hash = parse_hash(entry.hash.get_ref())
                .ok_or_else(|| err_at(entry.hash.span().start, "hash must be \"sha256:\" followed by 64 hex digits; `tollgate keys hash KEY` prints it".into()))?;
            let id = entry.id.get_ref().clone();
            if id.is_empty() {
                return Err(err_at(entry.id.span().start, "key id is empty".into()));
            }
            if ids.insert(id.clone(), ()).is_some() {
                return Err(err_at(
                    entry.id.span().start,
                    format!("duplicate key id {id:?}"),
                ));
            }
            let record = KeyRecord {
                id,
                tenant: entry.tenant,
                tier: entry.tier,
                scopes: entry.scopes,
                groups: entry.groups,
            };
            if by_hash.insert(hash, record).is_some() {
                return Err(err_at(
                    entry.hash.span().start,
                    "two records share this hash".into(),
                ));
            }
        }
        Ok(Self {
            by_hash,
            version: hash_hex(text.as_bytes()),
        })
    }

    /// Reads and parses a keys file.
    pub fn load(path: &Path) -> Result<Self, KeysFileError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeysFileError {
            file: path.display().to_string(),
            line: 1,
            col: 1,
            message: format!("cannot read keys file: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The record of a presented key, if any.
    pub fn lookup(&self, key: &str) -> Option<&KeyRecord> {
        self.by_hash.get(&sha256(key.as_bytes()))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

/// `sha256:<hex>` of a key, the form the keys file stores.
pub fn key_hash(key: &str) -> String {
    format!("sha256:{}", hash_hex(key.as_bytes()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn hash_hex(bytes: &[u8]) -> String {
    hex::encode(sha256(bytes))
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// API keys from a file, swappable on reload.
pub struct ApiKeyAuthenticator {
    index: Arc<ArcSwap<KeyIndex>>,
    max_len: usize,
    path: PathBuf,
}

impl ApiKeyAuthenticator {
    /// Loads the keys file.
    pub fn load(path: &Path, max_len: usize) -> Result<Self, KeysFileError> {
        let index = KeyIndex::load(path)?;
        Ok(Self {
            index: Arc::new(ArcSwap::from_pointee(index)),
            max_len,
            path: path.to_path_buf(),
        })
    }

    /// A handle that reloads this authenticator's keys.
    pub fn reloader(&self) -> KeysReloader {
        KeysReloader {
            index: self.index.clone(),
            path: self.path.clone(),
        }
    }
}

/// Re-reads a keys file and swaps it in, keeping the old one on error.
#[derive(Clone)]
pub struct KeysReloader {
    index: Arc<ArcSwap<KeyIndex>>,
    path: PathBuf,
}

impl KeysReloader {
    /// Reloads; `Ok(true)` when the content changed.
    pub fn reload(&self) -> Result<bool, KeysFileError> {
        let fresh = KeyIndex::load(&self.path)?;
        if fresh.version == self.index.load().version {
            return Ok(false);
        }
        self.index.store(Arc::new(fresh));
        Ok(true)
    }

    /// The file this reloader reads.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Extracts the presented API key: `x-api-key`, else `Authorization: Bearer`.
fn presented_key(request: &HttpRequest) -> Option<&str> {
    if let Some(v) = request.header("x-api-key") {
        return Some(v);
    }
    let auth = request.header("authorization")?;
    let (scheme, rest) = auth.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(rest)
}

impl Authenticator for ApiKeyAuthenticator {
    fn authenticate(&self, request: &HttpRequest) -> Authentication {
        let Some(key) = presented_key(request) else {
            return Authentication::NotPresent;
        };
        // Envoy joins duplicate headers with ','; never pick one of them.
        if key.contains(',') {
            return Authentication::Rejected(Reason::AmbiguousCredential);
        }
        let key = key.trim();
        if key.is_empty() || key.len() > self.max_len || key.contains(char::is_whitespace) {
            return Authentication::Rejected(Reason::InvalidCredential);
        }
        match self.index.load().lookup(key) {
            Some(record) => Authentication::Authenticated(Principal {
                kind: PrincipalKind::ApiKey,
                id: record.id.clone(),
                tenant: Some(record.tenant.clone()),
                tier: Some(record.tier.clone()),
                scopes: record.scopes.clone(),
                groups: record.groups.clone(),
            }),
            None => Authentication::Rejected(Reason::InvalidCredential),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(key: &str) -> String {
        format!(
            "[[keys]]\nid = \"k1\"\nhash = \"{}\"\ntenant = \"acme\"\ntier = \"paid\"\nscopes = [\"llm:generate\"]\n",
            key_hash(key)
        )
    }

    fn auth(text: &str) -> ApiKeyAuthenticator {
        ApiKeyAuthenticator {
            index: Arc::new(ArcSwap::from_pointee(
                KeyIndex::parse(text, "keys.toml").expect("parse"),
            )),
            max_len: 256,
            path: PathBuf::from("keys.toml"),
        }
    }

    fn with_header(name: &str, value: &str) -> HttpRequest {
        let mut req = HttpRequest::default();
        req.headers.insert(name.into(), value.into());
        req
    }

    #[test]
    fn credential_table() {
        let a = auth(&file("tg_secret_1"));
        let cases = [
            ("x-api-key", "tg_secret_1", Some(Ok("k1"))),
            ("authorization", "Bearer tg_secret_1", Some(Ok("k1"))),
            ("authorization", "bearer tg_secret_1", Some(Ok("k1"))),
            ("authorization", "Basic dXNlcjpwYXNz", None),
            (
                "x-api-key",
                "tg_secret_2",
                Some(Err(Reason::InvalidCredential)),
            ),
            (
                "x-api-key",
                "tg_secret_1,tg_secret_1",
                Some(Err(Reason::AmbiguousCredential)),
            ),
            (
                "authorization",
                "Bearer a, Bearer b",
                Some(Err(Reason::AmbiguousCredential)),
            ),
            ("x-api-key", "", Some(Err(Reason::InvalidCredential))),
            ("x-other", "tg_secret_1", None),
        ];
        for (name, value, want) in cases {
            let got = match a.authenticate(&with_header(name, value)) {
                Authentication::NotPresent => None,
                Authentication::Authenticated(p) => Some(Ok(p.id)),
                Authentication::Rejected(r) => Some(Err(r)),
            };
            let want = want.map(|w| w.map(str::to_string));
            assert_eq!(got, want, "{name}: {value}");
        }
        let long = "k".repeat(1 << 20);
        assert_eq!(
            a.authenticate(&with_header("x-api-key", &long)),
            Authentication::Rejected(Reason::InvalidCredential)
        );
    }

    #[test]
    fn bad_hash_is_reported_at_its_line() {
        let err = KeyIndex::parse(
            "[[keys]]\nid = \"k1\"\nhash = \"md5:abc\"\ntenant = \"a\"\ntier = \"free\"\n",
            "keys.toml",
        )
        .expect_err("bad hash");
        assert_eq!((err.line, err.col), (3, 8), "{err}");
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let text = format!("{}{}", file("a"), file("b"));
        let err = KeyIndex::parse(&text, "keys.toml").expect_err("dup");
        assert!(err.message.contains("duplicate key id"), "{err}");
    }
}
