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
    /// The verified client certificate itself, PEM (Envoy sends it with
    /// `include_peer_certificate: true`), present only for TLS connections.
    /// When present, the mTLS identity is read from its SANs.
    pub peer_certificate: Option<String>,
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
    /// What Envoy's MCP filter read of the JSON-RPC request (its dynamic
    /// metadata, forwarded by ext_authz; see [`crate::mcp::envoy_metadata`]).
    pub mcp_metadata: Option<serde_json::Value>,
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
    #[error("source address {0:?} is not an IP address")]
    BadSourceAddress(String),
    #[error("peer certificate is not URL-encoded PEM")]
    BadPeerCertificate,
    #[error("metadata_context nests deeper than {0} levels")]
    MetadataTooDeep(usize),
}

/// Reads a downstream peer address as a gateway reports it, in the one form
/// policies see: IPv4-mapped IPv6 (`::ffff:127.0.0.1`, `::ffff:7f00:1`,
/// what dual-stack listeners report for IPv4 clients) becomes the IPv4
/// address; an IPv6 zone id (`fe80::1%eth0`) is dropped, since Cedar's `ip`
/// has no zones and the address alone is what policies compare; brackets
/// are accepted. An empty address (a pipe or an internal listener) is
/// `Ok(None)`; anything else that is not an IP address is an error, never a
/// value a policy then fails on.
pub fn parse_source_ip(text: &str) -> Result<Option<IpAddr>, MalformedRequest> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Ok(None);
    }
    let unbracketed = trimmed
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(trimmed);
    let without_zone = match unbracketed.split_once('%') {
        Some((addr, zone)) if addr.contains(':') && !zone.is_empty() => addr,
        _ => unbracketed,
    };
    let ip: IpAddr = without_zone
        .parse()
        .map_err(|_| MalformedRequest::BadSourceAddress(text.chars().take(64).collect()))?;
    Ok(Some(ip.to_canonical()))
}

/// The client address of a request that reached the gateway through
/// `trusted_hops` trusted proxies (`context.trusted_hops`): with 0, `peer`
/// (the address the gateway reports) and `X-Forwarded-For` is never read;
/// with N, the N-th entry from the right of `x_forwarded_for` — entries left
/// of it were written by the client and are never trusted. A header with
/// fewer than N entries (the request did not come through every trusted
/// proxy) gives `peer`; a trusted entry that is not an IP address is an
/// error.
pub fn client_ip(
    peer: Option<IpAddr>,
    x_forwarded_for: Option<&str>,
    trusted_hops: usize,
) -> Result<Option<IpAddr>, MalformedRequest> {
    if trusted_hops == 0 {
        return Ok(peer);
    }
    let Some(xff) = x_forwarded_for else {
        return Ok(peer);
    };
    let entries: Vec<&str> = xff.split(',').map(str::trim).collect();
    match entries.len().checked_sub(trusted_hops) {
        Some(i) => match parse_source_ip(entries[i])? {
            Some(ip) => Ok(Some(ip)),
            None => Err(MalformedRequest::BadSourceAddress(String::new())),
        },
        None => Ok(peer),
    }
}

/// Why the request's host cannot be decided on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostError {
    #[error("the host has several values")]
    SeveralValues,
    #[error("the absolute-form target names another host than Host")]
    TargetDisagrees,
    #[error("the host contains whitespace or control characters")]
    BadCharacter,
}

/// Checks that the request names exactly one host: `:authority` (Envoy's
/// `host`) holds one value (no ',' from merged or smuggled duplicates, no
/// whitespace), a separate `host` header, if the gateway passed one, agrees
/// with it, and an absolute-form target (`GET http://b.example/ HTTP/1.1`)
/// names the same authority. Comparison is on the normalized host (case,
/// port, trailing dot) as policies see it.
pub fn check_host(request: &HttpRequest) -> Result<(), HostError> {
    let norm = crate::engine::context::normalize_host;
    let host = request.host.as_str();
    let one = |value: &str| -> Result<(), HostError> {
        if value.contains(',') {
            return Err(HostError::SeveralValues);
        }
        if value.trim() != value
            || value
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(HostError::BadCharacter);
        }
        Ok(())
    };
    one(host)?;
    for name in [":authority", "host"] {
        if let Some(other) = request.header(name) {
            one(other)?;
            if norm(other) != norm(host) {
                return Err(HostError::SeveralValues);
            }
        }
    }
    let target = request.raw_path.as_str();
    let lower = target.get(..8).unwrap_or(target).to_ascii_lowercase();
    let rest = if lower.starts_with("https://") {
        target.get(8..)
    } else if lower.starts_with("http://") {
        target.get(7..)
    } else {
        None
    };
    if let Some(rest) = rest {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        let authority = authority.rsplit('@').next().unwrap_or(authority);
        one(authority)?;
        if norm(authority) != norm(host) {
            return Err(HostError::TargetDisagrees);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_normalize_or_refuse() {
        let v4 = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        for (raw, want) in [
            ("127.0.0.1", v4("127.0.0.1")),
            ("::ffff:127.0.0.1", v4("127.0.0.1")),
            ("::ffff:7f00:1", v4("127.0.0.1")),
            ("[::ffff:10.1.2.3]", v4("10.1.2.3")),
            ("fe80::1%eth0", v4("fe80::1")),
            ("::1", v4("::1")),
            ("", None),
        ] {
            assert_eq!(parse_source_ip(raw), Ok(want), "{raw}");
        }
        for bad in ["not-an-ip", "/tmp/sock", "1.2.3.4%eth0", "fe80::1%"] {
            assert!(parse_source_ip(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn trusted_hops_pick_the_entry_the_trusted_proxy_wrote() {
        let ip = |s: &str| Some(s.parse::<IpAddr>().expect("ip"));
        let peer = ip("10.0.0.1");
        let xff = Some("6.6.6.6, 203.0.113.5, 198.51.100.7");
        assert_eq!(client_ip(peer, xff, 0), Ok(peer));
        assert_eq!(client_ip(peer, xff, 1), Ok(ip("198.51.100.7")));
        assert_eq!(client_ip(peer, xff, 2), Ok(ip("203.0.113.5")));
        assert_eq!(client_ip(peer, xff, 4), Ok(peer));
        assert_eq!(client_ip(peer, None, 1), Ok(peer));
        assert!(client_ip(peer, Some("1.2.3.4, junk"), 1).is_err());
        assert!(client_ip(peer, Some("1.2.3.4,"), 1).is_err());
    }

    #[test]
    fn one_host_only() {
        let req = |host: &str, path: &str| HttpRequest {
            host: host.into(),
            raw_path: path.into(),
            ..Default::default()
        };
        for (host, path, ok) in [
            ("a.example.com", "/v1", true),
            ("A.example.com:443", "https://a.example.com/v1", true),
            ("a.example.com,b.example.com", "/v1", false),
            ("a.example.com, a.example.com", "/v1", false),
            ("a.example.com", "http://b.example.com/v1", false),
            ("a.example.com", "http://x@b.example.com/v1", false),
            ("a.example.com", "HTTP://B.example.com/v1", false),
            ("a.example.com b", "/v1", false),
        ] {
            assert_eq!(check_host(&req(host, path)).is_ok(), ok, "{host} {path}");
        }
        let mut r = req("a.example.com", "/v1");
        r.headers.insert("host".into(), "b.example.com".into());
        assert_eq!(check_host(&r), Err(HostError::SeveralValues));
    }
}
