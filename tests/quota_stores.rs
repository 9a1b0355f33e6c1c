//! One contract, every store: the in-memory store, Redis and a three-master
//! Redis Cluster (real servers started by the tests) must give the same
//! answers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::stores::{Backing, charge, cluster, redis, used};
use tollgate::quota::{Algorithm, Charge, ChargeMode, CounterKey, QuotaStore, Unit, Usage};

/// The usage a store reported for charge `i`.
fn u(r: &tollgate::quota::ChargeResult, i: usize) -> Usage {
    r.usage[i].expect("the store reported this counter")
}

fn key(name: &str, group: &str) -> CounterKey {
    CounterKey::new("test", &[("k".to_string(), name.to_string())], group)
}

async fn counts_exactly_to_the_limit(store: Arc<dyn QuotaStore>) {
    let k = key("exact", "g");
    for i in 0..5 {
        let r = store.charge(&[charge(&k, 5, 1)]).await.expect("charge");
        assert!(r.applied, "charge {i} of 5");
        assert_eq!(u(&r, 0).used, i + 1);
        assert_eq!(u(&r, 0).remaining(5), 4 - i);
    }
    let r = store.charge(&[charge(&k, 5, 1)]).await.expect("charge");
    assert!(!r.applied && !u(&r, 0).fits);
    assert_eq!(
        used(&*store, &k).await,
        5,
        "a refused charge consumes nothing"
    );
    assert!(u(&r, 0).reset <= Duration::from_secs(3600));
}

async fn all_or_nothing(store: Arc<dyn QuotaStore>) {
    let tenant = key("tenant", "acme");
    let api_key = key("key", "acme");
    let group = |t, k| [charge(&tenant, 2, t), charge(&api_key, 10, k)];
    assert!(store.charge(&group(1, 1)).await.expect("1").applied);
    assert!(store.charge(&group(1, 1)).await.expect("2").applied);
    let blocked = store.charge(&group(1, 1)).await.expect("3");
    assert!(!blocked.applied, "the tenant limit blocks");
    assert!(!u(&blocked, 0).fits && u(&blocked, 1).fits);
    assert_eq!(
        used(&*store, &api_key).await,
        2,
        "the key limit was not charged by the blocked request"
    );
}

/// One counter charged twice in one call: the second charge sees the first,
/// and a refusal takes back both.
async fn one_counter_twice_in_one_call(store: Arc<dyn QuotaStore>) {
    let k = key("twice", "g");
    let r = store
        .charge(&[charge(&k, 3, 2), charge(&k, 3, 2)])
        .await
        .expect("charge");
    assert!(!r.applied && u(&r, 0).fits && !u(&r, 1).fits);
    assert_eq!(
        used(&*store, &k).await,
        0,
        "a refused call consumes nothing"
    );
    let r = store
        .charge(&[charge(&k, 3, 1), charge(&k, 3, 2)])
        .await
        .expect("charge");
    assert!(r.applied && u(&r, 1).fits);
    assert_eq!(used(&*store, &k).await, 3);
}

async fn shadow_counts_but_never_blocks(store: Arc<dyn QuotaStore>) {
    let k = key("shadow", "g");
    let mut c = charge(&k, 1, 1);
    c.shadow = true;
    for _ in 0..3 {
        let r = store
            .charge(std::slice::from_ref(&c))
            .await
            .expect("charge");
        assert!(r.applied);
    }
    assert_eq!(used(&*store, &k).await, 3);
}

async fn zero_cost_only_checks_and_huge_cost_saturates(store: Arc<dyn QuotaStore>) {
    let k = key("check", "g");
    for _ in 0..3 {
        assert!(
            store
                .charge(&[charge(&k, 1, 0)])
                .await
                .expect("check")
                .applied
        );
    }
    assert_eq!(used(&*store, &k).await, 0);
    let r = store
        .charge(&[charge(&k, 10, u64::MAX)])
        .await
        .expect("huge");
    assert!(!r.applied, "u64::MAX hits cannot fit");
    assert_eq!(used(&*store, &k).await, 0);
}

