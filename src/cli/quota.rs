//! `tollgate quota …`: inspect or reset a counter in the shared store.

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::Config;
use crate::engine::parse_uid;
use crate::identity::{Principal, PrincipalKind};
use crate::quota::limits::LimitSet;
use crate::quota::{Charge, QuotaEngine, rls};

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
    #[command(flatten)]
    pub caller: CallerArgs,
}

/// The caller a rule's counter is kept for, as a request would carry it.
#[derive(Debug, clap::Args)]
pub struct CallerArgs {
    /// Principal UID for `per = ["key"]`, e.g. 'ApiKey::"demo-free"'.
    #[arg(long)]
    pub principal: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub tier: Option<String>,
    /// A group (team) of the principal, for `per = ["group"]`; repeatable.
    #[arg(long = "group")]
    pub groups: Vec<String>,
    /// Model id for `per = ["model"]` (and usd prices).
    #[arg(long, default_value = "")]
    pub model: String,
}

fn parse_entry(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=VALUE"))
}

pub async fn run(config: Config, command: QuotaCommand) -> anyhow::Result<ExitCode> {
    let (args, reset) = match command {
        QuotaCommand::Get(a) => (a, false),
        QuotaCommand::Reset(a) => (a, true),
    };
    let charge = counter_charge(&config, &args)?;
    let engine = connect(&config).await?;
    if reset {
        engine.reset(&charge.key).await?;
        // Running replicas drop over-limit answers cached before the reset.
        super::announce(&config, &crate::invalidate::Invalidation::QuotaReset).await;
        println!("reset");
        return Ok(ExitCode::SUCCESS);
    }
    let result = engine.store().charge(std::slice::from_ref(&charge)).await?;
    let usage = result
        .usage
        .first()
        .copied()
        .flatten()
        .ok_or_else(|| anyhow::anyhow!("no answer"))?;
    // `writeln!` rather than `println!`: a closed pipe (`| head -1`) ends the
    // output quietly instead of panicking.
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "used: {}", usage.used)
        .and_then(|()| writeln!(out, "limit: {} per {}", charge.limit, charge.unit.name()))
        .and_then(|()| writeln!(out, "remaining: {}", usage.remaining(charge.limit)))
        .and_then(|()| writeln!(out, "reset in: {} s", usage.reset.as_secs()));
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
            mode: crate::quota::ChargeMode::Admission,
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
    let principal = principal_of(&args.caller)?;
    let mut plan = rule_counters(config, rule, &principal, &args.caller.model)?
        .pop()
        .ok_or_else(|| {
            anyhow::anyhow!(
                "rule {name:?} does not apply to that principal (tier not in its profile?)"
            )
        })?;
    plan.charge.cost = 0;
    Ok(plan.charge)
}

/// The principal the CLI's `--principal`, `--tenant`, `--tier` and `--group`
/// describe.
pub(super) fn principal_of(caller: &CallerArgs) -> anyhow::Result<Principal> {
    let (kind, id) = match caller.principal.as_deref() {
        Some(uid) => parse_uid(uid).map_err(anyhow::Error::msg)?,
        None => ("Anonymous".to_string(), "anonymous".to_string()),
    };
    let kind = match kind.as_str() {
        "ApiKey" => PrincipalKind::ApiKey,
        "Service" => PrincipalKind::Service,
        _ => PrincipalKind::Anonymous,
    };
    Ok(Principal {
        kind,
        id,
        tenant: caller.tenant.clone(),
        tier: caller.tier.clone(),
        scopes: Vec::new(),
        groups: caller.groups.clone(),
        models: Vec::new(),
    })
}

/// The counters `rule` keeps for `principal` and `model` (one per group for
/// `per = ["group"]`), as check-only charges; empty when it does not apply.
pub(super) fn rule_counters(
    config: &Config,
    rule: &crate::quota::rules::QuotaRule,
    principal: &Principal,
    model: &str,
) -> anyhow::Result<Vec<crate::quota::rules::Planned>> {
    // The counter only: any estimate will do, since nothing is charged.
    let estimate = crate::usage::Estimate {
        model: Some(model.to_string()),
        input_tokens: Some(0),
        max_output_tokens: Some(0),
    };
    let mut prices = config.prices();
    prices
        .models
        .entry(model.to_string())
        .or_insert(crate::usage::Price {
            input: 0.0,
            output: 0.0,
            cached_input: None,
            above_input_tokens: None,
            input_above: None,
            output_above: None,
        });
    let mut plans = rule
        .plan(&crate::quota::rules::PlanInput {
            principal,
            action: rule.actions.first().map_or("", String::as_str),
            resource_id: model,
            estimate: &estimate,
            prices: &prices,
            caller_context: None,
        })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for p in &mut plans {
        p.charge.cost = 0;
    }
    Ok(plans)
}

/// The configured store, once connected (the CLI's counters live there).
pub(super) async fn connect(config: &Config) -> anyhow::Result<QuotaEngine> {
    if config.quota.store == crate::config::StoreKind::Memory {
        anyhow::bail!(
            "quota and usage get/reset need a shared store (quota.store = \"redis\" or \"redis_cluster\"); \
             the memory store lives inside the serving process"
        );
    }
    let store = crate::server::build_store(config, Default::default())?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !store.connected() {
        if std::time::Instant::now() > deadline {
            anyhow::bail!("cannot reach the quota store ({})", store.kind());
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(QuotaEngine::new(
        store,
        std::time::Duration::from_secs(5),
        1,
    ))
}
