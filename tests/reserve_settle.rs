//! Reserve and settle, one contract for every store (memory, Redis, Redis
//! Cluster — real servers): a reservation charges its budgets and takes its
//! concurrency slots all-or-nothing; settling replaces it with the actual
//! usage exactly once, releases the slots and never lets a count go below
//! zero; a reservation never settled meets its TTL fate.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use support::eventually;
use support::stores::{charge, used};
use tollgate::quota::reserve::{Budget, Fate};
use tollgate::quota::rules::Cost;
use tollgate::quota::{CounterKey, QuotaStore, Reservation, SettleHow, Settled, Slot};
use tollgate::usage::{Price, TokenUsage};

fn key(name: &str) -> CounterKey {
    // One tenant, one slot group, as the quota rules key them.
    CounterKey::new(
        "test",
        &[("k".to_string(), name.to_string())],
        "tenant:acme",
    )
}

/// A reservation of `tokens` against budget `k` (limit `limit`) and, when
/// given, one slot of `slot` (limit `slots`).
fn reservation(
    id: &str,
    k: &CounterKey,
    limit: u64,
    tokens: u64,
    slot: Option<(&CounterKey, u64)>,
    ttl: Duration,
    on_expiry: Fate,
) -> Reservation {
    Reservation {
        request_id: id.to_string(),
        charges: vec![charge(k, limit, tokens)],
        budgets: vec![Some(Budget {
            rule: "tpm".into(),
            measure: Cost::Tokens,
            on_expiry,
        })],
        slots: slot
            .map(|(k, limit)| Slot {
                key: k.clone(),
                limit,
                shadow: false,
                rule: "inflight".into(),
            })
            .into_iter()
            .collect(),
        model: Some("m".into()),
        labels: Default::default(),
        price: None,
        input_estimate: Some(100),
        ttl,
    }
}

fn by_usage(input: u64, output: u64) -> SettleHow {
    SettleHow::Usage {
        input: Some(input),
        output,
        cached: 0,
    }
}

const MINUTE: Duration = Duration::from_secs(60);

/// Reserve 600, settle 150: the unused 450 is refunded, the slot released,
/// and a second report changes nothing.
async fn settle_replaces_the_reservation_once(store: Arc<dyn QuotaStore>) {
    let (k, s) = (key("budget"), key("slots"));
    let r = reservation("a", &k, 1000, 600, Some((&s, 2)), MINUTE, Fate::Charge);
    let reserved = store.reserve(&r).await.expect("reserve");
    assert!(reserved.applied && !reserved.duplicate);
    assert_eq!(reserved.usage.len(), 2);
    assert_eq!(reserved.usage[1].expect("slot").used, 1);
    assert_eq!(used(&*store, &k).await, 600);
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 1);
    let report = store.settle("a", &by_usage(100, 50)).await.expect("settle");
    assert_eq!(report.settled, Settled::Now);
    assert_eq!(report.charged.len(), 1);
    assert_eq!(report.charged[0].amount, 150);
    assert_eq!(report.released, vec!["inflight".to_string()]);
    assert_eq!(used(&*store, &k).await, 150);
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 0);
    for how in [by_usage(100, 50), by_usage(1, 1), SettleHow::Release] {
        let again = store.settle("a", &how).await.expect("again");
        assert_eq!(again.settled, Settled::Already);
    }
    assert_eq!(
        used(&*store, &k).await,
        150,
        "a duplicate report changes nothing"
    );
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 0);
    let unknown = store
        .settle("never", &by_usage(1, 1))
        .await
        .expect("unknown");
    assert_eq!(unknown.settled, Settled::Unknown);
}

