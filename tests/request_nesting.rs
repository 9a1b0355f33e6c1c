//! Request inputs that reach recursive code nest only so deep: JSON bodies
//! (serde_json's 128-level limit, or skipped without recursion),
//! `metadata_context` structs (prost's 100-level decode limit; Tollgate's own
//! conversion stops at 16), JWT payloads, and the
//! decision API's JSON. Each deep input gets a clear refusal, and the server
//! answers the next request.

mod support;

use std::collections::HashMap;

use envoy_types::pb::envoy::config::core::v3::Metadata;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use support::{Tollgate, check_request, test_config};
use tollgate::proto::decision_service_client::DecisionServiceClient;
use tollgate::proto::{self, EntityUid};

const PAID: (&str, &str) = (
    "x-api-key",
    "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
);
const CHAT: &str = "/v1/chat/completions";

/// (HTTP status Envoy would send, reason code).
fn outcome(resp: &CheckResponse) -> (u16, String) {
    match resp.http_response.as_ref().expect("http_response") {
        HttpResponse::OkResponse(_) => (200, "allowed".into()),
        HttpResponse::DeniedResponse(d) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("deny body is JSON");
            (
                d.status.as_ref().map(|s| s.code).unwrap_or_default() as u16,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
        HttpResponse::ErrorResponse(e) => panic!("unexpected error response {e:?}"),
    }
}

fn nested_array(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

fn chat(body: &str) -> CheckRequest {
    check_request(
        "POST",
        CHAT,
        &[PAID, ("content-type", "application/json")],
        body,
    )
}

async fn still_serving(client: &mut AuthorizationClient<tonic::transport::Channel>) {
    let resp = client
        .check(chat(r#"{"model":"llama-3-8b","messages":[]}"#))
        .await
        .expect("the server still answers")
        .into_inner();
    assert_eq!(outcome(&resp).0, 200);
}

/// The body fields Tollgate reads are typed; everything else (`messages`,
/// the elements of `tools`) is skipped by serde_json's iterative
/// `ignore_value`, so no depth reaches recursive code. A nested value where
/// a typed field is expected goes through serde_json's 128-level limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_json_bodies_never_reach_recursion() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = AuthorizationClient::new(tg.channel().await);
    for depth in [127, 129, 10_000, 200_000] {
        for field in ["messages", "tools"] {
            let body = format!(
                r#"{{"model":"llama-3-8b","{field}":{}}}"#,
                nested_array(depth)
            );
            let resp = client.check(chat(&body)).await.expect("check").into_inner();
            assert_eq!(
                outcome(&resp).0,
                200,
                "{field} at {depth} levels is skipped"
            );
        }
        for field in ["model", "max_tokens", "stream"] {
            let body = format!(
                r#"{{"model":"llama-3-8b","{field}":{}}}"#,
                nested_array(depth)
            );
            let resp = client.check(chat(&body)).await.expect("check").into_inner();
            assert_eq!(
                outcome(&resp),
                (400, "malformed_body".to_string()),
                "{field} at {depth}"
            );
        }
    }
    still_serving(&mut client).await;
    tg.stop().await;
}

/// A protobuf Value nesting `depth` lists.
fn deep_value(depth: usize) -> Value {
    let mut v = Value {
        kind: Some(Kind::StringValue("x".into())),
    };
    for _ in 0..depth {
        v = Value {
            kind: Some(Kind::ListValue(ListValue { values: vec![v] })),
        };
    }
    v
}

fn with_jwt_authn_metadata(depth: usize) -> CheckRequest {
    let mut req = chat(r#"{"model":"llama-3-8b"}"#);
    let payload = Struct {
        fields: HashMap::from([("deep".to_string(), deep_value(depth))]),
    };
    let attrs = req.attributes.as_mut().expect("attributes");
    attrs.metadata_context = Some(Metadata {
        filter_metadata: HashMap::from([(
            tollgate::identity::jwt::JWT_AUTHN_NAMESPACE.to_string(),
            Struct {
                fields: HashMap::from([(
                    "jwt_payload".to_string(),
                    Value {
                        kind: Some(Kind::StructValue(payload)),
                    },
                )]),
            },
        )]),
        ..Default::default()
    });
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_metadata_context_is_refused_at_decode_or_conversion() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = AuthorizationClient::new(tg.channel().await);
    // Within both limits: decided as usual. (prost's limit counts messages:
    // each list level is a Value and a ListValue, so about 46 levels here.)
    let resp = client
        .check(with_jwt_authn_metadata(10))
        .await
        .expect("check");
    // Decided as usual, not refused as malformed: the request's API key
    // beside a JWT Envoy verified is two callers (issue 8.2), a 401.
    assert_eq!(
        outcome(&resp.into_inner()),
        (401, "ambiguous_credential".to_string())
    );
    // Past Tollgate's 16 levels, within prost's limit: a malformed request.
    let resp = client
        .check(with_jwt_authn_metadata(30))
        .await
        .expect("check");
    assert_eq!(
        outcome(&resp.into_inner()),
        (400, "malformed_request".to_string())
    );
    // Past prost's decode limit: the RPC fails (Envoy, failing closed, denies).
    // (The client encodes recursively too, so the test stays at 120 levels.)
    for depth in [60, 120] {
        let err = client
            .check(with_jwt_authn_metadata(depth))
            .await
            .expect_err("prost refuses to decode");
        assert!(err.message().contains("recursion limit"), "{err:?}");
    }
    still_serving(&mut client).await;
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_jwt_payloads_are_malformed_credentials() {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let dead = support::free_port();
    let mut config = test_config();
    config.identity.jwt_issuers = vec![
        toml::from_str(&format!(
            "name = \"idp\"\nissuer = \"https://idp.example\"\naudiences = [\"t\"]\njwks_url = \"http://127.0.0.1:{dead}/jwks\"\n"
        ))
        .expect("issuer"),
    ];
    let mut tg = Tollgate::start(config).await;
    let mut client = AuthorizationClient::new(tg.channel().await);
    for depth in [200, 3_000] {
        let payload = format!(
            r#"{{"iss":"https://idp.example","deep":{}}}"#,
            nested_array(depth)
        );
        let token = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"RS256","typ":"JWT"}"#),
            b64(&payload)
        );
        let bearer = format!("Bearer {token}");
        let req = check_request(
            "POST",
            CHAT,
            &[
                ("authorization", &bearer),
                ("content-type", "application/json"),
            ],
            r#"{"model":"llama-3-8b"}"#,
        );
        let resp = client.check(req).await.expect("check").into_inner();
        assert_eq!(outcome(&resp).0, 401, "payload {depth} levels deep");
    }
    still_serving(&mut client).await;
    tg.stop().await;
}

fn nested_object(depth: usize) -> String {
    format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_decision_api_json_is_an_invalid_argument() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = DecisionServiceClient::new(tg.channel().await);
    let uid = |t: &str, id: &str| {
        Some(EntityUid {
            r#type: t.into(),
            id: id.into(),
        })
    };
    let request = |context_json: String, entities_json: String| proto::CheckRequest {
        principal: uid("ApiKey", "k"),
        action: uid("Action", "chat"),
        resource: uid("Model", "llama-3-8b"),
        context_json,
        entities_json,
    };
    for depth in [40, 100, 127, 5_000] {
        let deep = nested_object(depth);
        let err = client
            .check(request(format!(r#"{{"extra":{deep}}}"#), String::new()))
            .await
            .expect_err("too deep");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("context_json"), "{err:?}");
        let entities = format!(
            r#"[{{"uid":{{"type":"ApiKey","id":"k"}},"attrs":{{"x":{deep}}},"parents":[]}}]"#
        );
        let err = client
            .check(request(String::new(), entities))
            .await
            .expect_err("too deep");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("entities_json"), "{err:?}");
    }
    tg.stop().await;
}
