//! What users run, measured against the transport floor: the release
//! `tollgate serve` binary and an "empty" ext_authz + rate limit server (the
//! same `envoy-types` services, answering OK at once), each a separate
//! process with ONE Tokio worker thread, driven by the same tonic client
//! (this process, one worker thread) with the same requests, 16 in flight on
//! one HTTP/2 connection (as Envoy uses) and sequentially.
//!
//!     cargo bench --bench serve_load              # gRPC ratios
//!     cargo bench --bench serve_load -- --envoy   # through Envoy (scripts/bench-envoy)
//!     cargo bench --bench serve_load -- --drive check|rls HOST:PORT
//!                                       # only drive a running server (to profile it)
//!
//! Tollgate's worker count is set with `TOKIO_WORKER_THREADS=1` (Tokio reads
//! it when the binary builds its runtime); the empty server builds its
//! runtime with one worker. Nothing is pinned: all processes share the
//! machine's cores, as they would beside a gateway.
//!
//! Calls: `Check` POST /v1/chat/completions with a JSON body and an API key
//! under one per-key quota rule (memory store, then Redis), and
//! `ShouldRateLimit` with a two-entry descriptor (memory, then Redis). Every
//! Tollgate answer is checked to be a real allow.
//!
//! Environment: TG_BENCH_SECS (default 5), TG_CONCURRENCY (16),
//! TG_LOG_LEVEL (Tollgate's `log.level`, default "info": one decision log
//! line per request, written to a file). Needs `redis-server` on PATH.

#[path = "../load_common/mod.rs"]
mod common;
mod envoy;
mod procs;

use std::net::SocketAddr;
use std::time::Duration;

pub(crate) use common::{API_KEY, CHAT_BODY};
use common::{Call, Run, check_call, env, load, rls_call};

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

/// One table row: the call at 16 in flight and sequentially, with its
/// ratios to the floor measured in the same run.
fn row(name: &str, many: &Run, seq: &Run, floor: Option<(&Run, &Run)>) {
    let (ratio, cpu_ratio, extra) = match floor {
        Some((f_many, f_seq)) => (
            format!("**{:.2}**", many.rps / f_many.rps),
            format!("{:.2}", f_many.cpu_us / many.cpu_us.max(0.001)),
            format!(
                "+{:.0} µs",
                (seq.p50.as_secs_f64() - f_seq.p50.as_secs_f64()) * 1e6
            ),
        ),
        None => ("1".into(), "1".into(), "".into()),
    };
    println!(
        "| {name} | {:.0} | {} | {} | {ratio} | {:.1} µs | {cpu_ratio} | {} | {extra} |",
        many.rps,
        us(many.p50),
        us(many.p99),
        many.cpu_us,
        us(seq.p50),
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == procs::EMPTY_SERVER_FLAG) {
        procs::run_empty_server();
        return;
    }
    // `cargo test --benches` runs bench binaries without `--bench`; only
    // measure when asked to.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    if args.iter().any(|a| a == "--envoy") {
        envoy::compare();
        return;
    }
    let secs = env("TG_BENCH_SECS", 5) as u64;
    let concurrency = env("TG_CONCURRENCY", 16);
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("client runtime");
    if let Some(at) = args.iter().position(|a| a == "--drive") {
        // Only the load, against a server started by hand (for `perf`).
        let call = match args.get(at + 1).map(String::as_str) {
            Some("rls") => rls_call,
            _ => check_call,
        };
        let addr: SocketAddr = args
            .get(at + 2)
            .and_then(|a| a.parse().ok())
            .expect("--drive check|rls HOST:PORT");
        let run = client.block_on(load(addr, None, call(), concurrency, secs));
        println!(
            "{:.0} req/s, p50 {}, p99 {}",
            run.rps,
            us(run.p50),
            us(run.p99)
        );
        return;
    }
    let redis = procs::Redis::start();
    let measure = |(addr, pid): (SocketAddr, u32), call: fn() -> Call| {
        let many = client.block_on(load(addr, Some(pid), call(), concurrency, secs));
        let seq = client.block_on(load(addr, Some(pid), call(), 1, secs));
        (many, seq)
    };

    let empty = procs::EmptyServer::start();
    let check_floor = measure(empty.target(), check_call);
    let rls_floor = measure(empty.target(), rls_call);
    drop(empty);

    let memory = procs::Tollgate::start("memory", redis.port, false);
    let check_memory = measure(memory.target(), check_call);
    let rls_memory = measure(memory.target(), rls_call);
    let memory_rss = memory.rss_kib();
    drop(memory);

    let cached = procs::Tollgate::start("memory", redis.port, true);
    let check_cached = measure(cached.target(), check_call);
    drop(cached);

    let on_redis = procs::Tollgate::start("redis", redis.port, false);
    let check_redis = measure(on_redis.target(), check_call);
    let rls_redis = measure(on_redis.target(), rls_call);
    drop(on_redis);

    println!(
        "\n{concurrency} in flight on one HTTP/2 connection and sequential, {secs} s per run; \
         server processes: 1 Tokio worker each; client: 1 worker; Tollgate log level {}\n",
        procs::log_level()
    );
    println!(
        "| call | req/s ({concurrency} in flight) | p50 | p99 | **ratio to empty** | server CPU / request | empty's CPU / this | sequential p50 | over empty (seq.) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    row(
        "empty ext_authz Check",
        &check_floor.0,
        &check_floor.1,
        None,
    );
    row(
        "Tollgate Check, chat + body + API key, quota rule on memory",
        &check_memory.0,
        &check_memory.1,
        Some((&check_floor.0, &check_floor.1)),
    );
    row(
        "Tollgate Check, same, memory, decision cache on (repeated inputs)",
        &check_cached.0,
        &check_cached.1,
        Some((&check_floor.0, &check_floor.1)),
    );
    row(
        "Tollgate Check, same, quota rule on Redis",
        &check_redis.0,
        &check_redis.1,
        Some((&check_floor.0, &check_floor.1)),
    );
    row("empty ShouldRateLimit", &rls_floor.0, &rls_floor.1, None);
    row(
        "Tollgate ShouldRateLimit, memory",
        &rls_memory.0,
        &rls_memory.1,
        Some((&rls_floor.0, &rls_floor.1)),
    );
    row(
        "Tollgate ShouldRateLimit, Redis",
        &rls_redis.0,
        &rls_redis.1,
        Some((&rls_floor.0, &rls_floor.1)),
    );
    println!("\nTollgate (memory store) resident memory after its runs: {memory_rss} KiB");
}
