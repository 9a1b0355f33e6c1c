//! Reserve at the request, settle from the response.
//!
//! When a request is admitted, every budget rule (tokens, input or output
//! tokens, dollars) is charged the request's *estimated* usage and every
//! concurrency rule gives it a slot, all-or-nothing with the request-count
//! rules, in **one store operation** ([`QuotaStore::reserve`]: one Lua script
//! on Redis). The same operation keeps the reservation — which counters,
//! which windows, how much each was charged, the model and its price, the
//! slots taken — under the request id, and enters it in the store's expiry
//! index.
//!
//! Settlement ([`QuotaStore::settle`], one script) replaces each reserved
//! amount by the actual one — the unused part refunded, any excess charged
//! (usage that happened is always recorded, even past the limit) — in the
//! window the reservation was counted in, releases the slots, deletes the
//! reservation and leaves a "settled" marker, all atomically: a duplicate or
//! retried report finds the marker and changes nothing. A count never goes
//! below zero. Dollars are priced inside the store from the price kept with
//! the reservation (the price when the request was admitted), so settling
//! needs no read first.
//!
//! A reservation never settled (the gateway crashed, the stream was lost)
//! meets its **TTL fate** when `quota.reservation_ttl_secs` passes: `charge`
//! (the default: the reserved amount stays charged, budgets never leak) or
//! `release` (refunded), per rule (`on_expiry`) or globally
//! (`quota.on_expiry`). Its concurrency slots are always released. The
//! expiry index is swept by the reserve and settle scripts themselves
//! (a bounded number of due entries each time, before any check, so an
//! expired slot never refuses a request) and by a bounded background sweep
//! on every replica ([`QuotaStore::sweep`]).
//!
//! [`QuotaStore::reserve`]: super::QuotaStore::reserve
//! [`QuotaStore::settle`]: super::QuotaStore::settle
//! [`QuotaStore::sweep`]: super::QuotaStore::sweep

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::rules::Cost;
use super::{Charge, CounterKey, Usage};
use crate::usage::{Price, TokenUsage};

/// What happens to a reserved amount that is not settled from usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fate {
    /// The reserved amount stays charged (never a free pass).
    #[default]
    Charge,
    /// The reserved amount is refunded.
    Release,
}

/// What a client that goes away mid-stream is charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectFate {
    /// The whole reservation (the default: a provider usually keeps
    /// generating, and billing, after the client left).
    #[default]
    Reservation,
    /// What the response had generated when the stream was cut (counted
    /// from the streamed deltas).
    Generated,
}

/// One concurrency slot to take: requests in flight on `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub key: CounterKey,
    /// Requests in flight allowed.
    pub limit: u64,
    /// Counted, never refuses.
    pub shadow: bool,
    /// The rule's name.
    pub rule: String,
}

/// How one reserved charge is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub rule: String,
    pub measure: Cost,
    /// Its TTL fate.
    pub on_expiry: Fate,
}

/// A request's reservation, as the store takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reservation {
    pub request_id: String,
    /// Windowed counters, all-or-nothing with the slots.
    pub charges: Vec<Charge>,
    /// Per charge: how it is settled; `None` for request counts (final when
    /// charged).
    pub budgets: Vec<Option<Budget>>,
    pub slots: Vec<Slot>,
    pub model: Option<String>,
    /// The caller's tenant and tier (the labels of the settled-usage
    /// metric), kept with the reservation so any replica that settles it
    /// can count them.
    pub labels: UsageLabels,
    /// The model's price when admitted (dollar budgets settle with it).
    pub price: Option<Price>,
    /// Input tokens estimated at admission: settlement uses them when the
    /// response does not report its input.
    pub input_estimate: Option<u64>,
    /// How long the reservation waits to be settled.
    pub ttl: Duration,
}

/// The caller's tenant and tier, as metric labels (bounded in
/// [`crate::metrics`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageLabels {
    pub tenant: Option<String>,
    pub tier: Option<String>,
}

impl Reservation {
    /// Whether anything needs settling (a budget or a slot).
    pub fn kept(&self) -> bool {
        !self.slots.is_empty() || self.budgets.iter().any(Option::is_some)
    }
}

/// What [`Reservation`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// Every charge and slot fitted (shadow ones aside) and all were applied.
    pub applied: bool,
    /// A reservation (or settlement) of this request id is already kept:
    /// nothing was charged.
    pub duplicate: bool,
    /// The charges' usage, then the slots' (`used` = requests in flight,
    /// `window` 0); `None` where the store was not asked.
    pub usage: Vec<Option<Usage>>,
}

/// How a settlement replaces the reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettleHow {
    /// By actual usage; `input: None` uses the estimate kept at admission.
    Usage {
        input: Option<u64>,
        output: u64,
        cached: u64,
    },
    /// Refund everything (nothing was generated).
    Release,
    /// Keep the reservation charged.
    Keep,
}

/// What a settlement did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The reservation was replaced by the actual usage now.
    Now,
    /// The request was settled before (or met its TTL fate); nothing
    /// changed.
    Already,
    /// No reservation is kept for that request id (never reserved, or
    /// long expired); nothing changed.
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

