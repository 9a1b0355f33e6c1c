//! Quota accounting: counters per descriptor, charged all-or-nothing, in a
//! store behind the [`QuotaStore`] trait (in memory, Redis, Redis Cluster).
//!
//! Both ways in share this module: Envoy's rate limit service
//! ([`limits`], the reference YAML format) and quota rules charged inside
//! ext_authz `Check` ([`rules`]). [`QuotaEngine`] adds what every store
//! needs around it: a deadline, bounded in-flight work, the over-limit cache,
//! and each limit's failure mode.

mod calendar;
pub mod engine;
pub mod key;
pub mod limits;
pub mod memory;
pub mod redis;
pub mod reserve;
pub mod rls;
pub mod rules;

use std::time::Duration;

use serde::Deserialize;

pub use engine::{QuotaDecision, QuotaEngine};
pub use key::CounterKey;
pub use reserve::{Reservation, Reserved, SettleHow, SettleReport, Settled, Slot};

/// The unit of a limit's window: every unit of Envoy's
/// `RateLimitResponse.RateLimit.Unit` (`envoy.service.ratelimit.v3`) and of
/// the reference service's limits format.
///
/// Windows are aligned to the Unix epoch, as the reference service aligns
/// them: a week is 7 days, a month 30 days and a year 365 days, so a "month"
/// window does not follow the calendar. `calendar_month` does: its windows
/// run from the first of a month 00:00 UTC to the first of the next, for
/// budgets billed by the calendar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
    Week,
    Month,
    Year,
    /// A calendar month in UTC (28 to 31 days).
    #[serde(rename = "calendar_month")]
    CalendarMonth,
}

impl Unit {
    /// Every unit, shortest first (the calendar month, as long as Envoy's
    /// `MONTH` is on the wire, comes after the epoch-aligned ones).
    pub const ALL: [Unit; 8] = [
        Self::Second,
        Self::Minute,
        Self::Hour,
        Self::Day,
        Self::Week,
        Self::Month,
        Self::Year,
        Self::CalendarMonth,
    ];

    /// Window length in milliseconds; for `calendar_month`, the nominal
    /// 30 days (what `RateLimit-Policy` states as `w`; the windows
    /// themselves follow the calendar, see [`Unit::window_of`]).
    pub fn millis(self) -> u64 {
        const DAY: u64 = 86_400_000;
        match self {
            Self::Second => 1_000,
            Self::Minute => 60_000,
            Self::Hour => 3_600_000,
            Self::Day => DAY,
            Self::Week => 7 * DAY,
            Self::Month | Self::CalendarMonth => 30 * DAY,
            Self::Year => 365 * DAY,
        }
    }

    /// The index of the window holding `now_ms` (Unix milliseconds):
    /// `now / length` for epoch-aligned units, months since January 1970
    /// for `calendar_month`.
    pub fn window_of(self, now_ms: u64) -> u64 {
        match self {
            Self::CalendarMonth => calendar::month_of(now_ms),
            _ => now_ms / self.millis(),
        }
    }

    /// When window `w` starts, in Unix milliseconds.
    pub fn window_start(self, w: u64) -> u64 {
        match self {
            Self::CalendarMonth => calendar::month_start(w),
            _ => w.saturating_mul(self.millis()),
        }
    }

    /// When window `w` ends (the next one starts), in Unix milliseconds.
    pub fn window_end(self, w: u64) -> u64 {
        self.window_start(w.saturating_add(1))
    }

    /// Time from `now_ms` until its window ends (what `Retry-After` and
    /// `RateLimit-Reset` say).
    pub fn reset_after(self, now_ms: u64) -> Duration {
        let end = self.window_end(self.window_of(now_ms));
        Duration::from_millis(end.saturating_sub(now_ms).max(1))
    }

    /// Envoy's `RateLimitResponse.RateLimit.Unit` number (note that Envoy
    /// numbers `WEEK` after `YEAR`).
    pub fn envoy_code(self) -> i32 {
        match self {
            Self::Second => 1,
            Self::Minute => 2,
            Self::Hour => 3,
            Self::Day => 4,
            Self::Month | Self::CalendarMonth => 5,
            Self::Year => 6,
            Self::Week => 7,
        }
    }

