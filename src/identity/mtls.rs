//! mTLS peer identity, as the gateway verified it.

use super::{Authentication, Authenticator, Principal, PrincipalKind};
use crate::request::HttpRequest;

/// Takes the peer principal Envoy reports in `source.principal` (the URI SAN,
/// typically a SPIFFE id, else the subject) — and only for connections that
/// were TLS. Headers such as `x-forwarded-client-cert` are never read: a
/// client can set them.
#[derive(Debug, Default)]
pub struct MtlsAuthenticator;

impl Authenticator for MtlsAuthenticator {
    fn authenticate(&self, request: &HttpRequest) -> Authentication {
        match (&request.peer_principal, request.tls) {
            (Some(id), true) if !id.is_empty() => Authentication::Authenticated(Principal {
                kind: PrincipalKind::Service,
                id: id.clone(),
                tenant: None,
                tier: None,
                scopes: Vec::new(),
                groups: Vec::new(),
            }),
            _ => Authentication::NotPresent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_principal_counts_only_over_tls() {
        let mut req = HttpRequest {
            peer_principal: Some("spiffe://acme.example/ns/batch/sa/indexer".into()),
            ..Default::default()
        };
        assert_eq!(
            MtlsAuthenticator.authenticate(&req),
            Authentication::NotPresent
        );
        req.tls = true;
        match MtlsAuthenticator.authenticate(&req) {
            Authentication::Authenticated(p) => {
                assert_eq!(p.kind, PrincipalKind::Service);
                assert_eq!(p.id, "spiffe://acme.example/ns/batch/sa/indexer");
            }
            other => panic!("expected a service principal, got {other:?}"),
        }
    }
}
