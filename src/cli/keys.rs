//! `tollgate keys …`: issue, revoke and list API keys.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::identity::keys::{
    Effective, KeyIndex, KeyRecord, RedisKeys, Stored, effective, key_hash, now_secs, sha256,
};

/// `tollgate keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the hash of KEY in the form the keys file stores.
    Hash { key: String },
    /// Issue a key: prints it once and stores only its hash (in Redis when
    /// identity.api_keys_redis_url is set, else in the keys file).
    Create(CreateKey),
    /// Revoke a key by id. With Redis configured, the revocation is stored
    /// in Redis, also for a key whose record is in the keys file, and wins
    /// over the file's record.
    Revoke { id: String },
    /// List key ids with what a request presenting each key gets (never
    /// keys): both sources combined as the server combines them.
    List,
}

impl KeysCommand {
    /// The id of the key this command changes, if it changes one.
    pub fn changed_key(&self) -> Option<String> {
        match self {
            Self::Create(c) => Some(c.id.clone()),
            Self::Revoke { id } => Some(id.clone()),
            Self::Hash { .. } | Self::List => None,
        }
    }
}

/// `tollgate keys create`.
#[derive(Debug, clap::Args)]
pub struct CreateKey {
    /// Public id: lowercase letters, digits, '-'.
    #[arg(long)]
    pub id: String,
    #[arg(long)]
    pub tenant: String,
    #[arg(long)]
    pub tier: String,
    #[arg(long = "scope")]
    pub scopes: Vec<String>,
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Models the key may use (default: any).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Client addresses the key may be used from, as CIDRs (repeatable;
    /// default: any address).
    #[arg(long = "allowed-cidr")]
    pub allowed_cidrs: Vec<String>,
    /// Expiry, RFC 3339 (e.g. 2027-01-31T00:00:00Z).
    #[arg(long)]
    pub expires: Option<String>,
    /// The id of a key this one replaces.
    #[arg(long)]
    pub replaces: Option<String>,
    /// How long the replaced key keeps working, in seconds.
    #[arg(long, default_value_t = 0)]
    pub grace_secs: u64,
}

async fn redis_keys(config: &Config) -> anyhow::Result<Option<RedisKeys>> {
    let Some(url) = &config.identity.api_keys_redis_url else {
        return Ok(None);
    };
    let keys = RedisKeys::connect(
        url,
        &config.identity.api_keys_redis_prefix,
        std::time::Duration::from_secs(5),
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !keys.connected() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("cannot reach redis at {url}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(Some(keys))
}

/// Refuses values the server would refuse when reading the record back
/// (they become header values and comma-separated lists).
fn check_fields(c: &CreateKey) -> anyhow::Result<()> {
    for (flag, value) in [("--tenant", &c.tenant), ("--tier", &c.tier)] {
        if value.is_empty() || !crate::respond::is_field_value(value) {
            anyhow::bail!(
                "{flag} {value:?}: use non-empty text without control characters or leading/trailing spaces"
            );
        }
    }
    for (flag, items) in [
        ("--scope", &c.scopes),
        ("--group", &c.groups),
        ("--model", &c.models),
    ] {
        if let Some(bad) = items.iter().find(|i| {
            i.is_empty()
                || i.chars()
                    .any(|ch| ch == ',' || ch.is_whitespace() || ch.is_control())
        }) {
            anyhow::bail!(
                "{flag} {bad:?}: use a non-empty value without ',', spaces or control characters"
            );
        }
    }
    Ok(())
}

/// The keys file's records, when one is configured.
fn file_index(config: &Config) -> anyhow::Result<Option<KeyIndex>> {
    match &config.identity.api_keys_file {
        Some(f) => Ok(Some(KeyIndex::load(&config.resolve(f))?)),
        None => Ok(None),
    }
}

fn keys_file(config: &Config) -> anyhow::Result<std::path::PathBuf> {
    config
        .identity
        .api_keys_file
        .as_ref()
        .map(|f| config.resolve(f))
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no key store: set identity.api_keys_redis_url or identity.api_keys_file"
            )
        })
}

