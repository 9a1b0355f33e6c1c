//! Load generator for the served APIs, each against an empty tonic service
//! with the same messages on the same machine, same concurrency, one HTTP/2
//! connection (as Envoy uses):
//!
//! - ext_authz `Check` (Tollgate's decision) vs an empty `Check`;
//! - `ShouldRateLimit` on the memory store and on Redis vs an empty
//!   `ShouldRateLimit`, and `redis-benchmark`'s rate for the same EVALSHA on
//!   the same Redis at the same concurrency.
//!
//!     cargo bench --bench grpc_load
//!
//! Environment: TG_BENCH_SECS (default 5), TG_CONCURRENCY (16),
//! TG_SERVER_THREADS (1), TG_CLIENT_THREADS (1). Needs `redis-server` and
//! `redis-benchmark` on PATH. Prints Markdown tables.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::{
    RateLimitService, RateLimitServiceServer,
};
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use envoy_types::pb::google::rpc::Status;
use tollgate::config::{Config, StoreKind};
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The floor: the same services and messages, no work.
struct Empty;

#[tonic::async_trait]
impl Authorization for Empty {
    async fn check(
        &self,
        _: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        Ok(tonic::Response::new(CheckResponse {
            status: Some(Status::default()),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl RateLimitService for Empty {
    async fn should_rate_limit(
        &self,
        _: tonic::Request<RateLimitRequest>,
    ) -> Result<tonic::Response<RateLimitResponse>, tonic::Status> {
        Ok(tonic::Response::new(RateLimitResponse {
            overall_code: 1,
            ..Default::default()
        }))
    }
}

fn check_request() -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "llm.example.com"),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        (
            "x-api-key",
            "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
        ),
        ("user-agent", "loadgen/1.0"),
        ("x-request-id", "5b1c7a8e-4f1e-4a51-9d9a-0a0f3c5e7d11"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let body = br#"{"model":"llama-3-8b","max_tokens":256,"messages":[{"role":"user","content":"hello"}]}"#;
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "5b1c7a8e-4f1e-4a51-9d9a-0a0f3c5e7d11".into(),
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: "llm.example.com".into(),
                    headers,
                    raw_body: body.to_vec(),
                    size: body.len() as i64,
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

enum Server {
    Empty,
    Tollgate(Box<Config>),
}

/// Starts a server on its own runtime with `threads` workers.
fn start_server(threads: usize, server: Server) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            match server {
                Server::Tollgate(config) => {
                    let running = tollgate::server::App::build(*config)
                        .expect("build")
                        .start()
                        .await
                        .expect("start");
                    let admin = running.admin_addr;
                    // Wait for the quota store to connect (Redis).
                    for _ in 0..200 {
                        let body = reqwest::get(format!("http://{admin}/readyz"))
                            .await
                            .ok()
                            .map(|r| r.text());
                        let ready = match body {
                            Some(t) => t.await.unwrap_or_default().contains("\"connected\":true"),
                            None => false,
                        };
                        if ready {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(25)).await;
                    }
                    tx.send(running.grpc_addr).expect("send addr");
                    std::future::pending::<()>().await;
                }
                Server::Empty => {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                        .await
                        .expect("bind");
                    tx.send(listener.local_addr().expect("addr"))
                        .expect("send addr");
                    let _ = tonic::transport::Server::builder()
                        .add_service(AuthorizationServer::new(Empty))
                        .add_service(RateLimitServiceServer::new(Empty))
                        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
                        .await;
                }
            }
        });
    });
    rx.recv().expect("server address")
}

struct Run {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

type Call = Arc<dyn Fn(Channel) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

fn authz_call() -> Call {
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
                "load request must be allowed"
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
            assert_eq!(
                resp.get_ref().overall_code,
                1,
                "load request must be under the limit"
            );
        })
    })
}

