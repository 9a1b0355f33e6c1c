//! The `tollgate` command line: serve, validate, check, test, keys, quota,
//! usage.

mod audit;
mod keys;
mod lint;
mod policy;
mod quota;
mod usage;

pub use keys::{CreateKey, KeysCommand};
pub use lint::LintCommand;
pub use policy::PolicyCommand;
pub use quota::{CounterArgs, QuotaCommand};
pub use usage::{BudgetArgs, UsageCommand};

use std::path::PathBuf;
use std::process::ExitCode;

use cedar_policy::Authorizer;
use clap::{Parser, Subcommand};

use crate::config::{Config, LogFormat};
use crate::engine::{self, CedarQuery, context, parse_uid};
use crate::identity::keys::KeyIndex;
use crate::policy::{PolicyStore, testing};
use crate::quota::limits::LimitSet;

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
    /// Validate the policy directory (DIR overrides policy.dir) and write
    /// DIR/manifest.json: the files, their SHA-256 and policy counts a
    /// reload must then match. Run it after every policy change.
    Manifest { dir: Option<PathBuf> },
    /// Check a gateway configuration for settings Tollgate depends on.
    Lint {
        #[command(subcommand)]
        command: LintCommand,
    },
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
    /// Safe policy rollout: promote the shadow set, roll back.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Show or reset a caller's token and dollar budgets (used, remaining,
    /// per rule and window) and show its requests in flight per concurrency
    /// rule, in the configured (shared) store.
    Usage {
        #[command(subcommand)]
        command: UsageCommand,
    },
    /// Audit trail tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// MCP helpers.
    Mcp {
        #[command(subcommand)]
        command: McpCommand,
    },
}

/// `tollgate mcp ...`.
#[derive(Debug, Subcommand)]
pub enum McpCommand {
    /// Print the Cedar schema fragment for a saved `tools/list` result
    /// (one action per tool, typed `context.input`); add it to the policy
    /// directory's schema, then `tollgate validate` type-checks policies on
    /// tool arguments.
    Schema {
        /// The saved tools/list answer (JSON-RPC response, its result, or the tools array).
        tools_list: PathBuf,
        /// Cedar namespace of the server's actions.
        #[arg(long, default_value = "Mcp")]
        namespace: String,
        /// Principal entity types that may call the tools.
        #[arg(long, value_delimiter = ',', default_value = "ApiKey,User,Service")]
        principals: Vec<String>,
    },
}

/// `tollgate audit ...`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files (rotated files oldest first:
    /// PATH.1 PATH.2 ... PATH) and name the first bad line.
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Ed25519 public key (SPKI PEM) of `audit.signing_key`: every
        /// seal must be signed by it and every file but the last sealed.
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Answer a common question from audit files: denials (who was denied
    /// and why), spenders (top spenders), deny-policies (which policies
    /// decided most denies).
    Query(audit::QueryArgs),
    /// Suggest per-tier and per-tenant limits at a percentile of the
    /// allowed traffic in audit files, as quota rules and a limits file.
    SuggestLimits(audit::SuggestArgs),
}

