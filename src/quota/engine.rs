//! What every store needs around it: a deadline, bounded in-flight work, a
//! local cache of counters known to be over their limit, and each limit's
//! failure mode.
//!
//! The over-limit cache answers only what the store itself said: an entry is
//! keyed by the counter **and the limit it was refused under** (value, unit,
//! algorithm), so a request under a different limit — a per-request
//! override, a limit raised by reload, a key moved to another tier — asks the
//! store. It never answers for usage that must be recorded
//! ([`ChargeMode::Always`]), and it is emptied on every invalidation (quota
//! reset, limits reload, key change; see [`crate::invalidate`]). Other
//! counters of a cached answer are reported as unknown, not invented.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::memory::{Clock, SystemClock};
use super::rules::{Cost, Planned};
use super::{
    Algorithm, ChargeMode, ChargeResult, CounterKey, FailureMode, QuotaStore, StoreError, Unit,
    Usage,
};

/// What an over-limit cache entry was computed under.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct OverKey {
    key: CounterKey,
    limit: u64,
    unit: Unit,
    algorithm: Algorithm,
}

/// The outcome of charging a request's quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Every counter was charged (or no limit applied). `usage` pairs with
    /// the plans, in order; `None` where the store was not asked.
    Allowed { usage: Vec<Option<Usage>> },
    /// A non-shadow counter had no room; no admission charge was applied
    /// (usage charges, [`ChargeMode::Always`], were). `blocking` is the index
    /// of the first such plan.
    OverLimit {
        usage: Vec<Option<Usage>>,
        blocking: usize,
    },
    /// The store could not answer in time; `mode` is what the limits involved
    /// say to do about it.
    Failed {
        error: StoreError,
        mode: FailureMode,
    },
}

/// The quota engine over one store.
pub struct QuotaEngine {
    store: Arc<dyn QuotaStore>,
    deadline: Duration,
    inflight: Arc<Semaphore>,
    /// Fixed-window counters known to be over their limit, until their window
    /// resets (ms since epoch): a flood from one key stops costing store
    /// round trips.
    over: moka::sync::Cache<OverKey, u64>,
    clock: Arc<dyn Clock>,
}

