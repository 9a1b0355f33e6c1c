//! What users run, measured against the transport floor: the release
//! `tollgate serve` binary and an "empty" ext_authz + rate limit server (the
//! same `envoy-types` services, answering OK at once), each a separate
//! process with ONE Tokio worker thread, driven by the same tonic client
//! (this process, one worker thread) with the same requests, 16 in flight on
//! one HTTP/2 connection (as Envoy uses) and sequentially.
//!
//!     cargo bench --bench serve_load              # gRPC ratios
//!     cargo bench --bench serve_load -- --envoy   # through Envoy (scripts/bench-envoy)
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

mod envoy;
mod procs;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use tonic::transport::Channel;

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub(crate) fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The paid demo key of `examples/keys.toml` (README quick start).
pub(crate) const API_KEY: &str = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";
/// The chat request body every target receives.
pub(crate) const CHAT_BODY: &str =
    r#"{"model":"llama-3-8b","max_tokens":256,"messages":[{"role":"user","content":"hello"}]}"#;

fn check_request() -> CheckRequest {
    let headers = [
        (":authority", "llm.example.com"),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("x-api-key", API_KEY),
        ("user-agent", "loadgen/1.0"),
        ("accept", "*/*"),
        ("content-length", "88"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "5b1c7a8e-4f1e-4a51-9d9a-0a0f3c5e7d11"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "13954813375417445730".into(),
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "llm.example.com".into(),
                    scheme: "http".into(),
                    headers,
                    raw_body: CHAT_BODY.as_bytes().to_vec(),
                    size: CHAT_BODY.len() as i64,
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

fn rls_request() -> RateLimitRequest {
    RateLimitRequest {
        domain: "bench".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![
                Entry {
                    key: "tenant".into(),
                    value: "acme".into(),
                },
                Entry {
                    key: "model".into(),
                    value: "llama-3-8b".into(),
                },
            ],
            ..Default::default()
        }],
        hits_addend: 0,
    }
}

/// One measured run.
struct Run {
    rps: f64,
    /// CPU time the server process spent per request in the measured
    /// period (user + system): unlike the rate, it does not depend on what
    /// else the machine runs.
    cpu_us: f64,
    p50: Duration,
    p99: Duration,
}

type Call = Arc<dyn Fn(Channel) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn check_call() -> Call {
    let req = Arc::new(check_request());
    Arc::new(move |ch| {
        let req = req.clone();
        Box::pin(async move {
            let resp = AuthorizationClient::new(ch)
                .check((*req).clone())
                .await
                .expect("check");
            assert_eq!(
                resp.get_ref().status.as_ref().map(|s| s.code),
                Some(0),
                "the load request must be allowed"
            );
        })
    })
}

fn rls_call() -> Call {
    let req = Arc::new(rls_request());
    Arc::new(move |ch| {
        let req = req.clone();
        Box::pin(async move {
            let resp = RateLimitServiceClient::new(ch)
                .should_rate_limit((*req).clone())
                .await
                .expect("rls");
            assert_eq!(resp.get_ref().overall_code, 1, "must be under the limit");
        })
    })
}

/// Drives `addr` with `concurrency` callers on one connection: 1 s warm-up,
/// then `secs` measured.
async fn load(addr: SocketAddr, pid: u32, call: Call, concurrency: usize, secs: u64) -> Run {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let run_for = |d: Duration| {
        let deadline = Instant::now() + d;
        (0..concurrency)
            .map(|_| {
                let (channel, call) = (channel.clone(), call.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::with_capacity(1 << 16);
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        call(channel.clone()).await;
                        lat.push(t.elapsed());
                    }
                    lat
                })
            })
            .collect::<Vec<_>>()
    };
    for t in run_for(Duration::from_secs(1)) {
        let _ = t.await;
    }
    let started = Instant::now();
    let cpu_before = procs::cpu_time(pid);
    let mut all = Vec::new();
    for t in run_for(Duration::from_secs(secs)) {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    let cpu = procs::cpu_time(pid).saturating_sub(cpu_before);
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Run {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / all.len().max(1) as f64,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

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
    let redis = procs::Redis::start();
    let measure = |(addr, pid): (SocketAddr, u32), call: fn() -> Call| {
        let many = client.block_on(load(addr, pid, call(), concurrency, secs));
        let seq = client.block_on(load(addr, pid, call(), 1, secs));
        (many, seq)
    };

    let empty = procs::EmptyServer::start();
    let check_floor = measure(empty.target(), check_call);
    let rls_floor = measure(empty.target(), rls_call);
    drop(empty);

    let memory = procs::Tollgate::start("memory", redis.port);
    let check_memory = measure(memory.target(), check_call);
    let rls_memory = measure(memory.target(), rls_call);
    let memory_rss = memory.rss_kib();
    drop(memory);

    let on_redis = procs::Tollgate::start("redis", redis.port);
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
