//! Load generator for the served API: Tollgate's ext_authz `Check` against an
//! empty tonic unary call with the same messages on the same machine, same
//! concurrency, one HTTP/2 connection (as Envoy uses).
//!
//!     cargo bench --bench grpc_load
//!
//! Environment: TG_BENCH_SECS (default 5), TG_CONCURRENCY (16),
//! TG_SERVER_THREADS (1), TG_CLIENT_THREADS (1). Prints a Markdown table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest, CheckResponse};
use envoy_types::pb::google::rpc::Status;
use tonic::transport::Channel;

// The same allocator as the `tollgate` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The floor: the same service and messages, no decision work.
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

fn check_request() -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "llm.example.com"),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        ("content-type", "application/json"),
        ("x-api-key", "tg_demo_paid_acme"),
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

/// Starts a server on its own runtime with `threads` workers.
fn start_server(threads: usize, tollgate: bool) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .expect("server runtime");
        rt.block_on(async move {
            if tollgate {
                let mut config = tollgate::config::Config::load(None).expect("config");
                config.base_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
                config.policy.watch = false;
                config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
                config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
                let running = tollgate::server::App::build(config)
                    .expect("build")
                    .start()
                    .await
                    .expect("start");
                tx.send(running.grpc_addr).expect("send addr");
                std::future::pending::<()>().await;
            } else {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                tx.send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                let _ = tonic::transport::Server::builder()
                    .add_service(AuthorizationServer::new(Empty))
                    .serve_with_incoming(
                        tonic::transport::server::TcpIncoming::from(listener)
                            .with_nodelay(Some(true)),
                    )
                    .await;
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

async fn load(addr: SocketAddr, concurrency: usize, secs: u64) -> Run {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let req = Arc::new(check_request());
    let run_for = |d: Duration| {
        let mut tasks = Vec::new();
        let deadline = Instant::now() + d;
        for _ in 0..concurrency {
            let mut client = AuthorizationClient::new(channel.clone());
            let req = req.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let resp = client.check((*req).clone()).await.expect("check");
                    assert_eq!(
                        resp.get_ref().status.as_ref().map(|s| s.code),
                        Some(0),
                        "load request must be allowed"
                    );
                    lat.push(t.elapsed());
                }
                lat
            }));
        }
        tasks
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

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent; only
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
    let empty_addr = start_server(server_threads, false);
    let empty = client.block_on(load(empty_addr, concurrency, secs));
    let tg_addr = start_server(server_threads, true);
    let tg = client.block_on(load(tg_addr, concurrency, secs));
    println!(
        "\nconcurrency {concurrency}, {secs} s per run, server threads {server_threads}, client threads {client_threads}\n"
    );
    println!("| call | req/s | p50 | p99 |");
    println!("|---|---|---|---|");
    for (name, r) in [
        ("empty tonic Check", &empty),
        ("tollgate ext_authz Check", &tg),
    ] {
        println!("| {name} | {:.0} | {:?} | {:?} |", r.rps, r.p50, r.p99);
    }
    println!(
        "| **ratio tollgate / empty** | **{:.2}** | **{:.2}** | **{:.2}** |",
        tg.rps / empty.rps,
        tg.p50.as_secs_f64() / empty.p50.as_secs_f64(),
        tg.p99.as_secs_f64() / empty.p99.as_secs_f64()
    );
}
