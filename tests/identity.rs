//! Identity end to end over gRPC ext_authz: API keys in Redis shared by two
//! replicas (issue, revoke within the stated bound), JWTs from RSA, EC and
//! Ed25519 keys minted here and verified against a JWKS served here, and no
//! credential in the logs.

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use support::{RedisServer, Tollgate, eventually, test_config};

type Client = AuthorizationClient<tonic::transport::Channel>;

fn chat(headers: &[(&str, &str)], model: &str) -> CheckRequest {
    support::check_request(
        "POST",
        "/v1/chat/completions",
        headers,
        &format!(r#"{{"model":"{model}"}}"#),
    )
}

/// (HTTP status, reason code, principal header).
async fn check(c: &mut Client, headers: &[(&str, &str)]) -> (u16, String, Option<String>) {
    let resp = c
        .check(chat(headers, "llama-3-8b"))
        .await
        .expect("check")
        .into_inner();
    match resp.http_response.expect("http_response") {
        HttpResponse::OkResponse(ok) => {
            let p = ok
                .headers
                .iter()
                .filter_map(|h| h.header.as_ref())
                .find(|h| h.key == "x-tollgate-principal")
                .map(|h| h.value.clone());
            (200, "allowed".into(), p)
        }
        HttpResponse::DeniedResponse(d) => {
            let body: serde_json::Value = serde_json::from_str(&d.body).expect("json");
            (
                d.status.map_or(0, |s| s.code as u16),
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                None,
            )
        }
        HttpResponse::ErrorResponse(e) => panic!("{e:?}"),
    }
}

fn tollgate_cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_keys_are_issued_and_revoked_across_replicas_within_the_bound() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = support::repo();
    let config_path = dir.path().join("c.toml");
    std::fs::write(
        &config_path,
        format!(
            "[policy]\ndir = {:?}\nwatch = false\n[identity]\napi_keys_file = {:?}\napi_keys_redis_url = {:?}\napi_keys_cache_ms = 500\n[quota]\nlimits_file = {:?}\n",
            repo.join("policies"),
            repo.join("examples/keys.toml"),
            redis.url(),
            repo.join("examples/limits.yaml")
        ),
    )
    .expect("config");
    let (ok, key, err) = tollgate_cli(
        &config_path,
        &[
            "keys",
            "create",
            "--id",
            "partner-1",
            "--tenant",
            "acme",
            "--tier",
            "paid",
            "--scope",
            "llm:generate",
        ],
    );
    assert!(ok, "{err}");
    assert!(key.starts_with("tg_partner-1_"));
    let stored = redis.cli(&["hgetall", "tg:apikey:partner-1"]);
    assert!(!stored.contains(&key), "only the hash is stored");

    let mut config = tollgate::config::Config::load(Some(&config_path)).expect("config");
    config.server.grpc_listen = "127.0.0.1:0".parse().expect("addr");
    config.server.admin_listen = "127.0.0.1:0".parse().expect("addr");
    let mut a = Tollgate::start(config.clone()).await;
    let mut b = Tollgate::start(config).await;
    let mut ca = AuthorizationClient::new(a.channel().await);
    let cb = AuthorizationClient::new(b.channel().await);
    let header = [("x-api-key", key.as_str())];
    let accepted =
        eventually(Duration::from_secs(5), || {
            let (mut ca, mut cb) = (ca.clone(), cb.clone());
            async move {
                check(&mut ca, &header).await.0 == 200 && check(&mut cb, &header).await.0 == 200
            }
        })
        .await;
    assert!(accepted, "both replicas accept the new key");
    assert_eq!(
        check(&mut ca, &header).await.2.as_deref(),
        Some("ApiKey::\"partner-1\"")
    );

    // Malformed keys never reach Redis.
    let before = redis.cli(&["info", "commandstats"]);
    for bad in ["tg_partner-1_x", "tg_nope", "sk-live-whatever"] {
        assert_eq!(
            check(&mut ca, &[("x-api-key", bad)]).await.1,
            "malformed_credential"
        );
    }
    let hgetall = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("cmdstat_hgetall:"))
            .map(str::to_string)
    };
    assert_eq!(
        hgetall(&before),
        hgetall(&redis.cli(&["info", "commandstats"])),
        "a malformed key caused a lookup"
    );

    let (ok, _, err) = tollgate_cli(&config_path, &["keys", "revoke", "partner-1"]);
    assert!(ok, "{err}");
    let revoked_at = Instant::now();
    let refused = eventually(Duration::from_secs(3), || {
        let (mut ca, mut cb) = (ca.clone(), cb.clone());
        async move {
            check(&mut ca, &header).await.1 == "revoked_credential"
                && check(&mut cb, &header).await.1 == "revoked_credential"
        }
    })
    .await;
    let took = revoked_at.elapsed();
    assert!(refused, "both replicas refuse the revoked key");
    assert!(
        took < Duration::from_millis(500 + 500),
        "revocation took {took:?}, bound is the 500 ms cache TTL"
    );
    let (_, list, _) = tollgate_cli(&config_path, &["keys", "list"]);
    assert!(
        list.contains("partner-1") && list.contains("revoked"),
        "{list}"
    );
    a.stop().await;
    b.stop().await;
}

