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
            ("x-api-key", "tg_demo_paid_acme"),
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
    let bad = raw_http(
        gw,
        "POST",
        CHAT,
        &[json[0], ("x-api-key", "tg_wrong")],
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
        &[json[0], ("authorization", "Bearer tg_demo_free_acme")],
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
            &[json[0], ("x-api-key", "tg_demo_paid_acme")],
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
        &[json[0], ("x-api-key", "tg_demo_paid_acme")],
        r#"{"model":"llama-3-8b"}"#,
    )
    .await;
    assert!(
        closed.status == 403 || closed.status >= 500,
        "Tollgate down but Envoy answered {}",
        closed.status
    );
}
