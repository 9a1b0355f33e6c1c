//! API key records and where they come from: a keys file (hot-reloaded) and
//! Redis (so keys are issued and revoked across replicas without restart).
//! Records hold the key's SHA-256, never the key.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::line_col;

/// One key's record: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    /// SHA-256 of the full key.
    pub hash: [u8; 32],
    pub tenant: String,
    pub tier: String,
    pub scopes: Vec<String>,
    pub groups: Vec<String>,
    /// Models the key may use; empty means any.
    pub models: Vec<String>,
    /// Seconds since the epoch after which the key is refused.
    pub expires_at: Option<u64>,
    pub disabled: bool,
    /// Another key this one replaces.
    pub replaces: Option<String>,
    /// This key's rotation deadline: it was replaced and keeps working
    /// until then. (In the keys file it is written on the new record.)
    pub grace_until: Option<u64>,
    /// Client addresses the key may be used from (`10.0.0.0/8`,
    /// `2001:db8::/32`); empty means any. A request from elsewhere, or
    /// without a client address, is refused with `source_not_allowed`.
    pub allowed_cidrs: Vec<ipnet::IpNet>,
}

impl KeyRecord {
    /// The principal a request made with this key is decided as.
    pub fn principal(&self) -> super::Principal {
        super::Principal {
            kind: super::PrincipalKind::ApiKey,
            id: self.id.clone(),
            tenant: Some(self.tenant.clone()),
            tier: Some(self.tier.clone()),
            scopes: self.scopes.clone(),
            groups: self.groups.clone(),
            models: self.models.clone(),
        }
    }
}

/// A key source that could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// What one source holds for a key id.
// Short-lived values on a lookup path; boxing the record buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// A whole record.
    Record(KeyRecord),
    /// Only a revocation: `tollgate keys revoke` of a key whose record lives
    /// in another source (the keys file) stores this in Redis.
    Revocation,
    /// A record with a field that does not parse; the message names the
    /// field and the expected form. The key is refused until it is fixed.
    Invalid(String),
}

/// Where records are looked up by key id.
#[tonic::async_trait]
pub trait KeySource: Send + Sync {
    /// Short name for logs and `keys list` (`file`, `redis`).
    fn name(&self) -> &'static str;
    /// What this source holds for `id`, if anything.
    async fn get(&self, id: &str) -> Result<Option<Stored>, SourceError>;
}

/// What a request presenting key `id` gets, given what each source holds.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effective {
    /// No source has a record.
    Unknown,
    /// The record a request is checked against. `disabled` is set when any
    /// source revoked the key: a revocation anywhere wins.
    Record(KeyRecord),
    /// The key cannot be checked: a record that does not parse, or whole
    /// records for one id in two sources (which one the operator meant is a
    /// guess). The message says what to fix.
    Invalid(String),
}

