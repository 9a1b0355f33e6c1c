//! Tollgate's own listeners: the gRPC listener over TLS and mTLS (through a
//! real Envoy on examples/envoy/envoy-upstream-mtls.yaml, and with raw TLS
//! clients for refused certificates), certificate reload without restart, the
//! admin listener over TLS with only the configured endpoints, and the gRPC
//! Unix socket through a real Envoy.

mod support;

use std::path::Path;
use std::time::Duration;

use support::tls::{Ca, Leaf, Pair, Session, grpc_session, write_atomic};
use support::{
    DEMO_PAID_KEY, Envoy, Tollgate, eventually, free_port, metric, metrics_text, raw_http,
    start_upstream, test_config,
};
use tollgate::admin::AdminEndpoint;
use tollgate::listener::TlsConfig;

const CHAT: &str = "/v1/chat/completions";
const GATEWAY_ID: &str = "spiffe://acme.example/ns/gateway/sa/envoy";
const NAME: &str = "tollgate.internal";

/// The server side: Tollgate's CA and certificate, and the CA that signs
/// gateway certificates, written into `dir`.
struct Pki {
    tollgate_ca: Ca,
    gateway_ca: Ca,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let pki = Self {
            tollgate_ca: Ca::new("tollgate-ca"),
            gateway_ca: Ca::new("gateway-ca"),
        };
        pki.server("tollgate-1").write(dir, "tollgate");
        write_atomic(&dir.join("gateway-ca.crt"), &pki.gateway_ca.pem());
        write_atomic(&dir.join("tollgate-ca.crt"), &pki.tollgate_ca.pem());
        pki
    }

    fn server(&self, cn: &str) -> Pair {
        self.tollgate_ca.issue(Leaf {
            cn,
            dns: &[NAME],
            ..Leaf::default()
        })
    }

    fn gateway(&self, uri: &str, expired: bool) -> Pair {
        self.gateway_ca.issue(Leaf {
            cn: "envoy-gateway",
            uri: Some(uri),
            expired,
            client: true,
            ..Leaf::default()
        })
    }
}

fn tls_config(dir: &Path, mtls: bool, allowed: &[&str]) -> TlsConfig {
    TlsConfig {
        cert_file: dir.join("tollgate.crt"),
        key_file: dir.join("tollgate.key"),
        client_ca_file: mtls.then(|| dir.join("gateway-ca.crt")),
        allowed_client_ids: allowed.iter().map(|s| s.to_string()).collect(),
    }
}

/// examples/envoy/envoy-upstream-mtls.yaml as shipped, with only the ports
/// and the certificate directory replaced.
async fn envoy_upstream_mtls(tollgate: u16, upstream: u16, certs: &Path) -> Envoy {
    let template =
        std::fs::read_to_string(support::repo().join("examples/envoy/envoy-upstream-mtls.yaml"))
            .expect("example");
    let (listen, admin) = (free_port(), free_port());
    let yaml = template
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace("port_value: 50051", &format!("port_value: {tollgate}"))
        .replace("port_value: 8080", &format!("port_value: {upstream}"))
        .replace("/etc/envoy/tls/", &format!("{}/", certs.display()));
    Envoy::run(&yaml, listen, admin).await
}

