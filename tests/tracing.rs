//! OpenTelemetry tracing: the real `tollgate serve` binary exports its
//! decision spans over OTLP/gRPC to a receiver this test runs, continuing
//! the caller's W3C `traceparent` from ext_authz headers, forward-auth
//! headers and `tollgate.v1` metadata; the trace id reaches the audit record
//! and the decision log. Without `[tracing]`, the audit record still carries
//! the caller's trace id.

mod support;

use std::time::Duration;

use support::otlp::OtlpReceiver;
use support::{DEMO_PAID_KEY, ServeChild, check_request, eventually, free_port, raw_http};

const CHAT: &str = "/v1/chat/completions";
const BODY: &str = r#"{"model":"llama-3-8b","messages":[{"role":"user","content":"hi"}]}"#;

fn traceparent(trace: &str, span: &str) -> String {
    format!("00-{trace}-{span}-01")
}

fn audit_records(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A real `tollgate serve` exporting to `endpoint` over `protocol`
/// (`grpc` or `http/protobuf`), with forward-auth and the audit trail on.
struct Traced {
    _dir: tempfile::TempDir,
    _serve: ServeChild,
    grpc: u16,
    forward: u16,
    audit: std::path::PathBuf,
    log: std::path::PathBuf,
}

impl Traced {
    async fn start(endpoint: &str, protocol: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (grpc, admin, forward) = (free_port(), free_port(), free_port());
        let audit = dir.path().join("audit.jsonl");
        let config = dir.path().join("tollgate.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
                 forward_auth_listen = \"127.0.0.1:{forward}\"\n\
                 [policy]\ndir = {policies:?}\nwatch = false\n\
                 [identity]\napi_keys_file = {keys:?}\n\
                 [quota]\nlimits_file = {limits:?}\n\
                 [[quota.rules]]\nname = \"key-per-minute\"\nper = [\"key\"]\nunit = \"minute\"\ntiers = {{ paid = 1000 }}\n\
                 [audit]\nenabled = true\npath = {audit:?}\n\
                 [tracing]\notlp_endpoint = \"{endpoint}\"\notlp_protocol = \"{protocol}\"\n\
                 service_name = \"tollgate-under-test\"\nexport_delay_ms = 50\n",
                policies = support::repo().join("policies"),
                keys = support::repo().join("examples/keys.toml"),
                limits = support::repo().join("examples/limits.yaml"),
            ),
        )
        .expect("config");
        let log = dir.path().join("tollgate.log");
        let serve = ServeChild::spawn(&config, &log);
        let admin_addr = std::net::SocketAddr::from(([127, 0, 0, 1], admin));
        let ready = eventually(Duration::from_secs(30), || async move {
            support::wait_listening(admin_addr).await
                && raw_http(admin_addr, "GET", "/readyz", &[], "").await.status == 200
        })
        .await;
        assert!(
            ready,
            "tollgate did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Self {
            _dir: dir,
            _serve: serve,
            grpc,
            forward,
            audit,
            log,
        }
    }
}

#[tokio::test]
async fn spans_reach_an_otlp_receiver_under_the_callers_trace() {
    let receiver = OtlpReceiver::start().await;
    let traced = Traced::start(&receiver.endpoint(), "grpc").await;
    let (grpc, forward, audit, log) = (traced.grpc, traced.forward, &traced.audit, &traced.log);

    // ext_authz: the traceparent is one of the request headers Envoy sends.
    let ext_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let ext_parent = "00f067aa0ba902b7";
    let tp = traceparent(ext_trace, ext_parent);
    let request = check_request(
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("x-api-key", DEMO_PAID_KEY),
            ("traceparent", &tp),
        ],
        BODY,
    );
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let answer = AuthorizationClient::new(channel.clone())
        .check(request)
        .await
        .expect("check")
        .into_inner();
    assert_eq!(
        answer.status.map(|s| s.code),
        Some(0),
        "the paid key is allowed"
    );

    // Forward-auth: the gateway passes the header on the auth subrequest.
    let fa_trace = "0af7651916cd43dd8448eb211c80319c";
    let fa_parent = "b7ad6b7169203331";
    let tp = traceparent(fa_trace, fa_parent);
    let forward_addr = std::net::SocketAddr::from(([127, 0, 0, 1], forward));
    let fa = raw_http(
        forward_addr,
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("x-api-key", "tg_wrong_key"),
            ("traceparent", &tp),
        ],
        BODY,
    )
    .await;
    assert_eq!(fa.status, 401);

    // tollgate.v1: gRPC metadata.
    let api_trace = "5b8efff798038103d269b633813fc60c";
    let api_parent = "eee19b7ec3c1b174";
    let mut check = tonic::Request::new(tollgate::proto::CheckRequest {
        principal: Some(tollgate::proto::EntityUid {
            r#type: "ApiKey".into(),
            id: "demo-paid".into(),
        }),
        action: Some(tollgate::proto::EntityUid {
            r#type: "Action".into(),
            id: "chat".into(),
        }),
        resource: Some(tollgate::proto::EntityUid {
            r#type: "Model".into(),
            id: "llama-3-8b".into(),
        }),
        context_json: support::chat_query_context(),
        entities_json: String::new(),
    });
    check.metadata_mut().insert(
        "traceparent",
        traceparent(api_trace, api_parent)
            .parse()
            .expect("metadata"),
    );
    tollgate::proto::decision_service_client::DecisionServiceClient::new(channel)
        .check(check)
        .await
        .expect("tollgate.v1 check");

    let received = eventually(Duration::from_secs(20), || {
        let done = [ext_trace, fa_trace, api_trace].iter().all(|t| {
            receiver
                .trace(t)
                .iter()
                .any(|s| s.name == "tollgate.decision")
        }) && receiver
            .trace(ext_trace)
            .iter()
            .any(|s| s.name == "tollgate.store");
        async move { done }
    })
    .await;
    assert!(
        received,
        "spans received: {:?}\nlog: {}",
        receiver.spans(),
        std::fs::read_to_string(log).unwrap_or_default()
    );

    // The ext_authz decision: a child of the caller's span, with identity,
    // policy, quota and store round-trip children, in one trace.
    let spans = receiver.trace(ext_trace);
    let root = spans
        .iter()
        .find(|s| s.name == "tollgate.decision")
        .expect("decision span");
    assert_eq!(
        root.parent_span_id, ext_parent,
        "continues the caller's span"
    );
    assert_eq!(root.service, "tollgate-under-test");
    let child = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no {name} span in {spans:?}"))
            .clone()
    };
    for name in ["tollgate.identity", "tollgate.policy", "tollgate.quota"] {
        assert_eq!(
            child(name).parent_span_id,
            root.span_id,
            "{name} is a child of the decision"
        );
    }
    assert_eq!(
        child("tollgate.store").parent_span_id,
        child("tollgate.quota").span_id
    );

    for (trace, parent) in [(fa_trace, fa_parent), (api_trace, api_parent)] {
        let spans = receiver.trace(trace);
        let root = spans
            .iter()
            .find(|s| s.name == "tollgate.decision")
            .expect("decision span");
        assert_eq!(root.parent_span_id, parent);
    }

    // The trace id is in the audit record and the decision log.
    let recorded = eventually(Duration::from_secs(10), || {
        let records = audit_records(audit);
        let done = [ext_trace, fa_trace, api_trace]
            .iter()
            .all(|t| records.iter().any(|r| r["trace_id"] == *t));
        async move { done }
    })
    .await;
    assert!(recorded, "audit records: {:?}", audit_records(audit));
    let log_text = std::fs::read_to_string(log).unwrap_or_default();
    assert!(
        log_text.contains(ext_trace),
        "decision log lacks the trace id: {log_text}"
    );
}

