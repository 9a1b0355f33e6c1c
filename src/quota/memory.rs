//! The in-memory store: exact under concurrency, expiring, bounded.
//!
//! Counters live in shards, each a mutex over a map from the counter's
//! 16-byte id to a 32-byte slot. A group of charges locks every shard it
//! touches in ascending order (so two groups can never deadlock), checks all
//! counters, and applies all or none. Expired slots are swept from a shard
//! when it fills; a shard still full after a sweep refuses new counters
//! (`StoreError::Full`, handled by each limit's failure mode) rather than
//! evicting a live counter and undercounting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use std::time::Duration;

use super::reserve::{Charged, Fate, SettleHow, SettleReport, Settled, settled_amount};
use super::{
    Algorithm, Charge, ChargeMode, ChargeResult, CounterKey, QuotaStore, Reservation, Reserved,
    StoreError, Usage, fits, sliding_used_in,
};

/// A source of "now", injected so tests can move time.
pub trait Clock: Send + Sync {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock tests set by hand.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `ms`.
    pub fn at(ms: u64) -> Self {
        Self(AtomicU64::new(ms))
    }

    /// Moves the clock forward.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// Window index (`now / window_ms`) that `count` belongs to.
    window: u64,
    count: u64,
    /// Count of window `window - 1`.
    prev: u64,
    expires_ms: u64,
}

impl Slot {
    /// (previous, current) counts as seen from window `w`.
    fn counts_at(&self, w: u64) -> (u64, u64) {
        if self.window == w {
            (self.prev, self.count)
        } else if self.window + 1 == w {
            (self.count, 0)
        } else {
            (0, 0)
        }
    }
}

const SHARDS: usize = 64;

/// The in-memory [`QuotaStore`].
pub struct MemoryStore {
    shards: Vec<Mutex<HashMap<[u8; 16], Slot>>>,
    clock: Arc<dyn Clock>,
    per_shard_max: usize,
    /// Reservation records by request id, with their expiry (ms).
    reservations: Mutex<HashMap<String, (String, u64)>>,
    /// Reservations waiting to be settled, and concurrency counts.
    pending: Mutex<Pending>,
    max_reservations: usize,
}

/// A kept reservation (see [`crate::quota::reserve`]).
struct Part {
    /// (counter, window, amount, how it settles).
    entries: Vec<(CounterKey, u64, u64, super::reserve::Budget)>,
    slots: Vec<(CounterKey, String)>,
    model: Option<String>,
    labels: super::reserve::UsageLabels,
    price: Option<crate::usage::Price>,
    input_estimate: Option<u64>,
    deadline: u64,
}

/// Reservations, their expiry index, settled markers and slot counts,
/// behind one lock (always taken before any shard lock).
#[derive(Default)]
struct Pending {
    parts: HashMap<String, Part>,
    due: std::collections::BTreeSet<(u64, String)>,
    /// Settled request ids, with when the marker expires (ms).
    done: HashMap<String, u64>,
    slots: HashMap<[u8; 16], u64>,
}

/// Inserts into an expiring map, sweeping expired entries when it is full;
/// `false` when it is still full.
fn insert_expiring<V>(
    map: &mut HashMap<String, V>,
    key: String,
    value: V,
    now: u64,
    max: usize,
    expiry: impl Fn(&V) -> u64,
) -> bool {
    if map.len() >= max && !map.contains_key(&key) {
        map.retain(|_, v| expiry(v) > now);
        if map.len() >= max {
            return false;
        }
    }
    map.insert(key, value);
    true
}

