//! `tollgate usage …`: the token and dollar budgets of a caller, per rule,
//! counter and window — used and remaining — and resetting them.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use super::quota::{CallerArgs, connect, principal_of, rule_counters};
use crate::config::Config;
use crate::quota::rules::{Cost, Per};

/// `tollgate usage …`.
#[derive(Debug, Subcommand)]
pub enum UsageCommand {
    /// Show every budget (token or usd rule) that applies: rule, counter,
    /// measure, window, used, limit, remaining, reset; and every concurrency
    /// rule's requests in flight (window `in_flight`).
    Get(BudgetArgs),
    /// Forget those budgets' counters (every window), and tell running
    /// replicas on the invalidation channel.
    Reset(BudgetArgs),
}

/// Whose budgets: the caller's facts, as the request would carry them.
#[derive(Debug, clap::Args)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub caller: CallerArgs,
    /// Only this rule.
    #[arg(long)]
    pub rule: Option<String>,
}

/// A counted amount in the rule's measure: dollars for `usd`.
fn amount(measure: Cost, v: u64) -> String {
    match measure {
        Cost::Usd => format!("${}.{:06}", v / 1_000_000, v % 1_000_000),
        _ => v.to_string(),
    }
}

pub async fn run(config: Config, command: UsageCommand) -> anyhow::Result<ExitCode> {
    let (args, reset) = match command {
        UsageCommand::Get(a) => (a, false),
        UsageCommand::Reset(a) => (a, true),
    };
    let principal = principal_of(&args.caller)?;
    let caller = &args.caller;
    let rules: Vec<_> = config
        .quota
        .rules
        .iter()
        .filter(|r| r.cost.is_usage() || r.cost == Cost::Concurrent)
        .filter(|r| args.rule.as_ref().is_none_or(|n| &r.name == n))
        .collect();
    if rules.is_empty() {
        anyhow::bail!(
            "no budget or concurrency rule (cost = tokens, input_tokens, output_tokens, usd or concurrent){} in the config",
            args.rule
                .as_ref()
                .map(|n| format!(" named {n:?}"))
                .unwrap_or_default()
        );
    }
    // (plan, what the counter is kept per, readable).
    let mut counters = Vec::new();
    for rule in rules {
        let plans = rule_counters(&config, rule, &principal, &caller.model)?;
        for (i, plan) in plans.into_iter().enumerate() {
            let per: Vec<String> = rule
                .per
                .iter()
                .map(|p| match p {
                    Per::Key => format!("key={}", principal.id),
                    Per::Tenant => format!("tenant={}", principal.tenant.as_deref().unwrap_or("-")),
                    Per::Group => {
                        format!("group={}", caller.groups.get(i).map_or("-", String::as_str))
                    }
                    Per::Model => format!("model={}", caller.model),
                    Per::Tier => format!("tier={}", principal.tier.as_deref().unwrap_or("-")),
                    // The counter looked up is the rule's first action's.
                    Per::Action => {
                        format!("action={}", rule.actions.first().map_or("", String::as_str))
                    }
                    // Per originating request: never planned without one.
                    Per::CallerContext => "caller_context=-".to_string(),
                })
                .collect();
            let per = if per.is_empty() {
                "global".to_string()
            } else {
                per.join(",")
            };
            counters.push((plan, per));
        }
    }
    if counters.is_empty() {
        anyhow::bail!(
            "no budget applies to that caller (tier not in a rule's profile, or no group?)"
        );
    }
    let engine = connect(&config).await?;
    let mut out = std::io::stdout().lock();
    if reset {
        // Slots in use are released by their requests' settlements, never
        // reset: a reset would let more requests in than the limit.
        for (c, per) in counters
            .iter()
            .filter(|(c, _)| c.measure != Cost::Concurrent)
        {
            engine.reset(&c.charge.key).await?;
            let _ = writeln!(out, "reset {} {per}", c.label);
        }
        // Running replicas drop over-limit answers cached before the reset.
        super::announce(&config, &crate::invalidate::Invalidation::QuotaReset).await;
        return Ok(ExitCode::SUCCESS);
    }
    let _ = writeln!(
        out,
        "rule\tcounter\tmeasure\twindow\tused\tlimit\tremaining\treset_in_s"
    );
    for (c, per) in &counters {
        if c.measure == Cost::Concurrent {
            // Requests in flight now (expired reservations swept first).
            let n = engine.store().in_flight(&c.charge.key).await?;
            let _ = writeln!(
                out,
                "{}\t{}\tconcurrent\tin_flight\t{}\t{}\t{}\t-",
                c.label,
                per,
                n,
                c.charge.limit,
                c.charge.limit.saturating_sub(n),
            );
            continue;
        }
        let result = engine
            .store()
            .charge(std::slice::from_ref(&c.charge))
            .await?;
        let Some(usage) = result.usage.first().copied().flatten() else {
            anyhow::bail!("the store did not answer for rule {:?}", c.label);
        };
        // `writeln!` rather than `println!`: a closed pipe ends quietly.
        let _ = writeln!(
            out,
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            c.label,
            per,
            c.measure.name(),
            c.charge.unit.name(),
            amount(c.measure, usage.used),
            amount(c.measure, c.charge.limit),
            amount(c.measure, usage.remaining(c.charge.limit)),
            usage.reset.as_secs(),
        );
    }
    Ok(ExitCode::SUCCESS)
}
