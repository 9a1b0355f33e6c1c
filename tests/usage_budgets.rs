//! Token and dollar budgets (issue 16, first part): reserved at the request
//! in ext_authz, settled exactly once from `tollgate.v1` `ReportUsage`, on the
//! memory store and on Redis shared by two replicas.

mod support;

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use support::{RedisServer, Tollgate, ext_authz, test_config};
use tollgate::config::{Config, StoreKind};
use tollgate::proto::ReportUsageRequest;
use tollgate::proto::decision_service_client::DecisionServiceClient;
use tollgate::proto::report_usage_response::Result as Settle;

/// 396 bytes of text: 99 estimated tokens, plus 4 for the message = 103.
fn chat(id: &str, key: &str, model: &str, max_tokens: u64) -> CheckRequest {
    let body = serde_json::json!({
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{ "role": "user", "content": "x".repeat(396) }],
    })
    .to_string();
    let mut req = support::check_request(
        "POST",
        "/v1/chat/completions",
        &[("x-api-key", key), ("content-type", "application/json")],
        &body,
    );
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.id = id.to_string();
    }
    req
}

fn config_with(rules: &str) -> Config {
    #[derive(serde::Deserialize)]
    struct Quota {
        quota: tollgate::config::QuotaConfig,
    }
    let parsed: Quota = toml::from_str(rules).expect("quota toml");
    let mut config = test_config();
    config.quota.rules = parsed.quota.rules;
    config.quota.prices = parsed.quota.prices;
    config.quota.unknown_model_price = parsed.quota.unknown_model_price;
    config
}

async fn report(tg: &Tollgate, id: &str, input: u64, output: u64) -> i32 {
    support::report_usage(tg, id, input, output).await
}

