//! The `tollgate` command line: serve, validate, check, test, keys.

use std::path::PathBuf;
use std::process::ExitCode;

use cedar_policy::Authorizer;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::engine::{self, CedarQuery, context, parse_uid};
use crate::identity::keys::{KeyIndex, KeyRecord, RedisKeys, key_hash, now_secs, sha256};
use crate::identity::{Principal, PrincipalKind};
use crate::policy::{PolicyStore, testing};
use crate::quota::limits::LimitSet;
use crate::quota::{Charge, QuotaEngine, rls};

/// Tollgate: may this caller do this, and can they afford it?
#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about)]
pub struct Cli {
    /// TOML config file; without one, embedded defaults (./policies, in-memory state).
    #[arg(long, short, global = true, env = "TOLLGATE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve ext_authz, tollgate.v1, health and reflection over gRPC, plus the admin HTTP listener.
    Serve,
    /// Validate the config, the policy directory (DIR overrides policy.dir) and the keys file.
    Validate { dir: Option<PathBuf> },
    /// Decide one request offline and explain it.
    Check {
        /// Principal UID, e.g. 'ApiKey::"demo-free"'.
        #[arg(long)]
        principal: String,
        /// Action UID, e.g. 'Action::"chat"'.
        #[arg(long)]
        action: String,
        /// Resource UID, e.g. 'Model::"llama-3-8b"'.
        #[arg(long)]
        resource: String,
        /// JSON merged over the base request context.
        #[arg(long)]
        context: Option<String>,
        /// JSON array of extra entities.
        #[arg(long)]
        entities: Option<String>,
        /// Policy directory (default: policy.dir from the config).
        #[arg(long)]
        policies: Option<PathBuf>,
    },
    /// Run the policy tests in DIR/tests (DIR defaults to policy.dir).
    Test { dir: Option<PathBuf> },
    /// API key helpers.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Inspect or reset a quota counter in the configured (shared) store.
    Quota {
        #[command(subcommand)]
        command: QuotaCommand,
    },
}

/// `tollgate quota …`.
#[derive(Debug, Subcommand)]
pub enum QuotaCommand {
    /// Show a counter: used, limit, remaining, reset.
    Get(CounterArgs),
    /// Forget a counter (every window).
    Reset(CounterArgs),
}

/// Which counter: a rate limit descriptor (`--domain` and `--entry`s) or an
/// ext_authz quota rule (`--rule` and the principal's facts).
#[derive(Debug, clap::Args)]
pub struct CounterArgs {
    /// Rate limit domain, e.g. llm.
    #[arg(long, conflicts_with = "rule")]
    pub domain: Option<String>,
    /// Descriptor entry KEY=VALUE, in order; repeat for nested descriptors.
    #[arg(long = "entry", value_parser = parse_entry)]
    pub entries: Vec<(String, String)>,
    /// Quota rule name (`[[quota.rules]]`).
    #[arg(long)]
    pub rule: Option<String>,
    /// Principal UID for `per = ["key"]`, e.g. 'ApiKey::"demo-free"'.
    #[arg(long)]
    pub principal: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub tier: Option<String>,
    /// Model id for `per = ["model"]`.
    #[arg(long, default_value = "")]
    pub model: String,
}

fn parse_entry(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

/// `tollgate keys …`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Print the hash of KEY in the form the keys file stores.
    Hash { key: String },
    /// Issue a key: prints it once and stores only its hash (in Redis when
    /// identity.api_keys_redis_url is set, else in the keys file).
    Create(CreateKey),
    /// Revoke a key by id.
    Revoke { id: String },
    /// List key records (never keys).
    List,
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

/// Initializes logging for `config`.
pub fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            init_tracing(&config);
            crate::server::serve(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { dir } => Ok(validate(config, dir)),
        Command::Check {
            principal,
            action,
            resource,
            context,
            entities,
            policies,
        } => check(
            config,
            policies,
            [principal, action, resource],
            context,
            entities,
        ),
        Command::Test { dir } => Ok(test(config, dir)),
        Command::Keys { command } => keys(config, command).await,
        Command::Quota { command } => quota(config, command).await,
    }
}

