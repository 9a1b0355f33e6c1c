//! Quota accounting: counters per descriptor, charged all-or-nothing, in a
//! store behind the [`QuotaStore`] trait (in memory, Redis, Redis Cluster).
//!
//! Both ways in share this module: Envoy's rate limit service
//! ([`limits`], the reference YAML format) and quota rules charged inside
//! ext_authz `Check` ([`rules`]). [`QuotaEngine`] adds what every store
//! needs around it: a deadline, bounded in-flight work, the over-limit cache,
//! and each limit's failure mode.

pub mod engine;
pub mod key;
pub mod limits;
pub mod memory;
pub mod redis;
pub mod rls;
pub mod rules;

use std::time::Duration;

use serde::Deserialize;

pub use engine::{QuotaDecision, QuotaEngine};
pub use key::CounterKey;

/// The unit of a limit's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Second,
    Minute,
    Hour,
    Day,
}

impl Unit {
    /// Window length in milliseconds.
    pub fn millis(self) -> u64 {
        match self {
            Self::Second => 1_000,
            Self::Minute => 60_000,
            Self::Hour => 3_600_000,
            Self::Day => 86_400_000,
        }
    }

    /// Envoy's `RateLimitResponse.RateLimit.Unit` number.
    pub fn envoy_code(self) -> i32 {
        match self {
            Self::Second => 1,
            Self::Minute => 2,
            Self::Hour => 3,
            Self::Day => 4,
        }
    }

    /// Parses `second`, `MINUTE`, … (the reference format is case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_lowercase().as_str() {
            "second" => Some(Self::Second),
            "minute" => Some(Self::Minute),
            "hour" => Some(Self::Hour),
            "day" => Some(Self::Day),
            _ => None,
        }
    }
}

/// How a window is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
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
    /// Every non-shadow charge fitted, so every charge was applied. When
    /// false, nothing was applied.
    pub applied: bool,
    /// One per charge, in order.
    pub usage: Vec<Usage>,
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
    /// Whether the store is connected (always, for stores in process).
    fn connected(&self) -> bool {
        true
    }
}

/// Clamps a window position into a reset duration.
pub(crate) fn reset_after(now_ms: u64, window_ms: u64) -> Duration {
    let window_ms = window_ms.max(1);
    Duration::from_millis(window_ms - now_ms % window_ms)
}

/// The weighted count of a sliding window: `prev * (1 - elapsed/window) +
/// current`, rounded up so the estimate never undercounts.
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
        assert_eq!(reset_after(61_000, 60_000), Duration::from_secs(59));
        assert_eq!(reset_after(60_000, 60_000), Duration::from_secs(60));
    }
}
