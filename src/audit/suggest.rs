//! Limits from evidence (`tollgate audit suggest-limits`): per-tier and
//! per-tenant limits at a chosen percentile of allowed traffic.
//!
//! Allowed requests (`api = http`, `decision = allow`) are counted per
//! caller per window of the chosen unit (aligned to the Unix epoch, as quota
//! windows are), and settled tokens (usage records joined to their request
//! by request id) likewise. For each tier, the suggestion is the chosen
//! percentile (nearest rank) of the per-key window totals; for each tenant,
//! of the per-tenant window totals. Only windows in which the caller was
//! active count: idle windows say nothing about how much a caller needs.
//! The value is multiplied by `headroom` and rounded up.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::time::UNIX_EPOCH;

use super::query::Row;
use crate::quota::Unit;

/// One suggested limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Suggested {
    pub limit: u64,
    /// Windows the percentile was taken over.
    pub samples: usize,
    /// The largest window total seen.
    pub max: u64,
}

/// What the trail suggests, by tier and by tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Suggestion {
    pub tier_requests: BTreeMap<String, Suggested>,
    pub tier_tokens: BTreeMap<String, Suggested>,
    pub tenant_requests: BTreeMap<String, Suggested>,
    pub tenant_tokens: BTreeMap<String, Suggested>,
}

/// How to suggest.
#[derive(Debug, Clone, Copy)]
pub struct Method {
    pub unit: Unit,
    /// 0 < percentile ≤ 100.
    pub percentile: f64,
    /// ≥ 1.0: multiplied in before rounding up.
    pub headroom: f64,
}

/// Window totals: (group, member, window) → amount.
type Totals = HashMap<(String, String, u64), u64>;

/// Computes the suggestion from `rows` (as [`super::query::read`] returns them).
pub fn suggest(rows: &[Row], method: Method) -> Suggestion {
    let unit_ms = u128::from(method.unit.millis());
    let window = |row: &Row| {
        let ms = row.at?.duration_since(UNIX_EPOCH).ok()?.as_millis();
        u64::try_from(ms / unit_ms).ok()
    };
    let mut key_requests = Totals::new();
    let mut tenant_requests = Totals::new();
    let mut key_tokens = Totals::new();
    let mut tenant_tokens = Totals::new();
    let mut allowed: HashMap<&str, (&Row, u64)> = HashMap::new();
    for row in rows
        .iter()
        .filter(|r| r.api == "http" && r.decision == "allow")
    {
        let (Some(caller), Some(w)) = (row.caller.as_ref(), window(row)) else {
            continue;
        };
        let tier = caller.tier.clone().unwrap_or_else(|| "-".into());
        *key_requests
            .entry((tier, caller.principal.clone(), w))
            .or_default() += 1;
        if let Some(tenant) = &caller.tenant {
            *tenant_requests
                .entry((tenant.clone(), String::new(), w))
                .or_default() += 1;
        }
        allowed.insert(row.request_id.as_str(), (row, w));
    }
    let mut settled = std::collections::HashSet::new();
    for row in rows
        .iter()
        .filter(|r| r.api == "usage" && r.reason == "settled")
    {
        let (Some(usage), Some((request, w))) = (row.usage, allowed.get(row.request_id.as_str()))
        else {
            continue;
        };
        if !settled.insert(row.request_id.as_str()) {
            continue;
        }
        let Some(caller) = request.caller.as_ref() else {
            continue;
        };
        // Counted in the window of the request, as a reservation is.
        let tokens = usage.input_tokens + usage.output_tokens;
        let tier = caller.tier.clone().unwrap_or_else(|| "-".into());
        *key_tokens
            .entry((tier, caller.principal.clone(), *w))
            .or_default() += tokens;
        if let Some(tenant) = &caller.tenant {
            *tenant_tokens
                .entry((tenant.clone(), String::new(), *w))
                .or_default() += tokens;
        }
    }
    Suggestion {
        tier_requests: per_group(key_requests, method),
        tier_tokens: per_group(key_tokens, method),
        tenant_requests: per_group(tenant_requests, method),
        tenant_tokens: per_group(tenant_tokens, method),
    }
}

fn per_group(totals: Totals, method: Method) -> BTreeMap<String, Suggested> {
    let mut groups: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for ((group, _, _), amount) in totals {
        groups.entry(group).or_default().push(amount);
    }
    groups
        .into_iter()
        .map(|(group, mut values)| {
            values.sort_unstable();
            let at = percentile(&values, method.percentile);
            let limit = ((at as f64) * method.headroom).ceil().max(1.0) as u64;
            let max = values.last().copied().unwrap_or(0);
            (
                group,
                Suggested {
                    limit,
                    samples: values.len(),
                    max,
                },
            )
        })
        .collect()
}

/// The nearest-rank percentile of sorted, non-empty `values`.
fn percentile(values: &[u64], p: f64) -> u64 {
    let n = values.len();
    let rank = ((p / 100.0) * n as f64).ceil() as usize;
    values[rank.clamp(1, n) - 1]
}