    /// The unit of Envoy's number; `None` for `UNKNOWN` (0) and numbers Envoy
    /// does not define.
    pub fn from_envoy_code(code: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|u| u.envoy_code() == code)
    }

    /// Parses `second`, `MINUTE`, … (the reference format is case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|u| u.name().eq_ignore_ascii_case(text))
    }

    /// The lowercase name, as the limits file spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Second => "second",
            Self::Minute => "minute",
            Self::Hour => "hour",
            Self::Day => "day",
            Self::Week => "week",
            Self::Month => "month",
            Self::Year => "year",
            Self::CalendarMonth => "calendar_month",
        }
    }
}

/// How a charge that does not fit is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeMode {
    /// All-or-nothing admission: a request whose charges do not all fit is
    /// refused and nothing is counted. For limits that admit requests.
    #[default]
    Admission,
    /// The hits are usage that already happened (tokens of a finished
    /// response, say): they are counted in full even when they cross the
    /// limit, and even when another limit of the request refuses. The answer
    /// is still OVER_LIMIT once the count passes the limit, so the next
    /// request is refused.
    Always,
}

/// How a window is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Windows aligned to the epoch, as Envoy's reference service counts:
    /// drop-in identical answers, but up to twice the limit can pass around
    /// a window boundary.
    #[default]
    FixedWindow,
    /// The current window's count plus the previous window's, weighted by
    /// how much of it still overlaps the sliding window. Smooth: a burst at
    /// the end of one window still counts at the start of the next.
    SlidingWindow,
}

/// What to answer when the store cannot (unreachable, too slow).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Deny the request (fail closed). The default.
    #[default]
    Deny,
    /// Allow the request (fail open).
    Allow,
    /// Answer gRPC `UNAVAILABLE`, so the gateway's own failure setting
    /// applies (Envoy's `failure_mode_deny`).
    Gateway,
}

/// One counter to charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    pub key: CounterKey,
    /// Requests (or cost units) allowed per window.
    pub limit: u64,
    pub unit: Unit,
    pub algorithm: Algorithm,
    /// How much this request adds; 0 only checks.
    pub cost: u64,
    /// Counted and reported, never denies.
    pub shadow: bool,
    /// Admission (all-or-nothing) or usage recorded in full.
    pub mode: ChargeMode,
}

/// Whether `cost` more fits under `limit` when `used` are counted. A check
/// that costs nothing fits only while something is left (`used < limit`),
/// so a limit of 0 refuses everything and a spent budget refuses even a
/// check. (Envoy's reference service answers OK to a zero-cost check at
/// exactly the limit; Tollgate does not, because the post-hoc charging
/// pattern — check with `hits_addend` 0, charge the usage later — would
/// otherwise admit a request when nothing is left.)
pub fn fits(used: u64, cost: u64, limit: u64) -> bool {
    if cost == 0 {
        used < limit
    } else {
        used.saturating_add(cost) <= limit
    }
}

/// A counter's state after a charge attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Whether this counter had room for the cost.
    pub fits: bool,
    /// Count in the window after the attempt (as the algorithm weighs it).
    pub used: u64,
    /// Time until the window resets.
    pub reset: Duration,
    /// The window the count belongs to (`now / window length`), so a later
    /// settlement adjusts the same window.
    pub window: u64,
}

impl Usage {
    /// What is left of `limit`.
    pub fn remaining(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.used)
    }
}

/// The answer to a group of charges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChargeResult {
    /// Every non-shadow admission charge fitted, so every charge was applied.
    /// When false, only `ChargeMode::Always` charges were applied.
    pub applied: bool,
    /// One per charge, in order; `None` where the store was not asked (a
    /// later Redis Cluster slot group after an earlier one refused).
    pub usage: Vec<Option<Usage>>,
}

/// A store that could not answer. Every variant is transient: the next
/// request may succeed, and meanwhile each limit's failure mode answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("quota store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("quota store is busy: too many requests in flight")]
    Overloaded,
    #[error("quota store error: {0}")]
    Backend(String),
    #[error("quota store is full ({0} counters); raise quota.memory_max_keys")]
    Full(usize),
}