const TOKENS: &str = r#"
[quota]
[[quota.rules]]
name = "key-tokens"
per = ["key"]
unit = "hour"
cost = "tokens"
limit = 1000
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_reserved_then_settled_exactly_once() {
    let tg = Tollgate::start(config_with(TOKENS)).await;
    let key = support::DEMO_PAID_KEY;
    // 103 input + 500 output reserved.
    let a = ext_authz(&tg, chat("a", key, "llama-3-8b", 500)).await;
    assert_eq!(a.status, 200, "{}", a.code);
    // 603 + 603 > 1000: refused up front, naming the budget.
    let b = ext_authz(&tg, chat("b", key, "llama-3-8b", 500)).await;
    assert_eq!((b.status, b.code.as_str()), (429, "over_budget"));
    // The actual usage replaces the reservation: 150 of 1000 used.
    assert_eq!(report(&tg, "a", 100, 50).await, Settle::Settled as i32);
    assert_eq!(
        report(&tg, "a", 100, 50).await,
        Settle::AlreadySettled as i32
    );
    assert_eq!(
        report(&tg, "a", 100, 900).await,
        Settle::AlreadySettled as i32,
        "a retry with other numbers changes nothing"
    );
    assert_eq!(
        report(&tg, "never-seen", 1, 1).await,
        Settle::UnknownRequest as i32
    );
    let b = ext_authz(&tg, chat("b", key, "llama-3-8b", 500)).await;
    assert_eq!(b.status, 200, "room after the refund: {}", b.code);
    // Excess usage is charged in full: b used 900 (reserved 603) → 1050 of
    // 1000, so nothing more fits.
    assert_eq!(report(&tg, "b", 100, 800).await, Settle::Settled as i32);
    let c = ext_authz(&tg, chat("c", key, "llama-3-8b", 1)).await;
    assert_eq!((c.status, c.code.as_str()), (429, "over_budget"));
    // Another key's budget is its own.
    let d = ext_authz(&tg, chat("d", support::DEMO_FREE_KEY, "llama-3-8b", 10)).await;
    assert_eq!(d.status, 200, "{}", d.code);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absurd_reports_are_refused() {
    let tg = Tollgate::start(config_with(TOKENS)).await;
    let mut c = DecisionServiceClient::new(tg.channel().await);
    for (id, input, output, cached) in [("", 1, 1, 0), ("x", u64::MAX, 1, 0), ("x", 10, 1, 11)] {
        let err = c
            .report_usage(ReportUsageRequest {
                request_id: id.into(),
                input_tokens: input,
                output_tokens: output,
                cached_input_tokens: cached,
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
}

const DOLLARS: &str = r#"
[quota]
[[quota.rules]]
name = "tenant-usd"
per = ["tenant"]
unit = "month"
cost = "usd"
limit = 0.01

[quota.prices."llama-3-8b"]
input = 1.0
output = 2.0

[quota.prices."llama-3-70b"]
input = 10.0
output = 20.0
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dollars_per_tenant_follow_each_models_price() {
    let tg = Tollgate::start(config_with(DOLLARS)).await;
    let key = support::DEMO_PAID_KEY;
    // The large model: 103 × $10 + 100 × $20 per million = 3,030 µ$ each;
    // three fit in $0.01, the fourth does not.
    for id in ["b1", "b2", "b3"] {
        assert_eq!(
            ext_authz(&tg, chat(id, key, "llama-3-70b", 100))
                .await
                .status,
            200
        );
    }
    let over = ext_authz(&tg, chat("b4", key, "llama-3-70b", 100)).await;
    assert_eq!((over.status, over.code.as_str()), (429, "over_budget"));
    // The small model's 303 µ$ still fits in what is left (910 µ$).
    assert_eq!(
        ext_authz(&tg, chat("s1", key, "llama-3-8b", 100))
            .await
            .status,
        200
    );
    // b1 used only its input (1,030 µ$): 2,000 µ$ come back.
    assert_eq!(report(&tg, "b1", 103, 0).await, Settle::Settled as i32);
    // 9,393 − 2,000 = 7,393 used; 3,030 more would be 10,423: still no.
    assert_eq!(
        ext_authz(&tg, chat("b5", key, "llama-3-70b", 100))
            .await
            .status,
        429
    );
    assert_eq!(report(&tg, "b2", 103, 0).await, Settle::Settled as i32);
    assert_eq!(
        ext_authz(&tg, chat("b6", key, "llama-3-70b", 100))
            .await
            .status,
        200
    );
    // A model without a price is refused, never charged zero.
    let unpriced = ext_authz(&tg, chat("u1", key, "acme-support-ft", 10)).await;
    assert_eq!(
        (unpriced.status, unpriced.code.as_str()),
        (400, "usage_unknown")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_capped_output_reservation_admits_a_huge_max_tokens() {
    let capped = TOKENS.replace("limit = 1000", "limit = 1000\nmax_output_share = 0.25");
    let tg = Tollgate::start(config_with(&capped)).await;
    let key = support::DEMO_PAID_KEY;
    // Uncapped, 8,000 output tokens could never fit in 1,000; capped, the
    // reservation is 103 + 250 and the request is admitted.
    let a = ext_authz(&tg, chat("huge", key, "llama-3-8b", 8000)).await;
    assert_eq!(a.status, 200, "{}", a.code);
    // It is charged what it used.
    assert_eq!(report(&tg, "huge", 103, 700).await, Settle::Settled as i32);
    let b = ext_authz(&tg, chat("next", key, "llama-3-8b", 8000)).await;
    assert_eq!(
        (b.status, b.code.as_str()),
        (429, "over_budget"),
        "803 + 353 > 1000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_budget_records_and_never_blocks() {
    let audit = TOKENS.replace("limit = 1000", "limit = 10\naudit = true");
    let tg = Tollgate::start(config_with(&audit)).await;
    for i in 0..3 {
        let v = ext_authz(
            &tg,
            chat(&format!("r{i}"), support::DEMO_PAID_KEY, "llama-3-8b", 500),
        )
        .await;
        assert_eq!(v.status, 200, "{}", v.code);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unestimated_requests_follow_the_rule() {
    let tg = Tollgate::start(config_with(TOKENS)).await;
    // No max_tokens and no default_output_tokens: refused, not free.
    let mut req = chat("n1", support::DEMO_PAID_KEY, "llama-3-8b", 1);
    let body = r#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}]}"#;
    if let Some(http) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        http.raw_body = body.as_bytes().to_vec();
        http.size = body.len() as i64;
    }
    let v = ext_authz(&tg, req.clone()).await;
    assert_eq!((v.status, v.code.as_str()), (400, "usage_unknown"));
    // With a default output reservation it is admitted.
    let with_default = TOKENS.replace("limit = 1000", "limit = 1000\ndefault_output_tokens = 256");
    let tg2 = Tollgate::start(config_with(&with_default)).await;
    assert_eq!(ext_authz(&tg2, req).await.status, 200);
}

/// Two replicas sharing Redis: concurrent reservations and reports (each
/// sent twice, to both replicas) leave exactly the actual usage counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settlement_is_exact_across_replicas_on_redis() {
    let redis = RedisServer::start();
    // Actual usage will be 816; 816 + 8,103 (one more request with
    // max_tokens 8,000) is exactly the limit.
    let rules = TOKENS.replace("limit = 1000", "limit = 8919");
    let mut config = config_with(&rules);
    config.quota.store = StoreKind::Redis;
    config.quota.redis_url = redis.url();
    config.quota.deadline_ms = 500;
    let a = Tollgate::start(config.clone()).await;
    let b = Tollgate::start(config).await;
    a.wait_for_store().await;
    b.wait_for_store().await;
    let (a, b) = (std::sync::Arc::new(a), std::sync::Arc::new(b));
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let (first, second) = if i % 2 == 0 {
            (a.clone(), b.clone())
        } else {
            (b.clone(), a.clone())
        };
        tasks.push(tokio::spawn(async move {
            let id = format!("req-{i}");
            let v = ext_authz(&first, chat(&id, support::DEMO_PAID_KEY, "llama-3-8b", 1)).await;
            assert_eq!(v.status, 200, "{}", v.code);
            let one = report(&first, &id, 10, i).await;
            let two = report(&second, &id, 10, i).await;
            (one, two)
        }));
    }
    for t in tasks {
        let (one, two) = t.await.expect("task");
        assert_eq!(
            (one, two),
            (Settle::Settled as i32, Settle::AlreadySettled as i32)
        );
    }
    // Sum of actual usage: 32 × 10 + (0 + … + 31) = 816. Fill the rest of the
    // budget exactly: 8,103 fits, one more request does not.
    let fill = ext_authz(&a, chat("fill", support::DEMO_PAID_KEY, "llama-3-8b", 8000)).await;
    assert_eq!(fill.status, 200, "{}", fill.code);
    let more = ext_authz(&b, chat("more", support::DEMO_PAID_KEY, "llama-3-8b", 1)).await;
    assert_eq!((more.status, more.code.as_str()), (429, "over_budget"));
}
