//! Who is calling. Each credential kind is an [`Authenticator`]; the engine
//! asks them in order and the first whose credential is present decides.

pub mod api_key;
pub mod mtls;

use crate::decision::Reason;
use crate::request::HttpRequest;

/// How the caller authenticated; becomes the Cedar entity type of the
/// principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// An API key (`ApiKey::"<key id>"`).
    ApiKey,
    /// A workload identified by its mTLS certificate (`Service::"<spiffe id>"`).
    Service,
    /// No credential at all (`Anonymous::"anonymous"`).
    Anonymous,
}

impl PrincipalKind {
    /// The Cedar entity type name.
    pub fn entity_type(self) -> &'static str {
        match self {
            Self::ApiKey => "ApiKey",
            Self::Service => "Service",
            Self::Anonymous => "Anonymous",
        }
    }

    /// How the caller authenticated, as `context.authn`.
    pub fn authn(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::Service => "mtls",
            Self::Anonymous => "none",
        }
    }
}

/// The authenticated caller, with what policy and quota key on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// Entity id: key id, SPIFFE id, …; never the credential itself.
    pub id: String,
    pub tenant: Option<String>,
    /// `free`, `paid`, `enterprise`, ….
    pub tier: Option<String>,
    pub scopes: Vec<String>,
    /// Group ids; become `Group::"<id>"` parents.
    pub groups: Vec<String>,
}

impl Principal {
    /// The caller with no credential.
    pub fn anonymous() -> Self {
        Self {
            kind: PrincipalKind::Anonymous,
            id: "anonymous".into(),
            tenant: None,
            tier: None,
            scopes: Vec::new(),
            groups: Vec::new(),
        }
    }

    /// `Type::"id"`, for logs and headers.
    pub fn uid(&self) -> String {
        format!("{}::{:?}", self.kind.entity_type(), self.id)
    }
}

/// What one authenticator made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// This authenticator's credential is absent; ask the next one.
    NotPresent,
    Authenticated(Principal),
    /// The credential is present but not acceptable. Never falls through to
    /// another source or to anonymous.
    Rejected(Reason),
}

/// One identity source.
pub trait Authenticator: Send + Sync {
    /// Examines the request's credential, if this source has one in it.
    fn authenticate(&self, request: &HttpRequest) -> Authentication;
}

/// The configured sources, in order.
#[derive(Default)]
pub struct IdentityChain {
    sources: Vec<Box<dyn Authenticator>>,
}

impl IdentityChain {
    /// A chain asking `sources` in order.
    pub fn new(sources: Vec<Box<dyn Authenticator>>) -> Self {
        Self { sources }
    }

    /// The first present credential decides; with none, the caller is
    /// anonymous.
    pub fn authenticate(&self, request: &HttpRequest) -> Result<Principal, Reason> {
        for source in &self.sources {
            match source.authenticate(request) {
                Authentication::NotPresent => continue,
                Authentication::Authenticated(p) => return Ok(p),
                Authentication::Rejected(reason) => return Err(reason),
            }
        }
        Ok(Principal::anonymous())
    }
}
