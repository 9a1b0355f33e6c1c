//! Tollgate's gRPC listener on a real loopback port: health, reflection,
//! Envoy ext_authz Check and the tollgate.v1 decision API.

mod support;

use std::collections::HashMap;

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use support::{Tollgate, test_config};
use tollgate::proto::decision_service_client::DecisionServiceClient;
use tollgate::proto::{self, EntityUid};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn http(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> CheckRequest {
    support::check_request(method, path, headers, body)
}

/// A request whose headers come as raw bytes (Envoy's `encode_raw_headers`).
fn raw_header_request(key: &[u8]) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue};
    let mut req = http("POST", CHAT, &[], r#"{"model":"llama-3-8b"}"#);
    if let Some(h) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        h.header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "x-api-key".into(),
                value: String::new(),
                raw_value: key.to_vec(),
            }],
        });
    }
    req
}

/// HTTP status Envoy would send (200 for OK), the reason code from a deny body.
fn outcome(resp: &CheckResponse) -> (u16, String) {
    let status = resp
        .status
        .as_ref()
        .expect("every CheckResponse carries a status");
    match resp
        .http_response
        .as_ref()
        .expect("every CheckResponse carries an http_response")
    {
        HttpResponse::OkResponse(_) => {
            assert_eq!(status.code, 0);
            (200, "allowed".into())
        }
        HttpResponse::DeniedResponse(d) => {
            assert_ne!(status.code, 0, "a denied response must not carry gRPC OK");
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("deny body is JSON");
            // Envoy's request id is echoed; a request without one gets ours.
            let id = body["error"]["request_id"].as_str().unwrap_or_default();
            assert!(
                id == "req-42" || (resp.dynamic_metadata.is_some() && id.len() == 36),
                "request id {id:?}"
            );
            let code = d.status.as_ref().map(|s| s.code).unwrap_or_default();
            (
                code as u16,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        }
        HttpResponse::ErrorResponse(e) => panic!("unexpected error response {e:?}"),
    }
}

const PAID: (&str, &str) = (
    "x-api-key",
    "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen",
);
const FREE: (&str, &str) = (
    "authorization",
    "Bearer tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
);
const CHAT: &str = "/v1/chat/completions";

#[tokio::test]
async fn health_serves_after_load_and_reflection_lists_services() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut health = HealthClient::new(tg.channel().await);
    for service in [
        "",
        "envoy.service.auth.v3.Authorization",
        "tollgate.v1.DecisionService",
    ] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(resp.status, 1, "service {service:?} should be SERVING");
    }

    use tokio_stream::StreamExt;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(tg.channel().await);
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(
                "envoy.service.auth.v3.Authorization".into(),
            )),
        },
    ];
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(requests))
        .await
        .expect("reflection")
        .into_inner();
    let Some(Ok(first)) = stream.next().await else {
        panic!("no list reply")
    };
    let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
        panic!("expected a service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "envoy.service.auth.v3.Authorization",
        "tollgate.v1.DecisionService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
    let Some(Ok(second)) = stream.next().await else {
        panic!("no file reply")
    };
    let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
        panic!("expected descriptors for Envoy's Authorization service");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    tg.stop().await;
}