fn load_store(config: &Config, dir: Option<PathBuf>) -> Result<PolicyStore, String> {
    let routes = config.route_table().map_err(|e| e.to_string())?;
    let dir = dir.unwrap_or_else(|| config.resolve(&config.policy.dir));
    PolicyStore::load(&dir, engine::expectations(config, &routes)).map_err(|e| e.to_string())
}

fn validate(config: Config, dir: Option<PathBuf>) -> ExitCode {
    let mut ok = true;
    match load_store(&config, dir) {
        Ok(store) => {
            let s = store.snapshot();
            println!(
                "policies ok: {} policies, version {}",
                s.policy_count(),
                s.version
            );
        }
        Err(e) => {
            eprintln!("{e}");
            ok = false;
        }
    }
    if let Some(file) = &config.quota.limits_file {
        match LimitSet::load(&config.resolve(file)) {
            Ok(set) => println!("limits ok: version {}", set.version),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if let Some(file) = &config.identity.api_keys_file {
        match KeyIndex::load(&config.resolve(file)) {
            Ok(index) => println!("api keys ok: {} keys", index.len()),
            Err(e) => {
                eprintln!("{e}");
                ok = false;
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn check(
    config: Config,
    dir: Option<PathBuf>,
    [principal, action, resource]: [String; 3],
    ctx: Option<String>,
    entities: Option<String>,
) -> anyhow::Result<ExitCode> {
    let store = load_store(&config, dir).map_err(anyhow::Error::msg)?;
    let mut context_json = context::base();
    if let Some(text) = ctx {
        let overlay: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("--context is not JSON: {e}"))?;
        context::merge(&mut context_json, &overlay);
    }
    let entities = entities
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--entities is not JSON: {e}"))?;
    let query = CedarQuery {
        principal: parse_uid(&principal).map_err(|e| anyhow::anyhow!("--principal: {e}"))?,
        action: parse_uid(&action).map_err(|e| anyhow::anyhow!("--action: {e}"))?,
        resource: parse_uid(&resource).map_err(|e| anyhow::anyhow!("--resource: {e}"))?,
        context: Some(context_json),
        entities,
    };
    let snapshot = store.snapshot();
    let verdict = engine::decide_query(
        &Authorizer::new(),
        &snapshot,
        &query,
        config.policy.on_evaluation_error,
    )?;
    println!("decision: {}", if verdict.allow { "allow" } else { "deny" });
    println!("determining policies: {}", list(&verdict.policies));
    for e in &verdict.errors {
        println!("error in {}: {}", e.policy_id, e.message);
    }
    println!("policy version: {}", snapshot.version);
    Ok(if verdict.allow {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".into()
    } else {
        items.join(", ")
    }
}

fn test(config: Config, dir: Option<PathBuf>) -> ExitCode {
    let dir = dir.unwrap_or_else(|| config.resolve(&config.policy.dir));
    let store = match load_store(&config, Some(dir.clone())) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    match testing::run(&dir, &store.snapshot(), config.policy.on_evaluation_error) {
        Ok(report) => {
            print!("{}", report.render());
            if report.failed() == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
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

async fn keys(config: Config, command: KeysCommand) -> anyhow::Result<ExitCode> {
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
            let record = KeyRecord {
                id: c.id.clone(),
                hash: sha256(&key),
                tenant: c.tenant,
                tier: c.tier,
                scopes: c.scopes,
                groups: c.groups,
                models: c.models,
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
            if let Some(redis) = redis_keys(&config).await? {
                if redis.get_record(&record.id).await?.is_some() {
                    anyhow::bail!("a key with id {:?} exists", record.id);
                }
                redis.put(&record).await?;
                if let (Some(old), Some(until)) = (&c.replaces, grace_until) {
                    let mut previous = redis
                        .get_record(old)
                        .await?
                        .ok_or_else(|| anyhow::anyhow!("--replaces: no key {old:?}"))?;
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
                redis.revoke(&id).await?
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
            let mut records: Vec<KeyRecord> = match redis_keys(&config).await? {
                Some(redis) => redis.list().await?,
                None => KeyIndex::load(&keys_file(&config)?)?
                    .records()
                    .cloned()
                    .collect(),
            };
            records.sort_by(|a, b| a.id.cmp(&b.id));
            let now = now_secs();
            for r in records {
                let state = if r.disabled || r.grace_until.is_some_and(|g| now >= g) {
                    "revoked"
                } else if r.expires_at.is_some_and(|e| now >= e) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    r.id,
                    r.tenant,
                    r.tier,
                    r.scopes.join(","),
                    state
                );
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

async fn quota(config: Config, command: QuotaCommand) -> anyhow::Result<ExitCode> {
    let (args, reset) = match command {
        QuotaCommand::Get(a) => (a, false),
        QuotaCommand::Reset(a) => (a, true),
    };
    if config.quota.store == crate::config::StoreKind::Memory {
        anyhow::bail!(
            "quota get/reset need a shared store (quota.store = \"redis\" or \"redis_cluster\"); \
             the memory store lives inside the serving process"
        );
    }
    let charge = counter_charge(&config, &args)?;
    let store = crate::server::build_store(&config)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !store.connected() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("cannot reach the quota store ({})", store.kind());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let engine = QuotaEngine::new(store, std::time::Duration::from_secs(5), 1);
    if reset {
        engine.reset(&charge.key).await?;
        println!("reset");
        return Ok(ExitCode::SUCCESS);
    }
    let result = engine.store().charge(std::slice::from_ref(&charge)).await?;
    let usage = result
        .usage
        .first()
        .ok_or_else(|| anyhow::anyhow!("no answer"))?;
    println!("used: {}", usage.used);
    println!("limit: {} per {:?}", charge.limit, charge.unit);
    println!("remaining: {}", usage.remaining(charge.limit));
    println!("reset in: {} s", usage.reset.as_secs());
    Ok(ExitCode::SUCCESS)
}

/// The check-only charge naming the counter the arguments describe.
fn counter_charge(config: &Config, args: &CounterArgs) -> anyhow::Result<Charge> {
    if let Some(domain) = &args.domain {
        let limits = match &config.quota.limits_file {
            Some(f) => LimitSet::load(&config.resolve(f))?,
            None => LimitSet::default(),
        };
        let limit = limits
            .lookup(domain, &args.entries)
            .filter(|l| !l.unlimited)
            .ok_or_else(|| {
                anyhow::anyhow!("no limit applies to that descriptor in domain {domain:?}")
            })?;
        return Ok(Charge {
            key: rls::counter_key(domain, &args.entries),
            limit: limit.requests_per_unit,
            unit: limit.unit,
            algorithm: limit.algorithm,
            cost: 0,
            shadow: false,
        });
    }
    let name = args
        .rule
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("give --domain (with --entry) or --rule"))?;
    let rule = config
        .quota
        .rules
        .iter()
        .find(|r| &r.name == name)
        .ok_or_else(|| anyhow::anyhow!("no quota rule named {name:?} in the config"))?;
    let (kind, id) = match &args.principal {
        Some(uid) => parse_uid(uid).map_err(anyhow::Error::msg)?,
        None => ("Anonymous".to_string(), "anonymous".to_string()),
    };
    let kind = match kind.as_str() {
        "ApiKey" => PrincipalKind::ApiKey,
        "Service" => PrincipalKind::Service,
        _ => PrincipalKind::Anonymous,
    };
    let principal = Principal {
        kind,
        id,
        tenant: args.tenant.clone(),
        tier: args.tier.clone(),
        scopes: Vec::new(),
        groups: Vec::new(),
        models: Vec::new(),
    };
    let mut plan = rule
        .plan(
            &principal,
            rule.actions.first().map_or("", String::as_str),
            &args.model,
        )
        .ok_or_else(|| {
            anyhow::anyhow!(
                "rule {name:?} does not apply to that principal (tier not in its profile?)"
            )
        })?;
    plan.charge.cost = 0;
    Ok(plan.charge)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
