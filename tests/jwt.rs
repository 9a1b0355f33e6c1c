//! JWT and JWKS behaviour end to end over gRPC ext_authz, against keys made
//! here and an identity provider on loopback whose answers each test
//! controls: token types (RFC 8725 §3.11, RFC 9068), strict token JSON, the
//! key set per RFC 7515/7517/7518 and OIDC Discovery, bounded JWKS fetches,
//! recovery from an IdP that is down at boot, and which key URLs may be
//! fetched at all.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::jwt::{
    AUD, Client, ISS, Idp, Signer, check_bearer, claims, claims_with, issuer, keypair, metric,
    mint, mint_raw, now, wait_ready,
};
use support::{Tollgate, eventually, test_config};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Tollgate trusting one issuer (`extra` TOML lines added to it), started and,
/// when `want_ready`, with its keys loaded.
async fn start(jwks_url: &str, extra: &str, want_ready: bool) -> (Tollgate, Client) {
    let mut config = test_config();
    config.identity.jwt_issuers = vec![issuer(jwks_url, extra)];
    let tg = Tollgate::start(config).await;
    if want_ready {
        assert!(
            wait_ready(tg.admin, 200, Duration::from_secs(10)).await,
            "the issuer's keys were not loaded"
        );
    }
    let c = support::jwt::Client::new(tg.channel().await);
    (tg, c)
}