impl MemoryStore {
    /// A store holding at most about `max_keys` live counters.
    pub fn new(max_keys: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            clock,
            per_shard_max: max_keys.div_ceil(SHARDS).max(1),
            reservations: Mutex::new(HashMap::new()),
            pending: Mutex::new(Pending::default()),
            max_reservations: max_keys.max(1),
        }
    }

    fn shard_of(id: &[u8; 16]) -> usize {
        usize::from(id[0]) % SHARDS
    }

    fn lock(&self, i: usize) -> MutexGuard<'_, HashMap<[u8; 16], Slot>> {
        // A panic while holding a shard lock cannot leave a slot half-written
        // (slots are Copy and written whole), so a poisoned lock is safe.
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of counters held (live or not yet swept).
    pub fn len(&self) -> usize {
        (0..SHARDS).map(|i| self.lock(i).len()).sum()
    }

    /// Whether no counter is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn charge_now(&self, charges: &[Charge]) -> Result<ChargeResult, StoreError> {
        let now = self.clock.now_ms();
        let ids: Vec<[u8; 16]> = charges.iter().map(|c| c.key.short()).collect();
        let mut shard_ids: Vec<usize> = ids.iter().map(Self::shard_of).collect();
        shard_ids.sort_unstable();
        shard_ids.dedup();
        let mut guards: HashMap<usize, MutexGuard<'_, HashMap<[u8; 16], Slot>>> =
            shard_ids.iter().map(|&i| (i, self.lock(i))).collect();

        // Phase 1: check every counter, counting earlier charges of the same
        // counter in this group.
        let mut pending: HashMap<[u8; 16], u64> = HashMap::new();
        let mut usage = Vec::with_capacity(charges.len());
        let mut all_fit = true;
        for (charge, id) in charges.iter().zip(&ids) {
            let w = charge.unit.window_of(now);
            let slot = guards
                .get(&Self::shard_of(id))
                .and_then(|m| m.get(id).copied())
                .unwrap_or_default();
            let (prev, cur) = slot.counts_at(w);
            let cur = cur.saturating_add(pending.get(id).copied().unwrap_or(0));
            let used = match charge.algorithm {
                Algorithm::FixedWindow => cur,
                Algorithm::SlidingWindow => sliding_used_in(charge.unit, prev, cur, now),
            };
            let fits = fits(used, charge.cost, charge.limit);
            if !fits && !charge.shadow && charge.mode == ChargeMode::Admission {
                all_fit = false;
            }
            *pending.entry(*id).or_default() += charge.cost;
            usage.push(Usage {
                fits,
                used,
                reset: charge.unit.reset_after(now),
                window: w,
            });
        }
        // Admission charges apply only all together; usage is recorded always.
        let apply: Vec<bool> = charges
            .iter()
            .map(|c| c.cost > 0 && (all_fit || c.mode == ChargeMode::Always))
            .collect();

        // Make room for new counters before applying anything, so a full
        // store refuses the whole group rather than part of it.
        let mut new_ids: HashMap<[u8; 16], usize> = HashMap::new();
        for (id, _) in ids.iter().zip(&apply).filter(|(_, a)| **a) {
            let shard = Self::shard_of(id);
            if !guards.get(&shard).is_some_and(|m| m.contains_key(id)) {
                new_ids.insert(*id, shard);
            }
        }
        let mut new_per_shard: HashMap<usize, usize> = HashMap::new();
        for shard in new_ids.values() {
            *new_per_shard.entry(*shard).or_default() += 1;
        }
        for (shard, needed) in new_per_shard {
            let map = guards
                .get_mut(&shard)
                .ok_or_else(|| StoreError::Backend("shard not locked".into()))?;
            if map.len() + needed > self.per_shard_max {
                map.retain(|_, s| s.expires_ms > now);
                if map.len() + needed > self.per_shard_max {
                    return Err(StoreError::Full(self.per_shard_max * SHARDS));
                }
            }
        }

        // Phase 2: apply.
        for ((charge, id), (apply, u)) in charges.iter().zip(&ids).zip(apply.iter().zip(&mut usage))
        {
            if !apply {
                continue;
            }
            u.used = u.used.saturating_add(charge.cost);
            let w = charge.unit.window_of(now);
            let keep = match charge.algorithm {
                Algorithm::FixedWindow => 0,
                Algorithm::SlidingWindow => 1,
            };
            let map = guards
                .get_mut(&Self::shard_of(id))
                .ok_or_else(|| StoreError::Backend("shard not locked".into()))?;
            let slot = map.entry(*id).or_default();
            let (prev, cur) = slot.counts_at(w);
            *slot = Slot {
                window: w,
                count: cur.saturating_add(charge.cost),
                prev,
                expires_ms: slot.expires_ms.max(charge.unit.window_end(w + keep)),
            };
        }
        Ok(ChargeResult {
            applied: all_fit,
            usage: usage.into_iter().map(Some).collect(),
        })
    }
}

#[tonic::async_trait]
impl QuotaStore for MemoryStore {
    async fn charge(&self, charges: &[Charge]) -> Result<ChargeResult, StoreError> {
        self.charge_now(charges)
    }

