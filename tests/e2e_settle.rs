//! Usage settled from the response through a real Envoy (issue 16): the
//! example config's ext_proc filter streams each response to Tollgate, which
//! reads its usage — an OpenAI JSON `usage` block, an SSE stream's final
//! usage chunk, or a stream without one (counted) — and settles the token
//! budget reserved at ext_authz, releasing the concurrency slot it took.

mod support;

use std::time::Duration;

use support::{Envoy, Tollgate, eventually, metric_prefix, metrics_text, raw_http, test_config};

/// An OpenAI-style upstream: JSON with `usage` (100 in, 50 out), or, for
/// `"stream": true`, an SSE stream whose last chunk carries the same usage —
/// unless the request sets `x-no-usage`, when the stream has none (8 bytes of
/// text: 2 tokens counted).
async fn start_llm() -> std::net::SocketAddr {
    use axum::http::{HeaderMap, header};
    let app = axum::Router::new().fallback(|headers: HeaderMap, body: String| async move {
        let stream = body.contains("\"stream\":true");
        if !stream {
            return (
                [(header::CONTENT_TYPE, "application/json")],
                r#"{"id":"c1","choices":[{"message":{"content":"hi"}}],"usage":{"prompt_tokens":100,"completion_tokens":50}}"#.to_string(),
            );
        }
        let mut sse = String::from("data: {\"choices\":[{\"delta\":{\"content\":\"abcd\"}}]}\n\n");
        sse.push_str("data: {\"choices\":[{\"delta\":{\"content\":\"efgh\"}}]}\n\n");
        if !headers.contains_key("x-no-usage") {
            sse.push_str("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":100,\"completion_tokens\":50}}\n\n");
        }
        sse.push_str("data: [DONE]\n\n");
        ([(header::CONTENT_TYPE, "text/event-stream")], sse)
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
async fn budgets_are_settled_from_responses_through_envoy() {
    #[derive(serde::Deserialize)]
    struct Quota {
        quota: tollgate::config::QuotaConfig,
    }
    let parsed: Quota = toml::from_str(
        "[quota]\n[[quota.rules]]\nname = \"key-tokens\"\nper = [\"key\"]\nunit = \"hour\"\ncost = \"tokens\"\nlimit = 1200\n\
         [[quota.rules]]\nname = \"key-inflight\"\nper = [\"key\"]\ncost = \"concurrent\"\nlimit = 1\n",
    )
    .expect("toml");
    let mut config = test_config();
    config.quota.rules = parsed.quota.rules;
    let tg = Tollgate::start(config).await;
    let llm = start_llm().await;
    let envoy = Envoy::start(tg.grpc.port(), llm.port()).await;
    let listener = envoy.listener;
    let admin = tg.admin;
    let settled = move || async move {
        metric_prefix(
            &metrics_text(admin).await,
            "tollgate_usage_settlements_total{result=\"settled\"}",
        )
    };
    let chat = move |stream: bool, no_usage: bool| async move {
        let body = format!(
            r#"{{"model":"llama-3-8b","max_tokens":500,"stream":{stream},"messages":[{{"role":"user","content":"{}"}}]}}"#,
            "x".repeat(396)
        );
        let mut headers = vec![
            ("x-api-key", support::DEMO_PAID_KEY),
            ("content-type", "application/json"),
        ];
        if no_usage {
            headers.push(("x-no-usage", "1"));
        }
        raw_http(listener, "POST", "/v1/chat/completions", &headers, &body)
            .await
            .status
    };
    // One request in flight at a time: each is admitted only because the
    // previous one's slot was released when its response ended.
    // Each request reserves 103 + 500 = 603 of 1200, and uses 150 (or, for
    // the stream without usage, 103 estimated + 2 counted). Without
    // settlement the second request would already be refused.
    let cases = [
        (false, false),
        (true, false),
        (true, true),
        (false, false),
        (true, false),
    ];
    for (n, (stream, no_usage)) in cases.into_iter().enumerate() {
        assert_eq!(
            chat(stream, no_usage).await,
            200,
            "request {n} ({stream}, {no_usage})"
        );
        let want = (n + 1) as f64;
        assert!(
            eventually(
                Duration::from_secs(5),
                || async move { settled().await >= want }
            )
            .await,
            "request {n} was never settled from its response: {}",
            metrics_text(admin)
                .await
                .lines()
                .filter(|l| l.contains("settle") || l.contains("decisions_total"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // 150 + 150 + 105 + 150 + 150 = 705 used: 603 more does not fit (the
    // fifth request fitted only because the fourth was settled: 555 + 603).
    assert_eq!(chat(false, false).await, 429);
}
