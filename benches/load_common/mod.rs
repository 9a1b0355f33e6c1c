//! What the load benchmarks share (`grpc_load`, in one process, and
//! `serve_load`, separate processes): the empty ext_authz + rate limit
//! service (the floor), the requests every target receives, the load loop
//! (16 in flight on one HTTP/2 connection, or sequential), and the
//! processes they start (`redis-server`).
#![allow(dead_code)]

use std::future::Future;
use std::net::{SocketAddr, TcpStream};
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
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

/// A `usize` from the environment, else `default`.
pub fn env(name: &str, default: usize) -> usize {
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

/// Serves the empty services on `listener` until the process ends.
pub async fn serve_empty(listener: tokio::net::TcpListener) {
    let _ = tonic::transport::Server::builder()
        .add_service(AuthorizationServer::new(Empty))
        .add_service(RateLimitServiceServer::new(Empty))
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)))
        .await;
}

/// The paid demo key of `examples/keys.toml` (README quick start).
pub const API_KEY: &str = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";
/// The chat request body every target receives.
pub const CHAT_BODY: &str =
    r#"{"model":"llama-3-8b","max_tokens":256,"messages":[{"role":"user","content":"hello"}]}"#;

pub fn check_request() -> CheckRequest {
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

pub fn rls_request() -> RateLimitRequest {
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
pub struct Run {
    pub rps: f64,
    /// CPU time the server process spent per request in the measured
    /// period (user + system): unlike the rate, it does not depend on what
    /// else the machine runs.
    pub cpu_us: f64,
    pub p50: Duration,
    pub p99: Duration,
}

pub type Call = Arc<dyn Fn(Channel) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

pub fn check_call() -> Call {
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

pub fn rls_call() -> Call {
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
/// `pid`: the server process whose CPU time is read (none: in-process).
pub async fn load(
    addr: SocketAddr,
    pid: Option<u32>,
    call: Call,
    concurrency: usize,
    secs: u64,
) -> Run {
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
    let cpu_before = pid.map_or(Duration::ZERO, cpu_time);
    let mut all = Vec::new();
    for t in run_for(Duration::from_secs(secs)) {
        all.extend(t.await.expect("task"));
    }
    let elapsed = started.elapsed();
    let cpu = pid
        .map_or(Duration::ZERO, cpu_time)
        .saturating_sub(cpu_before);
    all.sort();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    Run {
        rps: all.len() as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu.as_secs_f64() * 1e6 / all.len().max(1) as f64,
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// User + system CPU time `pid` has used so far.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the line, in clock ticks (100 per second).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// Waits up to a minute for `ready`.
pub fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// `redis-server` on a free port, no persistence.
pub struct Redis {
    child: Child,
    pub port: u16,
}

impl Redis {
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server on PATH");
        wait_until("redis", || TcpStream::connect(("127.0.0.1", port)).is_ok());
        Self { child, port }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
