//! What every store needs around it: a deadline, bounded in-flight work, a
//! local cache of counters known to be over their limit, and each limit's
//! failure mode.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use super::memory::{Clock, SystemClock};
use super::rules::Planned;
use super::{Algorithm, ChargeResult, CounterKey, FailureMode, QuotaStore, StoreError, Usage};

/// The outcome of charging a request's quotas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Every counter was charged (or no limit applied). `usage` pairs with
    /// the plans, in order.
    Allowed { usage: Vec<Usage> },
    /// A non-shadow counter had no room; nothing was charged. `blocking` is
    /// the index of the first such plan.
    OverLimit { usage: Vec<Usage>, blocking: usize },
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
    over: moka::sync::Cache<CounterKey, u64>,
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
        let result = match tokio::time::timeout(self.deadline, self.store.charge(&charges)).await {
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

    fn decide(&self, plans: &[Planned], result: ChargeResult) -> QuotaDecision {
        if result.applied {
            return QuotaDecision::Allowed {
                usage: result.usage,
            };
        }
        let now = self.clock.now_ms();
        let mut blocking = None;
        for (i, (plan, usage)) in plans.iter().zip(&result.usage).enumerate() {
            let c = &plan.charge;
            if usage.fits || c.shadow {
                continue;
            }
            blocking.get_or_insert(i);
            // Only when even one more unit cannot fit is the counter "over"
            // for everyone until it resets; a large cost alone is not.
            if c.algorithm == Algorithm::FixedWindow && usage.used >= c.limit {
                let reset_ms = u64::try_from(usage.reset.as_millis()).unwrap_or(u64::MAX);
                self.over
                    .insert(c.key.clone(), now.saturating_add(reset_ms));
            }
        }
        QuotaDecision::OverLimit {
            usage: result.usage,
            blocking: blocking.unwrap_or(0),
        }
    }

    fn known_over(&self, plans: &[Planned]) -> Option<QuotaDecision> {
        let now = self.clock.now_ms();
        let blocking = plans.iter().position(|p| {
            !p.charge.shadow
                && self
                    .over
                    .get(&p.charge.key)
                    .is_some_and(|until| until > now)
        })?;
        let usage = plans
            .iter()
            .map(|p| {
                let until = self.over.get(&p.charge.key).filter(|&u| u > now);
                match until {
                    Some(u) => Usage {
                        fits: false,
                        used: p.charge.limit,
                        reset: Duration::from_millis(u - now),
                    },
                    // Not asked: unknown, reported as untouched.
                    None => Usage {
                        fits: true,
                        used: 0,
                        reset: Duration::from_millis(p.charge.unit.millis()),
                    },
                }
            })
            .collect();
        Some(QuotaDecision::OverLimit { usage, blocking })
    }

    /// Forgets a counter everywhere, the local over-limit cache included.
    pub async fn reset(&self, key: &CounterKey) -> Result<(), StoreError> {
        self.over.invalidate(key);
        tokio::time::timeout(
            self.deadline.max(Duration::from_secs(1)),
            self.store.reset(key),
        )
        .await
        .map_err(|_| StoreError::Timeout(self.deadline))?
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