fn header(s: &Signer, extra: Value) -> String {
    let mut h = json!({"alg": "RS256", "kid": s.kid});
    for (k, v) in extra.as_object().expect("object") {
        if v.is_null() {
            h.as_object_mut().expect("object").remove(k);
        } else {
            h[k] = v.clone();
        }
    }
    h.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_access_tokens_are_accepted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    let body = claims().to_string();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "typ at+jwt",
            header(&rsa, json!({"typ": "at+jwt"})),
            200,
            "allowed",
        ),
        (
            "typ application/at+jwt",
            header(&rsa, json!({"typ": "application/at+jwt"})),
            200,
            "allowed",
        ),
        (
            "typ AT+JWT",
            header(&rsa, json!({"typ": "AT+JWT"})),
            200,
            "allowed",
        ),
        (
            "typ JWT",
            header(&rsa, json!({"typ": "JWT"})),
            200,
            "allowed",
        ),
        ("no typ", header(&rsa, json!({})), 200, "allowed"),
        (
            "typ id+jwt",
            header(&rsa, json!({"typ": "id+jwt"})),
            401,
            "wrong_token_type",
        ),
        (
            "typ application/id+jwt",
            header(&rsa, json!({"typ": "application/id+jwt"})),
            401,
            "wrong_token_type",
        ),
        (
            "typ refresh+jwt",
            header(&rsa, json!({"typ": "refresh+jwt"})),
            401,
            "wrong_token_type",
        ),
        (
            "typ logout+jwt",
            header(&rsa, json!({"typ": "logout+jwt"})),
            401,
            "wrong_token_type",
        ),
        (
            "typ secevent+jwt",
            header(&rsa, json!({"typ": "secevent+jwt"})),
            401,
            "wrong_token_type",
        ),
        (
            "typ dpop+jwt",
            header(&rsa, json!({"typ": "dpop+jwt"})),
            401,
            "wrong_token_type",
        ),
        (
            "typ a number",
            header(&rsa, json!({"typ": 7})),
            401,
            "malformed_credential",
        ),
    ];
    for (name, h, want_status, want_reason) in cases {
        let token = mint_raw(&rsa, &h, &body);
        let (status, reason) = check_bearer(&mut c, &token).await;
        assert_eq!(
            (status, reason.as_str()),
            (want_status, want_reason),
            "{name}"
        );
    }
    let payloads: Vec<(&str, Value, u16, &str)> = vec![
        (
            "an OIDC ID token",
            json!({"nonce": "n-0S6_WzA2Mj", "at_hash": "77QmUPtjPfzWtF2AnpK9RQ", "azp": "client-1"}),
            401,
            "wrong_token_type",
        ),
        ("nonce", json!({"nonce": "n"}), 401, "wrong_token_type"),
        ("at_hash", json!({"at_hash": "x"}), 401, "wrong_token_type"),
        ("c_hash", json!({"c_hash": "x"}), 401, "wrong_token_type"),
        (
            "token_use id",
            json!({"token_use": "id"}),
            401,
            "wrong_token_type",
        ),
        (
            "token_use access",
            json!({"token_use": "access"}),
            200,
            "allowed",
        ),
        ("keycloak ID", json!({"typ": "ID"}), 401, "wrong_token_type"),
        ("keycloak Bearer", json!({"typ": "Bearer"}), 200, "allowed"),
        ("azp alone", json!({"azp": "client-1"}), 200, "allowed"),
    ];
    for (name, patch, want_status, want_reason) in payloads {
        let token = mint(&rsa, &claims_with(patch));
        let (status, reason) = check_bearer(&mut c, &token).await;
        assert_eq!(
            (status, reason.as_str()),
            (want_status, want_reason),
            "{name}"
        );
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_issuer_can_require_a_token_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let (mut tg, mut c) = start(
        &idp.url("/jwks"),
        "token_types = [\"at+jwt\"]\nrequire_token_type = true",
        true,
    )
    .await;
    let body = claims().to_string();
    for (h, want) in [
        (header(&rsa, json!({"typ": "at+jwt"})), 200),
        (header(&rsa, json!({})), 401),
        (header(&rsa, json!({"typ": "JWT"})), 401),
    ] {
        assert_eq!(
            check_bearer(&mut c, &mint_raw(&rsa, &h, &body)).await.0,
            want,
            "{h}"
        );
    }
    tg.stop().await;
    // An ID token type can never be allowed.
    let bad = issuer(&idp.url("/jwks"), "token_types = [\"application/id+jwt\"]");
    assert!(bad.validate().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_members_and_times_in_the_future_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    let (exp, h) = (now() + 300, header(&rsa, json!({"typ": "JWT"})));
    let base = format!(
        r#""iss":"{ISS}","aud":"{AUD}","sub":"alice","exp":{exp},"tenant":"acme","tier":"paid","scope":"llm:generate""#
    );
    let cases: Vec<(&str, String, String, u16, &str)> = vec![
        (
            "control",
            h.clone(),
            format!(r#"{{{base}}}"#),
            200,
            "allowed",
        ),
        (
            "tenant twice",
            h.clone(),
            format!(r#"{{{base},"tier":"free","tenant":"globex"}}"#),
            401,
            "malformed_credential",
        ),
        (
            "sub twice",
            h.clone(),
            format!(r#"{{{base},"sub":"mallory"}}"#),
            401,
            "malformed_credential",
        ),
        (
            "nested duplicate",
            h.clone(),
            format!(r#"{{{base},"ext":{{"role":"user","role":"admin"}}}}"#),
            401,
            "malformed_credential",
        ),
        (
            "header duplicate",
            r#"{"alg":"RS256","kid":"rsa-1","typ":"id+jwt","typ":"JWT"}"#.to_string(),
            format!(r#"{{{base}}}"#),
            401,
            "malformed_credential",
        ),
        (
            "iat within the leeway",
            h.clone(),
            format!(r#"{{{base},"iat":{}}}"#, now() + 10),
            200,
            "allowed",
        ),
        (
            "iat in the future",
            h.clone(),
            format!(r#"{{{base},"iat":{}}}"#, now() + 600),
            401,
            "invalid_credential",
        ),
        (
            "iat a string",
            h.clone(),
            format!(r#"{{{base},"iat":"{}"}}"#, now()),
            401,
            "invalid_credential",
        ),
        (
            "nbf in the future",
            h.clone(),
            format!(r#"{{{base},"nbf":{}}}"#, now() + 600),
            401,
            "not_yet_valid",
        ),
    ];
    for (name, h, payload, want_status, want_reason) in cases {
        let token = mint_raw(&rsa, &h, &payload);
        let (status, reason) = check_bearer(&mut c, &token).await;
        assert_eq!(
            (status, reason.as_str()),
            (want_status, want_reason),
            "{name}"
        );
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crit_header_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    let body = claims().to_string();
    for (extra, want) in [
        (json!({}), 200),
        (json!({"crit": ["b64"], "b64": false}), 401),
        (json!({"crit": ["b64"], "b64": true}), 401),
        (json!({"crit": ["exp"]}), 401),
        (
            json!({"crit": ["urn:example:unknown"], "urn:example:unknown": 1}),
            401,
        ),
        (json!({"crit": []}), 401),
    ] {
        let token = mint_raw(&rsa, &header(&rsa, extra.clone()), &body);
        assert_eq!(check_bearer(&mut c, &token).await.0, want, "{extra}");
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_without_kid_try_the_keys_that_fit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (first, first_jwk) = keypair(dir.path(), "rsa", 2048, "rsa-old");
    let (second, second_jwk) = keypair(dir.path(), "rsa", 2048, "rsa-new");
    let (ec, ec_jwk) = keypair(dir.path(), "ec", 0, "ec-1");
    let (stranger, _) = keypair(dir.path(), "rsa", 2048, "nobody");
    let idp = Idp::start().await;
    idp.jwks(&[&first_jwk, &second_jwk, &ec_jwk]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    let no_kid = |s: &Signer| {
        let h = if s.alg == jsonwebtoken::Algorithm::ES256 {
            r#"{"alg":"ES256","typ":"JWT"}"#
        } else {
            r#"{"alg":"RS256","typ":"JWT"}"#
        };
        mint_raw(s, h, &claims().to_string())
    };
    assert_eq!(check_bearer(&mut c, &no_kid(&first)).await.0, 200);
    assert_eq!(
        check_bearer(&mut c, &no_kid(&second)).await.0,
        200,
        "rollover"
    );
    assert_eq!(check_bearer(&mut c, &no_kid(&ec)).await.0, 200);
    assert_eq!(check_bearer(&mut c, &no_kid(&stranger)).await.0, 401);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_signature_keys_of_2048_bits_or_more_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sig, sig_jwk) = keypair(dir.path(), "rsa", 2048, "sig");
    let (enc, mut enc_jwk) = keypair(dir.path(), "rsa", 2048, "enc");
    let (ops, mut ops_jwk) = keypair(dir.path(), "rsa", 2048, "ops");
    let (verify, mut verify_jwk) = keypair(dir.path(), "rsa", 2048, "verify");
    let (weak, weak_jwk) = keypair(dir.path(), "rsa", 1024, "weak");
    enc_jwk["use"] = json!("enc");
    ops_jwk["key_ops"] = json!(["encrypt", "wrapKey"]);
    verify_jwk["key_ops"] = json!(["verify"]);
    let idp = Idp::start().await;
    idp.jwks(&[&sig_jwk, &enc_jwk, &ops_jwk, &verify_jwk, &weak_jwk]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    for (s, want) in [
        (&sig, 200),
        (&enc, 401),
        (&ops, 401),
        (&verify, 200),
        (&weak, 401),
    ] {
        assert_eq!(
            check_bearer(&mut c, &mint(s, &claims())).await.0,
            want,
            "{}",
            s.kid
        );
    }
    assert!(
        metric(tg.admin, "tollgate_jwks_keys_refused_total{issuer=\"idp\"}").await >= 1.0,
        "the 1024-bit key was not reported"
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_sharing_a_kid_are_picked_by_algorithm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, rsa_jwk) = keypair(dir.path(), "rsa", 2048, "shared");
    let (ec, ec_jwk) = keypair(dir.path(), "ec", 0, "shared");
    let (ed, ed_jwk) = keypair(dir.path(), "ed", 0, "shared");
    let idp = Idp::start().await;
    idp.jwks(&[&rsa_jwk, &ec_jwk, &ed_jwk]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    for s in [&rsa, &ec, &ed] {
        assert_eq!(
            check_bearer(&mut c, &mint(s, &claims())).await.0,
            200,
            "{:?}",
            s.alg
        );
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_malformed_member_does_not_spoil_the_set() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (good, good_jwk) = keypair(dir.path(), "rsa", 2048, "good");
    let (_, mut numeric_kid) = keypair(dir.path(), "ec", 0, "numeric");
    let (_, mut string_ops) = keypair(dir.path(), "ec", 0, "string-ops");
    numeric_kid["kid"] = json!(7);
    string_ops["key_ops"] = json!("verify");
    let idp = Idp::start().await;
    idp.jwks(&[&numeric_kid, &good_jwk, &string_ops, &json!("junk")]);
    let (mut tg, mut c) = start(&idp.url("/jwks"), "", true).await;
    assert_eq!(check_bearer(&mut c, &mint(&good, &claims())).await.0, 200);
    assert!(
        metric(tg.admin, "tollgate_jwks_keys_refused_total{issuer=\"idp\"}").await >= 3.0,
        "the malformed members were not reported"
    );
    tg.stop().await;
    // Nothing usable at all: the fetch fails and the issuer stays unready.
    let idp = Idp::start().await;
    idp.jwks(&[&numeric_kid, &string_ops]);
    let (mut tg, _) = start(&idp.url("/jwks"), "", false).await;
    let admin = tg.admin;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            metric(
                admin,
                "tollgate_jwks_fetches_total{issuer=\"idp\",result=\"unparsable\"}",
            )
            .await
                >= 1.0
        })
        .await
    );
    assert_eq!(
        support::raw_http(admin, "GET", "/readyz", &[], "")
            .await
            .status,
        503
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_must_name_the_configured_issuer() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let doc = |issuer: &str| json!({"issuer": issuer, "jwks_uri": idp.url("/jwks")}).to_string();
    let path = "/.well-known/openid-configuration";
    idp.answer(
        path,
        doc("https://another-idp.example.test/"),
        Duration::ZERO,
    );
    let mut config = test_config();
    let mut i = issuer(&idp.url("/jwks"), "");
    i.jwks_url = None;
    i.discovery_url = Some(idp.url(path));
    config.identity.jwt_issuers = vec![i];
    let mut tg = Tollgate::start(config).await;
    let admin = tg.admin;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            metric(
                admin,
                "tollgate_jwks_fetches_total{issuer=\"idp\",result=\"issuer_mismatch\"}",
            )
            .await
                >= 1.0
        })
        .await,
        "the foreign discovery document was not refused"
    );
    assert_eq!(
        support::raw_http(admin, "GET", "/readyz", &[], "")
            .await
            .status,
        503
    );
    let mut c = Client::new(tg.channel().await);
    assert_eq!(check_bearer(&mut c, &mint(&rsa, &claims())).await.0, 401);
    // A trailing-slash difference is a different issuer too.
    idp.answer(path, doc(ISS.trim_end_matches('/')), Duration::ZERO);
    let before = metric(
        admin,
        "tollgate_jwks_fetches_total{issuer=\"idp\",result=\"issuer_mismatch\"}",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async move {
            metric(
                admin,
                "tollgate_jwks_fetches_total{issuer=\"idp\",result=\"issuer_mismatch\"}",
            )
            .await
                > before
        })
        .await
    );
    assert_eq!(
        support::raw_http(admin, "GET", "/readyz", &[], "")
            .await
            .status,
        503
    );
    // The right document: picked up by the retry, without a restart.
    idp.answer(path, doc(ISS), Duration::ZERO);
    assert!(wait_ready(admin, 200, Duration::from_secs(15)).await);
    assert_eq!(check_bearer(&mut c, &mint(&rsa, &claims())).await.0, 200);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_fetches_are_bounded_and_keep_the_last_good_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, old_jwk) = keypair(dir.path(), "rsa", 2048, "old");
    let (new, new_jwk) = keypair(dir.path(), "ec", 0, "new");
    let idp = Idp::start().await;
    idp.jwks(&[&old_jwk]);
    // Every unknown kid may refresh at once, so each step below fetches.
    let (mut tg, mut c) = start(&idp.url("/jwks"), "min_refresh_interval_secs = 0", true).await;
    let admin = tg.admin;
    assert_eq!(check_bearer(&mut c, &mint(&old, &claims())).await.0, 200);
    let fetched = |result: &'static str| async move {
        metric(
            admin,
            &format!("tollgate_jwks_fetches_total{{issuer=\"idp\",result=\"{result}\"}}"),
        )
        .await
    };
    let new_keys_only = json!({"keys": [new_jwk]}).to_string();

    // Slow: 3 s for a set with only the new key. The request that asked
    // for the new kid does not wait for it; the fetch is abandoned at 2 s.
    idp.answer("/jwks", new_keys_only.clone(), Duration::from_secs(3));
    let started = Instant::now();
    assert_eq!(check_bearer(&mut c, &mint(&new, &claims())).await.0, 401);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "an unknown-kid request waited {:?} for the JWKS",
        started.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(5), || async move {
            fetched("timeout").await >= 1.0
        })
        .await,
        "the slow fetch was not abandoned"
    );
    assert_eq!(check_bearer(&mut c, &mint(&old, &claims())).await.0, 200);

    // Oversized: 100 KB.
    let mut big = json!({"keys": [new_jwk]});
    big["padding"] = json!("x".repeat(100 * 1024));
    idp.answer("/jwks", big.to_string(), Duration::ZERO);
    assert_eq!(check_bearer(&mut c, &mint(&new, &claims())).await.0, 401);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            fetched("too_large").await >= 1.0
        })
        .await
    );
    assert_eq!(check_bearer(&mut c, &mint(&old, &claims())).await.0, 200);

    // Unparsable.
    idp.answer("/jwks", "<html>maintenance</html>".into(), Duration::ZERO);
    assert_eq!(check_bearer(&mut c, &mint(&new, &claims())).await.0, 401);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            fetched("unparsable").await >= 1.0
        })
        .await
    );
    assert_eq!(check_bearer(&mut c, &mint(&old, &claims())).await.0, 200);

    // Prompt and well-formed, but dropping the key in use.
    idp.answer("/jwks", new_keys_only, Duration::ZERO);
    assert_eq!(check_bearer(&mut c, &mint(&new, &claims())).await.0, 401);
    assert!(
        eventually(Duration::from_secs(5), || async move {
            fetched("drops_keys_in_use").await >= 1.0
        })
        .await
    );
    assert_eq!(check_bearer(&mut c, &mint(&old, &claims())).await.0, 200);

    // A real rotation publishes the new key beside the old one.
    let both = [&old_jwk, &new_jwk];
    idp.jwks(&both);
    assert_eq!(check_bearer(&mut c, &mint(&new, &claims())).await.0, 200);
    assert_eq!(check_bearer(&mut c, &mint(&old, &claims())).await.0, 200);
    tg.stop().await;
}

