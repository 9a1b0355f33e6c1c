//! Property-based fuzzing of every parser that sees untrusted input, on
//! stable Rust (proptest): CheckRequest conversion and the whole ext_authz
//! answer, rate limit requests, path canonicalization, body parsing, API key
//! and JWT parsing, Envoy MCP filter metadata, limits YAML and config TOML.
//!
//! Properties: nothing panics; every Check answer carries an explicit status
//! (an empty CheckResponse is an allow to Envoy); every rate limit answer has
//! a code other than UNKNOWN. Each target runs a fixed, small number of cases
//! in `cargo test`; set `PROPTEST_CASES` (e.g. 100000) to run longer.
//! Failures proptest finds are kept in `tests/fuzz.proptest-regressions` and
//! replayed first on every run.

mod support;

use std::collections::HashMap;

use base64::Engine as _;
use envoy_types::pb::envoy::config::core::v3::{
    Address, Metadata, SocketAddress, address, socket_address,
};
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::{
    RateLimitDescriptor, rate_limit_descriptor,
};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest as EnvoyHttp, Peer, Request as EnvoyRequest, TlsSession,
};
use envoy_types::pb::envoy::service::auth::v3::authorization_server::Authorization;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::Code;
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use proptest::prelude::*;
use tollgate::adapters::ext_authz::ExtAuthz;
use tollgate::adapters::rls::Rls;
use tollgate::server::App;

/// Cases per target: `PROPTEST_CASES` when set, else `default`.
fn cases(default: u32) -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    ProptestConfig {
        cases,
        // Shrinking a failure should not take longer than finding it.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

const HS256_SECRET: &str = "fuzz-secret-0123456789abcdef0123456789abcdef0123456789abcdef";

/// One of the `names` Tollgate reads, or text matching one of the `others`
/// regexes; every name and every regex equally likely.
fn name_or(
    names: &'static [&'static str],
    others: &'static [&'static str],
) -> impl Strategy<Value = String> + Clone {
    let named = prop::sample::select(names).prop_map(str::to_string);
    let other = prop::sample::select(others)
        .prop_flat_map(|re| proptest::string::string_regex(re).expect("a valid regex"));
    prop_oneof![
        names.len() as u32 => named,
        others.len() as u32 => other,
    ]
}

/// A JSON text: valid nested JSON, near-JSON, or anything.
fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        "[a-z_]{0,8}|.{0,12}".prop_map(serde_json::Value::from),
    ];
    let value = leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                name_or(
                    &[
                        "model",
                        "max_tokens",
                        "stream",
                        "tools",
                        "messages",
                        "exp",
                        "iss",
                        "aud",
                        "alg",
                        "crit",
                    ],
                    &["[a-z_]{1,8}"],
                ),
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        4 => value.prop_map(|v| v.to_string()),
        1 => "[\\[\\]{}\",:0-9a-z ]{0,40}",
        1 => ".{0,40}",
    ]
}

/// A bearer token: three base64url parts of JSON (some signed with the
/// fuzz issuer's secret), or arbitrary text.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        (json_text(), json_text(), any::<bool>()).prop_map(|(h, p, sign)| {
            let input = format!("{}.{}", b64(h.as_bytes()), b64(p.as_bytes()));
            let sig = if sign {
                jsonwebtoken::crypto::sign(
                    input.as_bytes(),
                    &jsonwebtoken::EncodingKey::from_secret(HS256_SECRET.as_bytes()),
                    jsonwebtoken::Algorithm::HS256,
                )
                .unwrap_or_default()
            } else {
                b64(b"sig")
            };
            format!("{input}.{sig}")
        }),
        "[A-Za-z0-9_.=-]{0,60}",
        ".{0,40}",
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(support::DEMO_PAID_KEY.to_string()),
        "tg_[a-z0-9-]{0,12}_[A-Za-z0-9]{0,50}",
        token().prop_map(|t| format!("Bearer {t}")),
        "application/json|text/plain|multipart/form-data; boundary=x",
        "[0-9]{0,20}",
        ".{0,30}",
    ]
}

fn headers() -> impl Strategy<Value = HashMap<String, String>> {
    prop::collection::hash_map(
        name_or(
            &[
                "x-api-key",
                "authorization",
                "content-type",
                "content-length",
                "x-model",
                "x-team",
                "x-envoy-auth-partial-body",
                "x-forwarded-for",
            ],
            &["[a-z-]{1,12}", ".{0,8}"],
        ),
        header_value(),
        0..6,
    )
}