/// Where counters live. Implementations charge a group all-or-nothing:
/// either every charge is applied or, if any non-shadow charge does not fit,
/// none is.
#[tonic::async_trait]
pub trait QuotaStore: Send + Sync {
    /// Checks and, if all fit, applies `charges`.
    async fn charge(&self, charges: &[Charge]) -> Result<ChargeResult, StoreError>;
    /// Forgets a counter (all its windows).
    async fn reset(&self, key: &CounterKey) -> Result<(), StoreError>;
    /// A short name for logs and metrics.
    fn kind(&self) -> &'static str;
    /// Whether the store is connected and can write (always, for stores in
    /// process).
    fn connected(&self) -> bool {
        true
    }
    /// The store's clock minus this process's clock, in milliseconds, when
    /// known (stores whose time comes from a server).
    fn clock_offset_ms(&self) -> Option<i64> {
        None
    }
    /// Keeps `record` (an opaque text) under `name` for `ttl`. `Ok(false)`
    /// when a record of that name is already kept: the first one stays. A
    /// generic record API (the credential lockout keeps its locks here).
    async fn put_record(&self, name: &str, record: &str, ttl: Duration)
    -> Result<bool, StoreError>;
    /// The record kept under `name`, if any.
    async fn get_record(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Reserves a request's usage ([`reserve`]): charges `reservation.charges`
    /// and takes one slot of every `reservation.slots` all-or-nothing, and,
    /// when applied, keeps what is needed to settle it under its request id
    /// until settled or its TTL passes. At most one round trip (per hash
    /// slot group on Redis Cluster). Sweeps a bounded number of expired
    /// reservations of the same group first.
    async fn reserve(&self, reservation: &Reservation) -> Result<Reserved, StoreError>;
    /// Settles `request_id` exactly once ([`reserve`]): replaces each
    /// reserved amount by what `how` says, releases its concurrency slots,
    /// never lets a count go below zero. One script (per slot group).
    async fn settle(&self, request_id: &str, how: &SettleHow) -> Result<SettleReport, StoreError>;
    /// Applies the TTL fate of at most `max` reservations past their TTL;
    /// returns how many. The scripts sweep as they go; this is the bounded
    /// background sweep that catches groups no request touches.
    async fn sweep(&self, max: usize) -> Result<u64, StoreError>;
    /// Requests in flight on concurrency counter `key` (expired
    /// reservations of its group swept first).
    async fn in_flight(&self, key: &CounterKey) -> Result<u64, StoreError>;
}

/// The weighted count of a sliding window of `unit` at `now_ms`:
/// [`sliding_used`] over the window's own start and length (calendar months
/// differ in length).
pub(crate) fn sliding_used_in(unit: Unit, prev: u64, current: u64, now_ms: u64) -> u64 {
    let w = unit.window_of(now_ms);
    let start = unit.window_start(w);
    let len = unit.window_end(w).saturating_sub(start);
    sliding_used(prev, current, now_ms.saturating_sub(start), len)
}

/// The weighted count of a sliding window: `prev * (1 - elapsed/window) +
/// current`, rounded up so the estimate never undercounts. `now_ms` is
/// taken modulo the window (the time elapsed in it).
pub(crate) fn sliding_used(prev: u64, current: u64, now_ms: u64, window_ms: u64) -> u64 {
    let window_ms = window_ms.max(1);
    let elapsed = now_ms % window_ms;
    let weight_num = u128::from(window_ms - elapsed);
    let prev_part = (u128::from(prev) * weight_num).div_ceil(u128::from(window_ms));
    u64::try_from(prev_part)
        .unwrap_or(u64::MAX)
        .saturating_add(current)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_weight_rounds_up_and_saturates() {
        assert_eq!(sliding_used(10, 0, 0, 1000), 10);
        assert_eq!(sliding_used(10, 0, 500, 1000), 5);
        assert_eq!(sliding_used(10, 3, 999, 1000), 4);
        assert_eq!(sliding_used(u64::MAX, u64::MAX, 0, 1000), u64::MAX);
    }

    #[test]
    fn reset_counts_down_to_the_window_end() {
        assert_eq!(Unit::Minute.reset_after(61_000), Duration::from_secs(59));
        assert_eq!(Unit::Minute.reset_after(60_000), Duration::from_secs(60));
    }
}
