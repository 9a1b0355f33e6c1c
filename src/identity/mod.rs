//! Who is calling. Each credential kind is an [`Authenticator`]; the engine
//! asks the configured ones in order (per route, a subset) and the first
//! whose credential is present decides. A credential that is present but
//! invalid is refused: never a fall-through to another source or anonymous.

pub mod api_key;
pub mod introspection;
pub mod jwt;
pub mod key_format;
pub mod keys;
pub mod lockout;
pub mod mtls;

use serde::Deserialize;

use crate::decision::Reason;
use crate::request::HttpRequest;

/// An identity source, as named in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    ApiKey,
    Jwt,
    Mtls,
    /// Opaque bearer tokens, introspected (RFC 7662).
    Introspection,
}

impl SourceKind {
    /// Parses `api_key`, `jwt`, `mtls`, `introspection`.
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim() {
            "api_key" => Some(Self::ApiKey),
            "jwt" => Some(Self::Jwt),
            "mtls" => Some(Self::Mtls),
            "introspection" => Some(Self::Introspection),
            _ => None,
        }
    }
}

/// How the caller authenticated; becomes the Cedar entity type of the
/// principal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// An API key (`ApiKey::"<key id>"`).
    ApiKey,
    /// A person or partner with a verified bearer token (`User::"<sub>"`).
    User,
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
            Self::User => "User",
            Self::Service => "Service",
            Self::Anonymous => "Anonymous",
        }
    }

    /// How the caller authenticated, as `context.authn`.
    pub fn authn(self) -> &'static str {
        match self {
            Self::ApiKey => "api_key",
            Self::User => "jwt",
            Self::Service => "mtls",
            Self::Anonymous => "none",
        }
    }
}

/// The authenticated caller, with what policy and quota key on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// Entity id: key id, subject, SPIFFE id, …; never the credential itself.
    pub id: String,
    pub tenant: Option<String>,
    /// `free`, `paid`, `enterprise`, ….
    pub tier: Option<String>,
    pub scopes: Vec<String>,
    /// Group ids; become `Group::"<id>"` parents.
    pub groups: Vec<String>,
    /// Models the credential is limited to; empty means no limit.
    pub models: Vec<String>,
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
            models: Vec::new(),
        }
    }

    /// `Type::"id"`, for logs and headers.
    pub fn uid(&self) -> String {
        let ty = self.kind.entity_type();
        // Printable ASCII other than `"` and `\` is its own Debug form: skip
        // the formatter (this runs several times per decision).
        if self
            .id
            .bytes()
            .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        {
            let mut out = String::with_capacity(ty.len() + self.id.len() + 4);
            out.push_str(ty);
            out.push_str("::\"");
            out.push_str(&self.id);
            out.push('"');
            return out;
        }
        format!("{ty}::{:?}", self.id)
    }
}

/// What one authenticator made of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Authentication {
    /// This authenticator's credential is absent; ask the next one.
    NotPresent,
    Authenticated(Principal),
    /// The credential is present but not acceptable.
    Rejected(Reason),
}

/// One identity source.
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// Which source this is.
    fn kind(&self) -> SourceKind;
    /// Whether the request carries this source's kind of credential (cheap,
    /// no verification).
    fn claims(&self, request: &HttpRequest) -> bool;
    /// Examines the request's credential, if this source has one in it.
    async fn authenticate(&self, request: &HttpRequest) -> Authentication;
}

/// The configured sources, in order.
#[derive(Default)]
pub struct IdentityChain {
    sources: Vec<std::sync::Arc<dyn Authenticator>>,
}

impl IdentityChain {
    /// A chain asking `sources` in order.
    pub fn new(sources: Vec<std::sync::Arc<dyn Authenticator>>) -> Self {
        Self { sources }
    }

    /// A request carrying several caller credentials that are not one and
    /// the same is refused ([`several_credentials`]). Otherwise the first
    /// present credential among the `allowed` sources (all when `None`)
    /// decides; with none, the caller is anonymous. A credential of a
    /// source the route does not allow, or an `Authorization` header no
    /// source recognizes, is refused rather than ignored.
    pub async fn authenticate(
        &self,
        request: &HttpRequest,
        allowed: Option<&[SourceKind]>,
    ) -> Result<Principal, Reason> {
        if several_credentials(request) {
            return Err(Reason::AmbiguousCredential);
        }
        let permitted =
            |s: &&std::sync::Arc<dyn Authenticator>| allowed.is_none_or(|a| a.contains(&s.kind()));
        for source in self.sources.iter().filter(permitted) {
            match source.authenticate(request).await {
                Authentication::NotPresent => continue,
                Authentication::Authenticated(p) => return Ok(p),
                Authentication::Rejected(reason) => return Err(reason),
            }
        }
        let claimed_elsewhere = self
            .sources
            .iter()
            .any(|s| !permitted(&s) && s.claims(request));
        if claimed_elsewhere
            || request.header("authorization").is_some()
            || request.header("x-api-key").is_some()
        {
            return Err(Reason::InvalidCredential);
        }
        Ok(Principal::anonymous())
    }
}

