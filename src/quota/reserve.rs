//! Reserve at the request, settle from the response.
//!
//! When a request is admitted, every budget rule (tokens, input or output
//! tokens, dollars) is charged the request's *estimated* usage, all-or-nothing
//! with the request-count rules. A reservation record — which counters, which
//! windows, how much each was charged, and the model — is kept in the store
//! under the request id for `quota.reservation_ttl_secs`.
//!
//! When the usage is reported (`tollgate.v1.DecisionService/ReportUsage`), the
//! actual amount of each budget replaces the reservation: the unused part is
//! refunded and any excess charged (usage that happened is always recorded,
//! even past the limit), in the window the reservation was counted in,
//! **exactly once per request id** — the store marks the request settled in
//! the same atomic step that applies the adjustments, so a duplicate or
//! retried report changes nothing.
//!
//! A reservation never settled (the gateway crashed, or never reports) keeps
//! its reserved amount charged: budgets never leak. Its record is forgotten
//! after the TTL.

use serde::{Deserialize, Serialize};

use super::rules::{Cost, Planned};
use super::{Adjustment, Algorithm, CounterKey, Unit, Usage};
use crate::usage::{Prices, TokenUsage};

/// One reserved counter, as kept in the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reserved {
    /// [`CounterKey::to_hex`].
    pub key: String,
    pub unit: Unit,
    pub algorithm: Algorithm,
    pub window: u64,
    /// Amount charged at the request (micro-dollars for `usd`).
    pub amount: u64,
    pub measure: Cost,
    pub rule: String,
}

/// A request's reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Record format version.
    pub v: u32,
    pub model: Option<String>,
    /// The input tokens estimated at admission: settlement uses them when
    /// the response does not report its input.
    #[serde(default)]
    pub input_estimate: Option<u64>,
    pub reserved: Vec<Reserved>,
    /// The caller's tenant and tier, for the labels of
    /// `tollgate_usage_charged_total` (absent in records written before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

impl Record {
    /// The record of the budget charges among `plans`, charged as `usage`
    /// reports; `None` when no budget was charged.
    pub fn of(
        plans: &[Planned],
        usage: &[Option<Usage>],
        model: Option<&str>,
        input_estimate: Option<u64>,
    ) -> Option<Self> {
        let reserved: Vec<Reserved> = plans
            .iter()
            .zip(usage)
            .filter(|(p, _)| p.measure.is_usage())
            .filter_map(|(p, u)| {
                let u = u.as_ref()?;
                Some(Reserved {
                    key: p.charge.key.to_hex(),
                    unit: p.charge.unit,
                    algorithm: p.charge.algorithm,
                    window: u.window,
                    amount: p.charge.cost,
                    measure: p.measure,
                    rule: p.label.clone(),
                })
            })
            .collect();
        (!reserved.is_empty()).then(|| Self {
            v: 1,
            model: model.map(str::to_string),
            input_estimate,
            reserved,
            tenant: None,
            tier: None,
        })
    }

    /// The adjustments that replace each reservation with the actual usage.
    /// A budget whose actual amount cannot be priced (the model lost its
    /// price since) keeps its reservation.
    pub fn adjustments(&self, usage: &TokenUsage, prices: &Prices) -> Vec<Adjustment> {
        self.reserved
            .iter()
            .filter_map(|r| {
                let key = CounterKey::from_hex(&r.key)?;
                let actual = r
                    .measure
                    .amount(usage, self.model.as_deref(), prices)
                    .unwrap_or(r.amount);
                let delta = i64::try_from(actual)
                    .unwrap_or(i64::MAX)
                    .saturating_sub(i64::try_from(r.amount).unwrap_or(i64::MAX));
                Some(Adjustment {
                    key,
                    unit: r.unit,
                    algorithm: r.algorithm,
                    window: r.window,
                    delta,
                })
            })
            .collect()
    }
}

/// What a usage report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The reservation was replaced by the actual usage now.
    Now,
    /// The request was settled before; nothing changed.
    Already,
    /// No reservation is kept for that request id (never reserved, or
    /// expired); nothing changed.
    Unknown,
}

impl Settled {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Now => "settled",
            Self::Already => "already_settled",
            Self::Unknown => "unknown_request",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjustments_replace_the_reservation_with_the_actual_amount() {
        let key = CounterKey::new("d", &[("k".into(), "v".into())], "g");
        let record = Record {
            v: 1,
            model: Some("m".into()),
            input_estimate: None,
            reserved: vec![
                Reserved {
                    key: key.to_hex(),
                    unit: Unit::Minute,
                    algorithm: Algorithm::FixedWindow,
                    window: 7,
                    amount: 1000,
                    measure: Cost::Tokens,
                    rule: "tpm".into(),
                },
                Reserved {
                    key: key.to_hex(),
                    unit: Unit::Minute,
                    algorithm: Algorithm::FixedWindow,
                    window: 7,
                    amount: 10,
                    measure: Cost::OutputTokens,
                    rule: "out".into(),
                },
            ],
            tenant: None,
            tier: None,
        };
        let text = serde_json::to_string(&record).expect("json");
        let back: Record = serde_json::from_str(&text).expect("reads back");
        let usage = TokenUsage {
            input: 300,
            output: 200,
            cached_input: 0,
        };
        let adj = back.adjustments(&usage, &Prices::default());
        assert_eq!(
            adj.iter().map(|a| a.delta).collect::<Vec<_>>(),
            vec![-500, 190]
        );
        assert!(adj.iter().all(|a| a.window == 7 && a.key == key));
    }
}
