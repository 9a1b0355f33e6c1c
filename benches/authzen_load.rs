//! AuthZEN Access Evaluation over HTTP/1.1 against an empty axum server that
//! answers `{"decision":true}` to the same request: same machine, same client,
//! same concurrency, keep-alive connections.
//!
//!     cargo bench --bench authzen_load
//!
//! Environment: TG_BENCH_SECS (default 5), TG_CONCURRENCY (16),
//! TG_SERVER_THREADS (1), TG_CLIENT_THREADS (1). Prints a Markdown row for
//! BENCHMARKS.md.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tollgate::config::Config;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

const BODY: &str = r#"{"subject":{"type":"user","id":"alice"},"action":{"name":"read"},"resource":{"type":"record","id":"record-1"}}"#;

fn runtime(threads: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .expect("runtime")
}

/// The floor: an HTTP JSON server that does no work.
async fn empty_server() -> SocketAddr {
    let app = axum::Router::new().route(
        "/access/v1/evaluation",
        axum::routing::post(|_body: axum::body::Bytes| async {
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                r#"{"decision":true}"#,
            )
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

async fn tollgate_server() -> (SocketAddr, tollgate::server::Running) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config =
        Config::load(Some(&root.join("examples/authzen/tollgate.toml"))).expect("config");
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.authzen_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.policy.watch = false;
    config.log.level = "warn".into();
    let running = tollgate::server::App::build(config)
        .expect("build")
        .start()
        .await
        .expect("start");
    (running.authzen_addr.expect("authzen listener"), running)
}

struct Result {
    rps: f64,
    p50: Duration,
    p99: Duration,
}

fn drive(addr: SocketAddr, secs: u64, concurrency: usize, threads: usize) -> Result {
    let rt = runtime(threads);
    rt.block_on(async move {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .http1_only()
            .build()
            .expect("client");
        let url = format!("http://{addr}/access/v1/evaluation");
        let run = |until: Instant| {
            let client = client.clone();
            let url = url.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    let r = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(BODY)
                        .send()
                        .await
                        .expect("send");
                    let text = r.text().await.expect("body");
                    assert!(text.contains("\"decision\":true"), "{text}");
                    lat.push(t.elapsed());
                }
                lat
            })
        };
        // Warm-up.
        let warm = Instant::now() + Duration::from_secs(1);
        for h in (0..concurrency).map(|_| run(warm)).collect::<Vec<_>>() {
            let _ = h.await;
        }
        let start = Instant::now();
        let until = start + Duration::from_secs(secs);
        let mut all = Vec::new();
        for h in (0..concurrency).map(|_| run(until)).collect::<Vec<_>>() {
            all.extend(h.await.expect("task"));
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.sort();
        let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        Result {
            rps: all.len() as f64 / elapsed,
            p50: at(0.50),
            p99: at(0.99),
        }
    })
}

fn main() {
    let secs = env("TG_BENCH_SECS", 5) as u64;
    let concurrency = env("TG_CONCURRENCY", 16);
    let server_threads = env("TG_SERVER_THREADS", 1);
    let client_threads = env("TG_CLIENT_THREADS", 1);

    let empty_rt = Arc::new(runtime(server_threads));
    let empty = empty_rt.block_on(empty_server());
    let tg_rt = runtime(server_threads);
    let (tg, _running) = tg_rt.block_on(tollgate_server());

    let floor = drive(empty, secs, concurrency, client_threads);
    let ours = drive(tg, secs, concurrency, client_threads);
    println!(
        "| server / client threads | empty req/s | Tollgate req/s | throughput ratio | p50 empty → Tollgate | p99 empty → Tollgate |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {server_threads} / {client_threads} | {:.0} | {:.0} | **{:.2}** | {:?} → {:?} ({:.2}×) | {:?} → {:?} ({:.2}×) |",
        floor.rps,
        ours.rps,
        ours.rps / floor.rps,
        floor.p50,
        ours.p50,
        ours.p50.as_secs_f64() / floor.p50.as_secs_f64(),
        floor.p99,
        ours.p99,
        ours.p99.as_secs_f64() / floor.p99.as_secs_f64(),
    );
}
