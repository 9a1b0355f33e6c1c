//! Shared helpers for the integration tests: start Tollgate in-process on
//! loopback port 0, start a real Envoy and a tiny upstream, send raw HTTP,
//! and wait for conditions with a bound.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tollgate::config::Config;
use tollgate::server::{App, Running};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A config on the example files, listening on free loopback ports, not
/// watching files.
pub fn test_config() -> Config {
    let mut config = Config::load(None).expect("default config");
    config.base_dir = repo();
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    config.policy.watch = false;
    config
}

/// A running in-process Tollgate.
pub struct Tollgate {
    pub running: Option<Running>,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
}

impl Tollgate {
    pub async fn start(config: Config) -> Self {
        let running = App::build(config)
            .expect("tollgate builds")
            .start()
            .await
            .expect("tollgate starts");
        Self {
            grpc: running.grpc_addr,
            admin: running.admin_addr,
            running: Some(running),
        }
    }

    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Waits until `/readyz` reports the quota store connected.
    pub async fn wait_for_store(&self) {
        let admin = self.admin;
        let ok = eventually(Duration::from_secs(10), || async move {
            raw_http(admin, "GET", "/readyz", &[], "").await.json()["quota_store"]["connected"]
                == true
        })
        .await;
        assert!(ok, "quota store did not connect");
    }

    /// A gRPC channel to the listener.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(self.grpc_url())
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Copies the example policies into a fresh directory a test may edit.
pub fn copy_policies() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_dir(&repo().join("policies"), dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read_dir").flatten() {
        let path = entry.path();
        let dest = to.join(entry.file_name());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).expect("copy");
        }
    }
}

/// Waits until `check` returns true, polling, for at most `limit`.
pub async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// An HTTP response as a client sees it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// Sends one HTTP/1.1 request with the path exactly as given (no client-side
/// normalization of `..` or `%2F`) and reads the whole response.
pub async fn raw_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nhost: llm.example.com\r\nconnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
    stream.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read");
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> HttpResponse {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        headers,
        body,
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A tiny upstream that answers 200 with the request headers it received as
/// JSON: `{"headers": [[name, value], ...], "path": "..."}`.
pub async fn start_upstream() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use axum::extract::Request;
    let app = axum::Router::new().fallback(|req: Request| async move {
        let headers: Vec<(String, String)> = req
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap_or("<binary>").to_string()))
            .collect();
        axum::Json(serde_json::json!({ "headers": headers, "path": req.uri().to_string() }))
    });
    serve_axum(app).await
}

/// The lines of the text file at `path` (an audit trail, say).
pub fn file_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

/// A deny audit record for request `r-{i}` (GET /v1/models), for trail
/// tests that write records directly.
pub fn audit_record(i: usize) -> tollgate::audit::AuditRecord {
    use tollgate::decision::{Decision, Outcome, Reason};
    let decision = Decision::early(
        format!("r-{i}"),
        Outcome::Forbidden(Reason::PolicyDenied),
        "v1".into(),
    );
    let request = tollgate::request::HttpRequest {
        method: "GET".into(),
        raw_path: "/v1/models".into(),
        ..Default::default()
    };
    tollgate::audit::AuditRecord::of(&decision, &request, Duration::ZERO)
}

/// Serves `app` on a free loopback port until the task is aborted.
pub async fn serve_axum(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, task)
}

