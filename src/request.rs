//! Plain domain types for what a gateway asks about. Adapters build these from
//! their protocol messages; the engine never sees a protobuf type.

use std::collections::HashMap;
use std::net::IpAddr;

/// An HTTP request as the gateway saw it, before any interpretation.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    /// The gateway's request id (Envoy's `x-request-id`), or one we made.
    pub request_id: String,
    /// Upper-case method.
    pub method: String,
    /// `:path` as received: path plus optional query, still encoded.
    pub raw_path: String,
    /// `:authority` / `Host` as received.
    pub host: String,
    /// Headers with lowercase names. A header the gateway merged from
    /// duplicates arrives comma-joined.
    pub headers: HashMap<String, String>,
    /// Downstream peer address.
    pub source_ip: Option<IpAddr>,
    /// Whether the downstream connection was TLS (as the gateway observed it,
    /// never as a header claims).
    pub tls: bool,
    /// Peer identity from the verified client certificate (URI SAN or
    /// subject), present only for TLS connections.
    pub peer_principal: Option<String>,
    /// Request body if the gateway forwarded it.
    pub body: Option<Vec<u8>>,
    /// The gateway forwarded only part of the body.
    pub body_partial: bool,
    /// Declared body size (`Content-Length`), if known.
    pub declared_size: Option<u64>,
    /// Per-route hints set in the gateway's config (Envoy
    /// `context_extensions`): `action`, `resource`, `tenant`, `identity`.
    pub route_hints: RouteHints,
    /// JWT payloads the gateway already verified (Envoy `jwt_authn`
    /// metadata), by payload key. Used only for issuers configured to trust
    /// them.
    pub jwt_authn_payloads: HashMap<String, serde_json::Value>,
}

/// Route facts the gateway's own configuration supplies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RouteHints {
    pub action: Option<String>,
    pub resource: Option<String>,
    pub tenant: Option<String>,
    /// Identity sources this route accepts (`api_key,jwt`), if restricted.
    pub identity: Option<String>,
}

impl HttpRequest {
    /// A header by lowercase name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Why a gateway request could not even be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedRequest {
    #[error("request attributes are missing")]
    MissingAttributes,
    #[error("header {0:?} is not valid UTF-8")]
    HeaderNotUtf8(String),
    #[error("metadata_context nests deeper than {0} levels")]
    MetadataTooDeep(usize),
}
