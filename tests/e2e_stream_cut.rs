//! A hard token budget crossed mid-stream ends the stream cleanly (issue 16
//! item 8), through a real Envoy: the stand-in upstream streams 40 events of
//! 10 tokens each (no usage block) while the budget's `max_output_share`
//! caps the reservation at 30 output tokens. With `on_exceed =
//! "end_stream"` the client gets the complete events that fit in the
//! reservation plus the budget's headroom, then one `event: error`, and the
//! budget is charged what was generated; without it the stream completes.

mod support;

use std::time::Duration;

use support::{Envoy, Tollgate, eventually, metrics_text, raw_http, test_config};

const EVENTS: usize = 40;
/// 40 bytes of text: 10 counted tokens.
const TEXT: &str = "abcdefghijabcdefghijabcdefghijabcdefghij";

/// An OpenAI-style upstream streaming [`EVENTS`] deltas and `[DONE]`.
async fn start_llm() -> std::net::SocketAddr {
    use axum::http::header;
    let app = axum::Router::new().fallback(|| async move {
        let mut sse = String::new();
        for _ in 0..EVENTS {
            sse.push_str(&format!(
                "data: {{\"choices\":[{{\"delta\":{{\"content\":\"{TEXT}\"}}}}]}}\n\n"
            ));
        }
        sse.push_str("data: [DONE]\n\n");
        ([(header::CONTENT_TYPE, "text/event-stream")], sse)
    });
    support::serve_axum(app).await.0
}

/// Streams one chat completion under a 300-token budget; returns the body
/// the client read and what the budget was charged in the end.
async fn stream_under_budget(on_exceed: &str) -> (String, f64) {
    #[derive(serde::Deserialize)]
    struct Quota {
        quota: tollgate::config::QuotaConfig,
    }
    let parsed: Quota = toml::from_str(&format!(
        "[quota]\n[[quota.rules]]\nname = \"key-tokens\"\nper = [\"key\"]\nunit = \"hour\"\ncost = \"tokens\"\nlimit = 300\nmax_output_share = 0.1\n{on_exceed}\n"
    ))
    .expect("toml");
    let mut config = test_config();
    config.quota.rules = parsed.quota.rules;
    let tg = Tollgate::start(config).await;
    let llm = start_llm().await;
    let envoy = Envoy::start(tg.grpc.port(), llm.port()).await;
    let body = format!(
        r#"{{"model":"llama-3-8b","max_tokens":500,"stream":true,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(396)
    );
    let headers = [
        ("x-api-key", support::DEMO_PAID_KEY),
        ("content-type", "application/json"),
    ];
    let resp = raw_http(
        envoy.listener,
        "POST",
        "/v1/chat/completions",
        &headers,
        &body,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let admin = tg.admin;
    let charged = move || async move {
        metrics_text(admin)
            .await
            .lines()
            .filter(|l| l.starts_with("tollgate_usage_charged_total{"))
            .filter(|l| l.contains("rule=\"key-tokens\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert!(
        eventually(
            Duration::from_secs(5),
            || async move { charged().await > 0.0 }
        )
        .await,
        "the stream was never settled: {}",
        metrics_text(admin).await
    );
    (resp.body, charged().await)
}

fn deltas(body: &str) -> usize {
    body.matches(TEXT).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_crossing_an_end_stream_budget_ends_with_an_error_event() {
    let (body, charged) = stream_under_budget("on_exceed = \"end_stream\"").await;
    // Reserved 103 estimated input + 30 output (0.1 × 300); headroom left
    // 167: the stream may generate 197 output tokens. 19 events (190) fit,
    // the 20th (200) crosses and is withheld.
    assert_eq!(deltas(&body), 19, "{body}");
    let events: Vec<&str> = body.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 20, "{body}");
    let last = events.last().copied().unwrap_or_default();
    let data = last
        .strip_prefix("event: error\ndata: ")
        .unwrap_or_else(|| panic!("the last event is not an error event: {last:?}"));
    let error: serde_json::Value = serde_json::from_str(data).expect("error event JSON");
    assert_eq!(error["error"]["code"], "over_budget");
    assert_eq!(error["error"]["rule"], "key-tokens");
    assert!(!body.contains("[DONE]"), "{body}");
    // Charged what was generated: the estimated input and 20 events.
    assert_eq!(charged, 103.0 + 200.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_setting_the_stream_completes_and_is_charged_in_full() {
    let (body, charged) = stream_under_budget("").await;
    assert_eq!(deltas(&body), EVENTS, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");
    assert!(!body.contains("event: error"), "{body}");
    assert_eq!(charged, 103.0 + 400.0);
}