pub async fn run(config: Config, command: KeysCommand) -> anyhow::Result<ExitCode> {
    match command {
        KeysCommand::Hash { key } => println!("{}", key_hash(&key)),
        KeysCommand::Create(c) => {
            let key = crate::identity::key_format::generate(&c.id).map_err(anyhow::Error::msg)?;
            let expires_at = c
                .expires
                .as_deref()
                .map(|t| {
                    humantime::parse_rfc3339_weak(t)
                        .map(|t| {
                            t.duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs())
                        })
                        .map_err(|e| anyhow::anyhow!("--expires: {e}"))
                })
                .transpose()?;
            let grace_until = c.replaces.as_ref().map(|_| now_secs() + c.grace_secs);
            check_fields(&c)?;
            let record = KeyRecord {
                id: c.id.clone(),
                hash: sha256(&key),
                tenant: c.tenant,
                tier: c.tier,
                scopes: c.scopes,
                groups: c.groups,
                models: c.models,
                allowed_cidrs: c
                    .allowed_cidrs
                    .iter()
                    .map(|t| {
                        crate::identity::keys::parse_cidr(t)
                            .map_err(|m| anyhow::anyhow!("--allowed-cidr: {m}"))
                    })
                    .collect::<Result<_, _>>()?,
                expires_at,
                disabled: false,
                replaces: c.replaces.clone(),
                // The file form carries the replaced key's deadline on the
                // new record; in Redis it is set on the replaced record.
                grace_until: if config.identity.api_keys_redis_url.is_some() {
                    None
                } else {
                    grace_until
                },
            };
            // An id must be unique across both sources: a Redis record under
            // a file key's id would be shadowed or make both unusable.
            if let Some(index) = file_index(&config)?
                && index.lookup(&record.id).is_some()
            {
                anyhow::bail!(
                    "a key with id {:?} exists in the keys file; choose another id",
                    record.id
                );
            }
            if let Some(redis) = redis_keys(&config).await? {
                if redis.get_record(&record.id).await?.is_some() {
                    anyhow::bail!(
                        "a key with id {:?} exists in redis (or was revoked there); choose another id",
                        record.id
                    );
                }
                redis.put(&record).await?;
                if let (Some(old), Some(until)) = (&c.replaces, grace_until) {
                    let Some(Stored::Record(mut previous)) = redis.get_record(old).await? else {
                        anyhow::bail!("--replaces: no key record {old:?} in redis");
                    };
                    previous.grace_until = Some(until);
                    redis.put(&previous).await?;
                }
            } else {
                let path = keys_file(&config)?;
                let index = KeyIndex::load(&path)?;
                if index.lookup(&record.id).is_some() {
                    anyhow::bail!("a key with id {:?} exists in {}", record.id, path.display());
                }
                let mut text = std::fs::read_to_string(&path)?;
                text.push_str(&record_toml(&record));
                // Validate before writing: a bad file must never replace a good one.
                KeyIndex::parse(&text, &path.display().to_string())?;
                std::fs::write(&path, text)?;
            }
            eprintln!(
                "key {:?} created; it is shown once and stored only as a hash:",
                record.id
            );
            println!("{key}");
        }
        KeysCommand::Revoke { id } => {
            let revoked = if let Some(redis) = redis_keys(&config).await? {
                let in_file = file_index(&config)?.is_some_and(|i| i.lookup(&id).is_some());
                if redis.revoke(&id).await? {
                    true
                } else if in_file {
                    // The record is in the keys file: store the revocation in
                    // Redis, where every replica sees it and it wins over the
                    // file. The file is left as it is.
                    redis.put_revocation(&id).await?;
                    eprintln!(
                        "key {id:?} is in the keys file; its revocation is stored in redis and wins over the file"
                    );
                    true
                } else {
                    false
                }
            } else {
                let path = keys_file(&config)?;
                let text = std::fs::read_to_string(&path)?;
                let mut doc: toml_edit::DocumentMut = text.parse()?;
                let mut found = false;
                if let Some(keys) = doc.get_mut("keys").and_then(|k| k.as_array_of_tables_mut()) {
                    for table in keys.iter_mut() {
                        if table.get("id").and_then(|v| v.as_str()) == Some(id.as_str()) {
                            table["disabled"] = toml_edit::value(true);
                            found = true;
                        }
                    }
                }
                if found {
                    std::fs::write(&path, doc.to_string())?;
                }
                found
            };
            if !revoked {
                anyhow::bail!("no key with id {id:?}");
            }
            println!("revoked {id}");
        }
        KeysCommand::List => {
            let file = file_index(&config)?;
            let redis = redis_keys(&config).await?;
            if file.is_none() && redis.is_none() {
                keys_file(&config)?;
            }
            let mut ids: Vec<String> = file
                .as_ref()
                .map(|f| f.records().map(|r| r.id.clone()).collect())
                .unwrap_or_default();
            if let Some(redis) = &redis {
                ids.extend(redis.ids().await?);
            }
            ids.sort();
            ids.dedup();
            let now = now_secs();
            println!("id\ttenant\ttier\tscopes\tstate\tsources");
            for id in ids {
                let mut found: Vec<(&'static str, Stored)> = Vec::new();
                if let Some(r) = file.as_ref().and_then(|f| f.lookup(&id)) {
                    found.push(("keys file", Stored::Record(r)));
                }
                if let Some(redis) = &redis
                    && let Some(stored) = redis.get_record(&id).await?
                {
                    found.push(("redis", stored));
                }
                let sources = found
                    .iter()
                    .map(|(s, _)| s.replace(' ', "-"))
                    .collect::<Vec<_>>()
                    .join("+");
                match effective(&found) {
                    Effective::Unknown => {
                        println!("{id}\t-\t-\t-\trevoked (no record)\t{sources}")
                    }
                    Effective::Invalid(why) => {
                        println!("{id}\t-\t-\t-\tinvalid: {why}\t{sources}")
                    }
                    Effective::Record(r) => {
                        let state = if r.disabled || r.grace_until.is_some_and(|g| now >= g) {
                            "revoked"
                        } else if r.expires_at.is_some_and(|e| now >= e) {
                            "expired"
                        } else {
                            "active"
                        };
                        println!(
                            "{}\t{}\t{}\t{}\t{}\t{}",
                            r.id,
                            r.tenant,
                            r.tier,
                            r.scopes.join(","),
                            state,
                            sources
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn record_toml(r: &KeyRecord) -> String {
    let list = |v: &[String]| {
        v.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let time = |t: u64| {
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_secs(t))
            .to_string()
    };
    let mut out = format!(
        "\n[[keys]]\nid = {:?}\nhash = \"sha256:{}\"\ntenant = {:?}\ntier = {:?}\nscopes = [{}]\n",
        r.id,
        hex::encode(r.hash),
        r.tenant,
        r.tier,
        list(&r.scopes)
    );
    if !r.groups.is_empty() {
        out.push_str(&format!("groups = [{}]\n", list(&r.groups)));
    }
    if !r.models.is_empty() {
        out.push_str(&format!("models = [{}]\n", list(&r.models)));
    }
    if !r.allowed_cidrs.is_empty() {
        let cidrs: Vec<String> = r.allowed_cidrs.iter().map(ToString::to_string).collect();
        out.push_str(&format!("allowed_cidrs = [{}]\n", list(&cidrs)));
    }
    if let Some(t) = r.expires_at {
        out.push_str(&format!("expires_at = {:?}\n", time(t)));
    }
    if let Some(old) = &r.replaces {
        out.push_str(&format!("replaces = {old:?}\n"));
        if let Some(t) = r.grace_until {
            out.push_str(&format!("grace_until = {:?}\n", time(t)));
        }
    }
    out
}
