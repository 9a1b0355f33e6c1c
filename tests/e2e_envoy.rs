//! End to end: real HTTP through a real Envoy (examples/envoy/envoy.yaml) to
//! Tollgate and a tiny upstream that echoes the headers it received.

mod support;

use support::{Envoy, Tollgate, raw_http, start_upstream, test_config};

const CHAT: &str = "/v1/chat/completions";

fn upstream_headers(resp: &support::HttpResponse, name: &str) -> Vec<String> {
    resp.json()["headers"]
        .as_array()
        .expect("echoed headers")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_through_envoy() {
    let mut tg = Tollgate::start(test_config()).await;
    let (upstream, _task) = start_upstream().await;
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    let gw = envoy.listener;
    let json = [("content-type", "application/json")];

    // A valid key reaches the upstream, which sees Tollgate's identity headers
    // and none of the client's forged ones.
    let ok = raw_http(
        gw,
        "POST",
        CHAT,
        &[
            json[0],
            (
                "x-api-key",
                "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
            ),
            ("x-tollgate-principal", "ApiKey::\"root\""),
            ("x-tollgate-tenant", "globex"),
            ("x-tollgate-debug", "1"),
        ],
        r#"{"model":"llama-3-8b","messages":[]}"#,
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        upstream_headers(&ok, "x-tollgate-principal"),
        vec!["ApiKey::\"demo-paid\""]
    );
    assert_eq!(upstream_headers(&ok, "x-tollgate-tenant"), vec!["acme"]);
    assert!(upstream_headers(&ok, "x-tollgate-debug").is_empty());

    // Wrong key: 401 with WWW-Authenticate and a reason code.
    let unknown = tollgate::identity::key_format::generate("nobody").expect("key");
    let bad = raw_http(
        gw,
        "POST",
        CHAT,
        &[json[0], ("x-api-key", &unknown)],
        r#"{"model":"llama-3-8b"}"#,
    )
    .await;
    assert_eq!(bad.status, 401);
    assert!(
        bad.header("www-authenticate")
            .is_some_and(|v| v.starts_with("Bearer"))
    );
    assert_eq!(bad.json()["error"]["code"], "invalid_credential");

    // Policy deny: a free key on a large model.
    let denied = raw_http(
        gw,
        "POST",
        CHAT,
        &[
            json[0],
            (
                "authorization",
                "Bearer tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
            ),
        ],
        r#"{"model":"llama-3-70b"}"#,
    )
    .await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["error"]["code"], "policy_denied");
    assert!(
        !denied.body.contains("forbid"),
        "no policy text in the deny body"
    );

    // Path tricks never reach the upstream.
    for path in [
        "/v1/chat/../chat/completions",
        "/v1/chat/%2e%2e/chat/completions",
        "/v1/chat%2Fcompletions",
        "/v1//chat/completions",
        "/v1/models/llama-3-8b%2F..%2F..%2Fadmin",
    ] {
        let r = raw_http(
            gw,
            "POST",
            path,
            &[
                json[0],
                (
                    "x-api-key",
                    "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
                ),
            ],
            r#"{"model":"llama-3-8b"}"#,
        )
        .await;
        assert!(
            matches!(r.status, 400 | 403 | 404),
            "{path} answered {}",
            r.status
        );
    }

    // With Tollgate stopped, Envoy fails closed.
    tg.stop().await;
    let closed = raw_http(
        gw,
        "POST",
        CHAT,
        &[
            json[0],
            (
                "x-api-key",
                "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
            ),
        ],
        r#"{"model":"llama-3-8b"}"#,
    )
    .await;
    assert!(
        closed.status == 403 || closed.status >= 500,
        "Tollgate down but Envoy answered {}",
        closed.status
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "domain: llm\ndescriptors:\n  - key: tenant\n    rate_limit: { unit: minute, requests_per_unit: 3 }\n",
    )
    .expect("write limits");
    let mut config = test_config();
    config.quota.limits_file = Some(limits);
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<tollgate::quota::rules::QuotaRule>,
    }
    let rules: Rules = toml::from_str(
        "[[rules]]\nname = \"paid-key-per-minute\"\nper = [\"key\"]\nunit = \"minute\"\ntiers = { paid = 2 }\n",
    )
    .expect("rules");
    config.quota.rules = rules.rules;
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    support::away_from_minute_boundary(std::time::Duration::from_secs(10)).await;
    let json = ("content-type", "application/json");
    let body = r#"{"model":"llama-3-8b"}"#;

    // Envoy's ratelimit filter → Tollgate's RLS: the tenant (from Tollgate's
    // own header) gets 3 per minute, the 4th is 429 with the headers.
    let admin = [
        json,
        (
            "x-api-key",
            "tg_demo-admin_FAcFFpAJpY3Jny1toWZvGvb2HtbM43Ex2LoCQa",
        ),
    ];
    for i in 0..3 {
        let r = raw_http(envoy.listener, "POST", CHAT, &admin, body).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    let limited = raw_http(envoy.listener, "POST", CHAT, &admin, body).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.header("x-envoy-ratelimited"), Some("true"));
    assert_eq!(limited.header("ratelimit-remaining"), Some("0"));
    assert_eq!(limited.header("ratelimit-limit"), Some("3"));

    // Quota charged inside ext_authz: the paid globex key gets 2 per minute,
    // the 3rd is Tollgate's own 429 with Retry-After.
    let globex = [
        json,
        (
            "x-api-key",
            "tg_demo-globex_yBbjeNm0bA39bTc7QNb3XbD6xs4RtFQ62kcZfO",
        ),
    ];
    for i in 0..2 {
        let r = raw_http(envoy.listener, "POST", CHAT, &globex, body).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
    }
    let over = raw_http(envoy.listener, "POST", CHAT, &globex, body).await;
    assert_eq!(over.status, 429);
    assert!(
        over.header("retry-after")
            .is_some_and(|v| v.parse::<u64>().is_ok())
    );
    assert_eq!(over.json()["error"]["rule"], "paid-key-per-minute");
    assert_eq!(
        over.header("x-envoy-ratelimited"),
        None,
        "decided in ext_authz, not the ratelimit filter"
    );
    tg.stop().await;
}
