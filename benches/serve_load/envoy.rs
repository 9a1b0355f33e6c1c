//! End to end through Envoy: Envoy (concurrency 1) with ext_authz and the
//! rate limit filter on one route, in front of a backend that answers at
//! once (nginx `return 200`, one worker), asking first the empty server,
//! then Tollgate (memory store, one Tokio worker); `wrk` drives 16
//! connections with the chat request. Run by `scripts/bench-envoy`.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use super::procs::{EmptyServer, Tollgate, free_port, http_get};
use super::{API_KEY, CHAT_BODY, env};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(addr: SocketAddr, path: &str, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !http_get(addr, path).is_some_and(|r| r.starts_with("HTTP/1.1 200")) {
        assert!(std::time::Instant::now() < deadline, "{what} not ready");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// The nginx master; stopped with SIGTERM so that it takes its worker
/// along (SIGKILL would leave the worker running).
struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// nginx answering 200 to everything, one worker.
fn backend(dir: &std::path::Path) -> (Nginx, u16) {
    let port = free_port();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nworker_processes 1;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx.err warn;\n\
             events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {dir}; \
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"ok\\n\"; }} }} }}\n",
            dir = dir.display()
        ),
    )
    .expect("nginx.conf");
    let child = Command::new("nginx")
        .args(["-p", &dir.display().to_string(), "-c"])
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx on PATH");
    let child = Nginx(child);
    wait_for(SocketAddr::from(([127, 0, 0, 1], port)), "/", "nginx");
    (child, port)
}

fn envoy_yaml(listen: u16, admin: u16, decider: u16, backend: u16) -> String {
    format!(
        r#"admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: {admin} }} }}
static_resources:
  listeners:
  - name: gateway
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: {listen} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: gateway
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ prefix: "/" }}
                route:
                  cluster: backend
                  rate_limits:
                  - actions:
                    - request_headers: {{ header_name: x-tenant, descriptor_key: tenant }}
                    - generic_key: {{ descriptor_key: model, descriptor_value: llama-3-8b }}
          http_filters:
          - name: envoy.filters.http.ext_authz
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz
              transport_api_version: V3
              grpc_service: {{ envoy_grpc: {{ cluster_name: decider }}, timeout: 1s }}
              failure_mode_allow: false
              with_request_body: {{ max_request_bytes: 65536, allow_partial_message: true, pack_as_bytes: true }}
          - name: envoy.filters.http.ratelimit
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit
              domain: bench
              timeout: 1s
              failure_mode_deny: true
              rate_limit_service:
                transport_api_version: V3
                grpc_service: {{ envoy_grpc: {{ cluster_name: decider }} }}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: decider
    type: STATIC
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: decider
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {decider} }} }} }} }}] }}]
  - name: backend
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: backend
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {backend} }} }} }} }}] }}]
"#
    )
}

/// What `wrk` reported.
struct WrkRun {
    rps: f64,
    non_2xx: u64,
}

fn wrk(url: &str, script: &std::path::Path, secs: u64) -> WrkRun {
    let out = Command::new("wrk")
        .args(["-t1", "-c16", &format!("-d{secs}s"), "-s"])
        .arg(script)
        .arg(url)
        .output()
        .expect("wrk on PATH");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    WrkRun {
        rps: field("Requests/sec:").unwrap_or(0.0),
        non_2xx: field("Non-2xx or 3xx responses:").unwrap_or(0.0) as u64,
    }
}

/// Envoy in front of `backend`, asking `decider`; wrk's rate after a warm-up.
fn through_envoy(dir: &std::path::Path, decider: u16, backend: u16, secs: u64) -> WrkRun {
    let (listen, admin) = (free_port(), free_port());
    let yaml = dir.join(format!("envoy-{decider}.yaml"));
    std::fs::write(&yaml, envoy_yaml(listen, admin, decider, backend)).expect("envoy.yaml");
    let envoy_bin = std::env::var("ENVOY_BIN").unwrap_or_else(|_| "envoy".into());
    let log = std::fs::File::create(dir.join(format!("envoy-{decider}.log"))).expect("log");
    let _envoy = Killed(
        Command::new(envoy_bin)
            .arg("-c")
            .arg(&yaml)
            .args(["--disable-hot-restart", "--concurrency", "1"])
            .args(["--log-level", "warn", "--base-id", &decider.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("envoy ($ENVOY_BIN)"),
    );
    wait_for(SocketAddr::from(([127, 0, 0, 1], admin)), "/ready", "envoy");
    let script = dir.join("chat.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.body = '{CHAT_BODY}'\n\
             wrk.headers[\"content-type\"] = \"application/json\"\n\
             wrk.headers[\"x-api-key\"] = \"{API_KEY}\"\n\
             wrk.headers[\"x-tenant\"] = \"acme\"\n"
        ),
    )
    .expect("wrk script");
    let url = format!("http://127.0.0.1:{listen}/v1/chat/completions");
    let warm = wrk(&url, &script, 2);
    assert_eq!(warm.non_2xx, 0, "warm-up saw refused requests");
    wrk(&url, &script, secs)
}

/// Runs the comparison and prints a Markdown table.
pub fn compare() {
    let secs = env("TG_BENCH_SECS", 10) as u64;
    let dir = tempfile::tempdir().expect("tempdir");
    let (_nginx, backend_port) = backend(dir.path());
    let direct = wrk(
        &format!("http://127.0.0.1:{backend_port}/"),
        &{
            let p = dir.path().join("get.lua");
            std::fs::write(&p, "").expect("script");
            p
        },
        2,
    );
    let empty = EmptyServer::start();
    let floor = through_envoy(dir.path(), empty.addr.port(), backend_port, secs);
    drop(empty);
    let ours = through_tollgate(dir.path(), backend_port, secs, false);
    let cached = through_tollgate(dir.path(), backend_port, secs, true);
    println!(
        "\nEnvoy concurrency 1, wrk -t1 -c16 {secs} s, chat request; backend nginx (1 worker) alone: {:.0} req/s\n",
        direct.rps
    );
    println!("| decider | req/s through Envoy | non-2xx | **ratio** |");
    println!("|---|---|---|---|");
    println!(
        "| empty ext_authz + rate limit server | {:.0} | {} | 1 |",
        floor.rps, floor.non_2xx
    );
    for (name, run) in [
        ("Tollgate (memory store)", &ours),
        ("Tollgate (memory store), decision cache on", &cached),
    ] {
        println!(
            "| {name} | {:.0} | {} | **{:.2}** |",
            run.rps,
            run.non_2xx,
            run.rps / floor.rps.max(1.0)
        );
    }
}

/// Tollgate (memory store, the decision cache on or off) behind Envoy; checks
/// that Tollgate counted both calls and allowed them.
fn through_tollgate(dir: &std::path::Path, backend_port: u16, secs: u64, cache: bool) -> WrkRun {
    let tollgate = Tollgate::start("memory", 6379, cache);
    let run = through_envoy(dir, tollgate.grpc.port(), backend_port, secs);
    let metrics = http_get(tollgate.admin, "/metrics").unwrap_or_default();
    let counted = |prefix: &str, outcome: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(outcome))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let (authz, rls) = (
        counted("tollgate_decisions_total", "outcome=\"allow\""),
        counted("tollgate_rate_limit_decisions_total", "outcome=\"ok\""),
    );
    println!(
        "Tollgate (decision cache {cache}) counted {authz} allowed Check and {rls} OK ShouldRateLimit answers."
    );
    assert!(authz > 0.0 && rls > 0.0, "Tollgate did not see both calls");
    run
}
