//! mTLS end to end: Envoy terminates TLS with certificates made here by
//! openssl; a client certificate with a SPIFFE URI SAN becomes a `Service`
//! principal; no certificate on an mTLS-only route is a 401; a plaintext
//! request with a forged `x-forwarded-client-cert` is not an identity.

mod support;

use std::path::Path;
use std::process::Command;

use support::{Envoy, Tollgate, echoed, free_port, raw_http, start_upstream, test_config};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate whose
/// subjectAltName is `client_san` (`URI:spiffe://…`, several, or none).
fn certificates(dir: &Path, client_san: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-subj",
        "/CN=tollgate-test-ca",
        "-days",
        "1",
    ]);
    openssl(dir, &ca);
    for (name, cn, san) in [
        (
            "server",
            "localhost",
            "subjectAltName=DNS:localhost,IP:127.0.0.1".to_string(),
        ),
        ("client", "indexer", format!("subjectAltName={client_san}")),
    ] {
        let mut req = vec!["req"];
        req.extend(ec);
        let (key, csr, crt, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
            format!("{name}.ext"),
        );
        let subj = format!("/CN={cn}");
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req);
        std::fs::write(dir.join(&ext), san).expect("ext");
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &crt,
                "-days",
                "1",
                "-extfile",
                &ext,
            ],
        );
    }
}

const ENVOY: &str = r#"
admin: { address: { socket_address: { address: 127.0.0.1, port_value: ADMIN } } }
static_resources:
  listeners:
  - name: tls
    address: { socket_address: { address: 127.0.0.1, port_value: TLS } }
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: false
          common_tls_context:
            tls_certificates: [ { certificate_chain: { filename: DIR/server.crt }, private_key: { filename: DIR/server.key } } ]
            validation_context: { trusted_ca: { filename: DIR/ca.crt } }
      filters: [ HCM ]
  - name: plain
    address: { socket_address: { address: 127.0.0.1, port_value: PLAIN } }
    filter_chains:
    - filters: [ HCM ]
  clusters:
  - name: tollgate
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment: { cluster_name: tollgate, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: GRPC } } } } ] } ] }
  - name: upstream
    type: STATIC
    load_assignment: { cluster_name: upstream, endpoints: [ { lb_endpoints: [ { endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: UPSTREAM } } } } ] } ] }
"#;

const HCM: &str = r#"{ name: envoy.filters.network.http_connection_manager, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: gw, route_config: { virtual_hosts: [ { name: all, domains: ["*"], routes: [ { match: { prefix: "/v1/embeddings" }, route: { cluster: upstream }, typed_per_filter_config: { envoy.filters.http.ext_authz: { "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute, check_settings: { context_extensions: { identity: mtls } } } } }, { match: { prefix: "/" }, route: { cluster: upstream } } ] } ] }, http_filters: [ { name: envoy.filters.http.ext_authz, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz, transport_api_version: V3, failure_mode_allow: false, include_peer_certificate: true, include_tls_session: true, with_request_body: { max_request_bytes: 65536, allow_partial_message: true, pack_as_bytes: true }, grpc_service: { envoy_grpc: { cluster_name: tollgate }, timeout: 0.5s } } }, { name: envoy.filters.http.router, typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router } } ] } }"#;

/// `curl` over TLS; returns (status, body).
fn curl(dir: &Path, port: u16, client_cert: bool) -> (u16, String) {
    curl_with(dir, port, client_cert, &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_identity_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spiffe = "spiffe://acme.example/ns/batch/sa/indexer";
    certificates(dir.path(), &format!("URI:{spiffe}"));
    let mut config = test_config();
    config.identity.mtls_trust_domains = vec!["acme.example".into()];
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;
    let (_envoy, tls, plain) = tls_envoy(dir.path(), &tg, upstream.port()).await;

    let d = dir.path().to_path_buf();
    let (status, body) = tokio::task::spawn_blocking(move || curl(&d, tls, true))
        .await
        .expect("curl");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        echoed(&body, "x-tollgate-principal"),
        [format!("Service::{spiffe:?}")]
    );

    let d = dir.path().to_path_buf();
    let (status, _) = tokio::task::spawn_blocking(move || curl(&d, tls, false))
        .await
        .expect("curl");
    assert_eq!(status, 401, "no client certificate on an mTLS-only route");

    let forged = raw_http(
        format!("127.0.0.1:{plain}").parse().expect("addr"),
        "POST",
        "/v1/embeddings",
        &[
            ("content-type", "application/json"),
            (
                "x-forwarded-client-cert",
                &format!("By=spiffe://acme.example/envoy;URI={spiffe}"),
            ),
        ],
        r#"{"model":"text-embedding-small"}"#,
    )
    .await;
    assert_eq!(
        forged.status, 401,
        "a forged XFCC header is not an identity"
    );
    tg.stop().await;
}

/// Starts Envoy with TLS certificates from `dir` in front of `tg`; returns
/// Envoy, its TLS port and its plaintext port.
async fn tls_envoy(dir: &Path, tg: &Tollgate, upstream: u16) -> (Envoy, u16, u16) {
    let (admin, tls, plain) = (free_port(), free_port(), free_port());
    let yaml = ENVOY
        .replace("HCM", HCM)
        .replace("ADMIN", &admin.to_string())
        .replace("PLAIN", &plain.to_string())
        .replace("TLS", &tls.to_string())
        .replace("GRPC", &tg.grpc.port().to_string())
        .replace("UPSTREAM", &upstream.to_string())
        .replace("DIR", &dir.display().to_string());
    (Envoy::run(&yaml, tls, admin).await, tls, plain)
}