/// The suggestion as `[[quota.rules]]` (one rule per measure, a tier profile
/// each) for `tollgate.toml`.
pub fn render_rules(s: &Suggestion, method: Method) -> String {
    let unit = method.unit.name();
    let mut out = String::new();
    for (measure, cost, tiers) in [
        ("requests", None, &s.tier_requests),
        ("tokens", Some("tokens"), &s.tier_tokens),
    ] {
        let named: Vec<(&String, &Suggested)> = tiers.iter().filter(|(t, _)| *t != "-").collect();
        if named.is_empty() {
            continue;
        }
        let _ = writeln!(out, "[[quota.rules]]");
        let _ = writeln!(out, "name = \"key-{measure}-per-{unit}\"");
        let _ = writeln!(out, "per = [\"key\"]\nunit = \"{unit}\"");
        if let Some(cost) = cost {
            let _ = writeln!(out, "cost = \"{cost}\"");
        }
        let profile: Vec<String> = named
            .iter()
            .map(|(tier, v)| format!("{} = {}", toml_key(tier), v.limit))
            .collect();
        let _ = writeln!(out, "tiers = {{ {} }}", profile.join(", "));
        for (tier, v) in named {
            let _ = writeln!(
                out,
                "# {tier}: p{} of {} active key-{unit}s, largest {}",
                method.percentile, v.samples, v.max
            );
        }
        out.push('\n');
    }
    out
}

/// The per-tenant (and per-tier) request suggestion in the limits-file
/// format (Envoy's reference rate limit service, `quota.limits_file`).
/// The descriptor keys must match what the gateway's rate limit actions send.
pub fn render_limits(s: &Suggestion, method: Method, domain: &str) -> String {
    let unit = method.unit.name();
    let mut out = format!("domain: {}\ndescriptors:\n", yaml_string(domain));
    for (key, groups) in [("tenant", &s.tenant_requests), ("tier", &s.tier_requests)] {
        for (value, v) in groups.iter().filter(|(g, _)| *g != "-") {
            let _ = writeln!(
                out,
                "  # p{} of {} active {key}-{unit}s, largest {}",
                method.percentile, v.samples, v.max
            );
            let _ = writeln!(
                out,
                "  - key: {key}\n    value: {}\n    rate_limit: {{ unit: {unit}, requests_per_unit: {} }}",
                yaml_string(value),
                v.limit
            );
        }
    }
    out
}

/// Per-tenant token suggestions as comments (quota rules have one limit per
/// tier, not per tenant; use them to set `per = ["tenant"]` budgets).
pub fn render_tenant_tokens(s: &Suggestion, method: Method) -> String {
    let unit = method.unit.name();
    s.tenant_tokens
        .iter()
        .map(|(tenant, v)| {
            format!(
                "# tenant {tenant}: {} tokens per {unit} (p{} of {} active windows, largest {})\n",
                v.limit, method.percentile, v.samples, v.max
            )
        })
        .collect()
}

fn toml_key(key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        key.to_string()
    } else {
        serde_json::to_string(key).unwrap_or_default()
    }
}

/// A YAML double-quoted scalar (JSON strings are valid YAML).
fn yaml_string(value: &str) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[1, 2], 0.1), 1);
    }

    fn row(minute: u64, key: &str, tier: &str, id: &str) -> Row {
        let at = UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000 + minute * 60);
        let json = serde_json::json!({
            "time": humantime::format_rfc3339_millis(at).to_string(),
            "request_id": id, "api": "http", "decision": "allow", "reason": "allowed",
            "caller": {"principal": key, "tenant": "t", "tier": tier},
        });
        let mut row: Row = serde_json::from_value(json).expect("row");
        row.at = Some(at);
        row
    }

    #[test]
    fn percentile_of_active_windows_per_tier_with_headroom() {
        // Key a makes i requests in minute i (1..=10); key b 100 in one minute;
        // minutes without requests are not windows.
        let mut rows = Vec::new();
        for minute in 1..=10u64 {
            for n in 0..minute {
                rows.push(row(minute * 7, "a", "paid", &format!("a{minute}-{n}")));
            }
        }
        for n in 0..100 {
            rows.push(row(3, "b", "free", &format!("b{n}")));
        }
        let method = |percentile, headroom| Method {
            unit: Unit::Minute,
            percentile,
            headroom,
        };
        let s = suggest(&rows, method(90.0, 1.0));
        assert_eq!(
            s.tier_requests["paid"],
            Suggested {
                limit: 9,
                samples: 10,
                max: 10
            }
        );
        assert_eq!(s.tier_requests["free"].limit, 100);
        // The tenant's minutes: 10 of key a's plus minute 3 with b's 100.
        assert_eq!(s.tenant_requests["t"].samples, 11);
        let s = suggest(&rows, method(100.0, 1.5));
        assert_eq!(s.tier_requests["paid"].limit, 15);
        assert!(
            s.tier_tokens.is_empty(),
            "no usage records, no token limits"
        );
        let rules = render_rules(&s, method(100.0, 1.5));
        assert!(
            rules.contains("tiers = { free = 150, paid = 15 }"),
            "{rules}"
        );
    }
}
