//! End to end: real HTTP through a real Caddy (examples/caddy/Caddyfile,
//! `forward_auth`) to Tollgate's forward-auth listener trusting the
//! `X-Forwarded-*` convention, and a tiny upstream that echoes the headers
//! it received — the same matrix as the nginx test.

mod support;

use support::{Caddy, DEMO_FREE_KEY, DEMO_PAID_KEY, free_port, raw_http, start_upstream};
use tollgate::config::ForwardAuthTrust;

const GLOBEX_KEY: &str = "tg_demo-globex_yBbjeNm0bA39bTc7QNb3XbD6xs4RtFQ62kcZfO";
const SMALL: &str = "/v1/models/llama-3-8b";
const LARGE: &str = "/v1/models/llama-3-70b";

fn upstream_headers(resp: &support::HttpResponse, name: &str) -> Vec<String> {
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

/// examples/caddy/Caddyfile with only its addresses replaced.
async fn start_caddy(forward_auth: std::net::SocketAddr, upstream: u16) -> Caddy {
    let template = std::fs::read_to_string(support::repo().join("examples/caddy/Caddyfile"))
        .expect("Caddyfile");
    let listen = free_port();
    let conf = template
        .replace("127.0.0.1:9191", &forward_auth.to_string())
        .replace("127.0.0.1:8000", &format!("127.0.0.1:{upstream}"))
        .replace("http://:8080", &format!("http://:{listen}"));
    Caddy::run(&conf, listen).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_caddy() {
    let (mut tg, fa) = support::forward_auth_tollgate(ForwardAuthTrust::Forwarded).await;
    let (upstream, _task) = start_upstream().await;
    let caddy = start_caddy(fa, upstream.port()).await;
    let gw = caddy.listener;
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
    assert_eq!(ok.status, 200, "{} {}", ok.body, caddy.log());
    assert!(
        ok.body.contains("headers"),
        "not the upstream's answer: {:?} {:?} {}",
        ok.headers,
        ok.body,
        caddy.log()
    );
    assert_eq!(
        upstream_headers(&ok, "x-tollgate-principal"),
        vec!["ApiKey::\"demo-paid\""]
    );
    assert_eq!(upstream_headers(&ok, "x-tollgate-tenant"), vec!["acme"]);
    assert_eq!(upstream_headers(&ok, "x-tollgate-tier"), vec!["paid"]);

    // Wrong key: 401 with WWW-Authenticate, never reaching the upstream.
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

    // Policy deny, also when the client forges the headers that describe
    // the original request (Caddy sets its own X-Forwarded-*).
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

    // Quota: 3 per minute for the paid globex key, the 4th is 429 with
    // Retry-After and the RateLimit headers.
    for i in 0..3 {
        let r = raw_http(gw, "GET", SMALL, &[("x-api-key", GLOBEX_KEY)], "").await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    let over = raw_http(gw, "GET", SMALL, &[("x-api-key", GLOBEX_KEY)], "").await;
    assert_eq!(over.status, 429, "{}", caddy.log());
    assert!(
        over.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok_and(|s| s >= 1))
    );
    assert_eq!(over.header("ratelimit-remaining"), Some("0"));

    // With Tollgate stopped, Caddy fails closed.
    tg.stop().await;
    let closed = raw_http(gw, "GET", SMALL, &[("x-api-key", DEMO_PAID_KEY)], "").await;
    assert!(
        closed.status >= 500,
        "Tollgate down but Caddy answered {}",
        closed.status
    );
}
