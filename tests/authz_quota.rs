//! Quotas charged inside ext_authz `Check`: 429 with `Retry-After` and the
//! RateLimit headers, tier profiles, and tenant isolation.

mod support;

use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use support::{Tollgate, away_from_minute_boundary, test_config};
use tollgate::config::{Config, HeaderStyle};
use tollgate::quota::rules::QuotaRule;

fn chat(key: &str, model: &str) -> CheckRequest {
    support::check_request(
        "POST",
        "/v1/chat/completions",
        &[("x-api-key", key)],
        &format!(r#"{{"model":"{model}"}}"#),
    )
}

/// (HTTP status, headers on the denied or allowed response).
fn outcome(resp: &CheckResponse) -> (u16, HashMap<String, String>, String) {
    match resp.http_response.as_ref().expect("http_response") {
        HttpResponse::OkResponse(ok) => (
            200,
            ok.response_headers_to_add
                .iter()
                .filter_map(|h| h.header.as_ref().map(|h| (h.key.clone(), h.value.clone())))
                .collect(),
            String::new(),
        ),
        HttpResponse::DeniedResponse(d) => (
            d.status.as_ref().map_or(0, |s| s.code as u16),
            d.headers
                .iter()
                .filter_map(|h| h.header.as_ref().map(|h| (h.key.clone(), h.value.clone())))
                .collect(),
            d.body.clone(),
        ),
        HttpResponse::ErrorResponse(e) => panic!("error response {e:?}"),
    }
}

/// Asks about `key` chatting with `model`.
async fn ask(
    c: &mut AuthorizationClient<tonic::transport::Channel>,
    key: &str,
    model: &str,
) -> (u16, HashMap<String, String>, String) {
    outcome(&c.check(chat(key, model)).await.expect("check").into_inner())
}

fn rules_config(toml_rules: &str) -> Config {
    #[derive(serde::Deserialize)]
    struct Rules {
        rules: Vec<QuotaRule>,
    }
    let parsed: Rules = toml::from_str(toml_rules).expect("rules parse");
    let mut config = test_config();
    config.quota.rules = parsed.rules;
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_quota_is_429_with_retry_after_and_ratelimit_headers() {
    let config = rules_config(
        r#"
[[rules]]
name = "key-per-minute"
per = ["key"]
unit = "minute"
tiers = { free = 3, paid = 100 }
"#,
    );
    let mut tg = Tollgate::start(config).await;
    let mut c = AuthorizationClient::new(tg.channel().await);
    away_from_minute_boundary(std::time::Duration::from_secs(5)).await;
    for i in 0..3 {
        let (status, headers, _) = ask(
            &mut c,
            "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
            "llama-3-8b",
        )
        .await;
        assert_eq!(status, 200, "request {i}");
        assert_eq!(
            headers.get("ratelimit-limit").map(String::as_str),
            Some("3")
        );
        assert_eq!(
            headers.get("ratelimit-remaining"),
            Some(&(2 - i).to_string())
        );
    }
    let resp = c
        .check(chat(
            "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
            "llama-3-8b",
        ))
        .await
        .expect("check")
        .into_inner();
    let (status, headers, body) = outcome(&resp);
    assert_eq!(status, 429);
    let retry: u64 = headers
        .get("retry-after")
        .expect("retry-after")
        .parse()
        .expect("seconds");
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(
        headers.get("ratelimit-remaining").map(String::as_str),
        Some("0")
    );
    let body: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(body["error"]["code"], "over_quota");
    assert_eq!(body["error"]["rule"], "key-per-minute");

    // A policy deny is not charged: a denied request never reaches the quota.
    let (status, _, _) = ask(
        &mut c,
        "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
        "globex-legal-ft",
    )
    .await;
    assert_eq!(status, 403);
    let (_, headers, _) = ask(
        &mut c,
        "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
        "llama-3-8b",
    )
    .await;
    assert_eq!(
        headers.get("ratelimit-remaining").map(String::as_str),
        Some("99"),
        "the 403 consumed nothing"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_free_flood_leaves_enterprise_quota_untouched() {
    let mut config = rules_config(
        r#"
[[rules]]
name = "key-per-minute"
per = ["key"]
unit = "minute"
tiers = { free = 10, enterprise = 1000 }
"#,
    );
    config.quota.headers = HeaderStyle::Ietf;
    let mut tg = Tollgate::start(config).await;
    let mut c = AuthorizationClient::new(tg.channel().await);
    away_from_minute_boundary(std::time::Duration::from_secs(5)).await;
    let mut allowed = 0;
    for _ in 0..100 {
        let (status, _, _) = ask(
            &mut c,
            "tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
            "llama-3-8b",
        )
        .await;
        if status == 200 {
            allowed += 1;
        } else {
            assert_eq!(status, 429);
        }
    }
    assert_eq!(allowed, 10, "the free key gets exactly its tier's limit");
    let (status, headers, _) = ask(
        &mut c,
        "tg_demo-admin_FAcFFpAJpY3Jny1toWZvGvb2HtbM43Ex2LoCQa",
        "llama-3-70b",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("ratelimit-policy").map(String::as_str),
        Some("\"key-per-minute\";q=1000;w=60")
    );
    let remaining = headers.get("ratelimit").expect("RateLimit header");
    assert!(
        remaining.starts_with("\"key-per-minute\";r=999;t="),
        "{remaining}"
    );
    tg.stop().await;
}
