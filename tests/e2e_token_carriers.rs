//! A service carrying a user's token (issue 18, item 6), through Envoy's
//! TLS listener (`examples/envoy/envoy-mtls.yaml` as shipped, ports and
//! certificate directory substituted): the service's client certificate is
//! its identity, the `Authorization` JWT is the user's. With
//! `agents.token_carriers` naming the service, the request is decided as
//! the user (`context.via` = the service); another service presenting the
//! same token is refused.

mod support;

use std::path::Path;
use std::process::Command;

use support::jwt::{Idp, claims, issuer, keypair, mint};
use support::tls::{Ca, Leaf};
use support::{Envoy, Tollgate, free_port, start_upstream, test_config};

const RUNTIME: &str = "spiffe://acme.example/ns/agents/sa/runtime";
const OTHER: &str = "spiffe://acme.example/ns/batch/sa/indexer";

/// `curl` over TLS with client certificate `<client>.crt` and a bearer
/// token; returns (status, body).
fn curl(dir: &Path, port: u16, client: &str, token: &str) -> (u16, String) {
    let out = Command::new("curl")
        .current_dir(dir)
        .args([
            "-s",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
            "ca.crt",
        ])
        .args([
            "--cert",
            &format!("{client}.crt"),
            "--key",
            &format!("{client}.key"),
        ])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("authorization: Bearer {token}")])
        .args([
            "-d",
            r#"{"model":"llama-3-8b","max_tokens":16,"messages":[]}"#,
        ])
        .arg(format!("https://127.0.0.1:{port}/v1/chat/completions"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
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
    let (listen, admin) = (free_port(), free_port());
    let yaml = std::fs::read_to_string(support::repo().join("examples/envoy/envoy-mtls.yaml"))
        .expect("envoy-mtls.yaml")
        .replace("port_value: 10443", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace(
            "port_value: 50051",
            &format!("port_value: {}", tg.grpc.port()),
        )
        .replace(
            "port_value: 8080",
            &format!("port_value: {}", upstream.port()),
        )
        .replace("/etc/envoy/tls", &dir.path().display().to_string());
    let _envoy = Envoy::run(&yaml, listen, admin).await;
    let token = mint(&signer, &claims());

    // The allowed carrier: decided as the user.
    let (d, t) = (dir.path().to_path_buf(), token.clone());
    let (status, body) = tokio::task::spawn_blocking(move || curl(&d, listen, "runtime", &t))
        .await
        .expect("curl");
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).expect("upstream echo");
    let principal: Vec<&str> = echoed["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .filter(|p| p[0] == "x-tollgate-principal")
        .filter_map(|p| p[1].as_str())
        .collect();
    assert_eq!(principal, [r#"User::"alice""#]);

    // Another service with the same user token: refused.
    let (d, t) = (dir.path().to_path_buf(), token.clone());
    let (status, body) = tokio::task::spawn_blocking(move || curl(&d, listen, "other", &t))
        .await
        .expect("curl");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("token_carrier_not_allowed"), "{body}");
    tg.stop().await;
}
