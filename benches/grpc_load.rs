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

#[path = "load_common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{Redis, Run, check_call, env, load, rls_call};
use tollgate::config::{Config, StoreKind};

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
                    common::serve_empty(listener).await;
                }
            }
        });
    });
    rx.recv().expect("server address")
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
    // One fixed-window charge of 1 under a limit it never reaches, in the
    // current hour (the script's argument layout, see CHARGE_LUA).
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let hour = 3_600_000;
    let w = now_ms / hour;
    let (current, previous) = (
        format!("tg:{{bench}}:k:{w}"),
        format!("tg:{{bench}}:k:{}", w - 1),
    );
    let charge = [
        w,
        1_000_000_000_000,
        w * hour,
        (w + 1) * hour,
        (w + 1) * hour + 1000,
        0,
        1,
        0,
        0,
    ]
    .map(|v| v.to_string());
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
        .args(["evalsha", &sha, "2", &current, &previous, "nonce"])
        .args(charge.iter().map(String::as_str))
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
    let redis = Redis::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "domain: bench\ndescriptors:\n  - key: tenant\n    descriptors:\n      - key: model\n        rate_limit: { unit: hour, requests_per_unit: 1000000000000 }\n",
    )
    .expect("limits");

    let empty = start_server(server_threads, Server::Empty);
    let authz_floor = client.block_on(load(empty, None, check_call(), concurrency, secs));
    let rls_floor = client.block_on(load(empty, None, rls_call(), concurrency, secs));
    let memory = start_server(
        server_threads,
        Server::Tollgate(Box::new(tollgate_config(
            &limits,
            StoreKind::Memory,
            redis.port,
        ))),
    );
    let authz = client.block_on(load(memory, None, check_call(), concurrency, secs));
    let rls_memory = client.block_on(load(memory, None, rls_call(), concurrency, secs));
    let on_redis = start_server(
        server_threads,
        Server::Tollgate(Box::new(tollgate_config(
            &limits,
            StoreKind::Redis,
            redis.port,
        ))),
    );
    let rls_redis = client.block_on(load(on_redis, None, rls_call(), concurrency, secs));
    let evalsha = redis_benchmark_evalsha(redis.port, concurrency);

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
