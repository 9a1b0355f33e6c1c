//! The tool-call check across replicas (issue 18, item 5): Envoy's
//! ext_authz and ext_proc calls of one request may reach different
//! Tollgate replicas. With a shared quota store (Redis), the replica that
//! allowed the request keeps the tools it may call in the store, and the
//! other replica's ext_proc refuses a model's call of any other tool.
//! Over gRPC on loopback, two Tollgates on one real redis-server.

mod support;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as In;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Out;
use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
use support::{DEMO_PAID_KEY, RedisServer, Tollgate, check_request, ext_authz, test_config};
use tollgate::config::StoreKind;

fn headers(pairs: &[(&str, &str)]) -> Option<HeaderMap> {
    Some(support::header_map(pairs))
}

/// The chat answer of a model calling `tool`, through `tg`'s ext_proc for
/// request `id`: the HTTP status Tollgate answers in its place (403) or
/// `None` when the answer passes.
async fn answer_calling(tg: &Tollgate, id: &str, tool: &str) -> Option<u32> {
    let (tx, mut replies) = support::ext_proc_stream(tg).await;
    let body = format!(
        r#"{{"id":"c1","choices":[{{"message":{{"role":"assistant","tool_calls":[{{"id":"call_1","type":"function","function":{{"name":"{tool}","arguments":"{{}}"}}}}]}}}}]}}"#
    );
    let messages = [
        In::RequestHeaders(HttpHeaders {
            headers: headers(&[(":path", "/v1/chat/completions"), ("x-request-id", id)]),
            ..Default::default()
        }),
        In::ResponseHeaders(HttpHeaders {
            headers: headers(&[(":status", "200"), ("content-type", "application/json")]),
            ..Default::default()
        }),
        In::ResponseBody(HttpBody {
            body: body.into_bytes(),
            end_of_stream: true,
            ..Default::default()
        }),
    ];
    let mut last = None;
    for m in messages {
        tx.send(ProcessingRequest {
            request: Some(m),
            ..Default::default()
        })
        .await
        .expect("send");
        last = replies
            .message()
            .await
            .expect("reply")
            .expect("a reply")
            .response;
    }
    match last {
        Some(Out::ImmediateResponse(r)) => r.status.map(|s| s.code as u32),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_call_is_checked_by_the_replica_that_did_not_decide_it() {
    let redis = RedisServer::start();
    let mut config = test_config();
    config.agents.tools.enabled = true;
    config.quota.store = StoreKind::Redis;
    config.quota.redis_url = redis.url();
    let a = Tollgate::start(config.clone()).await;
    let b = Tollgate::start(config).await;
    a.wait_for_store().await;
    b.wait_for_store().await;
    let body = r#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{"name":"get_weather","parameters":{"type":"object"}}}]}"#;
    for id in ["tc-1", "tc-2"] {
        let req = check_request(
            "POST",
            "/v1/chat/completions",
            &[
                ("x-api-key", DEMO_PAID_KEY),
                ("content-type", "application/json"),
                ("x-request-id", id),
            ],
            body,
        );
        let v = ext_authz(&a, req).await;
        assert_eq!(v.status, 200, "{}", v.code);
    }
    // Replica B never decided these requests.
    assert_eq!(
        answer_calling(&b, "tc-1", "send_email").await,
        Some(403),
        "a tool the request was never allowed to call passed on the other replica"
    );
    assert_eq!(answer_calling(&b, "tc-2", "get_weather").await, None);
}