fn path() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("/v1/chat/completions".to_string()),
        Just("/v1/models".to_string()),
        "(/|[a-z0-9]|%[0-9A-Fa-f]{2}|%|\\.|\\.\\.|;|\\\\|\\?|&|=|#|model){0,24}",
        ".{0,40}",
    ]
}

/// google.protobuf.Value trees, sometimes deeper than Tollgate's bound (16).
fn proto_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(Kind::BoolValue),
        any::<f64>().prop_map(Kind::NumberValue),
        ".{0,12}".prop_map(Kind::StringValue),
        Just(Kind::NullValue(0)),
    ]
    .prop_map(|k| Value { kind: Some(k) });
    leaf.prop_recursive(24, 64, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4)
                .prop_map(|values| Kind::ListValue(ListValue { values })),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4).prop_map(|m| Kind::StructValue(
                Struct {
                    fields: m.into_iter().collect()
                }
            )),
        ]
        .prop_map(|k| Value { kind: Some(k) })
    })
}

fn metadata() -> impl Strategy<Value = Option<Metadata>> {
    proptest::option::of(
        prop::collection::hash_map(
            "[a-z.]{1,12}",
            prop::collection::btree_map("[a-z]{1,6}", proto_value(), 0..3),
            0..3,
        )
        .prop_map(|filters| Metadata {
            filter_metadata: filters
                .into_iter()
                .map(|(k, fields)| {
                    (
                        k,
                        Struct {
                            fields: fields.into_iter().collect(),
                        },
                    )
                })
                .collect(),
            ..Default::default()
        }),
    )
}

fn peer() -> impl Strategy<Value = Option<Peer>> {
    proptest::option::of(
        (
            prop_oneof!["[0-9.]{0,15}", "[0-9a-f:]{0,20}", ".{0,10}"],
            any::<u32>(),
            ".{0,20}",
        )
            .prop_map(|(ip, port, principal)| Peer {
                address: Some(Address {
                    address: Some(address::Address::SocketAddress(SocketAddress {
                        address: ip,
                        port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                        ..Default::default()
                    })),
                }),
                principal,
                ..Default::default()
            }),
    )
}

prop_compose! {
    fn check_request()(
        method in prop_oneof![Just("GET".to_string()), Just("POST".to_string()), ".{0,8}"],
        path in path(),
        headers in headers(),
        body in prop_oneof![json_text().prop_map(String::into_bytes), prop::collection::vec(any::<u8>(), 0..64)],
        size in prop_oneof![Just(-1i64), any::<i64>(), 0i64..1000],
        id in ".{0,12}",
        source in peer(),
        metadata_context in metadata(),
        context_extensions in prop::collection::hash_map("[a-z_]{1,10}", ".{0,10}", 0..3),
        tls_session in proptest::option::of(".{0,12}".prop_map(|sni| TlsSession { sni })),
        missing in 0u8..20,
    ) -> CheckRequest {
        let http = EnvoyHttp {
            id,
            method,
            path,
            host: "llm.example.com".into(),
            headers,
            size,
            raw_body: body,
            ..Default::default()
        };
        CheckRequest {
            // Now and then a part Envoy always sends is missing.
            attributes: (missing != 0).then(|| AttributeContext {
                source,
                request: (missing != 1).then(|| EnvoyRequest { time: None, http: (missing != 2).then_some(http) }),
                context_extensions,
                metadata_context,
                tls_session,
                ..Default::default()
            }),
        }
    }
}

/// An App on the example policies, keys and limits, with an HS256 JWT
/// issuer, so every identity source parses what the fuzzer sends.
fn app(rt: &tokio::runtime::Runtime) -> (App, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("hs256.secret");
    std::fs::write(&secret, HS256_SECRET).expect("secret");
    let mut config = support::test_config();
    config.identity.jwt_issuers = vec![
        toml::from_str(&format!(
            "name = \"fuzz\"\nissuer = \"https://idp.fuzz.test/\"\naudiences = [\"tollgate\"]\nhs256_secret_file = {:?}\nalgorithms = [\"HS256\"]\n",
            secret.display().to_string()
        ))
        .expect("issuer"),
    ];
    let app = rt.block_on(async { App::build(config) }).expect("app");
    (app, dir)
}

