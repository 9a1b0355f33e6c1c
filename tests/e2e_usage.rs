//! Usage charged after the response through a real Envoy (issue 15.1): the
//! ratelimit filter checks with `hits_addend` 0 on the request and charges
//! the response's token count with `apply_on_stream_done`; once the budget is
//! spent, the next request gets 429.

mod support;

use std::time::Duration;

use support::{Envoy, Tollgate, eventually, free_port, raw_http, test_config};

/// An upstream that reports `tokens` used in `x-usage-tokens`.
async fn start_llm(tokens: u64) -> std::net::SocketAddr {
    let app = axum::Router::new().fallback(move || async move {
        ([("x-usage-tokens", tokens.to_string())], "{\"ok\":true}")
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_charged_after_the_response_spend_the_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let limits = dir.path().join("limits.yaml");
    std::fs::write(
        &limits,
        "domain: usage\ndescriptors:\n  - key: principal\n    rate_limit: { unit: hour, requests_per_unit: 1000, charge: always }\n",
    )
    .expect("limits");
    let mut config = test_config();
    config.quota.limits_file = Some(limits);
    let tg = Tollgate::start(config).await;
    let llm = start_llm(400).await;
    let template =
        std::fs::read_to_string(support::repo().join("examples/envoy/usage-after-response.yaml"))
            .expect("example");
    let (listen, admin) = (free_port(), free_port());
    let yaml = template
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace(
            "port_value: 50051",
            &format!("port_value: {}", tg.grpc.port()),
        )
        .replace("port_value: 8080", &format!("port_value: {}", llm.port()));
    let envoy = Envoy::run(&yaml, listen, admin).await;
    let listener = envoy.listener;
    let chat = move |key: &'static str| async move {
        raw_http(
            listener,
            "POST",
            "/v1/chat/completions",
            &[("x-api-key", key), ("content-type", "application/json")],
            r#"{"model":"llama-3-8b","messages":[],"max_tokens":64}"#,
        )
        .await
        .status
    };
    let get = move || chat(support::DEMO_PAID_KEY);
    // Rate limit answers so far: one check per request, one charge per
    // finished stream.
    let answered = |admin| async move {
        let m = support::metrics_text(admin).await;
        support::metric_prefix(&m, "tollgate_rate_limit_decisions_total{outcome=\"ok\"}")
            + support::metric_prefix(
                &m,
                "tollgate_rate_limit_decisions_total{outcome=\"over_limit\"}",
            )
    };
    // 400 tokens each: 0 → 400 → 800 → 1200. The third response crosses the
    // limit and is still counted in full, so the fourth request is refused.
    for n in 1..=3u32 {
        assert_eq!(get().await, 200, "request {n}");
        let admin = tg.admin;
        assert!(
            eventually(Duration::from_secs(5), || async move {
                answered(admin).await >= f64::from(2 * n)
            })
            .await,
            "the stream-done charge of request {n} never arrived"
        );
    }
    assert_eq!(
        get().await,
        429,
        "the budget was spent by usage past the limit, yet the request passed"
    );
    // Another caller's budget is untouched.
    assert_eq!(chat(support::DEMO_FREE_KEY).await, 200);
}