async fn exact_under_concurrency(store: Arc<dyn QuotaStore>) {
    let k = key("concurrent", "g");
    let mut tasks = Vec::new();
    for _ in 0..64 {
        let (store, k) = (store.clone(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0u64;
            for _ in 0..20 {
                if store
                    .charge(&[charge(&k, 500, 1)])
                    .await
                    .expect("charge")
                    .applied
                {
                    ok += 1;
                }
            }
            ok
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    assert_eq!(total, 500, "64 x 20 attempts on a limit of 500");
}

async fn reset_forgets(store: Arc<dyn QuotaStore>) {
    let k = key("reset", "g");
    assert!(
        store
            .charge(&[charge(&k, 1, 1)])
            .await
            .expect("charge")
            .applied
    );
    assert!(
        !store
            .charge(&[charge(&k, 1, 1)])
            .await
            .expect("charge")
            .applied
    );
    store.reset(&k).await.expect("reset");
    assert!(
        store
            .charge(&[charge(&k, 1, 1)])
            .await
            .expect("charge")
            .applied
    );
}

async fn sliding_window_counts_within_the_window(store: Arc<dyn QuotaStore>) {
    let k = key("sliding", "g");
    let mut c = charge(&k, 3, 1);
    c.algorithm = Algorithm::SlidingWindow;
    for _ in 0..3 {
        assert!(
            store
                .charge(std::slice::from_ref(&c))
                .await
                .expect("charge")
                .applied
        );
    }
    assert!(
        !store
            .charge(std::slice::from_ref(&c))
            .await
            .expect("charge")
            .applied
    );
}

/// Usage that already happened (`charge: always`) is counted in full past the
/// limit, even when an admission limit of the same request refuses; the
/// answer is over once the count passes the limit, and a check then refuses.
async fn usage_is_recorded_past_the_limit(store: Arc<dyn QuotaStore>) {
    let k = key("usage", "g");
    let usage = |cost| Charge {
        mode: ChargeMode::Always,
        ..charge(&k, 1000, cost)
    };
    let r = store.charge(&[usage(900)]).await.expect("900");
    assert!(r.applied && u(&r, 0).fits);
    assert_eq!(u(&r, 0).remaining(1000), 100);
    let r = store.charge(&[usage(500)]).await.expect("500");
    assert!(!u(&r, 0).fits, "1400 of 1000 is over");
    assert_eq!(used(&*store, &k).await, 1400, "all 500 were recorded");
    let r = store.charge(&[usage(0)]).await.expect("check");
    assert!(!u(&r, 0).fits, "a check after the budget is spent refuses");
    // Beside a refusing admission limit, usage is still recorded.
    let door = key("door", "g");
    let r = store
        .charge(&[charge(&door, 0, 1), usage(7)])
        .await
        .expect("mixed");
    assert!(!r.applied);
    assert_eq!(used(&*store, &k).await, 1407);
    assert_eq!(used(&*store, &door).await, 0);
}

/// A limit of 0 refuses everything, checks included (a block list).
async fn zero_limit_refuses_everything(store: Arc<dyn QuotaStore>) {
    let k = key("blocked", "g");
    for cost in [1, 0, 5] {
        let r = store.charge(&[charge(&k, 0, cost)]).await.expect("charge");
        assert!(!r.applied && !u(&r, 0).fits, "cost {cost}");
    }
    assert_eq!(used(&*store, &k).await, 0);
}

/// Week, month and year windows count like the others.
async fn long_units_count(store: Arc<dyn QuotaStore>) {
    for unit in [Unit::Week, Unit::Month, Unit::Year] {
        let k = key(&format!("long-{unit:?}"), "g");
        let c = Charge {
            unit,
            ..charge(&k, 2, 1)
        };
        let c = std::slice::from_ref(&c);
        assert!(store.charge(c).await.expect("1").applied);
        assert!(store.charge(c).await.expect("2").applied);
        let r = store.charge(c).await.expect("3");
        assert!(!r.applied, "{unit:?}");
        assert!(u(&r, 0).reset <= Duration::from_millis(unit.millis()));
    }
}

/// Calendar months (UTC) reset on the first of the next month, whatever the
/// month's length, for fixed and sliding windows alike.
async fn calendar_months_reset_on_the_first(store: Arc<dyn QuotaStore>) {
    let now = time::OffsetDateTime::now_utc();
    let (y, m) = match now.month() {
        time::Month::December => (now.year() + 1, time::Month::January),
        m => (now.year(), m.next()),
    };
    let next = time::Date::from_calendar_date(y, m, 1)
        .expect("date")
        .midnight()
        .assume_utc();
    let until_next = Duration::try_from(next - now).expect("positive");
    for algorithm in [Algorithm::FixedWindow, Algorithm::SlidingWindow] {
        let k = key(&format!("calendar-{algorithm:?}"), "g");
        let c = Charge {
            unit: Unit::CalendarMonth,
            algorithm,
            ..charge(&k, 2, 1)
        };
        let c = std::slice::from_ref(&c);
        assert!(store.charge(c).await.expect("1").applied);
        assert!(store.charge(c).await.expect("2").applied);
        let r = store.charge(c).await.expect("3");
        assert!(!r.applied, "{algorithm:?}");
        let reset = u(&r, 0).reset;
        // The store's clock and this one may differ by the time the calls
        // took; a 30-day step would be days off.
        let off = reset.abs_diff(until_next);
        assert!(
            off < Duration::from_secs(60),
            "{algorithm:?}: {reset:?} vs {until_next:?}"
        );
    }
}

/// Records (the lockout's locks): the first one kept stays, and reads back.
async fn keeps_the_first_record(store: Arc<dyn QuotaStore>) {
    let ttl = Duration::from_secs(60);
    assert!(
        store
            .put_record("req-1", "{\"record\":1}", ttl)
            .await
            .expect("put")
    );
    assert!(
        !store
            .put_record("req-1", "{\"record\":2}", ttl)
            .await
            .expect("put again"),
        "the first record stays"
    );
    assert_eq!(
        store.get_record("req-1").await.expect("get").as_deref(),
        Some("{\"record\":1}")
    );
    assert_eq!(store.get_record("req-2").await.expect("get"), None);
}

contract!(
    counts_exactly_to_the_limit,
    all_or_nothing,
    shadow_counts_but_never_blocks,
    zero_cost_only_checks_and_huge_cost_saturates,
    exact_under_concurrency,
    reset_forgets,
    sliding_window_counts_within_the_window,
    usage_is_recorded_past_the_limit,
    zero_limit_refuses_everything,
    long_units_count,
    calendar_months_reset_on_the_first,
    keeps_the_first_record,
    one_counter_twice_in_one_call,
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_always_carry_a_ttl_and_no_raw_values() {
    let (store, backing) = redis().await;
    let Backing::Redis(server) = backing else {
        unreachable!()
    };
    let secret = "tg_live_do_not_leak";
    let k = CounterKey::new("test", &[("api_key".into(), secret.into())], "g");
    let mut sliding = charge(&k, 100, 1);
    sliding.algorithm = Algorithm::SlidingWindow;
    sliding.unit = Unit::Minute;
    // Later charges of a fixed window skip setting the expiry again (the
    // first one set it): every charge must leave every key with one.
    for _ in 0..3 {
        store
            .charge(&[charge(&k, 100, 1), sliding.clone()])
            .await
            .expect("charge");
    }
    assert_eq!(used(store.as_ref(), &k).await, 3);
    let keys = server.cli(&["--scan"]);
    assert!(!keys.trim().is_empty());
    for k in keys.lines() {
        assert!(!k.contains(secret), "{k}");
        let ttl: i64 = server.cli(&["pttl", k]).trim().parse().expect("pttl");
        assert!(ttl > 0, "{k} has no TTL ({ttl})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_group_shares_one_slot() {
    let (store, backing) = cluster().await;
    let Backing::Cluster(cluster) = backing else {
        unreachable!()
    };
    let charges: Vec<Charge> = (0..8)
        .map(|i| charge(&key(&format!("k{i}"), "tenant-acme"), 10, 1))
        .collect();
    let r = store.charge(&charges).await.expect("charge");
    assert!(r.applied);
    let keys = cluster.keys();
    assert_eq!(keys.len(), 8);
    let nodes: std::collections::HashSet<u16> = keys.iter().map(|(p, _)| *p).collect();
    assert_eq!(nodes.len(), 1, "one group, one slot, one node: {keys:?}");
    // Other groups spread over the nodes and are still counted all-or-nothing.
    let spread: Vec<Charge> = (0..6)
        .map(|i| charge(&key("x", &format!("group-{i}")), 1, 1))
        .collect();
    assert!(store.charge(&spread).await.expect("spread").applied);
    // Five fresh groups that fit, then one whose counter is spent: the five
    // are charged first, then refunded.
    let mut mixed: Vec<Charge> = (0..5)
        .map(|i| charge(&key("fresh", &format!("group-{i}")), 10, 1))
        .collect();
    mixed.push(spread[5].clone());
    let blocked = store.charge(&mixed).await.expect("blocked");
    assert!(!blocked.applied);
    for (i, r) in blocked.usage.iter().enumerate() {
        // Each group is asked in turn until one refuses: what was asked is
        // reported as it stands after the refund, what was not is unknown —
        // never a made-up count.
        if let Some(r) = r {
            assert!(i == 5 || r.used == 0, "{i}: {r:?}");
        }
    }
    for c in &mixed[..5] {
        assert_eq!(
            used(&*store, &c.key).await,
            0,
            "a refused cross-slot charge is refunded"
        );
    }
}