impl QuotaEngine {
    /// Wraps `store`: each charge gets at most `deadline`, and at most
    /// `max_inflight` charges wait on the store at once.
    pub fn new(store: Arc<dyn QuotaStore>, deadline: Duration, max_inflight: usize) -> Self {
        Self {
            store,
            deadline,
            inflight: Arc::new(Semaphore::new(max_inflight.max(1))),
            over: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(86_400))
                .build(),
            clock: Arc::new(SystemClock),
        }
    }

    /// The store behind this engine.
    pub fn store(&self) -> &Arc<dyn QuotaStore> {
        &self.store
    }

    /// Charges `plans` all-or-nothing.
    pub async fn charge(&self, plans: &[Planned]) -> QuotaDecision {
        if plans.is_empty() {
            return QuotaDecision::Allowed { usage: Vec::new() };
        }
        if let Some(decision) = self.known_over(plans) {
            return decision;
        }
        let mode = failure_mode(plans);
        // Bounded in-flight work: when the store is slow, requests beyond the
        // bound fail at once by their failure mode instead of queueing.
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            return QuotaDecision::Failed {
                error: StoreError::Overloaded,
                mode,
            };
        };
        let charges: Vec<_> = plans.iter().map(|p| p.charge.clone()).collect();
        let round_trip = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "tollgate.store",
            store = self.store.kind(),
            counters = charges.len(),
        );
        let charge = tracing::Instrument::instrument(self.store.charge(&charges), round_trip);
        let result = match tokio::time::timeout(self.deadline, charge).await {
            Ok(Ok(r)) => r,
            Ok(Err(error)) => return QuotaDecision::Failed { error, mode },
            Err(_) => {
                return QuotaDecision::Failed {
                    error: StoreError::Timeout(self.deadline),
                    mode,
                };
            }
        };
        self.decide(plans, result)
    }

    /// Reserves `reservation` ([`QuotaStore::reserve`]), whose charges are
    /// the plans that are not concurrency rules, in order, and whose slots
    /// are the concurrency plans, in order. The second value is true when the
    /// request id already had a reservation (nothing was charged).
    pub async fn reserve(
        &self,
        plans: &[Planned],
        reservation: &super::Reservation,
    ) -> (QuotaDecision, bool) {
        if let Some(decision) = self.known_over(plans) {
            return (decision, false);
        }
        let mode = failure_mode(plans);
        let Ok(_permit) = self.inflight.clone().try_acquire_owned() else {
            return (
                QuotaDecision::Failed {
                    error: StoreError::Overloaded,
                    mode,
                },
                false,
            );
        };
        let round_trip = tracing::info_span!(
            target: crate::telemetry::TARGET,
            "tollgate.store",
            store = self.store.kind(),
            counters = plans.len(),
        );
        let reserve = tracing::Instrument::instrument(self.store.reserve(reservation), round_trip);
        let reserved = match tokio::time::timeout(self.deadline, reserve).await {
            Ok(Ok(r)) => r,
            Ok(Err(error)) => return (QuotaDecision::Failed { error, mode }, false),
            Err(_) => {
                return (
                    QuotaDecision::Failed {
                        error: StoreError::Timeout(self.deadline),
                        mode,
                    },
                    false,
                );
            }
        };
        if reserved.duplicate {
            return (
                QuotaDecision::Failed {
                    error: StoreError::Backend("request id already reserved".into()),
                    mode: FailureMode::Deny,
                },
                true,
            );
        }
        // Back into plan order: charges, then slots, each in plan order.
        let (mut charges, mut slots) = {
            let n = reservation.charges.len();
            let mut all = reserved.usage.into_iter();
            let charges: Vec<_> = all.by_ref().take(n).collect();
            (charges.into_iter(), all)
        };
        let usage = plans
            .iter()
            .map(|p| {
                if p.measure == Cost::Concurrent {
                    slots.next().flatten()
                } else {
                    charges.next().flatten()
                }
            })
            .collect();
        (
            self.decide(
                plans,
                ChargeResult {
                    applied: reserved.applied,
                    usage,
                },
            ),
            false,
        )
    }

    fn decide(&self, plans: &[Planned], result: ChargeResult) -> QuotaDecision {
        let now = self.clock.now_ms();
        let mut blocking = None;
        for (i, (plan, usage)) in plans.iter().zip(&result.usage).enumerate() {
            let c = &plan.charge;
            let Some(usage) = usage else { continue };
            if usage.fits || c.shadow {
                continue;
            }
            blocking.get_or_insert(i);
            // Only when even one more unit cannot fit is the counter "over"
            // for everyone until it resets; a large cost alone is not.
            // A slot frees whenever any request ends, and a budget whenever
            // a settlement on any replica refunds it: only request counts,
            // which nothing but time lowers, are cached.
            if c.algorithm == Algorithm::FixedWindow
                && usage.used >= c.limit
                && plan.measure == Cost::Requests
            {
                let reset_ms = u64::try_from(usage.reset.as_millis()).unwrap_or(u64::MAX);
                self.over
                    .insert(over_key(&plan.charge), now.saturating_add(reset_ms));
            }
        }
        match blocking {
            // Usage recorded in full can leave a request over its limit
            // although everything was applied.
            None if result.applied => QuotaDecision::Allowed {
                usage: result.usage,
            },
            blocking => QuotaDecision::OverLimit {
                usage: result.usage,
                blocking: blocking.unwrap_or(0),
            },
        }
    }

    fn known_over(&self, plans: &[Planned]) -> Option<QuotaDecision> {
        // Usage must reach the store whatever the answer.
        if plans
            .iter()
            .any(|p| p.charge.mode == ChargeMode::Always && p.charge.cost > 0)
        {
            return None;
        }
        let now = self.clock.now_ms();
        let cached = |p: &Planned| {
            self.over
                .get(&over_key(&p.charge))
                .filter(|&until| until > now)
        };
        let blocking = plans
            .iter()
            .position(|p| !p.charge.shadow && cached(p).is_some())?;
        let usage = plans
            .iter()
            .map(|p| {
                // Not asked: unknown, and reported as such.
                cached(p).map(|until| Usage {
                    fits: false,
                    used: p.charge.limit,
                    reset: Duration::from_millis(until - now),
                    window: p.charge.unit.window_of(now),
                })
            })
            .collect();
        Some(QuotaDecision::OverLimit { usage, blocking })
    }

    /// Empties the over-limit cache (a reset, a limits reload or a key change
    /// elsewhere may have made its answers wrong).
    pub fn forget_known_over(&self) {
        self.over.invalidate_all();
    }

    /// Forgets a counter everywhere, the local over-limit cache included.
    pub async fn reset(&self, key: &CounterKey) -> Result<(), StoreError> {
        self.forget_known_over();
        tokio::time::timeout(
            self.deadline.max(Duration::from_secs(1)),
            self.store.reset(key),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.deadline))?
    }
}

fn over_key(c: &super::Charge) -> OverKey {
    OverKey {
        key: c.key.clone(),
        limit: c.limit,
        unit: c.unit,
        algorithm: c.algorithm,
    }
}

/// What to do on store failure when several limits are involved: any `deny`
/// denies; otherwise any `gateway` defers to the gateway; otherwise allow.
pub fn failure_mode(plans: &[Planned]) -> FailureMode {
    let modes = plans
        .iter()
        .filter(|p| !p.charge.shadow)
        .map(|p| p.failure_mode);
    let mut result = FailureMode::Allow;
    for m in modes {
        match m {
            FailureMode::Deny => return FailureMode::Deny,
            FailureMode::Gateway => result = FailureMode::Gateway,
            FailureMode::Allow => {}
        }
    }
    result
}