    async fn reset(&self, key: &CounterKey) -> Result<(), StoreError> {
        let id = key.short();
        self.lock(Self::shard_of(&id)).remove(&id);
        Ok(())
    }

    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn put_record(
        &self,
        request_id: &str,
        record: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let now = self.clock.now_ms();
        let until = now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut map = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(request_id).is_some_and(|(_, u)| *u > now) {
            return Ok(false);
        }
        if insert_expiring(
            &mut map,
            request_id.to_string(),
            (record.to_string(), until),
            now,
            self.max_reservations,
            |v| v.1,
        ) {
            Ok(true)
        } else {
            Err(StoreError::Full(self.max_reservations))
        }
    }

    async fn get_record(&self, request_id: &str) -> Result<Option<String>, StoreError> {
        let now = self.clock.now_ms();
        let map = self.reservations.lock().unwrap_or_else(|p| p.into_inner());
        Ok(map
            .get(request_id)
            .filter(|(_, until)| *until > now)
            .map(|(r, _)| r.clone()))
    }

    async fn reserve(&self, r: &Reservation) -> Result<Reserved, StoreError> {
        let now = self.clock.now_ms();
        let mut pending = self.pending();
        self.sweep_locked(&mut pending, now, SWEEP_BATCH);
        let keep = r.kept();
        if keep
            && (pending.parts.contains_key(&r.request_id)
                || pending.done.get(&r.request_id).is_some_and(|&u| u > now))
        {
            return Ok(Reserved {
                applied: false,
                duplicate: true,
                usage: vec![None; r.charges.len() + r.slots.len()],
            });
        }
        if keep && pending.parts.len() >= self.max_reservations {
            return Err(StoreError::Full(self.max_reservations));
        }
        // Slots first: they are under this lock only, so checking them
        // before the (atomic) charge keeps the whole all-or-nothing.
        let mut slot_usage = Vec::with_capacity(r.slots.len());
        let mut slots_fit = true;
        for s in &r.slots {
            let used = pending.slots.get(&s.key.short()).copied().unwrap_or(0);
            let fit = fits(used, 1, s.limit);
            slots_fit &= fit || s.shadow;
            slot_usage.push(Usage {
                fits: fit,
                used,
                reset: SLOT_RETRY,
                window: 0,
            });
        }
        if !slots_fit {
            let mut usage = vec![None; r.charges.len()];
            usage.extend(slot_usage.into_iter().map(Some));
            return Ok(Reserved {
                applied: false,
                duplicate: false,
                usage,
            });
        }
        let charged = self.charge_now(&r.charges)?;
        let mut usage = charged.usage;
        if charged.applied {
            for (s, u) in r.slots.iter().zip(&mut slot_usage) {
                let n = pending.slots.entry(s.key.short()).or_default();
                *n += 1;
                u.used = *n;
            }
            if keep {
                let deadline = now.saturating_add(ms(r.ttl));
                let entries = r
                    .charges
                    .iter()
                    .zip(&r.budgets)
                    .zip(&usage)
                    .filter_map(|((c, b), u)| {
                        Some((c.key.clone(), u.as_ref()?.window, c.cost, b.clone()?))
                    })
                    .collect();
                pending.parts.insert(
                    r.request_id.clone(),
                    Part {
                        entries,
                        slots: r
                            .slots
                            .iter()
                            .map(|s| (s.key.clone(), s.rule.clone()))
                            .collect(),
                        model: r.model.clone(),
                        labels: r.labels.clone(),
                        price: r.price,
                        input_estimate: r.input_estimate,
                        deadline,
                    },
                );
                pending.due.insert((deadline, r.request_id.clone()));
            }
        }
        usage.extend(slot_usage.into_iter().map(Some));
        Ok(Reserved {
            applied: charged.applied,
            duplicate: false,
            usage,
        })
    }

    async fn settle(&self, request_id: &str, how: &SettleHow) -> Result<SettleReport, StoreError> {
        let now = self.clock.now_ms();
        let mut pending = self.pending();
        self.sweep_locked(&mut pending, now, SWEEP_BATCH);
        if pending.done.get(request_id).is_some_and(|&u| u > now) {
            return Ok(SettleReport::nothing(Settled::Already));
        }
        let Some(part) = pending.parts.remove(request_id) else {
            return Ok(SettleReport::nothing(Settled::Unknown));
        };
        pending.due.remove(&(part.deadline, request_id.to_string()));
        let report = self.apply_part(&mut pending, &part, how, |_| *how);
        // The marker lasts as long as a reservation could: a report retried
        // within the TTL finds it.
        let until = now.saturating_add(SETTLED_MARKER_MS);
        let max = self.max_reservations;
        insert_expiring(
            &mut pending.done,
            request_id.to_string(),
            until,
            now,
            max,
            |v| *v,
        );
        Ok(report)
    }