async fn load(addr: SocketAddr, call: Call, concurrency: usize, secs: u64) -> Run {
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
                    let mut lat = Vec::new();
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
    let mut all = Vec::new();
    for t in run_for(Duration::from_secs(secs)) {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Run {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

struct Redis(Child, u16);

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis() -> Redis {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server");
    for _ in 0..200 {
        if redis_cli(port, &["ping"]).trim() == "PONG" {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Redis(child, port)
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// redis-benchmark's requests per second for the charge script on one key.
fn redis_benchmark_evalsha(port: u16, concurrency: usize) -> f64 {
    let sha = redis_cli(
        port,
        &["script", "load", tollgate::quota::redis::CHARGE_LUA],
    )
    .trim()
    .to_string();
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-c",
            &concurrency.to_string(),
            "-n",
            "200000",
            "-q",
            "--csv",
        ])
        .args([
            "evalsha",
            &sha,
            "1",
            "tg:{bench}:k",
            "1000000000000",
            "3600000",
            "0",
            "1",
            "0",
        ])
        .output()
        .expect("redis-benchmark");
    let text = String::from_utf8_lossy(&out.stdout);
    // CSV: "test","rps",...
    text.lines()
        .filter_map(|l| l.split(',').nth(1))
        .filter_map(|v| v.trim_matches('"').parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

fn tollgate_config(limits: &std::path::Path, store: StoreKind, redis_port: u16) -> Config {
    let mut config = Config::load(None).expect("config");
    config.base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    config.policy.watch = false;
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.quota.limits_file = Some(limits.to_path_buf());
    config.quota.store = store;
    config.quota.redis_url = format!("redis://127.0.0.1:{redis_port}/0");
    config
}

fn row(name: &str, r: &Run) {
    println!("| {name} | {:.0} | {:?} | {:?} |", r.rps, r.p50, r.p99);
}

fn ratio(name: &str, a: &Run, floor: &Run) {
    println!(
        "| **{name}** | **{:.2}** | **{:.2}** | **{:.2}** |",
        a.rps / floor.rps,
        a.p50.as_secs_f64() / floor.p50.as_secs_f64(),
        a.p99.as_secs_f64() / floor.p99.as_secs_f64()
    );
}

fn main() {
    // `cargo test --benches` runs bench binaries without `--bench`; only
    // measure when asked to.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let secs = env("TG_BENCH_SECS", 5) as u64;
    let concurrency = env("TG_CONCURRENCY", 16);
    let server_threads = env("TG_SERVER_THREADS", 1);
    let client_threads = env("TG_CLIENT_THREADS", 1);
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .enable_all()
        .build()
        .expect("client runtime");
    let redis = start_redis();
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "domain: bench\ndescriptors:\n  - key: tenant\n    descriptors:\n      - key: model\n        rate_limit: { unit: hour, requests_per_unit: 1000000000000 }\n",
    )
    .expect("limits");

    let empty = start_server(server_threads, Server::Empty);
    let authz_floor = client.block_on(load(empty, authz_call(), concurrency, secs));
    let rls_floor = client.block_on(load(empty, rls_call(), concurrency, secs));
    let memory = start_server(
        server_threads,
        Server::Tollgate(Box::new(tollgate_config(
            &limits,
            StoreKind::Memory,
            redis.1,
        ))),
    );
    let authz = client.block_on(load(memory, authz_call(), concurrency, secs));
    let rls_memory = client.block_on(load(memory, rls_call(), concurrency, secs));
    let on_redis = start_server(
        server_threads,
        Server::Tollgate(Box::new(tollgate_config(
            &limits,
            StoreKind::Redis,
            redis.1,
        ))),
    );
    let rls_redis = client.block_on(load(on_redis, rls_call(), concurrency, secs));
    let evalsha = redis_benchmark_evalsha(redis.1, concurrency);

    println!(
        "\nconcurrency {concurrency}, {secs} s per run, server threads {server_threads}, client threads {client_threads}\n"
    );
    println!("| call | req/s | p50 | p99 |");
    println!("|---|---|---|---|");
    row("empty tonic Check", &authz_floor);
    row("tollgate ext_authz Check", &authz);
    ratio("Check / empty", &authz, &authz_floor);
    row("empty tonic ShouldRateLimit", &rls_floor);
    row("tollgate ShouldRateLimit, memory store", &rls_memory);
    ratio("ShouldRateLimit memory / empty", &rls_memory, &rls_floor);
    row("tollgate ShouldRateLimit, Redis store", &rls_redis);
    ratio("ShouldRateLimit Redis / empty", &rls_redis, &rls_floor);
    println!(
        "\nredis-benchmark EVALSHA of the charge script, {concurrency} connections: {evalsha:.0} req/s"
    );
    println!(
        "ShouldRateLimit on Redis / redis-benchmark EVALSHA: {:.2}",
        rls_redis.rps / evalsha.max(1.0)
    );
}