/// Initializes logging for `config`, and span export when `[tracing]`
/// names an OTLP endpoint; keep the returned exporter until shutdown (its
/// drop flushes queued spans).
pub fn init_tracing(config: &Config) -> anyhow::Result<Option<crate::telemetry::Exporter>> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Decision spans are for the exporter only: the log never subscribes to
    // them, so without an exporter nothing does and they cost nothing.
    let filter = match format!("{}=off", crate::telemetry::TARGET).parse() {
        Ok(directive) => filter.add_directive(directive),
        Err(_) => filter,
    };
    // Colour codes only for a person at a terminal: a log file or collector
    // gets plain text, and the decision log line skips escape-code formatting.
    let log = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let log = match config.log.format {
        LogFormat::Json => log.json().flatten_event(true).with_filter(filter).boxed(),
        LogFormat::Text => log.with_filter(filter).boxed(),
    };
    let exporter = crate::telemetry::Exporter::start(&config.tracing)?;
    let spans = exporter.as_ref().map(|e| {
        e.layer().with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target(crate::telemetry::TARGET, tracing::Level::TRACE),
        )
    });
    let _ = tracing_subscriber::registry()
        .with(log)
        .with(spans)
        .try_init();
    Ok(exporter)
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            let exporter = init_tracing(&config)?;
            let served = crate::server::serve(config, shutdown_signal()).await;
            // Flushing blocks on the export; keep it off the runtime's threads.
            let _ = tokio::task::spawn_blocking(move || drop(exporter)).await;
            served?;
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
        Command::Manifest { dir } => Ok(manifest(config, dir)),
        Command::Lint { command } => Ok(lint::run(command)),
        Command::Keys { command } => {
            let changed = command.changed_key();
            let code = keys::run(config.clone(), command).await?;
            if let Some(id) = changed {
                // Every serving replica drops its cached record now, rather
                // than when the cache TTL runs out.
                announce(&config, &crate::invalidate::Invalidation::Key(id)).await;
            }
            Ok(code)
        }
        Command::Quota { command } => quota::run(config, command).await,
        Command::Policy { command } => Ok(policy::run(&config, &command)),
        Command::Usage { command } => usage::run(config, command).await,
        Command::Mcp {
            command:
                McpCommand::Schema {
                    tools_list,
                    namespace,
                    principals,
                },
        } => {
            let text = std::fs::read_to_string(&tools_list)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", tools_list.display()))?;
            let list: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", tools_list.display()))?;
            let options = crate::mcp::schema::SchemaOptions {
                namespace,
                principals,
            };
            let fragment = crate::mcp::schema::generate(&list, &options)
                .map_err(|e| anyhow::anyhow!("{}: {e}", tools_list.display()))?;
            print!("{fragment}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { files, public_key },
        } => {
            let key = public_key
                .as_deref()
                .map(crate::audit::seal::load_public_key)
                .transpose()?;
            let report = crate::audit::verify_with(&files, key.as_ref())?;
            println!(
                "ok: {} records in {} files, seq {}..; chain head {}; {} seals ({} signatures checked); {} records after the last seal",
                report.records,
                report.files,
                report.first_seq.unwrap_or(0),
                report.head.as_deref().unwrap_or("-"),
                report.seals,
                report.signed,
                report.unsealed,
            );
            if let Some(seq) = report.first_seq.filter(|&s| s > 0) {
                eprintln!(
                    "warning: the chain starts at seq {seq}, not at genesis: the files before it were not given (archived or removed)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Query(args),
        } => audit::run_query(&args),
        Command::Audit {
            command: AuditCommand::SuggestLimits(args),
        } => audit::run_suggest(&args),
    }
}

/// An error and its causes on one line, each cause once: library errors
/// often quote their source in their own message already, and printing the
/// chain as well would say the same thing twice.
pub fn error_message(error: &anyhow::Error) -> String {
    let mut message = error.to_string();
    for cause in error.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

/// Publishes a change on the invalidation channel; a failure is reported but
/// does not fail the command (the caches' own bounds still apply).
pub(crate) async fn announce(config: &Config, what: &crate::invalidate::Invalidation) {
    match crate::invalidate::publish(config, what).await {
        Ok(true) => {}
        Ok(false) => eprintln!(
            "note: no shared Redis configured; running replicas see the change when their caches expire"
        ),
        Err(e) => eprintln!(
            "warning: could not notify running replicas ({e}); they see the change when their caches expire"
        ),
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
            if store
                .dir()
                .join(crate::policy::manifest::MANIFEST_FILE)
                .exists()
            {
                println!("manifest ok: the directory matches manifest.json");
            }
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

fn manifest(config: Config, dir: Option<PathBuf>) -> ExitCode {
    use crate::policy::manifest::MANIFEST_FILE;
    let dir = dir.unwrap_or_else(|| config.resolve(&config.policy.dir));
    let path = dir.join(MANIFEST_FILE);
    // The manifest describes the files as they are, so an old one must not
    // stand in the way of loading them.
    let previous = std::fs::read(&path).ok();
    if previous.is_some()
        && let Err(e) = std::fs::remove_file(&path)
    {
        eprintln!("cannot replace {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let restore = |previous: Option<Vec<u8>>| {
        if let Some(bytes) = previous {
            let _ = std::fs::write(&path, bytes);
        }
    };
    let store = match load_store(&config, Some(dir.clone())) {
        Ok(s) => s,
        Err(e) => {
            restore(previous);
            eprintln!("{e}");
            eprintln!("manifest not written: fix the policies first");
            return ExitCode::FAILURE;
        }
    };
    let snapshot = store.snapshot();
    let written = snapshot
        .manifest(&dir)
        .map_err(|e| e.to_string())
        .and_then(|m| serde_json::to_string_pretty(&m).map_err(|e| e.to_string()))
        .and_then(|text| {
            // Write beside it and rename, so a reload never sees half a manifest.
            let tmp = dir.join(format!(".{MANIFEST_FILE}.tmp"));
            std::fs::write(&tmp, text + "\n")
                .and_then(|()| std::fs::rename(&tmp, &path))
                .map_err(|e| format!("cannot write {}: {e}", path.display()))
        });
    match written {
        Ok(()) => {
            println!(
                "manifest written: {} ({} policies, version {})",
                path.display(),
                snapshot.policy_count(),
                snapshot.version
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            restore(previous);
            eprintln!("{e}");
            ExitCode::FAILURE
        }
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
    let mut entities: Option<serde_json::Value> = entities
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| anyhow::anyhow!("--entities is not JSON: {e}"))?;
    let principal = parse_uid(&principal).map_err(|e| anyhow::anyhow!("--principal: {e}"))?;
    let snapshot = store.snapshot();
    if let Some(entity) = key_entity(&config, &snapshot, &principal, entities.as_ref())? {
        match &mut entities {
            Some(serde_json::Value::Array(list)) => list.push(entity),
            Some(_) => anyhow::bail!("--entities must be a JSON array of entities"),
            None => entities = Some(serde_json::Value::Array(vec![entity])),
        }
    }
    let query = CedarQuery {
        principal,
        action: parse_uid(&action).map_err(|e| anyhow::anyhow!("--action: {e}"))?,
        resource: parse_uid(&resource).map_err(|e| anyhow::anyhow!("--resource: {e}"))?,
        context: Some(context_json),
        entities,
    };
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

/// The entity of an `ApiKey` principal from the configured keys file, as
/// `serve` builds it for a request made with that key (tenant, tier,
/// scopes, groups, models): `None` when the principal is not an API key,
/// when the policy entities or `--entities` already define it, or when no
/// keys file is configured. A key id the keys file lacks is an error.
fn key_entity(
    config: &Config,
    snapshot: &crate::policy::Snapshot,
    (kind, id): &(String, String),
    extra: Option<&serde_json::Value>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Some(file) = config
        .identity
        .api_keys_file
        .as_ref()
        .filter(|_| kind == "ApiKey")
    else {
        return Ok(None);
    };
    let uid = crate::engine::principal::entity_uid(kind, id).map_err(anyhow::Error::msg)?;
    let named =
        |e: &serde_json::Value| e["uid"]["type"] == kind.as_str() && e["uid"]["id"] == id.as_str();
    let in_extra = extra
        .and_then(serde_json::Value::as_array)
        .is_some_and(|list| list.iter().any(named));
    if in_extra || snapshot.entities.get(&uid).is_some() {
        return Ok(None);
    }
    let path = config.resolve(file);
    let index = KeyIndex::load(&path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let Some(record) = index.lookup(id) else {
        anyhow::bail!(
            "--principal: no key with id {id:?} in {}; give its entity with --entities",
            path.display()
        );
    };
    let entity =
        crate::engine::principal::entity(&record.principal()).map_err(anyhow::Error::msg)?;
    Ok(Some(
        entity.to_json_value().map_err(|e| anyhow::anyhow!("{e}"))?,
    ))
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