/// OTLP/HTTP: the same spans, POSTed as protobuf to the receiver's
/// `/v1/traces` (the endpoint is given without the path).
#[tokio::test]
async fn spans_reach_an_otlp_http_receiver_under_the_callers_trace() {
    let receiver = OtlpReceiver::start_http().await;
    let traced = Traced::start(&receiver.endpoint(), "http/protobuf").await;
    let trace = "0af7651916cd43dd8448eb211c80319d";
    let parent = "b7ad6b7169203332";
    let tp = traceparent(trace, parent);
    let forward_addr = std::net::SocketAddr::from(([127, 0, 0, 1], traced.forward));
    let fa = raw_http(
        forward_addr,
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("x-api-key", DEMO_PAID_KEY),
            ("traceparent", &tp),
        ],
        BODY,
    )
    .await;
    assert_eq!(fa.status, 200);
    let received = eventually(Duration::from_secs(20), || {
        let spans = receiver.trace(trace);
        let done = ["tollgate.decision", "tollgate.quota", "tollgate.store"]
            .iter()
            .all(|n| spans.iter().any(|s| s.name == *n));
        async move { done }
    })
    .await;
    assert!(
        received,
        "spans received over HTTP: {:?}\nlog: {}",
        receiver.spans(),
        std::fs::read_to_string(&traced.log).unwrap_or_default()
    );
    let spans = receiver.trace(trace);
    let root = spans
        .iter()
        .find(|s| s.name == "tollgate.decision")
        .expect("decision span");
    assert_eq!(root.parent_span_id, parent, "continues the caller's span");
    assert_eq!(root.service, "tollgate-under-test");
    assert!(receiver.http_posts() > 0, "spans came over OTLP/HTTP");
}

#[tokio::test]
async fn without_tracing_the_audit_record_keeps_the_callers_trace_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let audit = dir.path().join("audit.jsonl");
    let mut config = support::test_config();
    config.audit.enabled = true;
    config.audit.path = audit.clone();
    let mut tg = support::Tollgate::start(config).await;
    let trace = "a3ce929d0e0e47364bf92f3577b34da6";
    let tp = traceparent(trace, "00f067aa0ba902b7");
    let cases = [(tp.as_str(), Some(trace)), ("not-a-traceparent", None)];
    for (i, (header, _)) in cases.iter().enumerate() {
        let mut request = check_request(
            "POST",
            CHAT,
            &[("x-api-key", DEMO_PAID_KEY), ("traceparent", header)],
            BODY,
        );
        support::http_of(&mut request).id = format!("trace-case-{i}");
        support::ext_authz(&tg, request).await;
    }
    tg.stop().await;
    let records = audit_records(&audit);
    for (i, (_, expected)) in cases.iter().enumerate() {
        let record = records
            .iter()
            .find(|r| r["request_id"] == format!("trace-case-{i}"))
            .unwrap_or_else(|| panic!("no record for case {i}: {records:?}"));
        assert_eq!(record["trace_id"].as_str(), *expected, "case {i}");
    }
}
