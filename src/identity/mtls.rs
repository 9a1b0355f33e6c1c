//! mTLS peer identity, as the gateway verified it.
//!
//! A workload is identified by its SPIFFE id (the SPIFFE X509-SVID
//! standard): when Envoy sends the verified client certificate
//! (`include_peer_certificate: true`), the certificate must carry exactly
//! one URI SAN, a valid `spiffe://` id; otherwise Envoy's `source.principal`
//! must be a valid SPIFFE id. A certificate subject (`CN=…,O=…`) becomes a
//! `Service` only when the operator opts in (`identity.mtls_subject_names`).

use super::{Authentication, Authenticator, Principal, PrincipalKind, SourceKind};
use crate::decision::Reason;
use crate::request::HttpRequest;

/// Longest SPIFFE id accepted, in bytes (SPIFFE ID spec §2.3).
const MAX_SPIFFE_ID: usize = 2048;
/// Longest trust domain accepted, in bytes (SPIFFE ID spec §2.1).
const MAX_TRUST_DOMAIN: usize = 255;

/// Whether `id` is a SPIFFE id as the SPIFFE ID spec §2 defines it:
/// `spiffe://` (lowercase), a trust domain of lowercase letters, digits,
/// '.', '-' and '_' (no port, no userinfo), and an optional path of
/// non-empty segments of letters, digits, '.', '-' and '_', none of them
/// `.` or `..`, without a trailing '/'. No percent-encoding, query or
/// fragment is possible in that alphabet.
pub fn valid_spiffe_id(id: &str) -> bool {
    if id.len() > MAX_SPIFFE_ID {
        return false;
    }
    let Some(rest) = id.strip_prefix("spiffe://") else {
        return false;
    };
    let (domain, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let domain_ok = !domain.is_empty()
        && domain.len() <= MAX_TRUST_DOMAIN
        && domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if !domain_ok {
        return false;
    }
    if path.is_empty() {
        return true;
    }
    path[1..].split('/').all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
    })
}

/// The URI SANs of a PEM certificate, or `None` when it does not parse.
fn uri_sans(pem: &str) -> Option<Vec<String>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    let cert = pem.parse_x509().ok()?;
    let sans = cert.subject_alternative_name().ok()?;
    Some(
        sans.map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default(),
    )
}

/// Takes the peer identity of TLS connections from the verified client
/// certificate Envoy sends, else from `source.principal`. Headers such as
/// `x-forwarded-client-cert` are never read: a client can set them.
#[derive(Debug, Default)]
pub struct MtlsAuthenticator {
    /// SPIFFE trust domains accepted, matched exactly; empty accepts any.
    trust_domains: Vec<String>,
    /// Whether a peer without a SPIFFE id is accepted by its subject name.
    subject_names: bool,
}

impl MtlsAuthenticator {
    /// Accepts peers of `trust_domains` (all, when empty).
    pub fn new(trust_domains: Vec<String>) -> Self {
        Self {
            trust_domains,
            subject_names: false,
        }
    }

    /// Also accepts peers without a SPIFFE id, by subject name
    /// (`identity.mtls_subject_names`).
    pub fn with_subject_names(mut self, accept: bool) -> Self {
        self.subject_names = accept;
        self
    }