/// One budget's settled amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charged {
    pub rule: String,
    pub measure: Cost,
    /// In the rule's measure (micro-dollars for `usd`).
    pub amount: u64,
}

/// The answer to a settlement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleReport {
    pub settled: Settled,
    pub model: Option<String>,
    /// The labels kept at reserve.
    pub labels: UsageLabels,
    /// What each budget was charged in the end (empty unless `Now`).
    pub charged: Vec<Charged>,
    /// Concurrency slots released (their rules).
    pub released: Vec<String>,
    /// The usage the settlement charged (with the input estimate filled in).
    pub usage: TokenUsage,
}

impl SettleReport {
    /// A settlement that changed nothing.
    pub fn nothing(settled: Settled) -> Self {
        Self {
            settled,
            model: None,
            labels: UsageLabels::default(),
            charged: Vec::new(),
            released: Vec::new(),
            usage: TokenUsage::default(),
        }
    }
}

/// The number a measure has in a stored reservation (and in the Lua
/// scripts).
pub fn measure_code(m: Cost) -> u8 {
    match m {
        Cost::Requests | Cost::Concurrent => 0,
        Cost::Tokens => 1,
        Cost::InputTokens => 2,
        Cost::OutputTokens => 3,
        Cost::Usd => 4,
    }
}

/// The measure of [`measure_code`]'s number.
pub fn measure_of(code: u64) -> Cost {
    match code {
        1 => Cost::Tokens,
        2 => Cost::InputTokens,
        3 => Cost::OutputTokens,
        4 => Cost::Usd,
        _ => Cost::Requests,
    }
}

/// The amount a budget ends up charged. `usd` without a price keeps the
/// reservation (never zero). Mirrors the Lua of [`crate::quota::redis`]
/// operation for operation, so both stores price alike.
pub fn settled_amount(
    measure: Cost,
    how: &SettleHow,
    input_estimate: Option<u64>,
    price: Option<&Price>,
    reserved: u64,
) -> u64 {
    match *how {
        SettleHow::Release => 0,
        SettleHow::Keep => reserved,
        SettleHow::Usage {
            input,
            output,
            cached,
        } => {
            let usage = TokenUsage {
                input: input.or(input_estimate).unwrap_or(0),
                output,
                cached_input: cached,
            };
            match measure {
                Cost::Tokens => usage.input.saturating_add(usage.output),
                Cost::InputTokens => usage.input,
                Cost::OutputTokens => usage.output,
                Cost::Usd => price.map_or(reserved, |p| p.cost_micros(&usage)),
                Cost::Requests | Cost::Concurrent => reserved,
            }
        }
    }
}

/// A reservation as kept in Redis: JSON the settle script reads with
/// `cjson`. Short names keep it small.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPart {
    /// Model.
    pub m: String,
    /// Tenant label ("" when none; absent in parts stored before it).
    #[serde(default)]
    pub t: String,
    /// Tier label ("" when none).
    #[serde(default)]
    pub g: String,
    /// Input estimate, -1 when unknown.
    pub i: i64,
    /// Price: input, output, cached (-1: the input price), above (-1:
    /// none), input above (-1: input), output above (-1: output); empty
    /// when the model has no price.
    pub p: Vec<f64>,
    pub e: Vec<StoredEntry>,
    pub s: Vec<StoredSlot>,
}

/// One reserved window counter in a [`StoredPart`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEntry {
    /// The window key.
    pub k: String,
    /// Amount reserved.
    pub a: u64,
    /// [`measure_code`].
    pub c: u8,
    /// TTL fate: 0 charge, 1 release.
    pub f: u8,
    /// Rule.
    pub r: String,
}

/// One taken slot in a [`StoredPart`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSlot {
    pub k: String,
    pub r: String,
}

/// A price as the Lua reads it ([`StoredPart::p`]).
pub fn price_array(p: Option<&Price>) -> Vec<f64> {
    let Some(p) = p else { return Vec::new() };
    vec![
        p.input,
        p.output,
        p.cached_input.unwrap_or(-1.0),
        p.above_input_tokens.map_or(-1.0, |n| n as f64),
        p.input_above.unwrap_or(-1.0),
        p.output_above.unwrap_or(-1.0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settled_amounts_follow_the_measure_and_the_fate() {
        let how = SettleHow::Usage {
            input: None,
            output: 200,
            cached: 0,
        };
        assert_eq!(
            settled_amount(Cost::Tokens, &how, Some(300), None, 1000),
            500
        );
        assert_eq!(
            settled_amount(Cost::OutputTokens, &how, None, None, 10),
            200
        );
        assert_eq!(
            settled_amount(Cost::Usd, &how, Some(300), None, 77),
            77,
            "no price: the reservation stays"
        );
        assert_eq!(
            settled_amount(Cost::Tokens, &SettleHow::Release, None, None, 9),
            0
        );
        assert_eq!(
            settled_amount(Cost::Tokens, &SettleHow::Keep, None, None, 9),
            9
        );
    }
}