impl IdentityChain {
    /// The mTLS peer's own identity (the connection, not the caller's
    /// credential): what the mTLS source says, whatever else the request
    /// carries. `None` without an mTLS source or a verified peer.
    pub async fn mtls_peer(&self, request: &HttpRequest) -> Option<Principal> {
        for source in self.sources.iter().filter(|s| s.kind() == SourceKind::Mtls) {
            if let Authentication::Authenticated(p) = source.authenticate(request).await {
                return Some(p);
            }
        }
        None
    }
}

/// Headers in which upstreams take an API key: Tollgate's own `x-api-key`,
/// Azure OpenAI's `api-key`, Google's `x-goog-api-key`. Tollgate
/// authenticates only `x-api-key` (and `Authorization`), but an upstream
/// may honour any of them, so each counts as a credential here.
const KEY_HEADERS: [&str; 3] = ["x-api-key", "api-key", "x-goog-api-key"];

/// Whether the request carries more than one caller credential: the
/// upstream might then act for another caller than the one Tollgate
/// decided on. Counted as several: different values among the API key
/// headers ([`KEY_HEADERS`]) and the `Authorization` header (its `Bearer`
/// value, or the whole header for another scheme — so an API key beside a
/// JWT or Basic credentials is several); a bearer value with ',' (merged
/// duplicate headers); an API key beside a JWT that Envoy's `jwt_authn`
/// verified; payloads of more than one verified JWT. The same key in
/// `x-api-key` and `Authorization: Bearer` is one caller. The mTLS peer
/// identity belongs to the connection, not a second caller, and is not
/// counted.
pub fn several_credentials(request: &HttpRequest) -> bool {
    let authorization = request.header("authorization").map(str::trim);
    let bearer = authorization
        .and_then(|a| a.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, value)| value.trim());
    if bearer.is_some_and(|b| b.contains(',')) {
        return true;
    }
    let keys: Vec<&str> = KEY_HEADERS
        .iter()
        .filter_map(|h| request.header(h))
        .map(str::trim)
        .collect();
    let mut values: Vec<&str> = keys.clone();
    if let Some(a) = authorization {
        values.push(bearer.unwrap_or(a));
    }
    values.sort_unstable();
    values.dedup();
    if values.len() > 1 {
        return true;
    }
    let key_presented =
        !keys.is_empty() || bearer.is_some_and(|b| b.starts_with(key_format::PREFIX));
    let verified_jwts = request.jwt_authn_payloads.len();
    verified_jwts > 1 || (verified_jwts == 1 && key_presented)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uid_fast_path_matches_the_debug_form() {
        for id in [
            "demo-paid",
            "a b",
            "quote\"d",
            "back\\slash",
            "tab\t",
            "nl\n",
            "é",
            "\u{7f}",
            "",
            "spiffe://acme.example/ns/x",
        ] {
            let mut p = Principal::anonymous();
            p.kind = PrincipalKind::ApiKey;
            p.id = id.to_string();
            assert_eq!(p.uid(), format!("ApiKey::{id:?}"), "{id:?}");
        }
    }

    #[test]
    fn several_credentials_are_detected() {
        let req = |headers: &[(&str, &str)], jwts: usize| {
            let mut r = HttpRequest::default();
            for (k, v) in headers {
                r.headers.insert(k.to_string(), v.to_string());
            }
            for i in 0..jwts {
                r.jwt_authn_payloads
                    .insert(format!("p{i}"), serde_json::json!({"sub": "x"}));
            }
            r
        };
        let (a, b) = ("tg_a_1", "tg_b_2");
        for (headers, jwts, want) in [
            (vec![("x-api-key", a)], 0, false),
            (vec![("authorization", "Bearer tg_a_1")], 0, false),
            (
                vec![("x-api-key", a), ("authorization", "Bearer tg_a_1")],
                0,
                false,
            ),
            (
                vec![("x-api-key", a), ("authorization", "Bearer tg_b_2")],
                0,
                true,
            ),
            (
                vec![("x-api-key", b), ("authorization", "Bearer e.y.j")],
                0,
                true,
            ),
            (
                vec![("x-api-key", a), ("authorization", "Basic eDp5")],
                0,
                true,
            ),
            (vec![("authorization", "Bearer e.y.j, e.y.k")], 0, true),
            (vec![("authorization", "Bearer e.y.j")], 1, false),
            (vec![("x-api-key", a)], 1, true),
            (vec![("authorization", "Bearer tg_a_1")], 1, true),
            (vec![], 2, true),
            (vec![("x-api-key", a), ("api-key", b)], 0, true),
            (vec![("x-api-key", a), ("api-key", a)], 0, false),
            (
                vec![("authorization", "Bearer tg_a_1"), ("x-goog-api-key", b)],
                0,
                true,
            ),
            (vec![("api-key", b)], 0, false),
        ] {
            assert_eq!(
                several_credentials(&req(&headers, jwts)),
                want,
                "{headers:?} {jwts}"
            );
        }
    }
}