async fn chat(gw: std::net::SocketAddr, key: Option<&str>) -> u16 {
    let mut headers = vec![("content-type", "application/json")];
    if let Some(key) = key {
        headers.push(("x-api-key", key));
    }
    raw_http(
        gw,
        "POST",
        CHAT,
        &headers,
        r#"{"model":"llama-3-8b","messages":[]}"#,
    )
    .await
    .status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_reaches_tollgate_over_mtls_only_with_an_allowed_identity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let mut config = test_config();
    config.server.grpc_tls = Some(tls_config(dir.path(), true, &[GATEWAY_ID]));
    let mut tg = Tollgate::start(config).await;
    let (upstream, _task) = start_upstream().await;

    // The allowed gateway: decisions flow over mTLS both ways.
    let allowed_dir = tempfile::tempdir().expect("tempdir");
    pki.gateway(GATEWAY_ID, false)
        .write(allowed_dir.path(), "gateway");
    write_atomic(
        &allowed_dir.path().join("tollgate-ca.crt"),
        &pki.tollgate_ca.pem(),
    );
    let envoy = envoy_upstream_mtls(tg.grpc.port(), upstream.port(), allowed_dir.path()).await;
    assert_eq!(chat(envoy.listener, Some(DEMO_PAID_KEY)).await, 200);
    // Tollgate's own deny, not a transport failure.
    assert_eq!(chat(envoy.listener, None).await, 401);
    drop(envoy);

    // A gateway certificate from the same CA but another identity: the
    // handshake fails, and Envoy fails the check closed.
    let other_dir = tempfile::tempdir().expect("tempdir");
    pki.gateway("spiffe://acme.example/ns/gateway/sa/intruder", false)
        .write(other_dir.path(), "gateway");
    write_atomic(
        &other_dir.path().join("tollgate-ca.crt"),
        &pki.tollgate_ca.pem(),
    );
    let envoy = envoy_upstream_mtls(tg.grpc.port(), upstream.port(), other_dir.path()).await;
    assert_eq!(chat(envoy.listener, Some(DEMO_PAID_KEY)).await, 403);
    let admin = tg.admin;
    assert!(
        eventually(Duration::from_secs(5), || async move {
            metric(
                &metrics_text(admin).await,
                "tollgate_listener_refused_total{listener=\"grpc\",reason=\"tls_handshake\"}",
            )
            .unwrap_or_default()
                >= 1.0
        })
        .await
    );

    // Plaintext gRPC to the TLS listener gets nothing.
    let plain = tonic::transport::Channel::from_shared(tg.grpc_url())
        .expect("uri")
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(channel) = plain {
        let mut client =
            tollgate::proto::decision_service_client::DecisionServiceClient::new(channel);
        assert!(
            client
                .check(tollgate::proto::CheckRequest::default())
                .await
                .is_err()
        );
    }
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_untrusted_missing_and_disallowed_client_certificates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let mut config = test_config();
    config.server.grpc_tls = Some(tls_config(dir.path(), true, &[GATEWAY_ID, "CN=ops-client"]));
    let mut tg = Tollgate::start(config).await;
    let ca = pki.tollgate_ca.pem();
    let session = |client: Option<Pair>| {
        let ca = ca.clone();
        let addr = tg.grpc;
        async move { grpc_session(addr, NAME, &ca, client.as_ref()).await }
    };

    let served = Session::Served {
        server_cn: "tollgate-1".into(),
    };
    assert_eq!(session(Some(pki.gateway(GATEWAY_ID, false))).await, served);
    let ops = pki.gateway_ca.issue(Leaf {
        cn: "ops-client",
        client: true,
        ..Leaf::default()
    });
    assert_eq!(session(Some(ops)).await, served, "allowed by subject name");

    let untrusted = Ca::new("gateway-ca").issue(Leaf {
        cn: "envoy-gateway",
        uri: Some(GATEWAY_ID),
        client: true,
        ..Leaf::default()
    });
    for (what, client) in [
        ("no certificate", None),
        ("expired", Some(pki.gateway(GATEWAY_ID, true))),
        ("untrusted CA", Some(untrusted)),
        (
            "identity not allowed",
            Some(pki.gateway("spiffe://acme.example/ns/gateway/sa/other", false)),
        ),
    ] {
        assert_eq!(session(client).await, Session::Refused, "{what}");
    }
    // The listener still serves after the refusals.
    assert_eq!(session(Some(pki.gateway(GATEWAY_ID, false))).await, served);
    let refused = metric(
        &metrics_text(tg.admin).await,
        "tollgate_listener_refused_total{listener=\"grpc\",reason=\"tls_handshake\"}",
    );
    assert_eq!(refused, Some(4.0));
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_reload_on_change_and_the_last_good_one_survives_bad_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    let mut config = test_config();
    config.server.grpc_tls = Some(tls_config(dir.path(), false, &[]));
    let mut tg = Tollgate::start(config).await;
    let ca = pki.tollgate_ca.pem();
    let (addr, admin) = (tg.grpc, tg.admin);
    let serving = |cn: &'static str| {
        let ca = ca.clone();
        async move {
            grpc_session(addr, NAME, &ca, None).await
                == Session::Served {
                    server_cn: cn.into(),
                }
        }
    };
    let reloads = |result: &'static str| async move {
        metric(
            &metrics_text(admin).await,
            &format!("tollgate_reloads_total{{source=\"tls_grpc\",result=\"{result}\"}}"),
        )
        .unwrap_or_default()
    };
    assert!(serving("tollgate-1").await);

    // A new certificate is picked up without a restart.
    pki.server("tollgate-2").write(dir.path(), "tollgate");
    assert!(
        eventually(Duration::from_secs(10), || serving("tollgate-2")).await,
        "the new certificate was not served"
    );
    assert!(reloads("swapped").await >= 1.0);

    // The certificate file disappears: reported, and the last good
    // certificate keeps serving.
    std::fs::remove_file(dir.path().join("tollgate.crt")).expect("rm");
    assert!(
        eventually(Duration::from_secs(10), || async {
            reloads("rejected").await >= 1.0
        })
        .await,
        "a vanished certificate was not reported"
    );
    assert!(serving("tollgate-2").await);

    // Garbage where the certificate was: the same.
    let rejected = reloads("rejected").await;
    write_atomic(&dir.path().join("tollgate.crt"), "not a certificate\n");
    assert!(
        eventually(Duration::from_secs(10), || async {
            reloads("rejected").await > rejected
        })
        .await
    );
    assert!(serving("tollgate-2").await);

    // A good pair again is served.
    pki.server("tollgate-3").write(dir.path(), "tollgate");
    assert!(eventually(Duration::from_secs(10), || serving("tollgate-3")).await);
    tg.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_over_tls_serves_health_always_and_other_endpoints_only_when_listed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path());
    for (exposed, metrics_status, policy_status) in
        [(vec![], 404, 404), (vec![AdminEndpoint::Metrics], 200, 404)]
    {
        let mut config = test_config();
        config.server.admin_tls = Some(tls_config(dir.path(), false, &[]));
        config.server.admin_endpoints = exposed.clone();
        let mut tg = Tollgate::start(config).await;
        let url = |path: &str| format!("https://{NAME}:{}{path}", tg.admin.port());
        let client = reqwest::Client::builder()
            .add_root_certificate(
                reqwest::Certificate::from_pem(pki.tollgate_ca.pem().as_bytes()).expect("ca"),
            )
            .resolve(NAME, tg.admin)
            .build()
            .expect("client");
        for (path, want) in [
            ("/healthz", 200),
            ("/readyz", 200),
            ("/metrics", metrics_status),
            ("/policy", policy_status),
        ] {
            let status = client
                .get(url(path))
                .send()
                .await
                .expect("https")
                .status()
                .as_u16();
            assert_eq!(status, want, "{path} with {exposed:?}");
        }
        // Plaintext HTTP to the TLS admin listener gets no answer.
        let plain = reqwest::Client::new()
            .get(format!("http://{}/healthz", tg.admin))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        assert!(plain.is_err(), "plaintext answered: {plain:?}");
        tg.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_on_a_unix_socket_serves_envoy_as_a_sidecar() {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("tollgate.sock");
    // A stale socket file from an earlier run is replaced.
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("stale socket"));
    let mut config = test_config();
    config.server.grpc_unix_socket = Some(socket.clone());
    let mut tg = Tollgate::start(config).await;
    let meta = std::fs::metadata(&socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);

    let (upstream, _task) = start_upstream().await;
    let template = std::fs::read_to_string(support::repo().join("examples/envoy/envoy.yaml"))
        .expect("envoy.yaml");
    let (listen, admin) = (free_port(), free_port());
    let yaml = template
        .replace("port_value: 10000", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace(
            "port_value: 8080",
            &format!("port_value: {upstream}", upstream = upstream.port()),
        )
        .replace(
            "socket_address: { address: 127.0.0.1, port_value: 50051 }",
            &format!("pipe: {{ path: {:?} }}", socket.display().to_string()),
        );
    let envoy = Envoy::run(&yaml, listen, admin).await;
    assert_eq!(chat(envoy.listener, Some(DEMO_PAID_KEY)).await, 200);
    assert_eq!(chat(envoy.listener, None).await, 401);
    drop(envoy);
    tg.stop().await;
    assert!(!socket.exists(), "socket file left behind after shutdown");
}