#[test]
fn every_check_answer_carries_an_explicit_status() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (app, _dir) = app(&rt);
    let config = support::test_config();
    let ext_authz = ExtAuthz::new(app.engine.clone(), config.response, config.quota.headers);
    proptest!(cases(96), |(request in check_request())| {
        let answer = rt.block_on(ext_authz.check(tonic::Request::new(request)));
        match answer {
            Ok(response) => {
                let response = response.into_inner();
                let status = response.status.as_ref().map(|s| s.code);
                match response.http_response {
                    Some(HttpResponse::OkResponse(_)) => prop_assert_eq!(status, Some(0)),
                    Some(HttpResponse::DeniedResponse(denied)) => {
                        prop_assert!(status.is_some_and(|c| c != 0), "denied with status {:?}", status);
                        prop_assert!(denied.status.is_some_and(|s| s.code >= 400));
                    }
                    other => prop_assert!(false, "no decision in the answer: {:?}", other),
                }
            }
            // Only a deferred decision fails the RPC, and never as UNKNOWN.
            Err(status) => prop_assert_eq!(status.code(), tonic::Code::Unavailable),
        }
    });
}

prop_compose! {
    fn rate_limit_request()(
        domain in prop_oneof![Just("llm".to_string()), ".{0,10}"],
        descriptors in prop::collection::vec(
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("tenant".to_string()),
                        Just("model".to_string()),
                        Just("remote_address".to_string()),
                        ".{0,8}",
                    ],
                    prop_oneof![Just("llama-3-70b".to_string()), Just("10.0.0.1".to_string()), ".{0,10}"],
                ),
                0..4,
            ),
            0..5,
        ),
        hits in any::<u32>(),
        overrides in prop::collection::vec(proptest::option::of((any::<u32>(), 0i32..8)), 5),
    ) -> RateLimitRequest {
        RateLimitRequest {
            domain,
            descriptors: descriptors
                .into_iter()
                .zip(overrides)
                .map(|(entries, limit)| RateLimitDescriptor {
                    entries: entries
                        .into_iter()
                        .map(|(key, value)| rate_limit_descriptor::Entry { key, value })
                        .collect(),
                    limit: limit.map(|(requests_per_unit, unit)| rate_limit_descriptor::RateLimitOverride {
                        requests_per_unit,
                        unit,
                    }),
                    ..Default::default()
                })
                .collect(),
            hits_addend: hits,
        }
    }
}

#[test]
fn every_rate_limit_answer_has_a_known_code() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let (app, _dir) = app(&rt);
    let config = support::test_config();
    let rls = Rls::new(
        app.engine.clone(),
        config.quota.headers,
        config.quota.on_invalid_request,
        String::new(),
    );
    proptest!(cases(128), |(request in rate_limit_request())| {
        let asked = request.descriptors.len();
        match rt.block_on(rls.should_rate_limit(tonic::Request::new(request))) {
            Ok(response) => {
                let response = response.into_inner();
                prop_assert_ne!(response.overall_code, Code::Unknown as i32);
                prop_assert_eq!(response.statuses.len(), asked);
                for status in &response.statuses {
                    prop_assert_ne!(status.code, Code::Unknown as i32);
                }
            }
            Err(status) => prop_assert_ne!(status.code(), tonic::Code::Unknown),
        }
    });
}

#[test]
fn path_canonicalization_is_total_and_idempotent() {
    proptest!(cases(512), |(raw in prop_oneof![path(), any::<String>()])| {
        if let Ok(canonical) = tollgate::path::canonicalize(&raw) {
            prop_assert!(canonical.path.starts_with('/'));
            // The canonical path (without its query) canonicalizes to itself.
            let again = tollgate::path::canonicalize(&canonical.path);
            prop_assert_eq!(again.map(|c| c.path).ok(), Some(canonical.path));
        }
    });
}

#[test]
fn body_parsing_never_panics() {
    proptest!(cases(512), |(
        body in prop_oneof![json_text().prop_map(String::into_bytes), prop::collection::vec(any::<u8>(), 0..128)],
        content_type in prop_oneof![Just("application/json".to_string()), ".{0,20}"],
        partial in any::<bool>(),
        declared in proptest::option::of(any::<u64>()),
        max in 0usize..256,
    )| {
        let request = tollgate::request::HttpRequest {
            headers: HashMap::from([("content-type".to_string(), content_type)]),
            body: Some(body),
            body_partial: partial,
            declared_size: declared,
            ..Default::default()
        };
        let _ = tollgate::engine::body::inspect(&request, max);
    });
}

/// What Envoy's MCP filter could put in its metadata: the observed shape
/// with each field replaced by arbitrary JSON now and then.
fn mcp_metadata() -> impl Strategy<Value = serde_json::Value> {
    let any_json =
        || json_text().prop_map(|t| serde_json::from_str(&t).unwrap_or(serde_json::Value::Null));
    (
        prop_oneof![Just(serde_json::json!("tools/call")), Just(serde_json::json!("Tools/Call")), any_json()],
        prop_oneof![Just(serde_json::json!(7.0)), Just(serde_json::json!(1e300)), any_json()],
        prop_oneof![Just(serde_json::json!("transfer")), Just(serde_json::json!("a::b")), any_json()],
        prop_oneof![Just(serde_json::json!({"amount": 5.0, "to": "b"})), any_json()],
        prop_oneof![Just(serde_json::json!("mcp_ok")), any_json()],
        any::<bool>(),
    )
        .prop_map(|(method, id, name, arguments, status, is_mcp)| {
            serde_json::json!({"method": method, "id": id, "status": status, "is_mcp_request": is_mcp,
                               "params": {"name": name, "arguments": arguments}})
        })
}

