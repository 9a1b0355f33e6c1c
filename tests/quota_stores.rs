//! One contract, every store: the in-memory store, Redis and a three-master
//! Redis Cluster (real servers started by the tests) must give the same
//! answers.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::{RedisCluster, RedisServer, eventually};
use tollgate::quota::memory::{MemoryStore, SystemClock};
use tollgate::quota::redis::{RedisStore, Target};
use tollgate::quota::{Algorithm, Charge, CounterKey, QuotaStore, Unit};

/// Keeps whatever backs a store alive for the test.
enum Backing {
    None,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

async fn memory() -> (Arc<dyn QuotaStore>, Backing) {
    (
        Arc::new(MemoryStore::new(100_000, Arc::new(SystemClock))),
        Backing::None,
    )
}

async fn connected(store: RedisStore) -> Arc<RedisStore> {
    let store = Arc::new(store);
    let s = store.clone();
    assert!(
        eventually(Duration::from_secs(10), || {
            let s = s.clone();
            async move { s.connected() }
        })
        .await,
        "store did not connect"
    );
    store
}

async fn redis() -> (Arc<dyn QuotaStore>, Backing) {
    let server = RedisServer::start();
    let store = RedisStore::connect(
        Target::Standalone(server.url()),
        "t:",
        Duration::from_millis(500),
    )
    .expect("store");
    (connected(store).await, Backing::Redis(server))
}

async fn cluster() -> (Arc<dyn QuotaStore>, Backing) {
    let cluster = RedisCluster::start();
    let store = RedisStore::connect(
        Target::Cluster(cluster.urls()),
        "t:",
        Duration::from_millis(500),
    )
    .expect("store");
    (connected(store).await, Backing::Cluster(cluster))
}

fn key(name: &str, group: &str) -> CounterKey {
    CounterKey::new("test", &[("k".to_string(), name.to_string())], group)
}

fn charge(k: &CounterKey, limit: u64, cost: u64) -> Charge {
    Charge {
        key: k.clone(),
        limit,
        unit: Unit::Hour,
        algorithm: Algorithm::FixedWindow,
        cost,
        shadow: false,
    }
}

async fn used(store: &dyn QuotaStore, k: &CounterKey) -> u64 {
    let r = store
        .charge(&[charge(k, u64::MAX >> 12, 0)])
        .await
        .expect("peek");
    r.usage[0].used
}

async fn counts_exactly_to_the_limit(store: Arc<dyn QuotaStore>) {
    let k = key("exact", "g");
    for i in 0..5 {
        let r = store.charge(&[charge(&k, 5, 1)]).await.expect("charge");
        assert!(r.applied, "charge {i} of 5");
        assert_eq!(r.usage[0].used, i + 1);
        assert_eq!(r.usage[0].remaining(5), 4 - i);
    }
    let r = store.charge(&[charge(&k, 5, 1)]).await.expect("charge");
    assert!(!r.applied && !r.usage[0].fits);
    assert_eq!(
        used(&*store, &k).await,
        5,
        "a refused charge consumes nothing"
    );
    assert!(r.usage[0].reset <= Duration::from_secs(3600));
}

async fn all_or_nothing(store: Arc<dyn QuotaStore>) {
    let tenant = key("tenant", "acme");
    let api_key = key("key", "acme");
    let group = |t, k| [charge(&tenant, 2, t), charge(&api_key, 10, k)];
    assert!(store.charge(&group(1, 1)).await.expect("1").applied);
    assert!(store.charge(&group(1, 1)).await.expect("2").applied);
    let blocked = store.charge(&group(1, 1)).await.expect("3");
    assert!(!blocked.applied, "the tenant limit blocks");
    assert!(!blocked.usage[0].fits && blocked.usage[1].fits);
    assert_eq!(
        used(&*store, &api_key).await,
        2,
        "the key limit was not charged by the blocked request"
    );
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

macro_rules! contract {
    ($($store:ident),*) => {
        mod contract {
            $(
                mod $store {
                    macro_rules! case {
                        ($name:ident) => {
                            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                            async fn $name() {
                                let (store, _backing) = super::super::$store().await;
                                super::super::$name(store).await;
                            }
                        };
                    }
                    case!(counts_exactly_to_the_limit);
                    case!(all_or_nothing);
                    case!(shadow_counts_but_never_blocks);
                    case!(zero_cost_only_checks_and_huge_cost_saturates);
                    case!(exact_under_concurrency);
                    case!(reset_forgets);
                    case!(sliding_window_counts_within_the_window);
                }
            )*
        }
    };
}

contract!(memory, redis, cluster);

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
    store
        .charge(&[charge(&k, 100, 1), sliding])
        .await
        .expect("charge");
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
    for c in &mixed[..5] {
        assert_eq!(
            used(&*store, &c.key).await,
            0,
            "a refused cross-slot charge is refunded"
        );
    }
}