/// Combines what the sources hold for one id (`(source name, stored)`).
/// Precedence: a broken record anywhere refuses the key; a revocation or a
/// disabled record anywhere revokes it; otherwise the one whole record
/// applies. The keys file and Redis must never both hold a whole record for
/// an id (`keys create` refuses such ids).
pub fn effective(found: &[(&'static str, Stored)]) -> Effective {
    let mut record: Option<(&str, &KeyRecord)> = None;
    let mut revoked = false;
    for (source, stored) in found {
        match stored {
            Stored::Invalid(message) => {
                return Effective::Invalid(format!("{source}: {message}"));
            }
            Stored::Revocation => revoked = true,
            Stored::Record(r) => {
                if let Some((first, _)) = record {
                    return Effective::Invalid(format!(
                        "key id {:?} has a record in both {first} and {source}; remove one",
                        r.id
                    ));
                }
                revoked |= r.disabled;
                record = Some((source, r));
            }
        }
    }
    match record {
        None => Effective::Unknown,
        Some((_, r)) => {
            let mut r = r.clone();
            r.disabled = revoked;
            Effective::Record(r)
        }
    }
}

/// SHA-256 of a key.
pub fn sha256(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// `sha256:<hex>` of a key, the form the keys file stores.
pub fn key_hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(sha256(key)))
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// Seconds since the epoch, now.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    expires_at: Option<toml::Spanned<String>>,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    replaces: Option<String>,
    #[serde(default)]
    grace_until: Option<toml::Spanned<String>>,
    #[serde(default)]
    allowed_cidrs: Vec<toml::Spanned<String>>,
}

/// Records of a keys file, by id.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_id: HashMap<String, KeyRecord>,
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
        let time = |t: &Option<toml::Spanned<String>>| -> Result<Option<u64>, KeysFileError> {
            t.as_ref()
                .map(|s| {
                    humantime::parse_rfc3339_weak(s.get_ref())
                        .map(|t| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
                        .map_err(|e| err_at(s.span().start, format!("not an RFC 3339 time ({e}); write e.g. \"2027-01-31T00:00:00Z\"")))
                })
                .transpose()
        };
        let mut by_id = HashMap::new();
        for entry in parsed.keys {
            let hash = parse_hash(entry.hash.get_ref()).ok_or_else(|| {
                err_at(entry.hash.span().start, "hash must be \"sha256:\" followed by 64 hex digits; `tollgate keys hash KEY` prints it".into())
            })?;
            let id = entry.id.get_ref().clone();
            if !super::key_format::valid_id(&id) {
                return Err(err_at(
                    entry.id.span().start,
                    format!("key id {id:?}: use 1–40 lowercase letters, digits or '-'"),
                ));
            }
            let record = KeyRecord {
                id: id.clone(),
                hash,
                tenant: entry.tenant,
                tier: entry.tier,
                scopes: entry.scopes,
                groups: entry.groups,
                models: entry.models,
                expires_at: time(&entry.expires_at)?,
                disabled: entry.disabled,
                replaces: entry.replaces,
                grace_until: time(&entry.grace_until)?,
                allowed_cidrs: entry
                    .allowed_cidrs
                    .iter()
                    .map(|c| parse_cidr(c.get_ref()).map_err(|m| err_at(c.span().start, m)))
                    .collect::<Result<_, _>>()?,
            };
            if by_id.insert(id.clone(), record).is_some() {
                return Err(err_at(
                    entry.id.span().start,
                    format!("duplicate key id {id:?}"),
                ));
            }
        }
        Ok(Self {
            by_id,
            version: hex::encode(Sha256::digest(text.as_bytes())),
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

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Every record, for listing.
    pub fn records(&self) -> impl Iterator<Item = &KeyRecord> {
        self.by_id.values()
    }

    /// The record of `id`. If a newer record replaces it, the newer one's
    /// `grace_until` becomes this key's deadline (none given: now).
    pub fn lookup(&self, id: &str) -> Option<KeyRecord> {
        let mut record = self.by_id.get(id).cloned()?;
        // In the file, `grace_until` sits on the new record and is about the
        // key it replaces; a record's own deadline comes from its successor.
        record.grace_until = self
            .by_id
            .values()
            .find(|n| n.replaces.as_deref() == Some(id))
            .map(|newer| newer.grace_until.unwrap_or(0));
        Some(record)
    }
}

/// A hot-reloadable keys file.
pub struct FileKeys {
    index: ArcSwap<KeyIndex>,
    path: PathBuf,
}

impl FileKeys {
    /// Loads `path`.
    pub fn load(path: &Path) -> Result<Self, KeysFileError> {
        Ok(Self {
            index: ArcSwap::from_pointee(KeyIndex::load(path)?),
            path: path.to_path_buf(),
        })
    }

    /// Re-reads the file; `Ok(true)` when the content changed.
    pub fn reload(&self) -> Result<bool, KeysFileError> {
        let fresh = KeyIndex::load(&self.path)?;
        if fresh.version == self.index.load().version {
            return Ok(false);
        }
        self.index.store(Arc::new(fresh));
        Ok(true)
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[tonic::async_trait]
impl KeySource for FileKeys {
    fn name(&self) -> &'static str {
        "keys file"
    }

    async fn get(&self, id: &str) -> Result<Option<Stored>, SourceError> {
        Ok(self.index.load().lookup(id).map(Stored::Record))
    }
}

/// Key records in Redis: one hash per key at `<prefix>apikey:<id>`.
pub struct RedisKeys {
    conn: crate::redis_conn::Link<redis::aio::MultiplexedConnection>,
    prefix: String,
}

impl RedisKeys {
    /// Connects in the background.
    pub fn connect(url: &str, prefix: &str, timeout: Duration) -> Result<Self, SourceError> {
        Ok(Self {
            conn: crate::redis_conn::standalone(url, timeout, "redis api keys")
                .map_err(SourceError)?,
            prefix: prefix.to_string(),
        })
    }

    fn redis_key(&self, id: &str) -> String {
        format!("{}apikey:{id}", self.prefix)
    }

    fn conn(&self) -> Result<redis::aio::MultiplexedConnection, SourceError> {
        self.conn
            .get()
            .map(|(c, _)| c)
            .ok_or_else(|| SourceError("not connected to redis yet".into()))
    }

    /// Whether connected.
    pub fn connected(&self) -> bool {
        self.conn.connected()
    }

    /// Stores a record (create or replace).
    pub async fn put(&self, r: &KeyRecord) -> Result<(), SourceError> {
        let mut conn = self.conn()?;
        let fields: Vec<(&str, String)> = vec![
            ("hash", hex::encode(r.hash)),
            ("tenant", r.tenant.clone()),
            ("tier", r.tier.clone()),
            ("scopes", r.scopes.join(",")),
            ("groups", r.groups.join(",")),
            ("models", r.models.join(",")),
            (
                "expires_at",
                r.expires_at.map(|t| t.to_string()).unwrap_or_default(),
            ),
            ("disabled", if r.disabled { "1" } else { "0" }.into()),
            ("replaces", r.replaces.clone().unwrap_or_default()),
            (
                "grace_until",
                r.grace_until.map(|t| t.to_string()).unwrap_or_default(),
            ),
            (
                "allowed_cidrs",
                r.allowed_cidrs
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
        ];
        redis::cmd("HSET")
            .arg(self.redis_key(&r.id))
            .arg(fields)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| SourceError(e.to_string()))
    }

    /// Marks a key revoked; `false` when Redis holds nothing for the id.
    pub async fn revoke(&self, id: &str) -> Result<bool, SourceError> {
        let mut conn = self.conn()?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.redis_key(id))
            .query_async(&mut conn)
            .await
            .map_err(|e| SourceError(e.to_string()))?;
        if exists {
            self.put_revocation(id).await?;
        }
        Ok(exists)
    }

    /// Records a revocation of `id` in Redis (on its record, or alone when
    /// the record lives in the keys file). It wins over every source.
    pub async fn put_revocation(&self, id: &str) -> Result<(), SourceError> {
        let mut conn = self.conn()?;
        redis::cmd("HSET")
            .arg(self.redis_key(id))
            .arg("disabled")
            .arg("1")
            .arg("revoked_at")
            .arg(now_secs().to_string())
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| SourceError(e.to_string()))
    }

    /// What Redis holds for `id`.
    pub async fn get_record(&self, id: &str) -> Result<Option<Stored>, SourceError> {
        KeySource::get(self, id).await
    }

    /// Every id Redis holds something for.
    pub async fn ids(&self) -> Result<Vec<String>, SourceError> {
        let mut conn = self.conn()?;
        // SCAN, not KEYS: KEYS blocks a shared Redis for the whole keyspace.
        let pattern = format!("{}apikey:*", self.prefix);
        let mut names = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(|e| SourceError(e.to_string()))?;
            names.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let prefix = format!("{}apikey:", self.prefix);
        Ok(names
            .iter()
            .filter_map(|n| n.strip_prefix(&prefix))
            .map(str::to_string)
            .collect())
    }
}

#[tonic::async_trait]
impl KeySource for RedisKeys {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn get(&self, id: &str) -> Result<Option<Stored>, SourceError> {
        use crate::redis_conn::PoisonReason;
        let (mut conn, generation) = self
            .conn
            .get()
            .ok_or_else(|| SourceError("not connected to redis yet".into()))?;
        // The record and an echoed nonce in one pipeline: a multiplexed
        // connection pairs replies with calls by order only, so a reply that
        // does not end with this call's nonce proves the stream is out of
        // step and the connection is dropped (see `crate::redis_conn`). A
        // caller that gives up mid-call drops it too (the guard).
        let nonce = crate::redis_conn::next_nonce();
        let guard = self.conn.guard(generation);
        let reply: Result<(HashMap<String, String>, String), redis::RedisError> = redis::pipe()
            .cmd("HGETALL")
            .arg(self.redis_key(id))
            .cmd("ECHO")
            .arg(&nonce)
            .query_async(&mut conn)
            .await;
        let fields = match reply {
            Ok((fields, echoed)) if echoed == nonce => {
                guard.disarm();
                fields
            }
            Ok(_) => {
                guard.poison(PoisonReason::Unattributed);
                return Err(SourceError(
                    "a redis reply did not belong to its call; connection dropped".into(),
                ));
            }
            Err(e) => {
                match PoisonReason::of(&e) {
                    Some(reason) => guard.poison(reason),
                    None => guard.disarm(),
                }
                return Err(SourceError(e.to_string()));
            }
        };
        if fields.is_empty() {
            return Ok(None);
        }
        Ok(Some(match parse_redis_record(id, &fields) {
            Ok(stored) => stored,
            Err(message) => Stored::Invalid(message),
        }))
    }
}

/// Reads one CIDR of `allowed_cidrs` (`10.0.0.0/8`; a bare address is
/// the single-address range).
pub fn parse_cidr(text: &str) -> Result<ipnet::IpNet, String> {
    let t = text.trim();
    t.parse::<ipnet::IpNet>()
        .or_else(|_| t.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("allowed_cidrs: {text:?} is not a CIDR; write e.g. \"10.0.0.0/8\""))
}

/// Latest time accepted in `expires_at`, `grace_until` and `revoked_at`:
/// 9999-12-31T23:59:59Z, in seconds since the epoch.
const MAX_EPOCH_SECS: u64 = 253_402_300_799;

/// Reads a Redis key record (a hash) strictly. The accepted form of each
/// field, as `tollgate keys create` writes it:
///
/// | field | form |
/// |---|---|
/// | `hash` | 64 hex digits (SHA-256 of the key), required |
/// | `tenant`, `tier` | non-empty text, no control characters or edge whitespace, required |
/// | `scopes`, `groups`, `models` | comma-separated items without whitespace or control characters; empty for none |
/// | `expires_at`, `grace_until`, `revoked_at` | seconds since the epoch, decimal digits only; empty for none |
/// | `disabled` | `0` or `1` |
/// | `replaces` | a key id, or empty |
/// | `allowed_cidrs` | comma-separated CIDRs (`10.0.0.0/8,2001:db8::/32`); empty for any address |
///
/// A hash holding only `disabled = 1` (and `revoked_at`) is a revocation of
/// a key whose record lives in the keys file. Anything else — an unknown
/// field, `disabled = true`, `expires_at = soon`, `grace_until = -5` or an
/// RFC 3339 time — is an error naming the field: the key is refused rather
/// than read as if the field were absent.
pub fn parse_redis_record(id: &str, fields: &HashMap<String, String>) -> Result<Stored, String> {
    const KNOWN: [&str; 12] = [
        "allowed_cidrs",
        "hash",
        "tenant",
        "tier",
        "scopes",
        "groups",
        "models",
        "expires_at",
        "disabled",
        "replaces",
        "grace_until",
        "revoked_at",
    ];
    let bad =
        |field: &str, want: &str| format!("key record {id:?}: field {field:?} must be {want}");
    let mut unknown: Vec<&str> = fields
        .keys()
        .map(String::as_str)
        .filter(|k| !KNOWN.contains(k))
        .collect();
    unknown.sort_unstable();
    if let Some(first) = unknown.first() {
        return Err(format!(
            "key record {id:?}: unknown field {first:?}; known fields: {}",
            KNOWN.join(", ")
        ));
    }
    let epoch = |field: &str| -> Result<Option<u64>, String> {
        match fields.get(field).map(String::as_str) {
            None | Some("") => Ok(None),
            Some(v) => v
                .bytes()
                .all(|b| b.is_ascii_digit())
                .then(|| v.parse::<u64>().ok())
                .flatten()
                .filter(|t| *t <= MAX_EPOCH_SECS)
                .map(Some)
                .ok_or_else(|| bad(field, "seconds since the epoch (decimal digits), or empty")),
        }
    };
    let disabled = match fields.get("disabled").map(String::as_str) {
        None | Some("0") => false,
        Some("1") => true,
        Some(_) => return Err(bad("disabled", "\"0\" or \"1\"")),
    };
    epoch("revoked_at")?;
    let record_fields = ["hash", "tenant", "tier"];
    if !record_fields.iter().any(|f| fields.contains_key(*f)) {
        // No record here: a revocation, or nothing usable.
        return if disabled {
            Ok(Stored::Revocation)
        } else {
            Err(format!(
                "key record {id:?}: has no \"hash\", \"tenant\" and \"tier\" and is not a revocation (\"disabled\" = \"1\")"
            ))
        };
    }
    let text = |field: &str| -> Result<String, String> {
        match fields.get(field) {
            Some(v) if !v.is_empty() && crate::respond::is_field_value(v) => Ok(v.clone()),
            _ => Err(bad(
                field,
                "non-empty text without control characters or leading/trailing whitespace",
            )),
        }
    };
    let list = |field: &str| -> Result<Vec<String>, String> {
        let raw = fields.get(field).map(String::as_str).unwrap_or("");
        if raw.is_empty() {
            return Ok(Vec::new());
        }
        raw.split(',')
            .map(|item| {
                if item.is_empty() || item.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    Err(bad(
                        field,
                        "comma-separated items without whitespace or control characters",
                    ))
                } else {
                    Ok(item.to_string())
                }
            })
            .collect()
    };
    let mut hash = [0u8; 32];
    let hash_text = fields.get("hash").map(String::as_str).unwrap_or("");
    if hash_text.len() != 64 || hex::decode_to_slice(hash_text, &mut hash).is_err() {
        return Err(bad("hash", "64 hex digits (the SHA-256 of the key)"));
    }
    let replaces = match fields.get("replaces").map(String::as_str) {
        None | Some("") => None,
        Some(r) if super::key_format::valid_id(r) => Some(r.to_string()),
        Some(_) => return Err(bad("replaces", "a key id, or empty")),
    };
    Ok(Stored::Record(KeyRecord {
        id: id.to_string(),
        hash,
        tenant: text("tenant")?,
        tier: text("tier")?,
        scopes: list("scopes")?,
        groups: list("groups")?,
        models: list("models")?,
        expires_at: epoch("expires_at")?,
        disabled,
        replaces,
        grace_until: epoch("grace_until")?,
        allowed_cidrs: list("allowed_cidrs")?
            .iter()
            .map(|c| parse_cidr(c).map_err(|m| format!("key record {id:?}: {m}")))
            .collect::<Result<_, _>>()?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(extra: &[(&str, &str)]) -> HashMap<String, String> {
        let mut f: HashMap<String, String> = [
            ("hash", "ab".repeat(32).as_str()),
            ("tenant", "acme"),
            ("tier", "paid"),
            ("scopes", "llm:generate"),
            ("groups", ""),
            ("models", ""),
            ("expires_at", ""),
            ("disabled", "0"),
            ("replaces", ""),
            ("grace_until", ""),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in extra {
            f.insert(k.to_string(), v.to_string());
        }
        f
    }

    #[test]
    fn redis_records_parse_strictly() {
        assert!(matches!(
            parse_redis_record("k", &fields(&[])),
            Ok(Stored::Record(_))
        ));
        assert!(matches!(
            parse_redis_record(
                "k",
                &fields(&[("expires_at", "4102444800"), ("disabled", "1")])
            ),
            Ok(Stored::Record(KeyRecord {
                disabled: true,
                expires_at: Some(4_102_444_800),
                ..
            }))
        ));
        for (field, value) in [
            ("grace_until", "garbage"),
            ("grace_until", "-5"),
            ("grace_until", "2027-01-01T00:00:00Z"),
            ("grace_until", "+5"),
            ("grace_until", " 5"),
            ("grace_until", "99999999999999999999"),
            ("expires_at", "soon"),
            ("expires_at", "1.5"),
            ("disabled", "true"),
            ("disabled", ""),
            ("disabled", "yes"),
            ("hash", "xyz"),
            ("hash", ""),
            ("tenant", ""),
            ("tier", "paid\r\nx-injected: yes"),
            ("tier", "paid\0"),
            ("tenant", " acme"),
            ("scopes", "a,,b"),
            ("scopes", "a b"),
            ("replaces", "Not An Id"),
            ("revoked", "1"),
        ] {
            let got = parse_redis_record("k", &fields(&[(field, value)]));
            assert!(got.is_err(), "{field} = {value:?} parsed: {got:?}");
        }
        let mut marker = HashMap::new();
        marker.insert("disabled".to_string(), "1".to_string());
        marker.insert("revoked_at".to_string(), "1700000000".to_string());
        assert_eq!(parse_redis_record("k", &marker), Ok(Stored::Revocation));
        marker.insert("disabled".to_string(), "0".to_string());
        assert!(parse_redis_record("k", &marker).is_err());
    }

    #[test]
    fn a_revocation_anywhere_wins() {
        let record = match parse_redis_record("k", &fields(&[])) {
            Ok(Stored::Record(r)) => r,
            other => panic!("{other:?}"),
        };
        let revoked = |e: Effective| matches!(e, Effective::Record(r) if r.disabled);
        assert!(revoked(effective(&[
            ("keys file", Stored::Record(record.clone())),
            ("redis", Stored::Revocation),
        ])));
        assert!(!revoked(effective(&[(
            "keys file",
            Stored::Record(record.clone())
        )])));
        assert!(matches!(
            effective(&[
                ("keys file", Stored::Record(record.clone())),
                ("redis", Stored::Record(record.clone())),
            ]),
            Effective::Invalid(_)
        ));
        assert!(matches!(
            effective(&[
                ("keys file", Stored::Record(record)),
                ("redis", Stored::Invalid("x".into())),
            ]),
            Effective::Invalid(_)
        ));
        assert_eq!(
            effective(&[("redis", Stored::Revocation)]),
            Effective::Unknown
        );
    }

    #[test]
    fn allowed_cidrs_parse_strictly_in_both_forms() {
        let Ok(Stored::Record(r)) = parse_redis_record(
            "k",
            &fields(&[("allowed_cidrs", "10.1.2.3/8,2001:db8::/32,192.0.2.7")]),
        ) else {
            panic!("record expected");
        };
        let want: Vec<ipnet::IpNet> = ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
            .iter()
            .map(|c| c.parse().expect("cidr"))
            .collect();
        assert_eq!(r.allowed_cidrs, want);
        let err = parse_redis_record("k", &fields(&[("allowed_cidrs", "10.0.0.0/8,office")]))
            .expect_err("refused");
        assert!(err.contains("allowed_cidrs"), "{err}");
        let file = |cidr: &str| {
            format!(
                "[[keys]]\nid = \"a\"\nhash = \"sha256:{}\"\ntenant = \"t\"\ntier = \"p\"\nallowed_cidrs = [{cidr:?}]\n",
                "ab".repeat(32)
            )
        };
        let index = KeyIndex::parse(&file("198.51.100.0/24"), "keys.toml").expect("parses");
        assert_eq!(index.lookup("a").map(|r| r.allowed_cidrs.len()), Some(1));
        let err = KeyIndex::parse(&file("10.0.0.0/33"), "keys.toml").expect_err("refused");
        assert_eq!(err.line, 6, "{}", err.message);
    }
}