#[test]
fn mcp_filter_metadata_parses_without_panics() {
    proptest!(cases(512), |(metadata in mcp_metadata(), alone in any::<bool>(), headers in headers())| {
        let limits = tollgate::mcp::request::Limits { max_argument_bytes: 256, max_depth: 8 };
        let _ = tollgate::mcp::envoy_metadata::parse(&metadata, &headers, limits, alone);
    });
}

#[test]
fn api_keys_and_jwts_parse_without_panics() {
    use tollgate::identity::jwt::token;
    use tollgate::identity::key_format;
    proptest!(cases(512), |(key in header_value(), id in "[a-z0-9-]{0,40}", jwt in token(), bytes in prop::collection::vec(any::<u8>(), 0..64))| {
        if let Some(found) = key_format::parse(&key) {
            prop_assert!(key_format::valid_id(found), "parse returned an invalid id {:?}", found);
        }
        // What generate makes, parse reads back.
        if let Ok(generated) = key_format::generate(&id) {
            prop_assert_eq!(key_format::parse(&generated), Some(id.as_str()));
        }
        if let Ok(parts) = token::Parts::decode(&jwt) {
            let _ = parts.check_crit();
            let _ = parts.typ();
            let _ = token::payload_says_not_access(&parts.payload);
        }
        let _ = token::parse_strict(&bytes);
    });
}