// ---------- JWT ----------

struct Signer {
    key: EncodingKey,
    alg: Algorithm,
    kid: String,
}

/// Generates a key pair with openssl and returns the signer and its JWK.
fn keypair(dir: &std::path::Path, kind: &str, alg: Algorithm, kid: &str) -> (Signer, Jwk) {
    let path = dir.join(format!("{kid}.pem"));
    let args: Vec<&str> = match kind {
        "rsa" => vec![
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ],
        "ec" => vec![
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ],
        _ => vec!["genpkey", "-algorithm", "ed25519"],
    };
    let out = Command::new("openssl")
        .args(&args)
        .arg("-out")
        .arg(&path)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read(&path).expect("pem");
    let key = match kind {
        "rsa" => EncodingKey::from_rsa_pem(&pem),
        "ec" => EncodingKey::from_ec_pem(&pem),
        _ => EncodingKey::from_ed_pem(&pem),
    }
    .expect("encoding key");
    let mut jwk = Jwk::from_encoding_key(&key, alg).expect("jwk");
    jwk.common.key_id = Some(kid.to_string());
    (
        Signer {
            key,
            alg,
            kid: kid.to_string(),
        },
        jwk,
    )
}

const ISS: &str = "https://idp.example.test/";
const AUD: &str = "tollgate";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn claims() -> serde_json::Value {
    json!({"iss": ISS, "aud": AUD, "sub": "alice", "exp": now() + 300, "tenant": "acme", "tier": "paid", "scope": "llm:generate openid"})
}

fn mint(s: &Signer, claims: &serde_json::Value) -> String {
    let mut header = Header::new(s.alg);
    header.kid = Some(s.kid.clone());
    jsonwebtoken::encode(&header, claims, &s.key).expect("sign")
}

