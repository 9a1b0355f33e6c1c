//! mTLS peer identity, as the gateway verified it.

use super::{Authentication, Authenticator, Principal, PrincipalKind, SourceKind};
use crate::decision::Reason;
use crate::request::HttpRequest;

/// Takes the peer principal Envoy reports in `source.principal` (the URI SAN,
/// typically a SPIFFE id, else the subject) — and only for connections that
/// were TLS. Headers such as `x-forwarded-client-cert` are never read: a
/// client can set them.
#[derive(Debug, Default)]
pub struct MtlsAuthenticator {
    /// SPIFFE trust domains accepted, matched exactly; empty accepts any
    /// identity the gateway verified.
    trust_domains: Vec<String>,
}

impl MtlsAuthenticator {
    /// Accepts peers of `trust_domains` (all, when empty).
    pub fn new(trust_domains: Vec<String>) -> Self {
        Self { trust_domains }
    }
}

#[tonic::async_trait]
impl Authenticator for MtlsAuthenticator {
    fn kind(&self) -> SourceKind {
        SourceKind::Mtls
    }

    fn claims(&self, request: &HttpRequest) -> bool {
        request.tls && request.peer_principal.is_some()
    }

    async fn authenticate(&self, request: &HttpRequest) -> Authentication {
        let (Some(id), true) = (&request.peer_principal, request.tls) else {
            return Authentication::NotPresent;
        };
        if id.is_empty() {
            return Authentication::NotPresent;
        }
        if !self.trust_domains.is_empty() {
            // Exact match on the parsed trust domain: `spiffe://acme.example.evil/`
            // is not `acme.example`.
            let domain = crate::engine::principal::trust_domain(id);
            if !self.trust_domains.iter().any(|d| d == domain) {
                return Authentication::Rejected(Reason::InvalidCredential);
            }
        }
        Authentication::Authenticated(Principal {
            kind: PrincipalKind::Service,
            id: id.clone(),
            ..Principal::anonymous()
        })
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
        ] {
            assert_eq!(
                a.authenticate(&req(bad)).await,
                Authentication::Rejected(Reason::InvalidCredential),
                "{bad}"
            );
        }
    }
}
