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
}

/// A key source that could not answer.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

/// Where records are looked up by key id.
#[tonic::async_trait]
pub trait KeySource: Send + Sync {
    /// The record of `id`, if this source has it.
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, SourceError>;
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
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, SourceError> {
        Ok(self.index.load().lookup(id))
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

    fn name(&self, id: &str) -> String {
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
        ];
        redis::cmd("HSET")
            .arg(self.name(&r.id))
            .arg(fields)
            .query_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| SourceError(e.to_string()))
    }

    /// Marks a key revoked; `false` when there is no such key.
    pub async fn revoke(&self, id: &str) -> Result<bool, SourceError> {
        let mut conn = self.conn()?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(self.name(id))
            .query_async(&mut conn)
            .await
            .map_err(|e| SourceError(e.to_string()))?;
        if exists {
            redis::cmd("HSET")
                .arg(self.name(id))
                .arg("disabled")
                .arg("1")
                .query_async::<i64>(&mut conn)
                .await
                .map_err(|e| SourceError(e.to_string()))?;
        }
        Ok(exists)
    }

    /// The record of `id`, as stored.
    pub async fn get_record(&self, id: &str) -> Result<Option<KeyRecord>, SourceError> {
        KeySource::get(self, id).await
    }

    /// Every record.
    pub async fn list(&self) -> Result<Vec<KeyRecord>, SourceError> {
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
        let mut out = Vec::new();
        for name in names {
            let id = name.rsplit(':').next().unwrap_or_default().to_string();
            if let Some(r) = self.get(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl KeySource for RedisKeys {
    async fn get(&self, id: &str) -> Result<Option<KeyRecord>, SourceError> {
        let mut conn = self.conn()?;
        let fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(self.name(id))
            .query_async(&mut conn)
            .await
            .map_err(|e| SourceError(e.to_string()))?;
        if fields.is_empty() {
            return Ok(None);
        }
        let text = |k: &str| fields.get(k).cloned().unwrap_or_default();
        let list = |k: &str| {
            text(k)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        let number = |k: &str| text(k).parse::<u64>().ok();
        let mut hash = [0u8; 32];
        if hex::decode_to_slice(text("hash"), &mut hash).is_err() {
            return Err(SourceError(format!(
                "record {id:?} in redis has a malformed hash"
            )));
        }
        Ok(Some(KeyRecord {
            id: id.to_string(),
            hash,
            tenant: text("tenant"),
            tier: text("tier"),
            scopes: list("scopes"),
            groups: list("groups"),
            models: list("models"),
            expires_at: number("expires_at"),
            disabled: text("disabled") == "1",
            replaces: Some(text("replaces")).filter(|s| !s.is_empty()),
            grace_until: number("grace_until"),
        }))
    }
}
