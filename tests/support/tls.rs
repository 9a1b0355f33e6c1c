//! A throwaway PKI for TLS tests (rcgen): CAs and the certificates they
//! sign, as PEM, and raw TLS clients that report what a listener did.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A certificate authority.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// What a leaf certificate says.
#[derive(Clone, Copy, Default)]
pub struct Leaf<'a> {
    pub cn: &'a str,
    /// DNS subject alternative names (a server's names).
    pub dns: &'a [&'a str],
    /// A URI SAN (a SPIFFE id).
    pub uri: Option<&'a str>,
    /// Valid only in 2020: expired now.
    pub expired: bool,
    /// Client certificate (EKU clientAuth) rather than server.
    pub client: bool,
}

/// A certificate and its key, PEM.
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl Pair {
    /// Writes `<name>.crt` and `<name>.key` in `dir`; returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        write_atomic(&cert, &self.cert);
        write_atomic(&key, &self.key);
        (cert, key)
    }
}

/// Replaces `path` in one rename, as secret mounts and deploy tools do.
pub fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().expect("ca key");
        Self {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("ca cert"),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate signed by this CA.
    pub fn issue(&self, leaf: Leaf<'_>) -> Pair {
        let mut params = rcgen::CertificateParams::new(
            leaf.dns.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .expect("params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, leaf.cn);
        if let Some(uri) = leaf.uri {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().expect("uri")));
        }
        params.extended_key_usages = vec![if leaf.client {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        }];
        if leaf.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A TLS client trusting `ca_pem`, presenting `client` if given, offering
/// ALPN `alpn`.
pub fn client_config(ca_pem: &str, client: Option<&Pair>, alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.expect("ca pem")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let mut config = match client {
        Some(pair) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(pair.cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .expect("cert pem"),
                PrivateKeyDer::from_pem_slice(pair.key.as_bytes()).expect("key pem"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    config
}

/// What a gRPC listener did with a TLS client.
#[derive(Debug, PartialEq, Eq)]
pub enum Session {
    /// Handshake done and the server answered the HTTP/2 preface; carries
    /// the common name of the certificate the server presented.
    Served { server_cn: String },
    /// The handshake failed, or the server closed the connection before
    /// answering (TLS 1.3 reports a refused client certificate only after
    /// the client's side of the handshake is done).
    Refused,
}

/// Opens TLS to `addr` as `name`, sends the HTTP/2 preface and reports
/// whether the server answered.
pub async fn grpc_session(
    addr: SocketAddr,
    name: &str,
    ca_pem: &str,
    client: Option<&Pair>,
) -> Session {
    let connector =
        tokio_rustls::TlsConnector::from(Arc::new(client_config(ca_pem, client, b"h2")));
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let server_name = ServerName::try_from(name.to_string()).expect("name");
    let Ok(mut tls) = connector.connect(server_name, tcp).await else {
        return Session::Refused;
    };
    let server_cn = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(|der| {
            let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
            let cn = cert
                .subject()
                .iter_common_name()
                .next()?
                .as_str()
                .ok()?
                .to_string();
            Some(cn)
        })
        .unwrap_or_default();
    // Client preface, then an empty SETTINGS frame.
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    if tls.write_all(&hello).await.is_err() {
        return Session::Refused;
    }
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await {
        Ok(Ok(n)) if n > 0 => Session::Served { server_cn },
        _ => Session::Refused,
    }
}

/// `curl` over TLS from `dir` (which holds `ca.crt`) to `https://127.0.0.1:
/// {port}{path}`, POSTing a JSON `body` with extra `headers` (`"name:
/// value"`), presenting `<client>.crt` / `<client>.key` if given. Returns
/// (status, body); status 0 means no HTTP answer (the handshake failed).
pub fn curl(
    dir: &Path,
    port: u16,
    path: &str,
    client: Option<&str>,
    headers: &[&str],
    body: &str,
) -> (u16, String) {
    let mut cmd = std::process::Command::new("curl");
    cmd.current_dir(dir).args([
        "-s",
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        "--cacert",
        "ca.crt",
        "-H",
        "content-type: application/json",
        "-d",
        body,
    ]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    if let Some(c) = client {
        cmd.args(["--cert", &format!("{c}.crt"), "--key", &format!("{c}.key")]);
    }
    let out = cmd
        .arg(format!("https://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Envoy on `examples/envoy/envoy-mtls.yaml` as shipped, with only its ports
/// and certificate directory (`dir`: `server.crt`, `server.key`, `ca.crt`)
/// substituted; returns Envoy and its TLS listener port.
pub async fn mtls_example_envoy(dir: &Path, grpc: u16, upstream: u16) -> (super::Envoy, u16) {
    let (listen, admin) = (super::free_port(), super::free_port());
    let yaml = std::fs::read_to_string(super::repo().join("examples/envoy/envoy-mtls.yaml"))
        .expect("envoy-mtls.yaml")
        .replace("port_value: 10443", &format!("port_value: {listen}"))
        .replace("port_value: 9901", &format!("port_value: {admin}"))
        .replace("port_value: 50051", &format!("port_value: {grpc}"))
        .replace("port_value: 8080", &format!("port_value: {upstream}"))
        .replace("/etc/envoy/tls", &dir.display().to_string());
    (super::Envoy::run(&yaml, listen, admin).await, listen)
}