/// Issue 8.12: with the default (empty) trust domains, a client certificate
/// with two URI SANs, or with no URI SAN (a subject only), is no workload
/// identity; exactly one valid SPIFFE URI SAN is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_one_valid_spiffe_uri_san_is_a_workload_through_envoy() {
    let mut tg = Tollgate::start(test_config()).await;
    let (upstream, _task) = start_upstream().await;
    for (san, want) in [
        ("URI:spiffe://acme.example/ns/batch/sa/indexer", 200),
        (
            "URI:spiffe://acme.example/ns/batch/sa/indexer,URI:spiffe://acme.example/ns/batch/sa/other",
            401,
        ),
        ("DNS:indexer.example", 401),
        ("URI:spiffe://acme.example/ns/batch/sa/indexer/", 401),
        ("URI:spiffe://acme.example/ns/../sa/indexer", 401),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        certificates(dir.path(), san);
        let (envoy, tls, _) = tls_envoy(dir.path(), &tg, upstream.port()).await;
        let d = dir.path().to_path_buf();
        let (status, body) = tokio::task::spawn_blocking(move || curl(&d, tls, true))
            .await
            .expect("curl");
        assert_eq!(status, want, "{san}: {body}");
        drop(envoy);
    }
    tg.stop().await;
}

/// Issue 8.13: `context.http.tls` follows the connection, through a real
/// Envoy with `include_tls_session: true` on both listeners: true over TLS
/// (also without a client certificate or SNI: curl to an IP sends none),
/// false over plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn context_http_tls_follows_the_connection_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    certificates(dir.path(), "URI:spiffe://acme.example/ns/batch/sa/indexer");
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
    let (_envoy, tls, plain) = tls_envoy(dir.path(), &tg, upstream.port()).await;
    let body = r#"{"model":"llama-3-8b"}"#;
    let d = dir.path().to_path_buf();
    let key = format!("x-api-key: {}", support::DEMO_PAID_KEY);
    let (status, over_tls) = tokio::task::spawn_blocking(move || {
        support::tls::curl(&d, tls, "/v1/chat/completions", None, &[&key], body)
    })
    .await
    .expect("curl");
    assert!(
        status == 403 && over_tls.contains("policy_denied"),
        "TLS not seen as TLS: {status} {over_tls}"
    );
    let plaintext = raw_http(
        format!("127.0.0.1:{plain}").parse().expect("addr"),
        "POST",
        "/v1/chat/completions",
        &[
            ("content-type", "application/json"),
            ("x-api-key", support::DEMO_PAID_KEY),
        ],
        body,
    )
    .await;
    assert_eq!(
        plaintext.status, 200,
        "plaintext seen as TLS: {}",
        plaintext.body
    );
    tg.stop().await;
}

/// `curl` over TLS to `/v1/embeddings` with extra headers; returns
/// (status, body). Status 0 means no HTTP answer (the TLS handshake was
/// refused).
fn curl_with(dir: &Path, port: u16, client_cert: bool, headers: &[&str]) -> (u16, String) {
    support::tls::curl(
        dir,
        port,
        "/v1/embeddings",
        client_cert.then_some("client"),
        headers,
        r#"{"model":"text-embedding-small"}"#,
    )
}

/// examples/envoy/envoy-mtls.yaml as shipped (only ports and the
/// certificate directory substituted): a client certificate is required,
/// becomes a `Service` principal, and a forged x-forwarded-client-cert is
/// replaced by Envoy's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mtls_example_works_through_envoy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spiffe = "spiffe://acme.example/ns/batch/sa/indexer";
    certificates(dir.path(), &format!("URI:{spiffe}"));
    let mut config = test_config();
    config.identity.mtls_trust_domains = vec!["acme.example".into()];
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;
    let (_envoy, listen) =
        support::tls::mtls_example_envoy(dir.path(), tg.grpc.port(), upstream.port()).await;

    let forged = "x-forwarded-client-cert: By=spiffe://acme.example/envoy;URI=spiffe://acme.example/ns/prod/sa/admin".to_string();
    let d = dir.path().to_path_buf();
    let (status, body) =
        tokio::task::spawn_blocking(move || curl_with(&d, listen, true, &[&forged]))
            .await
            .expect("curl");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        echoed(&body, "x-tollgate-principal"),
        vec![format!("Service::{spiffe:?}")]
    );
    let xfcc = echoed(&body, "x-forwarded-client-cert");
    assert_eq!(xfcc.len(), 1, "{xfcc:?}");
    assert!(
        xfcc[0].contains(spiffe) && !xfcc[0].contains("sa/admin"),
        "Envoy must replace the client's header: {xfcc:?}"
    );

    let d = dir.path().to_path_buf();
    let (status, _) = tokio::task::spawn_blocking(move || curl_with(&d, listen, false, &[]))
        .await
        .expect("curl");
    assert_eq!(status, 0, "no client certificate, no connection");
    tg.stop().await;
}
