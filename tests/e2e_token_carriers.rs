//! A service carrying a user's token (issue 18, item 6), through Envoy's
//! TLS listener (`examples/envoy/envoy-mtls.yaml` as shipped, ports and
//! certificate directory substituted): the service's client certificate is
//! its identity, the `Authorization` JWT is the user's. With
//! `agents.token_carriers` naming the service, the request is decided as
//! the user (`context.via` = the service); another service presenting the
//! same token is refused.

mod support;

use std::path::Path;

use support::jwt::{Idp, claims, issuer, keypair, mint};
use support::tls::{Ca, Leaf};
use support::{Tollgate, start_upstream, test_config};

const RUNTIME: &str = "spiffe://acme.example/ns/agents/sa/runtime";
const OTHER: &str = "spiffe://acme.example/ns/batch/sa/indexer";

/// A chat request over TLS with client certificate `<client>.crt` and a
/// bearer token; returns (status, body).
fn curl(dir: &Path, port: u16, client: &str, token: &str) -> (u16, String) {
    let auth = format!("authorization: Bearer {token}");
    support::tls::curl(
        dir,
        port,
        "/v1/chat/completions",
        Some(client),
        &[&auth],
        r#"{"model":"llama-3-8b","max_tokens":16,"messages":[]}"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_services_carry_user_tokens_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("tollgate-test-ca");
    std::fs::write(dir.path().join("ca.crt"), ca.pem()).expect("ca");
    ca.issue(Leaf {
        cn: "localhost",
        dns: &["localhost", "127.0.0.1"],
        ..Leaf::default()
    })
    .write(dir.path(), "server");
    for (name, uri) in [("runtime", RUNTIME), ("other", OTHER)] {
        ca.issue(Leaf {
            cn: name,
            uri: Some(uri),
            client: true,
            ..Leaf::default()
        })
        .write(dir.path(), name);
    }
    let (signer, jwk) = keypair(dir.path(), "ec", 256, "k1");
    let idp = Idp::start().await;
    idp.jwks(&[&jwk]);
    let mut config = test_config();
    config.identity.mtls_trust_domains = vec!["acme.example".into()];
    config.identity.jwt_issuers = vec![issuer(&idp.url("/jwks"), "")];
    config.agents.token_carriers = Some(vec![RUNTIME.into()]);
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;
    let (_envoy, listen) =
        support::tls::mtls_example_envoy(dir.path(), tg.grpc.port(), upstream.port()).await;
    let token = mint(&signer, &claims());

    // The allowed carrier: decided as the user.
    let (d, t) = (dir.path().to_path_buf(), token.clone());
    let (status, body) = tokio::task::spawn_blocking(move || curl(&d, listen, "runtime", &t))
        .await
        .expect("curl");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        support::echoed(&body, "x-tollgate-principal"),
        [r#"User::"alice""#]
    );

    // Another service with the same user token: refused.
    let (d, t) = (dir.path().to_path_buf(), token.clone());
    let (status, body) = tokio::task::spawn_blocking(move || curl(&d, listen, "other", &t))
        .await
        .expect("curl");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("token_carrier_not_allowed"), "{body}");
    tg.stop().await;
}