/// Serves `/jwks` (counting fetches) until dropped.
struct JwksServer {
    addr: SocketAddr,
    fetches: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_jwks(set: JwkSet) -> JwksServer {
    let fetches = Arc::new(AtomicU64::new(0));
    let count = fetches.clone();
    let body = serde_json::to_string(&set).expect("jwks json");
    let app = axum::Router::new().fallback(move || {
        let body = body.clone();
        count.fetch_add(1, Ordering::SeqCst);
        async move { ([("content-type", "application/json")], body) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    JwksServer {
        addr,
        fetches,
        task,
    }
}

fn issuer_config(jwks: SocketAddr) -> tollgate::identity::jwt::IssuerConfig {
    toml::from_str(&format!(
        "name = \"idp\"\nissuer = \"{ISS}\"\naudiences = [\"{AUD}\"]\njwks_url = \"http://{jwks}/jwks\"\nleeway_secs = 30\nmin_refresh_interval_secs = 60\n"
    ))
    .expect("issuer config")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_matrix() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, rsa_jwk) = keypair(dir.path(), "rsa", Algorithm::RS256, "rsa-1");
    let (ec, ec_jwk) = keypair(dir.path(), "ec", Algorithm::ES256, "ec-1");
    let (ed, ed_jwk) = keypair(dir.path(), "ed", Algorithm::EdDSA, "ed-1");
    let (stranger, _) = keypair(dir.path(), "ec", Algorithm::ES256, "not-published");
    let jwks = serve_jwks(JwkSet {
        keys: vec![rsa_jwk, ec_jwk, ed_jwk],
    })
    .await;
    // A server that a `jku` header points at: it must never be contacted.
    let jku = serve_jwks(JwkSet { keys: vec![] }).await;

    let mut config = test_config();
    config.identity.jwt_issuers = vec![issuer_config(jwks.addr)];
    let mut tg = Tollgate::start(config).await;
    let admin = tg.admin;
    let ready = eventually(Duration::from_secs(5), || async move {
        support::raw_http(admin, "GET", "/readyz", &[], "")
            .await
            .status
            == 200
    })
    .await;
    assert!(ready, "the issuer's keys were not loaded");
    let mut c = AuthorizationClient::new(tg.channel().await);

    for s in [&rsa, &ec, &ed] {
        let (status, _, principal) =
            check(&mut c, &[("authorization", &bearer(&mint(s, &claims())))]).await;
        assert_eq!(status, 200, "{:?}", s.alg);
        assert_eq!(principal.as_deref(), Some("User::\"alice\""));
    }

    let with = |patch: serde_json::Value| {
        let mut c = claims();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "expired",
            mint(&rsa, &with(json!({"exp": now() - 120}))),
            401,
            "expired_credential",
        ),
        (
            "within leeway",
            mint(&rsa, &with(json!({"exp": now() - 10}))),
            200,
            "allowed",
        ),
        (
            "not yet valid",
            mint(&rsa, &with(json!({"nbf": now() + 600}))),
            401,
            "not_yet_valid",
        ),
        (
            "wrong iss",
            mint(&rsa, &with(json!({"iss": "https://evil.example/"}))),
            401,
            "invalid_credential",
        ),
        (
            "wrong aud",
            mint(&rsa, &with(json!({"aud": "someone-else"}))),
            401,
            "invalid_credential",
        ),
        (
            "missing aud",
            mint(&rsa, &with(json!({"aud": null}))),
            401,
            "invalid_credential",
        ),
        (
            "string exp",
            mint(&rsa, &with(json!({"exp": (now() + 300).to_string()}))),
            401,
            "invalid_credential",
        ),
        (
            "no subject",
            mint(&rsa, &with(json!({"sub": null}))),
            401,
            "invalid_credential",
        ),
        (
            "64 KiB token",
            format!(
                "{}.{}.{}",
                "a".repeat(22_000),
                "b".repeat(22_000),
                "c".repeat(22_000)
            ),
            401,
            "malformed_credential",
        ),
        (
            "garbage",
            "aaa.bbb.ccc".to_string(),
            401,
            "malformed_credential",
        ),
    ];
    for (name, token, want_status, want_reason) in cases {
        let (status, reason, _) = check(&mut c, &[("authorization", &bearer(&token))]).await;
        assert_eq!(
            (status, reason.as_str()),
            (want_status, want_reason),
            "{name}"
        );
    }

    // alg none: header {"alg":"none"}, no signature.
    use base64::Engine as _;
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims())
    );
    assert_eq!(
        check(&mut c, &[("authorization", &bearer(&none))]).await.0,
        401
    );
    // HS256 signed with the RSA public key (the classic confusion attack).
    let public_pem = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(dir.path().join("rsa-1.pem"))
        .output()
        .expect("openssl")
        .stdout;
    let mut h = Header::new(Algorithm::HS256);
    h.kid = Some("rsa-1".into());
    let confused =
        jsonwebtoken::encode(&h, &claims(), &EncodingKey::from_secret(&public_pem)).expect("sign");
    assert_eq!(
        check(&mut c, &[("authorization", &bearer(&confused))])
            .await
            .0,
        401
    );
    // jku pointing at our test server: never followed.
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some("rsa-1".into());
    h.jku = Some(format!("http://{}/jwks", jku.addr));
    let with_jku = jsonwebtoken::encode(&h, &claims(), &rsa.key).expect("sign");
    assert_eq!(
        check(&mut c, &[("authorization", &bearer(&with_jku))])
            .await
            .0,
        200
    );
    assert_eq!(
        jku.fetches.load(Ordering::SeqCst),
        0,
        "the jku URL was contacted"
    );

