//! Reading an audit trail back for the common questions (`tollgate audit
//! query`): who was denied and why, top spenders, which policies decided
//! most denies. Records are read leniently — only the fields a question
//! needs, and a line that is not a record is counted and skipped — so the
//! tools also read trails written by older versions of the schema.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::SystemTime;

use serde::Deserialize;

/// The part of a record the questions read.
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    pub time: String,
    #[serde(default)]
    pub request_id: String,
    #[serde(default)]
    pub api: String,
    pub caller: Option<RowCaller>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub model: Option<String>,
    #[serde(default)]
    pub decision: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub policies: Vec<String>,
    pub usage: Option<RowUsage>,
    /// Parsed `time`; set by [`read`].
    #[serde(skip)]
    pub at: Option<SystemTime>,
}

/// `caller` of a record.
#[derive(Debug, Clone, Deserialize)]
pub struct RowCaller {
    pub principal: String,
    pub tenant: Option<String>,
    pub tier: Option<String>,
}

/// `usage` of a settlement record.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct RowUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
}

/// A time window, both ends optional (`since` inclusive, `until` exclusive).
#[derive(Debug, Clone, Copy, Default)]
pub struct Window {
    pub since: Option<SystemTime>,
    pub until: Option<SystemTime>,
}

impl Window {
    fn contains(&self, at: SystemTime) -> bool {
        self.since.is_none_or(|s| at >= s) && self.until.is_none_or(|u| at < u)
    }
}

/// Why a trail cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0:?} is neither an RFC 3339 time (2026-11-30T20:00:00Z) nor a duration before now (1h, 7d)"
    )]
    Time(String),
}

/// Reads a time bound: RFC 3339, or a duration meaning that long before `now`.
pub fn parse_time(text: &str, now: SystemTime) -> Result<SystemTime, QueryError> {
    humantime::parse_rfc3339_weak(text)
        .ok()
        .or_else(|| {
            let ago = humantime::parse_duration(text).ok()?;
            now.checked_sub(ago)
        })
        .ok_or_else(|| QueryError::Time(text.to_string()))
}

/// The records of `files` inside `window`, in file order, and how many lines
/// were not records.
pub fn read(files: &[PathBuf], window: Window) -> Result<(Vec<Row>, usize), QueryError> {
    let mut rows = Vec::new();
    let mut skipped = 0;
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|source| QueryError::Read {
            path: path.clone(),
            source,
        })?;
        // Seals close files; they are not records.
        for line in text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with(super::seal::SEAL_PREFIX))
        {
            let Ok(mut row) = serde_json::from_str::<Row>(line) else {
                skipped += 1;
                continue;
            };
            let Ok(at) = humantime::parse_rfc3339_weak(&row.time) else {
                skipped += 1;
                continue;
            };
            if window.contains(at) {
                row.at = Some(at);
                rows.push(row);
            }
        }
    }
    Ok((rows, skipped))
}

fn principal(row: &Row) -> &str {
    row.caller.as_ref().map_or("-", |c| c.principal.as_str())
}

fn tenant(row: &Row) -> &str {
    row.caller
        .as_ref()
        .and_then(|c| c.tenant.as_deref())
        .unwrap_or("-")
}

/// Denials of one caller for one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The caller's principal UID, `-` when authentication failed.
    pub principal: String,
    pub tenant: String,
    pub reason: String,
    pub count: u64,
    /// The determining policies seen, sorted.
    pub policies: Vec<String>,
    /// The latest denied request's time, method and path.
    pub last_time: String,
    pub last_request: String,
}