/// Limits files shaped like Envoy's reference format, with wrong types,
/// missing fields and odd values mixed in.
fn limits_yaml() -> impl Strategy<Value = String> {
    let scalar = prop_oneof![
        "[a-z_]{0,8}",
        any::<i64>().prop_map(|n| n.to_string()),
        Just("null".to_string()),
        Just("\"10.0.*\"".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
    ];
    let rate_limit = (
        prop_oneof![
            Just("second"),
            Just("minute"),
            Just("hour"),
            Just("day"),
            Just("fortnight"),
        ],
        prop_oneof![any::<i64>().prop_map(|n| n.to_string()), scalar.clone()],
        prop_oneof![
            Just(""),
            Just(", unlimited: true"),
            Just(", shadow_mode: true"),
            Just(", algorithm: sliding_window"),
            Just(", failure_mode: gateway"),
            Just(", algorithm: bogus"),
        ],
    )
        .prop_map(|(unit, n, extra)| format!("{{ unit: {unit}, requests_per_unit: {n}{extra} }}"));
    let leaf = (
        scalar.clone(),
        proptest::option::of(scalar.clone()),
        proptest::option::of(rate_limit),
    )
        .prop_map(|(key, value, rl)| {
            let mut s = format!("- key: {key}\n");
            if let Some(v) = value {
                s.push_str(&format!("  value: {v}\n"));
            }
            if let Some(rl) = rl {
                s.push_str(&format!("  rate_limit: {rl}\n"));
            }
            s
        });
    let tree = leaf.prop_recursive(4, 16, 3, |inner| {
        (inner.clone(), prop::collection::vec(inner, 0..3)).prop_map(|(head, children)| {
            let nested: String = children
                .concat()
                .lines()
                .map(|l| format!("    {l}\n"))
                .collect();
            if nested.is_empty() {
                head
            } else {
                format!("{head}  descriptors:\n{nested}")
            }
        })
    });
    prop_oneof![
        4 => (scalar, prop::collection::vec(tree, 0..4)).prop_map(|(domain, ds)| {
            format!("domain: {domain}\ndescriptors:\n{}", ds.concat())
        }),
        1 => ".{0,80}",
    ]
}

#[test]
fn limits_yaml_loads_or_fails_with_a_position() {
    proptest!(cases(256), |(text in limits_yaml())| {
        let mut set = tollgate::quota::limits::LimitSet::default();
        if let Err(e) = set.add(&text, "fuzz.yaml") {
            prop_assert!(e.to_string().starts_with("fuzz.yaml:"), "{}", e);
        }
    });
}

/// Config files built from real sections and keys with values of every
/// TOML type.
fn config_toml() -> impl Strategy<Value = String> {
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        Just("0".to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "\"[a-z0-9_./:-]{0,16}\"",
        Just("\"127.0.0.1:0\"".to_string()),
        Just("[]".to_string()),
        Just("[\"x-model\", \"Bad Header\"]".to_string()),
        Just("{}".to_string()),
    ];
    let key = prop_oneof![
        Just("grpc_listen"),
        Just("admin_listen"),
        Just("max_body_bytes"),
        Just("max_message_bytes"),
        Just("idle_timeout_ms"),
        Just("keepalive_interval_ms"),
        Just("max_connections"),
        Just("deadline_ms"),
        Just("store"),
        Just("headers"),
        Just("model_headers"),
        Just("mtls_trust_domains"),
        Just("allowed_client_ids"),
        Just("cert_file"),
        Just("principal_header"),
        Just("reservation_ttl_secs"),
        Just("on_evaluation_error"),
        Just("unknown_key"),
    ];
    let section = prop_oneof![
        Just("server"),
        Just("server.limits"),
        Just("server.grpc_tls"),
        Just("policy"),
        Just("identity"),
        Just("context"),
        Just("response"),
        Just("quota"),
        Just("audit"),
        Just("authzen"),
        Just("nonsense"),
    ];
    prop_oneof![
        4 => prop::collection::vec(
            (section, prop::collection::vec((key, value), 0..4)),
            0..4,
        )
        .prop_map(|sections| {
            sections
                .into_iter()
                .map(|(name, kvs)| {
                    let body: String = kvs.into_iter().map(|(k, v)| format!("{k} = {v}\n")).collect();
                    format!("[{name}]\n{body}")
                })
                .collect::<String>()
        }),
        1 => ".{0,80}",
    ]
}

#[test]
fn config_loads_or_fails_naming_the_file() {
    proptest!(cases(256), |(text in config_toml())| {
        if let Err(e) = tollgate::config::Config::from_toml(&text, "fuzz.toml") {
            prop_assert!(e.to_string().starts_with("fuzz.toml"), "{}", e);
        }
    });
}

/// Offered tool lists, model answers (JSON and event streams, any
/// chunking) and caller contexts: nothing panics; a tool list yields only
/// valid names; a stream never passes an event naming an uncallable tool;
/// a mangled caller context never verifies.
#[test]
fn agent_tools_and_caller_contexts_never_panic_or_pass_unchecked() {
    use std::collections::HashSet;
    use std::sync::Arc;
    use tollgate::agents::{caller_context::KeyRing, tools};
    let json_ish = "[\\[\\]{}\":,a-z_0-9 .\\\\]{0,120}";
    proptest!(cases(256), |(body in json_ish, name in "[ -~]{0,70}")| {
        let list = format!(r#"{{"tools":[{{"type":"function","function":{{"name":{}}}}}]}}"#, serde_json::json!(name));
        for text in [body.as_str(), list.as_str()] {
            if let Ok(offered) = tools::offered(text.as_bytes()) {
                for t in offered {
                    let bare = t.name.strip_prefix("builtin:").unwrap_or(&t.name);
                    prop_assert!(tools::valid_name(bare), "{:?}", t.name);
                }
            }
        }
        let callable: HashSet<String> = ["ok".to_string()].into();
        let _ = tools::check_json(body.as_bytes(), &callable, 1 << 16);
    });
    let callable = Arc::new(HashSet::from(["ok".to_string()]));
    proptest!(cases(256), |(names in proptest::collection::vec("[a-z]{1,3}", 0..4), cut in 1usize..40)| {
        let mut stream = String::new();
        for n in &names {
            stream.push_str(&format!("data: {{\"choices\":[{{\"delta\":{{\"tool_calls\":[{{\"function\":{{\"name\":\"{n}\"}}}}]}}}}]}}\n\n"));
        }
        let mut guard = tools::SseGuard::new(callable.clone(), "r".into(), 1 << 16);
        let chunks: Vec<&[u8]> = stream.as_bytes().chunks(cut).collect();
        let mut out = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            out.extend(guard.feed(c, i + 1 == chunks.len()));
        }
        let out = String::from_utf8_lossy(&out);
        for n in names.iter().filter(|n| *n != "ok") {
            prop_assert!(!out.contains(&format!("\"name\":\"{n}\"")), "{}", out);
        }
    });
    let ring = KeyRing::parse(
        "[[keys]]\nkid = \"k\"\nseed = \"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\"\n",
    )
    .expect("keys");
    proptest!(cases(256), |(token in "[A-Za-z0-9_.,=-]{0,200}")| {
        prop_assert!(ring.verify(&token, std::time::SystemTime::now()).is_err());
    });
}
