//! The processes a serving benchmark drives: the empty server (this bench
//! binary re-executed with [`EMPTY_SERVER_FLAG`]), the release `tollgate`
//! binary, and `redis-server`. Each is killed on drop.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use crate::common::{Redis, free_port, wait_until};

/// Argument that turns this bench binary into the empty server.
pub const EMPTY_SERVER_FLAG: &str = "--empty-server";

/// Serves the empty services on 127.0.0.1 with one Tokio worker; prints the
/// address as the first stdout line, then serves until killed.
pub fn run_empty_server() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("server runtime");
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        println!("{}", listener.local_addr().expect("addr"));
        crate::common::serve_empty(listener).await;
    });
}

/// The empty server process.
pub struct EmptyServer {
    child: Child,
    pub addr: SocketAddr,
}

impl EmptyServer {
    pub fn start() -> Self {
        let mut child = Command::new(std::env::current_exe().expect("own path"))
            .arg(EMPTY_SERVER_FLAG)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn the empty server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("empty server address");
        let addr = line.trim().parse().expect("address");
        Self { child, addr }
    }
}

impl EmptyServer {
    /// Address and process id.
    pub fn target(&self) -> (SocketAddr, u32) {
        (self.addr, self.child.id())
    }
}

impl Drop for EmptyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Status line of a plain HTTP/1.1 GET on `addr`.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// Tollgate's `log.level` in the benchmark.
pub fn log_level() -> String {
    std::env::var("TG_LOG_LEVEL").unwrap_or_else(|_| "info".into())
}

/// The limits file both servers' rate limit calls are judged against: one
/// limit the load never reaches.
pub const LIMITS: &str = "domain: bench\ndescriptors:\n  - key: tenant\n    descriptors:\n      - key: model\n        rate_limit: { unit: hour, requests_per_unit: 4000000000 }\n";

/// The release `tollgate serve` process with one Tokio worker.
pub struct Tollgate {
    child: Child,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Tollgate {
    /// Serves the example policies and keys, one per-key quota rule that
    /// the load never exhausts, [`LIMITS`], on `store` ("memory" or
    /// "redis", the latter on `redis_port`); with `decision_cache`, the
    /// policy decision cache on (`[policy] decision_cache`).
    pub fn start(store: &str, redis_port: u16, decision_cache: bool) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (grpc, admin) = (free_port(), free_port());
        let limits = dir.path().join("limits.yaml");
        std::fs::write(&limits, LIMITS).expect("limits");
        let config = dir.path().join("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 [policy]\ndir = {:?}\nwatch = false\n{}\
                 [identity]\napi_keys_file = {:?}\n\
                 [quota]\nstore = \"{store}\"\nredis_url = \"redis://127.0.0.1:{redis_port}/0\"\nlimits_file = {:?}\n\
                 [[quota.rules]]\nname = \"key-per-hour\"\nper = [\"key\"]\nunit = \"hour\"\nrequests_per_unit = 4000000000\n\
                 [log]\nlevel = \"{}\"\n",
                repo().join("policies"),
                if decision_cache {
                    "decision_cache = { max_entries = 10000, ttl_secs = 60 }\n"
                } else {
                    ""
                },
                repo().join("examples/keys.toml"),
                limits,
                log_level(),
            ),
        )
        .expect("config");
        let log = std::fs::File::create(dir.path().join("tollgate.log")).expect("log");
        let child = Command::new(tollgate_bin())
            .arg("--config")
            .arg(&config)
            .arg("serve")
            .env("TOKIO_WORKER_THREADS", "1")
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tollgate");
        let admin = SocketAddr::from(([127, 0, 0, 1], admin));
        let t = Self {
            child,
            grpc: SocketAddr::from(([127, 0, 0, 1], grpc)),
            admin,
            _dir: dir,
        };
        wait_until("tollgate", || {
            http_get(admin, "/readyz").is_some_and(|r| r.starts_with("HTTP/1.1 200"))
        });
        t
    }

    /// gRPC address and process id.
    pub fn target(&self) -> (SocketAddr, u32) {
        (self.grpc, self.child.id())
    }

    /// Resident set size of the process, KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Tollgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release binary cargo built beside this bench (benches see
/// `CARGO_BIN_EXE_*`), or `TG_TOLLGATE_BIN`.
fn tollgate_bin() -> PathBuf {
    std::env::var_os("TG_TOLLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_BIN_EXE_tollgate")).to_path_buf())
}
