//! Envoy `envoy.service.auth.v3.Authorization/Check`.

use std::collections::HashMap;
use std::net::IpAddr;
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
use crate::request::{HttpRequest, MalformedRequest, RouteHints};
use crate::respond;

/// Envoy sets this request header when `allow_partial_message` cut the body.
const PARTIAL_BODY_HEADER: &str = "x-envoy-auth-partial-body";

/// The ext_authz gRPC service.
pub struct ExtAuthz {
    engine: Arc<Engine>,
    response: ResponseConfig,
    headers: HeaderStyle,
}

impl ExtAuthz {
    /// Serves decisions from `engine`.
    pub fn new(engine: Arc<Engine>, response: ResponseConfig, headers: HeaderStyle) -> Self {
        Self {
            engine,
            response,
            headers,
        }
    }
}

#[tonic::async_trait]
impl Authorization for ExtAuthz {
    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        let (http, malformed) = match to_http_request(request.into_inner()) {
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
                crate::audit::record(&decision, std::time::Duration::ZERO);
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
        destination: _,
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
    let request_id = if id.is_empty() { fresh_id() } else { id };
    let headers = match header_map {
        Some(map) if headers.is_empty() => raw_headers(map).map_err(|e| (request_id.clone(), e))?,
        _ => headers,
    };
    let (source_ip, peer_principal) = source.map(peer).unwrap_or_default();
    // Envoy sends `tls_session` only with `include_tls_session: true`; a
    // peer principal is taken from the verified client certificate, so it
    // too proves the connection was TLS. Neither can be set by the client.
    let tls = tls_session.is_some() || peer_principal.is_some();
    let body = if !raw_body.is_empty() {
        Some(raw_body)
    } else if !body.is_empty() {
        Some(body.into_bytes())
    } else {
        None
    };
    let jwt_authn_payloads = metadata_context
        .and_then(|mut m| {
            m.filter_metadata
                .remove(crate::identity::jwt::JWT_AUTHN_NAMESPACE)
        })
        .map(|s| {
            s.fields
                .into_iter()
                .map(|(k, v)| json_of(v, 1).map(|v| (k, v)))
                .collect::<Option<HashMap<_, _>>>()
        })
        .unwrap_or_else(|| Some(HashMap::new()))
        .ok_or_else(|| {
            (
                request_id.clone(),
                MalformedRequest::MetadataTooDeep(MAX_METADATA_DEPTH),
            )
        })?;
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
        body,
        declared_size: u64::try_from(size).ok(),
        route_hints: RouteHints {
            action: ext.remove("action"),
            resource: ext.remove("resource"),
            tenant: ext.remove("tenant"),
            identity: ext.remove("identity"),
        },
        jwt_authn_payloads,
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

fn peer(peer: Peer) -> (Option<IpAddr>, Option<String>) {
    let Peer {
        address,
        service: _,
        labels: _,
        principal,
        certificate: _,
    } = peer;
    let ip = address.and_then(|a| a.address).and_then(|a| match a {
        address::Address::SocketAddress(s) => s.address.parse().ok(),
        _ => None,
    });
    (ip, Some(principal).filter(|p| !p.is_empty()))
}