    async fn sweep(&self, max: usize) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut pending = self.pending();
        Ok(self.sweep_locked(&mut pending, now, max))
    }

    async fn in_flight(&self, key: &CounterKey) -> Result<u64, StoreError> {
        let now = self.clock.now_ms();
        let mut pending = self.pending();
        self.sweep_locked(&mut pending, now, usize::MAX);
        Ok(pending.slots.get(&key.short()).copied().unwrap_or(0))
    }
}

/// How long a settled marker is kept after a settlement (as on Redis): a
/// report retried within it finds the request settled.
const SETTLED_MARKER_MS: u64 = 3_600_000;

/// How long the marker of a reservation settled by its TTL fate is kept.
const MARKER_GRACE_MS: u64 = 60_000;

/// Expired reservations met by each reserve or settle, at most.
const SWEEP_BATCH: usize = 16;

/// `Retry-After` of a concurrency refusal: a slot frees when any request
/// ends, which cannot be known; clients are asked to wait a second.
pub const SLOT_RETRY: Duration = Duration::from_secs(1);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl MemoryStore {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        // Written whole under the lock; a poisoned lock is still consistent
        // enough to release slots and refund.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies the TTL fate of at most `max` due reservations.
    fn sweep_locked(&self, pending: &mut Pending, now: u64, max: usize) -> u64 {
        let mut n = 0;
        while n < max as u64 {
            let Some((deadline, id)) = pending.due.first().cloned() else {
                break;
            };
            if deadline > now {
                break;
            }
            pending.due.remove(&(deadline, id.clone()));
            if let Some(part) = pending.parts.remove(&id) {
                self.apply_part(pending, &part, &SettleHow::Keep, |b| match b.on_expiry {
                    Fate::Charge => SettleHow::Keep,
                    Fate::Release => SettleHow::Release,
                });
                let max = self.max_reservations;
                insert_expiring(
                    &mut pending.done,
                    id,
                    now.saturating_add(MARKER_GRACE_MS),
                    now,
                    max,
                    |v| *v,
                );
            }
            n += 1;
        }
        n
    }

    /// Replaces `part`'s reservation (each entry settled as `how_of` says)
    /// and releases its slots.
    fn apply_part(
        &self,
        pending: &mut Pending,
        part: &Part,
        how: &SettleHow,
        how_of: impl Fn(&super::reserve::Budget) -> SettleHow,
    ) -> SettleReport {
        let mut charged = Vec::with_capacity(part.entries.len());
        for (key, window, reserved, budget) in &part.entries {
            let how = how_of(budget);
            let actual = settled_amount(
                budget.measure,
                &how,
                part.input_estimate,
                part.price.as_ref(),
                *reserved,
            );
            let id = key.short();
            let mut shard = self.lock(Self::shard_of(&id));
            if let Some(slot) = shard.get_mut(&id) {
                // `actual - reserved` added, never below zero.
                let apply = |n: u64| {
                    if actual >= *reserved {
                        n.saturating_add(actual - reserved)
                    } else {
                        n.saturating_sub(reserved - actual)
                    }
                };
                if slot.window == *window {
                    slot.count = apply(slot.count);
                } else if slot.window == window + 1 {
                    // The window moved on: its count is the previous one
                    // now, which a sliding window still weighs.
                    slot.prev = apply(slot.prev);
                }
            }
            charged.push(Charged {
                rule: budget.rule.clone(),
                measure: budget.measure,
                amount: actual,
            });
        }
        let mut released = Vec::with_capacity(part.slots.len());
        for (key, rule) in &part.slots {
            if let Some(n) = pending.slots.get_mut(&key.short()) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    pending.slots.remove(&key.short());
                }
            }
            released.push(rule.clone());
        }
        let usage = match *how {
            SettleHow::Usage {
                input,
                output,
                cached,
            } => crate::usage::TokenUsage {
                input: input.or(part.input_estimate).unwrap_or(0),
                output,
                cached_input: cached,
            },
            _ => crate::usage::TokenUsage::default(),
        };
        SettleReport {
            settled: Settled::Now,
            model: part.model.clone(),
            labels: part.labels.clone(),
            charged,
            released,
            usage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quota::Unit;

    fn charge(key: &CounterKey, algorithm: Algorithm, cost: u64) -> Charge {
        Charge {
            key: key.clone(),
            limit: 10,
            unit: Unit::Minute,
            algorithm,
            cost,
            shadow: false,
            mode: ChargeMode::Admission,
        }
    }

    /// Ten at the end of one minute, then as many as admitted just after the
    /// boundary.
    fn admitted_across_boundary(algorithm: Algorithm) -> (u64, u64) {
        let clock = Arc::new(ManualClock::at(59_900));
        let store = MemoryStore::new(100, clock.clone());
        let key = CounterKey::new("t", &[("k".into(), "v".into())], "g");
        let mut before = 0;
        while store
            .charge_now(&[charge(&key, algorithm, 1)])
            .map(|r| r.applied)
            == Ok(true)
        {
            before += 1;
        }
        clock.advance(200);
        let mut after = 0;
        while after < 20
            && store
                .charge_now(&[charge(&key, algorithm, 1)])
                .map(|r| r.applied)
                == Ok(true)
        {
            after += 1;
        }
        (before, after)
    }

    #[test]
    fn fixed_window_admits_twice_the_limit_across_a_boundary_sliding_does_not() {
        assert_eq!(admitted_across_boundary(Algorithm::FixedWindow), (10, 10));
        let (before, after) = admitted_across_boundary(Algorithm::SlidingWindow);
        assert_eq!(before, 10);
        assert_eq!(
            after, 0,
            "0.2 s into the next minute the previous ten still count"
        );
    }

    #[test]
    fn sliding_window_frees_capacity_as_the_window_slides() {
        let clock = Arc::new(ManualClock::at(0));
        let store = MemoryStore::new(100, clock.clone());
        let key = CounterKey::new("t", &[("k".into(), "v".into())], "g");
        for _ in 0..10 {
            assert_eq!(
                store
                    .charge_now(&[charge(&key, Algorithm::SlidingWindow, 1)])
                    .map(|r| r.applied),
                Ok(true)
            );
        }
        clock.advance(90_000); // half-way through the next minute
        let mut admitted = 0;
        while store
            .charge_now(&[charge(&key, Algorithm::SlidingWindow, 1)])
            .map(|r| r.applied)
            == Ok(true)
        {
            admitted += 1;
        }
        assert_eq!(admitted, 5);
    }

    #[test]
    fn a_full_store_refuses_new_counters_and_sweeps_expired_ones() {
        let clock = Arc::new(ManualClock::at(0));
        let store = MemoryStore::new(SHARDS, clock.clone()); // one counter per shard
        let mut refused = 0;
        for i in 0..(SHARDS * 4) {
            let key = CounterKey::new("t", &[("k".into(), i.to_string())], "g");
            match store.charge_now(&[charge(&key, Algorithm::FixedWindow, 1)]) {
                Ok(r) => assert!(r.applied),
                Err(StoreError::Full(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(refused > 0, "the bound holds");
        assert!(store.len() <= SHARDS);
        clock.advance(120_000); // every window has expired
        let key = CounterKey::new("t", &[("k".into(), "late".into())], "g");
        assert_eq!(
            store
                .charge_now(&[charge(&key, Algorithm::FixedWindow, 1)])
                .map(|r| r.applied),
            Ok(true)
        );
    }

    #[test]
    fn calendar_months_end_on_the_first_of_the_next() {
        // 2024-02-29T12:00:00Z: twelve hours before March.
        let clock = Arc::new(ManualClock::at(1_709_208_000_000));
        let store = MemoryStore::new(100, clock.clone());
        let key = CounterKey::new("t", &[("k".into(), "v".into())], "g");
        let mut c = charge(&key, Algorithm::FixedWindow, 1);
        c.unit = Unit::CalendarMonth;
        c.limit = 2;
        let one = std::slice::from_ref(&c);
        assert_eq!(store.charge_now(one).map(|r| r.applied), Ok(true));
        assert_eq!(store.charge_now(one).map(|r| r.applied), Ok(true));
        let r = store.charge_now(one).expect("answers");
        assert!(!r.applied);
        let reset = r.usage[0].expect("usage").reset;
        assert_eq!(reset, Duration::from_secs(12 * 3600));
        clock.advance(12 * 3600 * 1000 - 1);
        assert_eq!(store.charge_now(one).map(|r| r.applied), Ok(false));
        clock.advance(1); // March 1st, 00:00 UTC
        assert_eq!(store.charge_now(one).map(|r| r.applied), Ok(true));
    }
}