async fn health(c: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    c.check(HealthCheckRequest {
        service: service.into(),
    })
    .await
    .expect("health check")
    .into_inner()
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_down_at_boot_is_retried_and_grpc_health_follows_readiness() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rsa, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", support::free_port())
        .parse()
        .expect("addr");
    // Nothing listens yet; the periodic refresh is 300 s away.
    let (mut tg, mut c) = start(&format!("http://{addr}/jwks"), "refresh_secs = 300", false).await;
    let mut h = HealthClient::new(tg.channel().await);
    let services = [
        "",
        "envoy.service.auth.v3.Authorization",
        "tollgate.v1.DecisionService",
    ];
    assert!(wait_ready(tg.admin, 503, Duration::from_secs(2)).await);
    for s in services {
        assert_eq!(
            health(&mut h, s).await,
            ServingStatus::NotServing as i32,
            "{s:?}"
        );
    }
    assert_eq!(check_bearer(&mut c, &mint(&rsa, &claims())).await.0, 401);

    let idp = Idp::start_on(addr).await;
    idp.jwks(&[&jwk]);
    assert!(
        wait_ready(tg.admin, 200, Duration::from_secs(10)).await,
        "the JWKS was not retried after boot"
    );
    let mut h2 = h.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let mut h = h2.clone();
            async move { health(&mut h, "").await == ServingStatus::Serving as i32 }
        })
        .await
    );
    for s in services {
        assert_eq!(
            health(&mut h2, s).await,
            ServingStatus::Serving as i32,
            "{s:?}"
        );
    }
    assert_eq!(check_bearer(&mut c, &mint(&rsa, &claims())).await.0, 200);
    assert!(idp.fetches.load(Ordering::SeqCst) >= 1);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_http_key_urls_need_a_loopback_host() {
    for url in [
        "http://127.evil.example/jwks",
        "http://localhost:x@evil.example/jwks",
        "http://127.0.0.1@evil.example/jwks",
        "http://localhost.evil.example/jwks",
        "http://idp.example.com/jwks",
        "https://user:secret@idp.example.com/jwks",
    ] {
        let i = issuer(url, "");
        assert!(i.validate().is_err(), "jwks_url {url}");
        let mut d = issuer("https://idp.example.com/jwks", "");
        d.jwks_url = None;
        d.discovery_url = Some(url.to_string());
        assert!(d.validate().is_err(), "discovery_url {url}");
    }
    for url in [
        "http://127.0.0.1:1/jwks",
        "http://[::1]:1/jwks",
        "http://localhost:1/jwks",
    ] {
        assert!(issuer(url, "").validate().is_ok(), "{url}");
    }

    // A discovery document may not smuggle one in either: its jwks_uri
    // carries userinfo (to a host that would answer) and is never fetched.
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, jwk) = keypair(dir.path(), "rsa", 2048, "rsa-1");
    let keys = Idp::start().await;
    keys.jwks(&[&jwk]);
    let disco = Idp::start().await;
    let path = "/.well-known/openid-configuration";
    disco.answer(
        path,
        json!({"issuer": ISS, "jwks_uri": format!("http://localhost:x@{}/jwks", keys.addr)})
            .to_string(),
        Duration::ZERO,
    );
    let mut config = test_config();
    let mut i = issuer(&keys.url("/jwks"), "");
    i.jwks_url = None;
    i.discovery_url = Some(disco.url(path));
    config.identity.jwt_issuers = vec![i];
    let mut tg = Tollgate::start(config).await;
    let d = disco.fetches.clone();
    assert!(
        eventually(Duration::from_secs(5), || {
            let d = d.clone();
            async move { d.load(Ordering::SeqCst) >= 2 }
        })
        .await,
        "discovery was not retried"
    );
    assert_eq!(
        keys.fetches.load(Ordering::SeqCst),
        0,
        "the smuggled jwks_uri was fetched"
    );
    assert_eq!(
        support::raw_http(tg.admin, "GET", "/readyz", &[], "")
            .await
            .status,
        503
    );
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_jwks_answers_401_through_envoy_within_its_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (old, old_jwk) = keypair(dir.path(), "rsa", 2048, "old");
    let (new, new_jwk) = keypair(dir.path(), "ec", 0, "new");
    let idp = Idp::start().await;
    idp.jwks(&[&old_jwk]);
    let (mut tg, _) = start(&idp.url("/jwks"), "min_refresh_interval_secs = 0", true).await;
    let (upstream, _task) = support::start_upstream().await;
    // The example Envoy: ext_authz timeout 0.5 s, failure_mode_allow false.
    let envoy = support::Envoy::start(tg.grpc.port(), upstream.port()).await;
    let ask = |token: String| {
        let gw = envoy.listener;
        async move {
            let auth = format!("Bearer {token}");
            support::raw_http(
                gw,
                "POST",
                "/v1/chat/completions",
                &[
                    ("content-type", "application/json"),
                    ("authorization", &auth),
                ],
                r#"{"model":"llama-3-8b","messages":[]}"#,
            )
            .await
            .status
        }
    };
    assert_eq!(ask(mint(&old, &claims())).await, 200);
    // 3 s for a set with the new key: far beyond Envoy's 0.5 s.
    idp.answer(
        "/jwks",
        json!({"keys": [old_jwk, new_jwk]}).to_string(),
        Duration::from_secs(3),
    );
    assert_eq!(
        ask(mint(&new, &claims())).await,
        401,
        "an unknown kid must be Tollgate's 401, not Envoy's timeout 403"
    );
    assert_eq!(ask(mint(&old, &claims())).await, 200);
    tg.stop().await;
}