/// The values of header `name` that [`start_upstream`] echoed in `body`.
pub fn echoed(body: &str, name: &str) -> Vec<String> {
    let echoed: serde_json::Value = serde_json::from_str(body).expect("upstream echo");
    echoed["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|p| p[0] == name)
        .filter_map(|p| p[1].as_str().map(str::to_string))
        .collect()
}

/// The Envoy binary: `$ENVOY_BIN`, else `.venv/bin/envoy` (scripts/test
/// installs it).
pub fn envoy_bin() -> PathBuf {
    let path = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/envoy"));
    assert!(
        path.exists(),
        "no Envoy at {}; run scripts/test, which installs it",
        path.display()
    );
    path
}

/// A real Envoy process, killed on drop.
pub struct Envoy {
    child: Child,
    pub listener: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts Envoy on `examples/envoy/envoy.yaml`, with only its port numbers
    /// replaced, and waits until it is ready.
    pub async fn start(tollgate_grpc: u16, upstream: u16) -> Self {
        let template =
            std::fs::read_to_string(repo().join("examples/envoy/envoy.yaml")).expect("envoy.yaml");
        let template = template
            .replace("port_value: 50051", &format!("port_value: {tollgate_grpc}"))
            .replace("port_value: 8080", &format!("port_value: {upstream}"));
        Self::start_template(&template).await
    }

    /// Like [`Envoy::start`] on any template whose listener and admin ports
    /// are `port_value: 10000` and `port_value: 9901`: picks free ports and,
    /// if Envoy exits at start-up (another process took a port between
    /// choosing and binding it), tries again with fresh ports.
    pub async fn start_template(template: &str) -> Self {
        let mut last = String::new();
        for _ in 0..3 {
            let (listen, admin) = (free_port(), free_port());
            let config = template
                .replace("port_value: 10000", &format!("port_value: {listen}"))
                .replace("port_value: 9901", &format!("port_value: {admin}"));
            match Self::try_run(&config, listen, admin).await {
                Ok(envoy) => return envoy,
                Err(log) => last = log,
            }
        }
        panic!("envoy did not become ready in 3 attempts; last log:\n{last}");
    }

    /// Starts Envoy on `yaml`, whose listener and admin ports are given, and
    /// waits until it is ready.
    pub async fn run(yaml: &str, listen: u16, admin: u16) -> Self {
        match Self::try_run(yaml, listen, admin).await {
            Ok(envoy) => envoy,
            Err(log) => panic!("envoy did not become ready; its log:\n{log}"),
        }
    }

    /// Starts Envoy on `yaml` and waits until it is ready; on failure
    /// (Envoy exited, or not ready within 60 s) returns its log.
    pub async fn try_run(yaml: &str, listen: u16, admin: u16) -> Result<Self, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("envoy.yaml");
        std::fs::write(&path, yaml).expect("write envoy.yaml");
        let log = std::fs::File::create(dir.path().join("envoy.log")).expect("log");
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn envoy");
        let mut envoy = Self {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], listen)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            _dir: dir,
        };
        let admin_addr = envoy.admin;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = envoy.child.try_wait() {
                return Err(format!("envoy exited ({status}):\n{}", envoy.log()));
            }
            if TcpStream::connect(admin_addr).await.is_ok()
                && raw_http(admin_addr, "GET", "/ready", &[], "").await.status == 200
            {
                return Ok(envoy);
            }
            if Instant::now() >= deadline {
                return Err(format!("not ready after 60 s:\n{}", envoy.log()));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Envoy's log so far (warnings and errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("envoy.log")).unwrap_or_default()
    }
}