    /// The peer's identity, or why it is refused.
    fn identity(&self, request: &HttpRequest) -> Result<String, Reason> {
        let from_certificate = match &request.peer_certificate {
            Some(pem) => {
                let uris = uri_sans(pem).ok_or(Reason::InvalidCredential)?;
                match uris.as_slice() {
                    [one] if valid_spiffe_id(one) => Some(one.clone()),
                    // An X509-SVID carries exactly one URI SAN.
                    [_, _, ..] => return Err(Reason::InvalidCredential),
                    [one] if one.starts_with("spiffe:") => {
                        return Err(Reason::InvalidCredential);
                    }
                    // A URI SAN that is not SPIFFE, or none: not a workload
                    // identity; the subject may still be, if allowed.
                    _ => None,
                }
            }
            None => None,
        };
        let id = match from_certificate {
            Some(id) => id,
            None => {
                let principal = request.peer_principal.clone().unwrap_or_default();
                if principal.starts_with("spiffe:") && request.peer_certificate.is_none() {
                    if !valid_spiffe_id(&principal) {
                        return Err(Reason::InvalidCredential);
                    }
                    principal
                } else if self.subject_names && !principal.is_empty() && !principal.contains("://")
                {
                    return Ok(principal);
                } else {
                    return Err(Reason::InvalidCredential);
                }
            }
        };
        if !self.trust_domains.is_empty() {
            // Exact match on the parsed trust domain: `spiffe://acme.example.evil/`
            // is not `acme.example`.
            let domain = crate::engine::principal::trust_domain(&id);
            if !self.trust_domains.iter().any(|d| d == domain) {
                return Err(Reason::InvalidCredential);
            }
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl Authenticator for MtlsAuthenticator {
    fn kind(&self) -> SourceKind {
        SourceKind::Mtls
    }

    fn claims(&self, request: &HttpRequest) -> bool {
        request.tls && (request.peer_principal.is_some() || request.peer_certificate.is_some())
    }

    async fn authenticate(&self, request: &HttpRequest) -> Authentication {
        if !self.claims(request) {
            return Authentication::NotPresent;
        }
        match self.identity(request) {
            Ok(id) => Authentication::Authenticated(Principal {
                kind: PrincipalKind::Service,
                id,
                ..Principal::anonymous()
            }),
            Err(reason) => Authentication::Rejected(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn peer_principal_counts_only_over_tls() {
        let mut req = HttpRequest {
            peer_principal: Some("spiffe://acme.example/ns/batch/sa/indexer".into()),
            ..Default::default()
        };
        let any = MtlsAuthenticator::default();
        assert_eq!(any.authenticate(&req).await, Authentication::NotPresent);
        req.tls = true;
        match any.authenticate(&req).await {
            Authentication::Authenticated(p) => {
                assert_eq!(p.kind, PrincipalKind::Service);
                assert_eq!(p.id, "spiffe://acme.example/ns/batch/sa/indexer");
            }
            other => panic!("expected a service principal, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn trust_domains_match_exactly() {
        let a = MtlsAuthenticator::new(vec!["acme.example".into()]);
        let req = |id: &str| HttpRequest {
            peer_principal: Some(id.into()),
            tls: true,
            ..Default::default()
        };
        assert!(matches!(
            a.authenticate(&req("spiffe://acme.example/ns/a")).await,
            Authentication::Authenticated(_)
        ));
        for bad in [
            "spiffe://acme.example.evil/ns/a",
            "spiffe://evil/acme.example",
            "CN=acme.example",
            "spiffe://acme.example/ns/a/",
            "spiffe://acme.example/ns/../a",
        ] {
            assert_eq!(
                a.authenticate(&req(bad)).await,
                Authentication::Rejected(Reason::InvalidCredential),
                "{bad}"
            );
        }
    }

    #[test]
    fn spiffe_id_syntax() {
        for good in [
            "spiffe://acme.example",
            "spiffe://acme.example/ns/batch/sa/indexer",
            "spiffe://a-b_c.d/x.y-z_0",
        ] {
            assert!(valid_spiffe_id(good), "{good}");
        }
        for bad in [
            "spiffe://acme.example/",
            "spiffe://acme.example/ns//a",
            "spiffe://acme.example/ns/./a",
            "spiffe://acme.example/ns/../a",
            "spiffe://acme.example/ns/%61",
            "spiffe://acme.example/ns?x=1",
            "spiffe://acme.example/ns#f",
            "spiffe://Acme.example/ns",
            "spiffe://acme.example:8443/ns",
            "spiffe://user@acme.example/ns",
            "spiffe:///ns",
            "SPIFFE://acme.example/ns",
            "https://acme.example/ns",
            "CN=chat-client,O=Anything",
        ] {
            assert!(!valid_spiffe_id(bad), "{bad}");
        }
    }

    #[tokio::test]
    async fn subject_names_only_when_opted_in() {
        let req = HttpRequest {
            peer_principal: Some("CN=chat-client,O=Anything".into()),
            tls: true,
            ..Default::default()
        };
        assert_eq!(
            MtlsAuthenticator::default().authenticate(&req).await,
            Authentication::Rejected(Reason::InvalidCredential)
        );
        assert!(matches!(
            MtlsAuthenticator::default()
                .with_subject_names(true)
                .authenticate(&req)
                .await,
            Authentication::Authenticated(Principal {
                kind: PrincipalKind::Service,
                ..
            })
        ));
    }
}
