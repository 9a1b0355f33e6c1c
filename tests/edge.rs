//! The request edge, over gRPC on loopback and through a real Envoy: one
//! credential, one host, one model per request; numeric parameters in
//! range; client addresses in every form Envoy sends; TLS only on evidence;
//! SPIFFE ids from certificates; header values that are valid field values.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::{
    DEMO_FREE_KEY, DEMO_PAID_KEY, Envoy, Tollgate, check_request, eventually, ext_authz, http_of,
    raw_http, set_source, start_upstream, test_config,
};

const CHAT: &str = "/v1/chat/completions";

fn chat(
    headers: &[(&str, &str)],
    body: &str,
) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    check_request("POST", CHAT, headers, body)
}

/// Runs `(name, request, status, reason)` rows against one Tollgate.
async fn table(
    tg: &Tollgate,
    rows: Vec<(
        &str,
        envoy_types::pb::envoy::service::auth::v3::CheckRequest,
        u16,
        &str,
    )>,
) {
    for (name, request, status, code) in rows {
        let v = ext_authz(tg, request).await;
        assert_eq!((v.status, v.code.as_str()), (status, code), "{name}");
    }
}

// ---------- issue 8.2: two credentials ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_different_credentials_are_ambiguous() {
    let mut tg = Tollgate::start(test_config()).await;
    let body = r#"{"model":"llama-3-8b"}"#;
    let bearer_free = format!("Bearer {DEMO_FREE_KEY}");
    let bearer_paid = format!("Bearer {DEMO_PAID_KEY}");
    let jwt_like = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln";
    let rows = vec![
        (
            "x-api-key paid + bearer free",
            chat(
                &[
                    ("x-api-key", DEMO_PAID_KEY),
                    ("authorization", &bearer_free),
                ],
                body,
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "x-api-key free + bearer paid",
            chat(
                &[
                    ("x-api-key", DEMO_FREE_KEY),
                    ("authorization", &bearer_paid),
                ],
                body,
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "api key + a JWT",
            chat(
                &[("x-api-key", DEMO_PAID_KEY), ("authorization", jwt_like)],
                body,
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "api key + basic auth",
            chat(
                &[
                    ("x-api-key", DEMO_PAID_KEY),
                    ("authorization", "Basic dTpw"),
                ],
                body,
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "x-api-key + an Azure-style api-key header naming another key",
            chat(
                &[("x-api-key", DEMO_PAID_KEY), ("api-key", DEMO_FREE_KEY)],
                body,
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "two bearer values merged",
            chat(
                &[("authorization", &format!("{bearer_paid},{bearer_free}"))],
                body,
            ),
            401,
            "ambiguous_credential",
        ),
        (
            "the same key in both headers is one caller",
            chat(
                &[
                    ("x-api-key", DEMO_PAID_KEY),
                    ("authorization", &bearer_paid),
                ],
                body,
            ),
            200,
            "allowed",
        ),
        (
            "one key",
            chat(&[("authorization", &bearer_free)], body),
            200,
            "allowed",
        ),
    ];
    table(&tg, rows).await;
    tg.stop().await;
}

// ---------- issues 8.9 and 8.11: key records ----------

fn tollgate_cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .expect("run tollgate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A config file using the example keys file and `redis`, cache `cache_ms`.
fn keys_config(dir: &Path, redis: &support::RedisServer, cache_ms: u64) -> std::path::PathBuf {
    let repo = support::repo();
    let path = dir.join("c.toml");
    std::fs::write(
        &path,
        format!(
            "[policy]\ndir = {:?}\nwatch = false\n[identity]\napi_keys_file = {:?}\napi_keys_redis_url = {:?}\napi_keys_cache_ms = {cache_ms}\n[quota]\nlimits_file = {:?}\n",
            repo.join("policies"),
            repo.join("examples/keys.toml"),
            redis.url(),
            repo.join("examples/limits.yaml")
        ),
    )
    .expect("config");
    path
}

async fn start_from(path: &Path) -> Tollgate {
    let mut config = tollgate::config::Config::load(Some(path)).expect("config");
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    Tollgate::start(config).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_key_records_with_fields_that_do_not_parse_are_refused() {
    let redis = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = keys_config(dir.path(), &redis, 50);
    let mut tg = start_from(&config).await;
    let good = [
        ("tenant", "acme"),
        ("tier", "paid"),
        ("scopes", "llm:generate"),
        ("groups", ""),
        ("models", ""),
        ("expires_at", ""),
        ("disabled", "0"),
        ("replaces", ""),
        ("grace_until", ""),
    ];
    let cases: &[(&str, &str, &str)] = &[
        ("ok", "tier", "paid"),
        ("grace-garbage", "grace_until", "garbage"),
        ("grace-negative", "grace_until", "-5"),
        ("grace-rfc3339", "grace_until", "2999-01-01T00:00:00Z"),
        ("disabled-true", "disabled", "true"),
        ("expires-soon", "expires_at", "soon"),
        ("expires-float", "expires_at", "4102444800.5"),
        ("tier-crlf", "tier", "paid\r\nx-injected: yes"),
        ("tenant-escape", "tenant", "acme\u{1b}[31m"),
        ("unknown-field", "revoked", "1"),
    ];
    for (id, field, value) in cases {
        let key = tollgate::identity::key_format::generate(id).expect("key");
        let hash = hex::encode(tollgate::identity::keys::sha256(&key));
        let name = format!("tg:apikey:{id}");
        let mut args = vec!["hset", name.as_str(), "hash", hash.as_str()];
        for (k, v) in good.iter().filter(|(k, _)| k != field) {
            args.extend([*k, *v]);
        }
        args.extend([*field, *value]);
        redis.cli(&args);
        let v = ext_authz(
            &tg,
            chat(&[("x-api-key", &key)], r#"{"model":"llama-3-8b"}"#),
        )
        .await;
        let want = if *id == "ok" {
            (200, "allowed")
        } else {
            (401, "invalid_key_record")
        };
        assert_eq!((v.status, v.code.as_str()), want, "{field} = {value:?}");
    }
    // Counted for operators.
    let metrics = raw_http(tg.admin, "GET", "/metrics", &[], "").await.body;
    assert!(
        metrics.contains("reason=\"invalid_key_record\""),
        "no invalid_key_record in metrics"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_file_and_redis_agree_and_a_revocation_anywhere_wins() {
    let redis = support::RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = keys_config(dir.path(), &redis, 100);
    let mut tg = start_from(&config).await;
    let header = [("x-api-key", DEMO_PAID_KEY)];
    let ask = || async {
        ext_authz(&tg, chat(&header, r#"{"model":"llama-3-8b"}"#))
            .await
            .code
    };
    assert_eq!(ask().await, "allowed");

    // An id of the keys file cannot be created again in Redis.
    let (ok, _, err) = tollgate_cli(
        &config,
        &[
            "keys",
            "create",
            "--id",
            "demo-paid",
            "--tenant",
            "globex",
            "--tier",
            "paid",
        ],
    );
    assert!(!ok, "create with a file id succeeded");
    assert!(err.contains("keys file"), "{err}");

    // Values the server would refuse to read back are refused up front.
    for (flag, value) in [
        ("--tier", "paid\r\nx: y"),
        ("--tenant", ""),
        ("--scope", "a,b"),
    ] {
        let mut args = vec!["keys", "create", "--id", "fresh-1"];
        for (f, v) in [("--tenant", "acme"), ("--tier", "paid")] {
            if f != flag {
                args.extend([f, v]);
            }
        }
        args.extend([flag, value]);
        let (ok, _, err) = tollgate_cli(&config, &args);
        assert!(!ok && err.contains("use "), "{flag} {value:?}: {err}");
    }

    // Revoking a file key works, and wins over the file.
    let (ok, out, err) = tollgate_cli(&config, &["keys", "revoke", "demo-paid"]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked demo-paid"), "{out}");
    let refused = eventually(Duration::from_secs(3), || async {
        ask().await == "revoked_credential"
    })
    .await;
    assert!(refused, "the file key still works after keys revoke");

    // The revoked id cannot be created anew either.
    let (ok, _, _) = tollgate_cli(
        &config,
        &[
            "keys",
            "create",
            "--id",
            "demo-paid",
            "--tenant",
            "acme",
            "--tier",
            "paid",
        ],
    );
    assert!(!ok, "create over a revoked id succeeded");

    // `keys list` shows what a request gets.
    let (ok, list, err) = tollgate_cli(&config, &["keys", "list"]);
    assert!(ok, "{err}");
    let line = |id: &str| {
        list.lines()
            .find(|l| l.starts_with(&format!("{id}\t")))
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"))
            .to_string()
    };
    assert!(line("demo-paid").contains("\trevoked\t"), "{list}");
    assert!(line("demo-paid").ends_with("keys-file+redis"), "{list}");
    assert!(line("demo-free").contains("\tactive\t"), "{list}");

    // Whole records for one id in both sources: which one was meant is a
    // guess, so the key is refused and `keys list` says why.
    let hash = hex::encode(tollgate::identity::keys::sha256(DEMO_FREE_KEY));
    redis.cli(&[
        "hset",
        "tg:apikey:demo-free",
        "hash",
        &hash,
        "tenant",
        "globex",
        "tier",
        "enterprise",
    ]);
    let free = [("x-api-key", DEMO_FREE_KEY)];
    let refused = eventually(Duration::from_secs(3), || async {
        ext_authz(&tg, chat(&free, r#"{"model":"llama-3-8b"}"#))
            .await
            .code
            == "invalid_key_record"
    })
    .await;
    assert!(refused, "a key with records in both sources was accepted");
    let (_, list, _) = tollgate_cli(&config, &["keys", "list"]);
    assert!(
        list.lines()
            .any(|l| l.starts_with("demo-free\t") && l.contains("invalid")),
        "{list}"
    );
    tg.stop().await;
}

// ---------- issue 8.12: SPIFFE ids from certificates ----------

/// A self-signed certificate with `subject` and, if any, `sans`
/// (`URI:spiffe://…,DNS:…`), as PEM.
fn certificate(dir: &Path, name: &str, subject: &str, sans: &str) -> String {
    let (key, cert) = (
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.pem")),
    );
    let mut args = vec![
        "req".to_string(),
        "-x509".into(),
        "-newkey".into(),
        "ec".into(),
        "-pkeyopt".into(),
        "ec_paramgen_curve:prime256v1".into(),
        "-nodes".into(),
        "-days".into(),
        "1".into(),
        "-subj".into(),
        subject.into(),
        "-keyout".into(),
        key.display().to_string(),
        "-out".into(),
        cert.display().to_string(),
    ];
    if !sans.is_empty() {
        args.extend(["-addext".into(), format!("subjectAltName={sans}")]);
    }
    let out = Command::new("openssl")
        .args(&args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(cert).expect("cert")
}

fn embed_as(principal: &str, pem: &str) -> envoy_types::pb::envoy::service::auth::v3::CheckRequest {
    let mut req = check_request(
        "POST",
        "/v1/embeddings",
        &[],
        r#"{"model":"text-embedding-small"}"#,
    );
    set_source(&mut req, Some("10.0.0.7"), principal, pem);
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_is_one_valid_spiffe_id() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let indexer = "spiffe://acme.example/ns/batch/sa/indexer";
    let one = certificate(d, "one", "/CN=indexer", &format!("URI:{indexer}"));
    let two = certificate(
        d,
        "two",
        "/CN=indexer",
        &format!("URI:{indexer},URI:spiffe://acme.example/ns/other"),
    );
    let none = certificate(d, "none", "/CN=chat-client/O=Anything", "DNS:chat.example");
    let trailing = certificate(d, "trailing", "/CN=x", &format!("URI:{indexer}/"));
    let dots = certificate(
        d,
        "dots",
        "/CN=x",
        "URI:spiffe://acme.example/ns/../sa/indexer",
    );
    let pct = certificate(d, "pct", "/CN=x", "URI:spiffe://acme.example/ns/b%61tch");
    let mut tg = Tollgate::start(test_config()).await;
    let subject = "CN=chat-client,O=Anything";
    let rows = vec![
        (
            "one SPIFFE URI SAN",
            embed_as(indexer, &one),
            200,
            "allowed",
        ),
        (
            "principal only, valid SPIFFE id",
            embed_as(indexer, ""),
            200,
            "allowed",
        ),
        (
            "two URI SANs",
            embed_as(indexer, &two),
            401,
            "invalid_credential",
        ),
        (
            "no URI SAN",
            embed_as(subject, &none),
            401,
            "invalid_credential",
        ),
        (
            "subject principal, no certificate",
            embed_as(subject, ""),
            401,
            "invalid_credential",
        ),
        (
            "trailing slash",
            embed_as(&format!("{indexer}/"), &trailing),
            401,
            "invalid_credential",
        ),
        (
            "dot segments",
            embed_as("spiffe://acme.example/ns/../sa/indexer", &dots),
            401,
            "invalid_credential",
        ),
        (
            "percent-encoding",
            embed_as("spiffe://acme.example/ns/b%61tch", &pct),
            401,
            "invalid_credential",
        ),
        (
            "query in principal",
            embed_as("spiffe://acme.example/ns/a?x=1", ""),
            401,
            "invalid_credential",
        ),
    ];
    table(&tg, rows).await;
    tg.stop().await;

    // Subject names only when the operator opts in.
    let mut config = test_config();
    config.identity.mtls_subject_names = true;
    let mut tg = Tollgate::start(config).await;
    let v = ext_authz(&tg, embed_as(subject, &none)).await;
    assert_eq!(v.code, "allowed");
    assert!(
        v.upstream_headers
            .iter()
            .any(|(k, val)| k == "x-tollgate-principal" && val.contains("CN=chat-client")),
        "{:?}",
        v.upstream_headers
    );
    tg.stop().await;
}

// ---------- issue 8.13: TLS only on evidence ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_through_envoy_with_include_tls_session_is_not_tls() {
    // A policy that refuses TLS requests makes `context.http.tls` visible.
    let policies = support::copy_policies();
    std::fs::write(
        policies.path().join("tls_probe.cedar"),
        "@id(\"tls-probe\")\nforbid (principal, action in [Action::\"chat\", Action::\"complete\", Action::\"embed\", Action::\"finetune\", Action::\"get_model\", Action::\"list_models\"], resource) when { context.http.tls };\n",
    )
    .expect("write policy");
    let mut config = test_config();
    config.policy.dir = policies.path().to_path_buf();
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;
    // examples/envoy/envoy.yaml: a plaintext listener with
    // `include_tls_session: true`.
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    let resp = raw_http(
        envoy.listener,
        "POST",
        CHAT,
        &[
            ("content-type", "application/json"),
            ("x-api-key", DEMO_PAID_KEY),
        ],
        r#"{"model":"llama-3-8b"}"#,
    )
    .await;
    assert_eq!(resp.status, 200, "plaintext read as TLS: {}", resp.body);

    // Over gRPC: an empty session is no evidence; an SNI is.
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::TlsSession;
    let with_session = |sni: &str| {
        let mut req = chat(&[("x-api-key", DEMO_PAID_KEY)], r#"{"model":"llama-3-8b"}"#);
        req.attributes.as_mut().expect("attributes").tls_session = Some(TlsSession {
            sni: sni.to_string(),
        });
        req
    };
    table(
        &tg,
        vec![
            ("empty tls_session", with_session(""), 200, "allowed"),
            (
                "tls_session with SNI",
                with_session("llm.example.com"),
                403,
                "policy_denied",
            ),
        ],
    )
    .await;
    tg.stop().await;
}

// ---------- issue 8.16: one host ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_names_one_host() {
    let mut tg = Tollgate::start(test_config()).await;
    let body = r#"{"model":"llama-3-8b"}"#;
    let with = |host: &str, path: &str, headers: &[(&str, &str)]| {
        let mut all = vec![("x-api-key", DEMO_PAID_KEY)];
        all.extend_from_slice(headers);
        let mut req = check_request("POST", path, &all, body);
        http_of(&mut req).host = host.to_string();
        req
    };
    let rows = vec![
        (
            "one host",
            with("llm.example.com", CHAT, &[]),
            200,
            "allowed",
        ),
        (
            "host with port and case",
            with("LLM.example.com:443", CHAT, &[]),
            200,
            "allowed",
        ),
        (
            "two values",
            with("a.example.com,b.example.com", CHAT, &[]),
            400,
            "ambiguous_host",
        ),
        (
            "two values, spaced",
            with("a.example.com, b.example.com", CHAT, &[]),
            400,
            "ambiguous_host",
        ),
        (
            "absolute-form target naming another host",
            with(
                "a.example.com",
                "http://b.example.com/v1/chat/completions",
                &[],
            ),
            400,
            "ambiguous_host",
        ),
        (
            "host header disagreeing with :authority",
            with("a.example.com", CHAT, &[("host", "b.example.com")]),
            400,
            "ambiguous_host",
        ),
        (
            ":authority header disagreeing",
            with("a.example.com", CHAT, &[(":authority", "b.example.com")]),
            400,
            "ambiguous_host",
        ),
    ];
    table(&tg, rows).await;
    tg.stop().await;
}

// ---------- issue 15.4: header values from credentials ----------

const ISS: &str = "https://idp.edge.test";
const AUD: &str = "tollgate";

fn hs256_issuer(dir: &Path) -> (tollgate::identity::jwt::IssuerConfig, EncodingKey) {
    let secret = "edge-test-secret-0123456789abcdef0123456789";
    let file = dir.join("hs256.secret");
    std::fs::write(&file, secret).expect("secret");
    let issuer = toml::from_str(&format!(
        "name = \"edge\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\nhs256_secret_file = {file:?}\nalgorithms = [\"HS256\"]\n"
    ))
    .expect("issuer config");
    (issuer, EncodingKey::from_secret(secret.as_bytes()))
}

fn token(key: &EncodingKey, tenant: &str, tier: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs();
    let claims = json!({
        "iss": ISS, "aud": AUD, "sub": "partner-7", "iat": now, "exp": now + 300,
        "tenant": tenant, "tier": tier, "scope": "llm:generate",
    });
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).expect("sign")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_that_cannot_be_header_values_are_refused_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (issuer, key) = hs256_issuer(dir.path());
    let mut config = test_config();
    config.identity.jwt_issuers = vec![issuer];
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    let send = |token: String| {
        let gw = envoy.listener;
        async move {
            raw_http(
                gw,
                "POST",
                CHAT,
                &[
                    ("content-type", "application/json"),
                    ("authorization", &format!("Bearer {token}")),
                ],
                r#"{"model":"llama-3-8b"}"#,
            )
            .await
        }
    };
    let ok = send(token(&key, "acme", "paid")).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body.contains("x-tollgate-tier"), "{}", ok.body);
    for (tenant, tier) in [
        ("acme", "paid\r\nx-injected: yes"),
        ("acme", "paid\nx-injected: yes"),
        ("acme", "paid\0"),
        ("acme\r\nx-injected: yes", "paid"),
        ("acme", " paid"),
        ("acme", "paid\u{7f}"),
    ] {
        let resp = send(token(&key, tenant, tier)).await;
        assert_eq!(resp.status, 401, "{tenant:?}/{tier:?}: {}", resp.body);
        assert_eq!(resp.json()["error"]["code"], "invalid_claim", "{tier:?}");
        assert!(!resp.body.contains("x-injected"), "{}", resp.body);
    }
    // A non-ASCII claim is a valid field value (obs-text) and passes.
    let utf8 = send(token(&key, "acme", "prémium")).await;
    assert_eq!(utf8.status, 200, "{}", utf8.body);
    tg.stop().await;
}

mod header_values {
    use proptest::prelude::*;
    use tollgate::config::{HeaderStyle, ResponseConfig};
    use tollgate::decision::{Decision, Outcome, Reason};
    use tollgate::identity::{Principal, PrincipalKind};
    use tollgate::respond::{check_response, is_field_value};

    fn emitted(decision: &Decision) -> Vec<String> {
        use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
        let r = check_response(
            decision,
            &Default::default(),
            &ResponseConfig::default(),
            HeaderStyle::Draft03,
        );
        let headers = match r.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok.headers,
            Some(HttpResponse::DeniedResponse(d)) => d.headers,
            _ => Vec::new(),
        };
        headers
            .into_iter()
            .filter_map(|h| h.header.map(|h| h.value))
            .collect()
    }

    proptest! {
        #[test]
        fn arbitrary_claims_never_yield_an_invalid_header(
            id in any::<String>(), tenant in any::<String>(), tier in any::<String>(),
        ) {
            let mut decision = Decision::early("r".into(), Outcome::Allow, "v".into());
            decision.principal = Some(Principal {
                kind: PrincipalKind::User,
                id: id.clone(),
                tenant: Some(tenant.clone()),
                tier: Some(tier.clone()),
                ..Principal::anonymous()
            });
            let values = emitted(&decision);
            for v in &values {
                prop_assert!(is_field_value(v), "emitted {v:?}");
            }
            let expressible = [&id, &tenant, &tier].iter().all(|s| is_field_value(s));
            if !expressible {
                prop_assert!(!values.iter().any(|v| v == &tier || v == &tenant));
            }
            let _ = Reason::InvalidClaim;
        }

        #[test]
        fn field_values_have_no_control_characters(s in any::<String>()) {
            if is_field_value(&s) {
                prop_assert!(!s.bytes().any(|b| b < 0x20 && b != b'\t' || b == 0x7f));
                prop_assert_eq!(s.trim_matches([' ', '\t']), s.as_str());
            }
        }
    }
}

// ---------- issue 15.5: client address forms ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_source_address_form_parses_or_is_refused_with_a_reason() {
    // A policy on the address: requests from 10/8 are refused.
    let policies = support::copy_policies();
    std::fs::write(
        policies.path().join("net.cedar"),
        "@id(\"no-ten-net\")\nforbid (principal, action in [Action::\"chat\", Action::\"complete\", Action::\"embed\", Action::\"finetune\", Action::\"get_model\", Action::\"list_models\"], resource) when { context.http has source_ip && context.http.source_ip.isInRange(ip(\"10.0.0.0/8\")) };\n",
    )
    .expect("write policy");
    let mut config = test_config();
    config.policy.dir = policies.path().to_path_buf();
    let mut tg = Tollgate::start(config).await;
    let from = |address: Option<&str>| {
        let mut req = chat(&[("x-api-key", DEMO_PAID_KEY)], r#"{"model":"llama-3-8b"}"#);
        set_source(&mut req, address, "", "");
        req
    };
    let pipe = {
        use envoy_types::pb::envoy::config::core::v3::{Address, Pipe, address};
        let mut req = from(None);
        if let Some(source) = req.attributes.as_mut().and_then(|a| a.source.as_mut()) {
            source.address = Some(Address {
                address: Some(address::Address::Pipe(Pipe {
                    path: "/run/envoy.sock".into(),
                    mode: 0,
                })),
            });
        }
        req
    };
    let rows = vec![
        ("IPv4", from(Some("127.0.0.1")), 200, "allowed"),
        (
            "IPv4-mapped, dotted",
            from(Some("::ffff:127.0.0.1")),
            200,
            "allowed",
        ),
        (
            "IPv4-mapped, hex",
            from(Some("::ffff:7f00:1")),
            200,
            "allowed",
        ),
        (
            "IPv4-mapped 10/8 is 10/8",
            from(Some("::ffff:10.1.2.3")),
            403,
            "policy_denied",
        ),
        ("IPv4 10/8", from(Some("10.1.2.3")), 403, "policy_denied"),
        ("IPv6", from(Some("2001:db8::1")), 200, "allowed"),
        (
            "IPv6 with zone id",
            from(Some("fe80::1%eth0")),
            200,
            "allowed",
        ),
        ("no address", from(None), 200, "allowed"),
        ("empty address", from(Some("")), 200, "allowed"),
        ("pipe", pipe, 200, "allowed"),
        (
            "garbage",
            from(Some("not-an-address")),
            400,
            "malformed_request",
        ),
    ];
    table(&tg, rows).await;
    tg.stop().await;
}

// ---------- issue 15.6: one model ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_named_twice_with_different_values_is_refused() {
    let mut tg = Tollgate::start(test_config()).await;
    let free = [("x-api-key", DEMO_FREE_KEY)];
    let small = r#"{"model":"llama-3-8b"}"#;
    let with_header = [("x-api-key", DEMO_FREE_KEY), ("x-model", "llama-3-70b")];
    let rows = vec![
        (
            "query names another model",
            check_request(
                "POST",
                "/v1/chat/completions?model=llama-3-70b",
                &free,
                small,
            ),
            400,
            "ambiguous_model",
        ),
        (
            "query names the same model",
            check_request(
                "POST",
                "/v1/chat/completions?model=llama-3-8b",
                &free,
                small,
            ),
            200,
            "allowed",
        ),
        (
            "query twice",
            check_request(
                "POST",
                "/v1/chat/completions?model=llama-3-8b&model=llama-3-70b",
                &free,
                small,
            ),
            400,
            "ambiguous_model",
        ),
        (
            "encoded query name",
            check_request(
                "POST",
                "/v1/chat/completions?mode%6C=llama-3-70b",
                &free,
                small,
            ),
            400,
            "ambiguous_model",
        ),
        (
            "header names another model",
            chat(&with_header, small),
            400,
            "ambiguous_model",
        ),
        (
            "duplicate JSON key",
            chat(&free, r#"{"model":"llama-3-8b","model":"llama-3-70b"}"#),
            400,
            "malformed_body",
        ),
        (
            "escaped duplicate JSON key",
            chat(
                &free,
                r#"{"model":"llama-3-8b","mod\u0065l":"llama-3-70b"}"#,
            ),
            400,
            "malformed_body",
        ),
        (
            "path names another model",
            check_request("GET", "/v1/models/llama-3-8b?model=llama-3-70b", &free, ""),
            400,
            "ambiguous_model",
        ),
    ];
    table(&tg, rows).await;
    tg.stop().await;
}

// ---------- issue 20.2: numeric parameters ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numeric_parameters_outside_their_range_are_refused() {
    let mut tg = Tollgate::start(test_config()).await;
    let free = [("x-api-key", DEMO_FREE_KEY)];
    let paid = [("x-api-key", DEMO_PAID_KEY)];
    let body = |fields: &str| format!(r#"{{"model":"llama-3-8b","stream":true,{fields}}}"#);
    let mut rows = Vec::new();
    for fields in [
        r#""max_tokens":-1"#,
        r#""max_tokens":0"#,
        r#""max_tokens":256.5"#,
        r#""max_tokens":1e2"#,
        r#""max_tokens":"256""#,
        r#""max_tokens":1000001"#,
        r#""max_tokens":99999999999999999999"#,
        r#""max_completion_tokens":-1"#,
        r#""max_output_tokens":-1"#,
        r#""max_tokens":256,"max_completion_tokens":100000"#,
        r#""max_tokens":256,"n":0"#,
        r#""max_tokens":256,"n":-1"#,
        r#""max_tokens":256,"n":100000"#,
        r#""generationConfig":{"maxOutputTokens":-1}"#,
        r#""options":{"num_predict":-1}"#,
        r#""max_tokens_to_sample":0"#,
    ] {
        for (who, key) in [("free", &free), ("paid", &paid)] {
            rows.push((
                format!("{who} {fields}"),
                chat(&key[..], &body(fields)),
                400,
                "invalid_parameter",
            ));
        }
    }
    for (fields, who, key, status, code) in [
        (r#""max_tokens":1"#, "free", &free, 200, "allowed"),
        (r#""max_tokens":512"#, "free", &free, 200, "allowed"),
        (r#""max_tokens":513"#, "free", &free, 403, "policy_denied"),
        (
            r#""max_completion_tokens":512,"n":2"#,
            "free",
            &free,
            200,
            "allowed",
        ),
        (r#""max_tokens":8192"#, "paid", &paid, 200, "allowed"),
        (r#""max_tokens":8193"#, "paid", &paid, 403, "policy_denied"),
        (
            r#""max_output_tokens":8193"#,
            "paid",
            &paid,
            403,
            "policy_denied",
        ),
    ] {
        rows.push((
            format!("{who} {fields}"),
            chat(&key[..], &body(fields)),
            status,
            code,
        ));
    }
    for (name, request, status, code) in rows {
        let v = ext_authz(&tg, request).await;
        assert_eq!((v.status, v.code.as_str()), (status, code), "{name}");
    }
    tg.stop().await;
}

/// Sends raw request bytes and returns the response's status line and body.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Issue 8.16 through Envoy: a Host with a comma, and two Host lines (which
/// Envoy merges into one comma-joined authority), are refused by Tollgate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_several_values_is_refused_through_envoy() {
    let mut tg = Tollgate::start(test_config()).await;
    let (upstream, _task) = start_upstream().await;
    let envoy = Envoy::start(tg.grpc.port(), upstream.port()).await;
    let body = r#"{"model":"llama-3-8b"}"#;
    for host_lines in [
        "Host: a.example.com,b.example.com\r\n",
        "Host: a.example.com\r\nHost: b.example.com\r\n",
    ] {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\n{host_lines}x-api-key: {DEMO_PAID_KEY}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (status, reply) = raw_request(envoy.listener, &request).await;
        assert_eq!(status, 400, "{host_lines:?}: {reply}");
        assert!(reply.contains("ambiguous_host"), "{host_lines:?}: {reply}");
    }
    tg.stop().await;
}

/// Issue 15.4 end to end: arbitrary claim strings in a signed token never
/// yield an allow with an invalid header value, and never fail the RPC.
#[test]
fn arbitrary_claims_through_ext_authz_never_yield_an_invalid_header() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config as RunnerConfig, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let (issuer, key) = hs256_issuer(dir.path());
    let mut config = test_config();
    config.identity.jwt_issuers = vec![issuer];
    let mut tg = rt.block_on(Tollgate::start(config));
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 128,
        ..RunnerConfig::default()
    });
    let claim = prop_oneof![
        any::<String>(),
        "[a-z]{1,8}[\\r\\n\\x00\\x7f\\t ][ -~]{0,8}",
        Just("paid".to_string()),
    ];
    runner
        .run(&(claim.clone(), claim), |(tenant, tier)| {
            let token = token(&key, &tenant, &tier);
            let auth = format!("Bearer {token}");
            let v = rt.block_on(ext_authz(
                &tg,
                chat(&[("authorization", &auth)], r#"{"model":"llama-3-8b"}"#),
            ));
            for (name, value) in &v.upstream_headers {
                prop_assert!(
                    tollgate::respond::is_field_value(value),
                    "{name}: {value:?}"
                );
            }
            let expressible = [&tenant, &tier]
                .iter()
                .all(|s| tollgate::respond::is_field_value(s));
            if !expressible {
                prop_assert_eq!(v.code.as_str(), "invalid_claim");
            }
            Ok(())
        })
        .expect("property holds");
    rt.block_on(tg.stop());
}
