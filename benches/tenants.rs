//! Many tenants' policies (issue 17, section 1): start-up, resident memory,
//! decision latency and one-file reload of the real `tollgate serve`.
//!
//! For each N it writes a policy directory: the example policies
//! (`policies/`) plus N per-tenant policies
//!
//! ```text
//! permit (principal is ApiKey, action == Action::"list_models", resource)
//! when { principal.tenant == Tenant::"t<i>" && context.http.method == "GET" };
//! ```
//!
//! one file per tenant (`TG_LAYOUT=files`, the SaaS layout) or all in one
//! file (`TG_LAYOUT=one`). It starts the `tollgate` binary this bench was
//! built with on that directory (Tokio worker threads: `TG_SERVER_THREADS`,
//! default 1), and measures:
//!
//! - start-up: from spawn to the first answered `Check`;
//! - resident memory (`VmRSS`) after the load, and the peak (`VmHWM`);
//! - `Check` GET /v1/models with the example paid key (tenant `acme`, so
//!   no tenant policy applies): sequential p50 / p99 over `TG_REQUESTS`
//!   calls, and the rate with 16 in flight on one HTTP/2 connection for 2 s;
//! - reload: one tenant's file rewritten, until `/policy` shows the new
//!   version (watch debounce 10 ms included).
//!
//! ```text
//! cargo bench --bench tenants
//! TG_TENANTS=10,10000,100000 TG_LAYOUT=one cargo bench --bench tenants
//! ```
//!
//! `TG_KEEP=dir` writes the last directory there and keeps it (for
//! profiling `tollgate validate` on it). Prints a Markdown table.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use tonic::transport::Channel;

const PAID_KEY: &str = "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen";

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// One tenant's policy, as in the issue.
pub fn tenant_policy(i: usize) -> String {
    format!(
        "@id(\"tenant-t{i}-list\")\npermit (principal is ApiKey, action == Action::\"list_models\", resource)\nwhen {{ principal.tenant == Tenant::\"t{i}\" && context.http.method == \"GET\" }};\n"
    )
}

/// Writes the example policies plus `n` tenants' policies into `dir`.
fn generate(dir: &Path, n: usize, one_file: bool) {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::create_dir_all(dir).expect("policy dir");
    for entry in std::fs::read_dir(&examples).expect("examples") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            let name = path.file_name().expect("name");
            std::fs::copy(&path, dir.join(name)).expect("copy");
        }
    }
    if one_file {
        let text: String = (0..n).map(tenant_policy).collect();
        std::fs::write(dir.join("tenants.cedar"), text).expect("write");
    } else {
        for i in 0..n {
            std::fs::write(dir.join(format!("tenant-t{i}.cedar")), tenant_policy(i))
                .expect("write");
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn check_request() -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "llm.example.com"),
        (":method", "GET"),
        (":path", "/v1/models"),
        ("x-api-key", PAID_KEY),
        ("user-agent", "loadgen/1.0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                time: None,
                http: Some(HttpRequest {
                    id: "bench".into(),
                    method: "GET".into(),
                    path: "/v1/models".into(),
                    host: "llm.example.com".into(),
                    headers,
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            ..Default::default()
        }),
    }
}

/// Kills the server when the measurement ends, however it ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn proc_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn check(channel: Channel, req: CheckRequest) -> bool {
    AuthorizationClient::new(channel)
        .check(req)
        .await
        .is_ok_and(|r| r.get_ref().status.as_ref().map(|s| s.code) == Some(0))
}

async fn policy_version(admin: SocketAddr) -> Option<String> {
    let body: serde_json::Value = reqwest::get(format!("http://{admin}/policy"))
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    body.get("version")?.as_str().map(str::to_string)
}

struct Row {
    n: usize,
    startup: Duration,
    rss_mib: f64,
    peak_mib: f64,
    p50: Duration,
    p99: Duration,
    rate: f64,
    reload: Duration,
}