#[tokio::test]
async fn ext_authz_decision_matrix() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = AuthorizationClient::connect(tg.grpc_url())
        .await
        .expect("connect");
    let huge = "k".repeat(1 << 20);
    let unknown = tollgate::identity::key_format::generate("nobody").expect("key");
    let cases: Vec<(&str, CheckRequest, u16, &str)> = vec![
        (
            "paid key, shared model",
            http("POST", CHAT, &[PAID], r#"{"model":"llama-3-70b"}"#),
            200,
            "allowed",
        ),
        (
            "free key, small model",
            http("POST", CHAT, &[FREE], r#"{"model":"llama-3-8b"}"#),
            200,
            "allowed",
        ),
        (
            "free key, large model",
            http("POST", CHAT, &[FREE], r#"{"model":"llama-3-70b"}"#),
            403,
            "policy_denied",
        ),
        (
            "own private model",
            http("POST", CHAT, &[PAID], r#"{"model":"acme-support-ft"}"#),
            200,
            "allowed",
        ),
        (
            "other tenant's model",
            http("POST", CHAT, &[PAID], r#"{"model":"globex-legal-ft"}"#),
            403,
            "policy_denied",
        ),
        (
            "get model by path",
            http("GET", "/v1/models/llama-3-8b", &[PAID], ""),
            200,
            "allowed",
        ),
        (
            "list models",
            http("GET", "/v1/models", &[FREE], ""),
            200,
            "allowed",
        ),
        (
            "wrong key",
            http(
                "POST",
                CHAT,
                &[("x-api-key", unknown.as_str())],
                r#"{"model":"llama-3-8b"}"#,
            ),
            401,
            "invalid_credential",
        ),
        (
            "no key",
            http("POST", CHAT, &[], r#"{"model":"llama-3-8b"}"#),
            401,
            "missing_credential",
        ),
        (
            "merged duplicate keys",
            http(
                "POST",
                CHAT,
                &[(
                    "x-api-key",
                    "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen,tg_demo-free_Zo1EA1GPtbzUyiAXemXygiWhrfueKedx182ArY",
                )],
                "{}",
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "1 MiB key",
            http("POST", CHAT, &[("x-api-key", &huge)], "{}"),
            401,
            "malformed_credential",
        ),
        (
            "malformed key",
            http("POST", CHAT, &[("x-api-key", "tg_nope")], "{}"),
            401,
            "malformed_credential",
        ),
        (
            "unrecognized authorization",
            http("POST", CHAT, &[("authorization", "Basic dTpw")], "{}"),
            401,
            "invalid_credential",
        ),
        (
            "unmatched route",
            http("POST", "/v1/admin/reset", &[PAID], "{}"),
            403,
            "unknown_route",
        ),
        (
            "dot segments",
            http("POST", "/v1/chat/../chat/completions", &[PAID], "{}"),
            400,
            "ambiguous_path",
        ),
        (
            "encoded slash",
            http("POST", "/v1/chat%2Fcompletions", &[PAID], "{}"),
            400,
            "ambiguous_path",
        ),
        (
            "double slash",
            http("POST", "/v1//chat/completions", &[PAID], "{}"),
            400,
            "ambiguous_path",
        ),
        (
            "body is not JSON",
            http("POST", CHAT, &[PAID], "{model: llama"),
            400,
            "malformed_body",
        ),
        (
            "no model in body",
            http("POST", CHAT, &[PAID], r#"{"messages":[]}"#),
            400,
            "missing_resource",
        ),
        (
            "unknown model",
            http("POST", CHAT, &[PAID], r#"{"model":"gpt-99"}"#),
            403,
            "policy_error",
        ),
        (
            "suspended tenant",
            http(
                "POST",
                CHAT,
                &[(
                    "x-api-key",
                    "tg_demo-initech_bAFI42DVEAJulfg8eUfSLzSvnnCzehu73Ql0OJ",
                )],
                r#"{"model":"llama-3-8b"}"#,
            ),
            403,
            "policy_denied",
        ),
        (
            "no attributes",
            CheckRequest { attributes: None },
            400,
            "malformed_request",
        ),
        (
            "non-UTF-8 raw header",
            raw_header_request(b"tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen\xff"),
            400,
            "malformed_request",
        ),
        (
            "raw headers decode",
            raw_header_request(b"tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen"),
            200,
            "allowed",
        ),
    ];
    for (name, req, want_status, want_reason) in cases {
        let resp = client
            .check(req)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .into_inner();
        let (status, reason) = outcome(&resp);
        assert_eq!(
            (status, reason.as_str()),
            (want_status, want_reason),
            "{name}"
        );
    }
    tg.stop().await;
}

#[tokio::test]
async fn partial_body_cannot_satisfy_body_policies() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = AuthorizationClient::connect(tg.grpc_url())
        .await
        .expect("connect");
    let mut req = http(
        "POST",
        "/v1/models/llama-3-8b",
        &[PAID, ("x-envoy-auth-partial-body", "true")],
        r#"{"mod"#,
    );
    // A GET-style route (model in the path) with a cut body: the permit needs
    // a complete body, so it is denied.
    if let Some(h) = req
        .attributes
        .as_mut()
        .and_then(|a| a.request.as_mut())
        .and_then(|r| r.http.as_mut())
    {
        h.method = "GET".into();
    }
    let (status, reason) = outcome(&client.check(req).await.expect("check").into_inner());
    assert_eq!((status, reason.as_str()), (403, "policy_denied"));
    tg.stop().await;
}

#[tokio::test]
async fn allow_sets_identity_headers_and_strips_forged_ones() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = AuthorizationClient::connect(tg.grpc_url())
        .await
        .expect("connect");
    let req = http(
        "POST",
        CHAT,
        &[
            PAID,
            ("x-tollgate-principal", "ApiKey::\"root\""),
            ("x-tollgate-role", "admin"),
        ],
        r#"{"model":"llama-3-8b"}"#,
    );
    let resp = client.check(req).await.expect("check").into_inner();
    let Some(HttpResponse::OkResponse(ok)) = resp.http_response else {
        panic!("expected allow")
    };
    let set: HashMap<String, String> = ok
        .headers
        .iter()
        .filter_map(|h| h.header.as_ref().map(|h| (h.key.clone(), h.value.clone())))
        .collect();
    assert_eq!(
        set.get("x-tollgate-principal").map(String::as_str),
        Some("ApiKey::\"demo-paid\"")
    );
    assert_eq!(
        set.get("x-tollgate-tenant").map(String::as_str),
        Some("acme")
    );
    assert_eq!(set.get("x-tollgate-tier").map(String::as_str), Some("paid"));
    assert!(
        ok.headers.iter().all(|h| h.append_action == 2),
        "identity headers must overwrite"
    );
    assert_eq!(ok.headers_to_remove, vec!["x-tollgate-role".to_string()]);
    let meta = resp.dynamic_metadata.expect("dynamic metadata");
    assert!(meta.fields.contains_key("decision") && meta.fields.contains_key("policy_version"));
    tg.stop().await;
}

fn uid(ty: &str, id: &str) -> Option<EntityUid> {
    Some(EntityUid {
        r#type: ty.into(),
        id: id.into(),
    })
}

fn key_entity(id: &str, tier: &str) -> String {
    support::api_key_entity_json(id, tier)
}

fn chat_context() -> String {
    support::chat_query_context()
}

fn decision_request(tier: &str, model: &str) -> proto::CheckRequest {
    proto::CheckRequest {
        principal: uid("ApiKey", "k"),
        action: uid("Action", "chat"),
        resource: uid("Model", model),
        context_json: chat_context(),
        entities_json: key_entity("k", tier),
    }
}

#[tokio::test]
async fn decision_api_check_and_batch_check() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = DecisionServiceClient::connect(tg.grpc_url())
        .await
        .expect("connect");

    let allow = client
        .check(decision_request("free", "llama-3-8b"))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(allow.decision, proto::Decision::Allow as i32);
    assert_eq!(
        allow.determining_policies,
        vec!["keys-use-shared-models".to_string()]
    );
    assert!(!allow.policy_version.is_empty());

    let deny = client
        .check(decision_request("free", "llama-3-70b"))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(deny.decision, proto::Decision::Deny as i32);
    assert_eq!(
        deny.determining_policies,
        vec!["free-tier-small-models-only".to_string()]
    );

    let batch = client
        .batch_check(proto::BatchCheckRequest {
            requests: vec![
                decision_request("free", "llama-3-8b"),
                decision_request("free", "llama-3-70b"),
                decision_request("paid", "llama-3-70b"),
            ],
        })
        .await
        .expect("batch")
        .into_inner();
    let decisions: Vec<i32> = batch.responses.iter().map(|r| r.decision).collect();
    assert_eq!(decisions, vec![1, 2, 1]);
    assert!(
        batch
            .responses
            .iter()
            .all(|r| r.policy_version == allow.policy_version)
    );
    tg.stop().await;
}

#[tokio::test]
async fn decision_api_rejects_malformed_input_naming_the_field() {
    let mut tg = Tollgate::start(test_config()).await;
    let mut client = DecisionServiceClient::connect(tg.grpc_url())
        .await
        .expect("connect");
    let mut bad_type = decision_request("free", "llama-3-8b");
    bad_type.principal = uid("Api Key!", "k");
    let mut no_action = decision_request("free", "llama-3-8b");
    no_action.action = None;
    let mut bad_json = decision_request("free", "llama-3-8b");
    bad_json.context_json = "{nope".into();
    let mut bad_context = decision_request("free", "llama-3-8b");
    bad_context.context_json = r#"{"http": 3}"#.into();
    let mut bad_entities = decision_request("free", "llama-3-8b");
    bad_entities.entities_json =
        r#"[{"uid": {"type": "ApiKey", "id": "k"}, "attrs": {"tier": 1}}]"#.into();
    for (req, field) in [
        (bad_type, "principal.type"),
        (no_action, "action"),
        (bad_json, "context_json"),
        (bad_context, "context"),
        (bad_entities, "entities"),
    ] {
        let err = client.check(req).await.expect_err(field);
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(&format!("{field}:")),
            "{field}: {}",
            err.message()
        );
    }
    let mut second_bad = decision_request("free", "llama-3-8b");
    second_bad.resource = uid("", "x");
    let err = client
        .batch_check(proto::BatchCheckRequest {
            requests: vec![decision_request("free", "llama-3-8b"), second_bad],
        })
        .await
        .expect_err("batch with a bad item");
    assert!(
        err.message().starts_with("requests[1].resource.type:"),
        "{}",
        err.message()
    );
    tg.stop().await;
}

/// Non-Envoy gRPC clients may compress requests with gzip: every Tollgate
/// service must accept it rather than answer UNIMPLEMENTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_compressed_requests_are_accepted_by_every_service() {
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
    use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry;
    use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
    use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_client::RateLimitServiceClient;
    use tonic::codec::CompressionEncoding::Gzip;

    let mut tg = Tollgate::start(test_config()).await;
    let channel = tg.channel().await;

    let mut authz = AuthorizationClient::new(channel.clone()).send_compressed(Gzip);
    let resp = authz
        .check(http(
            "POST",
            CHAT,
            &[PAID, ("content-type", "application/json")],
            r#"{"model":"llama-3-8b"}"#,
        ))
        .await
        .expect("gzip ext_authz check");
    assert_eq!(outcome(&resp.into_inner()).0, 200);

    let mut rls = RateLimitServiceClient::new(channel.clone()).send_compressed(Gzip);
    let resp = rls
        .should_rate_limit(RateLimitRequest {
            domain: "llm".into(),
            descriptors: vec![RateLimitDescriptor {
                entries: vec![Entry {
                    key: "tenant".into(),
                    value: "acme".into(),
                }],
                ..Default::default()
            }],
            hits_addend: 1,
        })
        .await
        .expect("gzip ShouldRateLimit");
    assert_ne!(resp.into_inner().overall_code, 0, "a real answer");

    let mut decisions = DecisionServiceClient::new(channel).send_compressed(Gzip);
    let resp = decisions
        .check(decision_request("paid", "llama-3-70b"))
        .await
        .expect("gzip decision check");
    assert_eq!(resp.into_inner().decision, proto::Decision::Allow as i32);
    tg.stop().await;
}
