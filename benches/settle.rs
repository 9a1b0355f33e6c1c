//! Reserve + settle against a plain `Check`, in the same run, on the same
//! Redis: one in-process Tollgate with only a request-count rule (the plain
//! Check), one with the same rule plus a token budget and a concurrency
//! rule (Check reserves; `ReportUsage` settles). Sequential calls over one
//! loopback gRPC connection, so the numbers are latencies and Redis round
//! trips (EVALSHA calls counted by Redis itself, `INFO commandstats`).
//! Then the memory an in-flight reservation holds: in Redis (`used_memory`
//! growth over 10,000 unsettled reservations) and in the memory store
//! (resident growth over 100,000).
//!
//!     cargo bench --bench settle
//!
//! Environment: TG_BENCH_N (requests per phase, default 2000). Needs
//! `redis-server` on PATH. Prints a Markdown table.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tollgate::config::{Config, StoreKind};
use tollgate::proto::ReportUsageRequest;
use tollgate::proto::decision_service_client::DecisionServiceClient;
use tollgate::quota::QuotaStore;
use tonic::transport::Channel;

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const KEY: &str = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// EVALSHA calls Redis has served so far.
fn evalsha_calls(port: u16) -> u64 {
    cli(port, &["info", "commandstats"])
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .and_then(|l| l.split("calls=").nth(1))
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn used_memory(port: u16) -> u64 {
    cli(port, &["info", "memory"])
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn config(port: u16, rules: &str) -> Config {
    #[derive(serde::Deserialize)]
    struct Quota {
        quota: tollgate::config::QuotaConfig,
    }
    let mut config = Config::load(None).expect("default config");
    config.base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.policy.watch = false;
    config.log.level = "error".into();
    config.quota = toml::from_str::<Quota>(rules).expect("rules").quota;
    config.quota.store = StoreKind::Redis;
    config.quota.redis_url = format!("redis://127.0.0.1:{port}/0");
    config.quota.deadline_ms = 1000;
    config
}

const PLAIN: &str = r#"
[quota]
sweep_interval_secs = 3600
[[quota.rules]]
name = "key-rpm"
per = ["key"]
unit = "minute"
limit = 1000000000
"#;

/// Added to [`PLAIN`] for the reserving instance.
const BUDGETS: &str = r#"
[[quota.rules]]
name = "key-tokens"
per = ["key"]
unit = "hour"
cost = "tokens"
limit = 1000000000000

[[quota.rules]]
name = "key-inflight"
per = ["key"]
cost = "concurrent"
limit = 1000000
"#;

fn check(id: &str) -> CheckRequest {
    let body = r#"{"model":"llama-3-8b","max_tokens":256,"messages":[{"role":"user","content":"hello there"}]}"#;
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: id.into(),
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "llm.example.com".into(),
                    headers: [("x-api-key", KEY), ("content-type", "application/json")]
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    raw_body: body.as_bytes().to_vec(),
                    size: body.len() as i64,
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

struct Phase {
    name: &'static str,
    micros: f64,
    round_trips: f64,
}

async fn run() {
    let n: usize = std::env::var("TG_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let port = free_port();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis: Child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH");
    std::thread::sleep(Duration::from_millis(300));
    let plain = tollgate::server::App::build(config(port, PLAIN))
        .expect("builds")
        .start()
        .await
        .expect("starts");
    let llm = tollgate::server::App::build(config(port, &format!("{PLAIN}{BUDGETS}")))
        .expect("builds")
        .start()
        .await
        .expect("starts");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut plain_client = AuthorizationClient::new(channel(plain.grpc_addr).await);
    let mut llm_client = AuthorizationClient::new(channel(llm.grpc_addr).await);
    let mut usage_client = DecisionServiceClient::new(channel(llm.grpc_addr).await);
    // Warm up both (connections, scripts, caches).
    for i in 0..200 {
        let _ = plain_client.check(check(&format!("w{i}"))).await;
        let _ = llm_client.check(check(&format!("lw{i}"))).await;
    }
    let mut phases = Vec::new();
    let measure = |name, started: Instant, calls_before: u64| Phase {
        name,
        micros: started.elapsed().as_secs_f64() * 1e6 / n as f64,
        round_trips: (evalsha_calls(port) - calls_before) as f64 / n as f64,
    };
    let (c, t) = (evalsha_calls(port), Instant::now());
    for i in 0..n {
        let r = plain_client
            .check(check(&format!("p{i}")))
            .await
            .expect("check");
        assert!(
            r.into_inner().status.is_some_and(|s| s.code == 0),
            "allowed"
        );
    }
    phases.push(measure("plain Check (request-count rule)", t, c));
    let (c, t) = (evalsha_calls(port), Instant::now());
    for i in 0..n {
        let r = llm_client
            .check(check(&format!("r{i}")))
            .await
            .expect("check");
        assert!(
            r.into_inner().status.is_some_and(|s| s.code == 0),
            "allowed"
        );
    }
    phases.push(measure(
        "Check + reserve (request, tokens, concurrent)",
        t,
        c,
    ));
    let (c, t) = (evalsha_calls(port), Instant::now());
    for i in 0..n {
        let r = usage_client
            .report_usage(ReportUsageRequest {
                request_id: format!("r{i}"),
                input_tokens: 20,
                output_tokens: 100,
                cached_input_tokens: 0,
            })
            .await
            .expect("report")
            .into_inner();
        assert_eq!(r.result, 1, "settled");
    }
    phases.push(measure("settle (ReportUsage)", t, c));
    let floor = phases[0].micros;
    println!(
        "| phase (sequential, n = {n}) | µs per request | × plain Check | Redis round trips per request |"
    );
    println!("|---|---:|---:|---:|");
    for p in &phases {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} |",
            p.name,
            p.micros,
            p.micros / floor,
            p.round_trips
        );
    }
    let both = phases[1].micros + phases[2].micros;
    println!(
        "| reserve + settle, whole request | {:.0} | {:.2} | {:.2} |",
        both,
        both / floor,
        phases[1].round_trips + phases[2].round_trips
    );

    // Memory per in-flight reservation in Redis: reservations never settled.
    let k = 10_000;
    let before = used_memory(port);
    for i in 0..k {
        let r = llm_client
            .check(check(&format!("m{i}")))
            .await
            .expect("check");
        assert!(r.into_inner().status.is_some_and(|s| s.code == 0));
    }
    let after = used_memory(port);
    println!();
    println!(
        "Redis: {k} in-flight reservations, used_memory +{:.1} MiB, {:.0} bytes each (reservation JSON, index entry, the request's window counters are shared)",
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        after.saturating_sub(before) as f64 / k as f64
    );
    plain.shutdown().await;
    llm.shutdown().await;
    let _ = redis.kill();
    let _ = redis.wait();

    // Memory store: resident growth per in-flight reservation.
    let store = tollgate::quota::memory::MemoryStore::new(
        1_000_000,
        Arc::new(tollgate::quota::memory::SystemClock),
    );
    let key = tollgate::quota::CounterKey::new("bench", &[("k".into(), "v".into())], "g");
    let m = 100_000;
    let before = resident_bytes();
    for i in 0..m {
        let r = tollgate::quota::Reservation {
            request_id: format!("req-{i:08}"),
            charges: vec![tollgate::quota::Charge {
                key: key.clone(),
                limit: u64::MAX >> 12,
                unit: tollgate::quota::Unit::Hour,
                algorithm: tollgate::quota::Algorithm::FixedWindow,
                cost: 300,
                shadow: false,
                mode: tollgate::quota::ChargeMode::Admission,
            }],
            budgets: vec![Some(tollgate::quota::reserve::Budget {
                rule: "key-tokens".into(),
                measure: tollgate::quota::rules::Cost::Tokens,
                on_expiry: tollgate::quota::reserve::Fate::Charge,
            })],
            slots: vec![tollgate::quota::Slot {
                key: key.clone(),
                limit: u64::MAX,
                shadow: false,
                rule: "key-inflight".into(),
            }],
            model: Some("llama-3-8b".into()),
            labels: Default::default(),
            price: None,
            input_estimate: Some(44),
            ttl: Duration::from_secs(600),
        };
        assert!(store.reserve(&r).await.expect("reserve").applied);
    }
    let after = resident_bytes();
    println!(
        "memory store: {m} in-flight reservations, resident +{:.1} MiB, {:.0} bytes each",
        (after.saturating_sub(before)) as f64 / (1024.0 * 1024.0),
        after.saturating_sub(before) as f64 / m as f64
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(run());
}