/// Usage past the reservation is charged in full, even past the limit; a
/// refund never takes a count below zero; the input the response did not
/// report is the estimate kept at admission.
async fn excess_is_charged_and_counts_never_go_negative(store: Arc<dyn QuotaStore>) {
    let k = key("excess");
    let r = reservation("x", &k, 1000, 100, None, MINUTE, Fate::Charge);
    assert!(store.reserve(&r).await.expect("reserve").applied);
    store
        .settle("x", &by_usage(100, 1900))
        .await
        .expect("settle");
    assert_eq!(
        used(&*store, &k).await,
        2000,
        "excess charged past the limit"
    );
    let est = reservation("est", &key("est"), 10_000, 900, None, MINUTE, Fate::Charge);
    assert!(store.reserve(&est).await.expect("reserve").applied);
    let how = SettleHow::Usage {
        input: None,
        output: 7,
        cached: 0,
    };
    let report = store.settle("est", &how).await.expect("settle");
    assert_eq!(
        report.charged[0].amount, 107,
        "input from the estimate (100)"
    );
    assert_eq!(used(&*store, &key("est")).await, 107);
    let low = key("low");
    let r = reservation("y", &low, 1000, 600, None, MINUTE, Fate::Charge);
    assert!(store.reserve(&r).await.expect("reserve").applied);
    store.reset(&low).await.expect("reset");
    assert!(
        store
            .charge(&[charge(&low, 1000, 10)])
            .await
            .expect("charge")
            .applied
    );
    store
        .settle("y", &SettleHow::Release)
        .await
        .expect("settle");
    assert_eq!(used(&*store, &low).await, 0, "never below zero");
}

/// Two slots: a third request is refused and charged nothing (its budget
/// untouched); when one settles, the next is admitted.
async fn concurrency_is_all_or_nothing(store: Arc<dyn QuotaStore>) {
    let (k, s) = (key("c-budget"), key("c-slots"));
    for id in ["c1", "c2"] {
        let r = reservation(id, &k, 10_000, 10, Some((&s, 2)), MINUTE, Fate::Charge);
        assert!(store.reserve(&r).await.expect("reserve").applied);
    }
    let third = reservation("c3", &k, 10_000, 10, Some((&s, 2)), MINUTE, Fate::Charge);
    let refused = store.reserve(&third).await.expect("reserve");
    assert!(!refused.applied);
    let slot = refused.usage[1].expect("the slot was asked");
    assert!(!slot.fits);
    assert_eq!(slot.used, 2);
    assert_eq!(
        used(&*store, &k).await,
        20,
        "the refused request charged nothing"
    );
    assert_eq!(
        store
            .settle("c3", &by_usage(1, 1))
            .await
            .expect("settle")
            .settled,
        Settled::Unknown
    );
    store.settle("c1", &by_usage(5, 0)).await.expect("settle");
    assert!(store.reserve(&third).await.expect("reserve").applied);
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 2);
}

/// A request id already reserved (or settled) charges nothing again.
async fn a_reused_request_id_charges_nothing(store: Arc<dyn QuotaStore>) {
    let (k, s) = (key("dup"), key("dup-slots"));
    let r = reservation("d", &k, 1000, 10, Some((&s, 5)), MINUTE, Fate::Charge);
    assert!(store.reserve(&r).await.expect("reserve").applied);
    let again = store.reserve(&r).await.expect("reserve again");
    assert!(again.duplicate && !again.applied);
    assert_eq!(used(&*store, &k).await, 10);
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 1);
    store.settle("d", &by_usage(1, 1)).await.expect("settle");
    assert!(store.reserve(&r).await.expect("after settle").duplicate);
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 0);
}

/// Never settled: past the TTL the slot is released and each budget meets
/// its fate (`charge` keeps, `release` refunds); a late report is ignored.
async fn ttl_fate_applies_once(store: Arc<dyn QuotaStore>) {
    let (kept, freed, s) = (key("ttl-kept"), key("ttl-freed"), key("ttl-slots"));
    let ttl = Duration::from_millis(1000);
    let a = reservation("t1", &kept, 1000, 300, Some((&s, 1)), ttl, Fate::Charge);
    let b = reservation("t2", &freed, 1000, 300, None, ttl, Fate::Release);
    assert!(store.reserve(&a).await.expect("reserve").applied);
    assert!(store.reserve(&b).await.expect("reserve").applied);
    let blocked = reservation("t3", &kept, 1000, 1, Some((&s, 1)), ttl, Fate::Charge);
    assert!(
        !store.reserve(&blocked).await.expect("reserve").applied,
        "the slot is taken"
    );
    let s2 = store.clone();
    let k2 = s.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let (store, k) = (s2.clone(), k2.clone());
            async move { store.in_flight(&k).await.ok() == Some(0) }
        })
        .await,
        "the slot is released after the TTL"
    );
    // t2 was reserved a moment after t1: its TTL passes a moment later.
    let (s3, f3) = (store.clone(), freed.clone());
    assert!(
        eventually(Duration::from_secs(10), || {
            let (store, k) = (s3.clone(), f3.clone());
            async move {
                store.sweep(100).await.expect("sweep");
                used(&*store, &k).await == 0
            }
        })
        .await,
        "release: refunded"
    );
    assert_eq!(
        used(&*store, &kept).await,
        300,
        "charge: the reservation stays"
    );
    for id in ["t1", "t2"] {
        let late = store.settle(id, &by_usage(1, 1)).await.expect("late");
        assert_ne!(late.settled, Settled::Now, "{id}: settled once, by its TTL");
    }
    assert_eq!(used(&*store, &kept).await, 300);
    assert!(store.reserve(&blocked).await.expect("reserve").applied);
}

