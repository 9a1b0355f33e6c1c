//! Response hashes in the audit trail, through a real Envoy: the example
//! config's ext_proc filter streams each response to Tollgate, which
//! records the upstream's status and the SHA-256 and size of the body as
//! the upstream sent it — never the body — in an `api = "response"` record
//! joined to the request's decision by `request_id`.

mod support;

use std::time::Duration;

use sha2::{Digest, Sha256};
use support::{Envoy, Tollgate, eventually, raw_http, test_config};

/// What the upstream answers: JSON for a plain request, an event stream in
/// several chunks for `"stream": true`.
const JSON_ANSWER: &str = r#"{"id":"c1","choices":[{"message":{"content":"answer-marker-5521"}}],"usage":{"prompt_tokens":10,"completion_tokens":2}}"#;
const SSE_CHUNKS: [&str; 3] = [
    "data: {\"choices\":[{\"delta\":{\"content\":\"stream-marker-\"}}]}\n\n",
    "data: {\"choices\":[{\"delta\":{\"content\":\"7734\"}}]}\n\n",
    "data: [DONE]\n\n",
];

async fn start_llm() -> std::net::SocketAddr {
    use axum::http::header;
    let app = axum::Router::new().fallback(|body: String| async move {
        if body.contains("\"stream\":true") {
            let chunks = SSE_CHUNKS.map(|c| Ok::<_, std::convert::Infallible>(c.to_string()));
            let stream = tokio_stream::iter(chunks);
            (
                [(header::CONTENT_TYPE, "text/event-stream")],
                axum::body::Body::from_stream(stream),
            )
        } else {
            (
                [(header::CONTENT_TYPE, "application/json")],
                axum::body::Body::from(JSON_ANSWER),
            )
        }
    });
    support::serve_axum(app).await.0
}

fn records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_are_audited_by_hash_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let mut config = test_config();
    config.audit.enabled = true;
    config.audit.path = audit.clone();
    let mut tg = Tollgate::start(config).await;
    let llm = start_llm().await;
    let envoy = Envoy::start(tg.grpc.port(), llm.port()).await;
    let chat = |stream: bool, id: &'static str| {
        let gw = envoy.listener;
        async move {
            let body = format!(
                r#"{{"model":"llama-3-8b","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#
            );
            raw_http(
                gw,
                "POST",
                "/v1/chat/completions",
                &[
                    ("x-api-key", support::DEMO_PAID_KEY),
                    ("content-type", "application/json"),
                    ("x-request-id", id),
                ],
                &body,
            )
            .await
        }
    };
    let json = chat(false, "resp-json").await;
    assert_eq!(json.status, 200, "{}", json.body);
    assert_eq!(json.body, JSON_ANSWER);
    let sse = chat(true, "resp-sse").await;
    assert_eq!(sse.status, 200, "{}", sse.body);
    let sse_body = SSE_CHUNKS.concat();

    let response_of = |id: &str| {
        records(&audit)
            .into_iter()
            .find(|r| r["request_id"] == id && r["api"] == "response")
    };
    let both = eventually(Duration::from_secs(10), || {
        let done = response_of("resp-json").is_some() && response_of("resp-sse").is_some();
        async move { done }
    })
    .await;
    assert!(both, "no response records: {:?}", records(&audit));
    tg.stop().await;

    for (id, body) in [("resp-json", JSON_ANSWER), ("resp-sse", sse_body.as_str())] {
        let record = response_of(id).expect("response record");
        let response = &record["response"];
        assert_eq!(response["status"], 200, "{record}");
        assert_eq!(
            response["body_sha256"].as_str(),
            Some(hex::encode(Sha256::digest(body.as_bytes())).as_str()),
            "{id}: the hash of the body the client received"
        );
        assert_eq!(response["body_bytes"], body.len() as u64);
        assert_eq!(response["complete"], true);
        assert_eq!(record["decision"], "response");
        // The decision that let the request through has the same id.
        assert!(
            records(&audit)
                .iter()
                .any(|r| r["request_id"] == id && r["api"] == "http" && r["decision"] == "allow"),
            "no decision record for {id}"
        );
    }
    // Hashes only: no answer text in the trail, and the chain verifies.
    let text = std::fs::read_to_string(&audit).expect("audit file");
    for marker in ["answer-marker-5521", "stream-marker-", "7734\""] {
        assert!(!text.contains(marker), "{marker} leaked into the trail");
    }
    tollgate::audit::verify(&[audit]).expect("the chain verifies");
}