/// A `redis-server` on a free loopback port, stopped on drop.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts with extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> Self {
        // A free port can be taken by another process before redis-server
        // binds it (and a cluster node also binds its bus port): try again
        // on fresh ports.
        let mut tries = 0;
        loop {
            let mut extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
            if extra.iter().any(|a| a == "--cluster-enabled") {
                // The bus port is port + 10000 unless set: above 55535 that
                // is no port at all, and it may be taken.
                extra.extend(["--cluster-port".to_string(), free_port().to_string()]);
            }
            let mut s = Self {
                child: None,
                port: free_port(),
                dir: tempfile::tempdir().expect("tempdir"),
                extra,
            };
            tries += 1;
            if s.try_spawn() || tries == 5 {
                if tries == 5 {
                    s.wait_for_ping();
                }
                return s;
            }
            if let Some(mut c) = s.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    fn spawn(&mut self) {
        self.launch();
        self.wait_for_ping();
    }

    /// Launches and waits for PONG; `false` when the server exited (its
    /// port was taken) or did not answer.
    fn try_spawn(&mut self) -> bool {
        self.launch();
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(self.port, &["ping"]).trim() != "PONG" {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            if exited || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        true
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server on PATH (scripts/test installs it)");
        self.child = Some(child);
    }

    fn wait_for_ping(&self) {
        let port = self.port;
        let deadline = Instant::now() + Duration::from_secs(10);
        while redis_cli(port, &["ping"]).trim() != "PONG" {
            assert!(
                Instant::now() < deadline,
                "redis-server on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (SIGKILL: nothing is saved).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Runs a redis-cli command against this server.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p PORT args…` output ("" when it fails).
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default()
}

/// A three-master Redis Cluster on free loopback ports, stopped on drop.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let mut args: Vec<&str> = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        let out = Command::new("redis-cli")
            .args(&args)
            .output()
            .expect("redis-cli");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        for n in &nodes {
            while !n.cli(&["cluster", "info"]).contains("cluster_state:ok") {
                assert!(Instant::now() < deadline, "cluster did not become ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Self { nodes }
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// Every key on every node.
    pub fn keys(&self) -> Vec<(u16, String)> {
        self.nodes
            .iter()
            .flat_map(|n| {
                n.cli(&["--scan"])
                    .lines()
                    .map(|k| (n.port, k.to_string()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

/// Waits (at most 10 s) until the wall clock is at least `margin` away from
/// the next minute boundary, so a test of a per-minute window never straddles
/// two windows.
pub async fn away_from_minute_boundary(margin: Duration) {
    loop {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let into = now % 60_000;
        if into >= 1_000 && 60_000 - into > margin.as_millis() as u64 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// An ext_authz CheckRequest for an HTTP request (request id `req-42`).
pub fn check_request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "req-42".into(),
                    method: method.into(),
                    path: path.into(),
                    host: "llm.example.com".into(),
                    headers: headers
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

/// A TCP proxy between a client and a server on loopback that forwards both
/// ways and, on demand, drops the reply to the next Redis script call
/// (`EVAL`/`EVALSHA`): the next chunk the server sends on the connection that
/// carried that call. Other traffic (health pings, pub/sub, clock reads on
/// other connections) is never the one dropped.
pub struct FaultProxy {
    pub port: u16,
    drop_next_reply: std::sync::Arc<std::sync::atomic::AtomicBool>,
    dropped: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Proxies 127.0.0.1:`port` (a free port) to 127.0.0.1:`upstream`.
    pub async fn start(upstream: u16) -> Self {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let drop_next_reply = std::sync::Arc::new(AtomicBool::new(false));
        let dropped = std::sync::Arc::new(AtomicU64::new(0));
        let (armed, count) = (drop_next_reply.clone(), dropped.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                // Set when this connection carried the armed script call:
                // its next server chunk is that call's reply.
                let drop_here = std::sync::Arc::new(AtomicBool::new(false));
                let (armed_up, drop_up) = (armed.clone(), drop_here.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let chunk = &buf[..n];
                        let is_script = chunk.windows(4).any(|w| w.eq_ignore_ascii_case(b"eval"));
                        if is_script && armed_up.swap(false, Ordering::SeqCst) {
                            drop_up.store(true, Ordering::SeqCst);
                        }
                        if sw.write_all(chunk).await.is_err() {
                            break;
                        }
                    }
                });
                let count = count.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match sr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if drop_here.swap(false, Ordering::SeqCst) {
                            count.fetch_add(1, Ordering::SeqCst);
                            continue;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Self {
            port,
            drop_next_reply,
            dropped,
            task,
        }
    }

    /// The reply to the next script call (on whichever connection carries
    /// it) is dropped.
    pub fn drop_next_reply(&self) {
        self.drop_next_reply
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many chunks were dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A Tollgate's `/metrics` text.
pub async fn metrics_text(admin: SocketAddr) -> String {
    raw_http(admin, "GET", "/metrics", &[], "").await.body
}

/// The value of the first metric line starting with `prefix` (0 if none).
pub fn metric_prefix(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

impl RedisServer {
    /// Starts on a given (free) port.
    pub fn start_with_port(port: u16) -> Self {
        let mut s = Self {
            child: None,
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            extra: Vec::new(),
        };
        s.spawn();
        s
    }
}

/// A Redis Sentinel (quorum 1) watching one master, stopped on drop.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl Sentinel {
    pub fn start(master_name: &str, master_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\n\
                 sentinel monitor {master_name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {master_name} 1000\n\
                 sentinel failover-timeout {master_name} 5000\n",
                dir.path().display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server --sentinel");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !redis_cli(port, &["sentinel", "get-master-addr-by-name", master_name])
            .contains(&master_port.to_string())
        {
            assert!(
                Instant::now() < deadline,
                "sentinel on {port} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `SENTINEL FAILOVER name`: promotes a replica.
    pub fn failover(&self, master_name: &str) {
        let out = redis_cli(self.port, &["sentinel", "failover", master_name]);
        assert!(out.trim() == "OK", "sentinel failover: {out}");
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub mod agents;
pub mod gateway;
/// JWT keys, tokens and a changeable identity provider.
pub mod jwt;
pub mod mcp;
pub mod otlp;
pub mod stores;
/// A throwaway PKI and raw TLS clients for the listener tests.
pub mod tls;
/// What an ext_authz answer means for the client: the HTTP status Envoy
/// would send (200 for OK), the reason code of a deny body ("allowed" for
/// OK), and the headers an allow sets for the upstream.
pub struct Verdict {
    pub status: u16,
    pub code: String,
    pub upstream_headers: Vec<(String, String)>,
    /// Headers of a denied response for the client (`retry-after`, …).
    pub deny_headers: Vec<(String, String)>,
}

/// Sends one CheckRequest to Tollgate's ext_authz service over loopback.
pub async fn ext_authz(
    tollgate: &Tollgate,
    request: envoy_types::pb::envoy::service::auth::v3::CheckRequest,
) -> Verdict {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    let mut client = AuthorizationClient::new(tollgate.channel().await);
    let resp = client.check(request).await.expect("check").into_inner();
    match resp
        .http_response
        .expect("every CheckResponse has an http_response")
    {
        HttpResponse::OkResponse(ok) => Verdict {
            status: 200,
            code: "allowed".into(),
            upstream_headers: pairs(ok.headers),
            deny_headers: Vec::new(),
        },
        HttpResponse::DeniedResponse(d) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("deny body is JSON");
            Verdict {
                status: d.status.map_or(0, |s| s.code as u16),
                code: body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                upstream_headers: Vec::new(),
                deny_headers: pairs(d.headers),
            }
        }
        HttpResponse::ErrorResponse(e) => panic!("unexpected error response {e:?}"),
    }
}

/// Header names and values of an Envoy header list.
fn pairs(
    headers: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>,
) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter_map(|h| h.header)
        .map(|h| (h.key, h.value))
        .collect()
}

/// Mutable access to the HTTP part of a CheckRequest built by
/// [`check_request`].
pub fn http_of(
    request: &mut envoy_types::pb::envoy::service::auth::v3::CheckRequest,
) -> &mut envoy_types::pb::envoy::service::auth::v3::attribute_context::HttpRequest {
    request
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
        .expect("built by check_request")
}

/// Sets the downstream peer of a CheckRequest: its socket address (or none),
/// principal and URL-encoded PEM certificate, as Envoy reports them.
pub fn set_source(
    request: &mut envoy_types::pb::envoy::service::auth::v3::CheckRequest,
    address: Option<&str>,
    principal: &str,
    certificate_pem: &str,
) {
    use envoy_types::pb::envoy::config::core::v3::{Address, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::Peer;
    let attributes = request.attributes.as_mut().expect("attributes");
    attributes.source = Some(Peer {
        address: address.map(|a| Address {
            address: Some(address::Address::SocketAddress(SocketAddress {
                address: a.to_string(),
                ..Default::default()
            })),
        }),
        principal: principal.to_string(),
        certificate: percent_encoding::utf8_percent_encode(
            certificate_pem,
            percent_encoding::NON_ALPHANUMERIC,
        )
        .to_string(),
        ..Default::default()
    });
}

/// A `tollgate.v1` request context for a chat call with an API key: the
/// base context every route action gets, as JSON.
pub fn chat_query_context() -> String {
    let mut ctx = tollgate::engine::context::base();
    tollgate::engine::context::merge(
        &mut ctx,
        &serde_json::json!({"http": {"method": "POST"}, "authn": "api_key"}),
    );
    ctx.to_string()
}

/// `tollgate.v1` `entities_json` for an API key of tenant acme with the
/// `llm:generate` scope on `tier`.
pub fn api_key_entity_json(id: &str, tier: &str) -> String {
    serde_json::json!([{
        "uid": {"type": "ApiKey", "id": id},
        "attrs": {"tenant": {"__entity": {"type": "Tenant", "id": "acme"}}, "tier": tier, "scopes": ["llm:generate"], "models": []},
        "parents": [{"type": "Tenant", "id": "acme"}]
    }])
    .to_string()
}

/// The demo keys of `examples/keys.toml` (README, "Quick start").
pub const DEMO_PAID_KEY: &str = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";
pub const DEMO_FREE_KEY: &str = "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY";

/// The real `tollgate serve` binary in its own process, on free loopback
/// ports, killed on drop.
pub struct TollgateProcess {
    pub child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl TollgateProcess {
    /// Serves `policies` with the example keys and limits; `extra` is TOML
    /// appended to the generated config (sections `[server]` and `[policy]`
    /// are already open, so extra keys go under a new section header).
    /// Waits until `/readyz` answers 200.
    pub async fn start(policies: &Path, server_extra: &str, policy_extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (grpc, admin) = (free_port(), free_port());
        let config = dir.path().join("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n{server_extra}\n\
                 [policy]\ndir = {:?}\n{policy_extra}\n\
                 [identity]\napi_keys_file = {:?}\n[quota]\nlimits_file = {:?}\n",
                policies,
                repo().join("examples/keys.toml"),
                repo().join("examples/limits.yaml"),
            ),
        )
        .expect("write config");
        let log = std::fs::File::create(dir.path().join("tollgate.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate");
        let process = Self {
            child,
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
            dir,
        };
        let admin_addr = process.admin;
        let ready = eventually(Duration::from_secs(30), || async move {
            match TcpStream::connect(admin_addr).await {
                Ok(_) => raw_http(admin_addr, "GET", "/readyz", &[], "").await.status == 200,
                Err(_) => false,
            }
        })
        .await;
        assert!(ready, "tollgate did not become ready: {}", process.log());
        process
    }

    /// What the process wrote to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tollgate.log")).unwrap_or_default()
    }

    /// True while the process runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM, as an orchestrator does.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// A gRPC channel to the listener.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.grpc))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    }
}

impl Drop for TollgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of an unlabelled-or-labelled sample in a Prometheus text
/// exposition, e.g. `tollgate_reloads_total{source="policies",result="rejected"}`.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

/// `tollgate serve --config <config>` as a child process. A shell in between
/// holds a pipe from this test process on its stdin and kills Tollgate when
/// that pipe closes, so the server also goes away if the test binary exits
/// without dropping this (a server shared through a `static`).
pub struct ServeChild {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
}

impl ServeChild {
    /// Spawns the real binary; its log goes to `log`.
    pub fn spawn(config: &Path, log: &Path) -> Self {
        let log = std::fs::File::create(log).expect("log file");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("\"$0\" --config \"$1\" serve & pid=$!; read _ignored; kill $pid; wait $pid")
            .arg(env!("CARGO_BIN_EXE_tollgate"))
            .arg(config)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate serve");
        let stdin = child.stdin.take();
        Self { child, stdin }
    }
}

impl Drop for ServeChild {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Waits until `addr` accepts TCP connections.
pub async fn wait_listening(addr: SocketAddr) -> bool {
    eventually(Duration::from_secs(30), || async move {
        TcpStream::connect(addr).await.is_ok()
    })
    .await
}

/// The nginx binary: `$NGINX_BIN`, else `nginx` on the PATH or in
/// /usr/sbin (Debian package `nginx`; scripts/test installs it).
pub fn nginx_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX_BIN") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|dir| dir.join("nginx"))
        .find(|p| p.exists());
    found.expect("no nginx; run scripts/test, which installs the Debian package")
}

/// A real nginx in the foreground with its own prefix (a temp dir holding
/// its config, pid, error log and temp files), killed on drop.
pub struct Nginx {
    child: Child,
    pub listener: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Nginx {
    /// Starts nginx on `conf` (paths relative to the prefix), whose server
    /// listens on `listen`, and waits until it accepts connections.
    pub async fn run(conf: &str, listen: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir tmp");
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("write nginx.conf");
        let error_log = dir.path().join("error.log");
        let child = Command::new(nginx_bin())
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg(&error_log)
            .arg("-c")
            .arg(&path)
            // In the foreground, one process: as root, no switch to a user
            // that could not read the temp prefix.
            .args(["-g", "daemon off; master_process off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let nginx = Self {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], listen)),
            dir,
        };
        let addr = nginx.listener;
        let ready = eventually(Duration::from_secs(20), || async move {
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(ready, "nginx did not start; see {}", nginx.error_log());
        nginx
    }

    /// The error log's contents, for assertion messages.
    pub fn error_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }
}

/// The Python of the test virtualenv: `$PYTHON_BIN`, else the `python`
/// beside the Envoy binary (scripts/test installs both into `.venv`).
pub fn python_bin() -> PathBuf {
    std::env::var_os("PYTHON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| envoy_bin().with_file_name("python"))
}

/// Sends `tollgate.v1` `ReportUsage` for `request_id` and returns its result
/// code (`report_usage_response::Result`).
pub async fn report_usage(tollgate: &Tollgate, request_id: &str, input: u64, output: u64) -> i32 {
    use tollgate::proto::decision_service_client::DecisionServiceClient;
    use tollgate::proto::{ReportUsageRequest, ReportUsageResponse};
    let mut c = DecisionServiceClient::new(tollgate.channel().await);
    let ReportUsageResponse { result } = c
        .report_usage(ReportUsageRequest {
            request_id: request_id.into(),
            input_tokens: input,
            output_tokens: output,
            cached_input_tokens: 0,
        })
        .await
        .expect("report")
        .into_inner();
    result
}

/// The demo enterprise key (`examples/keys.toml`: demo-admin, tier enterprise).
pub const DEMO_ADMIN_KEY: &str = "tg_demo-admin_FAcFFpAJpY3Jny1toWZvGvb2HtbM43Ex2LoCQa";

/// The Python with the PyPI `mcp` SDK: `$MCP_PYTHON`, else `.venv/bin/python`
/// (scripts/test installs `mcp` there).
pub fn mcp_python() -> PathBuf {
    let path = std::env::var_os("MCP_PYTHON")
        .map(PathBuf::from)
        .or_else(|| {
            // Envoy and the SDK share a virtualenv; follow $ENVOY_BIN to it.
            std::env::var_os("ENVOY_BIN")
                .map(PathBuf::from)
                .and_then(|e| e.parent().map(|d| d.join("python")))
        })
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
    assert!(
        path.exists(),
        "no Python at {}; run scripts/test, which installs the mcp SDK",
        path.display()
    );
    path
}

/// The example MCP server (`tests/mcp/bank_server.py`, PyPI `mcp`,
/// Streamable HTTP at `/mcp`) on a free port, killed on drop. `seen` lists
/// the credential headers each request reached it with.
pub struct McpServer {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for McpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl McpServer {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("server.log")).expect("log");
        let child = Command::new(mcp_python())
            .arg(repo().join("tests/mcp/bank_server.py"))
            .arg(port.to_string())
            .arg(dir.path().join("seen.txt"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn the MCP server");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let up = eventually(Duration::from_secs(30), || async move {
            TcpStream::connect(addr).await.is_ok()
        })
        .await;
        assert!(up, "MCP server did not start; see {}", dir.path().display());
        Self { child, addr, dir }
    }

    /// One line per request the server received.
    pub fn seen(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("seen.txt")).unwrap_or_default()
    }
}

/// Runs `tests/mcp/client.py URL TOKEN STEPS…` (the SDK's client) and
/// returns one JSON value per step.
pub fn mcp_client(url: &str, token: &str, steps: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(mcp_python())
        .arg(repo().join("tests/mcp/client.py"))
        .arg(url)
        .arg(token)
        .args(steps)
        .output()
        .expect("run the MCP client");
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert_eq!(
        lines.len(),
        steps.len(),
        "client output: {text}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    lines
}

/// Tollgate on the test config with its forward-auth listener on a free port
/// (trusting `trust`'s forwarded headers) and one quota rule,
/// `paid-key-per-minute` (3 a minute per paid key), for the gateway
/// end-to-end matrices; and the forward-auth listener's address.
pub async fn forward_auth_tollgate(
    trust: tollgate::config::ForwardAuthTrust,
) -> (Tollgate, SocketAddr) {
    let mut config = test_config();
    config.server.forward_auth_listen = Some("127.0.0.1:0".parse().expect("addr"));
    config.server.forward_auth_trust = trust;
    config.quota.rules = vec![
        toml::from_str(
            "name = \"paid-key-per-minute\"\nper = [\"key\"]\nunit = \"minute\"\ntiers = { paid = 3 }\n",
        )
        .expect("rule"),
    ];
    let tg = Tollgate::start(config).await;
    let fa = tg
        .running
        .as_ref()
        .and_then(|r| r.forward_auth_addr)
        .expect("forward-auth listener");
    (tg, fa)
}

/// Envoy's `HeaderMap` of `(name, value)` pairs (string values), as Envoy
/// sends request and response headers to ext_proc.
pub fn header_map(pairs: &[(&str, &str)]) -> envoy_types::pb::envoy::config::core::v3::HeaderMap {
    envoy_types::pb::envoy::config::core::v3::HeaderMap {
        headers: pairs
            .iter()
            .map(
                |(k, v)| envoy_types::pb::envoy::config::core::v3::HeaderValue {
                    key: k.to_string(),
                    value: v.to_string(),
                    raw_value: Vec::new(),
                },
            )
            .collect(),
    }
}

/// An ext_proc stream to Tollgate, as Envoy opens one per request: the
/// sender of Envoy's messages and the stream of Tollgate's replies.
pub async fn ext_proc_stream(
    tollgate: &Tollgate,
) -> (
    tokio::sync::mpsc::Sender<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest>,
    tonic::Streaming<envoy_types::pb::envoy::service::ext_proc::v3::ProcessingResponse>,
) {
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut client = ExternalProcessorClient::new(tollgate.channel().await);
    let replies = client
        .process(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("process")
        .into_inner();
    (tx, replies)
}
