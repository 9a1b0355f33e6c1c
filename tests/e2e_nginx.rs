//! End to end: real HTTP through a real nginx (examples/nginx/nginx.conf,
//! `auth_request`) to Tollgate's forward-auth listener and a tiny upstream
//! that echoes the headers it received.

mod support;

use support::{
    DEMO_FREE_KEY, DEMO_PAID_KEY, Nginx, Tollgate, free_port, raw_http, start_upstream, test_config,
};
use tollgate::config::ForwardAuthTrust;

const GLOBEX_KEY: &str = "tg_demo-globex_yBbjeNm0bA39bTc7QNb3XbD6xs4RtFQ62kcZfO";
const SMALL: &str = "/v1/models/llama-3-8b";
const LARGE: &str = "/v1/models/llama-3-70b";

fn upstream_headers(resp: &support::HttpResponse, name: &str) -> Vec<String> {
    resp.json()["headers"]
        .as_array()
        .expect("echoed headers")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

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
    let gw = nginx.listener;
    support::away_from_minute_boundary(std::time::Duration::from_secs(10)).await;

    // A valid key reaches the upstream with Tollgate's identity headers in
    // place of the client's forged ones.
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
    assert_eq!(ok.status, 200, "{} {}", ok.body, nginx.error_log());
    assert_eq!(
        upstream_headers(&ok, "x-tollgate-principal"),
        vec!["ApiKey::\"demo-paid\""]
    );
    assert_eq!(upstream_headers(&ok, "x-tollgate-tenant"), vec!["acme"]);
    assert_eq!(upstream_headers(&ok, "x-tollgate-tier"), vec!["paid"]);

    // Wrong key: 401 with WWW-Authenticate; no key: 401 too.
    let unknown = tollgate::identity::key_format::generate("nobody").expect("key");
    let bad = raw_http(gw, "GET", SMALL, &[("x-api-key", &unknown)], "").await;
    assert_eq!(bad.status, 401);
    assert!(
        bad.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    // Refused requests never reach the upstream: no echo, and no identity
    // headers a forged one could hide behind.
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
        vec![("x-original-uri", SMALL), ("x-original-method", "GET")],
        vec![("x-forwarded-uri", SMALL), ("x-forwarded-method", "GET")],
    ] {
        let mut headers = vec![("authorization", auth.as_str())];
        headers.extend(forged.iter().copied());
        let denied = raw_http(gw, "GET", LARGE, &headers, "").await;
        assert_eq!(denied.status, 403, "forged {forged:?}");
    }

    // Path tricks never reach the upstream.
    for path in [
        "/v1/models/../models/llama-3-8b",
        "/v1/models/%2e%2e/models/llama-3-8b",
        "/v1/models%2Fllama-3-8b",
        "/v1//models/llama-3-8b",
        "/v1/models/llama-3-8b%2F..%2F..%2Fadmin",
    ] {
        let r = raw_http(gw, "GET", path, &[("x-api-key", DEMO_PAID_KEY)], "").await;
        assert!(
            matches!(r.status, 400 | 403 | 404),
            "{path} answered {}: {}",
            r.status,
            r.body
        );
    }

    // A body nginx cannot forward is never decided as if it were empty.
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
        "body-dependent route through nginx answered {}",
        chat.status
    );

    // Quota: the paid globex key gets 3 per minute, the 4th is 429 with
    // Retry-After and the RateLimit headers.
    for i in 0..3 {
        let r = raw_http(gw, "GET", SMALL, &[("x-api-key", GLOBEX_KEY)], "").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    let over = raw_http(gw, "GET", SMALL, &[("x-api-key", GLOBEX_KEY)], "").await;
    assert_eq!(over.status, 429, "{}", nginx.error_log());
    assert!(
        over.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1))
    );
    assert_eq!(over.header("ratelimit-remaining"), Some("0"));

    // With Tollgate stopped, nginx fails closed.
    tg.stop().await;
    let closed = raw_http(gw, "GET", SMALL, &[("x-api-key", DEMO_PAID_KEY)], "").await;
    assert!(
        closed.status >= 500,
        "Tollgate down but nginx answered {}",
        closed.status
    );
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
