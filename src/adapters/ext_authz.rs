//! Envoy `envoy.service.auth.v3.Authorization/Check`.

use std::collections::HashMap;
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, address};
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
    HttpRequest as EnvoyHttp, Peer, Request as EnvoyRequest,
};
use envoy_types::pb::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, authorization_server::Authorization,
};
use tonic::{Request, Response, Status};

use crate::config::{HeaderStyle, ResponseConfig};
use crate::decision::{Decision, Outcome, Reason};
use crate::engine::Engine;
use crate::request::{HttpRequest, MalformedRequest, RouteHints, parse_source_ip};
use crate::respond;

/// Envoy sets this request header when `allow_partial_message` cut the body.
const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// The ext_authz gRPC service.
pub struct ExtAuthz {
    engine: Arc<Engine>,
    response: ResponseConfig,
    headers: HeaderStyle,
    trusted_hops: usize,
}

impl ExtAuthz {
    /// Serves decisions from `engine`.
    pub fn new(engine: Arc<Engine>, response: ResponseConfig, headers: HeaderStyle) -> Self {
        Self {
            engine,
            response,
            headers,
            trusted_hops: 0,
        }
    }

    /// Reads the client address from `X-Forwarded-For` behind `hops`
    /// trusted proxies ([`crate::request::client_ip`]).
    pub fn with_trusted_hops(mut self, hops: usize) -> Self {
        self.trusted_hops = hops;
        self
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let converted = to_http_request(request.into_inner()).and_then(|mut http| {
            http.source_ip = crate::request::client_ip(
                http.source_ip,
                http.header("x-forwarded-for"),
                self.trusted_hops,
            )
            .map_err(|e| (http.request_id.clone(), e))?;
            Ok(http)
        });
        let (http, malformed) = match converted {
            Ok(http) => (http, None),
            Err((request_id, err)) => (
                HttpRequest {
                    request_id,
                    ..Default::default()
                },
                Some(err),
            ),
        };
        let decision = match malformed {
            None => self.engine.decide_http(&http).await,
            Some(err) => {
                tracing::info!(request_id = %http.request_id, error = %err, "malformed CheckRequest denied");
                let version = self.engine.policies().snapshot().version.clone();
                let decision = Decision::early(
                    http.request_id.clone(),
                    Outcome::Invalid(Reason::MalformedRequest),
                    version,
                );
                self.engine.record_refused(&decision, &http);
                decision
            }
        };
        if let Outcome::Defer(reason) = decision.outcome {
            // The operator chose `failure_mode = "gateway"`: fail the RPC so
            // Envoy's own `failure_mode_allow` decides.
            return Err(Status::unavailable(reason.code()));
        }
        Ok(Response::new(respond::check_response(
            &decision,
            &http.headers,
            &self.response,
            self.headers,
        )))
    }
}

/// Converts Envoy's CheckRequest. The destructuring is exhaustive on purpose:
/// a field Envoy adds must be a conscious choice here, not silently ignored.
fn to_http_request(check: CheckRequest) -> Result<HttpRequest, (String, MalformedRequest)> {
    let CheckRequest { attributes } = check;
    let fresh_id = || uuid::Uuid::new_v4().to_string();
    let AttributeContext {
        source,
        destination,
        request,
        context_extensions,
        metadata_context,
        route_metadata_context: _,
        tls_session,
    } = attributes.ok_or_else(|| (fresh_id(), MalformedRequest::MissingAttributes))?;
    let EnvoyRequest { time: _, http } =
        request.ok_or_else(|| (fresh_id(), MalformedRequest::MissingAttributes))?;
    let EnvoyHttp {
        id,
        method,
        headers,
        header_map,
        path,
        host,
        scheme: _,
        query: _,
        fragment: _,
        size,
        protocol: _,
        body,
        raw_body,
    } = http.ok_or_else(|| (fresh_id(), MalformedRequest::MissingAttributes))?;
    let headers = match header_map {
        Some(map) if headers.is_empty() => raw_headers(map).map_err(|e| {
            (
                if id.is_empty() {
                    fresh_id()
                } else {
                    id.clone()
                },
                e,
            )
        })?,
        _ => headers,
    };
    // The request id is Envoy's `x-request-id` — what its access log, the
    // upstream, ext_proc and a `ReportUsage` caller see — not `http.id`,
    // which is Envoy's internal stream id. Envoy generates it for every edge
    // request unless `preserve_external_request_id` lets a client choose it.
    let request_id = match headers.get("x-request-id") {
        Some(x) if !x.is_empty() && x.len() <= 128 && x.bytes().all(|b| b.is_ascii_graphic()) => {
            x.clone()
        }
        _ if !id.is_empty() => id,
        _ => fresh_id(),
    };
    let source = source.map(peer).unwrap_or_default();
    let source_ip = parse_source_ip(&source.address).map_err(|e| (request_id.clone(), e))?;
    let peer_certificate = match source.certificate.as_deref() {
        None => None,
        Some(encoded) => Some(
            percent_encoding::percent_decode_str(encoded)
                .decode_utf8()
                .map_err(|_| (request_id.clone(), MalformedRequest::BadPeerCertificate))?
                .into_owned(),
        ),
    };
    // TLS only on evidence, never on a flag: `include_tls_session: true`
    // makes Envoy send an empty `tls_session` on plaintext connections too.
    // Evidence is a non-empty TLS session (SNI), a client certificate Envoy
    // verified, or the local certificate Envoy reports as `destination`
    // (it fills that only when the connection is TLS). None of these can be
    // set by the client.
    let local = destination.map(peer).unwrap_or_default();
    let tls = tls_session.is_some_and(|t| !t.sni.is_empty())
        || source.principal.is_some()
        || peer_certificate.is_some()
        || local.principal.is_some()
        || local.certificate.is_some();
    let peer_principal = source.principal;
    let body = if !raw_body.is_empty() {
        Some(raw_body)
    } else if !body.is_empty() {
        Some(body.into_bytes())
    } else {
        None
    };
    let mut filter_metadata = metadata_context
        .map(|m| m.filter_metadata)
        .unwrap_or_default();
    let too_deep = || {
        (
            request_id.clone(),
            MalformedRequest::MetadataTooDeep(MAX_METADATA_DEPTH),
        )
    };
    // Envoy's MCP filter (`envoy.filters.http.mcp`), when it runs in front.
    let mcp_metadata = crate::mcp::envoy_metadata::NAMESPACES
        .iter()
        .find_map(|ns| filter_metadata.remove(*ns))
        .map(|s| {
            json_of(
                envoy_types::pb::google::protobuf::Value {
                    kind: Some(envoy_types::pb::google::protobuf::value::Kind::StructValue(
                        s,
                    )),
                },
                1,
            )
            .ok_or_else(too_deep)
        })
        .transpose()?;
    let jwt_authn_payloads = filter_metadata
        .remove(crate::identity::jwt::JWT_AUTHN_NAMESPACE)
        .map(|s| {
            s.fields
                .into_iter()
                .map(|(k, v)| json_of(v, 1).map(|v| (k, v)))
                .collect::<Option<HashMap<_, _>>>()
        })
        .unwrap_or_else(|| Some(HashMap::new()))
        .ok_or_else(too_deep)?;
    let mut ext = context_extensions;
    Ok(HttpRequest {
        body_partial: headers
            .get(PARTIAL_BODY_HEADER)
            .is_some_and(|v| v == "true"),
        request_id,
        method,
        raw_path: path,
        host,
        source_ip,
        tls,
        peer_principal: peer_principal.filter(|_| tls),
        peer_certificate: peer_certificate.filter(|_| tls),
        body,
        declared_size: u64::try_from(size).ok(),
        route_hints: RouteHints {
            action: ext.remove("action"),
            resource: ext.remove("resource"),
            tenant: ext.remove("tenant"),
            identity: ext.remove("identity"),
        },
        jwt_authn_payloads,
        mcp_metadata,
        headers,
    })
}