/// Who was denied and why: denials grouped by caller and reason, most first.
pub fn denials(rows: &[Row]) -> Vec<Denial> {
    let mut groups: HashMap<(String, String, String), Denial> = HashMap::new();
    for row in rows.iter().filter(|r| r.decision == "deny") {
        let key = (
            principal(row).to_string(),
            tenant(row).to_string(),
            row.reason.clone(),
        );
        let entry = groups.entry(key.clone()).or_insert_with(|| Denial {
            principal: key.0,
            tenant: key.1,
            reason: key.2,
            count: 0,
            policies: Vec::new(),
            last_time: String::new(),
            last_request: String::new(),
        });
        entry.count += 1;
        entry.policies.extend(row.policies.iter().cloned());
        if row.time >= entry.last_time {
            entry.last_time = row.time.clone();
            entry.last_request = format!(
                "{} {}",
                row.method.as_deref().unwrap_or(&row.api),
                row.path.as_deref().unwrap_or("-")
            );
        }
    }
    let mut out: Vec<Denial> = groups
        .into_values()
        .map(|mut d| {
            d.policies.sort();
            d.policies.dedup();
            d
        })
        .collect();
    out.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| (&a.principal, &a.reason).cmp(&(&b.principal, &b.reason)))
    });
    out
}

/// What one caller spent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spender {
    pub principal: String,
    pub tenant: String,
    /// Allowed requests.
    pub requests: u64,
    /// Settled tokens (usage records joined to their request by request id).
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Top spenders: callers by settled tokens, then allowed requests.
pub fn spenders(rows: &[Row]) -> Vec<Spender> {
    let mut by_request: HashMap<&str, (&str, &str)> = HashMap::new();
    let mut totals: BTreeMap<(String, String), Spender> = BTreeMap::new();
    for row in rows
        .iter()
        .filter(|r| r.decision == "allow" && r.caller.is_some())
    {
        let (p, t) = (principal(row), tenant(row));
        by_request.insert(row.request_id.as_str(), (p, t));
        totals
            .entry((p.to_string(), t.to_string()))
            .or_insert_with(|| Spender {
                principal: p.to_string(),
                tenant: t.to_string(),
                requests: 0,
                input_tokens: 0,
                output_tokens: 0,
            })
            .requests += 1;
    }
    let mut settled = HashSet::new();
    for row in rows
        .iter()
        .filter(|r| r.api == "usage" && r.reason == "settled")
    {
        let (Some(usage), Some((p, t))) = (row.usage, by_request.get(row.request_id.as_str()))
        else {
            continue;
        };
        // A settlement applies once; a duplicate line must not count twice.
        if !settled.insert(row.request_id.as_str()) {
            continue;
        }
        if let Some(s) = totals.get_mut(&(p.to_string(), t.to_string())) {
            s.input_tokens += usage.input_tokens;
            s.output_tokens += usage.output_tokens;
        }
    }
    let mut out: Vec<Spender> = totals.into_values().collect();
    out.sort_by(|a, b| {
        (b.input_tokens + b.output_tokens, b.requests)
            .cmp(&(a.input_tokens + a.output_tokens, a.requests))
            .then_with(|| a.principal.cmp(&b.principal))
    });
    out
}

/// Denies one policy determined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDenies {
    /// The policy id; `(no permit)` for denials no policy determined
    /// (nothing permitted the request).
    pub policy: String,
    pub denies: u64,
    /// Distinct callers it denied.
    pub principals: u64,
}

/// Which policies decided most denies (policy denials only: `policy_denied`
/// and `policy_error`).
pub fn deny_policies(rows: &[Row]) -> Vec<PolicyDenies> {
    let mut counts: HashMap<String, (u64, HashSet<String>)> = HashMap::new();
    let policy_denials = rows.iter().filter(|r| {
        r.decision == "deny" && matches!(r.reason.as_str(), "policy_denied" | "policy_error")
    });
    for row in policy_denials {
        let ids: Vec<String> = if row.policies.is_empty() {
            vec!["(no permit)".to_string()]
        } else {
            row.policies.clone()
        };
        for id in ids {
            let entry = counts.entry(id).or_default();
            entry.0 += 1;
            entry.1.insert(principal(row).to_string());
        }
    }
    let mut out: Vec<PolicyDenies> = counts
        .into_iter()
        .map(|(policy, (denies, who))| PolicyDenies {
            policy,
            denies,
            principals: who.len() as u64,
        })
        .collect();
    out.sort_by(|a, b| {
        b.denies
            .cmp(&a.denies)
            .then_with(|| a.policy.cmp(&b.policy))
    });
    out
}