    // Unknown kid: exactly one refresh, and a burst of 1000 causes no more.
    let fetched = jwks.fetches.load(Ordering::SeqCst);
    let unknown = mint(&stranger, &claims());
    assert_eq!(
        check(&mut c, &[("authorization", &bearer(&unknown))])
            .await
            .1,
        "invalid_credential"
    );
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        fetched + 1,
        "one refresh for an unknown kid"
    );
    let mut burst = Vec::new();
    for i in 0..1000 {
        let mut c = c.clone();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(format!("kid-{i}"));
        let token = jsonwebtoken::encode(&header, &claims(), &stranger.key).expect("sign");
        burst.push(tokio::spawn(async move {
            check(&mut c, &[("authorization", &bearer(&token))]).await.0
        }));
    }
    for t in burst {
        assert_eq!(t.await.expect("task"), 401);
    }
    assert_eq!(
        jwks.fetches.load(Ordering::SeqCst),
        fetched + 1,
        "a burst of unknown kids caused a fetch storm"
    );

    // The JWKS server goes away: the last good keys keep working.
    drop(jwks);
    assert_eq!(
        check(&mut c, &[("authorization", &bearer(&mint(&ed, &claims())))])
            .await
            .0,
        200
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_without_keys_fails_closed_and_is_unready() {
    // Nothing listens on this port.
    let dead: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    let mut config = test_config();
    config.identity.jwt_issuers = vec![issuer_config(dead)];
    let mut tg = Tollgate::start(config).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ready = support::raw_http(tg.admin, "GET", "/readyz", &[], "").await;
    assert_eq!(ready.status, 503);
    assert_eq!(ready.json()["jwt_issuers"]["idp"]["keys"], false);
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, _) = keypair(dir.path(), "rsa", Algorithm::RS256, "rsa-1");
    let mut c = AuthorizationClient::new(tg.channel().await);
    assert_eq!(
        check(
            &mut c,
            &[("authorization", &bearer(&mint(&rsa, &claims())))]
        )
        .await
        .0,
        401
    );
    // API keys still work meanwhile (the example key of tenant acme, paid).
    assert_eq!(
        check(
            &mut c,
            &[(
                "x-api-key",
                "tg_demo-paid_goBTFjOQ7rLLE9TbnvHfRBAX1j35S8cb3A0fen"
            )]
        )
        .await
        .0,
        200
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_never_reach_the_logs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (grpc, admin) = (support::free_port(), support::free_port());
    let repo = support::repo();
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ngrpc_listen = \"127.0.0.1:{grpc}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n[policy]\ndir = {:?}\nwatch = false\n\
             [identity]\napi_keys_file = {:?}\n[quota]\nlimits_file = {:?}\n[log]\nformat = \"json\"\nlevel = \"debug\"\n",
            repo.join("policies"),
            repo.join("examples/keys.toml"),
            repo.join("examples/limits.yaml")
        ),
    )
    .expect("config");
    let log = dir.path().join("tollgate.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn");
    let addr: SocketAddr = format!("127.0.0.1:{admin}").parse().expect("addr");
    let up = eventually(Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    assert!(up, "tollgate did not start");
    let channel = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{grpc}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut c = AuthorizationClient::new(channel);
    let good = tollgate::identity::key_format::generate("demo-paid").expect("key");
    let secrets = [
        good.clone(),
        "tg_demo-paid_NOTAREALSECRETxxxxxxxxxxxxxxxxxxxxxxxx".to_string(),
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzZWNyZXQtc3ViamVjdCJ9.c2lnbmF0dXJlLXNlY3JldA".to_string(),
        "hunter2-super-secret-api-key".to_string(),
    ];
    for s in &secrets {
        let _ = check(&mut c, &[("x-api-key", s)]).await;
        let _ = check(&mut c, &[("authorization", &bearer(s))]).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).expect("read log");
    assert!(
        text.contains("\"decision\""),
        "the decisions were logged: {text}"
    );
    for s in &secrets {
        assert!(!text.contains(s.as_str()), "a credential reached the log");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_verified_jwt_payloads_are_trusted_only_when_configured() {
    use envoy_types::pb::envoy::config::core::v3::Metadata;
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let s = |v: &str| Value {
        kind: Some(Kind::StringValue(v.into())),
    };
    let payload = Struct {
        fields: [
            ("iss".to_string(), s(ISS)),
            ("sub".to_string(), s("bob")),
            ("tenant".to_string(), s("acme")),
            ("tier".to_string(), s("paid")),
            ("scope".to_string(), s("llm:generate")),
        ]
        .into(),
    };
    let request = || {
        let mut r = chat(&[], "llama-3-8b");
        if let Some(a) = r.attributes.as_mut() {
            a.metadata_context = Some(Metadata {
                filter_metadata: [(
                    tollgate::identity::jwt::JWT_AUTHN_NAMESPACE.to_string(),
                    Struct {
                        fields: [(
                            "jwt_payload".to_string(),
                            Value {
                                kind: Some(Kind::StructValue(payload.clone())),
                            },
                        )]
                        .into(),
                    },
                )]
                .into(),
                ..Default::default()
            });
        }
        r
    };
    let unused: SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    for (trust, want) in [(false, 401u16), (true, 200)] {
        let mut issuer = issuer_config(unused);
        if trust {
            issuer.envoy_payload_key = Some("jwt_payload".into());
        }
        let mut config = test_config();
        config.identity.jwt_issuers = vec![issuer];
        let mut tg = Tollgate::start(config).await;
        let mut c = AuthorizationClient::new(tg.channel().await);
        let resp = c.check(request()).await.expect("check").into_inner();
        let status = match resp.http_response.expect("http_response") {
            HttpResponse::OkResponse(_) => 200,
            HttpResponse::DeniedResponse(d) => d.status.map_or(0, |s| s.code as u16),
            HttpResponse::ErrorResponse(_) => 0,
        };
        assert_eq!(status, want, "trust = {trust}");
        tg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oidc_discovery_finds_the_jwks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (ec, ec_jwk) = keypair(dir.path(), "ec", Algorithm::ES256, "ec-1");
    let jwks = serve_jwks(JwkSet { keys: vec![ec_jwk] }).await;
    // The discovery document names the JWKS endpoint.
    let doc = serde_json::to_string(
        &json!({"issuer": ISS, "jwks_uri": format!("http://{}/jwks", jwks.addr)}),
    )
    .expect("doc");
    let app = axum::Router::new().fallback(move || {
        let doc = doc.clone();
        async move { ([("content-type", "application/json")], doc) }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let discovery = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let mut issuer = issuer_config(jwks.addr);
    issuer.jwks_url = None;
    issuer.discovery_url = Some(format!(
        "http://{discovery}/.well-known/openid-configuration"
    ));
    let mut config = test_config();
    config.identity.jwt_issuers = vec![issuer];
    let mut tg = Tollgate::start(config).await;
    let admin = tg.admin;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            support::raw_http(admin, "GET", "/readyz", &[], "")
                .await
                .status
                == 200
        })
        .await,
        "keys were not found through discovery"
    );
    let mut c = AuthorizationClient::new(tg.channel().await);
    assert_eq!(
        check(&mut c, &[("authorization", &bearer(&mint(&ec, &claims())))])
            .await
            .0,
        200
    );
    server.abort();
    tg.stop().await;
}