/// Headers sent as raw bytes (`encode_raw_headers`); duplicates are joined
/// with ',' as Envoy does for the string map.
fn raw_headers(map: HeaderMap) -> Result<HashMap<String, String>, MalformedRequest> {
    let mut out: HashMap<String, String> = HashMap::new();
    for h in map.headers {
        let value = if h.raw_value.is_empty() {
            h.value
        } else {
            String::from_utf8(h.raw_value)
                .map_err(|_| MalformedRequest::HeaderNotUtf8(h.key.clone()))?
        };
        out.entry(h.key.to_ascii_lowercase())
            .and_modify(|v| {
                v.push(',');
                v.push_str(&value);
            })
            .or_insert(value);
    }
    Ok(out)
}

/// Deepest `metadata_context` value converted. prost already refuses
/// messages nested deeper than 100 levels while decoding (about 46 levels of
/// `Value` lists, two messages each); this keeps the
/// conversion's own recursion bounded whatever the decoder allows.
const MAX_METADATA_DEPTH: usize = 16;

/// A protobuf `Value` as JSON; `None` when it nests deeper than
/// [`MAX_METADATA_DEPTH`].
fn json_of(
    value: envoy_types::pb::google::protobuf::Value,
    depth: usize,
) -> Option<serde_json::Value> {
    use envoy_types::pb::google::protobuf::value::Kind;
    if depth > MAX_METADATA_DEPTH {
        return None;
    }
    Some(match value.kind {
        Some(Kind::StringValue(s)) => serde_json::Value::String(s),
        Some(Kind::NumberValue(n)) => serde_json::Number::from_f64(n)
            .map_or(serde_json::Value::Null, serde_json::Value::Number),
        Some(Kind::BoolValue(b)) => serde_json::Value::Bool(b),
        Some(Kind::StructValue(s)) => serde_json::Value::Object(
            s.fields
                .into_iter()
                .map(|(k, v)| json_of(v, depth + 1).map(|v| (k, v)))
                .collect::<Option<_>>()?,
        ),
        Some(Kind::ListValue(l)) => serde_json::Value::Array(
            l.values
                .into_iter()
                .map(|v| json_of(v, depth + 1))
                .collect::<Option<_>>()?,
        ),
        Some(Kind::NullValue(_)) | None => serde_json::Value::Null,
    })
}

/// What a CheckRequest says about one end of the connection.
#[derive(Default)]
struct PeerFacts {
    /// The socket address as sent; empty for pipes and internal listeners.
    address: String,
    principal: Option<String>,
    /// URL-encoded PEM, as Envoy sends it.
    certificate: Option<String>,
}

fn peer(peer: Peer) -> PeerFacts {
    let Peer {
        address,
        service: _,
        labels: _,
        principal,
        certificate,
    } = peer;
    let address = match address.and_then(|a| a.address) {
        Some(address::Address::SocketAddress(s)) => s.address,
        // A pipe (Unix socket) or an Envoy internal address has no IP.
        Some(address::Address::Pipe(_) | address::Address::EnvoyInternalAddress(_)) | None => {
            String::new()
        }
    };
    PeerFacts {
        address,
        principal: Some(principal).filter(|p| !p.is_empty()),
        certificate: Some(certificate).filter(|c| !c.is_empty()),
    }
}
