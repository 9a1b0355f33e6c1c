//! Envoy `envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`.

use std::sync::Arc;

use envoy_types::pb::envoy::extensions::common::ratelimit::v3::RateLimitDescriptor;
use envoy_types::pb::envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::{
    Entry, RateLimitOverride,
};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_response::{Code, DescriptorStatus};
use envoy_types::pb::envoy::service::ratelimit::v3::rate_limit_service_server::RateLimitService;
use envoy_types::pb::envoy::service::ratelimit::v3::{RateLimitRequest, RateLimitResponse};
use tonic::{Request, Response, Status};

use crate::config::{HeaderStyle, OnInvalidRequest};
use crate::engine::Engine;
use crate::quota::Unit;
use crate::quota::rls::{LimitOverride, MAX_DESCRIPTORS, RlsDescriptor, RlsRequest};
use crate::respond;

/// The rate limit gRPC service.
pub struct Rls {
    engine: Arc<Engine>,
    headers: HeaderStyle,
    on_invalid: OnInvalidRequest,
    fail_open_header: String,
}

impl Rls {
    /// Serves rate limit decisions from `engine`.
    pub fn new(
        engine: Arc<Engine>,
        headers: HeaderStyle,
        on_invalid: OnInvalidRequest,
        fail_open_header: String,
    ) -> Self {
        Self {
            engine,
            headers,
            on_invalid,
            fail_open_header,
        }
    }
}

#[tonic::async_trait]
impl RateLimitService for Rls {
    async fn should_rate_limit(
        &self,
        request: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let asked = request.get_ref().descriptors.len();
        let request = to_request(request.into_inner());
        if let Err(e) = request.validate() {
            tracing::info!(error = %e, "malformed rate limit request");
            return match self.on_invalid {
                OnInvalidRequest::Error => Err(Status::invalid_argument(e.to_string())),
                // One status per descriptor asked, as Envoy and the reference
                // service expect; each is OVER_LIMIT since none was judged.
                OnInvalidRequest::OverLimit => Ok(Response::new(RateLimitResponse {
                    overall_code: Code::OverLimit as i32,
                    statuses: vec![
                        DescriptorStatus {
                            code: Code::OverLimit as i32,
                            ..Default::default()
                        };
                        asked
                    ],
                    ..Default::default()
                })),
            };
        }
        let answer = self.engine.should_rate_limit(&request).await;
        if answer.defer {
            // RLS errors must be UNAVAILABLE, not UNKNOWN: that is what lets
            // Envoy's `failure_mode_deny` decide.
            return Err(Status::unavailable("quota store unavailable"));
        }
        Ok(Response::new(respond::rate_limit_response(
            &answer,
            self.headers,
            &self.fail_open_header,
        )))
    }
}

/// Converts Envoy's request; bounded before any copying of descriptors.
fn to_request(request: RateLimitRequest) -> RlsRequest {
    let RateLimitRequest {
        domain,
        descriptors,
        hits_addend,
    } = request;
    // Envoy leaves hits_addend 0 for "not set", which means 1.
    let hits_addend = u64::from(hits_addend.max(1));
    let descriptors = descriptors
        .into_iter()
        // One past the bound is enough for validation to refuse it.
        .take(MAX_DESCRIPTORS + 1)
        .map(|d| {
            let RateLimitDescriptor {
                entries,
                limit,
                hits_addend,
                is_negative_hits,
            } = d;
            RlsDescriptor {
                entries: entries
                    .into_iter()
                    .map(|Entry { key, value }| (key, value))
                    .collect(),
                // Negative hits (refunds) are not supported: treated as a
                // check that charges nothing.
                hits_addend: if is_negative_hits {
                    Some(0)
                } else {
                    hits_addend.map(|h| h.value)
                },
                // Every unit Envoy defines is honoured, and 0 means "refuse
                // all"; an override with a unit Tollgate cannot honour is
                // never read as "unlimited".
                limit_override: limit.map(
                    |RateLimitOverride {
                         requests_per_unit,
                         unit,
                     }| match Unit::from_envoy_code(unit) {
                        Some(unit) => LimitOverride::Limit(u64::from(requests_per_unit), unit),
                        None => LimitOverride::Unusable,
                    },
                ),
            }
        })
        .collect::<Vec<_>>();
    RlsRequest {
        domain,
        descriptors,
        hits_addend,
    }
}