/// Dollars settle from the price kept with the reservation, exactly as
/// `Price::cost_micros` computes them (the Lua mirrors it).
async fn dollars_settle_by_the_kept_price(store: Arc<dyn QuotaStore>) {
    let price = Price {
        input: 0.15,
        output: 0.6,
        cached_input: Some(0.075),
        above_input_tokens: Some(1000),
        input_above: Some(0.3),
        output_above: None,
    };
    for (i, (input, output, cached)) in [(300, 200, 0), (1500, 77, 1000), (999, 1, 3)]
        .into_iter()
        .enumerate()
    {
        let k = key(&format!("usd-{i}"));
        let id = format!("usd-{i}");
        let mut r = reservation(&id, &k, 10_000_000, 5000, None, MINUTE, Fate::Charge);
        r.budgets[0] = Some(Budget {
            rule: "usd".into(),
            measure: Cost::Usd,
            on_expiry: Fate::Charge,
        });
        r.price = Some(price);
        assert!(store.reserve(&r).await.expect("reserve").applied);
        let how = SettleHow::Usage {
            input: Some(input),
            output,
            cached,
        };
        let report = store.settle(&id, &how).await.expect("settle");
        let want = price.cost_micros(&TokenUsage {
            input,
            output,
            cached_input: cached,
        });
        assert_eq!(report.charged[0].amount, want, "case {i}");
        assert_eq!(used(&*store, &k).await, want);
    }
}

/// 64 requests at once, 4 slots: never more than 4 admitted-and-unsettled,
/// every admitted one settled once (each reported twice), and the budget's
/// count equals the sum of what was actually used.
async fn exact_under_concurrent_reserve_and_settle(store: Arc<dyn QuotaStore>) {
    let (k, s) = (key("exact"), key("exact-slots"));
    let in_flight = Arc::new(AtomicI64::new(0));
    let peak = Arc::new(AtomicI64::new(0));
    let charged = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..64u64 {
        let (store, k, s) = (store.clone(), k.clone(), s.clone());
        let (in_flight, peak, charged) = (in_flight.clone(), peak.clone(), charged.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("e{i}");
            loop {
                let r = reservation(
                    &id,
                    &k,
                    u64::MAX >> 12,
                    500,
                    Some((&s, 4)),
                    MINUTE,
                    Fate::Charge,
                );
                let reserved = store.reserve(&r).await.expect("reserve");
                if !reserved.applied {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    continue;
                }
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(3)).await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                let (input, output) = (10 + i, 3 * i);
                let first = store
                    .settle(&id, &by_usage(input, output))
                    .await
                    .expect("settle");
                assert_eq!(first.settled, Settled::Now);
                let again = store
                    .settle(&id, &by_usage(input, output))
                    .await
                    .expect("retry");
                assert_eq!(again.settled, Settled::Already);
                charged.fetch_add(input + output, Ordering::SeqCst);
                return;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert!(
        peak.load(Ordering::SeqCst) <= 4,
        "peak {}",
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(used(&*store, &k).await, charged.load(Ordering::SeqCst));
    assert_eq!(store.in_flight(&s).await.expect("in flight"), 0);
}

contract!(
    settle_replaces_the_reservation_once,
    excess_is_charged_and_counts_never_go_negative,
    concurrency_is_all_or_nothing,
    a_reused_request_id_charges_nothing,
    ttl_fate_applies_once,
    dollars_settle_by_the_kept_price,
    exact_under_concurrent_reserve_and_settle,
);
