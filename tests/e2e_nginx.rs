//! End to end: real HTTP through a real nginx (examples/nginx/nginx.conf,
//! `auth_request`) to Tollgate's forward-auth listener and a tiny upstream
//! that echoes the headers it received: the matrix every gateway runs
//! ([`support::gateway::forward_auth_matrix`]).

mod support;

use support::gateway::{LARGE, SMALL, forward_auth_matrix};
use support::{DEMO_FREE_KEY, Nginx, Tollgate, free_port, raw_http, start_upstream, test_config};
use tollgate::config::ForwardAuthTrust;

/// examples/nginx/nginx.conf with only its addresses replaced.
async fn start_nginx(forward_auth: std::net::SocketAddr, upstream: u16) -> Nginx {
    let template = std::fs::read_to_string(support::repo().join("examples/nginx/nginx.conf"))
        .expect("nginx.conf");
    let listen = free_port();
    let conf = template
        .replace("127.0.0.1:9191", &forward_auth.to_string())
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{upstream}"))
        .replace(
            "listen 127.0.0.1:8080",
            &format!("listen 127.0.0.1:{listen}"),
        );
    Nginx::run(&conf, listen).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_nginx() {
    let (mut tg, fa) = support::forward_auth_tollgate(ForwardAuthTrust::Original).await;
    let (upstream, _task) = start_upstream().await;
    let nginx = start_nginx(fa, upstream.port()).await;
    forward_auth_matrix(nginx.listener, &mut tg, &|| nginx.error_log()).await;
}

/// The forward-auth listener without nginx: Traefik / Caddy headers when
/// trusted, and the default (nothing trusted) refusing forwarded headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_auth_trust_is_bound_to_the_listener() {
    async fn start(trust: ForwardAuthTrust) -> (Tollgate, std::net::SocketAddr) {
        let mut config = test_config();
        config.server.forward_auth_listen = Some("127.0.0.1:0".parse().expect("addr"));
        config.server.forward_auth_trust = trust;
        let tg = Tollgate::start(config).await;
        let fa = tg
            .running
            .as_ref()
            .and_then(|r| r.forward_auth_addr)
            .expect("forward-auth listener");
        (tg, fa)
    }
    let key = ("x-api-key", DEMO_FREE_KEY);

    // Default: the auth request's own line is decided on; a forged
    // X-Forwarded-Uri or X-Original-URI refuses it instead of changing it.
    let (mut tg, fa) = start(ForwardAuthTrust::None).await;
    assert_eq!(raw_http(fa, "GET", SMALL, &[key], "").await.status, 200);
    assert_eq!(raw_http(fa, "GET", LARGE, &[key], "").await.status, 403);
    for forged in ["x-forwarded-uri", "x-original-uri"] {
        let r = raw_http(fa, "GET", LARGE, &[key, (forged, SMALL)], "").await;
        assert_eq!(r.status, 400, "{forged}");
        assert_eq!(r.json()["error"]["code"], "untrusted_forwarded_header");
    }
    tg.stop().await;

    // Traefik / Caddy: X-Forwarded-* describe the request; X-Original-* are
    // not read; a missing required header is refused.
    let (mut tg, fa) = start(ForwardAuthTrust::Forwarded).await;
    let forwarded = |uri: &'static str| {
        vec![
            key,
            ("x-forwarded-method", "GET"),
            ("x-forwarded-uri", uri),
            ("x-forwarded-host", "llm.example.com"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-for", "203.0.113.9"),
        ]
    };
    let ok = raw_http(fa, "GET", "/", &forwarded(SMALL), "").await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        ok.header("x-tollgate-principal"),
        Some("ApiKey::\"demo-free\"")
    );
    let mut original = forwarded(LARGE);
    original.push(("x-original-uri", SMALL));
    assert_eq!(raw_http(fa, "GET", "/", &original, "").await.status, 403);
    // An absolute-form target naming another host than X-Forwarded-Host,
    // and an encoded path, get the same checks as Envoy's :path.
    let absolute = raw_http(
        fa,
        "GET",
        "/",
        &forwarded("http://admin.internal/v1/models/llama-3-8b"),
        "",
    )
    .await;
    assert_eq!(absolute.status, 400);
    assert_eq!(absolute.json()["error"]["code"], "ambiguous_host");
    let encoded = raw_http(fa, "GET", "/", &forwarded("/v1/models%2Fllama-3-8b"), "").await;
    assert_eq!(encoded.status, 400);
    assert_eq!(encoded.json()["error"]["code"], "ambiguous_path");
    let missing = raw_http(fa, "GET", SMALL, &[key, ("x-forwarded-method", "GET")], "").await;
    assert_eq!(missing.status, 400);
    assert_eq!(missing.json()["error"]["code"], "missing_forwarded_header");
    tg.stop().await;
}
