//! TLS and mTLS on Tollgate's own listeners (rustls, ring provider): the
//! certificate files, the client identities allowed in, and reloading both
//! without a restart.
//!
//! A reload that fails (a file missing, half written, a key that does not
//! match) keeps the last good configuration serving: new handshakes use it,
//! open connections are untouched.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `[server.grpc_tls]` / `[server.admin_tls]`: serve TLS with this
/// certificate, and with `client_ca_file` require a client certificate
/// (mTLS).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain Tollgate presents, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key of the leaf (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM CA certificates that sign client certificates. Set: every client
    /// must present a certificate chaining to one of them, valid now
    /// (expired or untrusted certificates fail the handshake).
    pub client_ca_file: Option<PathBuf>,
    /// Client identities let in (needs `client_ca_file`): a SPIFFE id
    /// (`spiffe://acme.example/ns/gw/sa/envoy`, matched exactly against the
    /// certificate's URI SANs), `CN=name` (the subject's common name) or a
    /// whole subject (`CN=envoy, O=Acme`). Empty: any certificate the CA
    /// signed.
    #[serde(default)]
    pub allowed_client_ids: Vec<String>,
}

impl TlsConfig {
    /// Checks the settings that need no file access; `key` names the section.
    pub fn validate(&self, key: &str) -> Result<(), String> {
        if !self.allowed_client_ids.is_empty() && self.client_ca_file.is_none() {
            return Err(format!(
                "{key}.allowed_client_ids needs {key}.client_ca_file: client identities are only known from verified certificates"
            ));
        }
        for id in &self.allowed_client_ids {
            let ok = if id.starts_with("spiffe://") {
                crate::identity::mtls::valid_spiffe_id(id)
            } else {
                dn_parts(id).is_some()
            };
            if !ok {
                return Err(format!(
                    "{key}.allowed_client_ids: {id:?} is neither a SPIFFE id (spiffe://trust-domain/path) nor a subject name (CN=name or CN=name, O=org)"
                ));
            }
        }
        Ok(())
    }

    /// The same settings with relative paths resolved by `resolve`.
    pub fn resolved(&self, resolve: impl Fn(&Path) -> PathBuf) -> Self {
        Self {
            cert_file: resolve(&self.cert_file),
            key_file: resolve(&self.key_file),
            client_ca_file: self.client_ca_file.as_deref().map(&resolve),
            allowed_client_ids: self.allowed_client_ids.clone(),
        }
    }

    fn files(&self) -> Vec<&Path> {
        let mut files = vec![self.cert_file.as_path(), self.key_file.as_path()];
        files.extend(self.client_ca_file.as_deref());
        files
    }
}

/// Why a TLS configuration could not be (re)loaded; says which file and what
/// to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Pem { path: PathBuf, message: String },
    #[error("{0}")]
    Build(String),
}

/// A listener's live TLS configuration: the one new handshakes use, swapped
/// whole by [`LiveTls::reload`].
pub struct LiveTls {
    name: &'static str,
    config: TlsConfig,
    alpn: Vec<Vec<u8>>,
    current: ArcSwap<ServerConfig>,
    /// SHA-256 over the files' bytes when `current` was built.
    loaded: Mutex<[u8; 32]>,
}

impl LiveTls {
    /// Loads `config` (paths already resolved) for the listener `name`,
    /// offering `alpn` protocols (`h2` for gRPC).
    pub fn load(
        name: &'static str,
        config: TlsConfig,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Self, TlsError> {
        let (bytes, digest) = read_all(&config)?;
        let server = build(&config, &bytes, &alpn)?;
        Ok(Self {
            name,
            config,
            alpn,
            current: ArcSwap::from_pointee(server),
            loaded: Mutex::new(digest),
        })
    }

    /// The listener this configuration serves (`grpc`, `admin`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// An acceptor on the current configuration.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.load_full())
    }

    /// Re-reads the files: `Ok(true)` when they changed and the new
    /// configuration now serves, `Ok(false)` when unchanged, `Err` when they
    /// cannot be used (the last good configuration keeps serving).
    pub fn reload(&self) -> Result<bool, TlsError> {
        let (bytes, digest) = read_all(&self.config)?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if *loaded == digest {
            return Ok(false);
        }
        let server = build(&self.config, &bytes, &self.alpn)?;
        self.current.store(Arc::new(server));
        *loaded = digest;
        Ok(true)
    }

    /// The directories holding the files, to watch for changes.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for file in self.config.files() {
            let dir = match file.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
        dirs
    }
}

fn read_all(config: &TlsConfig) -> Result<(Vec<Vec<u8>>, [u8; 32]), TlsError> {
    let mut hash = Sha256::new();
    let mut all = Vec::new();
    for path in config.files() {
        let bytes = std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        hash.update((bytes.len() as u64).to_be_bytes());
        hash.update(&bytes);
        all.push(bytes);
    }
    Ok((all, hash.finalize().into()))
}

