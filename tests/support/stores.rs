//! The stores a contract runs against — in memory, a real Redis and a real
//! three-master Redis Cluster started by the test — and `contract!`, which
//! runs each named behaviour against every one of them.

use std::sync::Arc;
use std::time::Duration;

use super::{RedisCluster, RedisServer, eventually};
use tollgate::metrics::StoreMetrics;
use tollgate::quota::memory::{MemoryStore, SystemClock};
use tollgate::quota::redis::{RedisStore, Target};
use tollgate::quota::{Algorithm, Charge, ChargeMode, CounterKey, QuotaStore, Unit};

/// Keeps whatever backs a store alive for the test.
pub enum Backing {
    None,
    Redis(RedisServer),
    Cluster(RedisCluster),
}

pub async fn memory() -> (Arc<dyn QuotaStore>, Backing) {
    (
        Arc::new(MemoryStore::new(100_000, Arc::new(SystemClock))),
        Backing::None,
    )
}

/// Waits (bounded) until `store` has a connection.
pub async fn connected(store: RedisStore) -> Arc<RedisStore> {
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

/// A store on `target` (connected).
pub async fn redis_store(target: Target) -> Arc<RedisStore> {
    let store = RedisStore::connect(
        target,
        "t:",
        Duration::from_millis(500),
        Arc::new(StoreMetrics::default()),
    )
    .expect("store");
    connected(store).await
}

pub async fn redis() -> (Arc<dyn QuotaStore>, Backing) {
    let server = RedisServer::start();
    let store = redis_store(Target::Standalone(server.url())).await;
    (store, Backing::Redis(server))
}

pub async fn cluster() -> (Arc<dyn QuotaStore>, Backing) {
    let cluster = RedisCluster::start();
    let store = redis_store(Target::Cluster(cluster.urls())).await;
    (store, Backing::Cluster(cluster))
}

/// An hourly fixed-window admission charge.
pub fn charge(k: &CounterKey, limit: u64, cost: u64) -> Charge {
    Charge {
        key: k.clone(),
        limit,
        unit: Unit::Hour,
        algorithm: Algorithm::FixedWindow,
        cost,
        shadow: false,
        mode: ChargeMode::Admission,
    }
}

/// What counter `k` holds now (a zero-cost check under a huge limit).
pub async fn used(store: &dyn QuotaStore, k: &CounterKey) -> u64 {
    let r = store
        .charge(&[charge(k, u64::MAX >> 12, 0)])
        .await
        .expect("peek");
    r.usage[0].expect("the store reported this counter").used
}

/// `contract!(case, …)`: one test per case and store (memory, redis,
/// cluster), each `case(store: Arc<dyn QuotaStore>)` an async fn of the
/// invoking test file.
#[macro_export]
macro_rules! contract {
    ($($case:ident),* $(,)?) => {
        mod contract {
            $crate::contract!(@store memory; $($case),*);
            $crate::contract!(@store redis; $($case),*);
            $crate::contract!(@store cluster; $($case),*);
        }
    };
    (@store $store:ident; $($case:ident),*) => {
        mod $store {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let (store, _backing) = $crate::support::stores::$store().await;
                    super::super::$case(store).await;
                }
            )*
        }
    };
}
