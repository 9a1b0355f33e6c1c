//! `tollgate audit query` and `tollgate audit suggest-limits`: reading an
//! audit trail back (see [`crate::audit::query`] and
//! [`crate::audit::suggest`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Args, ValueEnum};

use crate::audit::query::{self, Window};
use crate::audit::suggest::{self, Method};
use crate::quota::Unit;

/// Which question `audit query` answers.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Question {
    /// Who was denied and why: denials by caller and reason, most first.
    Denials,
    /// Callers by settled tokens, then allowed requests.
    Spenders,
    /// Policies by the denies they determined.
    DenyPolicies,
}

/// Which records to read.
#[derive(Debug, Args)]
pub struct Selection {
    /// Only records at or after this time: RFC 3339, or a duration before now (`1h`, `7d`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only records before this time (same forms as --since).
    #[arg(long)]
    pub until: Option<String>,
    /// Audit files, rotated ones oldest first (PATH.1 PATH.2 ... PATH).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

/// `audit query` arguments.
#[derive(Debug, Args)]
pub struct QueryArgs {
    pub question: Question,
    #[command(flatten)]
    pub selection: Selection,
    /// Rows printed at most.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

/// `audit suggest-limits` arguments.
#[derive(Debug, Args)]
pub struct SuggestArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// Window of the suggested limits: second, minute, hour, day.
    #[arg(long, default_value = "minute", value_parser = parse_unit)]
    pub unit: Unit,
    /// Percentile of allowed traffic the limits sit at (0 < p ≤ 100).
    #[arg(long, default_value_t = 99.0)]
    pub percentile: f64,
    /// Multiplier applied before rounding up (≥ 1).
    #[arg(long, default_value_t = 1.0)]
    pub headroom: f64,
    /// `domain` of the printed limits file.
    #[arg(long, default_value = "tollgate")]
    pub domain: String,
}

fn parse_unit(text: &str) -> Result<Unit, String> {
    Unit::ALL
        .into_iter()
        .find(|u| u.name() == text)
        .ok_or_else(|| format!("{text:?}: one of second, minute, hour, day, week, month, year"))
}

fn rows(selection: &Selection) -> anyhow::Result<Vec<query::Row>> {
    let now = SystemTime::now();
    let bound = |t: &Option<String>| t.as_deref().map(|t| query::parse_time(t, now)).transpose();
    let window = Window {
        since: bound(&selection.since)?,
        until: bound(&selection.until)?,
    };
    let (rows, skipped) = query::read(&selection.files, window)?;
    if skipped > 0 {
        eprintln!("note: {skipped} lines are not audit records and were skipped");
    }
    Ok(rows)
}

/// Answers one question, as tab-separated columns with a header line.
pub fn run_query(args: &QueryArgs) -> anyhow::Result<ExitCode> {
    let rows = rows(&args.selection)?;
    let limit = args.limit;
    match args.question {
        Question::Denials => {
            println!("denies\tprincipal\ttenant\treason\tpolicies\tlast_time\tlast_request");
            for d in query::denials(&rows).into_iter().take(limit) {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                    d.count,
                    d.principal,
                    d.tenant,
                    d.reason,
                    or_dash(&d.policies.join(",")),
                    d.last_time,
                    d.last_request
                );
            }
        }
        Question::Spenders => {
            println!("tokens\tinput_tokens\toutput_tokens\trequests\tprincipal\ttenant");
            for s in query::spenders(&rows).into_iter().take(limit) {
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    s.input_tokens + s.output_tokens,
                    s.input_tokens,
                    s.output_tokens,
                    s.requests,
                    s.principal,
                    s.tenant
                );
            }
        }
        Question::DenyPolicies => {
            println!("denies\tprincipals\tpolicy");
            for p in query::deny_policies(&rows).into_iter().take(limit) {
                println!("{}\t{}\t{}", p.denies, p.principals, p.policy);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn or_dash(text: &str) -> &str {
    if text.is_empty() { "-" } else { text }
}

/// Prints suggested limits in the quota-rule and limits-file formats.
pub fn run_suggest(args: &SuggestArgs) -> anyhow::Result<ExitCode> {
    if !(args.percentile > 0.0 && args.percentile <= 100.0) {
        anyhow::bail!("--percentile must be above 0 and at most 100");
    }
    if !(args.headroom >= 1.0 && args.headroom.is_finite()) {
        anyhow::bail!("--headroom must be at least 1");
    }
    let rows = rows(&args.selection)?;
    let method = Method {
        unit: args.unit,
        percentile: args.percentile,
        headroom: args.headroom,
    };
    let suggestion = suggest::suggest(&rows, method);
    if suggestion.tier_requests.is_empty() && suggestion.tenant_requests.is_empty() {
        eprintln!("no allowed requests with a caller in the selected records; nothing to suggest");
        return Ok(ExitCode::FAILURE);
    }
    println!(
        "# Suggested from {} records: p{} of allowed traffic per {}, headroom {}.",
        rows.len(),
        args.percentile,
        args.unit.name(),
        args.headroom
    );
    println!("# Quota rules (tollgate.toml):\n");
    print!("{}", suggest::render_rules(&suggestion, method));
    print!("{}", suggest::render_tenant_tokens(&suggestion, method));
    println!("\n# Limits file (quota.limits_file):\n");
    print!(
        "{}",
        suggest::render_limits(&suggestion, method, &args.domain)
    );
    Ok(ExitCode::SUCCESS)
}