/// Builds the rustls configuration from the files' bytes (cert, key, CA).
fn build(
    config: &TlsConfig,
    bytes: &[Vec<u8>],
    alpn: &[Vec<u8>],
) -> Result<ServerConfig, TlsError> {
    let pem_err = |path: &Path, message: String| TlsError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let certs = certificates(&config.cert_file, &bytes[0])?;
    let key = PrivateKeyDer::from_pem_slice(&bytes[1]).map_err(|e| {
        pem_err(
            &config.key_file,
            format!("no usable private key ({e}); expected a PEM PRIVATE KEY block"),
        )
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Build(e.to_string()))?;
    let builder = match (&config.client_ca_file, bytes.get(2)) {
        (Some(ca_path), Some(ca_bytes)) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in certificates(ca_path, ca_bytes)? {
                roots
                    .add(cert)
                    .map_err(|e| pem_err(ca_path, format!("not a usable CA certificate: {e}")))?;
            }
            let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| pem_err(ca_path, format!("cannot verify clients with it: {e}")))?;
            builder.with_client_cert_verifier(Arc::new(AllowedClients {
                inner: webpki,
                allowed: config.allowed_client_ids.clone(),
            }))
        }
        _ => builder.with_no_client_auth(),
    };
    let mut server = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Build(format!(
            "{} and {} do not form a usable certificate and key: {e}",
            config.cert_file.display(),
            config.key_file.display()
        ))
    })?;
    server.alpn_protocols = alpn.to_vec();
    Ok(server)
}

fn certificates(path: &Path, bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: path.to_path_buf(),
            message: format!("unreadable PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            message: "no CERTIFICATE block found".into(),
        });
    }
    Ok(certs)
}

/// Client certificate verification: the CA chain and validity period
/// (webpki), then the allowed identities. A refusal fails the handshake, so
/// a disallowed gateway never gets to send a request.
#[derive(Debug)]
struct AllowedClients {
    inner: Arc<dyn ClientCertVerifier>,
    allowed: Vec<String>,
}

impl ClientCertVerifier for AllowedClients {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() || identity_allowed(end_entity, &self.allowed) {
            Ok(ClientCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether the (already verified) certificate carries one of `allowed`.
fn identity_allowed(cert: &CertificateDer<'_>, allowed: &[String]) -> bool {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return false;
    };
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let subject = dn_parts(&cert.subject().to_string());
    let common_names: Vec<&str> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .collect();
    allowed.iter().any(|id| {
        if id.starts_with("spiffe://") {
            return uris.contains(&id.as_str());
        }
        match dn_parts(id) {
            Some(parts) if parts.len() == 1 && parts[0].0 == "CN" => {
                common_names.contains(&parts[0].1.as_str())
            }
            Some(parts) => subject.as_ref() == Some(&parts),
            None => false,
        }
    })
}

/// `CN=a, O=b` as `[("CN","a"), ("O","b")]` (attribute names uppercased,
/// blanks around parts trimmed); None when a part has no `=`.
fn dn_parts(dn: &str) -> Option<Vec<(String, String)>> {
    dn.split(',')
        .map(|part| {
            let (k, v) = part.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty() && !v.is_empty()).then(|| (k.to_ascii_uppercase(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(cn: &str, org: Option<&str>, uri: Option<&str>) -> CertificateDer<'static> {
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        if let Some(org) = org {
            params
                .distinguished_name
                .push(rcgen::DnType::OrganizationName, org);
        }
        if let Some(uri) = uri {
            params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().expect("ia5 uri"))];
        }
        let key = rcgen::KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().clone()
    }

    #[test]
    fn identities_match_spiffe_ids_common_names_and_whole_subjects() {
        let allowed = |list: &[&str], c: &CertificateDer<'_>| {
            identity_allowed(c, &list.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let envoy = cert(
            "envoy",
            Some("Acme"),
            Some("spiffe://acme.example/ns/gw/sa/envoy"),
        );
        assert!(allowed(&["spiffe://acme.example/ns/gw/sa/envoy"], &envoy));
        assert!(!allowed(&["spiffe://acme.example/ns/gw/sa/other"], &envoy));
        // A prefix of the id is not the id.
        assert!(!allowed(&["spiffe://acme.example/ns/gw"], &envoy));
        assert!(allowed(&["CN=envoy"], &envoy));
        assert!(allowed(&["cn = envoy"], &envoy));
        assert!(!allowed(&["CN=envoy2"], &envoy));
        assert!(allowed(&["CN=envoy, O=Acme"], &envoy));
        assert!(allowed(&["CN=envoy,O=Acme"], &envoy));
        assert!(!allowed(&["CN=envoy, O=Evil"], &envoy));
        // The common name is not a SPIFFE id, nor the reverse.
        let named = cert("spiffe://acme.example/ns/gw/sa/envoy", None, None);
        assert!(!allowed(&["spiffe://acme.example/ns/gw/sa/envoy"], &named));
    }

    #[test]
    fn config_checks_ids_and_needs_a_ca_for_them() {
        let mut c = TlsConfig {
            cert_file: "c.pem".into(),
            key_file: "k.pem".into(),
            client_ca_file: None,
            allowed_client_ids: vec!["CN=envoy".into()],
        };
        assert!(
            c.validate("server.grpc_tls")
                .unwrap_err()
                .contains("client_ca_file")
        );
        c.client_ca_file = Some("ca.pem".into());
        c.validate("server.grpc_tls").expect("valid");
        c.allowed_client_ids = vec!["envoy".into()];
        assert!(
            c.validate("server.grpc_tls")
                .unwrap_err()
                .contains("\"envoy\"")
        );
        c.allowed_client_ids = vec!["spiffe://Bad Domain/x".into()];
        assert!(c.validate("server.grpc_tls").is_err());
    }
}
