//! Memory per counter in the in-memory quota store: resident memory before
//! and after charging 1,000,000 distinct counters once each.
//!
//!     cargo bench --bench quota_memory

use std::sync::Arc;

use tollgate::quota::memory::{MemoryStore, SystemClock};
use tollgate::quota::{Algorithm, Charge, CounterKey, QuotaStore, Unit};

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    const N: usize = 1_000_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    // Keys are made up front so that only the store's growth is measured.
    let keys: Vec<CounterKey> = (0..N)
        .map(|i| CounterKey::new("bench", &[("api_key".to_string(), i.to_string())], "g"))
        .collect();
    let store = MemoryStore::new(N + N / 10, Arc::new(SystemClock));
    let before = resident_bytes();
    for key in &keys {
        let charge = Charge {
            key: key.clone(),
            limit: 100,
            unit: Unit::Hour,
            algorithm: Algorithm::FixedWindow,
            cost: 1,
            shadow: false,
            mode: tollgate::quota::ChargeMode::Admission,
        };
        let applied = rt
            .block_on(store.charge(std::slice::from_ref(&charge)))
            .map(|r| r.applied);
        assert_eq!(applied, Ok(true));
    }
    let after = resident_bytes();
    assert_eq!(store.len(), N);
    println!(
        "memory store: {N} counters, resident +{:.1} MiB, {:.0} bytes per counter",
        (after - before) as f64 / (1024.0 * 1024.0),
        (after - before) as f64 / N as f64
    );
}