async fn measure(n: usize, one_file: bool, keep: Option<&Path>) -> Row {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = keep.map_or_else(|| tmp.path().join("policies"), Path::to_path_buf);
    if keep.is_some() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    generate(&dir, n, one_file);
    let (grpc, admin) = (free_port(), free_port());
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let (keys, limits) = (examples.join("keys.toml"), examples.join("limits.yaml"));
    let config = tmp.path().join("tollgate.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [policy]\ndir = {dir:?}\nwatch = true\nreload_debounce_ms = 10\nreload_poll_secs = 0\n\
             [identity]\napi_keys_file = {keys:?}\n[quota]\nlimits_file = {limits:?}\n[log]\nlevel = \"warn\"\n"
        ),
    )
    .expect("config");
    let bin = std::env::var("TG_TOLLGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_tollgate")));
    let started = Instant::now();
    let server = Server(
        Command::new(bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("TOKIO_WORKER_THREADS", env_or("TG_SERVER_THREADS", "1"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn tollgate"),
    );
    let pid = server.0.id();
    let addr: SocketAddr = ([127, 0, 0, 1], grpc).into();
    let admin: SocketAddr = ([127, 0, 0, 1], admin).into();
    let req = check_request();
    let channel = loop {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "tollgate did not answer within 600 s"
        );
        if let Ok(ch) = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            && check(ch.clone(), req.clone()).await
        {
            break ch;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let startup = started.elapsed();

    for _ in 0..200 {
        assert!(check(channel.clone(), req.clone()).await, "must allow");
    }
    let count: usize = env_or("TG_REQUESTS", "3000").parse().unwrap_or(3000);
    let mut lat = Vec::with_capacity(count);
    for _ in 0..count {
        let t = Instant::now();
        assert!(check(channel.clone(), req.clone()).await, "must allow");
        lat.push(t.elapsed());
    }
    lat.sort();
    let (p50, p99) = (lat[lat.len() / 2], lat[lat.len() * 99 / 100]);

    let deadline = Instant::now() + Duration::from_secs(2);
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let (channel, req) = (channel.clone(), req.clone());
            tokio::spawn(async move {
                let mut done = 0u64;
                while Instant::now() < deadline {
                    assert!(check(channel.clone(), req.clone()).await, "must allow");
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("task");
    }
    let rate = total as f64 / 2.0;
    let rss_mib = proc_kib(pid, "VmRSS:") as f64 / 1024.0;
    let peak_mib = proc_kib(pid, "VmHWM:") as f64 / 1024.0;

    // Reload: one tenant's policy changes (GET → HEAD).
    let before = policy_version(admin).await;
    let file = if one_file {
        dir.join("tenants.cedar")
    } else {
        dir.join("tenant-t0.cedar")
    };
    let text = std::fs::read_to_string(&file).expect("read");
    let changed = text.replacen("\"GET\"", "\"HEAD\"", 1);
    let t = Instant::now();
    std::fs::write(&file, changed).expect("rewrite");
    loop {
        let now = policy_version(admin).await;
        if now.is_some() && now != before {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "reload not seen within 600 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let reload = t.elapsed();
    drop(server);
    Row {
        n,
        startup,
        rss_mib,
        peak_mib,
        p50,
        p99,
        rate,
        reload,
    }
}

fn main() {
    let tenants: Vec<usize> = env_or("TG_TENANTS", "10,1000,3000,10000")
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let one_file = env_or("TG_LAYOUT", "files") == "one";
    let keep = std::env::var("TG_KEEP").ok().map(PathBuf::from);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "layout: {}; server worker threads: {}; client: one thread, one HTTP/2 connection",
        if one_file {
            "all tenants in one file"
        } else {
            "one file per tenant"
        },
        env_or("TG_SERVER_THREADS", "1")
    );
    println!(
        "\n| tenants' policies | start-up | RSS (peak) | sequential p50 / p99 | 16 in flight | reload one file |"
    );
    println!("|---|---|---|---|---|---|");
    let mut base = None;
    for n in tenants {
        let row = rt.block_on(measure(n, one_file, keep.as_deref()));
        let base_p50 = *base.get_or_insert(row.p50);
        println!(
            "| {} | {:.2} s | {:.0} MiB ({:.0} MiB) | {:.0} µs / {:.0} µs ({:.2}× first row) | {:.0}/s | {:.0} ms |",
            row.n,
            row.startup.as_secs_f64(),
            row.rss_mib,
            row.peak_mib,
            row.p50.as_secs_f64() * 1e6,
            row.p99.as_secs_f64() * 1e6,
            row.p50.as_secs_f64() / base_p50.as_secs_f64(),
            row.rate,
            row.reload.as_secs_f64() * 1e3,
        );
    }
}
